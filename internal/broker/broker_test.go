package broker_test

import (
	"testing"

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
		b, err := broker.NewRedis(broker.RedisOptions{URL: srv.URL(), Prefix: "ws"})
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
