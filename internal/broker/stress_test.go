package broker_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// The randomized stress tests mix Subscribe/Unsubscribe from many goroutines
// with link kills, node restarts and slot moves, and after each round check
// against Redis itself that every wanted topic is subscribed exactly once on
// its current owner and nothing else is, and that every topic reported down
// (by the handler, or by Subscribe) was reported up again.
//
// STRESS_SEEDS (default 2), STRESS_ROUNDS (default 3) and STRESS_TOPICS
// (default 4000 preloaded topics) scale them; STRESS_SEED runs one seed.

// stressTarget is one topology: how to make its broker, what disruptions it
// suffers, and how to read its subscriptions from Redis.
type stressTarget struct {
	newBroker func(t *testing.T) broker.Broker
	disrupt   []func(t *testing.T, rng *rand.Rand, wanted []string)
	// check compares Redis's view with the wanted topics; nil if they agree.
	check func(wanted map[string]bool) error
}

// linkTracker is the handler: it keeps what a hub would have told each
// topic's connections (down or not). Subscribe is called under its mutex, as
// the hub calls it under its shard lock, so a report about a topic cannot
// overtake Subscribe's own answer.
type linkTracker struct {
	mu         sync.Mutex
	globalDown bool
	down       map[string]bool
	wanted     map[string]bool
	history    map[string][]string // per topic, what happened (printed on failure)
}

func (l *linkTracker) note(topic, what string) {
	h := append(l.history[topic], what)
	l.history[topic] = h[max(0, len(h)-12):]
}

func (l *linkTracker) HandleMessage(string, []byte) {}
func (l *linkTracker) HandleLinkDown(topics []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if topics == nil {
		l.globalDown = true
	}
	for _, t := range topics {
		l.note(t, "handler down")
		// As in the hub, a report reaches only the topic's current
		// connections: none once it is unsubscribed.
		if l.wanted[t] {
			l.down[t] = true
		}
	}
}
func (l *linkTracker) HandleLinkUp(topics []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if topics == nil {
		l.globalDown = false
		clear(l.down)
	}
	for _, t := range topics {
		delete(l.down, t)
		l.note(t, "handler up")
	}
}

func (l *linkTracker) subscribe(b broker.Broker, topic string) <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	ready, down := b.Subscribe(topic)
	l.wanted[topic] = true
	l.note(topic, fmt.Sprintf("subscribe down=%v", down))
	if down {
		l.down[topic] = true
	}
	return ready
}

func (l *linkTracker) unsubscribe(b broker.Broker, topic string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b.Unsubscribe(topic)
	delete(l.wanted, topic)
	delete(l.down, topic)
	l.note(topic, "unsubscribe")
}

// stillDown lists wanted topics whose connections would still believe the
// link is down.
func (l *linkTracker) stillDown() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for t := range l.wanted {
		if l.globalDown || l.down[t] {
			out = append(out, t)
		}
	}
	return out
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func stressSeeds() []uint64 {
	if v, err := strconv.ParseUint(os.Getenv("STRESS_SEED"), 10, 64); err == nil {
		return []uint64{v}
	}
	n := envInt("STRESS_SEEDS", 2)
	seeds := make([]uint64, n)
	for i := range seeds {
		seeds[i] = uint64(i + 1)
	}
	return seeds
}

// runStress drives one target for every seed.
func runStress(t *testing.T, target stressTarget) {
	for _, seed := range stressSeeds() {
		t.Run("seed="+strconv.FormatUint(seed, 10), func(t *testing.T) { stressOnce(t, target, seed) })
	}
}

func stressOnce(t *testing.T, target stressTarget, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	b := target.newBroker(t)
	lt := &linkTracker{down: map[string]bool{}, wanted: map[string]bool{}, history: map[string][]string{}}
	if err := b.Start(lt); err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	const workers = 6
	preload := envInt("STRESS_TOPICS", 4000)
	for i := range preload { // a large resubscribe makes the window after a reconnect wide
		lt.subscribe(b, "base-"+strconv.Itoa(i))
	}
	rounds := envInt("STRESS_ROUNDS", 3)
	ops := 0
	for round := range rounds {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		var opsMu sync.Mutex
		for w := range workers {
			wrng := rand.New(rand.NewPCG(seed, uint64(round*workers+w)))
			wg.Go(func() {
				n := 0
				defer func() { opsMu.Lock(); ops += n; opsMu.Unlock() }()
				for {
					select {
					case <-stop:
						return
					default:
					}
					// Each worker owns its topics, as the hub owns a user's
					// reference count; some are base topics, to unsubscribe
					// and resubscribe what a reconnect is restoring.
					var topic string
					if wrng.IntN(4) == 0 {
						topic = "base-" + strconv.Itoa(wrng.IntN(preload/workers)*workers+w)
					} else {
						topic = fmt.Sprintf("w%d-%d", w, wrng.IntN(300))
					}
					lt.mu.Lock()
					wanted := lt.wanted[topic]
					lt.mu.Unlock()
					if wanted {
						lt.unsubscribe(b, topic)
					} else {
						ready := lt.subscribe(b, topic)
						select {
						case <-ready:
						case <-time.After(20 * time.Second):
							errs <- fmt.Errorf("Subscribe(%s): ready not closed in 20 s", topic)
							return
						}
					}
					n++
					if wrng.IntN(8) == 0 {
						time.Sleep(time.Duration(wrng.IntN(500)) * time.Microsecond) // pacing, not synchronisation
					}
				}
			})
		}
		// Disruptions at random moments while the workers run.
		for range 1 + rng.IntN(2) {
			time.Sleep(time.Duration(50+rng.IntN(300)) * time.Millisecond) // pacing the chaos
			lt.mu.Lock()
			wanted := slices.Collect(func(yield func(string) bool) {
				for t := range lt.wanted {
					if !yield(t) {
						return
					}
				}
			})
			lt.mu.Unlock()
			slices.Sort(wanted)
			target.disrupt[rng.IntN(len(target.disrupt))](t, rng, wanted)
		}
		time.Sleep(time.Duration(100+rng.IntN(300)) * time.Millisecond) // let subscriptions race the recovery
		close(stop)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		// Quiet: the broker must converge to exactly the wanted set.
		if err := converge(target, lt); err != nil {
			t.Fatalf("round %d: not converged 30 s after the quiet began: %v", round, err)
		}
	}
	t.Logf("seed %d: %d rounds, %d subscribe/unsubscribe operations, %d preloaded topics", seed, rounds, ops, preload)
}

// converge waits up to 30 s for Redis to hold exactly the wanted topics
// and for no wanted topic to be left reported down.
func converge(target stressTarget, lt *linkTracker) error {
	lt.mu.Lock()
	wanted := make(map[string]bool, len(lt.wanted))
	for k := range lt.wanted {
		wanted[notify.Channel("ws", k)] = true
	}
	lt.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := target.check(wanted)
		if err == nil {
			if down := lt.stillDown(); len(down) > 0 {
				lt.mu.Lock()
				err = fmt.Errorf("%d topics reported down and never up again, e.g. %s: %v", len(down), down[0], lt.history[down[0]])
				lt.mu.Unlock()
			}
		}
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// compare reports the differences between a count of subscriptions per
// channel and the wanted set.
func compare(got map[string]int, wanted map[string]bool) error {
	var missing, extra, dup []string
	for ch := range wanted {
		if got[ch] == 0 {
			missing = append(missing, ch)
		}
	}
	for ch, n := range got {
		switch {
		case !wanted[ch]:
			extra = append(extra, ch)
		case n > 1:
			dup = append(dup, ch)
		}
	}
	if len(missing)+len(extra)+len(dup) == 0 {
		return nil
	}
	first := func(s []string) []string { slices.Sort(s); return s[:min(3, len(s))] }
	return fmt.Errorf("%d wanted not subscribed %v, %d subscribed not wanted %v, %d subscribed twice %v",
		len(missing), first(missing), len(extra), first(extra), len(dup), first(dup))
}

// subscriptionCounts adds node's subscriber counts of every ws:* channel
// (classic or sharded) to got; wrong, when not nil, collects channels held
// by a node that does not own their slot.
func subscriptionCounts(n *redistest.Server, sharded bool, got map[string]int) error {
	list, num := "CHANNELS", "NUMSUB"
	if sharded {
		list, num = "SHARDCHANNELS", "SHARDNUMSUB"
	}
	chans, err := n.DoLines("PUBSUB", list, "ws:*")
	if err != nil {
		return err
	}
	for c := range slices.Chunk(chans, 500) {
		lines, err := n.DoLines(append([]string{"PUBSUB", num}, c...)...)
		if err != nil {
			return err
		}
		for i := 0; i+1 < len(lines); i += 2 {
			k, _ := strconv.Atoi(lines[i+1])
			got[lines[i]] += k
		}
	}
	return nil
}

func standaloneCheck(srv *redistest.Server) func(map[string]bool) error {
	return func(wanted map[string]bool) error {
		got := map[string]int{}
		if err := subscriptionCounts(srv, false, got); err != nil {
			return err
		}
		return compare(got, wanted)
	}
}

func killPubSub(nodes ...*redistest.Server) {
	for _, n := range nodes {
		if n.Alive() {
			_, _ = n.Do("CLIENT", "KILL", "TYPE", "pubsub")
		}
	}
}

// newStressBroker makes a classic or sharded broker on top with a short
// probe interval, so dead links and moved slots are noticed within a round.
func newStressBroker(top broker.Topology, sharded bool) func(t *testing.T) broker.Broker {
	return func(t *testing.T) broker.Broker {
		opts := broker.RedisOptions{Topology: top, Prefix: "ws", ProbeInterval: 500 * time.Millisecond, ProbeTimeout: 2 * time.Second}
		var b broker.Broker
		var err error
		if sharded {
			b, err = broker.NewShardedRedis(opts)
		} else {
			b, err = broker.NewRedis(opts)
		}
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}

func TestStressRedisBrokerStandalone(t *testing.T) {
	srv := redistest.Start(t)
	runStress(t, stressTarget{
		newBroker: newStressBroker(broker.Topology{URL: srv.URL()}, false),
		disrupt: []func(*testing.T, *rand.Rand, []string){
			func(*testing.T, *rand.Rand, []string) { killPubSub(srv) },
			func(*testing.T, *rand.Rand, []string) { killPubSub(srv) },
			func(t *testing.T, _ *rand.Rand, _ []string) {
				srv.Kill()
				if err := srv.Restart(); err != nil {
					t.Fatal(err)
				}
			},
		},
		check: standaloneCheck(srv),
	})
}

// restartNode kills a cluster node and starts it again at once, before the
// cluster's node timeout declares it failed: it comes back with its slots.
func restartNode(t *testing.T, c *redistest.Cluster, rng *rand.Rand) {
	masters := c.Masters()
	n := masters[rng.IntN(len(masters))]
	n.Kill()
	if err := n.Restart(); err != nil {
		t.Fatal(err)
	}
}

func clusterCheck(c *redistest.Cluster, sharded bool) func(map[string]bool) error {
	return func(wanted map[string]bool) error {
		if err := c.WaitHealthy(0); err != nil {
			return err
		}
		owners, err := c.SlotOwners()
		if err != nil {
			return err
		}
		got := map[string]int{}
		var misplaced []string
		for _, n := range c.Nodes {
			if !n.Alive() {
				continue
			}
			mine := map[string]int{}
			if err := subscriptionCounts(n, sharded, mine); err != nil {
				return err
			}
			for ch, k := range mine {
				got[ch] += k
				if sharded && owners[broker.Slot(ch)] != n {
					misplaced = append(misplaced, ch)
				}
			}
		}
		if len(misplaced) > 0 {
			return fmt.Errorf("%d channels subscribed on a node that does not own their slot, e.g. %v", len(misplaced), misplaced[:1])
		}
		return compare(got, wanted)
	}
}

func TestStressRedisBrokerClusterClassic(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	runStress(t, stressTarget{
		newBroker: newStressBroker(broker.Topology{ClusterNodes: c.Addrs()}, false),
		disrupt: []func(*testing.T, *rand.Rand, []string){
			func(*testing.T, *rand.Rand, []string) { killPubSub(c.Nodes...) },
			func(t *testing.T, rng *rand.Rand, _ []string) { restartNode(t, c, rng) },
		},
		check: clusterCheck(c, false),
	})
}

func TestStressShardedBrokerCluster(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	runStress(t, stressTarget{
		newBroker: newStressBroker(broker.Topology{ClusterNodes: c.Addrs()}, true),
		disrupt: []func(*testing.T, *rand.Rand, []string){
			func(*testing.T, *rand.Rand, []string) { killPubSub(c.Nodes...) },
			func(t *testing.T, rng *rand.Rand, _ []string) { restartNode(t, c, rng) },
			func(t *testing.T, rng *rand.Rand, wanted []string) { // move the slots of a few wanted topics
				masters := c.Masters()
				for range 3 {
					if len(wanted) == 0 || len(masters) < 2 {
						return
					}
					slot := broker.Slot(notify.Channel("ws", wanted[rng.IntN(len(wanted))]))
					if err := c.MoveSlot(slot, masters[rng.IntN(len(masters))]); err != nil && !strings.Contains(err.Error(), "no live master") {
						t.Logf("move slot %d: %v", slot, err)
					}
				}
			},
		},
		check: clusterCheck(c, true),
	})
}

// killDuringSubscribe is the reviewers' reproduction of lost subscriptions:
// many wanted topics, the pub/sub links killed, and new topics subscribed
// every half millisecond while the broker re-subscribes (or while a large
// flush is in flight); afterwards Redis must hold exactly the wanted set.
func killDuringSubscribe(t *testing.T, target stressTarget, kill func()) {
	b := target.newBroker(t)
	lt := &linkTracker{down: map[string]bool{}, wanted: map[string]bool{}, history: map[string][]string{}}
	if err := b.Start(lt); err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const preload = 40_000
	for i := range preload { // not waited for: the flush pipelines are large
		lt.subscribe(b, "many-"+strconv.Itoa(i))
	}
	kill()
	for i := range 400 {
		lt.subscribe(b, "late-"+strconv.Itoa(i))
		time.Sleep(500 * time.Microsecond) // pacing, as the reproduction did
		if i == 200 {
			kill() // a second loss while the first resubscribe may be running
		}
	}
	if err := converge(target, lt); err != nil {
		t.Fatalf("30 s after the kills: %v", err)
	}
}

func TestSubscribeDuringResubscribeStandalone(t *testing.T) {
	srv := redistest.Start(t)
	killDuringSubscribe(t, stressTarget{
		newBroker: newStressBroker(broker.Topology{URL: srv.URL()}, false),
		check:     standaloneCheck(srv),
	}, func() { killPubSub(srv) })
}

func TestSubscribeDuringResubscribeSharded(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	killDuringSubscribe(t, stressTarget{
		newBroker: newStressBroker(broker.Topology{ClusterNodes: c.Addrs()}, true),
		check:     clusterCheck(c, true),
	}, func() { killPubSub(c.Nodes...) })
}
