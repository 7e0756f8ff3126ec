package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/lesismal/nbio"

	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
	"github.com/huleedu/websocket-service/notify"
)

// Server-Sent Events: the same sessions, hub, limits and resume as the
// WebSocket path, written as an event stream. After the handshake the HTTP
// connection is hijacked and handed to the nbio engine like an upgraded
// WebSocket, so an idle stream costs no goroutine and no buffer.

// sseHeartbeat is a comment line: it keeps proxies from timing the stream
// out and makes a dead peer show up as a write error.
var sseHeartbeat = []byte(":\n\n")

// sseEvent encodes a message as one event: its resume id (when it has one)
// and its JSON, one data line per line of the payload.
func sseEvent(m *hub.Message) []byte {
	b := make([]byte, 0, len(m.Payload)+48)
	id := m.ID
	if id == nil {
		if pid, ok := notify.PayloadID(m.Payload); ok {
			id = &pid
		}
	}
	if id != nil {
		b = append(b, "id: "...)
		b = append(b, id.String()...)
		b = append(b, '\n')
	}
	return appendData(b, m.Payload)
}

// appendData appends payload as data lines (a line break in the JSON starts
// a new data line; the client joins them with \n) and the blank line.
func appendData(b, payload []byte) []byte {
	for {
		b = append(b, "data: "...)
		i := strings.IndexAny(string(payload), "\r\n")
		if i < 0 {
			b = append(b, payload...)
			return append(b, "\n\n"...)
		}
		b = append(b, payload[:i]...)
		b = append(b, '\n')
		if payload[i] == '\r' && i+1 < len(payload) && payload[i+1] == '\n' {
			i++
		}
		payload = payload[i+1:]
	}
}

// ssePosition is resume.position for a stream: its id line makes the
// browser's EventSource send it back as Last-Event-ID.
func ssePosition(payload []byte, id string) []byte {
	b := append([]byte("id: "), id...)
	return appendData(append(b, '\n'), payload)
}

// sseClosed is the last event of a stream the server ends.
func sseClosed(r *closeReason) []byte {
	type data struct {
		Code      int    `json:"code"`
		ErrorCode string `json:"error_code"`
		Message   string `json:"message"`
	}
	body, _ := json.Marshal(struct {
		Event string `json:"event"`
		Data  data   `json:"data"`
	}{"connection.closed", data{r.Code, r.ErrorCode, r.Message}})
	return appendData(nil, body)
}

// httpStatus maps a refusal to the HTTP status a stream request gets.
func httpStatus(r *closeReason) int {
	switch {
	case r.ErrorCode == "AUTHENTICATION_ERROR":
		return http.StatusUnauthorized
	case r.ErrorCode == "AUTHORIZATION_ERROR":
		return http.StatusForbidden
	case r.Code == 4000:
		return http.StatusTooManyRequests
	case r.Code == 1013 || r.Code == 1001:
		return http.StatusServiceUnavailable
	default:
		return http.StatusInternalServerError
	}
}

// refuseSSE answers a stream request before it starts, with the JSON body a
// WebSocket close would carry.
func (g *Gateway) refuseSSE(w http.ResponseWriter, metric string, status int, body []byte) {
	g.m.ConnectionsRejected.WithLabelValues(metrics.TransportSSE, metric).Inc()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests {
		w.Header().Set("Retry-After", strconv.Itoa(2+rand.IntN(8)))
		w.Header().Set("Access-Control-Expose-Headers", "Retry-After")
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (g *Gateway) refuseSSEWith(w http.ResponseWriter, err error) {
	r := closeFor(err)
	g.refuseSSE(w, r.Metric, httpStatus(r), r.frame[2:])
}

// serveSSE authenticates, registers and subscribes exactly as serveWS does,
// queues the replay, then writes the response head and hands the
// connection to the engine.
func (g *Gateway) serveSSE(w http.ResponseWriter, r *http.Request) {
	if !g.originAllowed(r) {
		g.refuseSSE(w, "origin", http.StatusForbidden, []byte(`{"error_code":"ORIGIN_NOT_ALLOWED","message":"origin not allowed"}`))
		return
	}
	// From here on every refusal is readable by the page (its origin is
	// allowed), so the client sees 401/403/429/503, not a network error.
	allowOrigin(w.Header(), r)
	select {
	case g.handshake <- struct{}{}:
		defer func() { <-g.handshake }()
	default:
		g.refuseSSE(w, "handshake_limit", http.StatusServiceUnavailable, []byte(`{"error_code":"SERVER_BUSY","message":"too many handshakes in progress"}`))
		return
	}
	if g.draining.Load() {
		g.refuseSSEWith(w, errShutdown)
		return
	}
	id, err := g.auth.Validate(jwtauth.Extract(r))
	g.countValidation(err)
	if err != nil {
		g.refuseSSEWith(w, err)
		return
	}
	if clientID := r.PathValue("client_id"); clientID != "" && clientID != id.UserID {
		g.refuseSSEWith(w, errWrongClient)
		return
	}
	revokedAt, confirmed, err := g.checkRevoked(r.Context(), id)
	if err != nil {
		g.refuseSSEWith(w, err)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		g.refuseSSE(w, "upgrade_failed", http.StatusHTTPVersionNotSupported,
			[]byte(`{"error_code":"UNSUPPORTED_PROTOCOL","message":"event streams need HTTP/1.1 to the instance"}`))
		return
	}
	// Every stream resumes: Last-Event-ID (what EventSource sends) wins
	// over since; neither is a new client, told its position.
	since := r.URL.Query().Get("since")
	if v, ok := r.Header["Last-Event-Id"]; ok && len(v) > 0 {
		since = v[0]
	}
	if g.opts.beforeSubscribe != nil {
		g.opts.beforeSubscribe(id.UserID)
	}
	s := newSession(g, id, revokedAt)
	s.sse = true
	s.hold = &holdState{}
	s.unconfirmed = !confirmed // held from the first frame on (revocation.go)
	ctx, cancel := context.WithTimeout(r.Context(), g.opts.SubscribeWait)
	err = g.hub.Add(ctx, id.UserID, s)
	cancel()
	if err != nil {
		g.refuseSSEWith(w, err)
		return
	}
	g.m.ActiveConnections.WithLabelValues(metrics.TransportSSE).Inc()
	if err := g.recheckRevoked(r.Context(), s, id, confirmed); err != nil {
		g.remove(s)
		g.refuseSSEWith(w, err)
		return
	}
	g.resume(r.Context(), s, since)

	conn, _, err := hj.Hijack()
	if err != nil {
		g.remove(s)
		g.m.ConnectionsRejected.WithLabelValues(metrics.TransportSSE, "upgrade_failed").Inc()
		return
	}
	_ = conn.SetDeadline(time.Time{}) // the server's header timeout must not end the stream
	if _, err := conn.Write(g.sseHead(r)); err != nil {
		_ = conn.Close()
		g.remove(s)
		g.m.ConnectionsRejected.WithLabelValues(metrics.TransportSSE, "upgrade_failed").Inc()
		return
	}
	nbc, err := nbio.NBConn(conn)
	if err == nil {
		s.stream = nbc
		sc := &sseConn{}
		sc.s.Store(s) // publishes s to the engine's close goroutine (see sseConn)
		nbc.SetSession(sc)
		nbc.OnData(func(*nbio.Conn, []byte) {}) // a stream's client has nothing to say
		err = g.engine.AddTransferredConn(nbc)
	}
	if err != nil {
		_ = conn.Close()
		g.remove(s)
		g.m.ConnectionsRejected.WithLabelValues(metrics.TransportSSE, "upgrade_failed").Inc()
		g.log.Debug("event stream transfer failed", "error", err)
		return
	}
	s.start()
	g.m.ConnectionsOpened.WithLabelValues(metrics.TransportSSE).Inc()
	g.lastOpen.Store(time.Now().UnixNano())
}

// sseHead is the response head and the reconnect delay: 1-5 s at random,
// so the clients of a restarted instance do not all come back at once.
// The body runs until the connection closes (no length, no chunking:
// intermediaries pass each event through as it comes).
func (g *Gateway) sseHead(r *http.Request) []byte {
	var b strings.Builder
	b.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n" +
		"Cache-Control: no-cache, no-transform\r\nX-Accel-Buffering: no\r\nConnection: close\r\n")
	h := http.Header{}
	allowOrigin(h, r) // originAllowed passed: let the page read the stream cross-origin
	_ = h.Write(&b)
	fmt.Fprintf(&b, "\r\nretry: %d\n\n", 1000+rand.IntN(4000))
	return []byte(b.String())
}

// allowOrigin lets a page on the request's Origin read the response (CORS);
// call it only once originAllowed passed. Same-origin and non-browser
// requests (no Origin) need nothing.
func allowOrigin(h http.Header, r *http.Request) {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return
	}
	h.Set("Access-Control-Allow-Origin", sanitizeHeader(origin))
	h.Set("Access-Control-Allow-Credentials", "true")
	h.Add("Vary", "Origin")
}

// sanitizeHeader drops what could end a header line.
func sanitizeHeader(v string) string {
	return strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return -1
		}
		return r
	}, v)
}

// closeStream writes the last event and closes the connection: at once when
// the kernel took it all, else after the close grace (never from onWritten,
// which nbio calls holding the connection's lock).
func (s *session) closeStream(r *closeReason) {
	s.wmu.Lock()
	if s.closeOnWire {
		s.wmu.Unlock()
		return
	}
	ev := sseClosed(r)
	s.pending.Add(int64(len(ev)))
	_, err := s.stream.Write(ev)
	s.closeOnWire = true
	s.wmu.Unlock()
	c := s.stream
	if err != nil || s.pending.Load() <= 0 {
		_ = c.Close()
		return
	}
	s.gw.engine.AfterFunc(s.gw.opts.CloseGrace, func() { _ = c.Close() })
}

// sseConn is a stream's session as nbio sees it: nbhttp's engine reports
// the connection's close through CloseAndClean, on a goroutine that found
// the connection through epoll, which gives no happens-before edge with
// the handler that built the session. The atomic pointer is that edge.
type sseConn struct{ s atomic.Pointer[session] }

func (c *sseConn) UnderlayerConn() net.Conn { return c.s.Load().stream }
func (c *sseConn) Parse([]byte) error       { return nil }
func (c *sseConn) CloseAndClean(err error) {
	s := c.s.Load()
	s.gw.onStreamClose(s, err)
}

// onStreamClose runs once per stream handed to the engine, whoever closed it.
func (g *Gateway) onStreamClose(s *session, err error) {
	s.mu.Lock()
	wasClosing := s.closing
	s.closed, s.closing = true, true
	s.dropQueueLocked()
	s.mu.Unlock()
	if !wasClosing {
		reason := "client_closed"
		if err != nil && !isEOF(err) {
			reason = "abnormal"
		}
		g.m.ConnectionsClosed.WithLabelValues(metrics.TransportSSE, reason).Inc()
	}
	g.remove(s)
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) }
