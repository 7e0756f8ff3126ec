package broker

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

var _ Broker = (*RedisBroker)(nil)

// RedisOptions configure a RedisBroker.
type RedisOptions struct {
	Topology      Topology      // where Redis is
	Prefix        string        // channel = Prefix + ":" + topic
	ProbeInterval time.Duration // quiet time before the link is probed
	ProbeTimeout  time.Duration // a probe not back by then breaks the link
	RESP2         bool          // for Redis-protocol servers without RESP3 (miniredis)
	ClientName    string        // CLIENT SETNAME of every connection, so operators can attribute them
	Logger        *slog.Logger
	Observer      Observer // may be nil
}

// Observer receives the broker's state for metrics.
type Observer interface {
	LinkUp(up bool)
	OutageEnded(d time.Duration)
	SubscriptionsActive(n int)
}

// subscribeBatch bounds the channels of one SUBSCRIBE command.
const subscribeBatch = 2000

// errProbeTimeout marks a link that is open but delivers nothing.
var errProbeTimeout = errors.New("pub/sub probe not received in time")

// RedisBroker subscribes to user channels over one dedicated pub/sub
// connection shared by every topic, plus one command connection (PUBLISH,
// PING). Its loop goroutine owns the pub/sub connection: it batches
// subscription changes, probes a quiet link, and reconnects with jittered
// backoff, re-subscribing every wanted topic before reporting the link up.
type RedisBroker struct {
	opts      RedisOptions
	clientOpt rueidis.ClientOption
	log       *slog.Logger
	obs       Observer
	probeCh   string

	client atomic.Pointer[rueidis.Client] // command connection; nil until first connect

	mu      sync.Mutex
	topics  map[string]*topicState
	dirty   map[string]struct{}
	up      bool
	lastErr error
	handler Handler // set on the loop goroutine before anything reads it

	kick     chan struct{} // cap 1: dirty topics to flush
	probeWG  sync.WaitGroup
	lastRecv atomic.Int64 // unix nanos of the last message on the link

	life loop
}

type topicState struct {
	wanted bool          // some local connection wants it
	active bool          // subscribed on the current link
	ready  chan struct{} // closed when confirmed; nil when nobody waits
}

// NewRedis parses the options; it does not connect (Start does, and keeps
// trying while Redis is down).
func NewRedis(opts RedisOptions) (*RedisBroker, error) {
	opts, co, err := opts.prepare()
	if err != nil {
		return nil, err
	}
	return &RedisBroker{
		opts:      opts,
		clientOpt: co,
		log:       opts.Logger,
		obs:       opts.Observer,
		probeCh:   "__wsgw_probe__:" + randomID(),
		topics:    map[string]*topicState{},
		dirty:     map[string]struct{}{},
		kick:      make(chan struct{}, 1),
		life:      newLoop(),
	}, nil
}

// prepare fills defaults and builds the client options shared by both
// Redis brokers.
func (opts RedisOptions) prepare() (RedisOptions, rueidis.ClientOption, error) {
	co, err := opts.Topology.ClientOption()
	if err != nil {
		return opts, co, err
	}
	co.AlwaysRESP2 = opts.RESP2
	co.ClientName = opts.ClientName
	co.BlockingPoolSize = 1 // the dedicated pub/sub connection
	// The loops own every retry: they reconnect and resubscribe. rueidis's
	// own retry of a dedicated pipeline re-sends commands it has already
	// recycled (a panic, "a command should be finished by calling Build()",
	// seen when a link is killed during a large SSUBSCRIBE pipeline).
	co.DisableRetry = true
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ProbeInterval <= 0 {
		opts.ProbeInterval = 5 * time.Second
	}
	if opts.ProbeTimeout <= 0 {
		opts.ProbeTimeout = 3 * time.Second
	}
	return opts, co, nil
}

// unavailable wraps the last link error in ErrUnavailable.
func unavailable(lastErr error) error {
	if lastErr != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, lastErr)
	}
	return ErrUnavailable
}

// Start implements Broker.
func (r *RedisBroker) Start(h Handler) error {
	return r.life.start(func() {
		r.handler = h
		r.run()
	})
}

// Subscribe implements Broker.
func (r *RedisBroker) Subscribe(topic string) (<-chan struct{}, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.topics[topic]
	if st == nil {
		st = &topicState{}
		r.topics[topic] = st
	}
	st.wanted = true
	if st.active || r.life.stopping() {
		return closedChan, !r.up
	}
	// Marked dirty even while the link is down: the loop may have taken its
	// snapshot of wanted topics for the resubscribe already, and this flag is
	// what makes it subscribe the topic once the link is up.
	r.markDirty(topic)
	if !r.up {
		return closedChan, true
	}
	if st.ready == nil {
		st.ready = make(chan struct{})
	}
	return st.ready, false
}

// Unsubscribe implements Broker.
func (r *RedisBroker) Unsubscribe(topic string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.topics[topic]
	if st == nil {
		return
	}
	st.wanted = false
	if r.up {
		r.markDirty(topic)
		return
	}
	if !st.active {
		r.forget(topic, st)
	}
}

func (r *RedisBroker) markDirty(topic string) {
	r.dirty[topic] = struct{}{}
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// forget drops a topic nobody wants; r.mu is held.
func (r *RedisBroker) forget(topic string, st *topicState) {
	if st.ready != nil {
		close(st.ready)
		st.ready = nil
	}
	delete(r.topics, topic)
}

// Check implements Broker: an error while the link is down or PING fails.
func (r *RedisBroker) Check(ctx context.Context) error {
	r.mu.Lock()
	up, lastErr := r.up, r.lastErr
	r.mu.Unlock()
	c := r.client.Load()
	if !up || c == nil {
		return unavailable(lastErr)
	}
	if err := (*c).Do(ctx, (*c).B().Ping().Build()).Error(); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// Close implements Broker.
func (r *RedisBroker) Close() error {
	if !r.life.close() {
		return nil
	}
	r.probeWG.Wait()
	if c := r.client.Load(); c != nil {
		(*c).Close()
	}
	return nil
}

// run owns the pub/sub link for the broker's lifetime.
func (r *RedisBroker) run() {
	var attempt int
	var downSince time.Time
	for {
		err := r.connected(func() {
			attempt = 0
			if !downSince.IsZero() && r.obs != nil {
				r.obs.OutageEnded(time.Since(downSince))
			}
			downSince = time.Time{}
		})
		if r.life.stopping() {
			return
		}
		if downSince.IsZero() {
			downSince = time.Now()
		}
		r.markDown(err)
		attempt++
		select {
		case <-r.life.stop:
			return
		case <-time.After(retryDelay(attempt, err)):
		}
	}
}

// backoff is capped exponential with full jitter: 50ms·2^n up to 5s.
func backoff(attempt int) time.Duration {
	ceil := 50 * time.Millisecond << min(attempt, 7)
	ceil = min(ceil, 5*time.Second)
	return ceil/2 + rand.N(ceil/2+1)
}

// connected runs one link lifetime: connect, re-subscribe everything, report
// up, then serve subscription changes and probes until the link fails.
func (r *RedisBroker) connected(onUp func()) error {
	c := r.client.Load()
	if c == nil {
		opt := r.clientOpt
		opt.InitAddress = slices.Clone(opt.InitAddress) // rueidis shuffles it in place
		nc, err := rueidis.NewClient(opt)
		if err != nil {
			return err
		}
		c = &nc
		r.client.Store(c)
	}
	client := *c
	// A restarted Redis accepts SUBSCRIBE while it loads its data set but
	// answers reads with LOADING: the link is not back (link-up starts the
	// repair, which reads history) until reads succeed. Until then it counts
	// as down: connections are held, new ones told degraded, /healthz/redis
	// fails with the reply.
	rctx, rcancel := context.WithTimeout(context.Background(), r.opts.ProbeTimeout)
	err := readable(rctx, client)
	rcancel()
	if err != nil {
		return err
	}
	dc, cancel := client.Dedicate()
	defer func() {
		dc.Close() // never hand a possibly dead connection back to the pool: that would block on it
		cancel()
	}()
	// Probe results belong to this link: a late answer to the previous link's
	// probe lands in that link's channels, which nobody reads any more.
	probeAck, probeErr := make(chan struct{}, 1), make(chan error, 1)
	wait := dc.SetPubSubHooks(rueidis.PubSubHooks{OnMessage: func(m rueidis.PubSubMessage) { r.onMessage(m, probeAck) }})

	r.mu.Lock()
	all := make([]string, 0, len(r.topics))
	for t, st := range r.topics {
		if st.wanted {
			all = append(all, t)
		}
	}
	clear(r.dirty)
	r.mu.Unlock()

	ctx, cancelCtx := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout+5*time.Second)
	cmds := append(rueidis.Commands{dc.B().Subscribe().Channel(r.probeCh).Build()}, r.subscribeCmds(dc, all)...)
	err = firstErr(dc.DoMulti(ctx, cmds...))
	cancelCtx()
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.confirm(all)
	r.up, r.lastErr = true, nil
	r.reportSubscriptions()
	r.mu.Unlock()
	onUp()
	if r.obs != nil {
		r.obs.LinkUp(true)
	}
	r.log.Info("redis pub/sub link up", "resubscribed", len(all))
	r.handler.HandleLinkUp(nil)

	r.lastRecv.Store(time.Now().UnixNano())
	tick := time.NewTicker(min(r.opts.ProbeInterval, r.opts.ProbeTimeout, 2*time.Second) / 2)
	defer tick.Stop()
	var probeDeadline time.Time // zero: no probe outstanding
	for {
		select {
		case <-r.life.stop:
			return nil
		case err := <-wait:
			if err == nil {
				err = errors.New("pub/sub connection closed")
			}
			return err
		case <-r.kick:
			if err := r.flush(dc); err != nil {
				return err
			}
		case <-probeAck:
			probeDeadline = time.Time{}
		case err := <-probeErr:
			return fmt.Errorf("probe publish: %w", err)
		case now := <-tick.C:
			switch {
			case !probeDeadline.IsZero() && now.After(probeDeadline):
				return errProbeTimeout
			case probeDeadline.IsZero() && now.Sub(time.Unix(0, r.lastRecv.Load())) >= r.opts.ProbeInterval:
				// Published off the loop: a stalled server must not stall the
				// loop, whose timer enforces the deadline.
				probeDeadline = now.Add(r.opts.ProbeTimeout)
				r.probeWG.Go(func() { r.publishProbe(client, probeErr) })
			}
		}
	}
}

func (r *RedisBroker) publishProbe(client rueidis.Client, failed chan<- error) {
	ctx, cancel := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout)
	defer cancel()
	if err := client.Do(ctx, client.B().Publish().Channel(r.probeCh).Message("probe").Build()).Error(); err != nil {
		select {
		case failed <- err:
		default:
		}
	}
}

// flush sends the subscription changes collected since the last flush.
func (r *RedisBroker) flush(dc rueidis.DedicatedClient) error {
	var subs, unsubs []string
	r.mu.Lock()
	for t := range r.dirty {
		st := r.topics[t]
		switch {
		case st == nil:
		case st.wanted && !st.active:
			subs = append(subs, t)
		case !st.wanted && st.active:
			st.active = false
			unsubs = append(unsubs, t)
			r.forget(t, st)
		case !st.wanted:
			r.forget(t, st)
		}
	}
	clear(r.dirty)
	r.mu.Unlock()
	if len(subs) == 0 && len(unsubs) == 0 {
		return nil
	}
	var cmds rueidis.Commands
	for chunk := range chunks(unsubs) {
		cmds = append(cmds, dc.B().Unsubscribe().Channel(r.channels(chunk)...).Build())
	}
	cmds = append(cmds, r.subscribeCmds(dc, subs)...)
	ctx, cancel := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout+5*time.Second)
	defer cancel()
	if err := firstErr(dc.DoMulti(ctx, cmds...)); err != nil {
		return err
	}
	r.mu.Lock()
	r.confirm(subs)
	r.reportSubscriptions()
	r.mu.Unlock()
	return nil
}

// confirm marks topics subscribed and wakes their waiters; r.mu is held.
// A topic dropped while its SUBSCRIBE was in flight is queued for removal.
func (r *RedisBroker) confirm(topics []string) {
	for _, t := range topics {
		st := r.topics[t]
		if st == nil {
			// Forgotten while in flight: the server has it, so drop it there.
			st = &topicState{}
			r.topics[t] = st
		}
		st.active = true
		if st.ready != nil {
			close(st.ready)
			st.ready = nil
		}
		if !st.wanted {
			r.markDirty(t)
		}
	}
}

func (r *RedisBroker) reportSubscriptions() {
	if r.obs == nil {
		return
	}
	n := 0
	for _, st := range r.topics {
		if st.active {
			n++
		}
	}
	r.obs.SubscriptionsActive(n)
}

// markDown records a broken link, releases waiters and tells the handler.
func (r *RedisBroker) markDown(err error) {
	r.mu.Lock()
	wasUp := r.up
	r.up, r.lastErr = false, err
	for t, st := range r.topics {
		st.active = false
		if st.ready != nil {
			close(st.ready)
			st.ready = nil
		}
		if !st.wanted {
			delete(r.topics, t)
		}
	}
	clear(r.dirty) // the next link subscribes every wanted topic
	r.reportSubscriptions()
	r.mu.Unlock()
	if wasUp {
		r.log.Warn("redis pub/sub link down", "error", err)
		if r.obs != nil {
			r.obs.LinkUp(false)
		}
		r.handler.HandleLinkDown(nil)
	} else {
		r.log.Debug("redis pub/sub connect failed", "error", err)
	}
}

func (r *RedisBroker) onMessage(m rueidis.PubSubMessage, probeAck chan<- struct{}) {
	r.lastRecv.Store(time.Now().UnixNano())
	if m.Channel == r.probeCh {
		select {
		case probeAck <- struct{}{}:
		default:
		}
		return
	}
	topic, ok := notify.UserFromChannel(r.opts.Prefix, m.Channel)
	if !ok {
		return
	}
	r.handler.HandleMessage(topic, []byte(m.Message))
}

func (r *RedisBroker) subscribeCmds(dc rueidis.DedicatedClient, topics []string) rueidis.Commands {
	var cmds rueidis.Commands
	for chunk := range chunks(topics) {
		cmds = append(cmds, dc.B().Subscribe().Channel(r.channels(chunk)...).Build())
	}
	return cmds
}

func (r *RedisBroker) channels(topics []string) []string {
	out := make([]string, len(topics))
	for i, t := range topics {
		out[i] = notify.Channel(r.opts.Prefix, t)
	}
	return out
}

// chunks yields topics in slices of at most subscribeBatch.
func chunks(topics []string) func(func([]string) bool) {
	return func(yield func([]string) bool) {
		for len(topics) > 0 {
			n := min(len(topics), subscribeBatch)
			if !yield(topics[:n]) {
				return
			}
			topics = topics[n:]
		}
	}
}

func firstErr(results []rueidis.RedisResult) error {
	for _, res := range results {
		if err := res.Error(); err != nil {
			return err
		}
	}
	return nil
}

// randomID names this instance's probe channels.
func randomID() string {
	id := make([]byte, 8)
	_, _ = crand.Read(id)
	return hex.EncodeToString(id)
}
