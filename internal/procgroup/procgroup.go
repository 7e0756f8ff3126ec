// Package procgroup runs a command with everything it starts kept together,
// and ends all of it: the command and every process it started (Chromium's
// renderers and its crash handlers, a redis-server's fork for a rewrite), each
// one reaped before Kill returns, so a test can remove the directories they
// wrote to without racing them.
//
// Where this process may (root, as in CI), the command is the init of a new
// PID namespace: when it dies the kernel kills every process of the namespace,
// including those that left the process group with setsid (Chromium's
// crashpad handlers do), and reports the leader's exit only once all of them
// are gone. Elsewhere it leads a process group of its own, and this process
// becomes their subreaper so the group's orphans can be reaped.
package procgroup

import (
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Group is a started command leading its own process group.
type Group struct {
	cmd  *exec.Cmd
	pgid int
	done chan struct{} // closed once the leader has exited and been reaped

	killOnce sync.Once
	killErr  error
}

// reaperOnce makes this process the subreaper of its descendants: the
// children a group leader leaves behind are re-parented to us, not to PID 1
// (which may never reap them), so Kill can wait for them.
var reaperOnce sync.Once

// Start starts cmd as the leader of a new process group. The group is killed
// if this process dies (SIGKILL to the leader, then its orphans are ours).
func Start(cmd *exec.Cmd) (*Group, error) {
	reaperOnce.Do(setSubreaper)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pgid = 0
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWPID
	if err := cmd.Start(); err != nil {
		if !errors.Is(err, syscall.EPERM) && !errors.Is(err, syscall.EINVAL) {
			return nil, err
		}
		// Not allowed to create a PID namespace: a process group alone.
		cmd.SysProcAttr.Cloneflags &^= syscall.CLONE_NEWPID
		cmd.Process, cmd.ProcessState = nil, nil
		if err := cmd.Start(); err != nil {
			return nil, err
		}
	}
	g := &Group{cmd: cmd, pgid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(g.done)
	}()
	return g, nil
}

// Pid is the leader's process id (and the group id).
func (g *Group) Pid() int { return g.pgid }

// Done is closed when the leader has exited.
func (g *Group) Done() <-chan struct{} { return g.done }

// ExitCode is the leader's exit code once Done is closed (-1 if killed).
func (g *Group) ExitCode() int { return g.cmd.ProcessState.ExitCode() }

// Signal sends sig to the leader only.
func (g *Group) Signal(sig syscall.Signal) error { return syscall.Kill(g.pgid, sig) }

// killTimeout bounds the wait for a killed group to vanish; SIGKILL cannot be
// ignored, so only a process stuck in the kernel can exceed it.
const killTimeout = 30 * time.Second

// Kill sends SIGKILL to every process of the group, reaps the leader and
// every descendant re-parented to us, and returns once no process of the
// group exists. It is idempotent and safe after the leader exited by itself.
func (g *Group) Kill() error {
	g.killOnce.Do(func() { g.killErr = g.kill() })
	return g.killErr
}

func (g *Group) kill() error {
	_ = syscall.Kill(-g.pgid, syscall.SIGKILL)
	deadline := time.Now().Add(killTimeout)
	select {
	case <-g.done:
	case <-time.After(killTimeout):
		return fmt.Errorf("procgroup: leader %d still running %s after SIGKILL", g.pgid, killTimeout)
	}
	for {
		// Reap what we can: orphans of the group are our children now.
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-g.pgid, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
		err := syscall.Kill(-g.pgid, syscall.SIGKILL)
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("procgroup: processes of group %d still exist %s after SIGKILL", g.pgid, killTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
