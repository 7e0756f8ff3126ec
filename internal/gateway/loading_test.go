package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// loadingRedis starts a Redis with an append-only file (fsync always) and a
// million keys in its base file, whose next start loads one key per
// key-load-delay (100 µs: minutes for the million) until the test releases
// it with CONFIG SET key-load-delay 0: the load lasts exactly as long as the
// test needs it, whatever the machine's speed.
func loadingRedis(t *testing.T) *redistest.Server {
	t.Helper()
	r := redistest.Start(t, "--appendonly", "yes", "--appendfsync", "always", "--enable-debug-command", "yes",
		"--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024")
	for i := range 4 { // in parts: one DEBUG POPULATE of a million may outlast the helper's 5 s reply deadline on a busy machine
		if _, err := r.Do("DEBUG", "POPULATE", "250000", "filler"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Do("BGREWRITEAOF"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "AOF rewrite of the million keys done", func() bool {
		inProgress, err1 := r.Info("persistence", "aof_rewrite_in_progress")
		scheduled, err2 := r.Info("persistence", "aof_rewrite_scheduled")
		status, err3 := r.Info("persistence", "aof_last_bgrewrite_status")
		return err1 == nil && err2 == nil && err3 == nil && inProgress == "0" && scheduled == "0" && status == "ok"
	})
	if n, err := r.Do("DBSIZE"); err != nil || n != "1000000" {
		t.Fatalf("DBSIZE %q %v", n, err)
	}
	return r
}

// TestRestartWhileLoadingIsNotBack (issue 18, defect 10): Redis restarts on
// its append-only file and takes long to load it; it accepts SUBSCRIBE (and
// PUBLISH) meanwhile but answers every read with LOADING. The instance's
// link must count as down until history can be read: connections open
// through the restart get every notification stored before the kill that
// they had not received, then connection.restored complete:true; a client
// resuming with since during the load gets connection.degraded, then its
// replay once loaded; one with an empty since gets its resume.position.
// /healthz/redis says 503 during the load, 200 after.
func TestRestartWhileLoadingIsNotBack(t *testing.T) {
	redis := loadingRedis(t) // shared: each restart loads with the delay again
	for _, sharded := range []bool{false, true} {
		mode := map[bool]string{false: "classic", true: "sharded"}[sharded]
		t.Run(mode, func(t *testing.T) {
			start := time.Now()
			proxy := newCutProxy(t, redis.Addr())
			st := newStack(t, func(c *stackConfig) {
				c.redis, c.sharded, c.probe = redis, sharded, time.Second
				c.topology = &broker.Topology{URL: "redis://" + proxy.addr()}
			})
			health := func() int {
				resp, err := http.Get(st.http.URL + "/healthz/redis")
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				return resp.StatusCode
			}
			const n = 20
			users := make([]string, n)
			readers := make([]*reader, n)
			want := make([][]string, n)
			pub := notify.NewHistoryPublisher(st.publisher(), "ws", sharded, notify.HistoryOptions{})
			for i := range n {
				users[i] = fmt.Sprintf("load-%s-%d", mode, i)
				readers[i] = st.dial(users[i]).readAll()
				want[i] = publishWithHistory(t, pub, users[i], 1)
			}
			for i, r := range readers {
				eventually(t, 20*time.Second, fmt.Sprintf("client %d first message", i), func() bool { return len(r.ids()) == 1 })
			}
			resumer, newcomer := "load-resume-"+mode, "load-new-"+mode
			seen := publishWithHistory(t, pub, resumer, 1)
			streamer := "load-stream-" + mode // resumes over Server-Sent Events
			seenStream := publishWithHistory(t, pub, streamer, 1)

			// Cut this instance off, then store notifications it cannot
			// receive: acknowledged (fsync always) before the kill.
			proxy.setCut(true)
			for i, r := range readers {
				eventually(t, 20*time.Second, fmt.Sprintf("client %d degraded", i), func() bool { return r.count("connection.degraded") == 1 })
			}
			for i := range n {
				want[i] = append(want[i], publishWithHistory(t, pub, users[i], 3)...)
			}
			missed := publishWithHistory(t, pub, resumer, 3)
			missedStream := publishWithHistory(t, pub, streamer, 3)
			redis.Kill()
			if err := redis.RestartLoading(); err != nil {
				t.Fatal(err)
			}
			if loading, err := redis.Loading(); err != nil || !loading {
				t.Fatalf("restarted Redis not loading: %v %v", loading, err)
			}
			proxy.setCut(false)
			t.Logf("restarted after %s", time.Since(start))

			// During the load: new clients, one resuming, one new.
			resuming := st.dialURL(st.wsURL + "/ws/v1/status/" + resumer + "?since=" + url.QueryEscape(seen[0]) + "&token=" + st.token(resumer, time.Hour)).readAll()
			fresh := st.dialURL(st.wsURL + "/ws/v1/status/" + newcomer + "?since=&token=" + st.token(newcomer, time.Hour)).readAll()
			for name, r := range map[string]*reader{"resuming": resuming, "new": fresh} {
				eventually(t, 20*time.Second, name+" client degraded", func() bool { return r.count("connection.degraded") == 1 })
				if r.count("resume.incomplete") != 0 {
					t.Fatalf("%s client during the load: %v", name, r.msgs)
				}
			}
			stream := st.sse(streamer, http.Header{"Last-Event-Id": {seenStream[0]}})
			if ev := stream.nextData(t); !strings.Contains(ev.Data, `"connection.degraded"`) {
				t.Fatalf("stream's first event during the load: %q", ev.Data)
			}
			if code := health(); code != http.StatusServiceUnavailable {
				t.Fatalf("/healthz/redis %d during the load, want 503", code)
			}
			for i, r := range readers {
				if got := r.count("connection.restored"); got != 0 {
					t.Fatalf("client %d told restored during the load: %v", i, r.msgs)
				}
			}
			if loading, err := redis.Loading(); err != nil || !loading {
				t.Fatalf("the load ended before the test released it: %v %v", loading, err)
			}

			if _, err := redis.Do("CONFIG", "SET", "key-load-delay", "0"); err != nil {
				t.Fatal(err)
			}
			t.Logf("released after %s", time.Since(start))
			eventually(t, 60*time.Second, "load finished", func() bool {
				loading, err := redis.Loading()
				return err == nil && !loading
			})
			t.Logf("loaded after %s", time.Since(start))
			for i, r := range readers {
				eventually(t, 30*time.Second, fmt.Sprintf("client %d restored", i), func() bool { return r.count("connection.restored") == 1 })
				if r.count(`"complete":true`) != 1 {
					t.Fatalf("client %d: restored without complete:true: %v", i, r.msgs)
				}
				if got := r.ids(); fmt.Sprint(got) != fmt.Sprint(want[i]) {
					t.Fatalf("client %d received %v, want %v", i, got, want[i])
				}
			}
			eventually(t, 30*time.Second, "resuming client restored", func() bool { return resuming.count("connection.restored") == 1 })
			if got := resuming.ids(); fmt.Sprint(got) != fmt.Sprint(missed) {
				t.Fatalf("resuming client received %v, want %v: %v", got, missed, resuming.msgs)
			}
			if resuming.count(`"complete":true`) != 1 || resuming.count("resume.incomplete") != 0 || !hasPosition(resuming, missed[len(missed)-1]) {
				t.Fatalf("resuming client: %v", resuming.msgs)
			}
			eventually(t, 30*time.Second, "new client's resume.position", func() bool { return fresh.count("resume.position") == 1 })
			if !hasPosition(fresh, "0") {
				t.Fatalf("new client: %v", fresh.msgs)
			}
			t.Logf("all checked after %s", time.Since(start))
			var streamed []string
			for {
				ev := stream.nextData(t)
				if strings.Contains(ev.Data, `"connection.restored"`) {
					if !strings.Contains(ev.Data, `"complete":true`) {
						t.Fatalf("stream restored: %s", ev.Data)
					}
					break
				}
				switch id := frameID(ev.Data); {
				case id != "":
					streamed = append(streamed, id)
				case strings.Contains(ev.Data, `"resume.position"`):
					if ev.ID != missedStream[len(missedStream)-1] {
						t.Fatalf("stream's position %q, want %q", ev.ID, missedStream[len(missedStream)-1])
					}
				default:
					t.Fatalf("stream after the load: %s", ev.Data)
				}
			}
			if fmt.Sprint(streamed) != fmt.Sprint(missedStream) {
				t.Fatalf("stream replayed %v, want %v", streamed, missedStream)
			}
			eventually(t, 20*time.Second, "/healthz/redis 200", func() bool { return health() == http.StatusOK })
			for name, r := range map[string]*reader{"resuming": resuming, "new": fresh} {
				if r.err() != nil {
					t.Fatalf("%s client closed: %v", name, r.err())
				}
			}
		})
	}
}

// hasPosition reports whether r received resume.position with id.
func hasPosition(r *reader, id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		var v struct {
			Event string `json:"event"`
			Data  struct {
				ID string `json:"id"`
			} `json:"data"`
		}
		if json.Unmarshal([]byte(m), &v) == nil && v.Event == "resume.position" && v.Data.ID == id {
			return true
		}
	}
	return false
}
