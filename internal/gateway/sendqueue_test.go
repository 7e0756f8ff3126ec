package gateway

import (
	"testing"

	"github.com/huleedu/websocket-service/internal/hub"
)

// TestSendQueueReclaimsConsumedPrefix: a queue that always holds a few
// frames (never fully drained) keeps a backing array sized by what it holds,
// not by how many frames it has carried.
func TestSendQueueReclaimsConsumedPrefix(t *testing.T) {
	var q sendQueue
	m := &hub.Message{}
	for range 3 {
		q.push(outbound{msg: m})
	}
	for i := range 100_000 {
		q.push(outbound{msg: m})
		if o := q.pop(); o.msg != m {
			t.Fatalf("pop %d: wrong frame", i)
		}
		if q.len() != 3 {
			t.Fatalf("len %d, want 3", q.len())
		}
	}
	if c := cap(q.items); c > 16 {
		t.Fatalf("backing array holds %d slots for 3 queued frames", c)
	}
	for range 3 {
		q.pop()
	}
	if q.len() != 0 {
		t.Fatalf("len %d after draining", q.len())
	}
}

func TestSendQueueKeepsOrder(t *testing.T) {
	var q sendQueue
	msgs := make([]*hub.Message, 1000)
	next := 0
	for i := range msgs {
		msgs[i] = &hub.Message{}
		q.push(outbound{msg: msgs[i]})
		if i%3 == 0 {
			if o := q.pop(); o.msg != msgs[next] {
				t.Fatalf("frame %d out of order", next)
			}
			next++
		}
	}
	for q.len() > 0 {
		if o := q.pop(); o.msg != msgs[next] {
			t.Fatalf("frame %d out of order", next)
		}
		next++
	}
	if next != len(msgs) {
		t.Fatalf("popped %d of %d", next, len(msgs))
	}
}
