package gateway

import (
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkDeliverToSockets pushes messages through the hub, the sessions'
// queues, the writers and nbio to real sockets (clients discard the bytes
// without allocating). allocs/op stays at the one shared *hub.Message per
// message whatever the number of connections: nothing per connection.
func BenchmarkDeliverToSockets(b *testing.B) {
	for _, conns := range []int{1, 5, 50} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			st := newStack(b, func(c *stackConfig) {
				c.gw.MaxConnsPerUser = conns
				c.gw.SendQueueMsgs = 1 << 20
				c.gw.SendQueueBytes = 1 << 30
			})
			payload := []byte(`{"event":"essay_status_updated","data":{"essay_id":"e-1","status":"graded"}}`)
			frame := int64(len(TextFrame(payload)))
			var got atomic.Int64
			for range conns {
				c := st.dial("bench")
				raw := c.conn.UnderlyingConn()
				go func() { n, _ := io.Copy(countWriter{&got}, raw); _ = n }()
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				st.hub.HandleMessage("bench", payload)
			}
			want := int64(b.N) * int64(conns) * frame
			deadline := time.Now().Add(30 * time.Second)
			for got.Load() < want && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if got.Load() < want {
				b.Fatalf("received %d of %d bytes", got.Load(), want)
			}
		})
	}
}

type countWriter struct{ n *atomic.Int64 }

func (w countWriter) Write(p []byte) (int, error) { w.n.Add(int64(len(p))); return len(p), nil }
