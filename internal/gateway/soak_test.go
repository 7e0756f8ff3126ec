package gateway

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/rueidis"
)

func openFDs() int {
	entries, _ := os.ReadDir("/proc/self/fd")
	return len(entries)
}

// TestChurnWithoutLeaks opens and closes SOAK_CONNECTIONS connections (2,000
// by default; the soak run in docs/benchmarks.md uses 100,000) with messages
// flowing and a third of the clients vanishing with a TCP reset, then checks
// that goroutines, file descriptors, connections and Redis subscriptions
// return to their baseline.
func TestChurnWithoutLeaks(t *testing.T) {
	total := 2000
	if v, err := strconv.Atoi(os.Getenv("SOAK_CONNECTIONS")); err == nil && v > 0 {
		total = v
	}
	const users = 500
	st := newStack(t, func(c *stackConfig) { c.gw.MaxConnsPerUser = 1000 })
	runtime.GC()
	baseGoroutines, baseFDs := runtime.NumGoroutine(), openFDs()
	var baseMem runtime.MemStats
	runtime.ReadMemStats(&baseMem)

	pub := st.publisher()
	stop := make(chan struct{})
	var bg sync.WaitGroup
	bg.Go(func() { // messages keep flowing to random users
		for {
			select {
			case <-stop:
				return
			default:
			}
			cmds := make(rueidis.Commands, 0, 50)
			for range 50 {
				cmds = append(cmds, pub.B().Publish().Channel(fmt.Sprintf("ws:c%d", rand.IntN(users))).Message(`{"event":"churn"}`).Build())
			}
			pub.DoMulti(context.Background(), cmds...)
		}
	})

	var opened, resets atomic.Int64
	sem := make(chan struct{}, 100)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range total {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			user := fmt.Sprintf("c%d", i%users)
			conn, _, err := websocket.DefaultDialer.Dial(st.wsURL+"/ws/v1/status/"+user+"?token="+st.token(user, time.Hour), nil)
			if err != nil {
				t.Errorf("dial %d: %v", i, err)
				return
			}
			opened.Add(1)
			_ = conn.SetReadDeadline(time.Now().Add(time.Duration(rand.IntN(20)) * time.Millisecond))
			_, _, _ = conn.ReadMessage()
			switch i % 3 {
			case 0: // abrupt: RST, no close frame
				if tc, ok := conn.UnderlyingConn().(*net.TCPConn); ok {
					_ = tc.SetLinger(0)
				}
				resets.Add(1)
				_ = conn.UnderlyingConn().Close()
			case 1: // polite
				_ = conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
				_ = conn.Close()
			default: // FIN without a close frame
				_ = conn.Close()
			}
		})
	}
	wg.Wait()
	churn := time.Since(start)
	close(stop)
	bg.Wait()

	eventually(t, 30*time.Second, "every connection gone", func() bool { return st.hub.Count() == 0 })
	eventually(t, 30*time.Second, "no user channel subscribed", func() bool {
		chans, err := st.redis.DoLines("PUBSUB", "CHANNELS", "ws:*")
		return err == nil && len(chans) == 0
	})
	eventually(t, 30*time.Second, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= baseGoroutines+2 })
	eventually(t, 30*time.Second, "file descriptors back to baseline", func() bool { return openFDs() <= baseFDs+2 })
	runtime.GC()
	var mem runtime.MemStats
	runtime.ReadMemStats(&mem)
	t.Logf("churn: %d connections (%d reset) in %s (%.0f/s); goroutines %d→%d, fds %d→%d, heap in use %.1f→%.1f MiB",
		opened.Load(), resets.Load(), churn.Round(time.Millisecond), float64(opened.Load())/churn.Seconds(),
		baseGoroutines, runtime.NumGoroutine(), baseFDs, openFDs(), float64(baseMem.HeapInuse)/(1<<20), float64(mem.HeapInuse)/(1<<20))
}
