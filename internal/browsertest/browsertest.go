// Package browsertest opens a page in headless Chromium for tests, with a
// fresh profile, and cleans up deterministically: Chromium and every process
// it started (renderer, GPU, utility, crashpad) are killed and reaped as one
// process group before the profile directory is removed.
package browsertest

import (
	"os"
	"os/exec"
	"testing"

	"github.com/huleedu/websocket-service/internal/procgroup"
)

// Flags are the ones every browser test uses: headless, no sandbox (tests run
// as root), and nothing that reaches for the network on its own (this
// machine's closed network refuses it, noisily).
var Flags = []string{
	"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
	"--disable-background-networking", "--disable-component-update", "--disable-sync",
}

// Path returns Chromium's executable, or skips t when it is not installed
// (scripts/test.sh installs Debian's chromium).
func Path(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium not installed (scripts/test.sh installs it with apt-get)")
	}
	return p
}

// Open starts Chromium on url and registers the cleanup with t.
func Open(t testing.TB, url string) {
	t.Helper()
	chromium := Path(t)
	profile, err := os.MkdirTemp("", "browsertest-profile-")
	if err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{}, Flags...), "--user-data-dir="+profile, url)
	g, err := procgroup.Start(exec.Command(chromium, args...))
	if err != nil {
		_ = os.RemoveAll(profile)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Kill(); err != nil {
			t.Errorf("chromium: %v", err)
			return // never remove a directory something may still write to
		}
		if err := os.RemoveAll(profile); err != nil {
			t.Errorf("remove chromium profile: %v", err)
		}
	})
}
