// Command wsbench is the load generator for websocket-service: it speaks the
// service's protocol with a different WebSocket library (lxzan/gws), publishes
// through Redis with the send time inside each payload, and reports one JSON
// result on stdout (progress on stderr).
//
// Scenarios: idle (connect and hold; RSS and CPU per connection), deliver
// (end-to-end latency, loss and duplicates at a publish rate; --find-max),
// storm (drop every connection at once and measure the way back).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// options are the flags of every scenario.
type options struct {
	Scenario    string
	URL         string
	Redis       string
	Prefix      string
	Secret      string
	TokensFile  string
	Transport   string // websocket or sse
	KeyFile     string // PEM private key: mint asymmetric tokens (--alg, --kid)
	Alg         string
	Kid         string
	Conns       int
	Users       int
	UserOffset  int
	ConnectRate int
	Concurrency int
	Sources     int
	Hold        time.Duration
	Rate        int
	Duration    time.Duration
	Drain       time.Duration
	FindMax     bool
	P99Bound    time.Duration
	Step        float64
	ServerPids  string
	Payload     int
	Sharded     bool
	History     bool
	Reconnect   bool
	Behind      int
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "wsbench:", err)
		}
		os.Exit(2)
	}
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("wsbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.Scenario, "scenario", "deliver", "idle | deliver | storm | publish | resume | repair")
	fs.StringVar(&o.Transport, "transport", "websocket", "websocket, or sse (Server-Sent Events on /sse/v1/status/{user})")
	fs.StringVar(&o.URL, "url", "ws://127.0.0.1:8080", "gateway base URL; comma-separated to spread connections over several instances")
	fs.StringVar(&o.Redis, "redis", "redis://127.0.0.1:6379", "Redis URL to publish through")
	fs.StringVar(&o.Prefix, "prefix", "ws", "REDIS_CHANNEL_PREFIX of the gateway")
	fs.StringVar(&o.Secret, "jwt-secret", os.Getenv("JWT_SECRET_KEY"), "HS256 secret to mint tokens (default $JWT_SECRET_KEY)")
	fs.StringVar(&o.TokensFile, "tokens-file", "", "file of lines 'user token' to use instead of minting")
	fs.StringVar(&o.KeyFile, "key-file", "", "PEM private key to mint tokens with instead of --jwt-secret (RSA, ECDSA, Ed25519)")
	fs.StringVar(&o.Alg, "alg", "", "--key-file: algorithm (default RS256, ES256 or EdDSA by key type)")
	fs.StringVar(&o.Kid, "kid", "", "--key-file: kid header")
	fs.IntVar(&o.Conns, "conns", 1000, "connections")
	fs.IntVar(&o.Users, "users", 0, "users the connections are spread over (default: one per connection)")
	fs.IntVar(&o.UserOffset, "user-offset", 0, "first user number (several wsbench processes use disjoint ranges)")
	fs.IntVar(&o.ConnectRate, "connect-rate", 0, "connections opened per second (0: as fast as --concurrency allows)")
	fs.IntVar(&o.Concurrency, "concurrency", 256, "handshakes in flight at once")
	fs.IntVar(&o.Sources, "sources", 1, "dial from 127.0.0.1 … 127.0.0.N (each address has ~28k ephemeral ports)")
	fs.DurationVar(&o.Hold, "hold", 10*time.Second, "idle: how long to hold the connections while measuring server CPU")
	fs.IntVar(&o.Rate, "rate", 1000, "deliver: messages published per second (to random users)")
	fs.DurationVar(&o.Duration, "duration", 10*time.Second, "deliver: how long to publish")
	fs.DurationVar(&o.Drain, "drain", 3*time.Second, "deliver: wait this long after the last publish for stragglers")
	fs.BoolVar(&o.FindMax, "find-max", false, "deliver: step the rate up and report the highest with zero loss and p99 under --p99-bound")
	fs.DurationVar(&o.P99Bound, "p99-bound", 20*time.Millisecond, "deliver --find-max: latency bound")
	fs.Float64Var(&o.Step, "step", 1.25, "deliver --find-max: factor between successive rates")
	fs.StringVar(&o.ServerPids, "server-pid", "", "pid(s) of the gateway process(es), comma-separated, to read RSS and CPU from /proc")
	fs.IntVar(&o.Payload, "payload", 100, "deliver: approximate payload size in bytes")
	fs.BoolVar(&o.Sharded, "sharded", false, "publish with SPUBLISH (REDIS_PUBSUB_MODE=sharded)")
	fs.BoolVar(&o.History, "history", false, "publish with history (notify/publish.lua, EVALSHA pipelined)")
	fs.BoolVar(&o.Reconnect, "reconnect", false, "deliver: a connection closed by the server reconnects at once with since=<its last id> (rolling deploys)")
	fs.IntVar(&o.Behind, "behind", 20, "resume: messages each user misses while disconnected")
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: wsbench [flags]\n\nLoad generator for websocket-service. One JSON result on stdout; progress on stderr.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if o.Scenario == "resume" || o.Scenario == "repair" {
		o.History = true // they are about history
	}
	if o.Users <= 0 || (o.Users > o.Conns && o.Scenario != "publish") {
		o.Users = o.Conns
	}
	if o.Secret == "" && o.TokensFile == "" && o.KeyFile == "" {
		return o, errors.New("give --jwt-secret (or $JWT_SECRET_KEY), --key-file or --tokens-file")
	}
	if o.Transport != "websocket" && o.Transport != "sse" {
		return o, errors.New("--transport must be websocket or sse")
	}
	if o.Sources < 1 || o.Sources > 250 {
		return o, errors.New("--sources must be 1..250")
	}
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	b, err := newBench(o, stderr)
	if err != nil {
		return err
	}
	defer b.close()
	var result any
	switch o.Scenario {
	case "idle":
		result, err = b.idle(ctx)
	case "deliver":
		if o.FindMax {
			result, err = b.findMax(ctx)
		} else {
			result, err = b.deliverScenario(ctx)
		}
	case "storm":
		result, err = b.storm(ctx)
	case "publish":
		result, err = b.publishThroughput(ctx)
	case "resume":
		result, err = b.resumeStorm(ctx)
	case "repair":
		result, err = b.repair(ctx)
	default:
		return fmt.Errorf("unknown --scenario %q", o.Scenario)
	}
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(result)
}

func splitList(s string) []string {
	var out []string
	for p := range strings.SplitSeq(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
