// Package redistest starts real redis-server processes on free loopback
// ports for tests (and for scripts, through cmd/redistest-style callers):
// it waits for readiness by polling, and stops and removes everything it
// started.
package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/procgroup"
)

// Server is one redis-server process.
type Server struct {
	Port int
	dir  string
	args []string
	proc *procgroup.Group
}

// Start launches a standalone redis-server on a free port and registers its
// cleanup with t. A missing redis-server fails the test: CI installs it.
func Start(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	s, err := StartServer(t.TempDir(), extraArgs...)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// StartServer launches redis-server on a free port in dir; the caller must
// Stop it.
func StartServer(dir string, extraArgs ...string) (*Server, error) {
	return onFreePorts(1, func(ports []int) (*Server, error) { return StartOnPort(dir, ports[0], extraArgs...) })
}

// errExitedAtStart: the server died before answering, most often because a
// port picked as free was taken by another process before redis bound it.
var errExitedAtStart = errors.New("redis-server exited at start")

// onFreePorts runs start with n free ports, and again with new ones (up to
// 10 times) when the server exits at start: FreePort cannot reserve a port,
// and test packages running in parallel pick ports at the same time.
func onFreePorts(n int, start func(ports []int) (*Server, error)) (*Server, error) {
	var err error
	for range 10 {
		ports := make([]int, n)
		for i := range ports {
			if ports[i], err = FreePort(); err != nil {
				return nil, err
			}
		}
		var s *Server
		if s, err = start(ports); !errors.Is(err, errExitedAtStart) {
			return s, err
		}
	}
	return nil, err
}

// StartOnPort launches redis-server on a given port.
func StartOnPort(dir string, port int, extraArgs ...string) (*Server, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return nil, errors.New("redis-server not found on PATH (apt-get install redis-server)")
	}
	s := &Server{Port: port, dir: dir}
	s.args = append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", dir, "--protected-mode", "no", "--logfile", filepath.Join(dir, "redis-"+strconv.Itoa(port)+".log")}, extraArgs...)
	if err := s.launch(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) launch() error { return s.launchWaiting(false) }

// launchWaiting starts the process and waits until it answers PING, or (with
// loading) until it answers at all: a server loading its data set answers
// PING with a LOADING error.
func (s *Server) launchWaiting(loading bool) error {
	proc, err := procgroup.Start(exec.Command("redis-server", s.args...))
	if err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	s.proc = proc
	if err := s.waitReady(10*time.Second, loading); err != nil {
		_ = proc.Kill()
		return err
	}
	return nil
}

// Addr is host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// URL is the redis:// URL of the server.
func (s *Server) URL() string { return "redis://" + s.Addr() }

// Pid is the process id.
func (s *Server) Pid() int { return s.proc.Pid() }

func (s *Server) waitReady(timeout time.Duration, loading bool) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-s.proc.Done():
			return fmt.Errorf("%w: port %d (see %s)", errExitedAtStart, s.Port, s.dir)
		default:
		}
		reply, err := s.Do("PING")
		if (err == nil && reply == "PONG") || (err != nil && strings.HasPrefix(err.Error(), "NOAUTH")) ||
			(loading && err != nil && strings.HasPrefix(err.Error(), "LOADING")) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("redis-server on port %d not ready after %s", s.Port, timeout)
}

// Kill sends SIGKILL to the server's process group (a fork for a rewrite
// included) and waits until all of it is gone.
func (s *Server) Kill() {
	if s.proc == nil {
		return
	}
	if err := s.proc.Kill(); err != nil {
		panic(err) // a process that survives SIGKILL for 30 s: nothing sane to continue with
	}
}

// Restart starts the server again on the same port, after Kill.
func (s *Server) Restart() error { return s.launch() }

// RestartLoading starts the server again on the same port, after Kill, and
// returns as soon as it accepts connections: possibly while it is still
// loading its data set (see Loading), when Restart would wait for the end.
func (s *Server) RestartLoading() error { return s.launchWaiting(true) }

// Info returns the value of one field of INFO section ("" when absent).
func (s *Server) Info(section, field string) (string, error) {
	text, err := s.Do("INFO", section)
	if err != nil {
		return "", err
	}
	for l := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), field+":"); ok {
			return v, nil
		}
	}
	return "", nil
}

// Loading reports whether the server is loading its data set (INFO
// persistence loading:1).
func (s *Server) Loading() (bool, error) {
	v, err := s.Info("persistence", "loading")
	return v == "1", err
}

// Pause stops the process (SIGSTOP); Resume continues it.
func (s *Server) Pause()  { _ = s.proc.Signal(syscall.SIGSTOP) }
func (s *Server) Resume() { _ = s.proc.Signal(syscall.SIGCONT) }

// Stop kills the server and waits for it; it is idempotent.
func (s *Server) Stop() { s.Kill() }

// Do sends one command (inline arguments, no spaces inside) and returns the
// first line of the reply without its type byte; an error reply is an error.
func (s *Server) Do(args ...string) (string, error) {
	lines, err := s.DoLines(args...)
	if err != nil || len(lines) == 0 {
		return "", err
	}
	return lines[0], nil
}

// DoLines sends a command and returns the reply flattened to lines: simple
// strings, integers and bulk strings, recursively through arrays.
func (s *Server) DoLines(args ...string) ([]string, error) {
	c, err := net.DialTimeout("tcp", s.Addr(), time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write([]byte(b.String())); err != nil {
		return nil, err
	}
	r := bufio.NewReader(c)
	var out []string
	return out, readReply(r, &out)
}

func readReply(r *bufio.Reader, out *[]string) error {
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return errors.New("empty reply")
	}
	switch line[0] {
	case '+', ':':
		*out = append(*out, line[1:])
	case '-':
		return errors.New(line[1:])
	case '$':
		n, _ := strconv.Atoi(line[1:])
		if n < 0 {
			*out = append(*out, "")
			return nil
		}
		buf := make([]byte, n+2)
		if _, err := ioReadFull(r, buf); err != nil {
			return err
		}
		*out = append(*out, string(buf[:n]))
	case '*':
		n, _ := strconv.Atoi(line[1:])
		for range max(n, 0) {
			if err := readReply(r, out); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("unexpected reply %q", line)
	}
	return nil
}

func ioReadFull(r *bufio.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// NumSub returns PUBSUB NUMSUB for one channel.
func (s *Server) NumSub(channel string) (int, error) {
	lines, err := s.DoLines("PUBSUB", "NUMSUB", channel)
	if err != nil {
		return 0, err
	}
	if len(lines) != 2 {
		return 0, fmt.Errorf("PUBSUB NUMSUB: %q", lines)
	}
	return strconv.Atoi(lines[1])
}

// Publish runs PUBLISH and returns the receiver count.
func (s *Server) Publish(channel, payload string) (int, error) {
	v, err := s.Do("PUBLISH", channel, payload)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(v)
}

// ClientCount counts CLIENT LIST entries other than the caller's.
func (s *Server) ClientCount() (int, error) {
	list, err := s.Do("CLIENT", "LIST")
	if err != nil {
		return 0, err
	}
	n := 0
	for l := range strings.SplitSeq(strings.TrimSpace(list), "\n") {
		if l != "" && !strings.Contains(l, "cmd=client|list") {
			n++
		}
	}
	return n, nil
}

// FreePort asks the kernel for a free loopback port.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Installed reports whether redis-server is on PATH.
func Installed() bool {
	_, err := exec.LookPath("redis-server")
	return err == nil
}
