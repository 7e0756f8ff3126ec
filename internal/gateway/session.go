package gateway

import (
	"encoding/binary"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/nbhttp/websocket"

	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
	"github.com/huleedu/websocket-service/notify"
)

// flushThreshold bounds the bytes a session hands to nbio that the kernel has
// not taken yet; above it the session stops flushing (stalls) until nbio
// reports the bytes written. So a slow client's memory is its own queue
// (bounded by SendQueueMsgs/SendQueueBytes) plus at most this much.
const flushThreshold = 32 << 10

// session is one authenticated connection. It holds no goroutine: inbound
// frames arrive on nbio's pollers, outbound frames are written by the
// session's writer, and timers are the gateway's sweeper.
type session struct {
	gw     *Gateway
	user   string
	writer *writer
	conn   *websocket.Conn // set by attach, before the session is scheduled (WebSocket)
	stream *nbio.Conn      // set by attachStream (Server-Sent Events; sse.go)

	expiresAt atomic.Int64 // unix nanos of the token's exp
	issuedAt  atomic.Int64 // unix seconds of the token's iat (0: none)
	revokedAt atomic.Int64 // unix seconds up to which the user's tokens are revoked, as last read
	lastSeen  atomic.Int64 // unix nanos of the last frame (any kind) received
	pending   atomic.Int64 // bytes given to nbio, not yet on the wire
	stalled   atomic.Bool  // waiting for pending to fall below flushThreshold
	nextPing  int64        // owned by the sweeper goroutine

	mu           sync.Mutex
	queue        sendQueue
	queueBytes   int
	tokens       float64 // inbound rate limit bucket
	tokensAt     int64
	attached     bool
	scheduled    bool
	closing      bool         // no more deliveries
	closeNow     *closeReason // close requested, performed by the writer
	closed       bool         // no further writes: the close frame is out or the socket is gone
	wantPing     bool
	pong         []byte // payload of the latest unanswered client ping (nil: none)
	repairGen    uint32 // counts repairs, so a late result of an abandoned one is ignored
	toldDown     bool   // the client was told connection.degraded
	clientClosed bool   // the client sent the close frame
	sse          bool   // a Server-Sent Events stream (sse.go), not a WebSocket
	// unconfirmed: the token's revocation could not be read; nothing is
	// written (frames wait in the queue) until revocation.go confirms it.
	unconfirmed bool
	// lastID is the newest history id this connection has (nil: unknown),
	// where a repair after a Redis outage starts from.
	lastID *notify.ID
	// hold, while a replay from history is being prepared, keeps every
	// frame in arrival order; the replay goes out first (replay.go).
	hold *holdState
	// backlog is what released replays have not queued yet (replay.go).
	backlog *backlog

	// wmu orders every write to the socket; after a close frame nothing
	// more is written (RFC 6455 §5.5.1), whichever goroutine wrote it.
	wmu         sync.Mutex
	closeOnWire bool
}

// outbound is a queued frame: a shared message, or (close != nil) a close
// frame that goes out after everything queued before it.
type outbound struct {
	msg   *hub.Message
	close *closeReason
}

var _ hub.Conn = (*session)(nil)

func newSession(gw *Gateway, id jwtauth.Identity, revokedAt int64) *session {
	now := time.Now()
	s := &session{gw: gw, user: id.UserID, writer: gw.writers.pick(), tokens: float64(gw.opts.RateBurst), tokensAt: now.UnixNano()}
	s.expiresAt.Store(id.ExpiresAt.UnixNano())
	s.issuedAt.Store(issuedAt(id))
	s.revokedAt.Store(revokedAt)
	s.lastSeen.Store(now.UnixNano())
	s.nextPing = now.Add(gw.opts.PingInterval).UnixNano()
	return s
}

// sessionOf returns the session of an nbio connection. A frame can be parsed
// in the instant between the upgrade response and attach; wait for it.
// Once it is set, it is read again under the connection's mutex, which
// attach's SetSession released: that orders everything the handler wrote
// into the session before this poller goroutine reads it (the poller found
// the connection through epoll, which orders nothing).
func sessionOf(c *websocket.Conn) *session {
	deadline := time.Now().Add(time.Second)
	for {
		if c.Session() != nil {
			s, _ := c.SessionWithLock().(*session)
			return s
		}
		if time.Now().After(deadline) {
			return nil
		}
		runtime.Gosched()
	}
}

// attach binds the upgraded socket and starts writing what was queued.
func (s *session) attach(c *websocket.Conn) {
	s.conn = c
	c.SetSession(s)
	s.start()
}

// start lets the writer write: the connection (socket or stream) is set.
func (s *session) start() {
	s.mu.Lock()
	s.attached = true
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

// transport is the session's metric label.
func (s *session) transport() string {
	if s.sse {
		return metrics.TransportSSE
	}
	return metrics.TransportWebSocket
}

// frameOf is what this session writes for m: the WebSocket frame, or the
// Server-Sent Events encoding (made once per message, shared).
func (s *session) frameOf(m *hub.Message) []byte {
	if s.sse {
		return m.Alt(sseEvent)
	}
	return m.Frame
}

// Deliver implements hub.Conn. It runs on the broker's goroutine: enqueue only.
func (s *session) Deliver(m *hub.Message) {
	s.enqueue(outbound{msg: m}, true)
}

// LinkState implements hub.Conn: tell the client about each change once.
// From the moment the link is down, live messages are held: those that
// arrive after the resubscribe must not overtake the repair, which replays
// from history what the connection missed, then sends connection.restored
// saying whether that was complete (replay.go).
func (s *session) LinkState(up bool) {
	s.mu.Lock()
	if s.toldDown != up || s.closing { // no change to report
		s.mu.Unlock()
		return
	}
	s.toldDown = !up
	s.repairGen++ // a repair still reading belongs to a link state that is gone
	var frame []byte
	switch {
	case !up:
		frame = degradedFrame(time.Now())
		if s.hold == nil {
			s.hold = &holdState{repair: true}
		}
		if s.hold.repair {
			s.hold.gen = s.repairGen
		}
	case s.hold == nil || !s.hold.repair: // connected while down: nothing to repair from
		frame = restoredFrame(time.Now(), false)
	case (s.lastID != nil || s.hold.since != nil) && s.gw.opts.History != nil:
		s.hold.gen = s.repairGen
		gen := s.repairGen
		s.mu.Unlock()
		s.gw.repairs.add(s, gen) // the repair checks the revocation first
		return
	default: // no history position: deliver what was held, and say so
		s.releaseHoldAndFlushLocked(&replayOut{suffix: systemMessage(restoredFrame(time.Now(), false))})
		s.recheckRevocation(up)
		return
	}
	s.mu.Unlock()
	s.send(frame)
	s.recheckRevocation(up)
}

// recheckRevocation queues a session the link came back for without a
// repair: a revocation published while the link was down reached no one
// here, so the repair loop looks it up (and repairs nothing else for it).
func (s *session) recheckRevocation(up bool) {
	if up && s.gw.opts.History != nil {
		s.gw.repairs.add(s, 0)
	}
}

// send queues a frame generated by the gateway itself.
func (s *session) send(payload []byte) {
	s.enqueue(outbound{msg: systemMessage(payload)}, false)
}

// enqueue queues a frame, or holds it: a live message during any hold, a
// frame of the gateway's own only while a resume at connect is prepared (a
// repair must not delay pongs).
func (s *session) enqueue(o outbound, live bool) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		s.gw.m.MessagesDropped.WithLabelValues("connection_closed").Inc()
		return
	}
	if s.hold != nil && (live || !s.hold.repair) {
		if len(s.hold.held) >= s.gw.opts.SendQueueMsgs {
			s.mu.Unlock()
			s.gw.m.MessagesDropped.WithLabelValues("slow_consumer").Inc()
			s.closeWith(errSlowConsumer)
			return
		}
		s.hold.held = append(s.hold.held, o.msg)
		s.mu.Unlock()
		return
	}
	if live && s.hasLocked(o.msg) {
		s.mu.Unlock()
		return
	}
	if s.backlog != nil { // a replay is streaming: behind it
		ok := s.behindBacklogLocked(o)
		sched := s.needScheduleLocked()
		s.mu.Unlock()
		if !ok {
			s.gw.m.MessagesDropped.WithLabelValues("slow_consumer").Inc()
		}
		if sched {
			s.writer.schedule(s)
		}
		return
	}
	if !s.pushLocked(o) {
		s.mu.Unlock()
		s.gw.m.MessagesDropped.WithLabelValues("slow_consumer").Inc()
		s.closeWith(errSlowConsumer)
		return
	}
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

// pushLocked appends o to the send queue within its bounds (false: full)
// and records the newest history id queued.
func (s *session) pushLocked(o outbound) bool {
	n := len(o.msg.Payload)
	if s.queue.len() >= s.gw.opts.SendQueueMsgs || s.queueBytes+n > s.gw.opts.SendQueueBytes {
		return false
	}
	s.appendLocked(o)
	return true
}

// appendLocked appends o to the send queue and records the newest history
// id queued.
func (s *session) appendLocked(o outbound) {
	s.queue.push(o)
	s.queueBytes += len(o.msg.Payload)
	if o.msg.ID != nil {
		s.lastID = o.msg.ID
	}
}

// heldLocked reports whether the writer must stop: the token's revocation
// is unconfirmed (revocation.go), no pong is due and the next frame is a
// notification. The gateway's own frames (connection.degraded, …) and close
// frames still go out. fed: the backlog was just fed into the queue (else a
// backlog not fed yet does not hold: the writer feeds it, then decides).
// s.mu is held.
func (s *session) heldLocked(fed bool) bool {
	if !s.unconfirmed || s.pong != nil {
		return false
	}
	if s.queue.len() == 0 {
		return fed || s.backlog == nil
	}
	next := s.queue.peek()
	return next.close == nil && !next.msg.Own
}

// needScheduleLocked marks the session scheduled when it has work and is not
// already on its writer's list.
func (s *session) needScheduleLocked() bool {
	if !s.attached || s.scheduled || s.closed {
		return false
	}
	if s.closeNow == nil && !s.wantPing && ((s.queue.len() == 0 && s.backlog == nil && s.pong == nil) || s.stalled.Load() || s.heldLocked(false)) {
		return false
	}
	s.scheduled = true
	return true
}

// Disconnect implements hub.Conn: an operator's disconnect closes with 4004;
// a revocation only if this connection's token was issued by then.
func (s *session) Disconnect(reason string, revokedAt int64) bool {
	if revokedAt > 0 {
		if s.issuedAt.Load() > revokedAt {
			return false
		}
		s.revokedAt.Store(max(s.revokedAt.Load(), revokedAt))
	}
	s.closeWith(&revokedError{reason: reason})
	return true
}

// issuedAt is the token's iat in unix seconds; 0 (issued before any
// revocation) without one.
func issuedAt(id jwtauth.Identity) int64 {
	if id.IssuedAt.IsZero() {
		return 0
	}
	return id.IssuedAt.Unix()
}

// closeWith asks the writer to close the connection now with err's close
// code; queued messages are dropped. Safe from any goroutine.
func (s *session) closeWith(err error) {
	s.mu.Lock()
	if s.closeNow != nil || s.closed {
		s.mu.Unlock()
		return
	}
	s.closing = true
	s.closeNow = closeFor(err)
	s.stalled.Store(false)
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

// closeAfterQueue closes with err once everything already queued is written
// (graceful shutdown: nothing accepted before it is lost).
func (s *session) closeAfterQueue(err error) {
	s.mu.Lock()
	if s.closing || s.closed {
		s.mu.Unlock()
		return
	}
	if s.unconfirmed { // its queue may not be written: close at once
		s.mu.Unlock()
		s.closeWith(err)
		return
	}
	if s.hold != nil {
		s.releaseHoldLocked(nil) // nothing accepted before the shutdown is lost
	}
	s.closeAfterQueueLocked(err)
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

// closeAfterQueueLocked queues the close for err after everything queued
// (and a streaming replay's backlog); nothing more is accepted. s.mu is held.
func (s *session) closeAfterQueueLocked(err error) {
	s.closing = true
	if s.backlog != nil {
		s.backlog.items = append(s.backlog.items, pending{close: closeFor(err)})
		return
	}
	s.queue.push(outbound{close: closeFor(err), msg: &hub.Message{}})
}

// ping asks the writer to send a WebSocket ping.
func (s *session) ping() {
	s.mu.Lock()
	s.wantPing = true
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

// answerPing queues a pong for a client's ping. Pongs are coalesced (RFC
// 6455 §5.5.3 allows answering only the latest ping) and written by the
// writer like any frame, so they wait while the client does not read: a
// client that floods pings and never reads costs at most one pending pong.
func (s *session) answerPing(payload string) {
	s.mu.Lock()
	if s.closing || s.closed {
		s.mu.Unlock()
		return
	}
	s.pong = append(s.pong[:0], payload...)
	sched := s.needScheduleLocked()
	s.mu.Unlock()
	if sched {
		s.writer.schedule(s)
	}
}

// echoClose answers a close the client started, on the poller goroutine
// that read it: nbio drops the socket when the close handler returns.
func (s *session) echoClose(code int) {
	if code == 1005 || code < 1000 {
		code = 1000
	}
	s.mu.Lock()
	s.closed, s.closing, s.clientClosed = true, true, true
	s.mu.Unlock()
	_ = s.writeControl(websocket.CloseMessage, []byte{byte(code >> 8), byte(code)})
}

// run is called by the session's writer: perform a requested close, a
// ping, then flush the queue until it is empty or the socket is backed up.
// It is the only writer of the socket, so a close frame is always the last
// frame.
func (s *session) run() {
	for {
		s.mu.Lock()
		if s.closed {
			s.scheduled = false
			s.dropQueueLocked()
			s.mu.Unlock()
			return
		}
		if r := s.closeNow; r != nil {
			s.scheduled = false
			s.dropQueueLocked()
			s.closed = true // no further writes; OnClose finishes the cleanup
			s.mu.Unlock()
			s.writeClose(r)
			return
		}
		if s.wantPing {
			s.wantPing = false
			s.mu.Unlock()
			s.writeControl(websocket.PingMessage, nil)
			continue
		}
		if s.backlog != nil {
			s.feedLocked()
		}
		if s.heldLocked(true) {
			s.scheduled = false // the notifications wait for the revocation check
			s.mu.Unlock()
			return
		}
		if s.queue.len() == 0 && s.pong == nil {
			s.scheduled = false
			s.queue.reset()
			s.mu.Unlock()
			return
		}
		if s.pending.Load() >= flushThreshold {
			s.stalled.Store(true)
			if s.pending.Load() >= flushThreshold { // re-check: see onWritten
				s.scheduled = false
				s.mu.Unlock()
				return
			}
			s.stalled.Store(false)
		}
		if p := s.pong; p != nil {
			s.pong = nil
			s.mu.Unlock()
			_ = s.writeControl(websocket.PongMessage, p)
			continue
		}
		o := s.queue.pop()
		s.queueBytes -= len(o.msg.Payload)
		if o.close != nil {
			s.scheduled = false
			s.dropQueueLocked()
			s.closed = true
			s.mu.Unlock()
			s.writeClose(o.close)
			return
		}
		if s.queue.len() == 0 || s.queue.peek().close != nil {
			s.mu.Unlock()
			if s.writeFrame(s.frameOf(o.msg)) == nil {
				s.delivered(o.msg)
			}
			continue
		}
		// Several frames waiting (a replay, a burst): one write for all of
		// them, up to the flush threshold, instead of a syscall each.
		batch := []*hub.Message{o.msg}
		size := len(s.frameOf(o.msg))
		for len(batch) < maxBatch && s.queue.len() > 0 && s.queue.peek().close == nil && size < flushThreshold && (!s.unconfirmed || s.queue.peek().msg.Own) {
			next := s.queue.pop()
			s.queueBytes -= len(next.msg.Payload)
			batch = append(batch, next.msg)
			size += len(s.frameOf(next.msg))
		}
		s.mu.Unlock()
		if s.writeFrames(batch, size) == nil {
			for _, m := range batch {
				s.delivered(m)
			}
		}
	}
}

// maxBatch bounds the frames of one write.
const maxBatch = 64

// delivered records a live message written to the socket.
func (s *session) delivered(m *hub.Message) {
	if !m.ReceivedAt.IsZero() {
		s.gw.m.MessagesDelivered.Inc()
		s.gw.m.DeliveryLatency.Observe(time.Since(m.ReceivedAt).Seconds())
	}
}

// writeFrames hands several frames to nbio as one write (nbio's own
// Writev does not report what it wrote and can drop the buffers after a
// partial write; copying at most 32 KiB is cheaper than a syscall a frame).
func (s *session) writeFrames(batch []*hub.Message, size int) error {
	buf := make([]byte, 0, size)
	for _, m := range batch {
		buf = append(buf, s.frameOf(m)...)
	}
	return s.writeFrame(buf)
}

func (s *session) dropQueueLocked() {
	if n := s.queue.len(); n > 0 {
		s.gw.m.MessagesDropped.WithLabelValues("connection_closed").Add(float64(n))
	}
	s.dropBacklogLocked()
	s.queue, s.queueBytes, s.pong = sendQueue{}, 0, nil
}

// writeFrame hands an encoded frame, shared with the user's other
// connections, to nbio, which never blocks: what the kernel does not take is
// buffered and flushed by the poller. Its bytes are accounted in pending.
func (s *session) writeFrame(frame []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closeOnWire {
		return net.ErrClosed
	}
	s.pending.Add(int64(len(frame)))
	if s.sse {
		_, err := s.stream.Write(frame)
		return err
	}
	_, err := s.conn.Conn.Write(frame)
	return err
}

// writeControl sends a control frame (ping, pong, close: payload < 126 bytes).
// A stream has no control frames: a ping is a comment line, nothing else is
// sent (sse.go writes its close).
func (s *session) writeControl(t websocket.MessageType, payload []byte) error {
	if s.sse {
		if t == websocket.PingMessage {
			return s.writeFrame(sseHeartbeat)
		}
		return nil
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closeOnWire {
		return net.ErrClosed
	}
	s.closeOnWire = t == websocket.CloseMessage
	s.pending.Add(int64(2 + len(payload)))
	return s.conn.WriteMessage(t, payload)
}

// writeClose sends the close frame, then drops the socket if the client has
// not completed the close handshake within the close grace.
func (s *session) writeClose(r *closeReason) {
	s.gw.m.ConnectionsClosed.WithLabelValues(s.transport(), r.Metric).Inc()
	if s.sse {
		s.closeStream(r)
		return
	}
	_ = s.writeControl(websocket.CloseMessage, r.frame)
	c := s.conn
	s.gw.engine.AfterFunc(s.gw.opts.CloseGrace, func() { _ = c.Close() })
}

// onWritten is nbio's report that n bytes of this session reached the kernel.
func (s *session) onWritten(n int) {
	if s.pending.Add(-int64(n)) < flushThreshold && s.stalled.Load() {
		s.mu.Lock()
		if s.stalled.Load() {
			s.stalled.Store(false)
			if sched := s.needScheduleLocked(); sched {
				s.mu.Unlock()
				s.writer.schedule(s)
				return
			}
		}
		s.mu.Unlock()
	}
}

// allowFrame applies the inbound token bucket to data frames and pings.
func (s *session) allowFrame(now int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	rate, burst := s.gw.opts.RateLimit, float64(s.gw.opts.RateBurst)
	s.tokens = min(burst, s.tokens+float64(now-s.tokensAt)/1e9*rate)
	s.tokensAt = now
	if s.tokens < 1 {
		return false
	}
	s.tokens--
	return true
}

// TextFrame encodes payload as one unmasked, final WebSocket text frame
// (RFC 6455 §5.2): the server-to-client form, identical for every receiver,
// so a message is framed once and written to each connection as is.
func TextFrame(payload []byte) []byte {
	n := len(payload)
	var frame []byte
	switch {
	case n < 126:
		frame = append(make([]byte, 0, 2+n), 0x81, byte(n))
	case n <= 65535:
		frame = append(make([]byte, 0, 4+n), 0x81, 126, byte(n>>8), byte(n))
	default:
		frame = append(make([]byte, 0, 10+n), 0x81, 127)
		frame = binary.BigEndian.AppendUint64(frame, uint64(n))
	}
	return append(frame, payload...)
}
