package broker

import (
	"context"
	"errors"
	"sync"
)

// loop is the one goroutine that owns a broker's links: started once, stopped
// once, and waited for by Close.
type loop struct {
	mu      sync.Mutex
	started bool
	closed  bool
	stop    chan struct{} // closed by close
	done    chan struct{} // closed when the goroutine has returned
	// ctx ends with close: the loop's Redis round trips use it, so close
	// never waits for a stalled server to answer (or for their timeouts,
	// seconds long, to pass) and shutdown stays within its own timeout.
	ctx    context.Context
	cancel context.CancelFunc
}

func newLoop() loop {
	ctx, cancel := context.WithCancel(context.Background())
	return loop{stop: make(chan struct{}), done: make(chan struct{}), ctx: ctx, cancel: cancel}
}

// start runs fn on the loop goroutine.
func (l *loop) start(fn func()) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.closed:
		return ErrClosed
	case l.started:
		return errors.New("broker: already started")
	}
	l.started = true
	go func() {
		defer close(l.done)
		fn()
	}()
	return nil
}

// close stops the goroutine and waits for it; only the first call reports true.
func (l *loop) close() bool {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return false
	}
	l.closed = true
	started := l.started
	l.mu.Unlock()
	close(l.stop)
	l.cancel()
	if started {
		<-l.done
	}
	return true
}

// stopping reports whether close has been called.
func (l *loop) stopping() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}
