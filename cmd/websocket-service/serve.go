package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/config"
	"github.com/huleedu/websocket-service/internal/demo"
	"github.com/huleedu/websocket-service/internal/devredis"
	"github.com/huleedu/websocket-service/internal/gateway"
	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
)

func allVariables() []string {
	out := make([]string, len(config.Variables))
	for i, v := range config.Variables {
		out[i] = fmt.Sprintf("%-36s %s (default: %s)", v.Name, v.Meaning, v.Default)
	}
	return out
}

// serve runs the gateway until ctx ends, then shuts down in order, all
// within SHUTDOWN_TIMEOUT: /readyz 503 (for SHUTDOWN_READINESS_DELAY with
// the listener still open), stop accepting, close every client with 1001,
// close the broker.
func serve(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	fs := newFlagSet("serve", "Run the gateway: WebSocket endpoint /ws/v1/status/{client_id} and /ws, health and metrics.", allVariables(), stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(getenv)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	gateway.RouteEngineLogs(log)
	if getenv("GOGC") == "" {
		// Idle connections are long-lived and allocate nothing; a tight GC
		// target keeps RSS near the live heap at no measurable CPU cost
		// (docs/benchmarks.md). GOGC overrides it.
		debug.SetGCPercent(25)
	}
	if cfg.JWTSecretIsDev {
		log.Warn("JWT_SECRET_KEY is unset: using the development secret (refused in production)")
	}
	m := metrics.New()

	topo, resp2 := topology(cfg), false
	if !cfg.RedisConfigured() { // development only: config refuses this in production
		url, embedded, err := devredis.Resolve(devredis.Addr, log)
		if err != nil {
			return err
		}
		if embedded != nil {
			defer embedded.Close()
			resp2 = true
		}
		topo.URL = url
	}
	redisURL := topo.Describe()
	ropts := broker.RedisOptions{
		Topology: topo, Prefix: cfg.ChannelPrefix, ClientName: clientName(), ProbeInterval: cfg.ProbeInterval,
		ProbeTimeout: cfg.ProbeTimeout, RESP2: resp2, Logger: log.With("component", "broker"), Observer: m,
	}
	var b broker.Broker
	if cfg.PubSubMode == "sharded" {
		b, err = broker.NewShardedRedis(ropts)
	} else {
		b, err = broker.NewRedis(ropts)
	}
	if err != nil {
		return err
	}
	h := hub.New(b, hub.Options{
		MaxConnsPerUser: cfg.MaxConnsPerUser, MaxConns: cfg.MaxConns, MaxMessageBytes: cfg.MaxMessageBytes,
		Encode: gateway.TextFrame, Logger: log.With("component", "hub"), Metrics: m,
	})
	if err := b.Start(h); err != nil {
		return err
	}
	defer b.Close()
	select { // a healthy start should not greet its first clients with connection.degraded
	case <-h.FirstLinkUp():
	case <-time.After(3 * time.Second):
		log.Warn("redis is not reachable yet: serving degraded until it is", "redis", config.MaskURL(redisURL))
	case <-ctx.Done():
		return nil
	}
	hist, err := broker.NewHistory(ropts)
	if err != nil {
		return err
	}
	defer hist.Close()
	var jwks *jwtauth.JWKS
	if cfg.JWKSURL != "" {
		if jwks, err = jwtauth.NewJWKS(jwtauth.JWKSOptions{URL: cfg.JWKSURL, Refresh: cfg.JWKSRefresh, Logger: log.With("component", "jwks")}); err != nil {
			return err
		}
		defer jwks.Close()
	}
	auth, err := jwtauth.New(authOptions(cfg, jwks))
	if err != nil {
		return err
	}
	gw, err := gateway.New(gateway.Options{
		Environment: cfg.Environment, RedisAddress: redisURL, MaxConnsPerUser: cfg.MaxConnsPerUser,
		MaxHandshakes: cfg.MaxHandshakes, PingInterval: cfg.PingInterval, IdleTimeout: cfg.IdleTimeout,
		SendQueueMsgs: cfg.SendQueueMsgs, SendQueueBytes: cfg.SendQueueBytes,
		RateLimit: cfg.RateLimit, RateBurst: cfg.RateBurst, CORSOrigins: cfg.CORSOrigins,
		TrimAfter: 10 * time.Second, History: hist,
	}, h, b, auth, m, log.With("component", "gateway"))
	if err != nil {
		return err
	}
	defer gw.Close()

	handler := gw.Handler()
	if !cfg.Production() {
		handler = withDemo(handler, cfg, hist, auth, log)
	}
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	ln, err := net.Listen("tcp", cfg.Addr())
	if err != nil {
		return fmt.Errorf("listen on WEBSOCKET_HOST:WEBSOCKET_PORT %s: %w", cfg.Addr(), err)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	if cfg.PprofAddr != "" {
		stopPprof, err := servePprof(cfg.PprofAddr, log)
		if err != nil {
			return err
		}
		defer stopPprof()
	}
	log.Info("websocket-service listening", "addr", ln.Addr().String(), "environment", cfg.Environment,
		"redis", config.MaskURL(redisURL), "channel_prefix", cfg.ChannelPrefix)

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		return fmt.Errorf("http server: %w", err)
	}
	log.Info("shutting down", "timeout", cfg.ShutdownTimeout.String(), "connections", h.Count())
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	gw.Drain()
	if d := cfg.ShutdownReadinessDelay; d > 0 {
		// /readyz answers 503 while the listener stays open, so that load
		// balancers health-checking it stop routing here before connections
		// are refused. Part of SHUTDOWN_TIMEOUT (config keeps it shorter).
		log.Info("readiness failing before the listener closes", "readiness_delay", d.String())
		wait := time.NewTimer(d)
		select {
		case <-wait.C:
		case <-sctx.Done():
		}
		wait.Stop()
	}
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("http shutdown", "error", err)
	}
	if err := gw.CloseAll(sctx); err != nil {
		log.Warn("closing connections did not finish", "error", err, "remaining", h.Count())
	}
	log.Info("shutdown complete")
	return nil
}

// authOptions are the validator's settings from the configuration.
func authOptions(cfg config.Config, jwks *jwtauth.JWKS) jwtauth.Options {
	return jwtauth.Options{Algorithms: cfg.JWTAlgorithms, Secret: cfg.JWTSecret, PublicKeys: cfg.JWTPublicKeys, JWKS: jwks,
		Audience: cfg.JWTAudience, Issuer: cfg.JWTIssuer}
}

// withDemo adds the development demo page (/demo, /demo/client.js,
// /demo/publish, and /demo/token while the development secret is in use).
func withDemo(gw http.Handler, cfg config.Config, hist *broker.History, auth *jwtauth.Validator, log *slog.Logger) http.Handler {
	opts := demo.Options{
		Publish: func(ctx context.Context, user string, payload []byte) (string, error) {
			res, err := hist.Publish(ctx, user, payload, cfg.PubSubMode == "sharded")
			return res.ID, err
		},
		Logger: log.With("component", "demo"),
	}
	if cfg.JWTSecretIsDev {
		opts.MintToken = func(user string) (string, error) { return auth.Mint(user, time.Hour) }
	}
	d := demo.Handler(opts)
	mux := http.NewServeMux()
	mux.Handle("/", gw)
	mux.Handle("/demo", d)
	mux.Handle("/demo/", d)
	return mux
}

// clientName names this instance's Redis connections (CLIENT LIST).
func clientName() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("websocket-service:%s:%d", host, os.Getpid())
}

// topology turns the Redis settings into the broker's Topology.
func topology(cfg config.Config) broker.Topology {
	return broker.Topology{URL: cfg.RedisURL, ClusterNodes: cfg.ClusterNodes, SentinelAddrs: cfg.SentinelAddrs,
		SentinelMaster: cfg.SentinelMaster, Username: cfg.RedisUsername, Password: cfg.RedisPassword, TLS: cfg.RedisTLS}
}

func newLogger(cfg config.Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts)).With("service", "websocket_service")
}

// servePprof serves net/http/pprof on a loopback address (config enforces it).
func servePprof(addr string, log *slog.Logger) (stop func(), err error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("PPROF_ADDR %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !strings.Contains(err.Error(), "closed") {
			log.Warn("pprof server", "error", err)
		}
	}()
	log.Info("pprof listening", "addr", ln.Addr().String())
	return func() { _ = srv.Close(); <-done }, nil
}
