package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/redistest"
)

// procKiB reads a "VmRSS:"-style field of /proc/pid/status in KiB.
func procKiB(t *testing.T, pid int, field string) int {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// TestPingFloodStaysBounded runs the real binary with the inbound rate limit
// lifted, and a client that sends 400,000 pings with 125-byte payloads
// (50 MB of pongs to answer) and reads nothing. Pongs wait behind the
// stalled output and are coalesced, so the server's peak RSS grows by a few
// MiB, not by the pongs it was asked for.
func TestPingFloodStaysBounded(t *testing.T) {
	redis := redistest.Start(t)
	g := startGateway(t, redis.URL(), "WEBSOCKET_RATE_LIMIT=1000000", "WEBSOCKET_RATE_BURST=1000000")
	b, err := newBench(testOptions(g, redis.URL()), os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	tok, err := b.token("flooder")
	if err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(g.url, "ws://")
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /ws/?token=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", tok, addr)
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	pid := g.proc.Pid()
	before := procKiB(t, pid, "VmHWM")

	// One masked ping frame with a 125-byte payload, sent in batches.
	ping := []byte{0x89, 0x80 | 125, 0, 0, 0, 0}
	ping = append(ping, make([]byte, 125)...)
	batch := make([]byte, 0, len(ping)*1000)
	for range 1000 {
		batch = append(batch, ping...)
	}
	_ = c.SetWriteDeadline(time.Now().Add(time.Minute))
	for range 400 {
		if _, err := c.Write(batch); err != nil {
			t.Fatalf("flood write: %v (the server closed a connection it should keep)", err)
		}
	}
	// Every ping has been read by the server once it answers this text
	// ping: read until its pong arrives (frames are not parsed, just searched).
	text := []byte(`{"type":"ping"}`)
	frame := append([]byte{0x81, 0x80 | byte(len(text)), 0, 0, 0, 0}, text...)
	if _, err := c.Write(frame); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(time.Minute))
	var seen []byte
	buf := make([]byte, 64<<10)
	for !strings.Contains(string(seen), `"event":"pong"`) {
		n, err := r.Read(buf)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		seen = append(seen[max(0, len(seen)-64):], buf[:n]...)
	}
	after := procKiB(t, pid, "VmHWM")
	t.Logf("server peak RSS %d KiB before the flood, %d KiB after 400,000 pings (+%d KiB)", before, after, after-before)
	if grown := after - before; grown > 16<<10 {
		t.Fatalf("peak RSS grew by %d KiB during a ping flood: pongs are not bounded", grown)
	}
}
