package gateway

import (
	"sync"
	"sync/atomic"
)

// writerPool is a fixed set of goroutines that perform every socket write.
// The broker's reading goroutine only enqueues into a session and, when the
// session is not already scheduled, appends it to its writer's run list, so
// it never waits on a socket.
type writerPool struct {
	writers []*writer
	next    atomic.Uint32
	wg      sync.WaitGroup
}

type writer struct {
	mu    sync.Mutex
	ready []*session
	wake  chan struct{}
	stop  chan struct{}
}

func newWriterPool(n int) *writerPool {
	p := &writerPool{writers: make([]*writer, n)}
	for i := range p.writers {
		w := &writer{wake: make(chan struct{}, 1), stop: make(chan struct{})}
		p.writers[i] = w
		p.wg.Go(w.run)
	}
	return p
}

// pick assigns a writer to a new session, round-robin.
func (p *writerPool) pick() *writer {
	return p.writers[int(p.next.Add(1))%len(p.writers)]
}

// close stops every writer and waits for them.
func (p *writerPool) close() {
	for _, w := range p.writers {
		close(w.stop)
	}
	p.wg.Wait()
}

// schedule queues s to run on w; the caller has set s.scheduled.
func (w *writer) schedule(s *session) {
	w.mu.Lock()
	w.ready = append(w.ready, s)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *writer) run() {
	var batch []*session
	for {
		select {
		case <-w.stop:
			return
		case <-w.wake:
		}
		for {
			w.mu.Lock()
			batch, w.ready = w.ready, batch[:0]
			w.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			for i, s := range batch {
				s.run()
				batch[i] = nil
			}
		}
	}
}
