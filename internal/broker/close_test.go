package broker_test

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/broker/brokertest"
	"github.com/huleedu/websocket-service/internal/redistest"
)

// TestCloseDoesNotWaitForAStalledRedis: Close returns while a subscription
// change waits on a Redis that answers nothing (SIGSTOP), instead of waiting
// out the round trip's own timeouts (see below): the
// service's shutdown must stay within SHUTDOWN_TIMEOUT, whatever Redis does.
func TestCloseDoesNotWaitForAStalledRedis(t *testing.T) {
	for _, sharded := range []bool{false, true} {
		t.Run(map[bool]string{false: "classic", true: "sharded"}[sharded], func(t *testing.T) {
			srv := redistest.Start(t)
			defer srv.Resume()
			opts := broker.RedisOptions{Topology: broker.Topology{URL: srv.URL()}, Prefix: "ws", ProbeInterval: time.Hour, ProbeTimeout: time.Hour}
			var b broker.Broker
			var err error
			if sharded {
				b, err = broker.NewShardedRedis(opts)
			} else {
				b, err = broker.NewRedis(opts)
			}
			if err != nil {
				t.Fatal(err)
			}
			rec := brokertest.NewRecorder()
			if err := b.Start(rec); err != nil {
				t.Fatal(err)
			}
			rec.WaitLink(t, "up", 20*time.Second)
			srv.Pause()
			_, _ = b.Subscribe("stalled")
			// The subscription's round trip is under way (its goroutine is
			// in DoMulti) before Close is called.
			waitStack(t, "rueidis.(*dedicatedSingleClient).DoMulti", "rueidis.(*dedicatedClusterClient).DoMulti", "(*pipe).DoMulti")
			closed := make(chan struct{})
			go func() {
				_ = b.Close()
				close(closed)
			}()
			// Unanswered, the round trip would end only when rueidis gives up
			// on the silent connection (its ConnWriteTimeout, 10 s; the old
			// Close waited 10-16 s here) or at ProbeTimeout + 5 s (an hour).
			// Closing ends it at once; 8 s leaves a loaded machine room.
			select {
			case <-closed:
			case <-time.After(8 * time.Second):
				t.Fatal("Close waited for the stalled Redis")
			}
			<-closed
		})
	}
}

// waitStack waits until some goroutine's stack holds one of the names.
func waitStack(t *testing.T, names ...string) {
	t.Helper()
	buf := make([]byte, 1<<22)
	deadline := time.Now().Add(20 * time.Second)
	for {
		stacks := string(buf[:runtime.Stack(buf, true)])
		for _, n := range names {
			if strings.Contains(stacks, n) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no goroutine in %v:\n%s", names, stacks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
