package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/golang-jwt/jwt/v5"
	"github.com/lxzan/gws"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/notify"
)

// bench holds the connections and the publisher of one run.
type bench struct {
	o       options
	log     io.Writer
	urls    []string
	tokens  map[string]string
	signKey crypto.Signer // --key-file
	redis   rueidis.Client

	conns      []*benchConn
	connsOf    []int32 // per user: connections currently open
	failures   sync.Map
	failCount  atomic.Int64
	closedOpen atomic.Int64 // connections closed by the server while we held them

	mu        sync.Mutex
	latency   *hdrhistogram.Histogram // µs
	handshake *hdrhistogram.Histogram // µs

	historySHA string // publish.lua loaded in Redis
	stopping   atomic.Bool
	reconnects atomic.Int64

	received []atomic.Int32 // deliver: per sequence number
	dups     atomic.Int64
	events   atomic.Int64 // connection.degraded/restored and other service events
}

type benchConn struct {
	b       *bench
	user    int
	ws      *gws.Conn
	nc      net.Conn     // the TCP connection (WebSocket or event stream)
	lastSeq atomic.Int64 // sequence numbers to one user arrive in increasing order
	probe   atomic.Int64 // storm: last probe generation seen
	done    chan struct{}

	index    int                       // position in bench.conns
	lastID   atomic.Pointer[notify.ID] // newest history id received
	gaps     atomic.Int64              // history ids skipped
	repeats  atomic.Int64              // history ids received twice
	restored atomic.Int32              // 1: connection.restored complete:true seen, -1: complete:false
	degraded atomic.Int32
}

func newBench(o options, log io.Writer) (*bench, error) {
	b := &bench{o: o, log: log, urls: splitList(o.URL),
		latency: hdrhistogram.New(1, 60_000_000, 3), handshake: hdrhistogram.New(1, 60_000_000, 3)}
	if len(b.urls) == 0 {
		return nil, errors.New("--url is empty")
	}
	if o.KeyFile != "" {
		data, err := os.ReadFile(o.KeyFile)
		if err != nil {
			return nil, err
		}
		if b.signKey, err = jwtauth.ParsePrivateKey(data); err != nil {
			return nil, fmt.Errorf("--key-file: %w", err)
		}
		if o.Alg == "" {
			b.o.Alg = jwtauth.DefaultAlgorithm(b.signKey.Public(), "")
		}
		if err := b.premint(); err != nil {
			return nil, err
		}
	}
	if o.TokensFile != "" {
		if err := b.readTokens(o.TokensFile); err != nil {
			return nil, err
		}
	}
	opt, err := rueidis.ParseURL(o.Redis)
	if err != nil {
		return nil, fmt.Errorf("--redis: %w", err)
	}
	opt.DisableCache = true
	opt.PipelineMultiplex = -1 // one connection: commands reach Redis in the order sent
	if b.redis, err = rueidis.NewClient(opt); err != nil {
		return nil, fmt.Errorf("connect to redis: %w", err)
	}
	b.connsOf = make([]int32, o.Users)
	if o.History {
		sha, err := b.redis.Do(context.Background(), b.redis.B().ScriptLoad().Script(notify.PublishScript).Build()).ToString()
		if err != nil {
			return nil, fmt.Errorf("load publish.lua: %w", err)
		}
		b.historySHA = sha
	}
	return b, nil
}

func (b *bench) close() {
	b.stopping.Store(true) // no reconnects from here on
	b.closeAll()
	b.redis.Close()
}

// premint signs every user's token before the run: an RSA signature costs
// the load generator ~1 ms, far more than the server's verification, and
// would otherwise throttle the connect rate being measured.
func (b *bench) premint() error {
	b.tokens = make(map[string]string, b.o.Users)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var firstErr error
	workers := runtime.GOMAXPROCS(0)
	for w := range workers {
		wg.Go(func() {
			for i := w; i < b.o.Users; i += workers {
				user := b.userName(i)
				t, err := b.mint(user)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				b.tokens[user] = t
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return firstErr
}

func (b *bench) readTokens(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	b.tokens = map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if user, tok, ok := strings.Cut(strings.TrimSpace(sc.Text()), " "); ok {
			b.tokens[user] = tok
		}
	}
	return sc.Err()
}

func (b *bench) userName(i int) string { return "bench-" + strconv.Itoa(b.o.UserOffset+i) }

func (b *bench) token(user string) (string, error) {
	if b.tokens != nil {
		if t, ok := b.tokens[user]; ok {
			return t, nil
		}
		return "", fmt.Errorf("no token for %s in --tokens-file", user)
	}
	return b.mint(user)
}

func (b *bench) mint(user string) (string, error) {
	claims := jwt.RegisteredClaims{Subject: user, ExpiresAt: jwt.NewNumericDate(time.Now().Add(24 * time.Hour)),
		IssuedAt: jwt.NewNumericDate(time.Now())}
	if b.signKey != nil {
		t := jwt.NewWithClaims(jwt.GetSigningMethod(b.o.Alg), claims)
		if b.o.Kid != "" {
			t.Header["kid"] = b.o.Kid
		}
		return t.SignedString(b.signKey)
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(b.o.Secret))
}

func (b *bench) fail(reason string) {
	b.failCount.Add(1)
	v, _ := b.failures.LoadOrStore(reason, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (b *bench) failureMap() map[string]int64 {
	out := map[string]int64{}
	b.failures.Range(func(k, v any) bool { out[k.(string)] = v.(*atomic.Int64).Load(); return true })
	return out
}

// connectAll opens o.Conns connections (connection i belongs to user
// i % Users) and returns the time it took.
func (b *bench) connectAll(ctx context.Context) time.Duration {
	b.conns = make([]*benchConn, b.o.Conns)
	start := time.Now()
	sem := make(chan struct{}, b.o.Concurrency)
	var tick <-chan time.Time
	if b.o.ConnectRate > 0 {
		t := time.NewTicker(time.Second / time.Duration(b.o.ConnectRate))
		defer t.Stop()
		tick = t.C
	}
	var wg sync.WaitGroup
	var done atomic.Int64
	stopProgress := b.progress("connect", func() string { return fmt.Sprintf("%d/%d open, %d failed", done.Load(), b.o.Conns, b.failCount.Load()) })
	for i := range b.o.Conns {
		if ctx.Err() != nil {
			break
		}
		if tick != nil {
			<-tick
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if c := b.dial(i); c != nil {
				b.conns[i] = c
				done.Add(1)
			}
		})
	}
	wg.Wait()
	stopProgress()
	return time.Since(start)
}

// dial opens connection i.
func (b *bench) dial(i int) *benchConn { return b.dialSince(i, nil, i) }

// dialSince opens connection i to instance urlIndex (modulo the URLs),
// resuming after prev's last id when prev is not nil, and carries over its
// sequence and id tracking.
func (b *bench) dialSince(i int, prev *benchConn, urlIndex int) *benchConn {
	user := i % b.o.Users
	name := b.userName(user)
	tok, err := b.token(name)
	if err != nil {
		b.fail("token")
		return nil
	}
	base := b.urls[urlIndex%len(b.urls)]
	u, err := url.Parse(base)
	if err != nil {
		b.fail("url")
		return nil
	}
	src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%b.o.Sources))}
	start := time.Now()
	d := net.Dialer{LocalAddr: src, Timeout: 10 * time.Second, Control: bindAddressNoPort}
	nc, err := d.Dial("tcp", u.Host)
	if err != nil {
		b.fail(classify(err))
		return nil
	}
	c := &benchConn{b: b, user: user, done: make(chan struct{}), index: i, nc: nc}
	addr := base + "/ws/v1/status/" + url.PathEscape(name) + "?token=" + url.QueryEscape(tok)
	since, hasSince := "", b.o.History // resume-aware: the server answers with our position
	if prev != nil {
		c.lastSeq.Store(prev.lastSeq.Load())
		c.gaps.Store(prev.gaps.Load())
		c.repeats.Store(prev.repeats.Load())
		if id := prev.lastID.Load(); id != nil {
			c.lastID.Store(id)
			since, hasSince = notify.EmptyPosition, true
			if id.Epoch != "" {
				since = id.String()
			}
		}
	}
	if b.o.Transport == "sse" {
		if err := c.openStream(u.Host, "/sse/v1/status/"+url.PathEscape(name)+"?token="+url.QueryEscape(tok), since); err != nil {
			_ = nc.Close()
			b.fail(classify(err))
			return nil
		}
		b.mu.Lock()
		_ = b.handshake.RecordValue(time.Since(start).Microseconds())
		b.connsOf[user]++
		b.mu.Unlock()
		return c
	}
	if hasSince {
		addr += "&since=" + url.QueryEscape(since)
	}
	ws, _, err := gws.NewClientFromConn(c, &gws.ClientOption{
		Addr:             addr,
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   1024,
	}, nc)
	if err != nil {
		b.fail(classify(err))
		return nil
	}
	c.ws = ws
	b.mu.Lock()
	_ = b.handshake.RecordValue(time.Since(start).Microseconds())
	b.connsOf[user]++
	b.mu.Unlock()
	go ws.ReadLoop()
	return c
}

func classify(err error) string {
	s := err.Error()
	switch {
	case strings.Contains(s, "refused"):
		return "connection_refused"
	case strings.Contains(s, "timeout"):
		return "timeout"
	case strings.Contains(s, "address not available"), strings.Contains(s, "assign requested address"):
		return "no_ephemeral_port"
	case strings.Contains(s, "too many open files"):
		return "too_many_open_files"
	case strings.Contains(s, "reset"):
		return "reset"
	case strings.Contains(s, "EOF"):
		return "eof"
	case strings.Contains(s, "status"), strings.Contains(s, "handshake"):
		return "handshake_rejected"
	default:
		if len(s) > 40 {
			s = s[:40]
		}
		return s
	}
}

// closeAll drops every connection without a close frame.
func (b *bench) closeAll() {
	b.mu.Lock()
	conns := append([]*benchConn(nil), b.conns...)
	b.mu.Unlock()
	for _, c := range conns {
		if c != nil && c.nc != nil {
			_ = c.nc.Close()
			<-c.done
		}
	}
	b.mu.Lock()
	clear(b.conns)
	clear(b.connsOf)
	b.mu.Unlock()
}

func (b *bench) open() int {
	n := 0
	for _, c := range b.conns {
		if c != nil {
			select {
			case <-c.done:
			default:
				n++
			}
		}
	}
	return n
}

// gws.Event

func (c *benchConn) OnOpen(*gws.Conn) {}

func (c *benchConn) OnClose(_ *gws.Conn, err error) {
	code := 0
	if ce := (*gws.CloseError)(nil); errors.As(err, &ce) {
		code = int(ce.Code)
	}
	c.ended(code)
}

// ended records a connection's end (code: the server's close code, 0 if
// none) and reconnects when asked to.
func (c *benchConn) ended(code int) {
	reconnect := c.b.o.Reconnect && !c.b.stopping.Load()
	if code != 0 && !reconnect {
		c.b.fail(fmt.Sprintf("closed_%d", code))
		c.b.closedOpen.Add(1)
	}
	c.b.mu.Lock()
	c.b.connsOf[c.user]--
	c.b.mu.Unlock()
	close(c.done)
	if reconnect {
		go c.b.redial(c)
	}
}

func (c *benchConn) OnPing(s *gws.Conn, p []byte) { _ = s.WritePong(p) }
func (c *benchConn) OnPong(*gws.Conn, []byte)     {}

func (c *benchConn) OnMessage(_ *gws.Conn, m *gws.Message) {
	defer m.Close()
	c.handle(m.Bytes())
}

// handle takes one message (a WebSocket frame or an event's data).
func (c *benchConn) handle(data []byte) {
	c.trackID(data)
	if !bytes.Contains(data, []byte(`"event":"bench"`)) {
		if bytes.Contains(data, []byte(`"event":"probe"`)) {
			c.probe.Store(intField(data, `"g":`))
			return
		}
		c.b.events.Add(1)
		return
	}
	now := time.Now().UnixNano()
	seq, sent := intField(data, `"s":`), intField(data, `"t":`)
	if seq <= c.lastSeq.Load() {
		c.b.dups.Add(1)
		return
	}
	c.lastSeq.Store(seq)
	if int(seq) < len(c.b.received) {
		c.b.received[seq].Add(1)
	}
	c.b.mu.Lock()
	_ = c.b.latency.RecordValue(max(1, (now-sent)/1000))
	c.b.mu.Unlock()
}

// intField parses the integer after key in a JSON document we produced.
func intField(data []byte, key string) int64 {
	i := bytes.Index(data, []byte(key))
	if i < 0 {
		return -1
	}
	var n int64
	for _, ch := range data[i+len(key):] {
		if ch < '0' || ch > '9' {
			break
		}
		n = n*10 + int64(ch-'0')
	}
	return n
}

// progress prints a status line on stderr every two seconds until stopped.
func (b *bench) progress(what string, line func() string) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintf(b.log, "[%s] %s\n", what, line())
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

func (b *bench) publishCmd(user int, payload string) rueidis.Completed {
	ch := b.o.Prefix + ":" + b.userName(user)
	if b.o.History {
		sharded := "0"
		if b.o.Sharded {
			sharded = "1"
		}
		return b.redis.B().Evalsha().Sha1(b.historySHA).Numkeys(2).Key(notify.HistoryKey(ch), notify.MetaKey(ch)).
			Arg(ch, payload, strconv.Itoa(notify.DefaultHistoryLen), strconv.FormatInt(notify.DefaultHistoryAge.Milliseconds(), 10),
				strconv.FormatInt(notify.DefaultHistoryMetaTTL.Milliseconds(), 10), sharded, strconv.Itoa(notify.DefaultMaxBytes)).Build()
	}
	if b.o.Sharded {
		return b.redis.B().Spublish().Channel(ch).Message(payload).Build()
	}
	return b.redis.B().Publish().Channel(ch).Message(payload).Build()
}

func summarize(h *hdrhistogram.Histogram) map[string]float64 {
	ms := func(q float64) float64 { return float64(h.ValueAtQuantile(q)) / 1000 }
	return map[string]float64{"count": float64(h.TotalCount()), "p50_ms": ms(50), "p90_ms": ms(90), "p99_ms": ms(99),
		"p99.9_ms": ms(99.9), "max_ms": float64(h.Max()) / 1000}
}

func (b *bench) latencyCount() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.latency.TotalCount()
}

// bindAddressNoPort sets IP_BIND_ADDRESS_NO_PORT: with a source address but
// no port, the kernel picks the port at connect time per 4-tuple, instead of
// at bind time among ports free on every destination (slow, and exhausted by
// TIME_WAIT after a reconnect storm).
func bindAddressNoPort(_, _ string, rc syscall.RawConn) error {
	const ipBindAddressNoPort = 24 // linux/in.h
	return rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
	})
}
