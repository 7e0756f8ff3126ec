package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/huleedu/websocket-service/internal/metrics"
	"github.com/huleedu/websocket-service/notify"
)

// TestResumeFromExpiredHistoryPosition: a user's list expired (5 minutes
// idle) while its epoch and offset live on. The position the gateway sends
// then has no check; sent back as since, with nothing published meanwhile,
// it resumes complete — over WebSocket and as an SSE Last-Event-ID.
func TestResumeFromExpiredHistoryPosition(t *testing.T) {
	st := newStack(t, nil)
	ids := publishWithHistory(t, st.historyPublisher(), "idle", 2)
	if _, err := st.redis.Do("DEL", notify.HistoryKey("ws:idle")); err != nil { // what PEXPIRE does after 5 minutes
		t.Fatal(err)
	}
	c := st.dialURL(st.wsURL + "/ws/v1/status/idle?since=&token=" + st.token("idle", time.Hour))
	pos, _ := c.nextEvent("resume.position")["data"].(map[string]any)["id"].(string)
	if id, ok := notify.ParseID(pos); !ok || id.String() != pos {
		t.Fatalf("position %q of an expired history does not parse (newest id was %s)", pos, ids[1])
	}
	_ = c.conn.Close()
	eventually(t, 10*time.Second, "closed", func() bool { return st.numSub("idle") == 0 })

	r := st.dialURL(st.wsURL + "/ws/v1/status/idle?since=" + url.QueryEscape(pos) + "&token=" + st.token("idle", time.Hour))
	first := r.nextEventAny()
	if first["event"] != "resume.position" || first["data"].(map[string]any)["id"] != pos {
		t.Fatalf("resume from the emitted position %q: first frame %v, want resume.position %s", pos, first, pos)
	}
	// The same position as an event stream's id, sent back as Last-Event-ID.
	sc := st.sse("idle", http.Header{"Last-Event-ID": {pos}})
	if ev := sc.nextData(t); ev.ID != pos || !strings.Contains(ev.Data, `"resume.position"`) {
		t.Fatalf("stream resumed from %q: first event %+v, want resume.position with id %s", pos, ev, pos)
	}
	live := publishWithHistory(t, st.historyPublisher(), "idle", 1)
	if got := frameID(r.mustNext()); got != live[0] {
		t.Fatalf("live %q, want %q", got, live[0])
	}
}

// TestPlainPublishIDsAreNotHistoryIDs: notifications sent with a plain
// PUBLISH carry ids of their own; however they look, they are not taken for
// history ids: none is dropped as already seen, and a resume afterwards is
// complete from the last real history id.
func TestPlainPublishIDsAreNotHistoryIDs(t *testing.T) {
	st := newStack(t, nil)
	pub := st.historyPublisher()
	c := st.dialURL(st.wsURL + "/ws/v1/status/jobs?since=&token=" + st.token("jobs", time.Hour))
	c.nextEvent("resume.position")
	ids := publishWithHistory(t, pub, "jobs", 1)
	if got := frameID(c.mustNext()); got != ids[0] {
		t.Fatalf("got %q, want %q", got, ids[0])
	}
	plain := []string{`{"id":"job-7-done","event":"job"}`, `{"id":"job-3-done","event":"job"}`, `{"id":"job-3-done","event":"job"}`}
	for _, p := range plain {
		st.publish("jobs", p)
	}
	for i, want := range plain {
		if got := c.mustNext(); got != want {
			t.Fatalf("plain PUBLISH %d arrived as %s, want %s", i, got, want)
		}
	}
	more := publishWithHistory(t, pub, "jobs", 1)
	if got := frameID(c.mustNext()); got != more[0] {
		t.Fatalf("got %q, want %q", got, more[0])
	}
	_ = c.conn.Close()
	eventually(t, 10*time.Second, "closed", func() bool { return st.numSub("jobs") == 0 })
	missed := publishWithHistory(t, pub, "jobs", 2)
	r := st.dialURL(st.wsURL + "/ws/v1/status/jobs?since=" + url.QueryEscape(more[0]) + "&token=" + st.token("jobs", time.Hour))
	for _, want := range missed {
		if got := frameID(r.mustNext()); got != want {
			t.Fatalf("replay got %q, want %q", got, want)
		}
	}
	if pos := r.nextEventAny(); pos["event"] != "resume.position" || pos["data"].(map[string]any)["id"] != missed[1] {
		t.Fatalf("after the replay %v, want resume.position %s", pos, missed[1])
	}
}

// nextEventAny reads the next message as JSON.
func (c *client) nextEventAny() map[string]any {
	c.t.Helper()
	msg := c.mustNext()
	var v map[string]any
	if err := json.Unmarshal([]byte(msg), &v); err != nil {
		c.t.Fatalf("frame %s: %v", msg, err)
	}
	return v
}

// TestReplayDropsWhatLiveDrops: a history entry live delivery drops (larger
// than WEBSOCKET_MAX_MESSAGE_BYTES, or not JSON: written by an older
// publish.lua or by hand) is dropped on replay too, counted the same way.
func TestReplayDropsWhatLiveDrops(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.hub.MaxMessageBytes = 300 })
	pub := st.historyPublisher()
	live := st.dialURL(st.wsURL + "/ws/v1/status/val?since=&token=" + st.token("val", time.Hour))
	live.nextEvent("resume.position")
	first := publishWithHistory(t, pub, "val", 1)[0]
	if got := frameID(live.mustNext()); got != first {
		t.Fatalf("live %q, want %q", got, first)
	}
	// Offset 2: not JSON, stored as an older publish.lua (which checked only the leading "{") stored it.
	id, _ := notify.ParseID(first)
	bad := notify.ID{Epoch: id.Epoch, Offset: 2, Check: id.Check}
	badMsg := `{"id":"` + bad.String() + `","event":`
	if _, err := st.redis.Do("HSET", notify.MetaKey("ws:val"), "o", "2"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.redis.Do("RPUSH", notify.HistoryKey("ws:val"), fmt.Sprintf("2|%d|%s|%s", time.Now().UnixMilli(), bad.Check, badMsg)); err != nil {
		t.Fatal(err)
	}
	st.publish("val", badMsg)
	// Offset 3: over this gateway's 300 bytes (the publisher's limit is the default 64 KiB).
	if _, err := pub.Publish(context.Background(), "val", json.RawMessage(`{"event":"big","data":"`+strings.Repeat("x", 400)+`"}`), ""); err != nil {
		t.Fatal(err)
	}
	last := publishWithHistory(t, pub, "val", 1)[0]
	if got := frameID(live.mustNext()); got != last {
		t.Fatalf("live after two invalid entries: %q, want %q", got, last)
	}
	dropped := func() float64 {
		return testutil.ToFloat64(st.m.MessagesDropped.WithLabelValues(metrics.DropInvalidJSON)) +
			testutil.ToFloat64(st.m.MessagesDropped.WithLabelValues(metrics.DropTooLarge))
	}
	if d := dropped(); d != 2 {
		t.Fatalf("live drops counted %v, want 2", d)
	}

	r := st.dialURL(st.wsURL + "/ws/v1/status/val?since=" + url.QueryEscape(first) + "&token=" + st.token("val", time.Hour))
	if got := r.mustNext(); frameID(got) != last {
		t.Fatalf("replay sent %.80s…, want only %s (what live delivery sent)", got, last)
	}
	if pos := r.nextEventAny(); pos["event"] != "resume.position" || pos["data"].(map[string]any)["id"] != last {
		t.Fatalf("after the replay %v, want resume.position %s", pos, last)
	}
	if d := dropped(); d != 4 {
		t.Fatalf("drops counted %v after the replay, want 4", d)
	}
}

// TestLiveRollbackIsAnnounced: a failover loses the tail of a history while
// this instance's pub/sub link stays up, and publish.lua reuses the lost
// offsets. The connection had received the lost entries: the new ones at
// their places are other entries, delivered after resume.incomplete
// (reason rollback), never dropped as already seen. (That a late copy of an
// entry the connection has is still dropped, the ordering tests show.)
func TestLiveRollbackIsAnnounced(t *testing.T) {
	st := newStack(t, nil)
	pub := st.historyPublisher()
	for _, sse := range []bool{false, true} {
		user := fmt.Sprintf("rb-%v", sse)
		var next func() string
		if sse {
			s := st.sse(user, nil)
			next = func() string { return s.nextData(t).Data }
		} else {
			c := st.dialURL(st.wsURL + "/ws/v1/status/" + user + "?since=&token=" + st.token(user, time.Hour))
			next = c.mustNext
		}
		if pos := next(); !strings.Contains(pos, "resume.position") {
			t.Fatalf("first frame %s, want resume.position", pos)
		}
		before := publishWithHistory(t, pub, user, 3)
		for _, want := range before {
			if got := frameID(next()); got != want {
				t.Fatalf("live %q, want %q", got, want)
			}
		}
		// The new master lost entries 2 and 3, then its clock moves on.
		if _, err := st.redis.Do("HSET", notify.MetaKey("ws:"+user), "o", "1"); err != nil {
			t.Fatal(err)
		}
		if _, err := st.redis.Do("LTRIM", notify.HistoryKey("ws:"+user), "0", "0"); err != nil {
			t.Fatal(err)
		}
		after := publishWithHistory(t, pub, user, 2)
		var ann map[string]any
		if err := json.Unmarshal([]byte(next()), &ann); err != nil || ann["event"] != "resume.incomplete" {
			t.Fatalf("after a rollback: %v %v, want resume.incomplete", ann, err)
		}
		if d := ann["data"].(map[string]any); d["reason"] != "rollback" || d["since"] != before[2] {
			t.Fatalf("announcement %v, want reason rollback since %s", d, before[2])
		}
		for _, want := range after {
			if got := frameID(next()); got != want {
				t.Fatalf("after the rollback %q, want %q", got, want)
			}
		}
		// Then live as usual.
		more := publishWithHistory(t, pub, user, 1)
		if got := frameID(next()); got != more[0] {
			t.Fatalf("then %q, want %q", got, more[0])
		}
	}
}
