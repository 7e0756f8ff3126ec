package devredis

import (
	"context"
	"encoding/json"
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/rueidis"
	"go.uber.org/goleak"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/broker/brokertest"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// embedded resolves a free address, where Resolve must start the embedded
// server. The port can be taken between FreePort and Resolve by a test
// package running in parallel (Resolve then finds that server, or fails to
// listen): then another port is tried.
func embedded(t *testing.T) (addr, url string, m *miniredis.Miniredis) {
	t.Helper()
	for range 5 {
		port, err := redistest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addr = "127.0.0.1:" + strconv.Itoa(port)
		url, m, err = Resolve(addr, slog.New(slog.DiscardHandler))
		if err == nil && m != nil {
			return addr, url, m
		}
	}
	t.Fatalf("Resolve on free ports did not start the embedded server (%q)", url)
	return "", "", nil
}

// With nothing on the address, Resolve starts the embedded server, and the
// Redis broker works against it (RESP2), as `go run` on a fresh machine does.
func TestEmbeddedServerCarriesPubSub(t *testing.T) {
	addr, url, m := embedded(t)
	defer m.Close()
	brokertest.Run(t, func(t testing.TB) (broker.Broker, brokertest.Publish) {
		b, err := broker.NewRedis(broker.RedisOptions{Topology: broker.Topology{URL: url}, Prefix: "ws", RESP2: true})
		if err != nil {
			t.Fatal(err)
		}
		return b, func(_ testing.TB, topic string, payload []byte) {
			m.Publish(notify.Channel("ws", topic), string(payload))
		}
	})
	// A second Resolve finds the (now running) server and starts nothing.
	if _, again, err := Resolve(addr, slog.New(slog.DiscardHandler)); err != nil || again != nil {
		t.Fatalf("second Resolve started another server (%v)", err)
	}
}

// The embedded server runs publish.lua and the history reads too, so
// resume works in development as in production.
func TestEmbeddedServerKeepsHistory(t *testing.T) {
	_, url, m := embedded(t)
	defer m.Close()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{strings.TrimPrefix(url, "redis://")}, AlwaysRESP2: true, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pub := notify.NewHistoryPublisher(c, "ws", false, notify.HistoryOptions{})
	var ids []string
	for range 3 {
		res, err := pub.Publish(context.Background(), "dev", json.RawMessage(`{"event":"e"}`), "")
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.ID)
	}
	h, err := broker.NewHistory(broker.RedisOptions{Topology: broker.Topology{URL: url}, Prefix: "ws", RESP2: true})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	r := h.Since(context.Background(), "dev", ids[0])
	if r.Reason != "" || len(r.Entries) != 2 || r.Last.String() != ids[2] {
		t.Fatalf("replay %+v, want 2 entries up to %s", r, ids[2])
	}
}
