package broker

import (
	"context"
	"sync"
)

var _ Broker = (*MemoryBroker)(nil)

// MemoryBroker delivers messages published in the same process. Its link can
// be taken down and up to exercise the handler's degraded path.
type MemoryBroker struct {
	mu      sync.Mutex
	handler Handler
	topics  map[string]struct{}
	down    bool
	closed  bool
}

// NewMemory returns an empty MemoryBroker.
func NewMemory() *MemoryBroker { return &MemoryBroker{topics: map[string]struct{}{}} }

// Start implements Broker.
func (m *MemoryBroker) Start(h Handler) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.handler = h
	h.HandleLinkUp(nil)
	return nil
}

// Subscribe implements Broker; memory subscriptions are confirmed at once.
func (m *MemoryBroker) Subscribe(topic string) (<-chan struct{}, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.topics[topic] = struct{}{}
	return closedChan, m.down
}

// Unsubscribe implements Broker.
func (m *MemoryBroker) Unsubscribe(topic string) {
	m.mu.Lock()
	delete(m.topics, topic)
	m.mu.Unlock()
}

// Check implements Broker.
func (m *MemoryBroker) Check(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.closed:
		return ErrClosed
	case m.down:
		return ErrUnavailable
	}
	return nil
}

// Close implements Broker.
func (m *MemoryBroker) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	return nil
}

// Publish delivers payload to the handler if topic is subscribed and the link
// is up, and returns the number of receivers (0 or 1), like PUBLISH.
func (m *MemoryBroker) Publish(topic string, payload []byte) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.topics[topic]; !ok || m.down || m.closed || m.handler == nil {
		return 0
	}
	m.handler.HandleMessage(topic, append([]byte(nil), payload...))
	return 1
}

// SetDown takes the link down (true) or brings it back (false).
func (m *MemoryBroker) SetDown(down bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down == down || m.handler == nil {
		m.down = down
		return
	}
	m.down = down
	if down {
		m.handler.HandleLinkDown(nil)
	} else {
		m.handler.HandleLinkUp(nil)
	}
}

// Subscribed reports whether topic is subscribed (for tests).
func (m *MemoryBroker) Subscribed(topic string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.topics[topic]
	return ok
}
