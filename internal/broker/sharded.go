package broker

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

var _ Broker = (*ShardedRedisBroker)(nil)

// standaloneNode is the node key when Redis is not a cluster.
const standaloneNode = "standalone"

// ShardedRedisBroker subscribes with SSUBSCRIBE, each channel on the master
// that owns its hash slot (REDIS_PUBSUB_MODE=sharded): one dedicated pub/sub
// connection per master, whatever the number of channels. Its loop owns the
// links: it follows slot moves (MOVED, sunsubscribe pushes, topology
// refresh) and node failover, reports link state per node, and probes each
// link with an SPUBLISH to a channel of its own on that node.
type ShardedRedisBroker struct {
	opts      RedisOptions
	clientOpt rueidis.ClientOption
	log       *slog.Logger
	obs       Observer
	probeBase string

	clients map[string]rueidis.Client // per node (one command connection each); owned by the loop
	links   map[string]*shardLink     // per node; owned by the loop

	mu       sync.Mutex
	topics   map[string]*shardTopic
	dirty    map[string]struct{}
	owner    []string        // slot → node address; nil until the first refresh
	upNodes  map[string]bool // nodes whose link is up: the loop's links, as Subscribe may see them
	allUp    bool
	lastErr  error
	handler  Handler
	nodes    []string    // masters serving slots, from the last refresh
	stale    atomic.Bool // topology must be refreshed
	kick     chan struct{}
	events   chan linkEvent
	life     loop
	wg       sync.WaitGroup
	nextGen  uint64
	everUp   bool
	downFrom time.Time
}

type shardTopic struct {
	wanted   bool
	node     string // node the topic is active on ("" = not active)
	ready    chan struct{}
	toldDown bool // the handler (or Subscribe's caller) was told it is down: report it up once active
}

type shardLink struct {
	node      string
	gen       uint64
	dc        rueidis.DedicatedClient
	cancel    func()
	up        bool
	attempt   int
	retryAt   time.Time
	probeCh   string
	deadline  time.Time // probe outstanding until then
	lastRecv  atomic.Int64
	probeBack atomic.Bool
}

// markDown releases the topic's waiter (it is not subscribed now) and
// records that its users are told it is down; it reports whether they must
// be told (not already). r.mu is held.
func (st *shardTopic) markDown() bool {
	if st.ready != nil {
		close(st.ready)
		st.ready = nil
	}
	if st.toldDown {
		return false
	}
	st.toldDown = true
	return true
}

type linkEvent struct {
	node string
	gen  uint64
	err  error
}

// NewShardedRedis parses the options; Start connects.
func NewShardedRedis(opts RedisOptions) (*ShardedRedisBroker, error) {
	opts, co, err := opts.prepare()
	if err != nil {
		return nil, err
	}
	return &ShardedRedisBroker{
		opts: opts, clientOpt: co, log: opts.Logger, obs: opts.Observer,
		probeBase: "__wsgw_probe__:" + randomID(),
		topics:    map[string]*shardTopic{}, dirty: map[string]struct{}{}, links: map[string]*shardLink{},
		upNodes: map[string]bool{},
		clients: map[string]rueidis.Client{},
		kick:    make(chan struct{}, 1), events: make(chan linkEvent, 16),
		life: newLoop(),
	}, nil
}

// Start implements Broker.
func (r *ShardedRedisBroker) Start(h Handler) error {
	return r.life.start(func() {
		r.handler = h
		r.run()
	})
}

// nodeOf returns the node serving topic's channel; r.mu is held.
func (r *ShardedRedisBroker) nodeOf(topic string) string {
	if r.owner == nil {
		return ""
	}
	return r.owner[Slot(notify.Channel(r.opts.Prefix, topic))]
}

// Subscribe implements Broker.
func (r *ShardedRedisBroker) Subscribe(topic string) (<-chan struct{}, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.topics[topic]
	if st == nil {
		st = &shardTopic{}
		r.topics[topic] = st
	}
	st.wanted = true
	if st.node != "" || r.life.stopping() {
		return closedChan, false
	}
	// Marked dirty even while the node's link is down: the loop may be
	// between its snapshot of the node's topics and the link coming up.
	r.markDirty(topic)
	if !r.upNodes[r.nodeOf(topic)] {
		st.toldDown = true
		return closedChan, true // subscribed when the node's link comes up
	}
	if st.ready == nil {
		st.ready = make(chan struct{})
	}
	return st.ready, false
}

// Unsubscribe implements Broker.
func (r *ShardedRedisBroker) Unsubscribe(topic string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if st := r.topics[topic]; st != nil {
		st.wanted = false
		r.markDirty(topic)
	}
}

func (r *ShardedRedisBroker) markDirty(topic string) {
	r.dirty[topic] = struct{}{}
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Check implements Broker: an error unless every node's link is up.
func (r *ShardedRedisBroker) Check(ctx context.Context) error {
	r.mu.Lock()
	allUp, lastErr := r.allUp, r.lastErr
	r.mu.Unlock()
	if !allUp {
		return unavailable(lastErr)
	}
	return nil
}

// Close implements Broker.
func (r *ShardedRedisBroker) Close() error {
	if r.life.close() {
		r.wg.Wait()
	}
	return nil
}

// run owns the client, the topology and every link.
func (r *ShardedRedisBroker) run() {
	defer func() {
		for _, l := range r.links {
			r.closeLink(l)
		}
		for _, c := range r.clients {
			c.Close()
		}
	}()
	tick := time.NewTicker(min(r.opts.ProbeInterval, r.opts.ProbeTimeout, 2*time.Second) / 2)
	defer tick.Stop()
	var attempt int
	var retryAt, lastRefresh time.Time
	for {
		if err := r.ensure(&attempt, &retryAt); err != nil {
			// Links that are up stay up: their own errors and probes judge them.
			r.mu.Lock()
			r.lastErr = err
			r.mu.Unlock()
			r.log.Debug("sharded topology refresh failed", "error", err)
		}
		r.mu.Lock()
		pending := len(r.dirty) > 0
		r.mu.Unlock()
		var soon <-chan time.Time // re-place pending topics once the topology is refreshed
		if pending && !r.stale.Load() {
			r.flush()
		} else if pending {
			soon = time.After(100 * time.Millisecond)
		}
		select {
		case <-soon: // back to ensure: refresh, then flush
		case <-r.life.stop:
			return
		case ev := <-r.events:
			if l := r.links[ev.node]; l != nil && l.gen == ev.gen {
				r.linkFailed(l, ev.err)
			}
		case <-r.kick: // back to the top, which flushes
		case now := <-tick.C:
			r.probe(now)
			if now.Sub(lastRefresh) >= r.opts.ProbeInterval {
				// Slot moves do not always come with a sunsubscribe push.
				lastRefresh = now
				r.stale.Store(true)
			}
		}
	}
}

// ensure creates the client, refreshes the topology when stale, and
// (re)connects links that are due.
func (r *ShardedRedisBroker) ensure(attempt *int, retryAt *time.Time) error {
	now := time.Now()
	if r.owner == nil || r.stale.Load() {
		if now.Before(*retryAt) {
			return nil
		}
		if err := r.refresh(); err != nil {
			*attempt++
			*retryAt = now.Add(backoff(*attempt))
			return err
		}
		*attempt = 0
		*retryAt = now.Add(100 * time.Millisecond) // refresh at most ten times a second
	}
	nodes := r.nodes
	for _, node := range nodes {
		l := r.links[node]
		if l == nil {
			l = &shardLink{node: node}
			r.links[node] = l
		}
		if l.up || now.Before(l.retryAt) {
			continue
		}
		if err := r.connect(l); err != nil {
			l.attempt++
			l.retryAt = now.Add(retryDelay(l.attempt, err))
			r.mu.Lock()
			r.lastErr = err
			r.mu.Unlock()
			r.log.Debug("sharded link connect failed", "node", node, "error", err)
			r.stale.Store(true)
		}
	}
	for node, l := range r.links { // nodes no longer masters
		if !slices.Contains(nodes, node) {
			r.closeLink(l)
			delete(r.links, node)
		}
	}
	for node, c := range r.clients {
		if !slices.Contains(nodes, node) {
			c.Close()
			delete(r.clients, node)
		}
	}
	r.mu.Lock()
	allUp := len(r.links) > 0
	for _, l := range r.links {
		allUp = allUp && l.up
	}
	changed := allUp && !r.allUp
	r.allUp = allUp
	if allUp {
		r.lastErr = nil
	}
	r.mu.Unlock()
	if changed {
		if !r.downFrom.IsZero() && r.obs != nil {
			r.obs.OutageEnded(time.Since(r.downFrom))
		}
		r.downFrom = time.Time{}
		if r.obs != nil {
			r.obs.LinkUp(true)
		}
		if !r.everUp {
			r.everUp = true
			r.handler.HandleLinkUp(nil)
		}
	}
	return nil
}

// client returns the command client of node, dialling it if needed.
func (r *ShardedRedisBroker) client(node string) (rueidis.Client, error) {
	if c := r.clients[node]; c != nil {
		return c, nil
	}
	opt := r.clientOpt
	opt.InitAddress = slices.Clone(opt.InitAddress)
	if node != standaloneNode {
		opt.InitAddress, opt.ForceSingleClient, opt.ShuffleInit = []string{node}, true, false
	}
	c, err := rueidis.NewClient(opt)
	if err != nil {
		return nil, err
	}
	r.clients[node] = c
	return c, nil
}

// refresh reads the slot owners (CLUSTER SLOTS) from a known node or a seed.
func (r *ShardedRedisBroker) refresh() error {
	ctx, cancel := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout+2*time.Second)
	defer cancel()
	candidates := slices.Concat(r.nodes, r.opts.Topology.ClusterNodes)
	if len(r.opts.Topology.ClusterNodes) == 0 {
		candidates = []string{standaloneNode}
	}
	owner := make([]string, 16384)
	var lastErr error
	for _, node := range candidates {
		c, err := r.client(node)
		if err != nil {
			lastErr = err
			continue
		}
		res := c.Do(ctx, c.B().ClusterSlots().Build())
		if err := res.Error(); err != nil {
			if strings.Contains(err.Error(), "cluster support disabled") {
				for i := range owner {
					owner[i] = standaloneNode
				}
				lastErr = nil
				break
			}
			lastErr = err
			continue
		}
		ranges, err := res.ToArray()
		if err != nil {
			lastErr = err
			continue
		}
		for _, rg := range ranges {
			v, err := rg.ToArray()
			if err != nil || len(v) < 3 {
				continue
			}
			lo, _ := v[0].AsInt64()
			hi, _ := v[1].AsInt64()
			m, _ := v[2].ToArray()
			if len(m) < 2 {
				continue
			}
			host, _ := m[0].ToString()
			port, _ := m[1].AsInt64()
			for s := lo; s <= hi && s < 16384; s++ {
				owner[s] = host + ":" + strconv.FormatInt(port, 10)
			}
		}
		lastErr = nil
		break
	}
	if lastErr != nil {
		return lastErr
	}
	r.nodes = slices.Compact(slices.Sorted(slices.Values(owner)))
	r.log.Debug("cluster topology refreshed", "masters", r.nodes)
	r.mu.Lock()
	r.owner = owner
	for t, st := range r.topics {
		switch {
		case st.node != "" && st.node != owner[Slot(notify.Channel(r.opts.Prefix, t))]:
			// Its slot moved: subscribe it on the new owner.
			r.log.Debug("topic moved to another node", "from", st.node, "to", owner[Slot(notify.Channel(r.opts.Prefix, t))])
			st.node = ""
			r.markDirty(t)
		case st.node == "" && st.wanted:
			// Not placed yet (its owner was down, or it moved): its slot may
			// now be on a node whose link is already up, whose connect() will
			// not run again to pick it up.
			r.markDirty(t)
		}
	}
	r.mu.Unlock()
	r.stale.Store(false)
	return nil
}

// connect opens the link of one node and subscribes its wanted topics.
func (r *ShardedRedisBroker) connect(l *shardLink) error {
	nodeClient, err := r.client(l.node)
	if err != nil {
		return err
	}
	// Not up while the node loads its data set (it would accept SSUBSCRIBE
	// and refuse the history reads that follow link-up): see RedisBroker.
	rctx, rcancel := context.WithTimeout(context.Background(), r.opts.ProbeTimeout)
	err = readable(rctx, nodeClient)
	rcancel()
	if err != nil {
		return err
	}
	dc, cancel := nodeClient.Dedicate()
	r.nextGen++
	l.gen, l.dc, l.cancel = r.nextGen, dc, cancel
	gen := l.gen
	wait := dc.SetPubSubHooks(rueidis.PubSubHooks{
		OnMessage:      func(m rueidis.PubSubMessage) { r.onMessage(l, m) },
		OnSubscription: func(s rueidis.PubSubSubscription) { r.onSubscription(l, s) },
	})
	r.wg.Go(func() {
		err := <-wait
		if err == nil {
			err = errors.New("pub/sub connection closed")
		}
		select {
		case r.events <- linkEvent{node: l.node, gen: gen, err: err}:
		case <-r.life.stop:
		}
	})
	r.mu.Lock()
	l.probeCh = r.probeChannel(l.node)
	var topics []string
	for t, st := range r.topics {
		if st.wanted && st.node == "" && r.nodeOf(t) == l.node {
			topics = append(topics, t)
		}
	}
	r.mu.Unlock()
	cmds := rueidis.Commands{dc.B().Ssubscribe().Channel(l.probeCh).Build()}
	for _, t := range topics {
		cmds = append(cmds, dc.B().Ssubscribe().Channel(notify.Channel(r.opts.Prefix, t)).Build())
	}
	ctx, cancelCtx := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout+5*time.Second)
	err = firstErr(dc.DoMulti(ctx, cmds...))
	cancelCtx()
	if err != nil {
		r.closeLink(l)
		return err
	}
	r.mu.Lock()
	confirmed := r.confirm(l.node, topics)
	r.report()
	r.mu.Unlock()
	r.setUp(l, true)
	l.attempt, l.deadline = 0, time.Time{}
	l.lastRecv.Store(time.Now().UnixNano())
	r.log.Info("sharded pub/sub link up", "node", l.node, "subscribed", len(topics))
	if len(confirmed) > 0 {
		r.handler.HandleLinkUp(confirmed)
	}
	return nil
}

// probeChannel finds a channel of this broker whose slot is on node; r.mu held.
func (r *ShardedRedisBroker) probeChannel(node string) string {
	for i := 0; ; i++ {
		ch := r.probeBase + ":" + strconv.Itoa(i)
		if r.owner == nil || r.owner[Slot(ch)] == node || i > 1<<20 {
			return ch
		}
	}
}

// confirm marks topics active on node and wakes their waiters; r.mu held.
// It returns the wanted topics that had been reported down: the handler must
// now hear they are up.
func (r *ShardedRedisBroker) confirm(node string, topics []string) []string {
	var up []string
	for _, t := range topics {
		st := r.topics[t]
		if st == nil {
			st = &shardTopic{}
			r.topics[t] = st
		}
		st.node = node
		if st.ready != nil {
			close(st.ready)
			st.ready = nil
		}
		switch {
		case !st.wanted:
			r.markDirty(t)
		case st.toldDown:
			st.toldDown = false
			up = append(up, t)
		}
	}
	return up
}

func (r *ShardedRedisBroker) report() {
	if r.obs == nil {
		return
	}
	n := 0
	for _, st := range r.topics {
		if st.node != "" {
			n++
		}
	}
	r.obs.SubscriptionsActive(n)
}

// flush sends the subscription changes, per node, over the links that are up.
func (r *ShardedRedisBroker) flush() {
	subs, unsubs := map[string][]string{}, map[string][]string{}
	var down []string // wanted, not placed, and their owner's link is down
	r.mu.Lock()
	for t := range r.dirty {
		st := r.topics[t]
		switch {
		case st == nil:
		case st.wanted && st.node == "":
			node := r.nodeOf(t)
			if l := r.links[node]; l != nil && l.up {
				subs[node] = append(subs[node], t)
			} else if st.markDown() { // subscribed by connect() when the node's link is back
				down = append(down, t)
			}
		case !st.wanted && st.node != "":
			unsubs[st.node] = append(unsubs[st.node], t)
			delete(r.topics, t)
		case !st.wanted:
			if st.ready != nil {
				close(st.ready)
			}
			delete(r.topics, t)
		}
	}
	clear(r.dirty)
	r.mu.Unlock()
	if len(down) > 0 {
		// Their connections may believe they are subscribed (a slot moved,
		// or a waiter was released): say they are not, until connect()
		// reports them up.
		r.handler.HandleLinkDown(down)
	}
	for node, l := range r.links {
		if !l.up || (len(subs[node]) == 0 && len(unsubs[node]) == 0) {
			continue
		}
		var cmds rueidis.Commands
		for _, t := range unsubs[node] {
			cmds = append(cmds, l.dc.B().Sunsubscribe().Channel(notify.Channel(r.opts.Prefix, t)).Build())
		}
		for _, t := range subs[node] {
			cmds = append(cmds, l.dc.B().Ssubscribe().Channel(notify.Channel(r.opts.Prefix, t)).Build())
		}
		ctx, cancel := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout+5*time.Second)
		results := l.dc.DoMulti(ctx, cmds...)
		cancel()
		var ok []string
		var linkErr error
		for _, res := range results[:len(unsubs[node])] {
			if err := res.Error(); err != nil && linkErr == nil && !isRedirect(err) {
				linkErr = err
			}
		}
		for i, res := range results[len(unsubs[node]):] {
			if linkErr != nil {
				break
			}
			if err := res.Error(); err != nil {
				r.log.Debug("subscribe failed", "node", node, "error", err)
				if isRedirect(err) {
					r.stale.Store(true) // re-placed after the next refresh (the loop retries in 100 ms)
					continue
				}
				linkErr = err
				break
			}
			ok = append(ok, subs[node][i])
		}
		if linkErr != nil {
			// The pipeline broke: what it confirmed before the break is on a
			// dead connection, so nothing of it is marked active. connect()
			// subscribes every wanted topic of the node again; until then
			// their connections are told the link is down.
			r.linkFailed(l, linkErr)
			var lost []string
			r.mu.Lock()
			for _, t := range subs[node] {
				if st := r.topics[t]; st != nil && st.node == "" && st.wanted && st.markDown() {
					lost = append(lost, t)
				}
			}
			r.mu.Unlock()
			if len(lost) > 0 {
				r.handler.HandleLinkDown(lost)
			}
			continue
		}
		r.mu.Lock()
		up := r.confirm(node, ok)
		for _, t := range subs[node] {
			if st := r.topics[t]; st != nil && st.node == "" && st.wanted {
				r.dirty[t] = struct{}{} // redirected: re-placed after the refresh
			}
		}
		r.report()
		r.mu.Unlock()
		if len(up) > 0 {
			r.handler.HandleLinkUp(up)
		}
	}
}

// linkFailed marks a node's link down and tells the handler about its topics.
func (r *ShardedRedisBroker) linkFailed(l *shardLink, err error) {
	if !l.up && l.dc == nil {
		return
	}
	wasUp := l.up
	r.closeLink(l)
	l.retryAt = time.Now().Add(backoff(1))
	r.stale.Store(true)
	r.mu.Lock()
	var lost []string
	for t, st := range r.topics {
		if st.node == l.node {
			st.node = ""
			if st.wanted && wasUp {
				st.toldDown = true
				lost = append(lost, t)
			}
		}
	}
	r.lastErr = err
	wasAllUp := r.allUp
	r.allUp = false
	r.report()
	r.mu.Unlock()
	if wasAllUp {
		r.downFrom = time.Now()
		if r.obs != nil {
			r.obs.LinkUp(false)
		}
	}
	if wasUp {
		r.log.Warn("sharded pub/sub link down", "node", l.node, "error", err, "topics", len(lost))
		if len(lost) > 0 {
			r.handler.HandleLinkDown(lost)
		}
	}
}

func (r *ShardedRedisBroker) closeLink(l *shardLink) {
	if l.dc != nil {
		l.dc.Close()
		l.cancel()
	}
	l.dc, l.cancel = nil, nil
	r.setUp(l, false)
}

// setUp records a link's state for the loop (l.up) and for Subscribe
// (upNodes, under r.mu); r.mu is not held.
func (r *ShardedRedisBroker) setUp(l *shardLink, up bool) {
	l.up = up
	r.mu.Lock()
	if up {
		r.upNodes[l.node] = true
	} else {
		delete(r.upNodes, l.node)
	}
	r.mu.Unlock()
}

// probe publishes a probe on every quiet link and fails links whose probe
// did not come back in time.
func (r *ShardedRedisBroker) probe(now time.Time) {
	for _, l := range r.links {
		if !l.up {
			continue
		}
		if l.probeBack.Swap(false) {
			l.deadline = time.Time{}
		}
		switch {
		case !l.deadline.IsZero() && now.After(l.deadline):
			r.linkFailed(l, errProbeTimeout)
		case l.deadline.IsZero() && now.Sub(time.Unix(0, l.lastRecv.Load())) >= r.opts.ProbeInterval:
			l.deadline = now.Add(r.opts.ProbeTimeout)
			client, ch := r.clients[l.node], l.probeCh
			if client == nil {
				continue
			}
			r.wg.Go(func() {
				ctx, cancel := context.WithTimeout(r.life.ctx, r.opts.ProbeTimeout)
				defer cancel()
				_ = client.Do(ctx, client.B().Spublish().Channel(ch).Message("probe").Build()).Error()
			})
		}
	}
}

func (r *ShardedRedisBroker) onMessage(l *shardLink, m rueidis.PubSubMessage) {
	l.lastRecv.Store(time.Now().UnixNano())
	if m.Channel == l.probeCh {
		l.probeBack.Store(true)
		return
	}
	if topic, ok := notify.UserFromChannel(r.opts.Prefix, m.Channel); ok {
		r.handler.HandleMessage(topic, []byte(m.Message))
	}
}

// onSubscription catches Redis's sunsubscribe push when a slot migrates:
// the topic must be subscribed again on the slot's new owner.
func (r *ShardedRedisBroker) onSubscription(l *shardLink, s rueidis.PubSubSubscription) {
	if s.Kind != "sunsubscribe" {
		return
	}
	r.log.Debug("sunsubscribe", "node", l.node, "channel", s.Channel)
	topic, ok := notify.UserFromChannel(r.opts.Prefix, s.Channel)
	if !ok {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if st := r.topics[topic]; st != nil && st.wanted && st.node == l.node {
		st.node = ""
		r.stale.Store(true)
		r.markDirty(topic)
	}
}
