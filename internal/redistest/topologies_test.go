package redistest

import (
	"net"
	"strconv"
	"testing"
	"time"
)

func TestClusterAndSentinelStart(t *testing.T) {
	c := StartCluster(t, 2*time.Second)
	slot, err := c.KeySlot("ws:alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.MasterOf(slot); err != nil {
		t.Fatal(err)
	}
	g := StartSentinel(t)
	if addr, err := g.CurrentMaster(); err != nil || addr != g.Master.Addr() {
		t.Fatalf("master %q %v, want %s", addr, err, g.Master.Addr())
	}
}

// TestStartServerRetriesATakenPort: when the port picked as free is taken
// before redis-server binds it, the server exits at start and StartServer
// tries again on another port.
func TestStartServerRetriesATakenPort(t *testing.T) {
	taken := 0
	s, err := onFreePorts(1, func(ports []int) (*Server, error) {
		if taken == 0 {
			l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(ports[0]))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			taken = ports[0]
		}
		return StartOnPort(t.TempDir(), ports[0])
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if taken == 0 || s.Port == taken {
		t.Fatalf("started on %d, the taken port was %d", s.Port, taken)
	}
}
