package websocketclient_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/procgroup"
)

// The library's own tests are JavaScript (node --test, ws, playwright-core);
// this harness builds the service binary they run against, type-checks the
// declarations, and runs them inside one procgroup (a PID namespace in CI),
// so every process they start (service, redis-server, Chromium and its
// crash handlers) is gone when the test ends, whatever the JavaScript did.
func TestJavaScriptClient(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node not installed")
	}
	if _, err := os.Stat("node_modules/.bin/tsc"); err != nil {
		t.Fatal("clients/js/node_modules is missing: run `npm ci` in clients/js (scripts/test.sh does)")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server not installed")
	}
	bin := filepath.Join(t.TempDir(), "websocket-service")
	build := exec.Command("go", "build", "-o", bin, "../../cmd/websocket-service")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the service: %v\n%s", err, out)
	}
	artifacts := os.Getenv("TEST_ARTIFACTS_DIR")
	if artifacts == "" {
		artifacts = t.TempDir()
	}

	t.Run("typecheck", func(t *testing.T) {
		run(t, nil, node, "node_modules/typescript/bin/tsc", "-p", "tsconfig.json")
	})
	t.Run("node", func(t *testing.T) {
		chromium, _ := exec.LookPath("chromium")
		env := []string{"WSS_BIN=" + bin, "CHROMIUM=" + chromium, "TEST_ARTIFACTS_DIR=" + artifacts}
		files, _ := filepath.Glob("test/*.test.js")
		run(t, env, node, append([]string{"--test", "--test-concurrency=1", "--test-reporter=spec"}, files...)...)
	})
}

// run runs a command in its own procgroup, streams its output into the test
// log when it fails, and kills whatever is left of it when it returns.
func run(t *testing.T, env []string, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	g, err := procgroup.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.Done():
	case <-ctx.Done():
		t.Errorf("%s %s: still running after 10 minutes", name, strings.Join(args, " "))
	}
	if err := g.Kill(); err != nil {
		t.Errorf("kill: %v", err)
	}
	if code := g.ExitCode(); code != 0 || t.Failed() {
		t.Errorf("%s %s: exit code %d\n%s", name, strings.Join(args, " "), code, out.String())
		return
	}
	t.Log(out.String())
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
