package gateway

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lesismal/nbio/logging"
)

// lockedBuffer is an io.Writer several goroutines may log to.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestRouteEngineLogs: nbio's lines reach the newest target, levels mapped,
// while engine goroutines log during the switch (a second service in one
// process once raced with the first one's engine under -race).
func TestRouteEngineLogs(t *testing.T) {
	previous := engineLogs.to.Load()
	t.Cleanup(func() { engineLogs.to.Store(previous) })
	var first, second lockedBuffer
	RouteEngineLogs(slog.New(slog.NewJSONHandler(&first, &slog.HandlerOptions{Level: slog.LevelDebug})))

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
					logging.Warn("busy %d", 1)
				}
			}
		})
	}
	RouteEngineLogs(slog.New(slog.NewJSONHandler(&second, &slog.HandlerOptions{Level: slog.LevelInfo})))
	eventually(t, 10*time.Second, "the engine goroutines logging to the new target", func() bool {
		return strings.Contains(second.String(), "busy 1")
	})
	close(stop)
	wg.Wait()

	logging.Info("started %s", "engine")
	logging.Error("poller %d failed", 2)
	got := second.String()
	if strings.Contains(got, "started engine") {
		t.Errorf("nbio's info became more than debug: %s", got)
	}
	if !strings.Contains(got, `"level":"ERROR","msg":"poller 2 failed","component":"nbio"`) {
		t.Errorf("error line missing from the new target: %q", got)
	}
	if strings.Contains(first.String(), "poller 2 failed") {
		t.Errorf("the old target still receives lines")
	}
}
