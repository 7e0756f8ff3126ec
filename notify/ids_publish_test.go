package notify_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// TestPublishRefusesOwnTopLevelID: publish.lua inserts "id"; a payload with
// one of its own would carry two on the wire. Refused by notify before Redis
// and by the script itself (for other languages' callers).
func TestPublishRefusesOwnTopLevelID(t *testing.T) {
	srv := redistest.Start(t)
	c := historyClient(t, srv)
	pub := notify.NewHistoryPublisher(c, "ws", false, notify.HistoryOptions{})
	ctx := context.Background()
	for _, p := range []string{`{"id":"order-7","event":"e"}`, `{"event":"e","id":7}`, `{"event":"e","\u0069d":null}`} {
		if _, err := pub.Publish(ctx, "u", json.RawMessage(p), ""); !errors.Is(err, notify.ErrReservedID) {
			t.Errorf("Publish(%s) = %v, want ErrReservedID", p, err)
		}
		// The script, as a backend in another language runs it (the old argument count).
		_, err := srv.Do("EVAL", notify.PublishScript, "2", notify.HistoryKey("ws:u"), notify.MetaKey("ws:u"),
			"ws:u", p, "100", "300000", "86400000", "0")
		if err == nil || !strings.Contains(err.Error(), `"id"`) {
			t.Errorf("publish.lua with %s: %v, want a refusal naming \"id\"", p, err)
		}
	}
	if _, err := pub.Publish(ctx, "u", json.RawMessage(`{"event":"e","data":{"id":"nested is fine"}}`), ""); err != nil {
		t.Fatal(err)
	}
	if n, _ := srv.Do("LLEN", notify.HistoryKey("ws:u")); n != "1" {
		t.Fatalf("LLEN %s, want only the valid notification stored", n)
	}
}

// TestPublishScriptValidates: what the gateway would drop (not JSON, larger
// than its WEBSOCKET_MAX_MESSAGE_BYTES) is refused by publish.lua, never
// stored to be replayed.
func TestPublishScriptValidates(t *testing.T) {
	srv := redistest.Start(t)
	eval := func(payload string, extra ...string) error {
		args := append([]string{"EVAL", notify.PublishScript, "2", notify.HistoryKey("ws:v"), notify.MetaKey("ws:v"),
			"ws:v", payload, "100", "300000", "86400000", "0"}, extra...)
		_, err := srv.Do(args...)
		return err
	}
	if err := eval(`{"event":"e",`); err == nil || !strings.Contains(err.Error(), "not valid JSON") {
		t.Errorf("truncated JSON: %v", err)
	}
	big := `{"event":"e","data":"` + strings.Repeat("x", 200) + `"}`
	if err := eval(big, "100"); err == nil || !strings.Contains(err.Error(), "too large") {
		t.Errorf("over the size limit: %v", err)
	}
	if err := eval(big, "1000"); err != nil {
		t.Errorf("within the size limit: %v", err)
	}
	if n, _ := srv.Do("LLEN", notify.HistoryKey("ws:v")); n != "1" {
		t.Fatalf("LLEN %s, want only the valid notification stored", n)
	}
	pub := notify.NewHistoryPublisher(historyClient(t, srv), "ws", false, notify.HistoryOptions{MaxBytes: 100})
	if _, err := pub.Publish(context.Background(), "v", json.RawMessage(big), ""); !errors.Is(err, notify.ErrTooLarge) {
		t.Errorf("notify with MaxBytes 100: %v, want ErrTooLarge", err)
	}
	// Just under the limit before the id is inserted, over it after: the script decides.
	edge := `{"data":"` + strings.Repeat("x", 100-len(`{"data":""}`)) + `"}`
	if _, err := pub.Publish(context.Background(), "v", json.RawMessage(edge), ""); !errors.Is(err, notify.ErrTooLarge) {
		t.Errorf("notify, over the limit with the id: %v, want ErrTooLarge", err)
	}
}
