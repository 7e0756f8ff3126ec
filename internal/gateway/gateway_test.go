package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/gorilla/websocket"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

func TestDeliversPublishAndPublisherPackage(t *testing.T) {
	st := newStack(t, nil)
	c := st.dial("alice")
	if n := st.publish("alice", `{"event":"essay_graded","data":{"id":1}}`); n != 1 {
		t.Fatalf("PUBLISH receivers = %d, want 1 (subscribed before the upgrade completed)", n)
	}
	if got := c.mustNext(); got != `{"event":"essay_graded","data":{"id":1}}` {
		t.Fatalf("got %s", got)
	}

	rc, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{st.redis.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	n, err := notify.NewPublisher(rc, "ws").PublishUserNotification(context.Background(), "alice", "batch_phase_concluded", map[string]any{"batch_id": "b1"})
	if err != nil || n != 1 {
		t.Fatalf("PublishUserNotification = %d, %v", n, err)
	}
	if got := c.mustNext(); got != `{"event":"batch_phase_concluded","data":{"batch_id":"b1"}}` {
		t.Fatalf("got %s", got)
	}
}

func TestLegacyPathAndBearerHeader(t *testing.T) {
	st := newStack(t, nil)
	legacy := st.dialURL(st.wsURL + "/ws/?token=" + st.token("bob", time.Hour))
	noSlash := st.dialURL(st.wsURL + "/ws?token=" + st.token("bob", time.Hour))
	bearer, err := st.tryDial(st.wsURL+"/ws", http.Header{"Authorization": {"Bearer " + st.token("bob", time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	st.publish("bob", `{"n":1}`)
	for _, c := range []*client{legacy, noSlash, bearer} {
		if got := c.mustNext(); got != `{"n":1}` {
			t.Fatalf("got %s", got)
		}
	}
	// The query parameter wins over the header.
	both, err := st.tryDial(st.wsURL+"/ws?token=garbage", http.Header{"Authorization": {"Bearer " + st.token("bob", time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	both.expectClose(1008, "AUTHENTICATION_ERROR")
}

func TestEachConnectionOnceAndOtherUsersNothing(t *testing.T) {
	st := newStack(t, nil)
	a1, a2 := st.dial("u1"), st.dial("u1")
	other := st.dial("u2")
	for i := range 50 {
		st.publish("u1", fmt.Sprintf(`{"i":%d}`, i))
	}
	st.publish("u2", `{"marker":true}`)
	for _, c := range []*client{a1, a2} {
		for i := range 50 {
			if got := c.mustNext(); got != fmt.Sprintf(`{"i":%d}`, i) {
				t.Fatalf("message %d: got %s (duplicate or out of order)", i, got)
			}
		}
	}
	// u2's first message is its own marker: it got none of u1's.
	if got := other.mustNext(); got != `{"marker":true}` {
		t.Fatalf("u2 got %s", got)
	}
	// And u1 gets no extra copies: the next thing each sees is a fresh marker.
	st.publish("u1", `{"end":true}`)
	for _, c := range []*client{a1, a2} {
		if got := c.mustNext(); got != `{"end":true}` {
			t.Fatalf("got %s, want end marker", got)
		}
	}
}

func TestCloseCodes(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.MaxConnsPerUser = 2 })
	wrongKey, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "x", "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte("other-secret"))
	cases := []struct {
		name, url string
		code      int
		errorCode string
		user      string
	}{
		{"missing token", "/ws/v1/status/x", 1008, "AUTHENTICATION_ERROR", "x"},
		{"malformed", "/ws/v1/status/x?token=abc.def", 1008, "AUTHENTICATION_ERROR", "x"},
		{"bad signature", "/ws/v1/status/x?token=" + wrongKey, 1008, "AUTHENTICATION_ERROR", "x"},
		{"expired", "/ws/v1/status/x?token=" + st.token("x", -time.Minute), 1008, "AUTHENTICATION_ERROR", "x"},
		{"client_id differs", "/ws/v1/status/y?token=" + st.token("x", time.Hour), 1008, "AUTHORIZATION_ERROR", "y"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := st.dialURL(st.wsURL + tc.url)
			c.expectClose(tc.code, tc.errorCode)
			if n := st.numSub(tc.user); n != 0 {
				t.Fatalf("rejected connection left %d subscriptions", n)
			}
		})
	}
	t.Run("quota", func(t *testing.T) {
		st.dial("q")
		st.dial("q")
		c := st.dial("q")
		c.expectClose(4000, "QUOTA_EXCEEDED")
		eventually(t, 5*time.Second, "2 connections", func() bool { return st.hub.Count() == 2 })
	})
	t.Run("binary frame", func(t *testing.T) {
		c := st.dial("bin")
		if err := c.conn.WriteMessage(websocket.BinaryMessage, []byte{1, 2}); err != nil {
			t.Fatal(err)
		}
		c.expectClose(1003, "UNSUPPORTED_DATA")
		eventually(t, 5*time.Second, "unsubscribed", func() bool { return st.numSub("bin") == 0 })
	})
	t.Run("frame too big", func(t *testing.T) {
		c := st.dial("big")
		c.send(strings.Repeat("a", 4097))
		c.expectClose(1009, "MESSAGE_TOO_BIG")
	})
}

func TestServerBusy(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.hub.MaxConns = 1 })
	st.dial("a")
	c := st.dial("b")
	c.expectClose(1013, "SERVER_BUSY")
	if n := st.numSub("b"); n != 0 {
		t.Fatalf("busy rejection subscribed: NUMSUB %d", n)
	}
}

func TestUnsubscribesAfterLastConnection(t *testing.T) {
	st := newStack(t, nil)
	a, b := st.dial("u"), st.dial("u")
	if n := st.numSub("u"); n != 1 {
		t.Fatalf("NUMSUB = %d with two connections, want 1 (one shared link)", n)
	}
	_ = a.conn.Close()
	eventually(t, 5*time.Second, "one connection left", func() bool { return st.hub.Count() == 1 })
	if n := st.numSub("u"); n != 1 {
		t.Fatalf("NUMSUB = %d after first close, want 1", n)
	}
	_ = b.conn.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""))
	eventually(t, 5*time.Second, "NUMSUB 0", func() bool { return st.numSub("u") == 0 })
}

func TestRedisConnectionsStayConstant(t *testing.T) {
	st := newStack(t, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	sem := make(chan struct{}, 64)
	for i := range 1000 {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			user := fmt.Sprintf("user-%d", i)
			if _, err := st.tryDial(st.wsURL+"/ws/v1/status/"+user+"?token="+st.token(user, time.Hour), nil); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	n, err := st.redis.ClientCount()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("redis client connections with 1000 WebSockets: %d", n)
	if n > 4 {
		t.Fatalf("gateway holds %d Redis connections, want <= 4", n)
	}
	if got := st.numSub("user-999"); got != 1 {
		t.Fatalf("NUMSUB user-999 = %d", got)
	}
}

func TestInboundFramesAndKeepalive(t *testing.T) {
	st := newStack(t, nil)
	c := st.dial("talker")
	c.send("hello")
	c.send(`{"type":"unknown"}`)
	c.send(`{"type":"ping"}`)
	pong := c.nextEvent("pong")
	if ts, _ := pong["data"].(map[string]any)["timestamp"].(string); ts == "" {
		t.Fatalf("pong without timestamp: %v", pong)
	}
	st.publish("talker", `{"still":"open"}`)
	if got := c.mustNext(); got != `{"still":"open"}` {
		t.Fatalf("got %s", got)
	}
}

func TestIdleClientIsClosed(t *testing.T) {
	st := newStack(t, func(c *stackConfig) {
		c.gw.PingInterval, c.gw.IdleTimeout, c.gw.SweepInterval = 100*time.Millisecond, time.Second, 20*time.Millisecond
		c.gw.CloseGrace = 500 * time.Millisecond
	})
	// A client that reads (and so answers pings) stays open past the timeout.
	alive := st.dial("alive")
	var pings sync.WaitGroup
	pings.Add(3)
	count := 0
	alive.conn.SetPingHandler(func(data string) error {
		if count++; count <= 3 {
			pings.Done()
		}
		return alive.conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	go func() { _, _, _ = alive.conn.ReadMessage() }()
	pings.Wait()

	// A dead peer (never reads, so never answers pings) is closed with 1001.
	dead := st.dial("dead")
	eventually(t, 10*time.Second, "dead peer closed", func() bool { return st.numSub("dead") == 0 })
	dead.expectClose(1001, "IDLE_TIMEOUT")
	if st.numSub("alive") != 1 {
		t.Fatal("client answering pings was closed")
	}
}

func TestNonJSONAndOversizedNotForwarded(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.hub.MaxMessageBytes = 100 })
	c := st.dial("j")
	st.publish("j", "not json")
	st.publish("j", `{"big":"`+strings.Repeat("x", 200)+`"}`)
	st.publish("j", `{"ok":true}`)
	if got := c.mustNext(); got != `{"ok":true}` {
		t.Fatalf("got %s, want only the valid message", got)
	}
}

func TestOriginCheck(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.CORSOrigins = []string{"https://app.huleedu.se"} })
	url := st.wsURL + "/ws/v1/status/o?token=" + st.token("o", time.Hour)
	if _, err := st.tryDial(url, http.Header{"Origin": {"https://evil.example"}}); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("cross-site origin: %v, want HTTP 403", err)
	}
	if _, err := st.tryDial(url, http.Header{"Origin": {"https://app.huleedu.se"}}); err != nil {
		t.Fatalf("allowed origin: %v", err)
	}
}

func TestHealthEndpoints(t *testing.T) {
	st := newStack(t, nil)
	st.dial("h")
	get := func(path string) (int, map[string]any) {
		resp, err := http.Get(st.http.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v map[string]any
		body, _ := io.ReadAll(resp.Body)
		_ = json.Unmarshal(body, &v)
		return resp.StatusCode, v
	}
	if code, v := get("/healthz"); code != 200 || v["service"] != "websocket_service" || v["status"] != "healthy" || v["environment"] != "development" {
		t.Fatalf("/healthz %d %v", code, v)
	}
	if code, v := get("/healthz/websocket"); code != 200 || v["total_connections"] != 1.0 || v["max_connections_per_user"] != 5.0 {
		t.Fatalf("/healthz/websocket %d %v", code, v)
	}
	if code, v := get("/healthz/redis"); code != 200 || v["status"] != "healthy" || v["service"] != "redis" {
		t.Fatalf("/healthz/redis %d %v", code, v)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("/readyz %d", code)
	}
	resp, err := http.Get(st.http.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `websocket_connections_active{transport="websocket"} 1`) {
		t.Fatalf("/metrics lacks active connections:\n%.500s", body)
	}
	st.redis.Kill()
	eventually(t, 10*time.Second, "/healthz/redis 503", func() bool {
		code, v := get("/healthz/redis")
		return code == 503 && v["status"] == "unhealthy" && v["error"] != ""
	})
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("/readyz %d during a Redis outage, want 200", code)
	}
}
