package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/lesismal/nbio/logging"
)

// engineLogs is where nbio's log lines go. nbio's logger is a process-wide
// variable that its goroutines read without synchronisation, so it is set
// once to an adapter, and the adapter's target is an atomic pointer: a
// second service in the same process (tests run several) only swaps the
// target, and no engine goroutine reads a logger while it is being built.
var engineLogs struct {
	once sync.Once
	to   atomic.Pointer[slog.Logger]
}

// RouteEngineLogs sends nbio's log lines to l: debug and info become debug,
// so a healthy engine is quiet.
func RouteEngineLogs(l *slog.Logger) {
	engineLogs.to.Store(l.With("component", "nbio"))
	engineLogs.once.Do(func() { logging.SetLogger(nbioLogger{}) })
}

type nbioLogger struct{}

func (nbioLogger) Debug(f string, v ...any) { engineLog(slog.LevelDebug, f, v) }
func (nbioLogger) Info(f string, v ...any)  { engineLog(slog.LevelDebug, f, v) }
func (nbioLogger) Warn(f string, v ...any)  { engineLog(slog.LevelWarn, f, v) }
func (nbioLogger) Error(f string, v ...any) { engineLog(slog.LevelError, f, v) }

func engineLog(level slog.Level, f string, v []any) {
	l := engineLogs.to.Load()
	if !l.Enabled(context.Background(), level) {
		return
	}
	l.Log(context.Background(), level, fmt.Sprintf(f, v...))
}
