package gateway

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

// sseClient reads an event stream over a raw TCP connection, so every read
// can have a deadline and nothing is buffered by an HTTP client library.
type sseClient struct {
	conn   net.Conn
	r      *bufio.Reader
	status int
	header http.Header
	body   string // the body of a refusal
	retry  int    // the stream's retry: value
	lastID string
}

type streamEvent struct {
	ID      string
	Data    string
	Comment bool
}

// dialSSE requests path (with query) from base ("http://host:port") with
// extra headers; on 200 the stream is ready for next.
func dialSSE(base, path string, header http.Header) (*sseClient, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		return nil, err
	}
	req, _ := http.NewRequest("GET", base+path, nil)
	req.Header = header.Clone()
	if req.Header == nil {
		req.Header = http.Header{}
	}
	req.Header.Set("Accept", "text/event-stream")
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, err
	}
	c := &sseClient{conn: conn, r: bufio.NewReader(conn)}
	resp, err := http.ReadResponse(c.r, req)
	if err != nil {
		conn.Close()
		return nil, err
	}
	c.status, c.header = resp.StatusCode, resp.Header
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		c.body = string(b)
		conn.Close()
		return c, nil
	}
	// The body runs until the connection closes: read it from c.r directly.
	return c, nil
}

// next returns the next event or comment, within timeout.
func (c *sseClient) next(timeout time.Duration) (streamEvent, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(timeout))
	var ev streamEvent
	var data []string
	seen := false
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return ev, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			if !seen {
				continue
			}
			ev.Data = strings.Join(data, "\n")
			if ev.ID != "" {
				c.lastID = ev.ID
			}
			return ev, nil
		}
		seen = true
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "":
			ev.Comment = true
		case "id":
			ev.ID = value
		case "data":
			data = append(data, value)
		case "retry":
			c.retry, _ = strconv.Atoi(value)
			seen = false // a retry-only block is not an event
		}
	}
}

// nextData skips comments and returns the next event's data.
func (c *sseClient) nextData(t testing.TB) streamEvent {
	t.Helper()
	for {
		ev, err := c.next(10 * time.Second)
		if err != nil {
			t.Fatalf("stream: %v", err)
		}
		if !ev.Comment {
			return ev
		}
	}
}

// nextEvent reads data events until one whose "event" is name.
func (c *sseClient) nextEvent(t testing.TB, name string) map[string]any {
	t.Helper()
	for {
		ev := c.nextData(t)
		var v map[string]any
		if json.Unmarshal([]byte(ev.Data), &v) == nil && v["event"] == name {
			return v
		}
	}
}

// expectClosed reads until connection.closed with code and error code, then EOF.
func (c *sseClient) expectClosed(t testing.TB, code int, errorCode string) {
	t.Helper()
	v := c.nextEvent(t, "connection.closed")
	data, _ := v["data"].(map[string]any)
	if int(data["code"].(float64)) != code || data["error_code"] != errorCode {
		t.Fatalf("connection.closed %v, want %d %s", data, code, errorCode)
	}
	for {
		if _, err := c.next(10 * time.Second); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("after connection.closed: %v, want EOF", err)
			}
			return
		}
	}
}

func (c *sseClient) close() { c.conn.Close() }

func (st *stack) httpURL() string { return st.http.URL }

func (st *stack) sse(user string, header http.Header) *sseClient {
	st.t.Helper()
	c, err := dialSSE(st.httpURL(), "/sse/v1/status/"+user+"?token="+st.token(user, time.Hour), header)
	if err != nil {
		st.t.Fatal(err)
	}
	if c.status != 200 {
		st.t.Fatalf("stream refused: %d %s", c.status, c.body)
	}
	st.t.Cleanup(c.close)
	return c
}

func TestSSEDeliversWhatWebSocketsGet(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.PingInterval = 200 * time.Millisecond })
	c := st.sse("s1", nil)
	if ct := c.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") ||
		c.header.Get("Cache-Control") != "no-cache, no-transform" || c.header.Get("X-Accel-Buffering") != "no" {
		t.Fatalf("headers %v", c.header)
	}
	pos := c.nextEvent(t, "resume.position") // every stream is resume-aware
	if pos["data"].(map[string]any)["id"] != "0" || c.lastID != "0" {
		t.Fatalf("position %v, last id %q", pos, c.lastID)
	}
	if c.retry < 1000 || c.retry > 5000 {
		t.Fatalf("retry %d ms, want 1000-5000 (jittered)", c.retry)
	}
	ws := st.dial("s1")
	pub := notify.NewHistoryPublisher(st.publisher(), "ws", false, notify.HistoryOptions{})
	res, err := pub.Publish(context.Background(), "s1", []byte("{\"event\":\"multi\",\n\"data\":{\"line\":2}}"), "")
	if err != nil {
		t.Fatal(err)
	}
	frame := ws.mustNext()
	ev := c.nextData(t)
	if ev.Data != frame || ev.ID != res.ID {
		t.Fatalf("stream event id %q data %q; WebSocket frame %q, id %s", ev.ID, ev.Data, frame, res.ID)
	}
	st.publish("s1", `{"plain":"publish"}`) // no history: no id
	if ev := c.nextData(t); ev.Data != `{"plain":"publish"}` || ev.ID != "" {
		t.Fatalf("plain publish: %+v", ev)
	}
	for { // heartbeats every ping interval
		ev, err := c.next(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Comment {
			break
		}
	}
	if got := testutil.ToFloat64(st.m.ActiveConnections.WithLabelValues("sse")); got != 1 {
		t.Fatalf("active sse connections %v", got)
	}
	// Counted by the handler once the stream started, which can be after
	// its first bytes went out.
	eventually(t, 5*time.Second, "one stream counted opened", func() bool {
		return testutil.ToFloat64(st.m.ConnectionsOpened.WithLabelValues("sse")) == 1
	})
}

func TestSSERefusals(t *testing.T) {
	st := newStack(t, func(c *stackConfig) {
		c.gw.MaxConnsPerUser = 2
		c.gw.CORSOrigins = []string{"https://app.example"}
	})
	check := func(name, path string, h http.Header, status int, errorCode string) {
		t.Helper()
		c, err := dialSSE(st.httpURL(), path, h)
		if err != nil {
			t.Fatal(err)
		}
		if c.status != status || !strings.Contains(c.body, `"error_code":"`+errorCode+`"`) {
			t.Errorf("%s: %d %s, want %d %s", name, c.status, c.body, status, errorCode)
		}
	}
	tok := st.token("q", time.Hour)
	check("no token", "/sse/v1/status/q", nil, 401, "AUTHENTICATION_ERROR")
	check("bad token", "/sse/v1/status/q?token=x.y.z", nil, 401, "AUTHENTICATION_ERROR")
	check("other user", "/sse/v1/status/other?token="+tok, nil, 403, "AUTHORIZATION_ERROR")
	check("foreign origin", "/sse/v1/status/q?token="+tok, http.Header{"Origin": {"https://evil.example"}}, 403, "ORIGIN_NOT_ALLOWED")

	// Bearer header, /sse/ path, allowed origin (CORS headers on the stream).
	c, err := dialSSE(st.httpURL(), "/sse/", http.Header{"Authorization": {"Bearer " + tok}, "Origin": {"https://app.example"}})
	if err != nil || c.status != 200 {
		t.Fatalf("bearer on /sse/: %v %d %s", err, c.status, c.body)
	}
	defer c.close()
	if c.header.Get("Access-Control-Allow-Origin") != "https://app.example" {
		t.Errorf("CORS header %q", c.header.Get("Access-Control-Allow-Origin"))
	}
	// The per-user quota counts both transports: one stream + one socket.
	ws := st.dial("q")
	check("quota", "/sse/v1/status/q?token="+tok, nil, 429, "QUOTA_EXCEEDED")
	wsFull, err := st.tryDial(st.wsURL+"/ws/v1/status/q?token="+tok, nil)
	if err != nil {
		t.Fatal(err)
	}
	wsFull.expectClose(4000, "QUOTA_EXCEEDED")
	_ = ws

	// Revoked token: 401 with the same message as the WebSocket close.
	if _, err := disconnecter(t, st.redis.Addr(), false).Disconnect(context.Background(), "r", notify.DisconnectOptions{Revoke: true}); err != nil {
		t.Fatal(err)
	}
	check("revoked", "/sse/v1/status/r?token="+mintIAT(t, "r", time.Now().Add(-time.Minute)), nil, 401, "AUTHENTICATION_ERROR")

	st.gw.Drain()
	check("draining", "/sse/v1/status/z?token="+st.token("z", time.Hour), nil, 503, "SERVER_SHUTDOWN")
}

// TestSSERefusalsReadableCrossOrigin: a page on an allowed other origin
// reads every refusal (CORS headers, Retry-After exposed); a foreign origin
// gets none. Without them the browser hides the status and the client
// cannot tell a revoked token from a network error (issue 18, defect 8).
func TestSSERefusalsReadableCrossOrigin(t *testing.T) {
	const app = "https://app.example"
	st := newStack(t, func(c *stackConfig) {
		c.gw.MaxConnsPerUser = 1
		c.gw.CORSOrigins = []string{app}
	})
	from := func(origin string) http.Header { return http.Header{"Origin": {origin}} }
	check := func(name, path string, h http.Header, status int, wantCORS, wantExpose bool) {
		t.Helper()
		c, err := dialSSE(st.httpURL(), path, h)
		if err != nil {
			t.Fatal(err)
		}
		if c.status != status {
			t.Errorf("%s: status %d %s, want %d", name, c.status, c.body, status)
		}
		hd := c.header
		cors := hd.Get("Access-Control-Allow-Origin") == app && hd.Get("Access-Control-Allow-Credentials") == "true" &&
			slices.Contains(hd.Values("Vary"), "Origin")
		if cors != wantCORS || (!wantCORS && hd.Get("Access-Control-Allow-Origin") != "") {
			t.Errorf("%s: CORS headers %v, want them: %v", name, hd, wantCORS)
		}
		if exposed := hd.Get("Access-Control-Expose-Headers") == "Retry-After" && hd.Get("Retry-After") != ""; exposed != wantExpose {
			t.Errorf("%s: Retry-After exposed %v, want %v (%v)", name, exposed, wantExpose, hd)
		}
	}
	tok := st.token("q", time.Hour)
	check("no token", "/sse/v1/status/q", from(app), 401, true, false)
	check("other user", "/sse/v1/status/other?token="+tok, from(app), 403, true, false)
	check("foreign origin", "/sse/v1/status/q?token="+tok, from("https://evil.example"), 403, false, false)
	if _, err := disconnecter(t, st.redis.Addr(), false).Disconnect(context.Background(), "r", notify.DisconnectOptions{Revoke: true}); err != nil {
		t.Fatal(err)
	}
	check("revoked", "/sse/v1/status/r?token="+mintIAT(t, "r", time.Now().Add(-time.Minute)), from(app), 401, true, false)
	open := st.sse("q", from(app))
	defer open.close()
	check("quota", "/sse/v1/status/q?token="+tok, from(app), 429, true, true)

	// The client asks /healthz whether plain HTTP works before it falls back.
	for origin, want := range map[string]string{app: app, "https://evil.example": ""} {
		req, _ := http.NewRequest("GET", st.httpURL()+"/healthz", nil)
		req.Header.Set("Origin", origin)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if got := res.Header.Get("Access-Control-Allow-Origin"); res.StatusCode != 200 || got != want {
			t.Errorf("/healthz from %s: %d, Access-Control-Allow-Origin %q, want %q", origin, res.StatusCode, got, want)
		}
	}

	st.gw.Drain()
	check("draining", "/sse/v1/status/z?token="+st.token("z", time.Hour), from(app), 503, true, true)
}

func TestSSEServerBusy(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.hub.MaxConns = 1 })
	st.sse("b1", nil)
	c, err := dialSSE(st.httpURL(), "/sse/v1/status/b2?token="+st.token("b2", time.Hour), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.status != 503 || c.header.Get("Retry-After") == "" || !strings.Contains(c.body, "SERVER_BUSY") {
		t.Fatalf("%d %v %s", c.status, c.header, c.body)
	}
}

func TestSSEResume(t *testing.T) {
	st := newStack(t, nil)
	pub := notify.NewHistoryPublisher(st.publisher(), "ws", false, notify.HistoryOptions{})
	ids := publishWithHistory(t, pub, "r1", 5)
	// Last-Event-ID (what EventSource sends) wins over since.
	c := st.sse("r1", http.Header{"Last-Event-Id": {ids[1]}})
	_ = c
	c2, err := dialSSE(st.httpURL(), "/sse/v1/status/r1?since="+url.QueryEscape(ids[3])+"&token="+st.token("r1", time.Hour),
		http.Header{"Last-Event-Id": {ids[1]}})
	if err != nil || c2.status != 200 {
		t.Fatal(err, c2.status)
	}
	defer c2.close()
	for _, want := range ids[2:] {
		if ev := c2.nextData(t); ev.ID != want {
			t.Fatalf("replayed %q, want %s", ev.ID, want)
		}
	}
	pos := c2.nextEvent(t, "resume.position")
	if pos["data"].(map[string]any)["id"] != ids[4] || c2.lastID != ids[4] {
		t.Fatalf("position %v (last id %q), want %s", pos, c2.lastID, ids[4])
	}
	// since alone, and a since history cannot cover.
	c3, err := dialSSE(st.httpURL(), "/sse/v1/status/r1?since=garbage&token="+st.token("r1", time.Hour), nil)
	if err != nil || c3.status != 200 {
		t.Fatal(err)
	}
	defer c3.close()
	inc := c3.nextEvent(t, "resume.incomplete")
	if inc["data"].(map[string]any)["reason"] != "invalid" {
		t.Fatalf("%v", inc)
	}
}

func TestSSEPolicyEnds(t *testing.T) {
	st := newStack(t, nil)
	t.Run("token expiry", func(t *testing.T) {
		c, err := dialSSE(st.httpURL(), "/sse/v1/status/e?token="+st.token("e", time.Second), nil)
		if err != nil || c.status != 200 {
			t.Fatal(err)
		}
		defer c.close()
		c.expectClosed(t, 4001, "TOKEN_EXPIRED")
	})
	t.Run("disconnect", func(t *testing.T) {
		c := st.sse("d", nil)
		c.nextEvent(t, "resume.position")
		if _, err := disconnecter(t, st.redis.Addr(), false).Disconnect(context.Background(), "d", notify.DisconnectOptions{Reason: "bye"}); err != nil {
			t.Fatal(err)
		}
		c.expectClosed(t, 4004, "REVOKED")
	})
	t.Run("shutdown", func(t *testing.T) {
		c := st.sse("sd", nil)
		c.nextEvent(t, "resume.position")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		go st.gw.CloseAll(ctx)
		c.expectClosed(t, 1001, "SERVER_SHUTDOWN")
		// remove takes the session out of the hub, then lowers the gauge.
		eventually(t, 5*time.Second, "stream removed and the gauge back to 0", func() bool {
			return st.hub.Count() == 0 && testutil.ToFloat64(st.m.ActiveConnections.WithLabelValues("sse")) == 0
		})
	})
}

func TestSSESlowConsumer(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.SendQueueMsgs, c.gw.SendQueueBytes = 16, 16<<10 })
	c := st.sse("slow", nil)
	c.nextEvent(t, "resume.position")
	big := `{"pad":"` + strings.Repeat("x", 8000) + `"}`
	pub := st.publisher()
	// The client reads nothing: kernel buffers fill, then the queue.
	eventually(t, 30*time.Second, "slow consumer closed", func() bool {
		cmds := make(rueidis.Commands, 0, 50)
		for range 50 {
			cmds = append(cmds, pub.B().Publish().Channel("ws:slow").Message(big).Build())
		}
		pub.DoMulti(context.Background(), cmds...)
		return testutil.ToFloat64(st.m.ConnectionsClosed.WithLabelValues("sse", "slow_consumer")) == 1
	})
}

// TestSSEThroughAReverseProxy: an HTTP/1.1 reverse proxy that flushes as
// it goes (httputil.ReverseProxy flushes event streams at once) passes each
// event while the stream stays open.
func TestSSEThroughAReverseProxy(t *testing.T) {
	st := newStack(t, nil)
	target, _ := url.Parse(st.httpURL())
	proxy := httptest.NewServer(httputil.NewSingleHostReverseProxy(target))
	defer proxy.Close()
	c, err := dialSSE(proxy.URL, "/sse/v1/status/px?token="+st.token("px", time.Hour), nil)
	if err != nil || c.status != 200 {
		t.Fatal(err, c.status, c.body)
	}
	defer c.close()
	c.nextEvent(t, "resume.position")
	for i := range 3 {
		payload := fmt.Sprintf(`{"n":%d}`, i)
		st.publish("px", payload)
		if ev := c.nextData(t); ev.Data != payload {
			t.Fatalf("through the proxy: %+v, want %s", ev, payload)
		}
	}
}

// TestSSEClientsHangUpAtOnce: streams whose clients leave as soon as the
// head arrives are each closed, counted and removed once. The engine learns
// of the close on a goroutine of its own, which may run before the handler
// that built the session has returned (under -race this once reported the
// session's handover; see sseConn).
func TestSSEClientsHangUpAtOnce(t *testing.T) {
	st := newStack(t, nil)
	const workers, each = 8, 100
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				user := fmt.Sprintf("hang%d-%d", w, i)
				c, err := dialSSE(st.httpURL(), "/sse/v1/status/"+user+"?token="+st.token(user, time.Hour), nil)
				if err != nil {
					t.Error(err)
					return
				}
				if c.status != 200 {
					t.Errorf("stream refused: %d %s", c.status, c.body)
				}
				c.close()
			}
		})
	}
	wg.Wait()
	// remove takes the session out of the hub, then lowers the gauge.
	eventually(t, 10*time.Second, "every stream removed", func() bool {
		return st.hub.Count() == 0 && testutil.ToFloat64(st.m.ActiveConnections.WithLabelValues("sse")) == 0
	})
	closed := testutil.ToFloat64(st.m.ConnectionsClosed.WithLabelValues("sse", "client_closed")) +
		testutil.ToFloat64(st.m.ConnectionsClosed.WithLabelValues("sse", "abnormal"))
	if closed != workers*each {
		t.Fatalf("%d streams, %v counted closed", workers*each, closed)
	}
}
