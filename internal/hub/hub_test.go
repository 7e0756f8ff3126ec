package hub

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/metrics"
)

// fakeConn records what the hub gives it.
type fakeConn struct {
	mu    sync.Mutex
	got   []string
	links []bool
}

func (f *fakeConn) Deliver(m *Message) {
	f.mu.Lock()
	f.got = append(f.got, string(m.Payload))
	f.mu.Unlock()
}

func (f *fakeConn) LinkState(up bool) {
	f.mu.Lock()
	f.links = append(f.links, up)
	f.mu.Unlock()
}

func (f *fakeConn) Disconnect(reason string, revokedAt int64) bool {
	f.mu.Lock()
	f.got = append(f.got, "disconnect:"+reason)
	f.mu.Unlock()
	return true
}

func newHub(t testing.TB, opts Options) (*Hub, *broker.MemoryBroker) {
	b := broker.NewMemory()
	opts.Metrics = metrics.New()
	if opts.MaxConnsPerUser == 0 {
		opts.MaxConnsPerUser = 5
	}
	if opts.MaxMessageBytes == 0 {
		opts.MaxMessageBytes = 1 << 16
	}
	h := New(b, opts)
	if err := b.Start(h); err != nil {
		t.Fatal(err)
	}
	return h, b
}

func TestReferenceCountedSubscription(t *testing.T) {
	h, b := newHub(t, Options{})
	a, c := &fakeConn{}, &fakeConn{}
	ctx := context.Background()
	if err := h.Add(ctx, "u", a); err != nil {
		t.Fatal(err)
	}
	if err := h.Add(ctx, "u", c); err != nil {
		t.Fatal(err)
	}
	h.Remove("u", a)
	if !b.Subscribed("u") {
		t.Fatal("unsubscribed while a connection remains")
	}
	h.Remove("u", a) // twice: no-op
	h.Remove("u", c)
	if b.Subscribed("u") {
		t.Fatal("still subscribed after the last connection left")
	}
	if h.Count() != 0 {
		t.Fatalf("Count = %d", h.Count())
	}
}

func TestLimits(t *testing.T) {
	h, b := newHub(t, Options{MaxConnsPerUser: 1, MaxConns: 2})
	ctx := context.Background()
	if err := h.Add(ctx, "u", &fakeConn{}); err != nil {
		t.Fatal(err)
	}
	if err := h.Add(ctx, "u", &fakeConn{}); !errors.Is(err, ErrUserQuota) {
		t.Fatalf("got %v, want ErrUserQuota", err)
	}
	if err := h.Add(ctx, "v", &fakeConn{}); err != nil {
		t.Fatal(err)
	}
	if err := h.Add(ctx, "w", &fakeConn{}); !errors.Is(err, ErrServerBusy) {
		t.Fatalf("got %v, want ErrServerBusy", err)
	}
	if b.Subscribed("w") || h.Count() != 2 {
		t.Fatal("a refused connection subscribed or was counted")
	}
}

func TestFanOutValidatesOnceAndDeliversToEachConnection(t *testing.T) {
	h, b := newHub(t, Options{MaxMessageBytes: 20})
	a, c, other := &fakeConn{}, &fakeConn{}, &fakeConn{}
	ctx := context.Background()
	_ = h.Add(ctx, "u", a)
	_ = h.Add(ctx, "u", c)
	_ = h.Add(ctx, "v", other)
	b.Publish("u", []byte(`{"a":1}`))
	b.Publish("u", []byte(`not json`))
	b.Publish("u", []byte(`{"too":"long for the limit"}`))
	b.Publish("u", []byte(`[2]`))
	for _, f := range []*fakeConn{a, c} {
		if len(f.got) != 2 || f.got[0] != `{"a":1}` || f.got[1] != `[2]` {
			t.Fatalf("got %q", f.got)
		}
	}
	if len(other.got) != 0 {
		t.Fatalf("other user got %q", other.got)
	}
}

func TestLinkStateReachesEveryConnection(t *testing.T) {
	h, b := newHub(t, Options{})
	a := &fakeConn{}
	_ = h.Add(context.Background(), "u", a)
	b.SetDown(true)
	late := &fakeConn{}
	_ = h.Add(context.Background(), "late", late)
	b.SetDown(false)
	if len(a.links) != 2 || a.links[0] || !a.links[1] {
		t.Fatalf("a saw %v, want [false true]", a.links)
	}
	if len(late.links) != 2 || late.links[0] || !late.links[1] {
		t.Fatalf("a connection added while down saw %v, want [false true]", late.links)
	}
}

type nopConn struct{}

func (nopConn) Deliver(*Message)              {}
func (nopConn) LinkState(bool)                {}
func (nopConn) Disconnect(string, int64) bool { return false }

// BenchmarkFanOut measures one Redis message to a user with 5 connections:
// one Message allocation per message, none per connection.
func BenchmarkFanOut(b *testing.B) {
	h, _ := newHub(b, Options{})
	for range 5 {
		_ = h.Add(context.Background(), "u", nopConn{})
	}
	payload := []byte(`{"event":"essay_status_updated","data":{"essay_id":"e1","status":"graded"}}`)
	b.ReportAllocs()
	for b.Loop() {
		h.HandleMessage("u", payload)
	}
}

// stuckBroker confirms nothing: its link is up, but Redis never answers.
type stuckBroker struct {
	broker.Broker
	unsubscribed []string
}

func (s *stuckBroker) Subscribe(string) (<-chan struct{}, bool) { return make(chan struct{}), false }
func (s *stuckBroker) Unsubscribe(topic string)                 { s.unsubscribed = append(s.unsubscribed, topic) }

func TestAddRefusesWhenTheSubscriptionIsNotConfirmed(t *testing.T) {
	b := &stuckBroker{}
	h := New(b, Options{MaxConnsPerUser: 5, MaxMessageBytes: 1 << 16, Metrics: metrics.New()})
	h.HandleLinkUp(nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the wait has ended before any confirmation
	if err := h.Add(ctx, "u", &fakeConn{}); !errors.Is(err, ErrSubscribeTimeout) {
		t.Fatalf("Add = %v, want ErrSubscribeTimeout", err)
	}
	if h.Count() != 0 || len(b.unsubscribed) != 1 {
		t.Fatalf("count %d, unsubscribed %v: the refused connection must leave nothing behind", h.Count(), b.unsubscribed)
	}
}
