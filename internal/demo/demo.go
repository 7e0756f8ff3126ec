// Package demo serves the development demo page: /demo connects to the
// gateway with the official client library (/demo/client.js) and publishes
// to the chosen user through /demo/publish. The program mounts it only
// outside production, so there every /demo path is 404.
package demo

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"time"

	websocketclient "github.com/huleedu/websocket-service/clients/js"
)

//go:embed page.html
var page []byte

// Options wire the demo to the service.
type Options struct {
	// Publish stores a notification in the user's history and sends it;
	// returns its id.
	Publish func(ctx context.Context, userID string, payload []byte) (id string, err error)
	// MintToken signs a short-lived token for a user; nil when the service
	// has a real secret (the page then asks for a token).
	MintToken func(userID string) (string, error)
	Logger    *slog.Logger
}

// maxBody bounds the JSON bodies the demo accepts.
const maxBody = 16 << 10

// Handler returns the /demo routes.
func Handler(o Options) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /demo", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache") // revalidate; no-store would keep the page out of the back/forward cache
		w.Write(page)
	})
	mux.HandleFunc("GET /demo/client.js", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache") // revalidate; no-store would keep the page out of the back/forward cache
		w.Write(websocketclient.Module)
	})
	mux.HandleFunc("POST /demo/token", func(w http.ResponseWriter, r *http.Request) {
		if o.MintToken == nil {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "JWT_SECRET_KEY is set: mint a token with `websocket-service token --sub USER`"})
			return
		}
		var req struct {
			User string `json:"user"`
		}
		if err := decode(r, &req); err != nil || req.User == "" {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body must be {\"user\":\"…\"}"})
			return
		}
		t, err := o.MintToken(req.User)
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"token": t})
	})
	mux.HandleFunc("POST /demo/publish", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			User  string          `json:"user"`
			Event string          `json:"event"`
			Data  json.RawMessage `json:"data"`
		}
		if err := decode(r, &req); err != nil || req.User == "" || req.Event == "" {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body must be {\"user\":…,\"event\":…,\"data\":<JSON>}"})
			return
		}
		if len(req.Data) == 0 {
			req.Data = json.RawMessage("{}")
		}
		payload, _ := json.Marshal(struct {
			Event string          `json:"event"`
			Data  json.RawMessage `json:"data"`
		}{req.Event, req.Data})
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		id, err := o.Publish(ctx, req.User, payload)
		if err != nil {
			o.Logger.Warn("demo publish failed", "error", err)
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "publish failed: " + err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"id": id})
	})
	return mux
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
