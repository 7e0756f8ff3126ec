// Package hub keeps this instance's user → connections index, holds one
// broker subscription per user with local connections (reference-counted),
// and fans each message out to the user's connections. It knows neither
// Redis nor WebSockets: it talks to a broker.Broker and to Conn values.
package hub

import (
	"context"
	"encoding/json"
	"errors"
	"hash/maphash"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/metrics"
	"github.com/huleedu/websocket-service/notify"
)

// Errors returned by Add.
var (
	ErrUserQuota  = errors.New("too many connections for this user")
	ErrServerBusy = errors.New("instance connection limit reached")
	// ErrSubscribeTimeout: the broker's link is up but did not confirm the
	// subscription before ctx ended. Accepting the connection anyway would
	// break the promise that what is published after it opens arrives.
	ErrSubscribeTimeout = errors.New("subscription not confirmed in time")
)

// Message is one payload received from the broker, shared by every
// connection it is delivered to (it is never copied per connection).
type Message struct {
	Payload    []byte
	Frame      []byte     // Options.Encode(Payload): what connections write, encoded once
	ID         *notify.ID // the history id publish.lua put first in Payload; nil without history
	ReceivedAt time.Time
	// Own marks a frame the gateway makes for one connection (connection.*,
	// resume.*), not a notification.
	Own bool

	alt atomic.Pointer[[]byte] // a second encoding (Alt), made once for all connections
}

// Alt returns a second encoding of the message (the gateway's Server-Sent
// Events framing beside the WebSocket Frame): made by the first connection
// that asks, then shared.
func (m *Message) Alt(encode func(*Message) []byte) []byte {
	if b := m.alt.Load(); b != nil {
		return *b
	}
	b := encode(m)
	m.alt.CompareAndSwap(nil, &b)
	return *m.alt.Load()
}

// SetAlt sets the second encoding of a message made for one connection.
func (m *Message) SetAlt(b []byte) { m.alt.Store(&b) }

// Conn is a local connection as the hub sees it. Both methods must return
// without blocking (they enqueue).
type Conn interface {
	Deliver(m *Message)
	// LinkState tells the connection whether the broker link is up; a
	// connection reports each change to its client once.
	LinkState(up bool)
	// Disconnect ends the connection for an operator's disconnect (4004);
	// with revokedAt > 0 only if its token was issued at or before then
	// (unix seconds). It reports whether the connection is being closed.
	Disconnect(reason string, revokedAt int64) bool
}

// Options configure a Hub.
type Options struct {
	MaxConnsPerUser int
	MaxConns        int // 0: no limit
	MaxMessageBytes int
	// Encode turns a payload into the bytes every connection writes (the
	// gateway's WebSocket text framing), once per message. Nil: Frame = Payload.
	Encode  func(payload []byte) []byte
	Logger  *slog.Logger
	Metrics *metrics.Metrics
}

const shardCount = 64

// Hub implements broker.Handler.
type Hub struct {
	opts Options
	// Drop counters resolved once: HandleMessage runs per message.
	dropNoConn, dropInvalid, dropTooLarge prometheus.Counter
	broker                                broker.Broker
	log                                   *slog.Logger
	m                                     *metrics.Metrics
	seed                                  maphash.Seed
	shards                                [shardCount]shard
	total                                 atomic.Int64
	up                                    atomic.Bool

	firstUp     chan struct{} // closed by the first HandleLinkUp
	firstUpOnce sync.Once
}

type shard struct {
	mu    sync.RWMutex
	users map[string][]Conn
}

var _ broker.Handler = (*Hub)(nil)

// New returns a Hub using b for subscriptions; call b.Start(hub) next.
func New(b broker.Broker, opts Options) *Hub {
	h := &Hub{opts: opts, broker: b, log: opts.Logger, m: opts.Metrics, seed: maphash.MakeSeed(), firstUp: make(chan struct{})}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	if h.m == nil {
		h.m = metrics.New()
	}
	h.dropNoConn = h.m.MessagesDropped.WithLabelValues(metrics.DropNoConnection)
	h.dropInvalid = h.m.MessagesDropped.WithLabelValues(metrics.DropInvalidJSON)
	h.dropTooLarge = h.m.MessagesDropped.WithLabelValues(metrics.DropTooLarge)
	h.m.ConnectionsLimit.Set(float64(opts.MaxConns))
	for i := range h.shards {
		h.shards[i].users = map[string][]Conn{}
	}
	return h
}

func (h *Hub) shard(user string) *shard {
	return &h.shards[maphash.String(h.seed, user)%shardCount]
}

// Add registers c for user, subscribing the user's topic if c is the user's
// first local connection, and waits (bounded by ctx) until the subscription
// is confirmed or the broker is known to be down. While the link is down, c
// is told so at once. It fails with ErrUserQuota, ErrServerBusy or (when ctx
// ends first) ErrSubscribeTimeout, and then c is not registered.
func (h *Hub) Add(ctx context.Context, user string, c Conn) error {
	if h.opts.MaxConns > 0 && h.total.Add(1) > int64(h.opts.MaxConns) {
		h.total.Add(-1)
		return ErrServerBusy
	} else if h.opts.MaxConns <= 0 {
		h.total.Add(1)
	}
	s := h.shard(user)
	s.mu.Lock()
	conns := s.users[user]
	if len(conns) >= h.opts.MaxConnsPerUser {
		s.mu.Unlock()
		h.total.Add(-1)
		return ErrUserQuota
	}
	s.users[user] = append(conns, c)
	// The broker records interest under the shard lock, so a concurrent
	// Remove of the user's last connection cannot reorder with it.
	ready, down := h.broker.Subscribe(user)
	if down || !h.up.Load() {
		c.LinkState(false)
	}
	s.mu.Unlock()
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		h.Remove(user, c)
		return ErrSubscribeTimeout
	}
}

// Remove unregisters c; the user's topic is unsubscribed with its last
// connection. Removing an unknown connection is a no-op that reports false.
func (h *Hub) Remove(user string, c Conn) bool {
	s := h.shard(user)
	s.mu.Lock()
	conns := s.users[user]
	i := slices.Index(conns, c)
	if i < 0 {
		s.mu.Unlock()
		return false
	}
	conns = slices.Delete(conns, i, i+1)
	if len(conns) == 0 {
		delete(s.users, user)
		h.broker.Unsubscribe(user)
	} else {
		s.users[user] = conns
	}
	s.mu.Unlock()
	h.total.Add(-1)
	return true
}

// Count returns the number of registered connections.
func (h *Hub) Count() int { return int(h.total.Load()) }

// LinkUp reports the broker link state last announced.
func (h *Hub) LinkUp() bool { return h.up.Load() }

// HandleMessage implements broker.Handler: validate once, then hand the
// shared message to each of the user's connections.
func (h *Hub) HandleMessage(user string, payload []byte) {
	if notify.IsControl(payload) {
		h.control(user, payload)
		return
	}
	h.m.MessagesReceived.Inc()
	if !h.Admit(payload) {
		return
	}
	msg := &Message{Payload: payload, Frame: payload, ReceivedAt: time.Now()}
	if id, ok := notify.PayloadID(payload); ok {
		msg.ID = &id
	}
	if h.opts.Encode != nil {
		msg.Frame = h.opts.Encode(payload)
	}
	s := h.shard(user)
	s.mu.RLock()
	conns := s.users[user]
	for _, c := range conns {
		c.Deliver(msg)
	}
	s.mu.RUnlock()
	if len(conns) == 0 {
		h.dropNoConn.Inc()
	}
}

// Admit reports whether a notification may be delivered: at most
// MaxMessageBytes and valid JSON. It counts and logs each one it refuses.
// Live messages and entries replayed from history pass the same check, so a
// replay never brings back what live delivery dropped.
func (h *Hub) Admit(payload []byte) bool {
	switch {
	case len(payload) > h.opts.MaxMessageBytes:
		h.dropTooLarge.Inc()
		h.log.Warn("dropped oversized message from redis", "bytes", len(payload), "limit", h.opts.MaxMessageBytes)
		return false
	case !json.Valid(payload):
		h.dropInvalid.Inc()
		h.log.Warn("dropped non-JSON message from redis", "bytes", len(payload))
		return false
	}
	return true
}

// control carries out a control message (notify.Disconnect) for the user's
// connections on this instance, with one audit line.
func (h *Hub) control(user string, payload []byte) {
	c, err := notify.ParseControl(payload)
	if err != nil {
		h.dropInvalid.Inc()
		h.log.Warn("dropped malformed control message from redis", "error", err)
		return
	}
	s := h.shard(user)
	s.mu.RLock()
	conns := slices.Clone(s.users[user])
	s.mu.RUnlock()
	closed := 0
	for _, conn := range conns {
		if conn.Disconnect(c.Reason, c.RevokedAt) {
			closed++
		}
	}
	h.m.Disconnects.Inc()
	h.log.Info("disconnect", "user", user, "reason", c.Reason, "revoke", c.RevokedAt != 0, "closed_here", closed)
}

// HandleLinkDown implements broker.Handler.
func (h *Hub) HandleLinkDown(users []string) { h.setLink(false, users) }

// HandleLinkUp implements broker.Handler.
func (h *Hub) HandleLinkUp(users []string) {
	h.setLink(true, users)
	if users == nil {
		h.firstUpOnce.Do(func() { close(h.firstUp) })
	}
}

// FirstLinkUp is closed once the broker link has been up for the first time.
func (h *Hub) FirstLinkUp() <-chan struct{} { return h.firstUp }

// setLink tells the connections of users (nil: everyone) the link state.
func (h *Hub) setLink(up bool, users []string) {
	if users != nil {
		for _, u := range users {
			s := h.shard(u)
			s.mu.RLock()
			for _, c := range s.users[u] {
				c.LinkState(up)
			}
			s.mu.RUnlock()
		}
		return
	}
	h.up.Store(up)
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.RLock()
		for _, conns := range s.users {
			for _, c := range conns {
				c.LinkState(up)
			}
		}
		s.mu.RUnlock()
	}
}

// Range calls fn for every registered connection under the shard's read
// lock: fn must not block or call back into the hub.
func (h *Hub) Range(fn func(Conn)) {
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.RLock()
		for _, conns := range s.users {
			for _, c := range conns {
				fn(c)
			}
		}
		s.mu.RUnlock()
	}
}
