package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/lesismal/nbio/taskpool.New.func3"),
		goleak.IgnoreAnyFunction("github.com/lesismal/nbio/timer.(*Timer).Start.func1"),
		// rueidis delays the redial of a broken connection in a goroutine of
		// its own (about a second) that no Close waits for; the gateway and
		// broker packages ignore it for the same reason.
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"),
	)
}

const secret = "e2e-secret-e2e-secret-e2e-secret-e2e"

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type server struct {
	port   int
	cancel context.CancelFunc
	done   chan error
	logs   *syncBuffer
	env    map[string]string
}

func startServe(t *testing.T, env map[string]string) *server {
	t.Helper()
	// A port picked as free can be taken by a test package running in
	// parallel before serve binds it: then serve returns at once, and it is
	// started again on another port.
	for attempt := 1; ; attempt++ {
		port, err := redistest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		full := map[string]string{"WEBSOCKET_HOST": "127.0.0.1", "WEBSOCKET_PORT": fmt.Sprint(port), "JWT_SECRET_KEY": secret, "SHUTDOWN_TIMEOUT": "5s"}
		for k, v := range env {
			full[k] = v
		}
		ctx, cancel := context.WithCancel(context.Background())
		s := &server{port: port, cancel: cancel, done: make(chan error, 1), logs: &syncBuffer{}, env: full}
		go func() {
			s.done <- run(ctx, []string{"serve"}, func(k string) string { return full[k] }, s.logs, s.logs)
		}()
		var exited error
		waitFor(t, 10*time.Second, "serve answers /healthz", func() bool {
			select {
			case exited = <-s.done:
				return true
			default:
			}
			resp, err := http.Get(s.url("http") + "/healthz")
			if err == nil {
				resp.Body.Close()
			}
			return err == nil && resp.StatusCode == 200
		})
		if exited == nil {
			t.Cleanup(func() {
				cancel()
				// serve bounds its shutdown by SHUTDOWN_TIMEOUT (the broker's
				// close no longer waits for Redis round trips); the slack is
				// for a loaded machine's scheduling only.
				bound := shutdownBound(t, full)
				select {
				case <-s.done:
				case <-time.After(bound):
					buf := make([]byte, 1<<20)
					t.Errorf("serve did not return within %s (SHUTDOWN_TIMEOUT + slack)\nlogs:\n%s\ngoroutines:\n%s",
						bound, s.logs.String(), buf[:runtime.Stack(buf, true)])
				}
			})
			return s
		}
		cancel()
		if attempt == 5 || !strings.Contains(fmt.Sprint(exited), "listen on") {
			t.Fatalf("serve returned at start: %v\n%s", exited, s.logs.String())
		}
	}
}

// shutdownBound is how long a test waits for serve to return after its
// context ends: the service's own SHUTDOWN_TIMEOUT plus 30 s of slack.
func shutdownBound(t *testing.T, env map[string]string) time.Duration {
	d, err := time.ParseDuration(env["SHUTDOWN_TIMEOUT"])
	if n, nerr := strconv.Atoi(env["SHUTDOWN_TIMEOUT"]); nerr == nil { // seconds, as config reads it
		d, err = time.Duration(n)*time.Second, nil
	}
	if err != nil {
		t.Fatalf("SHUTDOWN_TIMEOUT %q: %v", env["SHUTDOWN_TIMEOUT"], err)
	}
	return d + 30*time.Second
}

func (s *server) url(scheme string) string { return fmt.Sprintf("%s://127.0.0.1:%d", scheme, s.port) }

func (s *server) token(t *testing.T, sub string) string {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"token", "--sub", sub}, func(k string) string { return s.env[k] }, &out, &out); err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out.String())
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServePublishAndShutdown(t *testing.T) {
	redis := redistest.Start(t)
	s := startServe(t, map[string]string{"REDIS_URL": redis.URL()})
	conn, _, err := websocket.DefaultDialer.Dial(s.url("ws")+"/ws/v1/status/alice?token="+s.token(t, "alice"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	var out bytes.Buffer
	env := func(k string) string { return map[string]string{"REDIS_URL": redis.URL()}[k] }
	if err := run(context.Background(), []string{"publish", "--user", "alice", "--event", "essay_graded", "--data", `{"id":"e1"}`}, env, &out, &out); err != nil {
		t.Fatal(err)
	}
	n, id, _ := strings.Cut(strings.TrimSpace(out.String()), " ")
	if n != "1" {
		t.Fatalf("publish printed %q, want 1 subscribed instance and the id", out.String())
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, msg, err := conn.ReadMessage()
	if err != nil || string(msg) != `{"id":"`+id+`","event":"essay_graded","data":{"id":"e1"}}` {
		t.Fatalf("got %s, %v", msg, err)
	}
	out.Reset()
	if err := run(context.Background(), []string{"publish", "--no-history", "--user", "alice", "--event", "essay_graded", "--data", `{"id":"e2"}`}, env, &out, &out); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out.String()) != "1" {
		t.Fatalf("publish --no-history printed %q, want 1", out.String())
	}
	if _, msg, err = conn.ReadMessage(); err != nil || string(msg) != `{"event":"essay_graded","data":{"id":"e2"}}` {
		t.Fatalf("plain publish: got %s, %v", msg, err)
	}

	s.cancel() // SIGTERM
	_, _, err = conn.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 1001 || !strings.Contains(ce.Text, "SERVER_SHUTDOWN") {
		t.Fatalf("want 1001 SERVER_SHUTDOWN, got %v", err)
	}
	select {
	case err := <-s.done:
		if err != nil {
			t.Fatalf("serve returned %v", err)
		}
		s.done <- nil
	case <-time.After(6 * time.Second):
		t.Fatal("serve did not exit within the shutdown timeout")
	}
	if strings.Contains(s.logs.String(), secret) {
		t.Fatal("the JWT secret appears in the logs")
	}
}

func TestRedisDownAtStartup(t *testing.T) {
	port, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	s := startServe(t, map[string]string{"REDIS_URL": fmt.Sprintf("redis://:pw@127.0.0.1:%d", port)})
	status := func() (int, map[string]any) {
		resp, err := http.Get(s.url("http") + "/healthz/redis")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&v)
		return resp.StatusCode, v
	}
	code, v := status()
	if code != 503 || strings.Contains(fmt.Sprint(v["url"]), "pw") {
		t.Fatalf("/healthz/redis = %d %v, want 503 with masked url", code, v)
	}
	// A client connecting now is accepted and told the service is degraded.
	conn, _, err := websocket.DefaultDialer.Dial(s.url("ws")+"/ws?token="+s.token(t, "early"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, msg, err := conn.ReadMessage(); err != nil || !strings.Contains(string(msg), "connection.degraded") {
		t.Fatalf("got %s, %v; want connection.degraded", msg, err)
	}
	redis, err := redistest.StartOnPort(t.TempDir(), port, "--requirepass", "pw")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(redis.Stop)
	waitFor(t, 15*time.Second, "/healthz/redis 200", func() bool { c, _ := status(); return c == 200 })
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, msg, err := conn.ReadMessage(); err != nil || !strings.Contains(string(msg), "connection.restored") {
		t.Fatalf("got %s, %v; want connection.restored", msg, err)
	}
	if _, err := redis.Do("AUTH", "pw"); err != nil {
		t.Fatal(err)
	}
}

func TestBadConfigRefusesToStart(t *testing.T) {
	for name, env := range map[string]map[string]string{
		"WEBSOCKET_PORT": {"WEBSOCKET_PORT": "99999"},
		"JWT_ALGORITHM":  {"JWT_ALGORITHM": "none"},
		"REDIS_URL":      {"ENVIRONMENT": "production", "JWT_SECRET_KEY": strings.Repeat("x", 40)},
		"JWT_SECRET_KEY": {"ENVIRONMENT": "production", "REDIS_URL": "redis://127.0.0.1:1"},
	} {
		var out bytes.Buffer
		err := run(context.Background(), []string{"serve"}, func(k string) string { return env[k] }, &out, &out)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: got %v, want an error naming it", name, err)
		}
	}
}

func TestHelpAndVersion(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"version"}} {
		var out bytes.Buffer
		if err := run(context.Background(), args, func(string) string { return "" }, &out, &out); err != nil || out.Len() == 0 {
			t.Errorf("%v: %v %q", args, err, out.String())
		}
	}
	for _, cmd := range []string{"serve", "publish", "token", "listen"} {
		var out bytes.Buffer
		err := run(context.Background(), []string{cmd, "--help"}, func(string) string { return "" }, &out, &out)
		if err == nil || !strings.Contains(out.String(), "Environment:") {
			t.Errorf("%s --help: %v %q", cmd, err, out.String())
		}
	}
}

func TestListenPrintsNotifications(t *testing.T) {
	redis := redistest.Start(t)
	s := startServe(t, map[string]string{"REDIS_URL": redis.URL()})
	out := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	env := func(k string) string { return s.env[k] }
	go func() {
		done <- run(ctx, []string{"listen", "--user", "watcher", "--url", s.url("ws")}, env, out, &syncBuffer{})
	}()
	// Publish until the listener is subscribed and prints the document.
	waitFor(t, 10*time.Second, "listen prints the notification", func() bool {
		var pub bytes.Buffer
		_ = run(context.Background(), []string{"publish", "--user", "watcher", "--raw", `{"k":"v"}`}, env, &pub, &pub)
		return strings.Contains(out.String(), `"k":"v"}`+"\n")
	})
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("listen returned %v after interrupt", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("listen did not stop on interrupt")
	}
}

// TestDemoOnlyOutsideProduction: the demo page, its client module and its
// publish endpoint exist in development and are 404 in production; tokens
// are minted only while the development secret is in use.
func TestDemoOnlyOutsideProduction(t *testing.T) {
	redis := redistest.Start(t)
	status := func(s *server, method, path, body string) int {
		req, _ := http.NewRequest(method, s.url("http")+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	publish := `{"user":"demo-u","event":"e","data":{"k":1}}`

	dev := startServe(t, map[string]string{"REDIS_URL": redis.URL(), "JWT_SECRET_KEY": ""})
	for path, want := range map[string]int{"/demo": 200, "/demo/client.js": 200} {
		if got := status(dev, "GET", path, ""); got != want {
			t.Errorf("development GET %s: %d, want %d", path, got, want)
		}
	}
	if got := status(dev, "POST", "/demo/token", `{"user":"demo-u"}`); got != 200 {
		t.Errorf("development POST /demo/token with the development secret: %d", got)
	}
	if got := status(dev, "POST", "/demo/publish", publish); got != 200 {
		t.Errorf("development POST /demo/publish: %d", got)
	}
	if n, err := redis.Do("LLEN", "{ws:demo-u}:h"); err != nil || n != "1" {
		t.Errorf("history after the demo publish: %q %v", n, err)
	}
	if got := status(dev, "POST", "/demo/publish", `{"user":"demo-u"}`); got != 400 {
		t.Errorf("POST /demo/publish without an event: %d, want 400", got)
	}

	withSecret := startServe(t, map[string]string{"REDIS_URL": redis.URL()})
	if got := status(withSecret, "POST", "/demo/token", `{"user":"demo-u"}`); got != 404 {
		t.Errorf("POST /demo/token with JWT_SECRET_KEY set: %d, want 404", got)
	}

	prod := startServe(t, map[string]string{"REDIS_URL": redis.URL(), "ENVIRONMENT": "production"})
	for _, r := range [][2]string{{"GET", "/demo"}, {"GET", "/demo/client.js"}, {"POST", "/demo/publish"}, {"POST", "/demo/token"}} {
		if got := status(prod, r[0], r[1], publish); got != 404 {
			t.Errorf("production %s %s: %d, want 404", r[0], r[1], got)
		}
	}
	if got := status(prod, "GET", "/healthz", ""); got != 200 {
		t.Errorf("production /healthz: %d", got)
	}
}

// TestPublishRefusesReservedID: with history, the CLI refuses a --raw
// notification with a top-level "id" of its own (publish.lua inserts the
// history id there) with the reason, and publishes nothing.
func TestPublishRefusesReservedID(t *testing.T) {
	redis := redistest.Start(t)
	env := func(k string) string { return map[string]string{"REDIS_URL": redis.URL()}[k] }
	var out bytes.Buffer
	err := run(context.Background(), []string{"publish", "--user", "bob", "--raw", `{"id":"order-7","event":"shipped"}`}, env, &out, &out)
	if err == nil || !strings.Contains(err.Error(), `"id" is reserved`) {
		t.Fatalf("publish --raw with its own id: %v (output %q), want a refusal saying \"id\" is reserved", err, out.String())
	}
	if n, _ := redis.Do("EXISTS", notify.HistoryKey("ws:bob")); n != "0" {
		t.Fatalf("the refused notification was stored (EXISTS %s)", n)
	}
}
