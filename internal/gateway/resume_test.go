package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// historyPublisher publishes with publish.lua to the stack's Redis.
func (st *stack) historyPublisher() *notify.HistoryPublisher {
	return notify.NewHistoryPublisher(st.publisher(), "ws", false, notify.HistoryOptions{})
}

func publishWithHistory(t *testing.T, p *notify.HistoryPublisher, user string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range n {
		res, err := p.Publish(context.Background(), user, json.RawMessage(fmt.Sprintf(`{"event":"e","data":{"i":%d}}`, i)), "")
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = res.ID
	}
	return ids
}

// frameID returns the id of a received frame, or "" (system events, plain PUBLISH).
func frameID(msg string) string {
	id, ok := notify.PayloadID([]byte(msg))
	if !ok {
		return ""
	}
	return id.String()
}

func TestResumeReplaysExactlyWhatWasMissedThenLive(t *testing.T) {
	st := newStack(t, nil)
	pub := st.historyPublisher()
	for _, path := range []string{"status", "legacy", "bearer"} {
		t.Run(path, func(t *testing.T) {
			user := "resume-" + path
			first := st.dial(user)
			seen := publishWithHistory(t, pub, user, 1)
			if got := frameID(first.mustNext()); got != seen[0] {
				t.Fatalf("live id %q, want %q", got, seen[0])
			}
			_ = first.conn.Close()
			eventually(t, 10*time.Second, "first connection gone", func() bool { return st.numSub(user) == 0 })
			missed := publishWithHistory(t, pub, user, 10)

			q := "since=" + url.QueryEscape(seen[0])
			var c *client
			var err error
			switch path {
			case "status":
				c, err = st.tryDial(st.wsURL+"/ws/v1/status/"+user+"?"+q+"&token="+st.token(user, time.Hour), nil)
			case "legacy":
				c, err = st.tryDial(st.wsURL+"/ws/?token="+st.token(user, time.Hour)+"&"+q, nil)
			case "bearer":
				c, err = st.tryDial(st.wsURL+"/ws?"+q, http.Header{"Authorization": {"Bearer " + st.token(user, time.Hour)}})
			}
			if err != nil {
				t.Fatal(err)
			}
			for i, want := range missed {
				msg := c.mustNext()
				if got := frameID(msg); got != want {
					t.Fatalf("replayed frame %d: %s, want id %s", i, msg, want)
				}
			}
			// Then where the client stands, then live.
			if pos := c.nextEvent("resume.position"); pos["data"].(map[string]any)["id"] != missed[9] {
				t.Fatalf("position %v, want %s", pos, missed[9])
			}
			live := publishWithHistory(t, pub, user, 1)
			if got := frameID(c.mustNext()); got != live[0] {
				t.Fatalf("after the replay got %q, want the live %q", got, live[0])
			}
		})
	}
}

func TestResumeIncompleteIsTheFirstFrame(t *testing.T) {
	st := newStack(t, nil)
	pub := st.historyPublisher()
	ids := publishWithHistory(t, pub, "inc", 3)
	ahead, _ := notify.ParseID(ids[2])
	ahead.Offset += 10
	newest := ids[2]
	for since, reason := range map[string]string{"garbage": "invalid", ahead.String(): "ahead", "": ""} {
		c := st.dialURL(st.wsURL + "/ws/v1/status/inc?since=" + url.QueryEscape(since) + "&token=" + st.token("inc", time.Hour))
		var first map[string]any
		if err := json.Unmarshal([]byte(c.mustNext()), &first); err != nil {
			t.Fatal(err)
		}
		data := first["data"].(map[string]any)
		switch {
		case reason == "": // since= (empty): a client that has seen nothing yet gets its position only
			if first["event"] != "resume.position" || data["id"] != newest {
				t.Fatalf("since %q: first frame %v, want resume.position %s", since, first, newest)
			}
		case first["event"] != "resume.incomplete" || data["reason"] != reason || data["since"] != since:
			t.Fatalf("since %q: first frame %v, want resume.incomplete %s", since, first, reason)
		default: // where to resume from next time
			if pos := c.nextEvent("resume.position"); pos["data"].(map[string]any)["id"] != newest {
				t.Fatalf("since %q: position %v, want %s", since, pos, newest)
			}
		}
		// Then live messages only.
		live := publishWithHistory(t, pub, "inc", 1)
		newest = live[0]
		if got := frameID(c.mustNext()); got != live[0] {
			t.Fatalf("since %q: got %q after resume.incomplete, want live %q", since, got, live[0])
		}
		_ = c.conn.Close()
		eventually(t, 10*time.Second, "closed", func() bool { return st.numSub("inc") == 0 })
	}
}

func TestPlainPublishStillDeliveredAndResumeUnaffected(t *testing.T) {
	st := newStack(t, nil)
	pub := st.historyPublisher()
	c := st.dial("old")
	ids := publishWithHistory(t, pub, "old", 1)
	st.publish("old", `{"event":"legacy","data":{}}`)
	if got := frameID(c.mustNext()); got != ids[0] {
		t.Fatalf("got %q", got)
	}
	if got := c.mustNext(); got != `{"event":"legacy","data":{}}` {
		t.Fatalf("plain PUBLISH arrived as %s", got)
	}
	_ = c.conn.Close()
	eventually(t, 10*time.Second, "closed", func() bool { return st.numSub("old") == 0 })
	more := publishWithHistory(t, pub, "old", 2)
	r := st.dialURL(st.wsURL + "/ws/v1/status/old?since=" + ids[0] + "&token=" + st.token("old", time.Hour))
	for _, want := range more {
		if got := frameID(r.mustNext()); got != want {
			t.Fatalf("replay got %q, want %q", got, want)
		}
	}
}

// ids lists the history ids a reader received, in order.
func (r *reader) ids() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, m := range r.msgs {
		if id := frameID(m); id != "" {
			out = append(out, id)
		}
	}
	return out
}

// TestRepairAfterRedisRestart: 1,000 connected clients; Redis is SIGKILLed
// and restarted; notifications published after the restart, while the
// gateway's link is still down, reach every client from history before
// connection.restored. With an append-only file (fsync always) the history
// survives and restored says complete:true; without persistence the history
// is gone (a new epoch) and it says complete:false.
func TestRepairAfterRedisRestart(t *testing.T) {
	for _, persistent := range []bool{true, false} {
		t.Run(map[bool]string{true: "appendonly", false: "no persistence"}[persistent], func(t *testing.T) {
			const n = 1000
			st := newStack(t, func(c *stackConfig) {
				c.probe = time.Second
				if persistent {
					c.redisArgs = []string{"--appendonly", "yes", "--appendfsync", "always"}
				}
			})
			readers := make([]*reader, n)
			users := make([]string, n)
			for i := range n {
				users[i] = fmt.Sprintf("rep%d", i)
				readers[i] = st.dial(users[i]).readAll()
			}
			pub := st.historyPublisher()
			var want [][]string
			for i := range n {
				want = append(want, publishWithHistory(t, pub, users[i], 1))
			}
			for i, r := range readers {
				eventually(t, 20*time.Second, fmt.Sprintf("client %d first message", i), func() bool { return len(r.ids()) == 1 })
			}
			st.redis.Kill()
			for i, r := range readers {
				eventually(t, 20*time.Second, fmt.Sprintf("client %d degraded", i), func() bool { return r.count("connection.degraded") == 1 })
			}
			if err := st.redis.Restart(); err != nil {
				t.Fatal(err)
			}
			pub = st.historyPublisher() // a fresh client: the old one may still be reconnecting
			for i := range n {
				want[i] = append(want[i], publishWithHistory(t, pub, users[i], 2)...)
			}
			complete := fmt.Sprintf(`"complete":%v`, persistent)
			for i, r := range readers {
				eventually(t, 30*time.Second, fmt.Sprintf("client %d restored", i), func() bool { return r.count("connection.restored") == 1 })
				if r.count(complete) != 1 {
					t.Fatalf("client %d: restored without %s: %v", i, complete, r.msgs)
				}
				if persistent {
					// Every message exactly once, in order (those published
					// after the link is back may follow restored).
					eventually(t, 10*time.Second, fmt.Sprintf("client %d all messages", i), func() bool { return len(r.ids()) >= 3 })
					if got := r.ids(); fmt.Sprint(got) != fmt.Sprint(want[i]) {
						t.Fatalf("client %d received %v, want %v", i, got, want[i])
					}
				}
				if r.err() != nil {
					t.Fatalf("client %d closed: %v", i, r.err())
				}
			}
		})
	}
}

// TestResumeOnEveryTopology: the resume round trip (miss 5 while away,
// reconnect with since, get exactly those, then live) through a gateway on
// a cluster (classic and sharded) and on Sentinel.
func TestResumeOnEveryTopology(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	g := redistest.StartSentinel(t)
	for _, tc := range []struct {
		name     string
		top      broker.Topology
		sharded  bool
		seeds    []string
		sentinel string
	}{
		{"cluster classic", broker.Topology{ClusterNodes: c.Addrs()}, false, c.Addrs(), ""},
		{"cluster sharded", broker.Topology{ClusterNodes: c.Addrs()}, true, c.Addrs(), ""},
		{"sentinel", broker.Topology{SentinelAddrs: g.Addrs(), SentinelMaster: g.Name}, false, g.Addrs(), g.Name},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newStack(t, func(sc *stackConfig) { sc.topology, sc.sharded = &tc.top, tc.sharded })
			pub := notify.NewHistoryPublisher(clusterPublisher(t, tc.seeds, tc.sentinel), "ws", tc.sharded, notify.HistoryOptions{})
			for _, user := range []string{"topo-a", "topo-b", "topo-c"} { // different slots
				first := st.dialURL(st.wsURL + "/ws/v1/status/" + user + "?since=&token=" + st.token(user, time.Hour))
				first.nextEvent("resume.position")
				seen := publishWithHistory(t, pub, user, 1)
				if got := frameID(first.mustNext()); got != seen[0] {
					t.Fatalf("%s: live %q, want %q", user, got, seen[0])
				}
				_ = first.conn.Close()
				eventually(t, 10*time.Second, "first connection gone", func() bool { return st.hub.Count() == 0 })
				missed := publishWithHistory(t, pub, user, 5)
				again := st.dialURL(st.wsURL + "/ws/v1/status/" + user + "?since=" + url.QueryEscape(seen[0]) + "&token=" + st.token(user, time.Hour))
				for _, want := range missed {
					if got := frameID(again.mustNext()); got != want {
						t.Fatalf("%s: replay %q, want %q", user, got, want)
					}
				}
				again.nextEvent("resume.position")
				live := publishWithHistory(t, pub, user, 1)
				if got := frameID(again.mustNext()); got != live[0] {
					t.Fatalf("%s: live after replay %q, want %q", user, got, live[0])
				}
				_ = again.conn.Close()
				eventually(t, 10*time.Second, "connection gone", func() bool { return st.hub.Count() == 0 })
			}
		})
	}
}
