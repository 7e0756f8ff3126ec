package gateway

import (
	"context"
	"strconv"
	"sync"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/notify"
)

// Replays from history happen at two moments: when a client connects with
// since=<last id it saw> (resume), and when the Redis link comes back for
// connections that stayed open through it (repair). Either way the session
// holds every frame that arrives meanwhile, then queues the replay, then
// the held frames without the ones the replay already covered: nothing
// missing, nothing twice, in order.

// holdState is a session's hold; see session.hold.
type holdState struct {
	held   []*hub.Message
	repair bool   // a repair (else a resume at connect)
	gen    uint32 // the repair it belongs to
	// since, on a repair hold, is what a client that connected with since
	// while the link was down sent (deferResume): its resume is done by the
	// repair once the link is back. Nil otherwise.
	since *string
}

// replayOut is what a finished replay puts around the held frames.
type replayOut struct {
	prefix   *hub.Message // resume.incomplete, or nil
	base     *notify.ID   // the client has everything up to here (nil: unknown)
	entries  [][]byte     // history entries after base
	position *notify.ID   // resume: where the client stands now, sent last as resume.position (nil: unknown, not sent)
	suffix   *hub.Message // connection.restored, or nil
}

// releaseHoldLocked ends the hold: r's frames (if any), then the held ones,
// skipping any history entry at or before what the client already has.
// It reports false if the send queue overflowed. s.mu is held.
func (s *session) releaseHoldLocked(r *replayOut) bool {
	h := s.hold
	s.hold = nil
	var msgs []*hub.Message
	if r != nil {
		if r.prefix != nil {
			msgs = append(msgs, r.prefix)
		}
		s.lastID = r.base
		for _, e := range r.entries {
			m := &hub.Message{Payload: e, Frame: TextFrame(e)}
			if id, ok := notify.PayloadID(e); ok {
				m.ID = &id
			}
			msgs = append(msgs, m)
		}
		s.gw.m.Replayed.Add(float64(len(r.entries)))
	}
	msgs = append(msgs, h.held...)
	for _, m := range msgs {
		if s.hasLocked(m) {
			continue // the client has it: replayed, or seen before it reconnected
		}
		if !s.pushLocked(outbound{msg: m}) {
			return false
		}
	}
	if r != nil && r.position != nil {
		// The client's position: the history's newest when it was read,
		// unless what was just queued is newer.
		if last := s.lastID; last == nil || (last.Epoch == r.position.Epoch && last.Offset < r.position.Offset) {
			s.lastID = r.position
		}
		pos := positionString(s.lastID)
		m := systemMessage(eventFrame("resume.position", "id", pos))
		if s.sse {
			m.SetAlt(ssePosition(m.Payload, pos))
		}
		if !s.pushLocked(outbound{msg: m}) {
			return false
		}
	}
	if r != nil && r.suffix != nil && !s.pushLocked(outbound{msg: r.suffix}) {
		return false
	}
	return true
}

// hasLocked reports whether m is a history entry at or before the
// connection's position: a live copy of something replayed (a history read
// can finish before pub/sub brings the same message), or something the
// client had before it reconnected. s.mu is held.
func (s *session) hasLocked(m *hub.Message) bool {
	last := s.lastID
	return m.ID != nil && last != nil && m.ID.Offset <= last.Offset && m.ID.Epoch == last.Epoch
}

// finishHold releases the hold with r unless the hold is gone or is a newer
// repair than gen (gen 0: the resume at connect), and flushes.
func (s *session) finishHold(repair bool, gen uint32, r *replayOut) {
	s.mu.Lock()
	if s.hold == nil || s.hold.repair != repair || s.hold.gen != gen || s.closing {
		s.mu.Unlock()
		return
	}
	s.releaseHoldAndFlushLocked(r)
}

// releaseHoldAndFlushLocked releases the hold, unlocks s.mu and schedules
// the writer (or closes a client whose queue overflowed).
func (s *session) releaseHoldAndFlushLocked(r *replayOut) {
	ok := s.releaseHoldLocked(r)
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if !ok {
		s.gw.m.MessagesDropped.WithLabelValues("slow_consumer").Inc()
		s.closeWith(errSlowConsumer)
		return
	}
	if sched {
		s.writer.schedule(s)
	}
}

func systemMessage(payload []byte) *hub.Message {
	return &hub.Message{Payload: payload, Frame: TextFrame(payload)}
}

// historyWait bounds a history read during a handshake.
const historyWait = 2 * time.Second

// resume runs during the handshake of a client that sent since, after the
// subscription is confirmed and before the upgrade response: the replay is
// the first thing the client receives.
func (g *Gateway) resume(ctx context.Context, s *session, since string) {
	if g.deferResume(s, since) {
		return
	}
	out := &replayOut{}
	var rep broker.Replay
	switch {
	case g.opts.History == nil:
		rep.Reason = broker.ReasonUnavailable
	case since == "": // a client that has seen nothing yet: only its position
		if id, ok := g.newest(ctx, s.user); ok {
			out.position = id
		}
		g.m.Resumes.WithLabelValues("new").Inc()
		s.finishHold(false, 0, out)
		return
	default:
		rctx, cancel := context.WithTimeout(ctx, historyWait)
		rep = g.opts.History.Since(rctx, s.user, since)
		cancel()
	}
	switch rep.Reason {
	case "":
		base, _ := notify.ParseID(since) // EmptyPosition: the zero id
		out.base, out.entries, out.position = &base, rep.Entries, &rep.Last
		g.m.Resumes.WithLabelValues("complete").Inc()
	case broker.ReasonUnavailable:
		out.prefix = systemMessage(resumeIncompleteFrame(since, rep.Reason))
		g.m.Resumes.WithLabelValues(rep.Reason).Inc()
	case broker.ReasonInvalid:
		out.prefix = systemMessage(resumeIncompleteFrame(since, rep.Reason))
		if id, ok := g.newest(ctx, s.user); ok {
			out.position = id
		}
		g.m.Resumes.WithLabelValues(rep.Reason).Inc()
	default:
		out.prefix = systemMessage(resumeIncompleteFrame(since, rep.Reason))
		newest := rep.Newest
		out.position = &newest
		g.m.Resumes.WithLabelValues(rep.Reason).Inc()
	}
	s.finishHold(false, 0, out)
}

// deferResume turns the resume of a client that connects while the link is
// down (Redis unreachable, or still loading its data) into a repair: the
// client is told connection.degraded now, and once the link is back (history
// readable) the repair sends the replay from since (or resume.incomplete),
// resume.position and connection.restored. Answering now could only say
// "unavailable" and lose the client's position. It reports whether it did.
func (g *Gateway) deferResume(s *session, since string) bool {
	s.mu.Lock()
	if g.opts.History == nil || !s.toldDown || s.hold == nil || s.hold.repair || s.closing {
		s.mu.Unlock()
		return false
	}
	// The resume hold keeps connection.degraded (a frame of the gateway's
	// own): queue it, then hold live frames for the repair.
	if !s.releaseHoldLocked(nil) {
		s.mu.Unlock()
		s.gw.m.MessagesDropped.WithLabelValues("slow_consumer").Inc()
		s.closeWith(errSlowConsumer)
		return true
	}
	s.hold = &holdState{repair: true, gen: s.repairGen, since: &since}
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
	return true
}

// newest reads the newest id of user's history (emptyHistory: none).
func (g *Gateway) newest(ctx context.Context, user string) (*notify.ID, bool) {
	rctx, cancel := context.WithTimeout(ctx, historyWait)
	defer cancel()
	id, err := g.opts.History.Newest(rctx, user)
	if err != nil {
		return nil, false
	}
	if id == (notify.ID{}) {
		return emptyHistory, true
	}
	return &id, true
}

// position records where a client without since starts in its history, so
// that a repair after an outage knows what it has. Skipped while Redis is
// down (the repair then reports complete:false).
func (g *Gateway) position(ctx context.Context, s *session) {
	s.mu.Lock()
	down := s.toldDown
	s.mu.Unlock()
	if g.opts.History == nil || down {
		return
	}
	pos, ok := g.newest(ctx, s.user)
	if !ok {
		return
	}
	s.mu.Lock()
	if s.lastID == nil { // else a live message already told us more
		s.lastID = pos
	}
	s.mu.Unlock()
}

// positionString is the since a client resumes from at id.
func positionString(id *notify.ID) string {
	if id.Epoch == "" {
		return notify.EmptyPosition
	}
	return id.String()
}

// emptyHistory is the position of a connection whose user had no history
// when it connected: everything the history holds later is new to it.
var emptyHistory = &notify.ID{}

// repairQueue collects sessions to repair; one goroutine of the gateway
// serves it, reading the histories of many users per round trip.
type repairQueue struct {
	mu      sync.Mutex
	pending []*session
	wake    chan struct{}
}

func (q *repairQueue) add(s *session) {
	q.mu.Lock()
	q.pending = append(q.pending, s)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *repairQueue) take() []*session {
	q.mu.Lock()
	defer q.mu.Unlock()
	p := q.pending
	q.pending = nil
	return p
}

// repairBatch bounds the histories read in one pipeline.
const repairBatch = 1000

// repairLoop repairs sessions as the link comes back, until Close.
func (g *Gateway) repairLoop() {
	for {
		select {
		case <-g.stop:
			return
		case <-g.repairs.wake:
		}
		for batch := g.repairs.take(); len(batch) > 0; batch = g.repairs.take() {
			g.repair(batch)
		}
	}
}

// repair reads, once per user and position, what the sessions missed, and
// finishes each session's hold with it and connection.restored.
func (g *Gateway) repair(batch []*session) {
	type job struct {
		s     *session
		gen   uint32
		since notify.ID
		key   string
		// resume: the client connected with this since while the link was
		// down (deferResume); nil for a connection repaired after an outage.
		resume *string
		valid  bool // resume parses (the empty position included)
	}
	batch = g.closeRevoked(batch)
	jobs := make([]job, 0, len(batch))
	keys := map[string]int{} // user+position → index into topics
	var topics []string
	var since []notify.ID
	for _, s := range batch {
		s.mu.Lock()
		if s.hold == nil || !s.hold.repair || (s.lastID == nil && s.hold.since == nil) {
			s.mu.Unlock()
			continue
		}
		j := job{s: s, gen: s.hold.gen, resume: s.hold.since}
		if s.lastID != nil {
			j.since = *s.lastID
		}
		s.mu.Unlock()
		if j.resume != nil {
			// The entries after since; for an empty or invalid since only
			// the newest id (read with the zero id).
			id, ok := notify.ParseID(*j.resume)
			j.valid = ok || *j.resume == notify.EmptyPosition || *j.resume == ""
			if ok {
				j.since = id
			}
		}
		j.key = s.user + "\x00" + j.since.String()
		if _, ok := keys[j.key]; !ok {
			keys[j.key] = len(topics)
			topics, since = append(topics, s.user), append(since, j.since)
		}
		jobs = append(jobs, j)
	}
	results := make([]broker.Replay, 0, len(topics))
	for i := 0; i < len(topics); i += repairBatch {
		end := min(i+repairBatch, len(topics))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		results = append(results, g.opts.History.SinceMany(ctx, topics[i:end], since[i:end])...)
		cancel()
	}
	now := time.Now()
	for _, j := range jobs {
		rep := results[keys[j.key]]
		if j.resume != nil {
			j.s.finishHold(true, j.gen, g.deferredResume(now, *j.resume, j.valid, j.since, rep))
			continue
		}
		out := &replayOut{suffix: systemMessage(restoredFrame(now, rep.Reason == ""))}
		if rep.Reason == "" {
			base := j.since
			out.base, out.entries = &base, rep.Entries
			g.m.Repairs.WithLabelValues("complete").Inc()
		} else {
			g.m.Repairs.WithLabelValues("incomplete").Inc()
		}
		j.s.finishHold(true, j.gen, out)
	}
}

// deferredResume is what a client that connected with since while the link
// was down gets once it is back, from rep (the history read after since, or
// after the zero id when since is empty or invalid): what a resume at
// connect would have sent, then connection.restored, complete only if the
// replay was.
func (g *Gateway) deferredResume(now time.Time, since string, valid bool, id notify.ID, rep broker.Replay) *replayOut {
	out := &replayOut{}
	reason := rep.Reason
	switch {
	case !valid:
		reason = broker.ReasonInvalid
		if rep.Reason != broker.ReasonUnavailable {
			out.position = positionOf(rep.Newest)
		}
	case since == "" && rep.Reason != broker.ReasonUnavailable:
		// A client that has seen nothing: only its position; what was
		// published while it waited is unknown to it.
		out.position, reason = positionOf(rep.Newest), "new"
	case rep.Reason == "":
		out.base, out.entries, out.position = &id, rep.Entries, &rep.Last
		reason = "complete"
	case rep.Reason != broker.ReasonUnavailable:
		newest := rep.Newest
		out.position = &newest
	}
	switch reason {
	case "complete", "new":
	default:
		out.prefix = systemMessage(resumeIncompleteFrame(since, reason))
	}
	g.m.Resumes.WithLabelValues(reason).Inc()
	out.suffix = systemMessage(restoredFrame(now, reason == "complete"))
	return out
}

// positionOf is where a reader of a history whose newest id is newest
// stands (emptyHistory: none).
func positionOf(newest notify.ID) *notify.ID {
	if newest == (notify.ID{}) {
		return emptyHistory
	}
	return &newest
}

// closeRevoked closes, after an outage, the sessions whose tokens were
// revoked meanwhile (the disconnect message was lost with the link), and
// returns the others.
func (g *Gateway) closeRevoked(batch []*session) []*session {
	users := make([]string, 0, len(batch))
	seen := map[string]int{}
	for _, s := range batch {
		if _, ok := seen[s.user]; !ok {
			seen[s.user] = len(users)
			users = append(users, s.user)
		}
	}
	revoked := make([]int64, len(users))
	for i := 0; i < len(users); i += repairBatch {
		end := min(i+repairBatch, len(users))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		at, err := g.opts.History.RevokedAt(ctx, users[i:end])
		cancel()
		if err != nil {
			g.m.RevocationChecks.WithLabelValues("unavailable").Add(float64(end - i))
			continue
		}
		copy(revoked[i:end], at)
	}
	keep := batch[:0]
	for _, s := range batch {
		at := revoked[seen[s.user]]
		if at > 0 && s.Disconnect("token revoked", at) {
			g.m.RevocationChecks.WithLabelValues("revoked").Inc()
			continue
		}
		keep = append(keep, s)
	}
	return keep
}

func resumeIncompleteFrame(since, reason string) []byte {
	return eventFrame("resume.incomplete", "since", since, "reason", reason)
}

func restoredFrame(now time.Time, complete bool) []byte {
	b := eventFrame("connection.restored", "timestamp", rfc3339(now))
	b = b[:len(b)-2] // reopen data: "}}"
	b = append(b, `,"complete":`...)
	b = strconv.AppendBool(b, complete)
	return append(b, "}}"...)
}
