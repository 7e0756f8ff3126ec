package gateway

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/internal/redistest"
	"github.com/huleedu/websocket-service/notify"
)

// clusterPublisher publishes through a cluster-aware client.
func clusterPublisher(t *testing.T, seeds []string, sentinelMaster string) rueidis.Client {
	opt := rueidis.ClientOption{InitAddress: seeds, DisableCache: true}
	if sentinelMaster != "" {
		opt.Sentinel = rueidis.SentinelOption{MasterSet: sentinelMaster}
	}
	c, err := rueidis.NewClient(opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func publishCmd(c rueidis.Client, sharded bool, user, payload string) rueidis.Completed {
	if sharded {
		return c.B().Spublish().Channel("ws:" + user).Message(payload).Build()
	}
	return c.B().Publish().Channel("ws:" + user).Message(payload).Build()
}

// connectionsPerNode counts, on every live node, the connections named name.
func connectionsPerNode(t *testing.T, nodes []*redistest.Server, name string) map[string]int {
	out := map[string]int{}
	for _, n := range nodes {
		if !n.Alive() {
			continue
		}
		list, err := n.Do("CLIENT", "LIST")
		if err != nil {
			t.Fatal(err)
		}
		out[n.Addr()] = strings.Count(list, " name="+name+" ")
	}
	return out
}

func TestThreeInstancesOnCluster(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	for _, sharded := range []bool{false, true} {
		t.Run(map[bool]string{false: "classic", true: "sharded"}[sharded], func(t *testing.T) {
			if sharded && testing.Short() {
				t.Skip("short")
			}
			const users = 3000
			prefix := fmt.Sprintf("m%v-", sharded)
			var stacks []*stack
			for i := range 3 {
				stacks = append(stacks, newStack(t, func(sc *stackConfig) {
					sc.topology = &broker.Topology{ClusterNodes: c.Addrs()}
					sc.sharded = sharded
					sc.name = fmt.Sprintf("gw%d-%v", i, sharded)
				}))
			}
			type conn struct {
				user string
				c    *client
			}
			var conns []conn
			var mu sync.Mutex
			var wg sync.WaitGroup
			sem := make(chan struct{}, 64)
			for i := range users {
				user := prefix + fmt.Sprint(i)
				targets := []int{i % 3}
				if i%10 == 0 { // some users on two instances
					targets = append(targets, (i+1)%3)
				}
				for _, inst := range targets {
					sem <- struct{}{}
					wg.Go(func() {
						defer func() { <-sem }()
						cl := stacks[inst].dial(user)
						mu.Lock()
						conns = append(conns, conn{user, cl})
						mu.Unlock()
					})
				}
			}
			wg.Wait()
			pub := clusterPublisher(t, c.Addrs(), "")
			cmds := make(rueidis.Commands, 0, 2*users)
			for i := range users {
				cmds = append(cmds, publishCmd(pub, sharded, prefix+fmt.Sprint(i), fmt.Sprintf(`{"u":"%s%d"}`, prefix, i)))
			}
			for i := range users { // a second message: a duplicate of the first would arrive before it
				cmds = append(cmds, publishCmd(pub, sharded, prefix+fmt.Sprint(i), `{"end":true}`))
			}
			for i, res := range pub.DoMulti(context.Background(), cmds...) {
				if err := res.Error(); err != nil {
					t.Fatalf("publish %d: %v", i, err)
				}
			}
			for _, cn := range conns {
				if got := cn.c.mustNext(); got != fmt.Sprintf(`{"u":"%s"}`, cn.user) {
					t.Fatalf("%s got %s", cn.user, got)
				}
				if got := cn.c.mustNext(); got != `{"end":true}` {
					t.Fatalf("%s got %s, want the end marker (duplicate?)", cn.user, got)
				}
			}
			// A user with no connection anywhere: no instance is subscribed.
			if !sharded {
				if n, err := pub.Do(context.Background(), pub.B().Publish().Channel("ws:nobody").Message("{}").Build()).AsInt64(); err != nil || n != 0 {
					t.Fatalf("PUBLISH to a user with no connection reached %d instances (%v)", n, err)
				}
			}
			for i := range 3 {
				name := fmt.Sprintf("gw%d-%v", i, sharded)
				for node, n := range connectionsPerNode(t, c.Nodes, name) {
					if n > 3 { // pub/sub, commands (probes), history reads
						t.Fatalf("instance %s holds %d connections to %s, want <= 3", name, n, node)
					}
				}
			}
			t.Logf("%d connections over 3 instances, %d users: each message delivered exactly once", len(conns), users)

			// Disconnect with revoke in this topology: the user of two
			// instances loses both sockets, another user keeps hers, and the
			// old token is refused everywhere.
			victim, other := prefix+"0", prefix+"1"
			var victimConns, otherConns []*reader
			for _, cn := range conns {
				switch cn.user {
				case victim:
					victimConns = append(victimConns, cn.c.readAll())
				case other:
					otherConns = append(otherConns, cn.c.readAll())
				}
			}
			res, err := notify.NewDisconnecter(pub, "ws", sharded).Disconnect(context.Background(), victim,
				notify.DisconnectOptions{Reason: "cluster", Revoke: true})
			if err != nil || len(victimConns) != 2 {
				t.Fatalf("disconnect: %v (%d victim sockets)", err, len(victimConns))
			}
			for _, r := range victimConns {
				eventually(t, 10*time.Second, "victim closed", func() bool { return r.err() != nil })
				if code, ec, _ := closeOf(r); code != 4004 || ec != "REVOKED" {
					t.Fatalf("victim: %d %s (%v)", code, ec, r.err())
				}
			}
			for _, st := range stacks {
				expectRefused(t, st, victim, mintIAT(t, victim, time.Unix(res.RevokedAt, 0)), 1008, "AUTHENTICATION_ERROR", "revoked")
			}
			for _, r := range otherConns {
				if r.err() != nil {
					t.Fatalf("bystander closed: %v", r.err())
				}
			}
		})
	}
}

// deliveryGap publishes a fresh message to user every 20 ms from start until
// r has one (publish errors are retried: the publisher's own route may lag
// the cluster), and returns how long after start deliveries resumed.
func deliveryGap(t *testing.T, pub rueidis.Client, sharded bool, user string, r *reader, start time.Time) time.Duration {
	t.Helper()
	for i := 0; ; i++ {
		marker := fmt.Sprintf(`{"gap":%d}`, i)
		pub.Do(context.Background(), publishCmd(pub, sharded, user, marker))
		deadline := time.Now().Add(20 * time.Millisecond)
		for time.Now().Before(deadline) {
			if r.count(`"gap"`) > 0 {
				return time.Since(start)
			}
			time.Sleep(2 * time.Millisecond)
		}
		if time.Since(start) > 60*time.Second {
			t.Fatalf("no delivery within 60 s of the failure")
		}
	}
}

// subscriberNode finds the node holding name's pub/sub connection.
func subscriberNode(t *testing.T, nodes []*redistest.Server, name string) *redistest.Server {
	for _, n := range nodes {
		if !n.Alive() {
			continue
		}
		list, _ := n.Do("CLIENT", "LIST")
		for line := range strings.SplitSeq(list, "\n") {
			if strings.Contains(line, " name="+name+" ") && (strings.Contains(line, " sub=1") || strings.Contains(line, "flags=P")) {
				return n
			}
		}
	}
	t.Fatal("no node holds the pub/sub connection")
	return nil
}

func TestClusterFailoverClassic(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	st := newStack(t, func(sc *stackConfig) {
		sc.topology = &broker.Topology{ClusterNodes: c.Addrs()}
		sc.name = "failover"
		sc.probe = time.Second
	})
	readers := make([]*reader, 50)
	for i := range readers {
		readers[i] = st.dial(fmt.Sprintf("f%d", i)).readAll()
	}
	victim := subscriberNode(t, c.Nodes, "failover")
	start := time.Now()
	victim.Kill()
	for i, r := range readers {
		eventually(t, 30*time.Second, fmt.Sprintf("client %d degraded", i), func() bool { return r.count("connection.degraded") == 1 })
	}
	for i, r := range readers {
		eventually(t, 60*time.Second, fmt.Sprintf("client %d restored", i), func() bool { return r.count("connection.restored") == 1 })
	}
	pub := clusterPublisher(t, c.Addrs(), "")
	gap := deliveryGap(t, pub, false, "f0", readers[0], start)
	for i, r := range readers {
		// The publisher's own route may still point at the dead master until
		// the cluster has promoted its replica: retry the publish, not the read.
		eventually(t, 30*time.Second, "publish accepted", func() bool {
			return pub.Do(context.Background(), publishCmd(pub, false, fmt.Sprintf("f%d", i), `{"after":1}`)).Error() == nil
		})
		eventually(t, 10*time.Second, "delivery after failover", func() bool { return r.count(`"after"`) == 1 })
		if r.err() != nil {
			t.Fatalf("client %d closed: %v", i, r.err())
		}
	}
	t.Logf("cluster (classic) failover: delivery gap %s from SIGKILL of the subscribed node", gap.Round(time.Millisecond))
}

func TestSentinelFailover(t *testing.T) {
	g := redistest.StartSentinel(t)
	st := newStack(t, func(sc *stackConfig) {
		sc.topology = &broker.Topology{SentinelAddrs: g.Addrs(), SentinelMaster: g.Name}
		sc.probe = time.Second
	})
	readers := make([]*reader, 50)
	for i := range readers {
		readers[i] = st.dial(fmt.Sprintf("s%d", i)).readAll()
	}
	start := time.Now()
	g.Master.Kill()
	for i, r := range readers {
		eventually(t, 30*time.Second, fmt.Sprintf("client %d degraded", i), func() bool { return r.count("connection.degraded") == 1 })
	}
	for i, r := range readers {
		eventually(t, 60*time.Second, fmt.Sprintf("client %d restored", i), func() bool { return r.count("connection.restored") == 1 })
	}
	if addr, _ := g.CurrentMaster(); addr != g.Replica.Addr() {
		t.Fatalf("sentinel master is %s, want the promoted replica %s", addr, g.Replica.Addr())
	}
	pub := clusterPublisher(t, g.Addrs(), g.Name)
	gap := deliveryGap(t, pub, false, "s0", readers[0], start)
	for i, r := range readers {
		pub.Do(context.Background(), publishCmd(pub, false, fmt.Sprintf("s%d", i), `{"after":1}`))
		eventually(t, 10*time.Second, "delivery after failover", func() bool { return r.count(`"after"`) == 1 })
		if r.err() != nil {
			t.Fatalf("client %d closed: %v", i, r.err())
		}
	}
	t.Logf("sentinel failover: delivery gap %s from SIGKILL of the master", gap.Round(time.Millisecond))

	// Disconnect and revoke through Sentinel, on the promoted master.
	res, err := notify.NewDisconnecter(pub, "ws", false).Disconnect(context.Background(), "s1",
		notify.DisconnectOptions{Reason: "sentinel", Revoke: true})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "s1 closed", func() bool { return readers[1].err() != nil })
	if code, ec, _ := closeOf(readers[1]); code != 4004 || ec != "REVOKED" {
		t.Fatalf("s1: %d %s (%v)", code, ec, readers[1].err())
	}
	expectRefused(t, st, "s1", mintIAT(t, "s1", time.Unix(res.RevokedAt, 0)), 1008, "AUTHENTICATION_ERROR", "revoked")
	if readers[2].err() != nil {
		t.Fatalf("bystander closed: %v", readers[2].err())
	}
}

// shardedPublish publishes with SPUBLISH, retrying while the cluster is
// still moving the slot (the publisher's problem, not the gateway's).
func shardedPublish(t *testing.T, pub rueidis.Client, user, payload string) {
	t.Helper()
	eventually(t, 30*time.Second, "SPUBLISH accepted", func() bool {
		return pub.Do(context.Background(), publishCmd(pub, true, user, payload)).Error() == nil
	})
}

func TestClusterFailoverSharded(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	st := newStack(t, func(sc *stackConfig) {
		sc.topology = &broker.Topology{ClusterNodes: c.Addrs()}
		sc.sharded, sc.name, sc.probe = true, "sharded-failover", time.Second
	})
	const n = 60
	readers := make([]*reader, n)
	for i := range readers {
		readers[i] = st.dial(fmt.Sprintf("sf%d", i)).readAll()
	}
	victimSlot, _ := c.KeySlot("ws:sf0")
	victim, err := c.MasterOf(victimSlot)
	if err != nil {
		t.Fatal(err)
	}
	var affected, unaffected []int
	for i := range n {
		slot, _ := c.KeySlot(fmt.Sprintf("ws:sf%d", i))
		if owner, _ := c.MasterOf(slot); owner == victim {
			affected = append(affected, i)
		} else {
			unaffected = append(unaffected, i)
		}
	}
	start := time.Now()
	victim.Kill()
	for _, i := range affected {
		eventually(t, 30*time.Second, fmt.Sprintf("client %d degraded", i), func() bool { return readers[i].count("connection.degraded") == 1 })
	}
	for _, i := range affected {
		eventually(t, 60*time.Second, fmt.Sprintf("client %d restored", i), func() bool { return readers[i].count("connection.restored") == 1 })
	}
	pub := clusterPublisher(t, c.Addrs(), "")
	gap := deliveryGap(t, pub, true, "sf0", readers[0], start)
	for i, r := range readers {
		shardedPublish(t, pub, fmt.Sprintf("sf%d", i), `{"after":1}`)
		eventually(t, 10*time.Second, "delivery after failover", func() bool { return r.count(`"after"`) == 1 })
		if r.err() != nil {
			t.Fatalf("client %d closed: %v", i, r.err())
		}
	}
	for _, i := range unaffected {
		if readers[i].count("connection.degraded") != 0 {
			t.Fatalf("client %d on a healthy node was told degraded", i)
		}
	}
	t.Logf("cluster (sharded) failover: %d of %d users affected; delivery gap %s from SIGKILL of their master",
		len(affected), n, gap.Round(time.Millisecond))
}

func TestSlotMigrationSharded(t *testing.T) {
	c := redistest.StartCluster(t, 2*time.Second)
	st := newStack(t, func(sc *stackConfig) {
		sc.topology = &broker.Topology{ClusterNodes: c.Addrs()}
		sc.sharded, sc.name = true, "migration"
	})
	users := []string{"mig-a", "mig-b", "mig-c"}
	readers := map[string]*reader{}
	for _, u := range users {
		readers[u] = st.dial(u).readAll()
	}
	pub := clusterPublisher(t, c.Addrs(), "")
	for _, u := range users {
		slot, _ := c.KeySlot("ws:" + u)
		source, err := c.MasterOf(slot)
		if err != nil {
			t.Fatal(err)
		}
		var target *redistest.Server
		for _, n := range c.Nodes {
			if n != source {
				if role, _ := n.DoLines("ROLE"); len(role) > 0 && role[0] == "master" {
					target = n
					break
				}
			}
		}
		if err := c.MoveSlot(slot, target); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "slot owned by the target", func() bool {
			owner, err := c.MasterOf(slot)
			return err == nil && owner == target
		})
		// Pub/sub keeps nothing: what is published while the gateway moves the
		// subscription is lost, so publish until one arrives, and time it.
		gap := deliveryGap(t, pub, true, u, readers[u], time.Now())
		t.Logf("%s: delivery resumed %s after its slot moved", u, gap.Round(time.Millisecond))
	}
	for u, r := range readers {
		if r.err() != nil {
			t.Fatalf("%s closed: %v", u, r.err())
		}
	}
}
