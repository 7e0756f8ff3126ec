package broker_test

import (
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/broker/brokertest"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestMemoryBroker(t *testing.T) {
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b := broker.NewMemory()
		return b, func(_ testing.TB, topic string, payload []byte) { b.Publish(topic, payload) }
	})
}

func TestRedisBroker(t *testing.T) {
	srv := redistest.Start(t)
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b, err := broker.NewRedis(broker.RedisOptions{Topology: broker.Topology{URL: srv.URL()}, Prefix: "ws"})
		if err != nil {
			t.Fatal(err)
		}
		return b, func(t testing.TB, topic string, payload []byte) {
			if _, err := srv.Publish(notify.Channel("ws", topic), string(payload)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// BenchmarkSubscribeChurn subscribes and unsubscribes distinct topics from
// many goroutines at once against a real redis-server: the broker batches
// them into few SUBSCRIBE/UNSUBSCRIBE round trips.
func BenchmarkSubscribeChurn(b *testing.B) {
	srv := redistest.Start(b)
	br, err := broker.NewRedis(broker.RedisOptions{Topology: broker.Topology{URL: srv.URL()}, Prefix: "ws"})
	if err != nil {
		b.Fatal(err)
	}
	rec := brokertest.NewRecorder()
	if err := br.Start(rec); err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	rec.WaitLink(b, "up", 10*time.Second)
	var n atomic.Int64
	b.ReportAllocs()
	b.SetParallelism(32)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			topic := "churn-" + strconv.FormatInt(n.Add(1), 10)
			<-br.Subscribe(topic)
			br.Unsubscribe(topic)
		}
	})
}
