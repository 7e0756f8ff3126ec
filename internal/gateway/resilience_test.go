package gateway

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

// publisher returns a pipelining Redis client for bulk publishing.
func (st *stack) publisher() rueidis.Client {
	st.t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{st.redis.Addr()}, DisableCache: true})
	if err != nil {
		st.t.Fatal(err)
	}
	st.t.Cleanup(c.Close)
	return c
}

// reader reads a client's messages in the background.
type reader struct {
	c      *client
	mu     sync.Mutex
	msgs   []string
	closed error
	done   chan struct{}
}

func (c *client) readAll() *reader {
	r := &reader{c: c, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for {
			_ = c.conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			_, msg, err := c.conn.ReadMessage()
			r.mu.Lock()
			if err != nil {
				r.closed = err
				r.mu.Unlock()
				return
			}
			if len(msg) > 160 { // keep the test's own heap small: the prefix identifies a message
				msg = msg[:160]
			}
			r.msgs = append(r.msgs, string(msg))
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *reader) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if strings.Contains(m, substr) {
			n++
		}
	}
	return n
}

func (r *reader) err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

func TestRedisOutageDegradesAndRecovers(t *testing.T) {
	const n = 1000
	st := newStack(t, func(c *stackConfig) { c.probe = time.Second })
	readers := make([]*reader, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range n {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			readers[i] = st.dial(fmt.Sprintf("o%d", i)).readAll()
		})
	}
	wg.Wait()

	st.redis.Kill()
	for i, r := range readers {
		eventually(t, 20*time.Second, fmt.Sprintf("client %d degraded", i), func() bool { return r.count("connection.degraded") == 1 })
	}
	if got := testutil.ToFloat64(st.m.ActiveConnections.WithLabelValues("websocket")); got != n {
		t.Fatalf("%v connections open during the outage, want %d", got, n)
	}
	if err := st.redis.Restart(); err != nil {
		t.Fatal(err)
	}
	for i, r := range readers {
		eventually(t, 30*time.Second, fmt.Sprintf("client %d restored", i), func() bool { return r.count("connection.restored") == 1 })
	}
	pub := st.publisher()
	cmds := make(rueidis.Commands, n)
	for i := range n {
		cmds[i] = pub.B().Publish().Channel(notify.Channel("ws", fmt.Sprintf("o%d", i))).Message(`{"after":"restore"}`).Build()
	}
	for _, res := range pub.DoMulti(context.Background(), cmds...) {
		if v, err := res.AsInt64(); err != nil || v != 1 {
			t.Fatalf("PUBLISH after restore: %d %v (user not re-subscribed)", v, err)
		}
	}
	for i, r := range readers {
		eventually(t, 20*time.Second, fmt.Sprintf("client %d message after restore", i), func() bool { return r.count(`"after"`) == 1 })
		if r.err() != nil || r.count("connection.degraded") != 1 {
			t.Fatalf("client %d: closed=%v degraded=%d", i, r.err(), r.count("connection.degraded"))
		}
	}
	if got := testutil.ToFloat64(st.m.RedisOutages); got != 1 {
		t.Fatalf("outages metric = %v", got)
	}
}

func TestDeadLinkIsDetected(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.probe = time.Second })
	r := st.dial("p").readAll()

	t.Run("subscriber connection killed", func(t *testing.T) {
		if _, err := st.redis.Do("CLIENT", "KILL", "TYPE", "pubsub"); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "degraded", func() bool { return r.count("connection.degraded") == 1 })
		eventually(t, 10*time.Second, "restored", func() bool { return r.count("connection.restored") == 1 })
	})
	t.Run("redis paused longer than the probe timeout", func(t *testing.T) {
		st.redis.Pause()
		// >= : a loaded machine may add a spurious probe loss of its own.
		eventually(t, 10*time.Second, "degraded (probe lost)", func() bool { return r.count("connection.degraded") >= 2 })
		st.redis.Resume()
		eventually(t, 20*time.Second, "restored", func() bool { return r.count("connection.restored") >= 2 })
	})
	st.publish("p", `{"still":"delivered"}`)
	eventually(t, 10*time.Second, "delivery after recovery", func() bool { return r.count("still") == 1 })
	if r.err() != nil {
		t.Fatalf("client closed: %v", r.err())
	}
}

// dialSmallBuffer dials with a tiny receive buffer so a client that stops
// reading backs up quickly.
func (st *stack) dialSmallBuffer(user string) *client {
	d := websocket.Dialer{NetDial: func(network, addr string) (net.Conn, error) {
		nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		}}
		return nd.Dial(network, addr)
	}}
	conn, _, err := d.Dial(st.wsURL+"/ws/v1/status/"+user+"?token="+st.token(user, time.Hour), nil)
	if err != nil {
		st.t.Fatal(err)
	}
	st.t.Cleanup(func() { _ = conn.Close() })
	return &client{t: st.t, conn: conn}
}

func TestSlowConsumerIsClosedAndOthersUnaffected(t *testing.T) {
	const total = 10000
	st := newStack(t, func(c *stackConfig) { c.gw.CloseGrace = 30 * time.Second })
	slow := st.dialSmallBuffer("s")
	fast := st.dial("s").readAll()
	bystander := st.dial("b").readAll()

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	pub := st.publisher()
	payload := `"` + strings.Repeat("x", 2000) + `"`
	const batch = 100
	for start := 0; start < total; start += batch {
		// Pace by the fast connection's progress (a window of two batches),
		// as a live client would read; the slow one never reads.
		eventually(t, 60*time.Second, "fast connection keeps up", func() bool {
			if fast.err() != nil {
				t.Fatalf("fast connection closed after %d messages: %v", fast.count(`"i":`), fast.err())
			}
			return fast.count(`"i":`) >= start-batch
		})
		cmds := make(rueidis.Commands, 0, 2*batch)
		for i := start; i < start+batch; i++ {
			cmds = append(cmds,
				pub.B().Publish().Channel("ws:s").Message(fmt.Sprintf(`{"i":%d,"p":%s}`, i, payload)).Build(),
				pub.B().Publish().Channel("ws:b").Message(fmt.Sprintf(`{"i":%d}`, i)).Build())
		}
		for _, res := range pub.DoMulti(context.Background(), cmds...) {
			if err := res.Error(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Ordering, not time: the reader of Redis never waited on the slow
	// socket, so every message to the fast connection and the bystander
	// arrived, in order.
	eventually(t, 60*time.Second, "fast connection got everything", func() bool {
		if fast.err() != nil {
			t.Fatalf("fast connection closed after %d messages: %v", fast.count(`"i":`), fast.err())
		}
		return fast.count(`"i":`) == total
	})
	eventually(t, 60*time.Second, "bystander got everything", func() bool { return bystander.count(`"i":`) == total })
	for _, r := range []*reader{fast, bystander} {
		r.mu.Lock()
		for i, m := range r.msgs {
			if !strings.HasPrefix(m, fmt.Sprintf(`{"i":%d`, i)) {
				r.mu.Unlock()
				t.Fatalf("message %d out of order: %.20s", i, m)
			}
		}
		r.mu.Unlock()
	}
	eventually(t, 10*time.Second, "slow consumer closed", func() bool {
		return testutil.ToFloat64(st.m.ConnectionsClosed.WithLabelValues("websocket", "slow_consumer")) == 1
	})
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grow := int64(after.HeapInuse) - int64(before.HeapInuse); grow > 16<<20 {
		t.Fatalf("heap grew by %d MiB: the slow consumer's backlog is not bounded", grow>>20)
	}
	slow.expectClose(4002, "SLOW_CONSUMER")
	if fast.err() != nil {
		t.Fatalf("fast connection closed: %v", fast.err())
	}
}

func TestTokenExpiryAndRefresh(t *testing.T) {
	st := newStack(t, nil)
	t.Run("expired token closes with 4001", func(t *testing.T) {
		c := st.dialURL(st.wsURL + "/ws/v1/status/e?token=" + st.token("e", 2*time.Second))
		c.expectClose(4001, "TOKEN_EXPIRED")
	})
	t.Run("refresh moves the expiry", func(t *testing.T) {
		short := st.token("r", 2*time.Second)
		id, _ := st.auth.Validate(short)
		c := st.dialURL(st.wsURL + "/ws/v1/status/r?token=" + short)
		c.send(`{"type":"refresh","token":"` + st.token("r", time.Hour) + `"}`)
		ev := c.nextEvent("token.refreshed")
		exp, _ := ev["data"].(map[string]any)["expires_at"].(string)
		if at, err := time.Parse(time.RFC3339, exp); err != nil || at.Before(time.Now().Add(50*time.Minute)) {
			t.Fatalf("expires_at %q", exp)
		}
		// Past the first token's expiry (plus sweeps), the connection lives.
		eventually(t, 10*time.Second, "first token expired", func() bool { return time.Now().After(id.ExpiresAt.Add(time.Second)) })
		st.publish("r", `{"alive":true}`)
		if got := c.mustNext(); got != `{"alive":true}` {
			t.Fatalf("got %s", got)
		}
	})
	t.Run("refresh with another sub", func(t *testing.T) {
		c := st.dial("r2")
		c.send(`{"type":"refresh","token":"` + st.token("someone-else", time.Hour) + `"}`)
		c.expectClose(1008, "AUTHORIZATION_ERROR")
	})
	t.Run("refresh with a bad token", func(t *testing.T) {
		c := st.dial("r3")
		c.send(`{"type":"refresh","token":"bad"}`)
		c.expectClose(1008, "AUTHENTICATION_ERROR")
	})
}

func TestRateLimit(t *testing.T) {
	st := newStack(t, nil)
	pinger := st.dial("ping")
	for range 10 { // within the burst (20): pings are answered
		if err := pinger.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	pinger.send(`{"type":"ping"}`)
	pinger.nextEvent("pong")

	pingFlood := st.dial("pingflood") // pings spend the same budget as data frames
	for range 100 {
		if err := pingFlood.conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)); err != nil {
			break
		}
	}
	pingFlood.expectClose(4003, "RATE_LIMITED")

	flood := st.dial("flood")
	for range 40 {
		if err := flood.conn.WriteMessage(websocket.TextMessage, []byte("x")); err != nil {
			break
		}
	}
	flood.expectClose(4003, "RATE_LIMITED")
}

func TestPanicInCallbackClosesOnlyThatConnection(t *testing.T) {
	st := newStack(t, nil)
	st.gw.onText = func(b []byte) {
		if string(b) == "boom" {
			panic("test panic")
		}
	}
	other := st.dial("calm")
	c := st.dial("boom")
	c.send("boom")
	c.expectClose(1011, "INTERNAL_ERROR")
	st.publish("calm", `{"ok":1}`)
	if got := other.mustNext(); got != `{"ok":1}` {
		t.Fatalf("got %s", got)
	}
}

func TestHandshakeBound(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.MaxHandshakes = 2; c.probe = time.Minute })
	st.redis.Pause() // subscriptions now wait: handshakes stay in progress
	defer st.redis.Resume()
	started := make(chan struct{}, 2)
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() {
			started <- struct{}{}
			_, _ = st.tryDial(st.wsURL+fmt.Sprintf("/ws/v1/status/h%d?token=", i)+st.token(fmt.Sprintf("h%d", i), time.Hour), nil)
		})
	}
	<-started
	<-started
	eventually(t, 5*time.Second, "two handshakes in progress", func() bool { return len(st.gw.handshake) == 2 })
	_, err := st.tryDial(st.wsURL+"/ws/v1/status/h3?token="+st.token("h3", time.Hour), nil)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("third handshake: %v, want HTTP 503", err)
	}
	st.redis.Resume()
	wg.Wait()
}

func TestShutdownDeliversQueuedThenCloses1001(t *testing.T) {
	const n = 500
	st := newStack(t, nil)
	readers := make([]*reader, n)
	for i := range n {
		readers[i] = st.dial(fmt.Sprintf("sd%d", i)).readAll()
	}
	pub := st.publisher()
	stop := make(chan struct{})
	var pubWG sync.WaitGroup
	pubWG.Go(func() {
		for seq := 0; ; seq++ {
			select {
			case <-stop:
				return
			default:
			}
			cmds := make(rueidis.Commands, 0, n)
			for i := range n {
				cmds = append(cmds, pub.B().Publish().Channel(fmt.Sprintf("ws:sd%d", i)).Message(fmt.Sprintf(`{"seq":%d}`, seq)).Build())
			}
			pub.DoMulti(context.Background(), cmds...)
		}
	})
	eventually(t, 10*time.Second, "messages flowing", func() bool { return readers[n-1].count("seq") > 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := st.gw.CloseAll(ctx); err != nil {
		t.Fatalf("CloseAll: %v", err)
	}
	close(stop)
	pubWG.Wait()
	for i, r := range readers {
		<-r.done
		var ce *websocket.CloseError
		if err := r.err(); !asCloseError(err, &ce) || ce.Code != 1001 || !strings.Contains(ce.Text, "SERVER_SHUTDOWN") {
			t.Fatalf("client %d: %v, want 1001 SERVER_SHUTDOWN", i, err)
		}
		// What was accepted was delivered: a gap-free run of sequence numbers.
		r.mu.Lock()
		for j, m := range r.msgs {
			if m != fmt.Sprintf(`{"seq":%d}`, j) {
				r.mu.Unlock()
				t.Fatalf("client %d message %d = %s: a queued message was lost", i, j, m)
			}
		}
		r.mu.Unlock()
	}
}
