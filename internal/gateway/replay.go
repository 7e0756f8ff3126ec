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
// They join the session's backlog, which the send queue takes in as it
// drains (feedLocked): a replay of any size streams instead of overflowing
// the queue, and the client always gets its first replayed frame. s.mu is
// held.
func (s *session) releaseHoldLocked(r *replayOut) {
	h := s.hold
	s.hold = nil
	if s.backlog == nil {
		s.backlog = &backlog{}
	}
	b := s.backlog
	if r != nil {
		if r.prefix != nil {
			b.items = append(b.items, pending{msg: r.prefix})
		}
		b.items = append(b.items, pending{setBase: true, base: r.base})
		if len(r.entries) > 0 {
			b.items = append(b.items, pending{entries: r.entries})
		}
	}
	for _, m := range h.held {
		b.items = append(b.items, pending{msg: m})
	}
	if r != nil && r.position != nil {
		b.items = append(b.items, pending{position: r.position})
	}
	if r != nil && r.suffix != nil {
		b.items = append(b.items, pending{msg: r.suffix})
	}
	s.feedLocked()
}

// backlog is what released replays still have to send, in order: the
// writer moves it into the send queue as the queue drains. Its history
// entries are the slices the history read returned, shared by every
// session repaired from the same read, and framed one at a time as the
// queue takes them: a session's memory stays its queue's bound. Frames that
// arrive while it is not empty wait behind it, at most SendQueueMsgs.
type backlog struct {
	items []pending
	head  int
	extra int // frames queued behind the replays (live or the gateway's own)
}

// pending is one step of a backlog.
type pending struct {
	msg      *hub.Message // a frame
	entries  [][]byte     // history entries, oldest first; next is the first not yet queued
	next     int
	setBase  bool       // the replay's start: the client has everything up to base (nil: unknown)
	base     *notify.ID //
	position *notify.ID // resume.position, made when its turn comes
	close    *closeReason
	extra    bool // counted in backlog.extra
}

// feedLocked moves backlog frames into the send queue while they fit (one
// at least when the queue is empty, whatever its size), skipping history
// entries the client already has. s.mu is held.
func (s *session) feedLocked() {
	b := s.backlog
	for b != nil && b.head < len(b.items) {
		it := &b.items[b.head]
		switch {
		case it.setBase:
			// A repair read from a position the backlog has since passed
			// must not move the position back (entries would repeat).
			if last := s.lastID; it.base == nil || last == nil || last.Epoch != it.base.Epoch || last.Offset < it.base.Offset {
				s.lastID = it.base
			}
		case it.entries != nil:
			for ; it.next < len(it.entries); it.next++ {
				e := it.entries[it.next]
				m := &hub.Message{Payload: e}
				if id, ok := notify.PayloadID(e); ok {
					m.ID = &id
				}
				// Room first: hasLocked may announce a rollback, once.
				if !s.roomLocked(len(e)) {
					return
				}
				if s.hasLocked(m) {
					continue
				}
				m.Frame = TextFrame(e)
				s.appendLocked(outbound{msg: m})
				s.gw.m.Replayed.Inc()
			}
		case it.position != nil:
			// The client's position: the history's newest when it was read,
			// unless what was queued is newer.
			if last := s.lastID; last == nil || (last.Epoch == it.position.Epoch && last.Offset < it.position.Offset) {
				s.lastID = it.position
			}
			pos := positionString(s.lastID)
			m := systemMessage(eventFrame("resume.position", "id", pos))
			if !s.roomLocked(len(m.Payload)) {
				return
			}
			if s.sse {
				m.SetAlt(ssePosition(m.Payload, pos))
			}
			s.appendLocked(outbound{msg: m})
		case it.close != nil:
			s.queue.push(outbound{close: it.close, msg: &hub.Message{}})
		default:
			if !s.roomLocked(len(it.msg.Payload)) {
				return
			}
			// (hasLocked after the room check: it may announce a rollback, once.)
			if !s.hasLocked(it.msg) { // else the client has it: replayed, or seen before it reconnected
				s.appendLocked(outbound{msg: it.msg})
			}
		}
		if it.extra {
			b.extra--
		}
		b.items[b.head] = pending{}
		b.head++
	}
	s.backlog = nil
}

// roomLocked reports whether n more bytes fit the send queue; an empty
// queue takes anything, so a backlog always moves.
func (s *session) roomLocked(n int) bool {
	return s.queue.len() == 0 || (s.queue.len() < s.gw.opts.SendQueueMsgs && s.queueBytes+n <= s.gw.opts.SendQueueBytes)
}

// behindBacklogLocked queues o behind a streaming replay. Beyond
// SendQueueMsgs such frames the client is a slow consumer, closed with
// 4002 after the replay frames already in its queue (so a resume always
// makes progress). It reports false if it closed. s.mu is held.
func (s *session) behindBacklogLocked(o outbound) bool {
	b := s.backlog
	if b.extra >= s.gw.opts.SendQueueMsgs {
		s.dropBacklogLocked()
		s.closeAfterQueueLocked(errSlowConsumer)
		return false
	}
	b.extra++
	b.items = append(b.items, pending{msg: o.msg, extra: true})
	return true
}

// dropBacklogLocked discards what a backlog had not queued yet.
func (s *session) dropBacklogLocked() {
	b := s.backlog
	if b == nil {
		return
	}
	n := 0
	for _, it := range b.items[b.head:] {
		switch {
		case it.msg != nil:
			n++
		case it.entries != nil:
			n += len(it.entries) - it.next
		}
	}
	if n > 0 {
		s.gw.m.MessagesDropped.WithLabelValues("connection_closed").Add(float64(n))
	}
	s.backlog = nil
}

// hasLocked reports whether m is a history entry the connection already
// has: a live copy of something replayed (a history read can finish before
// pub/sub brings the same message), or something the client had before it
// reconnected. Only the same entry counts: at the connection's position the
// same check, before it an entry appended earlier (checks are instants). An
// entry at or before the position that is another one means a failover lost
// entries the connection had and publish.lua reused their offsets: it is
// new, and is announced first with resume.incomplete (reason rollback, since
// the connection's position) so the client refetches. s.mu is held.
func (s *session) hasLocked(m *hub.Message) bool {
	last := s.lastID
	if m.ID == nil || last == nil || m.ID.Epoch != last.Epoch || m.ID.Offset > last.Offset {
		return false
	}
	if last.Check == "" || m.ID.Check == last.Check || (m.ID.Offset < last.Offset && !checkAfter(m.ID.Check, last.Check)) {
		return true // the same entry, or one before it ("": a position whose entry expired, nothing to compare)
	}
	s.gw.m.Resumes.WithLabelValues(outcomeLiveRollback).Inc()
	// Queued past the bounds like closeAfterQueue's close: one small frame
	// per rollback, which must not be lost while the entry it announces is
	// queued (if that one does not fit, the client is closed and resumes).
	ann := systemMessage(resumeIncompleteFrame(positionString(last), broker.ReasonRollback))
	s.queue.push(outbound{msg: ann})
	s.queueBytes += len(ann.Payload)
	return false
}

// outcomeLiveRollback counts, in websocket_resumes_total, the rollbacks
// announced to open connections.
const outcomeLiveRollback = "rollback_live"

// checkAfter reports whether check a is a later instant than b (base36
// without leading zeros: longer is later, else the text order).
func checkAfter(a, b string) bool {
	if len(a) != len(b) {
		return len(a) > len(b)
	}
	return a > b
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
// the writer.
func (s *session) releaseHoldAndFlushLocked(r *replayOut) {
	s.releaseHoldLocked(r)
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

func systemMessage(payload []byte) *hub.Message {
	return &hub.Message{Payload: payload, Frame: TextFrame(payload), Own: true}
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
		rep.Entries = g.admitted(rep.Entries)
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

// admitted keeps the history entries live delivery would deliver
// (hub.Admit: size and JSON, drops counted alike), in order.
func (g *Gateway) admitted(entries [][]byte) [][]byte {
	var keep [][]byte // nil until one is dropped: entries as they are
	for i, e := range entries {
		if !g.hub.Admit(e) {
			if keep == nil {
				keep = append(make([][]byte, 0, len(entries)-1), entries[:i]...)
			}
			continue
		}
		if keep != nil {
			keep = append(keep, e)
		}
	}
	if keep == nil {
		return entries
	}
	return keep
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
	s.releaseHoldLocked(nil)
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
	pending []queuedRepair
	wake    chan struct{}
}

// queuedRepair is a session and the repair generation it was queued for
// (0: a revocation check only): a link that went down again before the
// repair ran makes it stale, and the next link-up queues it anew.
type queuedRepair struct {
	s   *session
	gen uint32
}

func (q *repairQueue) add(s *session, gen uint32) {
	q.mu.Lock()
	q.pending = append(q.pending, queuedRepair{s, gen})
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *repairQueue) take() []queuedRepair {
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
// finishes each session's hold with it and connection.restored. It reads
// repairBatch histories at a time and finishes their sessions before
// reading the next, so at most one batch of reads is held here (the
// sessions' backlogs share the entries until their sockets take them).
func (g *Gateway) repair(queued []queuedRepair) {
	type job struct {
		s     *session
		since notify.ID
		// resume: the client connected with this since while the link was
		// down (deferResume); nil for a connection repaired after an outage.
		resume *string
		valid  bool // resume parses (the empty position included)
	}
	gens := make(map[*session]uint32, len(queued))
	batch := make([]*session, 0, len(queued))
	for _, q := range queued {
		if _, ok := gens[q.s]; !ok {
			batch = append(batch, q.s)
		}
		gens[q.s] = max(gens[q.s], q.gen)
	}
	batch = g.closeRevoked(batch)
	keys := map[string]int{} // user+position → index into topics
	var topics []string
	var since []notify.ID
	var jobs [][]job // per topic
	for _, s := range batch {
		s.mu.Lock()
		// Only the repair of the link state the session is in now: after a
		// quick down → up → down, the hold belongs to the second outage.
		if s.hold == nil || !s.hold.repair || (s.lastID == nil && s.hold.since == nil) || s.hold.gen != gens[s] || s.toldDown {
			s.mu.Unlock()
			continue
		}
		j := job{s: s, resume: s.hold.since}
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
		key := s.user + "\x00" + j.since.String()
		k, ok := keys[key]
		if !ok {
			k = len(topics)
			keys[key] = k
			topics, since, jobs = append(topics, s.user), append(since, j.since), append(jobs, nil)
		}
		jobs[k] = append(jobs[k], j)
	}
	for i := 0; i < len(topics); i += repairBatch {
		end := min(i+repairBatch, len(topics))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		results := g.opts.History.SinceMany(ctx, topics[i:end], since[i:end])
		cancel()
		now := time.Now()
		for k, rep := range results {
			rep.Entries = g.admitted(rep.Entries)
			for _, j := range jobs[i+k] {
				if j.resume != nil {
					j.s.finishHold(true, gens[j.s], g.deferredResume(now, *j.resume, j.valid, j.since, rep))
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
				j.s.finishHold(true, gens[j.s], out)
			}
			jobs[i+k] = nil
		}
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
	unread := make([]bool, len(users))
	for i := 0; i < len(users); i += repairBatch {
		end := min(i+repairBatch, len(users))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		at, err := g.opts.History.RevokedAt(ctx, users[i:end])
		cancel()
		if err != nil {
			g.m.RevocationChecks.WithLabelValues("unavailable").Add(float64(end - i))
			for j := i; j < end; j++ {
				unread[j] = true
			}
			continue
		}
		copy(revoked[i:end], at)
	}
	keep := batch[:0]
	for _, s := range batch {
		if unread[seen[s.user]] {
			g.holdUnconfirmed(s) // repaired, but written nothing until confirmed (revocation.go)
		}
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
