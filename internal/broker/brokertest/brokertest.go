// Package brokertest is the conformance suite every broker.Broker passes.
package brokertest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
)

// Publish publishes payload on topic through the broker's backend.
type Publish func(t testing.TB, topic string, payload []byte)

// Factory returns a new, unstarted broker and a way to publish to it.
type Factory func(t testing.TB) (broker.Broker, Publish)

// Event is what the Recorder saw.
type Event struct {
	Topic   string
	Payload string
	Link    string // "up" or "down" for link events
}

// Recorder is a broker.Handler that records events on a channel.
type Recorder struct {
	Events chan Event
}

// NewRecorder returns a Recorder with a large buffer.
func NewRecorder() *Recorder { return &Recorder{Events: make(chan Event, 100000)} }

func (r *Recorder) HandleMessage(topic string, payload []byte) {
	r.Events <- Event{Topic: topic, Payload: string(payload)}
}
func (r *Recorder) HandleLinkDown([]string) { r.Events <- Event{Link: "down"} }
func (r *Recorder) HandleLinkUp([]string)   { r.Events <- Event{Link: "up"} }

// Next returns the next message event, skipping link events; it fails the
// test after timeout.
func (r *Recorder) Next(t testing.TB, timeout time.Duration) Event {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case e := <-r.Events:
			if e.Link == "" {
				return e
			}
		case <-deadline:
			t.Fatalf("no message within %s", timeout)
			return Event{}
		}
	}
}

// WaitLink waits for a link event of the given state.
func (r *Recorder) WaitLink(t testing.TB, state string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case e := <-r.Events:
			if e.Link == state {
				return
			}
		case <-deadline:
			t.Fatalf("no link %s within %s", state, timeout)
		}
	}
}

func waitReady(t testing.TB, ch <-chan struct{}, down bool) {
	t.Helper()
	if down {
		t.Fatal("Subscribe reports the link down")
	}
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("subscription not confirmed within 10s")
	}
}

// waitReady2 subscribes topic and waits for the confirmation.
func waitReady2(t testing.TB, b broker.Broker, topic string) {
	t.Helper()
	ch, down := b.Subscribe(topic)
	waitReady(t, ch, down)
}

func start(t *testing.T, f Factory) (broker.Broker, Publish, *Recorder) {
	b, pub := f(t)
	rec := NewRecorder()
	if err := b.Start(rec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	rec.WaitLink(t, "up", 10*time.Second)
	return b, pub, rec
}

// Run runs the suite.
func Run(t *testing.T, f Factory) {
	t.Run("DeliversSubscribedTopicVerbatim", func(t *testing.T) {
		b, pub, rec := start(t, f)
		waitReady2(t, b, ("alice"))
		pub(t, "alice", []byte(`{"event":"x","data":{"n":1}}`))
		if e := rec.Next(t, 5*time.Second); e.Topic != "alice" || e.Payload != `{"event":"x","data":{"n":1}}` {
			t.Fatalf("got %+v", e)
		}
	})
	t.Run("IgnoresOtherTopicsAndUnsubscribed", func(t *testing.T) {
		b, pub, rec := start(t, f)
		waitReady2(t, b, ("a"))
		waitReady2(t, b, ("gone"))
		b.Unsubscribe("gone")
		pub(t, "other", []byte(`1`))
		// Unsubscribe does not wait for the network, and with several links
		// (sharded mode) nothing orders it with later commands on other
		// nodes: publish to gone and a until a round brings only a. A topic
		// never subscribed must never arrive.
		for round := 0; ; round++ {
			pub(t, "gone", []byte(`2`))
			pub(t, "a", []byte(`3`))
			sawGone := false
			for {
				e := rec.Next(t, 5*time.Second)
				if e.Topic == "a" && e.Payload == "3" {
					break
				}
				if e.Topic != "gone" {
					t.Fatalf("got %+v, want only topic a (and gone until its unsubscribe is done)", e)
				}
				sawGone = true
			}
			if !sawGone {
				break
			}
			if round == 200 {
				t.Fatal("messages for an unsubscribed topic still arrive after 200 rounds")
			}
		}
	})
	t.Run("KeepsOrder", func(t *testing.T) {
		b, pub, rec := start(t, f)
		waitReady2(t, b, ("o"))
		for i := range 200 {
			pub(t, "o", fmt.Appendf(nil, "%d", i))
		}
		for i := range 200 {
			if e := rec.Next(t, 5*time.Second); e.Payload != fmt.Sprint(i) {
				t.Fatalf("message %d: got %q", i, e.Payload)
			}
		}
	})
	t.Run("ManyConcurrentSubscriptions", func(t *testing.T) {
		b, pub, rec := start(t, f)
		var wg sync.WaitGroup
		for i := range 1000 {
			wg.Go(func() { waitReady2(t, b, (fmt.Sprintf("u%d", i))) })
		}
		wg.Wait()
		for i := range 1000 {
			pub(t, fmt.Sprintf("u%d", i), []byte(`{}`))
		}
		seen := map[string]bool{}
		for range 1000 {
			seen[rec.Next(t, 5*time.Second).Topic] = true
		}
		if len(seen) != 1000 {
			t.Fatalf("got %d distinct topics, want 1000", len(seen))
		}
	})
	t.Run("ResubscribeAfterUnsubscribe", func(t *testing.T) {
		b, pub, rec := start(t, f)
		waitReady2(t, b, ("r"))
		b.Unsubscribe("r")
		waitReady2(t, b, ("r"))
		pub(t, "r", []byte(`"again"`))
		if e := rec.Next(t, 5*time.Second); e.Payload != `"again"` {
			t.Fatalf("got %+v", e)
		}
	})
	t.Run("CheckAndClose", func(t *testing.T) {
		b, _, _ := start(t, f)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := b.Check(ctx); err != nil {
			t.Fatalf("Check: %v", err)
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		if err := b.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	})
}
