package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// ownerOnly is a notification a revoked token must never be written.
const ownerOnly = `{"event":"for_the_owner_only"}`

// sseReader reads an event stream in the background.
type sseReader struct {
	mu     sync.Mutex
	events []string
	closed error
	done   chan struct{}
}

func (c *sseClient) readAll() *sseReader {
	r := &sseReader{done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for {
			ev, err := c.next(60 * time.Second)
			r.mu.Lock()
			if err != nil {
				r.closed = err
				r.mu.Unlock()
				return
			}
			if !ev.Comment {
				r.events = append(r.events, ev.Data)
			}
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *sseReader) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if strings.Contains(e, substr) {
			n++
		}
	}
	return n
}

// closedWith returns the connection.closed event's code and error code (0
// while there is none).
func (r *sseReader) closedWith() (int, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		var v struct {
			Event string `json:"event"`
			Data  struct {
				Code      int    `json:"code"`
				ErrorCode string `json:"error_code"`
			} `json:"data"`
		}
		if json.Unmarshal([]byte(e), &v) == nil && v.Event == "connection.closed" {
			return v.Data.Code, v.Data.ErrorCode
		}
	}
	return 0, ""
}

// dialSSEToken opens a stream for user with tok; it may be refused.
func dialSSEToken(t *testing.T, st *stack, user, tok string) *sseClient {
	t.Helper()
	c, err := dialSSE(st.httpURL(), "/sse/v1/status/"+user+"?token="+tok, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.close)
	return c
}

// historyBehindProxy is a stack whose broker (pub/sub link) talks to Redis
// directly and whose History (the command connection that reads
// revocations and histories) goes through a proxy that can be cut: the
// command connection is lost while the pub/sub link stays up.
func historyBehindProxy(t *testing.T, mutate func(*stackConfig)) (*stack, *cutProxy) {
	redis := redistest.Start(t)
	proxy := newCutProxy(t, redis.Addr())
	hist, err := broker.NewHistory(broker.RedisOptions{Topology: broker.Topology{URL: "redis://" + proxy.addr()}, Prefix: "ws"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hist.Close)
	st := newStack(t, func(c *stackConfig) {
		c.redis = redis
		c.gw.History = hist
		if mutate != nil {
			mutate(c)
		}
	})
	return st, proxy
}

// TestRevokedTokenWhileCommandConnectionDown (issue 18, defect 1): the
// revocation cannot be read at the handshake (the History's connection is
// cut and new ones are refused; the pub/sub link stays up). The revoked
// token's WebSocket and stream are never written the notification published
// meanwhile, and are closed 4004 once Redis can be read; a token issued
// after the revocation gets the notification then.
func TestRevokedTokenWhileCommandConnectionDown(t *testing.T) {
	st, proxy := historyBehindProxy(t, func(c *stackConfig) { c.gw.RevocationHold = time.Hour })
	bystander := st.dial("bystander").readAll() // confirmed before the cut
	res, err := disconnecter(t, st.redis.Addr(), false).Disconnect(context.Background(), "victim",
		notify.DisconnectOptions{Reason: "password changed", Revoke: true})
	if err != nil {
		t.Fatal(err)
	}
	old := mintIAT(t, "victim", time.Unix(res.RevokedAt-60, 0))
	fresh := mintIAT(t, "victim", time.Unix(res.RevokedAt+1, 0))

	proxy.setCut(true)
	ws := st.dialURL(st.wsURL + "/ws/v1/status/victim?token=" + old).readAll()
	stream := dialSSEToken(t, st, "victim", old)
	if stream.status != 200 {
		t.Fatalf("stream refused %d %s while the revocation could not be read: want it held", stream.status, stream.body)
	}
	sse := stream.readAll()
	later := st.dialURL(st.wsURL + "/ws/v1/status/victim?token=" + fresh).readAll()
	eventually(t, 10*time.Second, "all three victim sessions registered", func() bool { return st.hub.Count() == 4 })

	st.publish("victim", ownerOnly)
	st.publish("bystander", `{"marker":1}`) // same link, same goroutine: victim's delivery is done when this arrives
	eventually(t, 10*time.Second, "marker", func() bool { return bystander.count(`"marker"`) == 1 })
	if ws.count("for_the_owner_only") > 0 || sse.count("for_the_owner_only") > 0 {
		t.Fatalf("a revoked token was written a notification while its revocation could not be read (ws %d, sse %d)",
			ws.count("for_the_owner_only"), sse.count("for_the_owner_only"))
	}

	proxy.setCut(false)
	eventually(t, 30*time.Second, "revoked WebSocket closed", func() bool { return ws.err() != nil })
	if code, ec, _ := closeOf(ws); code != 4004 || ec != "REVOKED" || ws.count("for_the_owner_only") > 0 {
		t.Fatalf("revoked WebSocket: closed %d %s after %d notifications, want 4004 REVOKED after none (%v)",
			code, ec, ws.count("for_the_owner_only"), ws.err())
	}
	eventually(t, 30*time.Second, "revoked stream closed", func() bool { code, _ := sse.closedWith(); return code != 0 })
	if code, ec := sse.closedWith(); code != 4004 || ec != "REVOKED" || sse.count("for_the_owner_only") > 0 {
		t.Fatalf("revoked stream: closed %d %s after %d notifications, want 4004 REVOKED after none",
			code, ec, sse.count("for_the_owner_only"))
	}
	eventually(t, 30*time.Second, "the token issued after the revocation gets the notification",
		func() bool { return later.count("for_the_owner_only") == 1 })
	if later.err() != nil || bystander.err() != nil {
		t.Fatalf("closed: later %v, bystander %v", later.err(), bystander.err())
	}
	for outcome, want := range map[string]float64{"held": 3, "revoked": 2, "confirmed": 1, "unchecked": 0} {
		if got := testutil.ToFloat64(st.m.RevocationChecks.WithLabelValues(outcome)); got != want {
			t.Fatalf("websocket_revocation_checks_total{outcome=%q} = %v, want %v", outcome, got, want)
		}
	}
}

// TestRevocationCheckAfterClientKill reproduces issue 18's report: only
// the History's command connection is killed (CLIENT KILL; the pub/sub
// link stays up) just before a revoked token connects. It is refused or
// closed 4004, and never written a notification, on both transports.
func TestRevocationCheckAfterClientKill(t *testing.T) {
	redis := redistest.Start(t)
	hist, err := broker.NewHistory(broker.RedisOptions{Topology: broker.Topology{URL: redis.URL()}, Prefix: "ws", ClientName: "history-under-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hist.Close)
	st := newStack(t, func(c *stackConfig) { c.redis = redis; c.gw.History = hist })
	bystander := st.dial("bystander").readAll() // dials the History's connection
	res, err := disconnecter(t, redis.Addr(), false).Disconnect(context.Background(), "victim",
		notify.DisconnectOptions{Reason: "password changed", Revoke: true})
	if err != nil {
		t.Fatal(err)
	}
	old := mintIAT(t, "victim", time.Unix(res.RevokedAt-60, 0))
	for _, transport := range []string{"ws", "sse"} {
		killHistoryConnection(t, redis, "history-under-test")
		var ws *reader
		var sse *sseReader
		if transport == "ws" {
			ws = st.dialURL(st.wsURL + "/ws/v1/status/victim?token=" + old).readAll()
		} else if c := dialSSEToken(t, st, "victim", old); c.status == 200 {
			sse = c.readAll()
		} else if c.status != 401 || !strings.Contains(c.body, "revoked") {
			t.Fatalf("stream: %d %s, want 401 token revoked", c.status, c.body)
		}
		st.publish("victim", ownerOnly)
		st.publish("bystander", `{"marker":1}`)
		switch {
		case ws != nil:
			eventually(t, 10*time.Second, "WebSocket refused or closed", func() bool { return ws.err() != nil || ws.count("for_the_owner_only") > 0 })
			if code, _, msg := closeOf(ws); ws.count("for_the_owner_only") > 0 || !(code == 4004 || code == 1008 && strings.Contains(msg, "revoked")) {
				t.Fatalf("revoked token after CLIENT KILL: %d notifications, closed %d %q (%v)", ws.count("for_the_owner_only"), code, msg, ws.err())
			}
		case sse != nil:
			eventually(t, 10*time.Second, "stream closed", func() bool {
				code, _ := sse.closedWith()
				return code != 0 || sse.count("for_the_owner_only") > 0
			})
			if code, _ := sse.closedWith(); sse.count("for_the_owner_only") > 0 || code != 4004 {
				t.Fatalf("revoked stream after CLIENT KILL: %d notifications, closed %d", sse.count("for_the_owner_only"), code)
			}
		}
	}
	if bystander.err() != nil {
		t.Fatalf("bystander closed: %v", bystander.err())
	}
}

// killHistoryConnection kills the named command connections (CLIENT KILL),
// after making sure one is open.
func killHistoryConnection(t *testing.T, redis *redistest.Server, name string) {
	t.Helper()
	var ids []string
	eventually(t, 10*time.Second, "the history's connection open", func() bool {
		lines, err := redis.DoLines("CLIENT", "LIST", "TYPE", "normal")
		if err != nil {
			t.Fatal(err)
		}
		ids = ids[:0]
		for l := range strings.SplitSeq(strings.Join(lines, "\n"), "\n") {
			if !strings.Contains(l, " name="+name+" ") {
				continue
			}
			for f := range strings.FieldsSeq(l) {
				if id, ok := strings.CutPrefix(f, "id="); ok {
					ids = append(ids, id)
				}
			}
		}
		return len(ids) > 0
	})
	for _, id := range ids {
		if _, err := redis.Do("CLIENT", "KILL", "ID", id); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRevocationDuringHandshake (issue 18, defect 2): the revocation lands
// between the handshake's check and its subscription (forced by the seam),
// so its control message reaches no instance. The handshake is refused
// (or closed 4004) and the token is never written a notification.
func TestRevocationDuringHandshake(t *testing.T) {
	redis := redistest.Start(t)
	var hookErr error
	var mu sync.Mutex
	st := newStack(t, func(c *stackConfig) {
		c.redis = redis
		c.gw.beforeSubscribe = func(user string) {
			if user != "victim" {
				return
			}
			_, err := disconnecter(t, redis.Addr(), false).Disconnect(context.Background(), "victim",
				notify.DisconnectOptions{Reason: "password changed", Revoke: true})
			mu.Lock()
			hookErr = errors.Join(hookErr, err)
			mu.Unlock()
		}
	})
	bystander := st.dial("bystander").readAll()
	old := mintIAT(t, "victim", time.Now().Add(-time.Minute))
	for _, path := range []string{"/ws/v1/status/victim?token=", "/ws/v1/status/victim?since=&token="} {
		ws := st.dialURL(st.wsURL + path + old).readAll()
		st.publish("victim", ownerOnly)
		st.publish("bystander", `{"marker":1}`)
		eventually(t, 10*time.Second, "WebSocket refused or closed", func() bool { return ws.err() != nil || ws.count("for_the_owner_only") > 0 })
		if code, _, msg := closeOf(ws); ws.count("for_the_owner_only") > 0 || !(code == 4004 || code == 1008 && strings.Contains(msg, "revoked")) {
			t.Fatalf("%s: revoked during the handshake: %d notifications, closed %d %q (%v)", path, ws.count("for_the_owner_only"), code, msg, ws.err())
		}
	}
	c := dialSSEToken(t, st, "victim", old)
	if c.status == 200 {
		sse := c.readAll()
		st.publish("victim", ownerOnly)
		eventually(t, 10*time.Second, "stream closed", func() bool {
			code, _ := sse.closedWith()
			return code != 0 || sse.count("for_the_owner_only") > 0
		})
		if code, _ := sse.closedWith(); sse.count("for_the_owner_only") > 0 || code != 4004 {
			t.Fatalf("stream revoked during the handshake: %d notifications, closed %d", sse.count("for_the_owner_only"), code)
		}
	} else if c.status != 401 || !strings.Contains(c.body, "revoked") {
		t.Fatalf("stream: %d %s, want 401 token revoked", c.status, c.body)
	}
	mu.Lock()
	defer mu.Unlock()
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	if bystander.err() != nil {
		t.Fatalf("bystander closed: %v", bystander.err())
	}
}

// TestUnconfirmedRevocationIsBounded: while the revocation stays unreadable
// past Options.RevocationHold (10 s by default), a held session is closed with 1013
// REVOCATION_UNCHECKED (the client reconnects with backoff), having been
// written no notification; the revocation metric counts each decision.
func TestUnconfirmedRevocationIsBounded(t *testing.T) {
	st, proxy := historyBehindProxy(t, func(c *stackConfig) { c.gw.RevocationHold = 200 * time.Millisecond })
	proxy.setCut(true)
	ws := st.dial("u").readAll()
	stream := dialSSEToken(t, st, "u", st.token("u", time.Hour))
	if stream.status != 200 {
		t.Fatalf("stream refused %d %s: want it held", stream.status, stream.body)
	}
	sse := stream.readAll()
	eventually(t, 10*time.Second, "both sessions registered", func() bool { return st.hub.Count() == 2 })
	st.publish("u", ownerOnly)
	eventually(t, 30*time.Second, "WebSocket closed", func() bool { return ws.err() != nil })
	if code, ec, _ := closeOf(ws); code != 1013 || ec != "REVOCATION_UNCHECKED" || ws.count("for_the_owner_only") > 0 {
		t.Fatalf("held WebSocket: closed %d %s after %d notifications (%v)", code, ec, ws.count("for_the_owner_only"), ws.err())
	}
	eventually(t, 30*time.Second, "stream closed", func() bool { code, _ := sse.closedWith(); return code != 0 })
	if code, ec := sse.closedWith(); code != 1013 || ec != "REVOCATION_UNCHECKED" || sse.count("for_the_owner_only") > 0 {
		t.Fatalf("held stream: closed %d %s after %d notifications", code, ec, sse.count("for_the_owner_only"))
	}
	for outcome, want := range map[string]float64{"held": 2, "unchecked": 2} {
		if got := testutil.ToFloat64(st.m.RevocationChecks.WithLabelValues(outcome)); got != want {
			t.Fatalf("websocket_revocation_checks_total{outcome=%q} = %v, want %v", outcome, got, want)
		}
	}
}

// TestHeldSessionShutdown: a graceful shutdown closes a session held for
// its revocation check with 1001 at once, without writing its queue.
func TestHeldSessionShutdown(t *testing.T) {
	st, proxy := historyBehindProxy(t, func(c *stackConfig) { c.gw.RevocationHold = time.Hour })
	proxy.setCut(true)
	ws := st.dial("u").readAll()
	eventually(t, 10*time.Second, "session registered", func() bool { return st.hub.Count() == 1 })
	st.publish("u", ownerOnly)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := st.gw.CloseAll(ctx); err != nil {
		t.Fatalf("CloseAll: %v (a held session never closed)", err)
	}
	eventually(t, 30*time.Second, "closed", func() bool { return ws.err() != nil })
	if code, ec, _ := closeOf(ws); code != 1001 || ec != "SERVER_SHUTDOWN" || ws.count("for_the_owner_only") > 0 {
		t.Fatalf("held session at shutdown: closed %d %s after %d notifications (%v)", code, ec, ws.count("for_the_owner_only"), ws.err())
	}
}
