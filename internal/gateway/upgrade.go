package gateway

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/lesismal/nbio/nbhttp/websocket"

	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
)

// serveWS authenticates, registers and subscribes, and only then completes
// the upgrade, so that everything published after the client sees the
// connection open reaches it. Refusals are sent as close frames after the
// upgrade (browsers see the code); only cross-origin and overload are HTTP
// errors.
func (g *Gateway) serveWS(w http.ResponseWriter, r *http.Request) {
	select {
	case g.handshake <- struct{}{}:
		defer func() { <-g.handshake }()
	default:
		g.m.ConnectionsRejected.WithLabelValues(metrics.TransportWebSocket, "handshake_limit").Inc()
		http.Error(w, "too many handshakes in progress", http.StatusServiceUnavailable)
		return
	}
	if !g.originAllowed(r) {
		g.m.ConnectionsRejected.WithLabelValues(metrics.TransportWebSocket, "origin").Inc()
		http.Error(w, "origin not allowed", http.StatusForbidden)
		return
	}
	if !isUpgrade(r) {
		http.Error(w, "expected a WebSocket upgrade", http.StatusBadRequest)
		return
	}
	if g.draining.Load() {
		g.reject(w, r, errShutdown)
		return
	}
	id, err := g.auth.Validate(jwtauth.Extract(r))
	g.countValidation(err)
	if err != nil {
		g.reject(w, r, err)
		return
	}
	if clientID := r.PathValue("client_id"); clientID != "" && clientID != id.UserID {
		g.reject(w, r, errWrongClient)
		return
	}
	revokedAt, confirmed, err := g.checkRevoked(r.Context(), id)
	if err != nil {
		g.reject(w, r, err)
		return
	}
	if g.opts.beforeSubscribe != nil {
		g.opts.beforeSubscribe(id.UserID)
	}
	s := newSession(g, id, revokedAt)
	s.unconfirmed = !confirmed // held from the first frame on (revocation.go)
	since, resume := r.URL.Query()["since"]
	if resume {
		s.hold = &holdState{} // live frames wait behind the replay
	}
	ctx, cancel := context.WithTimeout(r.Context(), g.opts.SubscribeWait)
	err = g.hub.Add(ctx, id.UserID, s)
	cancel()
	if err != nil {
		g.reject(w, r, err)
		return
	}
	g.m.ActiveConnections.WithLabelValues(metrics.TransportWebSocket).Inc()
	// Subscribed: whatever is published from now on reaches s, so reading
	// the revocation and the history now leaves no gap.
	if err := g.recheckRevoked(r.Context(), s, id, confirmed); err != nil {
		g.remove(s)
		g.reject(w, r, err)
		return
	}
	if resume {
		g.resume(r.Context(), s, since[0])
	} else {
		g.position(r.Context(), s)
	}
	conn, err := g.upgrader.UpgradeAndTransferConnToPoller(w, r, nil)
	if err != nil {
		g.remove(s)
		g.m.ConnectionsRejected.WithLabelValues(metrics.TransportWebSocket, "upgrade_failed").Inc()
		g.log.Debug("upgrade failed", "error", err)
		return
	}
	s.attach(conn)
	g.m.ConnectionsOpened.WithLabelValues(metrics.TransportWebSocket).Inc()
	g.lastOpen.Store(time.Now().UnixNano())
}

// reject completes the handshake on the request's own goroutine, sends the
// close frame for err, waits briefly for the client's reply and closes.
// Nothing is subscribed (any more).
func (g *Gateway) reject(w http.ResponseWriter, r *http.Request, err error) {
	reason := closeFor(err)
	g.m.ConnectionsRejected.WithLabelValues(metrics.TransportWebSocket, reason.Metric).Inc()
	c, uerr := g.rejecter.Upgrade(w, r, nil, false, false)
	if uerr != nil {
		return
	}
	raw := c.Conn
	// Bounded tighter than CloseGrace: a flood of bad tokens must not hold
	// handshake slots for long.
	_ = raw.SetDeadline(time.Now().Add(min(g.opts.CloseGrace, time.Second)))
	_ = c.WriteMessage(websocket.CloseMessage, reason.frame)
	if tc, ok := raw.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(raw, 4096))
	_ = raw.Close()
}

func isUpgrade(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") && headerHasToken(r.Header, "Upgrade", "websocket")
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for part := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(part), token) {
				return true
			}
		}
	}
	return false
}

// originAllowed refuses cross-site WebSocket hijacking: a browser Origin
// must be this host or listed in CORS_ORIGINS ("*" allows any).
func (g *Gateway) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if slices.Contains(g.opts.CORSOrigins, "*") || slices.Contains(g.opts.CORSOrigins, strings.TrimRight(origin, "/")) {
		return true
	}
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}
