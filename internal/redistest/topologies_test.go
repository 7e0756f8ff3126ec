package redistest

import (
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
