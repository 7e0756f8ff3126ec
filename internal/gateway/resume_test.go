package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"

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
	for since, reason := range map[string]string{"garbage": "invalid", ahead.String(): "ahead", "": "invalid"} {
		c := st.dialURL(st.wsURL + "/ws/v1/status/inc?since=" + url.QueryEscape(since) + "&token=" + st.token("inc", time.Hour))
		ev := c.nextEvent("resume.incomplete")
		data := ev["data"].(map[string]any)
		if data["reason"] != reason || data["since"] != since {
			t.Fatalf("since %q: %v, want reason %s", since, ev, reason)
		}
		// Then live messages only.
		live := publishWithHistory(t, pub, "inc", 1)
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
