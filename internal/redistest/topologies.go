package redistest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Cluster is a Redis Cluster of 3 masters and 3 replicas.
type Cluster struct {
	Nodes []*Server
}

// StartCluster starts 6 cluster-enabled redis-servers, creates the cluster
// with redis-cli --cluster create (one replica per master) and waits until
// every node reports cluster_state:ok. nodeTimeout is cluster-node-timeout.
func StartCluster(t testing.TB, nodeTimeout time.Duration) *Cluster {
	t.Helper()
	c, err := NewCluster(t.TempDir(), nodeTimeout)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	t.Cleanup(c.Stop)
	return c
}

// NewCluster is StartCluster for scripts; the caller must Stop it.
func NewCluster(dir string, nodeTimeout time.Duration) (*Cluster, error) {
	c := &Cluster{}
	for i := range 6 {
		nodeDir := filepath.Join(dir, "node"+strconv.Itoa(i))
		if err := os.MkdirAll(nodeDir, 0o755); err != nil {
			c.Stop()
			return nil, err
		}
		s, err := onFreePorts(2, func(ports []int) (*Server, error) {
			_ = os.Remove(filepath.Join(nodeDir, "nodes.conf")) // from an attempt that lost its port
			return StartOnPort(nodeDir, ports[0], "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
				"--cluster-node-timeout", strconv.Itoa(int(nodeTimeout.Milliseconds())), "--cluster-port", strconv.Itoa(ports[1]),
				"--cluster-require-full-coverage", "no", "--repl-diskless-sync-delay", "0")
		})
		if err != nil {
			c.Stop()
			return nil, err
		}
		c.Nodes = append(c.Nodes, s)
	}
	args := []string{"--cluster", "create"}
	for _, n := range c.Nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-replicas", "1", "--cluster-yes")
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		c.Stop()
		return nil, fmt.Errorf("redis-cli --cluster create: %v\n%s", err, out)
	}
	if err := c.WaitHealthy(30 * time.Second); err != nil {
		c.Stop()
		return nil, err
	}
	// A replica that has not finished its first sync refuses to fail over.
	if err := waitReplicasSynced(c.Nodes, 30*time.Second); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// waitReplicasSynced waits until every replica among nodes reports its link
// to the master up.
func waitReplicasSynced(nodes []*Server, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		synced := true
		for _, n := range nodes {
			info, err := n.Do("INFO", "replication")
			if err != nil || (strings.Contains(info, "role:slave") && !strings.Contains(info, "master_link_status:up")) {
				synced = false
				break
			}
		}
		if synced {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("replicas did not finish their first sync in time")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Addrs lists every node's host:port (seed nodes for a client).
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		out[i] = n.Addr()
	}
	return out
}

// WaitHealthy waits until every live node says cluster_state:ok and all
// 16384 slots are served by masters that answer.
func (c *Cluster) WaitHealthy(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ok := true
		for _, n := range c.Nodes {
			if !n.Alive() {
				continue
			}
			info, err := n.Do("CLUSTER", "INFO")
			if err != nil || !strings.Contains(info, "cluster_state:ok") || !strings.Contains(info, "cluster_slots_ok:16384") {
				ok = false
				break
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("cluster not healthy in time")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// MasterOf returns the live node that currently serves slot as master.
func (c *Cluster) MasterOf(slot int) (*Server, error) {
	for _, n := range c.Nodes {
		if n.Alive() {
			if owner, err := n.slotOwner(slot); err == nil && owner {
				return n, nil
			}
		}
	}
	return nil, fmt.Errorf("no live master for slot %d", slot)
}

// KeySlot asks a live node for the hash slot of key.
func (c *Cluster) KeySlot(key string) (int, error) {
	for _, n := range c.Nodes {
		if n.Alive() {
			v, err := n.Do("CLUSTER", "KEYSLOT", key)
			if err == nil {
				return strconv.Atoi(v)
			}
		}
	}
	return 0, errors.New("no live node")
}

// slotOwner reports whether n is the master serving slot (from CLUSTER
// NODES as n sees itself).
func (n *Server) slotOwner(slot int) (bool, error) {
	ranges, err := n.ownSlots()
	if err != nil {
		return false, err
	}
	for _, r := range ranges {
		if slot >= r[0] && slot <= r[1] {
			return true, nil
		}
	}
	return false, nil
}

// ownSlots lists the slot ranges n serves as master, as n sees itself.
func (n *Server) ownSlots() ([][2]int, error) {
	nodes, err := n.Do("CLUSTER", "NODES")
	if err != nil {
		return nil, err
	}
	var out [][2]int
	for line := range strings.SplitSeq(nodes, "\n") {
		f := strings.Fields(line)
		if len(f) < 8 || !strings.Contains(f[2], "myself") || !strings.Contains(f[2], "master") {
			continue
		}
		for _, r := range f[8:] {
			if strings.HasPrefix(r, "[") {
				continue
			}
			lo, hi, found := strings.Cut(r, "-")
			a, _ := strconv.Atoi(lo)
			b := a
			if found {
				b, _ = strconv.Atoi(hi)
			}
			out = append(out, [2]int{a, b})
		}
	}
	return out, nil
}

// Masters lists the live nodes that say they are masters.
func (c *Cluster) Masters() []*Server {
	var out []*Server
	for _, n := range c.Nodes {
		if !n.Alive() {
			continue
		}
		if role, err := n.DoLines("ROLE"); err == nil && len(role) > 0 && role[0] == "master" {
			out = append(out, n)
		}
	}
	return out
}

// SlotOwners maps each slot to the live master serving it, as each master
// sees itself (nil: no live master claims it).
func (c *Cluster) SlotOwners() ([]*Server, error) {
	owners := make([]*Server, 16384)
	for _, n := range c.Masters() {
		ranges, err := n.ownSlots()
		if err != nil {
			return nil, err
		}
		for _, r := range ranges {
			for s := r[0]; s <= r[1] && s < 16384; s++ {
				owners[s] = n
			}
		}
	}
	return owners, nil
}

// MoveSlot hands an empty slot from its current master to target (the
// IMPORTING/MIGRATING/NODE sequence of a resharding with no keys to move).
func (c *Cluster) MoveSlot(slot int, target *Server) error {
	source, err := c.MasterOf(slot)
	if err != nil {
		return err
	}
	if source == target {
		return nil
	}
	sourceID, err := source.Do("CLUSTER", "MYID")
	if err != nil {
		return err
	}
	targetID, err := target.Do("CLUSTER", "MYID")
	if err != nil {
		return err
	}
	s := strconv.Itoa(slot)
	for _, step := range []struct {
		node *Server
		args []string
	}{
		{target, []string{"CLUSTER", "SETSLOT", s, "IMPORTING", sourceID}},
		{source, []string{"CLUSTER", "SETSLOT", s, "MIGRATING", targetID}},
		{target, []string{"CLUSTER", "SETSLOT", s, "NODE", targetID}},
		{source, []string{"CLUSTER", "SETSLOT", s, "NODE", targetID}},
	} {
		if _, err := step.node.Do(step.args...); err != nil {
			return fmt.Errorf("%v: %w", step.args, err)
		}
	}
	return nil
}

// Stop stops every node.
func (c *Cluster) Stop() {
	for _, n := range c.Nodes {
		n.Stop()
	}
}

// Alive reports whether the process is running.
func (s *Server) Alive() bool {
	if s.proc == nil {
		return false
	}
	select {
	case <-s.proc.Done():
		return false
	default:
		return true
	}
}

// Sentinel is a master, a replica and three Sentinels monitoring them.
type Sentinel struct {
	Master, Replica *Server
	Sentinels       []*Server
	Name            string
}

// StartSentinel starts the group with a short down-after time so failovers
// take seconds, and waits until every Sentinel knows the replica and the
// other Sentinels.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	s, err := NewSentinel(t.TempDir())
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// NewSentinel is StartSentinel for scripts; the caller must Stop it.
func NewSentinel(dir string) (*Sentinel, error) {
	g := &Sentinel{Name: "mymaster"}
	var err error
	if g.Master, err = StartServer(mkdir(dir, "master"), "--repl-diskless-sync-delay", "0"); err != nil {
		return nil, err
	}
	if g.Replica, err = StartServer(mkdir(dir, "replica"), "--replicaof", "127.0.0.1", strconv.Itoa(g.Master.Port)); err != nil {
		g.Stop()
		return nil, err
	}
	for i := range 3 {
		sdir := mkdir(dir, "sentinel"+strconv.Itoa(i))
		s, err := onFreePorts(1, func(ports []int) (*Server, error) {
			conf := filepath.Join(sdir, "sentinel.conf")
			body := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor %s 127.0.0.1 %d 2\n"+
				"sentinel down-after-milliseconds %s 1000\nsentinel failover-timeout %s 5000\nsentinel parallel-syncs %s 1\n",
				ports[0], sdir, g.Name, g.Master.Port, g.Name, g.Name, g.Name)
			if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
				return nil, err
			}
			s := &Server{Port: ports[0], dir: sdir, args: []string{conf, "--sentinel"}}
			return s, s.launch()
		})
		if err != nil {
			g.Stop()
			return nil, err
		}
		g.Sentinels = append(g.Sentinels, s)
	}
	if err := waitReplicasSynced([]*Server{g.Replica}, 30*time.Second); err != nil {
		g.Stop()
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for !g.ready() {
		if time.Now().After(deadline) {
			g.Stop()
			return nil, errors.New("sentinels did not discover the replica and each other in time")
		}
		time.Sleep(100 * time.Millisecond)
	}
	return g, nil
}

func (g *Sentinel) ready() bool {
	for _, s := range g.Sentinels {
		lines, err := s.DoLines("SENTINEL", "MASTER", g.Name)
		if err != nil {
			return false
		}
		fields := map[string]string{}
		for i := 0; i+1 < len(lines); i += 2 {
			fields[lines[i]] = lines[i+1]
		}
		if fields["num-slaves"] != "1" || fields["num-other-sentinels"] != "2" {
			return false
		}
	}
	return true
}

// Addrs lists the Sentinels' host:port.
func (g *Sentinel) Addrs() []string {
	out := make([]string, len(g.Sentinels))
	for i, s := range g.Sentinels {
		out[i] = s.Addr()
	}
	return out
}

// CurrentMaster asks a Sentinel for the master's address.
func (g *Sentinel) CurrentMaster() (string, error) {
	for _, s := range g.Sentinels {
		lines, err := s.DoLines("SENTINEL", "GET-MASTER-ADDR-BY-NAME", g.Name)
		if err == nil && len(lines) == 2 {
			return lines[0] + ":" + lines[1], nil
		}
	}
	return "", errors.New("no sentinel answered")
}

// Stop stops every process of the group.
func (g *Sentinel) Stop() {
	for _, s := range g.Sentinels {
		s.Stop()
	}
	for _, s := range []*Server{g.Replica, g.Master} {
		if s != nil {
			s.Stop()
		}
	}
}

func mkdir(dir, name string) string {
	d := filepath.Join(dir, name)
	_ = os.MkdirAll(d, 0o755)
	return d
}
