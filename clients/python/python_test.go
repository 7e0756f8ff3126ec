package pythonclient_test

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
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// python is Debian's interpreter: the one that sees Debian's python3-redis,
// python3-pytest, python3-pytest-asyncio, python3-mypy and python3-websockets
// (a pyenv python3 on PATH does not).
const python = "/usr/bin/python3"

// TestLuaCopiesAreNotifys: the package ships the gateway's scripts, and they
// must be notify/*.lua byte for byte (one contract, never two versions).
func TestLuaCopiesAreNotifys(t *testing.T) {
	for name, want := range map[string]string{"publish.lua": notify.PublishScript, "disconnect.lua": notify.DisconnectScript} {
		got, err := os.ReadFile(filepath.Join("src", "huleedu_websocket", "lua", name))
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Errorf("clients/python/src/huleedu_websocket/lua/%s differs from notify/%s: run\n"+
				"  cp notify/%s clients/python/src/huleedu_websocket/lua/\nand check the Python side still passes what the script expects", name, name, name)
		}
	}
}

// TestPythonClient installs the package into a virtual environment (offline,
// as a service would), type-checks it with mypy --strict, and runs its
// pytest suite against real Redis topologies (standalone, a 3-master cluster,
// Sentinel) and the gateway binary built here. Every process runs in a
// procgroup (a PID namespace in CI), so whatever the Python side started is
// gone when the test ends.
func TestPythonClient(t *testing.T) {
	if err := exec.Command(python, "-c", "import redis, pytest, pytest_asyncio, mypy, websockets, ensurepip, setuptools").Run(); err != nil {
		t.Skipf("%s lacks redis, pytest, pytest_asyncio, mypy, websockets or venv (%v): "+
			"apt-get install python3-redis python3-pytest python3-pytest-asyncio python3-mypy python3-websockets python3-venv (scripts/test.sh does)", python, err)
	}
	if !redistest.Installed() {
		t.Skip("redis-server not installed")
	}
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "websocket-service")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/websocket-service").CombinedOutput(); err != nil {
		t.Fatalf("build the service: %v\n%s", err, out)
	}

	// Install from a copy, so the build's egg-info and build/ stay out of the tree.
	src := filepath.Join(tmp, "pkg")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"pyproject.toml", "README.md", "src"} {
		if out, err := exec.Command("cp", "-r", p, filepath.Join(src, p)).CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v\n%s", p, err, out)
		}
	}
	venv := filepath.Join(tmp, "venv")
	env := []string{"PYTHONDONTWRITEBYTECODE=1", "PIP_NO_INDEX=1", "PIP_DISABLE_PIP_VERSION_CHECK=1"}
	run(t, env, python, "-m", "venv", "--system-site-packages", venv)
	vpy := filepath.Join(venv, "bin", "python")
	run(t, env, vpy, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-index", "--no-deps", src)
	if t.Failed() {
		return
	}

	t.Run("mypy", func(t *testing.T) {
		run(t, env, vpy, "-m", "mypy", "--strict", "--cache-dir", filepath.Join(tmp, "mypy-cache"), "src/huleedu_websocket", "tests", "bench")
	})
	t.Run("pytest", func(t *testing.T) {
		standalone := redistest.Start(t)
		cluster := redistest.StartCluster(t, 2*time.Second)
		sentinel := redistest.StartSentinel(t)
		penv := append(env,
			"WSS_BIN="+bin,
			"PYWS_REQUIRE_ALL=1",
			"PYWS_EXPECT_INSTALLED=1",
			"PYWS_REDIS_URL="+standalone.URL(),
			"PYWS_CLUSTER_NODES="+strings.Join(cluster.Addrs(), ","),
			"PYWS_SENTINEL_ADDRS="+strings.Join(sentinel.Addrs(), ","),
			"PYWS_SENTINEL_MASTER="+sentinel.Name,
		)
		// The venv's python imports the installed package, not src/.
		run(t, penv, vpy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests")
	})
}

// run runs a command in its own procgroup, puts its output in the test log
// (all of it when it fails), and kills whatever is left of it when it returns.
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
