package gateway

import (
	"context"
	"sync"
	"time"

	"github.com/huleedu/websocket-service/internal/jwtauth"
)

// Revocation is confirmed against Redis before anything is written to a
// session. A handshake reads it before subscribing (a revoked token never
// subscribes) and again once the subscription is confirmed: a revocation
// landing in between published its disconnect to no one here, and from
// the confirmation on, every later one reaches the session through pub/sub.
// When Redis cannot be read (after broker.History.RevokedAt's own retry),
// the session is accepted but held: notifications wait in its queue,
// unwritten (the gateway's own frames still go out, see heldLocked),
// while the confirm loop reads the revocation again with backoff. It is
// then released, closed 4004 if revoked, or closed 1013
// REVOCATION_UNCHECKED once Options.RevocationHold has passed, so that the
// client reconnects (maybe to an instance that can read Redis) instead of
// waiting on a stream that delivers nothing. Holding rather than refusing
// at once keeps a blip of the command connection from turning into a
// reconnect storm.

// heldSession is a session waiting for its revocation to be confirmed.
type heldSession struct {
	s        *session
	deadline time.Time // closed with 1013 after a failed read past this
}

// confirmQueue collects held sessions; the confirm loop serves it.
type confirmQueue struct {
	mu      sync.Mutex
	pending []heldSession
	wake    chan struct{}
}

func (q *confirmQueue) add(h heldSession) {
	q.mu.Lock()
	q.pending = append(q.pending, h)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// putBack returns sessions still unconfirmed without waking the loop.
func (q *confirmQueue) putBack(hs []heldSession) {
	q.mu.Lock()
	q.pending = append(hs, q.pending...)
	q.mu.Unlock()
}

func (q *confirmQueue) take() []heldSession {
	q.mu.Lock()
	defer q.mu.Unlock()
	p := q.pending
	q.pending = nil
	return p
}

// Backoff between failed confirm rounds.
const (
	confirmBackoffMin = 100 * time.Millisecond
	confirmBackoffMax = time.Second
)

// checkRevoked refuses a token issued at or before the user's revocation
// (notify.Disconnect with Revoke) and returns the revocation time, and
// whether it was read: false when Redis could not be read (the session is
// then held, see above).
func (g *Gateway) checkRevoked(ctx context.Context, id jwtauth.Identity) (int64, bool, error) {
	if g.opts.History == nil {
		return 0, true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, g.opts.SubscribeWait)
	defer cancel()
	at, err := g.opts.History.RevokedAt(ctx, []string{id.UserID})
	switch {
	case err != nil:
		g.m.RevocationChecks.WithLabelValues("unavailable").Inc()
		return 0, false, nil
	case at[0] > 0 && issuedAt(id) <= at[0]:
		g.m.RevocationChecks.WithLabelValues("revoked").Inc()
		return 0, true, errTokenRevoked
	default:
		g.m.RevocationChecks.WithLabelValues("ok").Inc()
		return at[0], true, nil
	}
}

// recheckRevoked runs once s's subscription is confirmed, before the
// history read. A session held since the first check joins the confirm
// loop (whose read is after the subscription). Else the revocation is read
// again: errTokenRevoked refuses the handshake; an unreadable revocation
// holds the session. (Run beside the history read, in a goroutine, it
// would share that round trip; tried, it made history reads miss their
// deadline more often on a loaded machine: TestResumeUnderLoad got
// resume.incomplete "unavailable". One GET round trip costs less.)
func (g *Gateway) recheckRevoked(ctx context.Context, s *session, id jwtauth.Identity, confirmed bool) error {
	if g.opts.History == nil {
		return nil
	}
	if !confirmed {
		g.holdUnconfirmed(s)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, g.opts.SubscribeWait)
	defer cancel()
	at, err := g.opts.History.RevokedAt(ctx, []string{s.user})
	switch {
	case err != nil:
		g.m.RevocationChecks.WithLabelValues("unavailable").Inc()
		g.holdUnconfirmed(s)
		return nil
	case at[0] > 0 && issuedAt(id) <= at[0]:
		g.m.RevocationChecks.WithLabelValues("revoked").Inc()
		return errTokenRevoked
	default:
		g.m.RevocationChecks.WithLabelValues("ok").Inc()
		s.revokedAt.Store(max(s.revokedAt.Load(), at[0]))
		return nil
	}
}

// holdUnconfirmed stops writing to s until the confirm loop has read its
// user's revocation.
func (g *Gateway) holdUnconfirmed(s *session) {
	s.mu.Lock()
	s.unconfirmed = true
	s.mu.Unlock()
	g.m.RevocationChecks.WithLabelValues("held").Inc()
	g.confirms.add(heldSession{s: s, deadline: time.Now().Add(g.opts.RevocationHold)})
}

// confirmLoop reads the revocations of held sessions, with backoff while
// Redis cannot be read, until Close.
func (g *Gateway) confirmLoop() {
	backoff := confirmBackoffMin
	for {
		select {
		case <-g.stop:
			return
		case <-g.confirms.wake:
		}
		for batch := g.confirms.take(); len(batch) > 0; batch = g.confirms.take() {
			left := g.confirm(batch)
			if len(left) == 0 {
				backoff = confirmBackoffMin
				continue
			}
			g.confirms.putBack(left)
			t := time.NewTimer(backoff)
			select {
			case <-g.stop:
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, confirmBackoffMax)
		}
	}
}

// confirm reads the revocation of each held session's user (one pipeline
// per repairBatch users), settles those it could read, closes those past
// their deadline with 1013, and returns the others.
func (g *Gateway) confirm(batch []heldSession) []heldSession {
	index := map[string]int{}
	var users []string
	for _, h := range batch {
		if _, ok := index[h.s.user]; !ok {
			index[h.s.user] = len(users)
			users = append(users, h.s.user)
		}
	}
	revoked := make([]int64, len(users))
	read := make([]bool, len(users))
	for i := 0; i < len(users); i += repairBatch {
		end := min(i+repairBatch, len(users))
		ctx, cancel := context.WithTimeout(context.Background(), g.opts.SubscribeWait)
		at, err := g.opts.History.RevokedAt(ctx, users[i:end])
		cancel()
		if err != nil {
			continue
		}
		copy(revoked[i:end], at)
		for j := i; j < end; j++ {
			read[j] = true
		}
	}
	now := time.Now()
	var left []heldSession
	for _, h := range batch {
		h.s.mu.Lock()
		gone := h.s.closing || h.s.closed
		h.s.mu.Unlock()
		i := index[h.s.user]
		switch {
		case gone:
		case read[i]:
			g.settle(h.s, revoked[i])
		case now.After(h.deadline):
			g.m.RevocationChecks.WithLabelValues("unchecked").Inc()
			h.s.closeWith(errRevocationUnchecked)
		default:
			g.m.RevocationChecks.WithLabelValues("unavailable").Inc()
			left = append(left, h)
		}
	}
	return left
}

// settle ends a hold with the revocation read for its user: 4004 when the
// token is revoked, else the queued frames are written.
func (g *Gateway) settle(s *session, revokedAt int64) {
	if revokedAt > 0 && s.Disconnect("token revoked", revokedAt) {
		g.m.RevocationChecks.WithLabelValues("revoked").Inc()
		return
	}
	s.revokedAt.Store(max(s.revokedAt.Load(), revokedAt))
	g.m.RevocationChecks.WithLabelValues("confirmed").Inc()
	s.mu.Lock()
	s.unconfirmed = false
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}
