package notify_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

func historyClient(t *testing.T, srv *redistest.Server) rueidis.Client {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr()}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func TestHistoryPublishInsertsIDsAndKeepsPayloadVerbatim(t *testing.T) {
	srv := redistest.Start(t)
	pub := notify.NewHistoryPublisher(historyClient(t, srv), "ws", false, notify.HistoryOptions{})
	ctx := context.Background()
	var prev notify.ID
	for i := range 3 {
		res, err := pub.Publish(ctx, "u1", json.RawMessage(fmt.Sprintf(` {"event":"e","data":{"n":%d}}`, i)), "")
		if err != nil {
			t.Fatal(err)
		}
		id, ok := notify.ParseID(res.ID)
		if !ok || id.Offset != int64(i+1) || (i > 0 && id.Epoch != prev.Epoch) {
			t.Fatalf("publish %d: id %q (previous %v)", i, res.ID, prev)
		}
		prev = id
	}
	entries, err := srv.DoLines("LRANGE", notify.HistoryKey("ws:u1"), "0", "-1")
	if err != nil || len(entries) != 3 {
		t.Fatalf("history %q, %v", entries, err)
	}
	_, stored, _ := strings.Cut(entries[2], "|")
	stored = stored[strings.Index(stored, "|{")+1:]
	want := `{"id":"` + prev.String() + `","event":"e","data":{"n":2}}`
	if stored != want {
		t.Fatalf("stored %s, want %s", stored, want)
	}
	if got, ok := notify.PayloadID([]byte(stored)); !ok || got != prev {
		t.Fatalf("PayloadID = %v %v", got, ok)
	}
	for _, k := range []string{notify.HistoryKey("ws:u1"), notify.MetaKey("ws:u1")} {
		if ttl, _ := srv.Do("PTTL", k); ttl == "-1" || ttl == "-2" {
			t.Fatalf("%s has no expiry (PTTL %s)", k, ttl)
		}
	}
	if _, err := pub.Publish(ctx, "u1", json.RawMessage(`[1]`), ""); !errors.Is(err, notify.ErrNotObject) {
		t.Fatalf("array payload: %v", err)
	}
	res, err := pub.Publish(ctx, "u1", json.RawMessage(`{}`), "")
	if err != nil || !strings.HasSuffix(strings.TrimSpace(mustLast(t, srv)), `{"id":"`+res.ID+`"}`) {
		t.Fatalf("empty object: %v", err)
	}
}

func mustLast(t *testing.T, srv *redistest.Server) string {
	t.Helper()
	v, err := srv.Do("LINDEX", notify.HistoryKey("ws:u1"), "-1")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestHistoryRetentionByCount(t *testing.T) {
	srv := redistest.Start(t)
	pub := notify.NewHistoryPublisher(historyClient(t, srv), "ws", false, notify.HistoryOptions{MaxLen: 5})
	for i := range 8 {
		if _, err := pub.Publish(context.Background(), "u", json.RawMessage(`{"n":`+strconv.Itoa(i)+`}`), ""); err != nil {
			t.Fatal(err)
		}
	}
	if n, _ := srv.Do("LLEN", notify.HistoryKey("ws:u")); n != "5" {
		t.Fatalf("LLEN %s, want 5", n)
	}
}

func TestIdempotencyKeyPublishesOnce(t *testing.T) {
	srv := redistest.Start(t)
	c := historyClient(t, srv)
	pub := notify.NewHistoryPublisher(c, "ws", false, notify.HistoryOptions{})
	ctx := context.Background()
	first, err := pub.Publish(ctx, "u", json.RawMessage(`{"event":"graded"}`), "essay-7-graded")
	if err != nil || first.Duplicate {
		t.Fatalf("first: %+v %v", first, err)
	}
	again, err := pub.Publish(ctx, "u", json.RawMessage(`{"event":"graded"}`), "essay-7-graded")
	if err != nil || !again.Duplicate || again.ID != first.ID {
		t.Fatalf("retry: %+v %v, want duplicate of %s", again, err, first.ID)
	}
	if n, _ := srv.Do("LLEN", notify.HistoryKey("ws:u")); n != "1" {
		t.Fatalf("LLEN %s after a retried publish, want 1", n)
	}
}

// TestHistoryMemoryPerUser reports Redis's own accounting for one user's
// history keys at 1 and at 100 retained notifications of ~120 bytes.
func TestHistoryMemoryPerUser(t *testing.T) {
	srv := redistest.Start(t)
	pub := notify.NewHistoryPublisher(historyClient(t, srv), "ws", false, notify.HistoryOptions{})
	payload := json.RawMessage(`{"event":"essay_status_updated","data":{"essay_id":"e-123456","status":"graded","timestamp":"2026-11-30T10:30:00Z"}}`)
	usage := func() int {
		total := 0
		for _, k := range []string{notify.HistoryKey("ws:mem"), notify.MetaKey("ws:mem")} {
			v, err := srv.Do("MEMORY", "USAGE", k)
			if err != nil {
				t.Fatal(err)
			}
			n, _ := strconv.Atoi(v)
			total += n
		}
		return total
	}
	for i := range 100 {
		if _, err := pub.Publish(context.Background(), "mem", payload, ""); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			t.Logf("Redis memory for one user, 1 notification of %d bytes retained: %d bytes", len(payload), usage())
		}
	}
	t.Logf("Redis memory for one user, 100 notifications retained: %d bytes (%d per entry)", usage(), usage()/100)
}
