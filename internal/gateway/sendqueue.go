package gateway

// sendQueue is a session's FIFO of outbound frames. Popped slots are
// reclaimed: once the consumed prefix is at least half the backing array it
// is dropped by moving the rest down, so a queue that is never fully drained
// does not grow with the number of messages it has carried.
type sendQueue struct {
	items []outbound
	head  int
}

func (q *sendQueue) len() int { return len(q.items) - q.head }

func (q *sendQueue) push(o outbound) {
	if q.head > 0 && q.head >= len(q.items)/2 && len(q.items) == cap(q.items) {
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	q.items = append(q.items, o)
}

// peek returns the first frame; the queue must not be empty.
func (q *sendQueue) peek() *outbound { return &q.items[q.head] }

// pop removes the first frame; the queue must not be empty.
func (q *sendQueue) pop() outbound {
	o := q.items[q.head]
	q.items[q.head] = outbound{}
	q.head++
	return o
}

// reset empties the queue, keeping a small backing array for reuse.
func (q *sendQueue) reset() {
	if cap(q.items) > 64 {
		q.items = nil
	} else {
		clear(q.items)
		q.items = q.items[:0]
	}
	q.head = 0
}
