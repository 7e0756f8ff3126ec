// Package broker is the seam between the hub and the message source. A Broker
// subscribes to topics (user ids) and calls a Handler with what arrives; it
// knows nothing about WebSockets. RedisBroker is the production
// implementation, MemoryBroker a process-local one for tests and examples.
package broker

import (
	"context"
	"errors"
)

// ErrUnavailable means the broker's link is down; subscriptions are kept and
// restored when it comes back.
var ErrUnavailable = errors.New("broker unavailable")

// ErrClosed is returned after Close.
var ErrClosed = errors.New("broker closed")

// Handler receives what a Broker delivers. Calls come from the broker's own
// reading goroutine, one at a time, in arrival order, and must not block.
type Handler interface {
	// HandleMessage delivers one payload published on topic. The slice is
	// owned by the handler.
	HandleMessage(topic string, payload []byte)
	// HandleLinkDown reports that the link carrying topics broke (nil: every
	// topic): their messages may be missed until HandleLinkUp.
	HandleLinkDown(topics []string)
	// HandleLinkUp reports that the link carrying topics (nil: every topic)
	// is up and each of them is subscribed again.
	HandleLinkUp(topics []string)
}

// Broker delivers messages for the topics it is asked to subscribe.
type Broker interface {
	// Start begins delivering to h; it returns at once.
	Start(h Handler) error
	// Subscribe records interest in topic and returns a channel that is
	// closed once the subscription is confirmed (everything published after
	// that is delivered) or once the link is known to be down (the topic is
	// then subscribed on recovery). down reports that the topic's link is
	// down right now. Calls are idempotent per topic.
	Subscribe(topic string) (ready <-chan struct{}, down bool)
	// Unsubscribe drops interest in topic. It never blocks on the network.
	Unsubscribe(topic string)
	// Check reports whether the broker can reach its backend now.
	Check(ctx context.Context) error
	// Close stops delivery and waits for the broker's goroutines.
	Close() error
}

// closedChan is returned by Subscribe when no wait is needed.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()
