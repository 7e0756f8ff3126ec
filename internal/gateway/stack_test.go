package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

func TestMain(m *testing.M) {
	RouteEngineLogs(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/lesismal/nbio/taskpool.New.func3"),
		// rueidis delays a cluster topology refresh and the close of dropped
		// connections in goroutines of its own that no Close waits for.
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient)._refresh.func2"),
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"),
		goleak.IgnoreAnyFunction("github.com/lesismal/nbio/timer.(*Timer).Start.func1"),
	)
}

const testSecret = "test-secret-test-secret-test-secret!"

// stack is the service wired as serve wires it, on a test HTTP server.
type stack struct {
	t       testing.TB
	redis   *redistest.Server
	broker  broker.Broker
	hub     *hub.Hub
	gw      *Gateway
	auth    *jwtauth.Validator
	m       *metrics.Metrics
	http    *httptest.Server
	history *broker.History
	wsURL   string
}

type stackConfig struct {
	gw        Options
	hub       hub.Options
	redisArgs []string
	probe     time.Duration
	redis     *redistest.Server // reuse instead of starting one
	topology  *broker.Topology  // cluster or Sentinel instead of a standalone server
	name      string            // Redis client name of this instance
	sharded   bool
}

func defaultOptions() Options {
	return Options{
		Environment: "development", MaxConnsPerUser: 5, MaxHandshakes: 1024,
		PingInterval: 30 * time.Second, IdleTimeout: 90 * time.Second,
		SendQueueMsgs: 256, SendQueueBytes: 1 << 20, RateLimit: 10, RateBurst: 20,
	}
}

func newStack(t testing.TB, mutate func(*stackConfig)) *stack {
	t.Helper()
	cfg := stackConfig{gw: defaultOptions(), hub: hub.Options{MaxConnsPerUser: 5, MaxMessageBytes: 65536}, probe: 5 * time.Second}
	if mutate != nil {
		mutate(&cfg)
	}
	cfg.hub.MaxConnsPerUser = cfg.gw.MaxConnsPerUser
	st := &stack{t: t, redis: cfg.redis}
	topo := broker.Topology{}
	if cfg.topology != nil {
		topo = *cfg.topology
	} else {
		if st.redis == nil {
			st.redis = redistest.Start(t, cfg.redisArgs...)
		}
		topo.URL = st.redis.URL()
	}
	level := slog.LevelWarn
	if os.Getenv("TEST_LOG_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	st.m = metrics.New()
	ropts := broker.RedisOptions{Topology: topo, ClientName: cfg.name, Prefix: "ws", ProbeInterval: cfg.probe,
		ProbeTimeout: cfg.probe / 2, Logger: log, Observer: st.m}
	var b broker.Broker
	var err error
	if cfg.sharded {
		b, err = broker.NewShardedRedis(ropts)
	} else {
		b, err = broker.NewRedis(ropts)
	}
	if err != nil {
		t.Fatal(err)
	}
	st.broker = b
	cfg.hub.Metrics, cfg.hub.Logger, cfg.hub.Encode = st.m, log, TextFrame
	st.hub = hub.New(b, cfg.hub)
	if err := b.Start(st.hub); err != nil {
		t.Fatal(err)
	}
	st.auth, err = jwtauth.New(jwtauth.Options{Secret: []byte(testSecret), Algorithms: []string{"HS256"}})
	if err != nil {
		t.Fatal(err)
	}
	cfg.gw.RedisAddress = topo.Describe()
	if cfg.gw.History == nil {
		cfg.gw.History, err = broker.NewHistory(ropts)
		if err != nil {
			t.Fatal(err)
		}
		st.history = cfg.gw.History
	}
	st.gw, err = New(cfg.gw, st.hub, b, st.auth, st.m, log)
	if err != nil {
		t.Fatal(err)
	}
	st.http = httptest.NewServer(st.gw.Handler())
	st.wsURL = "ws" + strings.TrimPrefix(st.http.URL, "http")
	t.Cleanup(st.close)
	eventually(t, 10*time.Second, "broker link up", st.hub.LinkUp)
	return st
}

func (st *stack) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st.gw.Drain()
	st.http.Close()
	_ = st.gw.CloseAll(ctx)
	_ = st.broker.Close()
	st.gw.Close()
	if st.history != nil {
		st.history.Close()
	}
}

func (st *stack) token(sub string, ttl time.Duration) string {
	tok, err := st.auth.Mint(sub, ttl)
	if err != nil {
		st.t.Fatal(err)
	}
	return tok
}

// dial connects as user to /ws/v1/status/{user}.
func (st *stack) dial(user string) *client {
	st.t.Helper()
	return st.dialURL(st.wsURL + "/ws/v1/status/" + user + "?token=" + st.token(user, time.Hour))
}

func (st *stack) dialURL(url string) *client {
	st.t.Helper()
	c, err := st.tryDial(url, nil)
	if err != nil {
		st.t.Fatal(err)
	}
	return c
}

func (st *stack) tryDial(url string, h http.Header) (*client, error) {
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	conn, resp, err := d.Dial(url, h)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("dial: %w (HTTP %d)", err, resp.StatusCode)
		}
		return nil, err
	}
	// Answer a close frame even if the socket is already half-gone, and
	// report the close (gorilla's default returns the write error instead).
	conn.SetCloseHandler(func(code int, text string) error {
		_ = conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, ""), time.Now().Add(time.Second))
		return nil
	})
	conn.SetPingHandler(func(data string) error {
		_ = conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
		return nil
	})
	c := &client{t: st.t, conn: conn}
	st.t.Cleanup(func() { _ = conn.Close() })
	return c, nil
}

func (st *stack) publish(user, payload string) int {
	st.t.Helper()
	n, err := st.redis.Publish(notify.Channel("ws", user), payload)
	if err != nil {
		st.t.Fatal(err)
	}
	return n
}

func (st *stack) numSub(user string) int {
	n, err := st.redis.NumSub(notify.Channel("ws", user))
	if err != nil {
		st.t.Fatal(err)
	}
	return n
}

// client is a gorilla/websocket client (not the server's library).
type client struct {
	t    testing.TB
	conn *websocket.Conn
}

// next reads one text message within timeout.
func (c *client) next(timeout time.Duration) (string, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(timeout))
	_, msg, err := c.conn.ReadMessage()
	return string(msg), err
}

func (c *client) mustNext() string {
	c.t.Helper()
	msg, err := c.next(10 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return msg
}

// nextEvent reads messages until one with the given event name.
func (c *client) nextEvent(event string) map[string]any {
	c.t.Helper()
	for {
		msg := c.mustNext()
		var v map[string]any
		if json.Unmarshal([]byte(msg), &v) == nil && v["event"] == event {
			return v
		}
	}
}

// expectClose reads until the close frame and checks code and error_code.
func (c *client) expectClose(code int, errorCode string) {
	c.t.Helper()
	for {
		_, _, err := func() (int, []byte, error) {
			_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			return c.conn.ReadMessage()
		}()
		if err == nil {
			continue
		}
		var ce *websocket.CloseError
		if !errors.As(err, &ce) {
			c.t.Fatalf("want close %d %s, got %v", code, errorCode, err)
		}
		var reason struct {
			ErrorCode string `json:"error_code"`
			Message   string `json:"message"`
		}
		if ce.Code != code {
			c.t.Fatalf("close code %d (%s), want %d", ce.Code, ce.Text, code)
		}
		if err := json.Unmarshal([]byte(ce.Text), &reason); err != nil || reason.ErrorCode != errorCode {
			c.t.Fatalf("close reason %q, want error_code %s", ce.Text, errorCode)
		}
		return
	}
}

func (c *client) send(s string) {
	c.t.Helper()
	if err := c.conn.WriteMessage(websocket.TextMessage, []byte(s)); err != nil {
		c.t.Fatal(err)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func asCloseError(err error, target **websocket.CloseError) bool { return errors.As(err, target) }
