package broker_test

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/broker/brokertest"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

type historyFixture struct {
	t   *testing.T
	srv *redistest.Server
	pub *notify.HistoryPublisher
	h   *broker.History
}

func newHistoryFixture(t *testing.T, opts notify.HistoryOptions) *historyFixture {
	srv := redistest.Start(t)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	h, err := broker.NewHistory(broker.RedisOptions{Topology: broker.Topology{URL: srv.URL()}, Prefix: "ws"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return &historyFixture{t: t, srv: srv, pub: notify.NewHistoryPublisher(c, "ws", false, opts), h: h}
}

// publish sends n notifications to user and returns their ids and payloads as stored.
func (f *historyFixture) publish(user string, n int) (ids []string) {
	f.t.Helper()
	for i := range n {
		res, err := f.pub.Publish(context.Background(), user, json.RawMessage(`{"event":"e","data":{"i":`+strconv.Itoa(i)+`}}`), "")
		if err != nil {
			f.t.Fatal(err)
		}
		ids = append(ids, res.ID)
	}
	return ids
}

func (f *historyFixture) expect(user, since, reason string, entries int) broker.Replay {
	f.t.Helper()
	r := f.h.Since(context.Background(), user, since)
	if r.Reason != reason || len(r.Entries) != entries {
		f.t.Fatalf("since %q: reason %q with %d entries, want %q with %d", since, r.Reason, len(r.Entries), reason, entries)
	}
	return r
}

func TestHistoryReplayIsCompleteAndInOrder(t *testing.T) {
	f := newHistoryFixture(t, notify.HistoryOptions{})
	ids := f.publish("u", 10)
	r := f.expect("u", ids[2], "", 7)
	for i, e := range r.Entries {
		id, ok := notify.PayloadID(e)
		if !ok || id.String() != ids[3+i] {
			t.Fatalf("entry %d has id %v, want %s", i, id, ids[3+i])
		}
	}
	if r.Last.String() != ids[9] {
		t.Fatalf("last %v, want %s", r.Last, ids[9])
	}
	f.expect("u", ids[9], "", 0) // up to date
}

func TestHistoryIncompleteReasons(t *testing.T) {
	t.Run("trimmed by count", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{MaxLen: 5})
		ids := f.publish("u", 10)
		f.expect("u", ids[3], broker.ReasonTrimmed, 0) // entries 5..9 kept: 4 is gone
		f.expect("u", ids[4], "", 5)                   // the first kept entry follows since: complete
	})
	t.Run("trimmed by age", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{MaxAge: 300 * time.Millisecond, MetaTTL: time.Hour})
		ids := f.publish("u", 2)
		deadline := time.Now().Add(10 * time.Second)
		for f.h.Since(context.Background(), "u", ids[0]).Reason != broker.ReasonTrimmed { // the history expires by age
			if time.Now().After(deadline) {
				t.Fatal("history did not expire by age")
			}
			time.Sleep(20 * time.Millisecond)
		}
		more := f.publish("u", 1) // offsets continue in the same epoch
		if id, _ := notify.ParseID(more[0]); id.Offset != 3 {
			t.Fatalf("after expiry by age the next id is %s, want offset 3", more[0])
		}
		f.expect("u", ids[0], broker.ReasonTrimmed, 0)
		f.expect("u", ids[1], "", 1)
	})
	t.Run("reset", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{})
		ids := f.publish("u", 3)
		if _, err := f.srv.Do("FLUSHALL"); err != nil {
			t.Fatal(err)
		}
		f.expect("u", ids[2], broker.ReasonReset, 0) // nothing yet
		f.publish("u", 2)
		f.expect("u", ids[2], broker.ReasonReset, 0) // a new epoch
	})
	t.Run("ahead", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{})
		ids := f.publish("u", 3)
		id, _ := notify.ParseID(ids[2])
		id.Offset += 5
		f.expect("u", id.String(), broker.ReasonAhead, 0)
	})
	t.Run("rollback", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{})
		ids := f.publish("u", 3)
		// A failover lost the newest entry: the promoted replica had offset 2.
		if _, err := f.srv.Do("RPOP", notify.HistoryKey("ws:u")); err != nil {
			t.Fatal(err)
		}
		if _, err := f.srv.Do("HSET", notify.MetaKey("ws:u"), "o", "2"); err != nil {
			t.Fatal(err)
		}
		f.expect("u", ids[2], broker.ReasonAhead, 0) // before offsets are reused
		again := f.publish("u", 2)                   // offset 3 is reused by another notification
		if id, _ := notify.ParseID(again[0]); id.Offset != 3 {
			t.Fatalf("reused offset: %s", again[0])
		}
		f.expect("u", ids[2], broker.ReasonRollback, 0)
		f.expect("u", ids[1], "", 2) // an id before the loss is still good
	})
	t.Run("invalid", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{})
		for _, s := range []string{"garbage", "", "a-b-c", "e-0-c", "e--c"} {
			f.expect("u", s, broker.ReasonInvalid, 0)
		}
	})
	t.Run("unavailable", func(t *testing.T) {
		f := newHistoryFixture(t, notify.HistoryOptions{})
		ids := f.publish("u", 2)
		f.srv.Kill()
		f.expect("u", ids[0], broker.ReasonUnavailable, 0)
	})
}

// TestHistoryOnEveryTopology: publish.lua through a client of each
// topology reaches a subscribed broker live (SPUBLISH in sharded mode, from
// inside the script) with its id, and History reads the rest from the slot
// owner.
func TestHistoryOnEveryTopology(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	g := redistest.StartSentinel(t)
	for _, tc := range []struct {
		name    string
		top     broker.Topology
		sharded bool
	}{
		{"cluster classic", broker.Topology{ClusterNodes: c.Addrs()}, false},
		{"cluster sharded", broker.Topology{ClusterNodes: c.Addrs()}, true},
		{"sentinel", broker.Topology{SentinelAddrs: g.Addrs(), SentinelMaster: g.Name}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := broker.RedisOptions{Topology: tc.top, Prefix: "ws"}
			b := newStressBroker(tc.top, tc.sharded)(t)
			rec := brokertest.NewRecorder()
			if err := b.Start(rec); err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			rec.WaitLink(t, "up", 20*time.Second)
			co, err := tc.top.ClientOption()
			if err != nil {
				t.Fatal(err)
			}
			co.DisableCache = true
			client, err := rueidis.NewClient(co)
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			pub := notify.NewHistoryPublisher(client, "ws", tc.sharded, notify.HistoryOptions{})
			h, err := broker.NewHistory(opts)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			for _, user := range []string{"topo-a", "topo-b", "topo-c"} { // different slots
				ready, _ := b.Subscribe(user)
				<-ready
				var ids []string
				for i := range 3 {
					res, err := pub.Publish(context.Background(), user, json.RawMessage(`{"n":`+strconv.Itoa(i)+`}`), "")
					if err != nil {
						t.Fatal(err)
					}
					// Classic PUBLISH on a cluster counts only the subscribers
					// of the node that ran the script (the bus carries it on).
					if res.Receivers != 1 && tc.name != "cluster classic" {
						t.Fatalf("%s: %d receivers, want the one broker", user, res.Receivers)
					}
					ids = append(ids, res.ID)
				}
				for _, id := range ids {
					e := rec.Next(t, 10*time.Second)
					if got, ok := notify.PayloadID([]byte(e.Payload)); !ok || got.String() != id || e.Topic != user {
						t.Fatalf("%s: live %s %s, want id %s", user, e.Topic, e.Payload, id)
					}
				}
				r := h.Since(context.Background(), user, ids[0])
				if r.Reason != "" || len(r.Entries) != 2 || r.Last.String() != ids[2] {
					t.Fatalf("%s: replay %+v", user, r)
				}
			}
		})
	}
}

// TestHistoryUserIDsWithBraces: Redis hashes a key by its first {…}, so a
// user id with braces must not move the history keys to another slot than
// the channel (SPUBLISH inside the script would fail with CROSSSLOT), in
// either pub/sub mode; the notification arrives and resumes.
func TestHistoryUserIDsWithBraces(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	top := broker.Topology{ClusterNodes: c.Addrs()}
	users := []string{"a}b{c", "x{y}", "}{", "{}", "p{q", "r}s", "plain-user"}
	for _, sharded := range []bool{false, true} {
		t.Run(map[bool]string{false: "classic", true: "sharded"}[sharded], func(t *testing.T) {
			b := newStressBroker(top, sharded)(t)
			rec := brokertest.NewRecorder()
			if err := b.Start(rec); err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			rec.WaitLink(t, "up", 20*time.Second)
			co, err := top.ClientOption()
			if err != nil {
				t.Fatal(err)
			}
			co.DisableCache = true
			client, err := rueidis.NewClient(co)
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			pub := notify.NewHistoryPublisher(client, "ws", sharded, notify.HistoryOptions{})
			h, err := broker.NewHistory(broker.RedisOptions{Topology: top, Prefix: "ws"})
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			for _, user := range users {
				ch := notify.Channel("ws", user)
				chSlot, _ := c.KeySlot(ch)
				for _, key := range []string{notify.HistoryKey(ch), notify.MetaKey(ch)} {
					if s, _ := c.KeySlot(key); s != chSlot {
						t.Errorf("%q: key %q in slot %d, channel %q in slot %d", user, key, s, ch, chSlot)
					}
				}
				ready, _ := b.Subscribe(user)
				<-ready
				var ids []string
				for i := range 2 {
					res, err := pub.Publish(context.Background(), user, json.RawMessage(`{"n":`+strconv.Itoa(i)+`}`), "")
					if err != nil {
						t.Fatalf("%q: publish: %v", user, err)
					}
					ids = append(ids, res.ID)
				}
				for _, id := range ids {
					e := rec.Next(t, 10*time.Second)
					if got, ok := notify.PayloadID([]byte(e.Payload)); !ok || got.String() != id || e.Topic != user {
						t.Fatalf("%q: live %s %s, want id %s", user, e.Topic, e.Payload, id)
					}
				}
				r := h.Since(context.Background(), user, ids[0])
				if r.Reason != "" || len(r.Entries) != 1 || r.Last.String() != ids[1] {
					t.Fatalf("%q: replay %+v", user, r)
				}
			}
		})
	}
}
