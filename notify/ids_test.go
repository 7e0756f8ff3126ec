package notify_test

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"

	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// TestEveryEmittedIDParses: every id the service can emit — publish.lua's
// ids, the position of a history whose entries expired (no check) — parses
// back to itself, and ordinary ids a backend puts in its own payloads do not
// pass for history ids.
func TestEveryEmittedIDParses(t *testing.T) {
	srv := redistest.Start(t)
	pub := notify.NewHistoryPublisher(historyClient(t, srv), "ws", false, notify.HistoryOptions{})
	var emitted []string
	for i := range 20 {
		res, err := pub.Publish(context.Background(), "u"+strconv.Itoa(i%3), json.RawMessage(`{"event":"e"}`), "")
		if err != nil {
			t.Fatal(err)
		}
		emitted = append(emitted, res.ID)
		id, _ := notify.ParseID(res.ID)
		// The position of the same history once its list expired (broker.History.Newest).
		emitted = append(emitted, notify.ID{Epoch: id.Epoch, Offset: id.Offset}.String())
	}
	for _, s := range emitted {
		id, ok := notify.ParseID(s)
		if !ok || id.String() != s {
			t.Errorf("emitted id %q: ParseID = %+v, %v", s, id, ok)
		}
		if id.Check != "" {
			if got, ok := notify.PayloadID([]byte(`{"id":"` + s + `","event":"e"}`)); !ok || got != id {
				t.Errorf("PayloadID of %q = %+v, %v", s, got, ok)
			}
		}
	}
	if _, ok := notify.ParseID(notify.EmptyPosition); ok {
		t.Errorf("EmptyPosition %q parses as an id: it is a position of its own", notify.EmptyPosition)
	}
	for _, s := range []string{"job-7-done", "job-3-done", "order-7", "a-1-x", "e-0-c", "garbage", "",
		"hond0eonrd-42-", "hond0eonrd-+42-hond0f1x2a", "hond0eonrd-042-hond0f1x2a", "Hond0eonrd-42-hond0f1x2a",
		"0ond0eonrd-42-hond0f1x2a", "hond0eonrd-42-hond0f1x2a-x", "hoqukq2ylv-42-hnqukq2ylv" /* check a month before its epoch */} {
		if s == "hond0eonrd-42-" {
			continue // a position without check: valid
		}
		if id, ok := notify.ParseID(s); ok {
			t.Errorf("ParseID(%q) = %+v: not an id publish.lua makes", s, id)
		}
	}
	if _, ok := notify.PayloadID([]byte(`{"id":"hond0eonrd-42-","event":"e"}`)); ok {
		t.Error("PayloadID accepted an entry id without check: publish.lua always writes one")
	}
}

// FuzzParseID: whatever parses formats back to the same text, so a position
// the service emits is exactly the since it accepts.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{"hond0eonrd-42-hond0f1x2a", "hond0eonrd-42-", "job-7-done", "0", "a-1-", "zzzzzzzzzzzz-1-zzzzzzzzzzzz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, ok := notify.ParseID(s)
		if !ok {
			return
		}
		if id.String() != s {
			t.Fatalf("ParseID(%q).String() = %q", s, id.String())
		}
		if again, ok := notify.ParseID(id.String()); !ok || again != id {
			t.Fatalf("round trip of %q: %+v %v", s, again, ok)
		}
	})
}
