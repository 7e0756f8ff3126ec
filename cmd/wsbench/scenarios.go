package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// procStats is what /proc tells about the gateway processes.
type procStats struct {
	RSSBytes int64   `json:"rss_bytes"`
	CPUSecs  float64 `json:"cpu_seconds"`
}

func (b *bench) serverStats() (procStats, bool) {
	pids := splitList(b.o.ServerPids)
	if len(pids) == 0 {
		return procStats{}, false
	}
	var total procStats
	for _, p := range pids {
		status, err := os.ReadFile("/proc/" + p + "/status")
		if err != nil {
			return procStats{}, false
		}
		for line := range strings.SplitSeq(string(status), "\n") {
			if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
				total.RSSBytes += kb * 1024
			}
		}
		stat, err := os.ReadFile("/proc/" + p + "/stat")
		if err != nil {
			return procStats{}, false
		}
		s := string(stat)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		ut, _ := strconv.ParseFloat(fields[11], 64)
		st, _ := strconv.ParseFloat(fields[12], 64)
		total.CPUSecs += (ut + st) / 100 // USER_HZ
	}
	return total, true
}

// idle opens the connections, holds them, and reports connect figures and
// the server's RSS per connection and CPU while idle.
func (b *bench) idle(ctx context.Context) (any, error) {
	before, hasStats := b.serverStats()
	took := b.connectAll(ctx)
	open := b.open()
	res := map[string]any{
		"scenario": "idle", "conns": b.o.Conns, "open": open, "failures": b.failureMap(),
		"connect_seconds": took.Seconds(), "connect_rate_per_s": float64(open) / took.Seconds(),
		"handshake": summarize(b.handshake),
	}
	fmt.Fprintf(b.log, "[idle] %d open in %.2fs; holding %s\n", open, took.Seconds(), b.o.Hold)
	start, _ := b.serverStats()
	t0 := time.Now()
	select {
	case <-ctx.Done():
	case <-time.After(b.o.Hold):
	}
	if hasStats && open > 0 {
		end, _ := b.serverStats()
		res["server_rss_before_bytes"] = before.RSSBytes
		res["server_rss_bytes"] = end.RSSBytes
		res["server_rss_per_conn_bytes"] = float64(end.RSSBytes-before.RSSBytes) / float64(open)
		res["server_cpu_percent_idle"] = 100 * (end.CPUSecs - start.CPUSecs) / time.Since(t0).Seconds()
	}
	res["still_open"] = b.open()
	return res, nil
}

// deliverRun is the outcome of one publishing run.
type deliverRun struct {
	Rate           int                `json:"rate_msgs_per_s"`
	Published      int64              `json:"published"`
	AchievedRate   float64            `json:"achieved_publish_rate"`
	Expected       int64              `json:"expected_deliveries"`
	Received       int64              `json:"received"`
	Lost           int64              `json:"lost"`
	Duplicated     int64              `json:"duplicated"`
	DeliveriesPerS float64            `json:"deliveries_per_s"`
	Latency        map[string]float64 `json:"latency"`
	ServerCPUPct   float64            `json:"server_cpu_percent,omitempty"`
	ServerRSSBytes int64              `json:"server_rss_bytes,omitempty"`
	ClosedByServer int64              `json:"closed_by_server"`
	ServiceEvents  int64              `json:"service_events"`
	p99            time.Duration
}

func (b *bench) deliverScenario(ctx context.Context) (any, error) {
	took := b.connectAll(ctx)
	open := b.open()
	fmt.Fprintf(b.log, "[deliver] %d/%d open in %.2fs\n", open, b.o.Conns, took.Seconds())
	r := b.deliver(ctx, b.o.Rate)
	return map[string]any{"scenario": "deliver", "conns": b.o.Conns, "users": b.o.Users, "open": open,
		"connect_seconds": took.Seconds(), "failures": b.failureMap(), "result": r}, nil
}

// findMax steps the rate up until loss or p99 over the bound.
func (b *bench) findMax(ctx context.Context) (any, error) {
	b.connectAll(ctx)
	var runs []deliverRun
	best := 0.0
	for rate := b.o.Rate; ctx.Err() == nil; rate = int(float64(rate) * max(b.o.Step, 1.01)) {
		r := b.deliver(ctx, rate)
		runs = append(runs, r)
		fmt.Fprintf(b.log, "[find-max] rate %d: %.0f deliveries/s, lost %d, p99 %.2fms\n", rate, r.DeliveriesPerS, r.Lost, r.Latency["p99_ms"])
		if r.Lost > 0 || r.Duplicated > 0 || r.p99 > b.o.P99Bound || r.AchievedRate < 0.9*float64(rate) {
			break
		}
		best = r.DeliveriesPerS
	}
	return map[string]any{"scenario": "deliver-find-max", "conns": b.o.Conns, "users": b.o.Users,
		"p99_bound_ms": b.o.P99Bound.Seconds() * 1000, "max_deliveries_per_s": best, "runs": runs}, nil
}

// deliver publishes at rate to random users for o.Duration, then waits for
// stragglers, and counts what arrived against what was expected.
func (b *bench) deliver(ctx context.Context, rate int) deliverRun {
	total := int(float64(rate)*b.o.Duration.Seconds()) + rate
	b.received = make([]atomic.Int32, total+1)
	b.dups.Store(0)
	b.closedOpen.Store(0)
	b.mu.Lock()
	b.latency.Reset()
	b.mu.Unlock()
	for _, c := range b.conns {
		if c != nil {
			c.lastSeq.Store(0)
		}
	}
	expectedOf := make([]int32, total+1)
	// Every connection open at the start should receive its user's messages
	// for the whole run: one the server drops mid-run counts as losing them.
	b.mu.Lock()
	openOf := slices.Clone(b.connsOf)
	b.mu.Unlock()
	pad := strings.Repeat("x", max(0, b.o.Payload-70))
	startStats, hasStats := b.serverStats()
	start := time.Now()
	var seq int64
	var progress atomic.Int64 // seq, for the progress line
	// One publisher goroutine sends batches in sequence order (coalescing
	// whatever queued up meanwhile into one pipeline), so each user's
	// messages reach Redis in increasing sequence and reordering can be told
	// from duplication.
	batches := make(chan rueidis.Commands, 4096)
	var pubWG sync.WaitGroup
	pubWG.Go(func() {
		for cmds := range batches {
			for more := true; more; {
				select {
				case next, ok := <-batches:
					if !ok {
						more = false
						break
					}
					cmds = append(cmds, next...)
				default:
					more = false
				}
			}
			b.redis.DoMulti(context.Background(), cmds...)
		}
	})
	stopProgress := b.progress("deliver", func() string {
		return fmt.Sprintf("rate %d: published %d, latency samples %d", rate, progress.Load(), b.latencyCount())
	})
	tick := time.NewTicker(time.Millisecond)
	for ctx.Err() == nil {
		now := <-tick.C
		elapsed := now.Sub(start)
		if elapsed >= b.o.Duration {
			break
		}
		due := min(int64(elapsed.Seconds()*float64(rate)), int64(total)) - seq
		if due <= 0 {
			continue
		}
		cmds := make(rueidis.Commands, 0, due)
		b.mu.Lock()
		for range due {
			seq++
			user := rand.IntN(b.o.Users)
			expectedOf[seq] = openOf[user]
			cmds = append(cmds, b.publishCmd(user, fmt.Sprintf(`{"event":"bench","data":{"s":%d,"t":%d,"p":"%s"}}`, seq, time.Now().UnixNano(), pad)))
		}
		b.mu.Unlock()
		progress.Store(seq)
		batches <- cmds
	}
	tick.Stop()
	close(batches)
	pubWG.Wait()
	published := seq
	pubTime := time.Since(start)
	var expected int64
	for s := int64(1); s <= published; s++ {
		expected += int64(expectedOf[s])
	}
	receivedNow := func() int64 {
		var n int64
		for s := int64(1); s <= published; s++ {
			n += int64(b.received[s].Load())
		}
		return n
	}
	deadline := time.Now().Add(b.o.Drain)
	for time.Now().Before(deadline) && receivedNow() < expected {
		time.Sleep(20 * time.Millisecond)
	}
	stopProgress()
	r := deliverRun{Rate: rate, Published: published, AchievedRate: float64(published) / pubTime.Seconds(),
		Expected: expected, Duplicated: b.dups.Load(), ClosedByServer: b.closedOpen.Load(), ServiceEvents: b.events.Load()}
	for s := int64(1); s <= published; s++ {
		got, want := int64(b.received[s].Load()), int64(expectedOf[s])
		r.Received += got
		if got < want {
			r.Lost += want - got
		} else if got > want {
			r.Duplicated += got - want
		}
	}
	r.DeliveriesPerS = float64(r.Received) / pubTime.Seconds()
	b.mu.Lock()
	r.Latency = summarize(b.latency)
	r.p99 = time.Duration(b.latency.ValueAtQuantile(99)) * time.Microsecond
	b.mu.Unlock()
	if hasStats {
		end, _ := b.serverStats()
		r.ServerCPUPct = 100 * (end.CPUSecs - startStats.CPUSecs) / time.Since(start).Seconds()
		r.ServerRSSBytes = end.RSSBytes
	}
	return r
}

// storm connects everyone, proves delivery, drops every connection at once,
// reconnects them all as fast as the server allows, and measures the time
// until every connection has received a probe again.
func (b *bench) storm(ctx context.Context) (any, error) {
	took := b.connectAll(ctx)
	first := b.open()
	fmt.Fprintf(b.log, "[storm] %d open in %.2fs; proving delivery\n", first, took.Seconds())
	if missing := b.probeAll(ctx, 1, 30*time.Second); missing > 0 {
		return nil, fmt.Errorf("%d connections did not receive the first probe", missing)
	}
	b.failures = sync.Map{}
	b.failCount.Store(0)
	b.mu.Lock()
	b.handshake.Reset()
	b.mu.Unlock()
	start := time.Now()
	b.closeAll()
	dropped := time.Since(start)
	reconnect := b.connectAll(ctx)
	missing := b.probeAll(ctx, 2, 60*time.Second)
	back := time.Since(start)
	return map[string]any{"scenario": "storm", "conns": b.o.Conns, "users": b.o.Users,
		"drop_seconds": dropped.Seconds(), "reconnect_seconds": reconnect.Seconds(),
		"all_receiving_seconds": back.Seconds(), "reconnected": b.open(), "not_receiving": missing,
		"failures": b.failureMap(), "handshake": summarize(b.handshake)}, nil
}

// probeAll publishes probe generation g to every user until each open
// connection saw it, and returns how many never did.
func (b *bench) probeAll(ctx context.Context, g int64, timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	for {
		cmds := make(rueidis.Commands, 0, b.o.Users)
		for u := range b.o.Users {
			cmds = append(cmds, b.publishCmd(u, fmt.Sprintf(`{"event":"probe","data":{"g":%d}}`, g)))
		}
		b.redis.DoMulti(ctx, cmds...)
		missing := 0
		wait := time.Now().Add(500 * time.Millisecond)
		for {
			missing = 0
			for _, c := range b.conns {
				if c != nil && c.probe.Load() < g {
					missing++
				}
			}
			if missing == 0 || time.Now().After(wait) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if missing == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return missing
		}
	}
}
