package broker

import (
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
}

func newLoop() loop { return loop{stop: make(chan struct{}), done: make(chan struct{})} }

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
