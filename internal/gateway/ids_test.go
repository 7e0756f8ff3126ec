package gateway

import (
	"encoding/json"
	"net/url"
	"testing"
	"time"

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
