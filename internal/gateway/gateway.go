// Package gateway is the HTTP and WebSocket edge: the upgrade (origin check,
// token, quota, subscription, then the handshake), the close-code table,
// inbound frames and keepalive, and the health endpoints. It owns the nbio
// engine, the writer goroutines and the sweeper that drives pings, idle
// timeouts and token expiry.
package gateway

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/nbhttp"
	"github.com/lesismal/nbio/nbhttp/websocket"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
)

// maxClientFrame is the largest text frame a client may send (1009 above).
const maxClientFrame = 4096

// readLimit is where nbio itself stops reading a frame (and drops the
// socket without a close frame); between maxClientFrame and it, the client
// gets 1009.
const readLimit = 64 << 10

// Options configure a Gateway.
type Options struct {
	Environment     string
	RedisAddress    string // shown by /healthz/redis; credentials are masked
	MaxConnsPerUser int
	MaxHandshakes   int
	PingInterval    time.Duration
	IdleTimeout     time.Duration
	SendQueueMsgs   int
	SendQueueBytes  int
	RateLimit       float64
	RateBurst       int
	CORSOrigins     []string
	CloseGrace      time.Duration // wait for the client's close reply, then drop (default 3s)
	SubscribeWait   time.Duration // bound on waiting for Redis to confirm (default 5s)
	SweepInterval   time.Duration // pings, idle and expiry checks (default 250ms)
	// TrimAfter: once no connection has opened for this long after a wave of
	// upgrades, return the wave's garbage and handshake stacks to the OS
	// (one forced GC per wave). 0 disables it.
	TrimAfter time.Duration
	// History reads users' notification histories for resume (since=) and
	// for repair after a Redis outage; nil answers every since with
	// resume.incomplete "unavailable".
	History *broker.History
	// RevocationHold bounds how long a session whose token's revocation
	// could not be read waits, written no notification, for Redis to confirm it
	// (default 10s); then it is closed with 1013 REVOCATION_UNCHECKED.
	RevocationHold time.Duration

	// beforeSubscribe, a test seam (nil in production), runs during a
	// handshake between the revocation check and the subscription.
	beforeSubscribe func(user string)
}

// Gateway serves the WebSocket and health endpoints.
type Gateway struct {
	opts      Options
	log       *slog.Logger
	m         *metrics.Metrics
	hub       *hub.Hub
	broker    broker.Broker
	auth      *jwtauth.Validator
	engine    *nbhttp.Engine
	upgrader  *websocket.Upgrader
	rejecter  *websocket.Upgrader
	writers   *writerPool
	handshake chan struct{} // semaphore of upgrades in progress
	started   time.Time
	draining  atomic.Bool
	lastOpen  atomic.Int64 // unix nanos of the last completed upgrade

	onText func([]byte) // test hook, nil in production

	repairs  *repairQueue
	confirms *confirmQueue // sessions whose revocation is not confirmed yet (revocation.go)
	stop     chan struct{} // ends the sweeper and the repair loop
	wg       sync.WaitGroup
}

// New builds a Gateway and starts its engine, writers and sweeper; Shutdown
// stops them.
func New(opts Options, h *hub.Hub, b broker.Broker, auth *jwtauth.Validator, m *metrics.Metrics, log *slog.Logger) (*Gateway, error) {
	if opts.CloseGrace <= 0 {
		opts.CloseGrace = 3 * time.Second
	}
	if opts.SubscribeWait <= 0 {
		opts.SubscribeWait = 5 * time.Second
	}
	if opts.RevocationHold <= 0 {
		opts.RevocationHold = 10 * time.Second
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = 250 * time.Millisecond
	}
	g := &Gateway{
		opts: opts, log: log, m: m, hub: h, broker: b, auth: auth,
		handshake: make(chan struct{}, max(opts.MaxHandshakes, 1)),
		started:   time.Now(),
		repairs:   &repairQueue{wake: make(chan struct{}, 1)},
		confirms:  &confirmQueue{wake: make(chan struct{}, 1)},
		stop:      make(chan struct{}),
	}
	g.initMetrics()
	g.engine = nbhttp.NewEngine(nbhttp.Config{
		Name:                         "websocket-service",
		NPoller:                      runtime.GOMAXPROCS(0),
		ReleaseWebsocketPayload:      true,
		MaxWebsocketFramePayloadSize: 1 << 20,
		// Run frame callbacks on the poller goroutine that read them: they
		// only enqueue, so a goroutine pool would add stacks and hops, not
		// parallelism (a ping round over 15,000 sockets grew 4 MiB of stacks).
		ServerExecutor: func(f func()) { f() },
	})
	g.engine.OnWrittenSize(func(c *nbio.Conn, _ []byte, n int) {
		switch v := c.Session().(type) {
		case *websocket.Conn:
			if s, ok := v.Session().(*session); ok {
				s.onWritten(n)
			}
		case *sseConn:
			v.s.Load().onWritten(n)
		}
	})
	if err := g.engine.Start(); err != nil {
		return nil, err
	}
	g.upgrader = g.newUpgrader()
	g.rejecter = websocket.NewUpgrader()
	g.rejecter.Engine = g.engine
	g.rejecter.KeepaliveTime = 0
	g.rejecter.BlockingModAsyncWrite = false
	g.rejecter.CheckOrigin = func(*http.Request) bool { return true }
	g.rejecter.Subprotocols = []string{jwtauth.Protocol}
	g.writers = newWriterPool(runtime.GOMAXPROCS(0))
	g.wg.Go(g.sweep)
	g.wg.Go(g.repairLoop)
	g.wg.Go(g.confirmLoop)
	return g, nil
}

// initMetrics creates every series of the close table and the resume
// outcomes at 0, so dashboards and alerts see them before they happen.
func (g *Gateway) initMetrics() {
	for _, t := range metrics.Transports {
		for _, r := range closeTable {
			g.m.ConnectionsRejected.WithLabelValues(t, r.Metric)
			g.m.ConnectionsClosed.WithLabelValues(t, r.Metric)
		}
		for _, r := range []string{"handshake_limit", "origin", "upgrade_failed"} {
			g.m.ConnectionsRejected.WithLabelValues(t, r)
		}
		for _, r := range []string{"client_closed", "abnormal"} {
			g.m.ConnectionsClosed.WithLabelValues(t, r)
		}
	}
	g.m.Init(g.m.Resumes, "complete", "new", broker.ReasonTrimmed, broker.ReasonReset, broker.ReasonAhead,
		broker.ReasonRollback, broker.ReasonInvalid, broker.ReasonUnavailable)
}

// Handler returns the HTTP routes.
func (g *Gateway) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ws/v1/status/{client_id}", g.serveWS)
	mux.HandleFunc("GET /ws", g.serveWS)
	mux.HandleFunc("GET /ws/{$}", g.serveWS)
	mux.HandleFunc("GET /sse/v1/status/{client_id}", g.serveSSE)
	mux.HandleFunc("GET /sse", g.serveSSE)
	mux.HandleFunc("GET /sse/{$}", g.serveSSE)
	mux.HandleFunc("GET /healthz", g.healthz)
	mux.HandleFunc("GET /healthz/redis", g.healthzRedis)
	mux.HandleFunc("GET /healthz/websocket", g.healthzWebsocket)
	mux.HandleFunc("GET /readyz", g.readyz)
	mux.Handle("GET /metrics", g.metricsHandler())
	return mux
}

// Drain marks the instance as shutting down: /readyz answers 503 and new
// upgrades are closed with 1001.
func (g *Gateway) Drain() { g.draining.Store(true) }

// CloseAll closes every connection with 1001 SERVER_SHUTDOWN after what is
// already queued for it, and waits until all are gone or ctx ends.
func (g *Gateway) CloseAll(ctx context.Context) error {
	g.Drain()
	g.hub.Range(func(c hub.Conn) { c.(*session).closeAfterQueue(errShutdown) })
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for g.hub.Count() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Close stops the sweeper, the writers and the engine (dropping any socket
// still open) and waits for them.
func (g *Gateway) Close() {
	close(g.stop)
	g.wg.Wait()
	g.writers.close()
	g.engine.Stop()
}

// sweep drives time for every session from one goroutine: pings when due,
// idle timeouts and token expiry (checked every SweepInterval).
func (g *Gateway) sweep() {
	t := time.NewTicker(g.opts.SweepInterval)
	defer t.Stop()
	var trimmed int64 // lastOpen value of the last trim
	for {
		select {
		case <-g.stop:
			return
		case now := <-t.C:
			n := now.UnixNano()
			if last := g.lastOpen.Load(); g.opts.TrimAfter > 0 && last != trimmed && n-last > g.opts.TrimAfter.Nanoseconds() {
				trimmed = last
				debug.FreeOSMemory()
			}
			idle, interval := g.opts.IdleTimeout.Nanoseconds(), g.opts.PingInterval.Nanoseconds()
			g.hub.Range(func(c hub.Conn) {
				s := c.(*session)
				switch {
				case n >= s.expiresAt.Load():
					s.closeWith(errTokenExpired)
				case idle > 0 && !s.sse && n-s.lastSeen.Load() > idle: // a stream's client never speaks
					s.closeWith(errIdle)
				case interval > 0 && n >= s.nextPing:
					s.nextPing = n + interval
					s.ping()
				}
			})
		}
	}
}

func (g *Gateway) newUpgrader() *websocket.Upgrader {
	u := websocket.NewUpgrader()
	u.Engine = g.engine
	u.KeepaliveTime = 0 // the sweeper owns idle timeouts
	u.MessageLengthLimit = readLimit
	u.CheckOrigin = func(*http.Request) bool { return true } // checked before the upgrade
	u.Subprotocols = []string{jwtauth.Protocol}              // the token rides after it; only the name is echoed
	u.OnMessage(g.onMessage)
	u.OnClose(g.onClose)
	u.SetPingHandler(func(c *websocket.Conn, data string) {
		s := sessionOf(c)
		if s == nil {
			return
		}
		now := time.Now().UnixNano()
		s.lastSeen.Store(now)
		// Pings spend the same budget as data frames: a flood is closed
		// with 4003 instead of keeping the poller and the writer busy.
		if !s.allowFrame(now) {
			s.closeWith(errRateLimited)
			return
		}
		s.answerPing(data)
	})
	u.SetPongHandler(func(c *websocket.Conn, _ string) {
		if s := sessionOf(c); s != nil {
			s.lastSeen.Store(time.Now().UnixNano())
		}
	})
	u.SetCloseHandler(func(c *websocket.Conn, code int, _ string) {
		if s := sessionOf(c); s != nil {
			s.echoClose(code) // the client started the close: the writer answers it
		}
	})
	return u
}

// onMessage handles one inbound data frame on an nbio poller goroutine.
func (g *Gateway) onMessage(c *websocket.Conn, t websocket.MessageType, data []byte) {
	s := sessionOf(c)
	if s == nil {
		_ = c.Close()
		return
	}
	defer g.recoverPanic(s)
	now := time.Now()
	s.lastSeen.Store(now.UnixNano())
	if !s.allowFrame(now.UnixNano()) {
		s.closeWith(errRateLimited)
		return
	}
	if t == websocket.BinaryMessage {
		s.closeWith(errBinaryFrame)
		return
	}
	if len(data) > maxClientFrame {
		s.closeWith(errFrameTooBig)
		return
	}
	g.handleText(s, now, data)
}

// handleText answers the client protocol; other text is ignored.
func (g *Gateway) handleText(s *session, now time.Time, data []byte) {
	if g.onText != nil {
		g.onText(data)
	}
	f := parseClientFrame(data)
	switch f.Type {
	case "ping":
		s.send(pongFrame(now))
	case "refresh":
		id, err := g.auth.Validate(f.Token)
		g.countValidation(err)
		switch {
		case err != nil:
			s.closeWith(errRefreshFailed)
		case id.UserID != s.user:
			s.closeWith(errWrongClient)
		case s.revokedAt.Load() > 0 && issuedAt(id) <= s.revokedAt.Load():
			s.closeWith(errTokenRevoked)
		default:
			s.expiresAt.Store(id.ExpiresAt.UnixNano())
			s.issuedAt.Store(issuedAt(id))
			s.send(refreshedFrame(id.ExpiresAt))
		}
	}
}

// remove unregisters a session from the hub, once.
func (g *Gateway) remove(s *session) {
	if g.hub.Remove(s.user, s) {
		g.m.ActiveConnections.WithLabelValues(s.transport()).Dec()
	}
}

// recoverPanic turns a panic in a connection callback into a 1011 close of
// that connection; the process lives on.
func (g *Gateway) recoverPanic(s *session) {
	if p := recover(); p != nil {
		g.log.Error("panic in connection callback", "panic", p)
		s.closeWith(errInternal)
	}
}

// onClose runs once per upgraded socket, whoever closed it.
func (g *Gateway) onClose(c *websocket.Conn, err error) {
	s := sessionOf(c)
	if s == nil {
		return
	}
	s.mu.Lock()
	wasClosing := s.closing && !s.clientClosed
	s.closed, s.closing = true, true
	s.dropQueueLocked()
	s.mu.Unlock()
	if !wasClosing {
		reason := "client_closed"
		var ce *websocket.CloseError
		if err != nil && !errors.As(err, &ce) {
			reason = "abnormal"
		}
		g.m.ConnectionsClosed.WithLabelValues(s.transport(), reason).Inc()
	}
	g.remove(s)
}

func (g *Gateway) countValidation(err error) {
	result := "valid"
	switch {
	case errors.Is(err, jwtauth.ErrMissingToken):
		result = "missing"
	case errors.Is(err, jwtauth.ErrExpired):
		result = "expired"
	case err != nil:
		result = "invalid"
	}
	g.m.JWTValidations.WithLabelValues(result).Inc()
}
