// Command redistopo starts a Redis topology on free loopback ports for local
// development and scripts (the same harness the tests use): a standalone
// server, a 3-master/3-replica cluster, or a master, a replica and three
// Sentinels. It prints the environment for websocket-service and stops and
// removes everything on Ctrl-C or SIGTERM.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/huleedu/websocket-service/internal/redistest"
)

func main() {
	kind := flag.String("topology", "cluster", "standalone | cluster | sentinel")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "Usage: redistopo [--topology standalone|cluster|sentinel]\n\nStarts redis-server processes on free loopback ports and prints the websocket-service environment for them.")
		flag.PrintDefaults()
	}
	flag.Parse()
	dir, err := os.MkdirTemp("", "redistopo-")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(dir)
	var stop func()
	switch *kind {
	case "standalone":
		s, err := redistest.StartServer(dir)
		if err != nil {
			fail(err)
		}
		stop = s.Stop
		fmt.Printf("REDIS_URL=%s\n", s.URL())
	case "cluster":
		c, err := redistest.NewCluster(dir, 2*time.Second)
		if err != nil {
			fail(err)
		}
		stop = c.Stop
		fmt.Printf("REDIS_CLUSTER_NODES=%s\n", strings.Join(c.Addrs(), ","))
	case "sentinel":
		g, err := redistest.NewSentinel(dir)
		if err != nil {
			fail(err)
		}
		stop = g.Stop
		fmt.Printf("REDIS_SENTINEL_ADDRS=%s\nREDIS_SENTINEL_MASTER=%s\n", strings.Join(g.Addrs(), ","), g.Name)
	default:
		fail(fmt.Errorf("unknown --topology %q", *kind))
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	fmt.Fprintln(os.Stderr, "running; Ctrl-C stops and removes everything")
	<-ctx.Done()
	stop()
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "redistopo:", err)
	os.Exit(1)
}
