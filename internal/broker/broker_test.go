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

func TestMain(m *testing.M) {
	// rueidis closes connections dropped from the cluster topology after a
	// 5 s sleep in a goroutine of its own, which no Close waits for.
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*clusterClient)._refresh.func2"),
		goleak.IgnoreAnyFunction("github.com/redis/rueidis.(*call).DelayDo.func1"))
}

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
			ready, _ := br.Subscribe(topic)
			<-ready
			br.Unsubscribe(topic)
		}
	})
}

func TestRedisBrokerOnClusterClassic(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b, err := broker.NewRedis(broker.RedisOptions{Topology: broker.Topology{ClusterNodes: c.Addrs()}, Prefix: "ws"})
		if err != nil {
			t.Fatal(err)
		}
		return b, func(t testing.TB, topic string, payload []byte) {
			// Classic PUBLISH on any node reaches subscribers on every node.
			if _, err := c.Nodes[len(c.Nodes)-1].Publish(notify.Channel("ws", topic), string(payload)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestRedisBrokerOnSentinel(t *testing.T) {
	g := redistest.StartSentinel(t)
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b, err := broker.NewRedis(broker.RedisOptions{Topology: broker.Topology{SentinelAddrs: g.Addrs(), SentinelMaster: g.Name}, Prefix: "ws"})
		if err != nil {
			t.Fatal(err)
		}
		return b, func(t testing.TB, topic string, payload []byte) {
			if _, err := g.Master.Publish(notify.Channel("ws", topic), string(payload)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestSlotMatchesRedis(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	for _, key := range []string{"ws:alice", "ws:user-123", "{user}:x", "a{}b", "foo{bar}{zap}", "", "123456789"} {
		want, err := c.KeySlot(key)
		if err != nil {
			t.Fatal(err)
		}
		if got := broker.Slot(key); got != want {
			t.Errorf("Slot(%q) = %d, Redis says %d", key, got, want)
		}
	}
}

func TestShardedBrokerStandalone(t *testing.T) {
	srv := redistest.Start(t)
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b, err := broker.NewShardedRedis(broker.RedisOptions{Topology: broker.Topology{URL: srv.URL()}, Prefix: "ws"})
		if err != nil {
			t.Fatal(err)
		}
		return b, func(t testing.TB, topic string, payload []byte) {
			if _, err := srv.Do("SPUBLISH", notify.Channel("ws", topic), string(payload)); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestShardedBrokerOnCluster(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	pub := func(t testing.TB, topic string, payload []byte) {
		ch := notify.Channel("ws", topic)
		slot, _ := c.KeySlot(ch)
		owner, err := c.MasterOf(slot)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := owner.Do("SPUBLISH", ch, string(payload)); err != nil {
			t.Fatal(err)
		}
	}
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b, err := broker.NewShardedRedis(broker.RedisOptions{Topology: broker.Topology{ClusterNodes: c.Addrs()}, Prefix: "ws"})
		if err != nil {
			t.Fatal(err)
		}
		return b, pub
	})
}
