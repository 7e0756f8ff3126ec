package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/notify"
)

// bigEntries is a gap far larger than the send queue (1 MiB): 100 entries
// of 60 KiB, about 6 MiB.
const (
	bigEntries = 100
	bigSize    = 60 << 10
)

// publishBig publishes n notifications of bigSize with history.
func publishBig(t *testing.T, p *notify.HistoryPublisher, user string, n int) []string {
	t.Helper()
	pad := strings.Repeat("x", bigSize)
	ids := make([]string, n)
	for i := range n {
		res, err := p.Publish(context.Background(), user, json.RawMessage(fmt.Sprintf(`{"event":"big","data":{"i":%d,"p":"%s"}}`, i, pad)), "")
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = res.ID
	}
	return ids
}

// frames reads one transport's messages, in order, as the JSON the client
// gets (a stream's event data; its id line must match the payload's id).
type frames func() string

func wsFrames(c *client) frames { return c.mustNext }

func sseFrames(t *testing.T, c *sseClient) frames {
	return func() string {
		t.Helper()
		ev := c.nextData(t)
		if id := frameID(ev.Data); id != "" && ev.ID != id {
			t.Fatalf("event id line %q, payload id %q", ev.ID, id)
		}
		return ev.Data
	}
}

// eventOf is a system frame's event name ("" for a notification).
func eventOf(msg string) string {
	var v struct {
		Event string `json:"event"`
	}
	if frameID(msg) != "" || json.Unmarshal([]byte(msg), &v) != nil {
		return ""
	}
	return v.Event
}

// expectIDs reads len(want) notifications and checks their ids in order:
// each exactly once, no system frame in between.
func expectIDs(t *testing.T, next frames, want []string) {
	t.Helper()
	for i, w := range want {
		msg := next()
		if got := frameID(msg); got != w {
			if len(msg) > 200 {
				msg = msg[:200]
			}
			t.Fatalf("frame %d of %d: %s, want id %s", i, len(want), msg, w)
		}
	}
}

// TestResumeLargerThanTheSendQueueStreams: a resume whose gap (100 × 60
// KiB) is six times the send queue is streamed as the socket drains, over
// a WebSocket and over an event stream: every entry once, in order, then
// resume.position, then live.
func TestResumeLargerThanTheSendQueueStreams(t *testing.T) {
	st := newStack(t, nil)
	pub := notify.NewHistoryPublisher(st.publisher(), "ws", false, notify.HistoryOptions{MaxLen: 2 * bigEntries})
	const user = "big-resume"
	seen := publishBig(t, pub, user, 1)
	missed := publishBig(t, pub, user, bigEntries)
	for _, transport := range []string{"websocket", "sse"} { // not subtests: the clients fail the test itself
		func() {
			q := "?since=" + url.QueryEscape(seen[0]) + "&token=" + st.token(user, time.Hour)
			var next frames
			if transport == "websocket" {
				next = wsFrames(st.dialURL(st.wsURL + "/ws/v1/status/" + user + q))
			} else {
				c, err := dialSSE(st.httpURL(), "/sse/v1/status/"+user+q, nil)
				if err != nil || c.status != 200 {
					t.Fatalf("stream: %v %d %s", err, c.status, c.body)
				}
				t.Cleanup(c.close)
				next = sseFrames(t, c)
			}
			expectIDs(t, next, missed)
			pos := next()
			newest := missed[len(missed)-1]
			var v struct {
				Event string
				Data  struct{ ID string }
			}
			if err := json.Unmarshal([]byte(pos), &v); err != nil || v.Event != "resume.position" || v.Data.ID != newest {
				t.Fatalf("after the replay: %s, want resume.position %s", pos, newest)
			}
			live := publishWithHistory(t, pub, user, 1) // within MaxLen: the next transport resumes from seen too
			expectIDs(t, next, live)
			missed = append(missed, live...) // the next transport resumes from seen too
		}()
	}
}

// TestRepairLargerThanTheSendQueueStreams: connections that stay open
// through a Redis restart (append-only file) and missed 100 × 60 KiB get
// all of it from the repair, streamed, then connection.restored
// complete:true. The entries are published with SPUBLISH, which the
// gateway's classic subscription does not receive: they reach the
// connections only through the repair.
func TestRepairLargerThanTheSendQueueStreams(t *testing.T) {
	st := newStack(t, func(c *stackConfig) {
		c.probe = time.Second
		c.redisArgs = []string{"--appendonly", "yes", "--appendfsync", "always"}
	})
	const user = "big-repair"
	ws := st.dial(user)
	sse := st.sse(user, nil)
	transports := map[string]frames{"websocket": wsFrames(ws), "sse": sseFrames(t, sse)}
	sse.nextEvent(t, "resume.position")
	first := publishWithHistory(t, st.historyPublisher(), user, 1)
	for _, next := range transports {
		expectIDs(t, next, first)
	}
	hidden := notify.NewHistoryPublisher(st.publisher(), "ws", true, notify.HistoryOptions{MaxLen: 2 * bigEntries})
	missed := publishBig(t, hidden, user, bigEntries)
	st.redis.Kill()
	for name, next := range transports {
		if ev := eventOf(next()); ev != "connection.degraded" {
			t.Fatalf("%s: %q, want connection.degraded", name, ev)
		}
	}
	if err := st.redis.Restart(); err != nil {
		t.Fatal(err)
	}
	for name, next := range transports {
		expectIDs(t, next, missed)
		if msg := next(); eventOf(msg) != "connection.restored" || !strings.Contains(msg, `"complete":true`) {
			t.Fatalf("%s after the repair: %s, want connection.restored complete:true", name, msg)
		}
	}
	live := publishWithHistory(t, st.historyPublisher(), user, 1)
	for _, next := range transports {
		expectIDs(t, next, live)
	}
}

// sessionOfUser finds the one session of user.
func (st *stack) sessionOfUser(user string) *session {
	st.t.Helper()
	var found *session
	st.hub.Range(func(c hub.Conn) {
		if s := c.(*session); s.user == user {
			found = s
		}
	})
	if found == nil {
		st.t.Fatalf("no session of %s", user)
	}
	return found
}

// TestRepairOfAFlappedLinkWaitsForTheLastLinkUp: down → up → down before
// the repair loop gets to the session. The repair queued by the first up
// belongs to a link state that is gone: the session must not be told
// connection.restored while its link is down; the next up repairs it.
// (The link changes are reported to the session directly; Redis is paused
// meanwhile so the repair loop, reading revocations, builds its job after
// the second down.)
func TestRepairOfAFlappedLinkWaitsForTheLastLinkUp(t *testing.T) {
	st := newStack(t, nil)
	pub := st.historyPublisher()
	a, b := st.dial("flap-a"), st.dial("flap-b")
	for user, c := range map[string]*client{"flap-a": a, "flap-b": b} {
		expectIDs(t, wsFrames(c), publishWithHistory(t, pub, user, 1))
	}
	sa, sb := st.sessionOfUser("flap-a"), st.sessionOfUser("flap-b")
	st.redis.Pause()
	sa.LinkState(false)
	sa.LinkState(true)
	sb.LinkState(false)
	sb.LinkState(true)
	sa.LinkState(false)
	st.redis.Resume()
	// b's repair is done: so is whatever the loop made of a's queued one.
	if ev := eventOf(b.mustNext()); ev != "connection.degraded" {
		t.Fatalf("b: %q, want connection.degraded", ev)
	}
	if msg := b.mustNext(); !strings.Contains(msg, `"connection.restored"`) || !strings.Contains(msg, `"complete":true`) {
		t.Fatalf("b: %s, want connection.restored complete:true", msg)
	}
	held := publishWithHistory(t, pub, "flap-a", 1) // while a's link is down: held, then repaired
	sa.LinkState(true)
	var got []string
	for len(got) < 4 {
		msg := a.mustNext()
		ev := frameID(msg)
		if ev == "" {
			ev = eventOf(msg)
		}
		if ev == "connection.restored" && strings.Contains(msg, `"complete":true`) {
			ev += ":true"
		}
		got = append(got, ev)
	}
	want := []string{"connection.degraded", "connection.degraded", held[0], "connection.restored:true"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("a received %v, want %v", got, want)
	}
	after := publishWithHistory(t, pub, "flap-a", 1)
	expectIDs(t, wsFrames(a), after)
}

// TestSlowReaderOfABigReplayProgressesBeforeItIsClosed: a client that
// resumes a gap far larger than its queue and stops reading, while live
// notifications keep coming, is closed 4002 only after the replay frames
// already queued: it always gets the first ones, so its next resume starts
// further on.
func TestSlowReaderOfABigReplayProgressesBeforeItIsClosed(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.CloseGrace = 30 * time.Second })
	pub := notify.NewHistoryPublisher(st.publisher(), "ws", false, notify.HistoryOptions{MaxLen: 4 * bigEntries})
	const user = "big-slow"
	seen := publishBig(t, pub, user, 1)
	missed := publishBig(t, pub, user, bigEntries)
	slow := st.m.MessagesDropped.WithLabelValues("slow_consumer")
	before := testutil.ToFloat64(slow)
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second, NetDial: func(network, addr string) (net.Conn, error) {
		nd := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		}}
		return nd.Dial(network, addr)
	}}
	conn, _, err := d.Dial(st.wsURL+"/ws/v1/status/"+user+"?since="+url.QueryEscape(seen[0])+"&token="+st.token(user, time.Hour), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	// Not reading: live notifications pile up behind the replay.
	for i := 0; testutil.ToFloat64(slow) == before; i++ {
		if i > 10*defaultOptions().SendQueueMsgs {
			t.Fatalf("%d live notifications behind the replay and no slow consumer", i)
		}
		st.publish(user, fmt.Sprintf(`{"event":"live","data":{"i":%d}}`, i))
	}
	n := 0
	for {
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, msg, err := conn.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if !asCloseError(err, &ce) || ce.Code != 4002 {
				t.Fatalf("after %d replayed frames: %v, want close 4002", n, err)
			}
			break
		}
		if n == len(missed) { // all of it fitted the socket's buffers: live ones follow
			continue
		}
		if frameID(string(msg)) != missed[n] {
			t.Fatalf("frame %d: %.100s, want id %s", n, msg, missed[n])
		}
		n++
	}
	if n == 0 {
		t.Fatal("closed 4002 before the first replayed frame")
	}
}
