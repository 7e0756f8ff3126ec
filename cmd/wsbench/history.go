package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

// trackID checks a history id against the connection's previous one:
// consecutive offsets mean nothing was missed and nothing repeated.
func (c *benchConn) trackID(data []byte) {
	if bytes.HasPrefix(data, []byte(`{"event":"resume.position","data":{"id":"`)) {
		s := data[len(`{"event":"resume.position","data":{"id":"`):]
		s = s[:max(0, bytes.IndexByte(s, '"'))]
		if string(s) == notify.EmptyPosition {
			if c.lastID.Load() == nil {
				c.lastID.Store(&notify.ID{})
			}
			return
		}
		if id, ok := notify.ParseID(string(s)); ok {
			if prev := c.lastID.Load(); prev == nil || prev.Epoch != id.Epoch || prev.Offset < id.Offset {
				c.lastID.Store(&id)
			}
		}
		return
	}
	if bytes.HasPrefix(data, []byte(`{"event":"connection.`)) {
		switch {
		case bytes.Contains(data, []byte(`"connection.degraded"`)):
			c.degraded.Store(1)
		case bytes.Contains(data, []byte(`"complete":true`)):
			c.restored.Store(1)
		case bytes.Contains(data, []byte(`"complete":false`)):
			c.restored.Store(-1)
		}
		return
	}
	id, ok := notify.PayloadID(data)
	if !ok {
		return
	}
	prev := c.lastID.Load()
	switch {
	case prev == nil || prev.Epoch == "" || prev.Epoch != id.Epoch || id.Offset == prev.Offset+1:
	case id.Offset <= prev.Offset:
		c.repeats.Add(1)
		return
	default:
		c.gaps.Add(id.Offset - prev.Offset - 1)
	}
	c.lastID.Store(&id)
}

// redial reconnects a connection the server closed, resuming from its last
// id, after a short random pause (as a client with jittered backoff would).
func (b *bench) redial(prev *benchConn) {
	for attempt := 0; !b.stopping.Load(); attempt++ {
		time.Sleep(time.Duration(50+rand.IntN(200*min(attempt+1, 10))) * time.Millisecond)
		// Like a load balancer, send it to any instance: the one that
		// closed it may be restarting.
		if c := b.dialSince(prev.index, prev, rand.IntN(len(b.urls))); c != nil {
			b.mu.Lock()
			b.conns[prev.index] = c
			b.mu.Unlock()
			b.reconnects.Add(1)
			return
		}
	}
}

// historyTotals sums the id checks over every connection.
func (b *bench) historyTotals() (gaps, repeats int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.conns {
		if c != nil {
			gaps += c.gaps.Load()
			repeats += c.repeats.Load()
		}
	}
	return gaps, repeats
}

// publishEach publishes one history message to every user (pipelined) and
// returns the time it took.
func (b *bench) publishEach(ctx context.Context, event string) time.Duration {
	start := time.Now()
	cmds := make(rueidis.Commands, 0, b.o.Users)
	for u := range b.o.Users {
		cmds = append(cmds, b.publishCmd(u, `{"event":"`+event+`","data":{}}`))
	}
	for _, res := range b.redis.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			b.fail("publish: " + err.Error())
		}
	}
	return time.Since(start)
}

// waitAll waits until cond holds for every open connection, or timeout;
// it returns how long that took and how many still fail it.
func (b *bench) waitAll(timeout time.Duration, cond func(*benchConn) bool) (time.Duration, int) {
	start := time.Now()
	for {
		missing := 0
		b.mu.Lock()
		for _, c := range b.conns {
			if c != nil && !cond(c) {
				missing++
			}
		}
		b.mu.Unlock()
		if missing == 0 || time.Since(start) > timeout {
			return time.Since(start), missing
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// offsetOf is the offset of the connection's last history id (0: none).
func offsetOf(c *benchConn) int64 {
	if id := c.lastID.Load(); id != nil {
		return id.Offset
	}
	return 0
}

// publishThroughput publishes as fast as pipelining allows for --duration,
// plain PUBLISH and then with history, to the same Redis: the cost of
// history on the publishing side.
func (b *bench) publishThroughput(ctx context.Context) (any, error) {
	if b.historySHA == "" {
		sha, err := b.redis.Do(ctx, b.redis.B().ScriptLoad().Script(notify.PublishScript).Build()).ToString()
		if err != nil {
			return nil, err
		}
		b.historySHA = sha
	}
	// Backend services publish one notification per request: 64 concurrent
	// publishers, each waiting for its reply (rueidis pipelines concurrent
	// requests on one connection), to random users.
	run := func(history bool) float64 {
		b.o.History = history
		payload := fmt.Sprintf(`{"event":"bench","data":{"p":"%s"}}`, bytes.Repeat([]byte("x"), max(0, b.o.Payload-40)))
		var mu sync.Mutex
		var n int64
		start := time.Now()
		var wg sync.WaitGroup
		for range 64 {
			wg.Go(func() {
				k := int64(0)
				for time.Since(start) < b.o.Duration && ctx.Err() == nil {
					if b.redis.Do(ctx, b.publishCmd(rand.IntN(b.o.Users), payload)).Error() != nil {
						b.fail("publish")
					}
					k++
				}
				mu.Lock()
				n += k
				mu.Unlock()
			})
		}
		wg.Wait()
		return float64(n) / time.Since(start).Seconds()
	}
	plain := run(false)
	history := run(true)
	return map[string]any{"scenario": "publish", "users": b.o.Users, "payload_bytes": b.o.Payload,
		"plain_publish_per_s": plain, "history_publish_per_s": history, "ratio": history / plain,
		"failures": b.failureMap()}, nil
}

// resumeStorm connects everyone, gives every connection a history position,
// drops them all, publishes --behind messages to every user, then reconnects
// everyone with since=<last id> and measures until each has caught up.
func (b *bench) resumeStorm(ctx context.Context) (any, error) {
	took := b.connectAll(ctx)
	fmt.Fprintf(b.log, "[resume] %d open in %.2fs\n", b.open(), took.Seconds())
	b.publishEach(ctx, "mark")
	if _, missing := b.waitAll(30*time.Second, func(c *benchConn) bool { return offsetOf(c) > 0 }); missing > 0 {
		return nil, fmt.Errorf("%d connections never received their first history message", missing)
	}
	b.mu.Lock()
	prev := append([]*benchConn(nil), b.conns...)
	b.mu.Unlock()
	b.closeAll()
	pubStart := time.Now()
	for range b.o.Behind {
		b.publishEach(ctx, "missed")
	}
	fmt.Fprintf(b.log, "[resume] published %d per user in %.2fs while disconnected\n", b.o.Behind, time.Since(pubStart).Seconds())
	want := map[*benchConn]int64{}
	for _, c := range prev {
		if c != nil {
			want[c] = offsetOf(c) + int64(b.o.Behind)
		}
	}
	start := time.Now()
	b.conns = make([]*benchConn, b.o.Conns)
	sem := make(chan struct{}, b.o.Concurrency)
	var wg sync.WaitGroup
	for _, c := range prev {
		if c == nil {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if nc := b.dialSince(c.index, c, c.index); nc != nil {
				b.mu.Lock()
				b.conns[c.index] = nc
				b.mu.Unlock()
			}
		})
	}
	wg.Wait()
	reconnect := time.Since(start)
	byIndex := map[int]int64{}
	for p, w := range want {
		byIndex[p.index] = w
	}
	caught, missing := b.waitAll(60*time.Second, func(c *benchConn) bool { return offsetOf(c) >= byIndex[c.index] })
	gaps, repeats := b.historyTotals()
	return map[string]any{"scenario": "resume", "conns": b.o.Conns, "users": b.o.Users, "behind": b.o.Behind,
		"reconnected": b.open(), "reconnect_seconds": reconnect.Seconds(), "all_caught_up_seconds": (reconnect + caught).Seconds(),
		"not_caught_up": missing, "lost": gaps, "duplicated": repeats, "failures": b.failureMap(),
		"handshake": summarize(b.handshake)}, nil
}

// repair connects everyone, gives every connection a history position,
// kills the gateways' pub/sub connections (CLIENT KILL TYPE pubsub) and at
// once publishes one message to every user: those published before the
// gateway re-subscribed reach the clients only through the repair. It
// measures until every connection has the message and connection.restored.
func (b *bench) repair(ctx context.Context) (any, error) {
	took := b.connectAll(ctx)
	fmt.Fprintf(b.log, "[repair] %d open in %.2fs\n", b.open(), took.Seconds())
	b.publishEach(ctx, "mark")
	if _, missing := b.waitAll(30*time.Second, func(c *benchConn) bool { return offsetOf(c) > 0 }); missing > 0 {
		return nil, fmt.Errorf("%d connections never received their first history message", missing)
	}
	want := map[int]int64{}
	b.mu.Lock()
	for _, c := range b.conns {
		if c != nil {
			want[c.index] = offsetOf(c) + 1
		}
	}
	b.mu.Unlock()
	start := time.Now()
	if err := b.redis.Do(ctx, b.redis.B().ClientKill().TypePubsub().Build()).Error(); err != nil {
		return nil, fmt.Errorf("CLIENT KILL TYPE pubsub: %w", err)
	}
	pub := b.publishEach(ctx, "during")
	_, missing := b.waitAll(60*time.Second, func(c *benchConn) bool {
		return offsetOf(c) >= want[c.index] && (c.degraded.Load() == 0 || c.restored.Load() != 0)
	})
	total := time.Since(start)
	gaps, repeats := b.historyTotals()
	var degraded, complete, incomplete int
	b.mu.Lock()
	for _, c := range b.conns {
		if c == nil {
			continue
		}
		if c.degraded.Load() == 1 {
			degraded++
		}
		switch c.restored.Load() {
		case 1:
			complete++
		case -1:
			incomplete++
		}
	}
	b.mu.Unlock()
	return map[string]any{"scenario": "repair", "conns": b.o.Conns, "users": b.o.Users,
		"publish_seconds": pub.Seconds(), "all_received_seconds": total.Seconds(), "not_received": missing,
		"degraded": degraded, "restored_complete": complete, "restored_incomplete": incomplete,
		"lost": gaps, "duplicated": repeats, "failures": b.failureMap()}, nil
}
