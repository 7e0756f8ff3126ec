package broker_test

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// BenchmarkRepairRead measures the memory of the repair's history reads
// after an outage: 15,000 users with 100 retained entries each (~300 bytes),
// every one 5 entries behind, read in batches of 1,000 as the gateway's
// repair loop does. "keep-all" holds every batch's results until all are
// read (the repair before it delivered batch by batch); "per-batch" drops
// each batch before reading the next. Reported: the peak Go heap in use
// above the baseline, and the process's peak RSS (run one sub-benchmark
// per process for a clean RSS figure):
//
//	go test -run '^$' -bench 'RepairRead/per-batch' -benchtime 1x ./internal/broker/
func BenchmarkRepairRead(b *testing.B) {
	const users, retained, missed, batch = 15000, 100, 5, 1000
	srv := redistest.Start(b)
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{srv.Addr()}, DisableCache: true})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	epoch := strconv.FormatInt(time.Now().UnixMicro(), 36)
	pad := strings.Repeat("x", 240)
	topics := make([]string, users)
	since := make([]notify.ID, users)
	for start := 0; start < users; start += 500 {
		var cmds rueidis.Commands
		for u := start; u < start+500; u++ {
			topics[u] = fmt.Sprintf("mem-%d", u)
			ch := notify.Channel("ws", topics[u])
			entries := make([]string, retained)
			for o := 1; o <= retained; o++ {
				check := strconv.FormatInt(time.Now().UnixMicro()+int64(o), 36)
				entries[o-1] = fmt.Sprintf(`%d|%d|%s|{"id":"%s-%d-%s","event":"e","data":{"p":"%s"}}`, o, time.Now().UnixMilli(), check, epoch, o, check, pad)
				if o == retained-missed {
					since[u] = notify.ID{Epoch: epoch, Offset: int64(o), Check: check}
				}
			}
			cmds = append(cmds, c.B().Rpush().Key(notify.HistoryKey(ch)).Element(entries...).Build(),
				c.B().Hset().Key(notify.MetaKey(ch)).FieldValue().FieldValue("e", epoch).FieldValue("o", strconv.Itoa(retained)).Build())
		}
		for _, res := range c.DoMulti(context.Background(), cmds...) {
			if err := res.Error(); err != nil {
				b.Fatal(err)
			}
		}
	}
	h, err := broker.NewHistory(broker.RedisOptions{Topology: broker.Topology{URL: srv.URL()}, Prefix: "ws"})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	for _, mode := range []string{"keep-all", "per-batch"} {
		b.Run(mode, func(b *testing.B) {
			var peak uint64
			var ms runtime.MemStats
			for range b.N {
				runtime.GC()
				runtime.ReadMemStats(&ms)
				base := ms.HeapInuse
				var kept [][]broker.Replay
				for i := 0; i < users; i += batch {
					res := h.SinceMany(context.Background(), topics[i:i+batch], since[i:i+batch])
					for _, r := range res {
						if r.Reason != "" || len(r.Entries) != missed {
							b.Fatalf("%s: %q with %d entries", topics[i], r.Reason, len(r.Entries))
						}
					}
					runtime.ReadMemStats(&ms)
					peak = max(peak, ms.HeapInuse-min(base, ms.HeapInuse))
					if mode == "keep-all" {
						kept = append(kept, res)
					}
				}
				runtime.KeepAlive(kept)
			}
			var ru syscall.Rusage
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
			b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
			b.ReportMetric(float64(ru.Maxrss)/1024, "maxrss-MiB")
		})
	}
}
