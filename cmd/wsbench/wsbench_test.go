package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/procgroup"
	"github.com/huleedu/websocket-service/internal/redistest"
)

const secret = "wsbench-test-secret-wsbench-test-secret"

// gateway is a websocket-service process built from this module.
type gateway struct {
	proc *procgroup.Group
	url  string
}

func startGateway(t *testing.T, redisURL string, extraEnv ...string) *gateway {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "websocket-service")
	if out, err := exec.Command("go", "build", "-o", bin, "../websocket-service").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	// A port picked as free can be taken before the binary binds it (test
	// packages run in parallel): the process then exits, and is started
	// again on another port.
	for attempt := 1; ; attempt++ {
		port, err := redistest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "serve")
		cmd.Env = append(os.Environ(), "WEBSOCKET_HOST=127.0.0.1", fmt.Sprintf("WEBSOCKET_PORT=%d", port),
			"REDIS_URL="+redisURL, "JWT_SECRET_KEY="+secret, "LOG_LEVEL=warn")
		cmd.Env = append(cmd.Env, extraEnv...)
		proc, err := procgroup.Start(cmd)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := proc.Kill(); err != nil {
				t.Error(err)
			}
		})
		deadline := time.Now().Add(20 * time.Second)
		for {
			if resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", port)); err == nil {
				resp.Body.Close()
				return &gateway{proc: proc, url: fmt.Sprintf("ws://127.0.0.1:%d", port)}
			}
			select {
			case <-proc.Done():
				if attempt == 5 {
					t.Fatalf("gateway exited at start %d times", attempt)
				}
			default:
				if time.Now().After(deadline) {
					t.Fatal("gateway did not start listening")
				}
				time.Sleep(20 * time.Millisecond)
				continue
			}
			break
		}
	}
}

func testOptions(g *gateway, redisURL string) options {
	return options{Transport: "websocket", URL: g.url, Redis: redisURL, Prefix: "ws", Secret: secret, Conns: 50, Users: 20,
		Concurrency: 16, Sources: 2, Rate: 200, Duration: 2 * time.Second, Drain: 3 * time.Second,
		Hold: 200 * time.Millisecond, P99Bound: time.Second, Payload: 100,
		ServerPids: fmt.Sprint(g.proc.Pid())}
}

func TestDeliverCountsEverything(t *testing.T) {
	redis := redistest.Start(t)
	g := startGateway(t, redis.URL())
	for i, transport := range []string{"websocket", "sse"} {
		t.Run(transport, func(t *testing.T) {
			o := testOptions(g, redis.URL())
			o.Transport = transport
			// Users of their own: the previous run's closes may not be
			// processed yet, and the per-user quota counts both transports.
			o.UserOffset = 1000 * i
			b, err := newBench(o, os.Stderr)
			if err != nil {
				t.Fatal(err)
			}
			defer b.close()
			b.connectAll(context.Background())
			if b.open() != 50 {
				t.Fatalf("%d open, failures %v", b.open(), b.failureMap())
			}
			r := b.deliver(context.Background(), 200)
			if r.Lost != 0 || r.Duplicated != 0 || r.Received != r.Expected || r.Expected == 0 || r.Latency["count"] == 0 {
				t.Fatalf("unexpected result %+v", r)
			}
		})
	}
}

func TestDetectsLossWhenServerIsKilled(t *testing.T) {
	redis := redistest.Start(t)
	g := startGateway(t, redis.URL())
	o := testOptions(g, redis.URL())
	o.Duration, o.Drain = 3*time.Second, time.Second
	b, err := newBench(o, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	b.connectAll(context.Background())
	stop, killed := make(chan struct{}), make(chan struct{})
	go func() { // kill the server once deliveries are flowing
		defer close(killed)
		for b.latencyCount() < 50 {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
		_ = g.proc.Kill()
	}()
	r := b.deliver(context.Background(), 200)
	close(stop)
	<-killed
	if r.Lost == 0 {
		t.Fatalf("server killed mid-run but lost = 0: %+v", r)
	}
}

func TestIdleAndStormScenariosProduceJSON(t *testing.T) {
	redis := redistest.Start(t)
	// The storm reconnects the moment its sockets are closed, before the
	// server has necessarily seen every close: with 4 connections per user,
	// a quota of 5 could refuse a reconnect with 4000. Room for old and new
	// at once keeps the test about the storm, not about that race.
	g := startGateway(t, redis.URL(), "WEBSOCKET_MAX_CONNECTIONS_PER_USER=10")
	for _, scenario := range []string{"idle", "storm"} {
		var out bytes.Buffer
		o := testOptions(g, redis.URL())
		args := []string{"--scenario", scenario, "--url", o.URL, "--redis", o.Redis, "--jwt-secret", secret,
			"--conns", "40", "--users", "10", "--hold", "100ms", "--server-pid", o.ServerPids, "--sources", "2"}
		if err := run(context.Background(), args, &out, os.Stderr); err != nil {
			t.Fatalf("%s: %v", scenario, err)
		}
		var res map[string]any
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatalf("%s: output is not one JSON object: %v\n%s", scenario, err, out.String())
		}
		if scenario == "idle" && (res["open"] != 40.0 || res["server_rss_per_conn_bytes"] == nil) {
			t.Fatalf("idle result %v", res)
		}
		if scenario == "storm" && (res["reconnected"] != 40.0 || res["not_receiving"] != 0.0) {
			t.Fatalf("storm result %v", res)
		}
	}
}

// TestHistoryScenarios: publish (plain vs history), resume (everyone
// reconnects with since after missing messages) and repair (the gateway's
// pub/sub link killed while publishing) report zero loss and no duplicate.
func TestHistoryScenarios(t *testing.T) {
	redis := redistest.Start(t)
	g := startGateway(t, redis.URL())
	for _, scenario := range []string{"publish", "resume", "repair"} {
		var out bytes.Buffer
		o := testOptions(g, redis.URL())
		args := []string{"--scenario", scenario, "--url", o.URL, "--redis", o.Redis, "--jwt-secret", secret,
			"--conns", "60", "--users", "30", "--behind", "5", "--duration", "500ms", "--sources", "2"}
		if err := run(context.Background(), args, &out, os.Stderr); err != nil {
			t.Fatalf("%s: %v", scenario, err)
		}
		var res map[string]any
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatalf("%s: output is not one JSON object: %v\n%s", scenario, err, out.String())
		}
		switch scenario {
		case "publish":
			if res["plain_publish_per_s"].(float64) <= 0 || res["history_publish_per_s"].(float64) <= 0 {
				t.Fatalf("publish result %v", res)
			}
		default:
			missing, _ := res["not_caught_up"].(float64)
			notReceived, _ := res["not_received"].(float64)
			if res["lost"] != 0.0 || res["duplicated"] != 0.0 || missing+notReceived != 0 {
				t.Fatalf("%s result %v", scenario, res)
			}
		}
	}
}
