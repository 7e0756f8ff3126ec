package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/huleedu/websocket-service/internal/config"
)

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// healthz is readable by pages on allowed origins: the client asks it
// whether plain HTTP works before falling back to Server-Sent Events.
func (g *Gateway) healthz(w http.ResponseWriter, r *http.Request) {
	if g.originAllowed(r) {
		allowOrigin(w.Header(), r)
	}
	now := time.Now()
	writeJSON(w, http.StatusOK, map[string]any{
		"service":        "websocket_service",
		"status":         "healthy",
		"environment":    g.opts.Environment,
		"timestamp":      now.UTC().Format(time.RFC3339),
		"uptime_seconds": now.Sub(g.started).Seconds(),
	})
}

func (g *Gateway) healthzRedis(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	url := config.MaskURL(g.opts.RedisAddress)
	if err := g.broker.Check(ctx); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{
			"service": "redis", "status": "unhealthy", "url": url, "error": err.Error(),
		})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"service": "redis", "status": "healthy", "url": url})
}

func (g *Gateway) healthzWebsocket(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"service":                  "websocket_manager",
		"status":                   "healthy",
		"total_connections":        g.hub.Count(),
		"max_connections_per_user": g.opts.MaxConnsPerUser,
	})
}

// readyz fails while draining, and while the JWKS has not been fetched yet
// (every token would be refused). A Redis outage affects every instance
// alike, so it must not take them all out of the load balancer.
func (g *Gateway) readyz(w http.ResponseWriter, _ *http.Request) {
	if g.draining.Load() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "draining"})
		return
	}
	if !g.auth.Ready() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "no_keys", "error": "JWKS not fetched yet"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ready"})
}

func (g *Gateway) metricsHandler() http.Handler {
	return promhttp.HandlerFor(g.m.Registry, promhttp.HandlerOpts{})
}
