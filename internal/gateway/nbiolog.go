package gateway

import (
	"fmt"
	"log/slog"

	"github.com/lesismal/nbio/logging"
)

// RouteEngineLogs sends nbio's log lines (a process-wide setting of that
// library) to l: debug and info become debug, so a healthy engine is quiet.
func RouteEngineLogs(l *slog.Logger) { logging.SetLogger(nbioLogger{l.With("component", "nbio")}) }

type nbioLogger struct{ l *slog.Logger }

func (n nbioLogger) Debug(f string, v ...any) { n.l.Debug(fmt.Sprintf(f, v...)) }
func (n nbioLogger) Info(f string, v ...any)  { n.l.Debug(fmt.Sprintf(f, v...)) }
func (n nbioLogger) Warn(f string, v ...any)  { n.l.Warn(fmt.Sprintf(f, v...)) }
func (n nbioLogger) Error(f string, v ...any) { n.l.Error(fmt.Sprintf(f, v...)) }
