package procgroup

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// groupMembers lists the pids whose process group is pgid, from /proc.
func groupMembers(t *testing.T, pgid int) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
		fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(fields) > 2 && fields[2] == strconv.Itoa(pgid) {
			out = append(out, pid)
		}
	}
	return out
}

// TestKillEndsGrandchildren starts a shell whose background children keep
// writing into a directory, kills the group, and then removes the directory:
// with only the leader killed, the writers would race the removal.
func TestKillEndsGrandchildren(t *testing.T) {
	dir, err := os.MkdirTemp("", "procgroup")
	if err != nil {
		t.Fatal(err)
	}
	script := `for i in 1 2 3; do (while :; do mkdir -p "$0/w$i" && touch "$0/w$i/f"; done) & done; echo started > "$0/ready"; wait`
	g, err := Start(exec.Command("sh", "-c", script, dir))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(groupMembers(t, g.Pid())) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("group has %d processes, want 4", len(groupMembers(t, g.Pid())))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	if m := groupMembers(t, g.Pid()); len(m) != 0 {
		t.Fatalf("processes %v of the group survived Kill", m)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatalf("remove after kill: %v", err)
	}
	if err := g.Kill(); err != nil {
		t.Fatalf("second Kill: %v", err)
	}
}

// TestKillAfterExit: a leader that exited on its own, leaving an orphan.
func TestKillAfterExit(t *testing.T) {
	g, err := Start(exec.Command("sh", "-c", "sleep 60 & exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("leader did not exit")
	}
	if g.ExitCode() != 3 {
		t.Fatalf("exit code %d, want 3", g.ExitCode())
	}
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(-g.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("group still exists after Kill: %v", err)
	}
}

// TestKillEndsSessionLeavers: a process that left the group with setsid (as
// Chromium's crash handler does) is ended too, where a PID namespace can be
// made.
func TestKillEndsSessionLeavers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a PID namespace needs root; without it only the process group is ended")
	}
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	g, err := Start(exec.Command("sh", "-c", `setsid sh -c 'echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 60' "$0"; sleep 60`, pidFile))
	if err != nil {
		t.Fatal(err)
	}
	var hostPid int
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(pidFile); err == nil {
			// The pid it wrote is its pid in the namespace; find it on the host
			// as the process whose session differs from the leader's.
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("setsid child did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, pid := range descendants(t, g.Pid()) {
		if sid := statField(t, pid, 3); sid != strconv.Itoa(g.Pid()) && sid != "" {
			hostPid = pid
		}
	}
	if hostPid == 0 {
		t.Fatal("found no descendant in another session")
	}
	if err := g.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(hostPid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("the setsid process %d survived Kill: %v", hostPid, err)
	}
}

// statField returns field n (0: state, 1: ppid, 2: pgrp, 3: session) after
// the command name in /proc/pid/stat, or "" if the process is gone.
func statField(t *testing.T, pid, n int) string {
	t.Helper()
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return ""
	}
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if len(fields) <= n {
		return ""
	}
	return fields[n]
}

// descendants lists the processes below pid.
func descendants(t *testing.T, pid int) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	children := map[int][]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp, err := strconv.Atoi(statField(t, p, 1)); err == nil {
			children[pp] = append(children[pp], p)
		}
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		out = append(out, children[p]...)
		queue = append(queue, children[p]...)
	}
	return out
}
