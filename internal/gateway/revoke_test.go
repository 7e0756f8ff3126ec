package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/gorilla/websocket"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/broker"
	"github.com/huleedu/websocket-service/notify"
)

// mintIAT signs a test token issued at iat.
func mintIAT(t testing.TB, sub string, iat time.Time) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"sub": sub, "iat": iat.Unix(), "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// closeOf returns the close code and reason a reader ended with (0 if open).
func closeOf(r *reader) (int, string, string) {
	var ce *websocket.CloseError
	if err := r.err(); err == nil || !errors.As(err, &ce) {
		return 0, "", ""
	}
	var reason struct {
		ErrorCode string `json:"error_code"`
		Message   string `json:"message"`
	}
	_ = json.Unmarshal([]byte(ce.Text), &reason)
	return ce.Code, reason.ErrorCode, reason.Message
}

// expectRefused dials with tok and expects the close code and message.
func expectRefused(t *testing.T, st *stack, user, tok string, code int, errorCode, message string) {
	t.Helper()
	c := st.dialURL(st.wsURL + "/ws/v1/status/" + user + "?token=" + tok)
	r := c.readAll()
	eventually(t, 10*time.Second, "refusal", func() bool { return r.err() != nil })
	if got, ec, msg := closeOf(r); got != code || ec != errorCode || !strings.Contains(msg, message) {
		t.Fatalf("dial with that token: closed %d %s %q, want %d %s %q (%v)", got, ec, msg, code, errorCode, message, r.err())
	}
}

func disconnecter(t *testing.T, addr string, sharded bool) *notify.Disconnecter {
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return notify.NewDisconnecter(c, "ws", sharded)
}

// TestDisconnectAcrossInstances: 1,000 sockets of one user over three
// instances all get 4004 with the reason; bystanders stay; after --revoke
// the old token is refused on every instance (and on one started later),
// a token issued after is accepted, and a refresh with an old token fails.
func TestDisconnectAcrossInstances(t *testing.T) {
	const victims = 1000
	var stacks []*stack
	for i := range 3 {
		stacks = append(stacks, newStack(t, func(c *stackConfig) {
			c.gw.MaxConnsPerUser = victims
			if i > 0 {
				c.redis = stacks[0].redis
			}
		}))
	}
	redis := stacks[0].redis
	oldToken := stacks[0].token("victim", time.Hour)
	readers := make([]*reader, victims)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range victims {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			st := stacks[i%3]
			readers[i] = st.dialURL(st.wsURL + "/ws/v1/status/victim?token=" + oldToken).readAll()
		})
	}
	var bystanders []*reader
	for i, st := range stacks {
		bystanders = append(bystanders, st.dial(fmt.Sprintf("bystander-%d", i)).readAll())
	}
	wg.Wait()

	start := time.Now()
	res, err := disconnecter(t, redis.Addr(), false).Disconnect(context.Background(), "victim",
		notify.DisconnectOptions{Reason: "account disabled", Revoke: true, RevokeFor: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if res.Receivers != 3 || res.RevokedAt < start.Unix()-1 {
		t.Fatalf("disconnect reached %d instances, revoked at %d", res.Receivers, res.RevokedAt)
	}
	for i, r := range readers {
		eventually(t, 20*time.Second, fmt.Sprintf("victim socket %d closed", i), func() bool { return r.err() != nil })
		if code, ec, msg := closeOf(r); code != 4004 || ec != "REVOKED" || msg != "disconnected: account disabled" {
			t.Fatalf("victim socket %d: %d %s %q (%v)", i, code, ec, msg, r.err())
		}
	}
	t.Logf("%d sockets of one user over 3 instances closed with 4004 %s after the disconnect", victims, time.Since(start).Round(time.Millisecond))
	for i, b := range bystanders {
		stacks[i].dial("x") // the instance still serves
		if b.err() != nil {
			t.Fatalf("bystander %d closed: %v", i, b.err())
		}
	}
	if pttl, err := redis.Do("PTTL", notify.RevocationKey("ws:victim")); err != nil || pttl == "-1" || pttl == "-2" {
		t.Fatalf("revocation kept without a bounded expiry: %s %v", pttl, err)
	}

	later := newStack(t, func(c *stackConfig) { c.redis = redis }) // started after the revocation
	for _, st := range append(stacks, later) {
		expectRefused(t, st, "victim", oldToken, 1008, "AUTHENTICATION_ERROR", "revoked")
		expectRefused(t, st, "victim", mintIAT(t, "victim", time.Unix(res.RevokedAt, 0)), 1008, "AUTHENTICATION_ERROR", "revoked")
		fresh := st.dialURL(st.wsURL + "/ws/v1/status/victim?token=" + mintIAT(t, "victim", time.Unix(res.RevokedAt+1, 0)))
		fresh.send(`{"type":"ping"}`)
		fresh.nextEvent("pong")
		// A refresh with a token issued before the revocation is refused.
		fresh.send(`{"type":"refresh","token":"` + oldToken + `"}`)
		fresh.expectClose(1008, "AUTHENTICATION_ERROR")
	}
}

// TestDisconnectWithoutRevoke closes the sockets but the same token may
// connect again; the reason is cut to fit the close frame.
func TestDisconnectWithoutRevoke(t *testing.T) {
	st := newStack(t, nil)
	tok := st.token("u", time.Hour)
	r := st.dialURL(st.wsURL + "/ws/v1/status/u?token=" + tok).readAll()
	long := strings.Repeat("é", 200)
	if _, err := disconnecter(t, st.redis.Addr(), false).Disconnect(context.Background(), "u", notify.DisconnectOptions{Reason: long}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "closed", func() bool { return r.err() != nil })
	code, ec, msg := closeOf(r)
	if code != 4004 || ec != "REVOKED" || !strings.HasPrefix(msg, "disconnected: éé") {
		t.Fatalf("closed %d %s %q", code, ec, msg)
	}
	c := st.dialURL(st.wsURL + "/ws/v1/status/u?token=" + tok)
	c.send(`{"type":"ping"}`)
	c.nextEvent("pong")
	// A notification payload cannot pose as a control message: it is JSON.
	st.publish("u", `{"op":"disconnect","reason":"x","revoked_at":0}`)
	if got := c.mustNext(); !strings.Contains(got, `"op":"disconnect"`) {
		t.Fatalf("got %s", got)
	}
}

// cutProxy forwards TCP to a Redis and can cut every connection and refuse
// new ones: an instance's link is lost while Redis itself is fine.
type cutProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	cut    bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.serve)
	t.Cleanup(func() {
		ln.Close()
		p.setCut(true)
		p.wg.Wait()
	})
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) serve() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.cut {
			p.mu.Unlock()
			in.Close()
			continue
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			in.Close()
			continue
		}
		p.conns[in], p.conns[out] = struct{}{}, struct{}{}
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			_, _ = io.Copy(dst, src)
			dst.Close()
			src.Close()
		}
		p.wg.Go(func() { pipe(out, in) })
		p.wg.Go(func() { pipe(in, out) })
	}
}

func (p *cutProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			c.Close()
		}
		clear(p.conns)
	}
}

// TestRevocationSurvivesLinkLoss: the disconnect is published while this
// instance's link to Redis is cut, so it never arrives; when the link comes
// back the instance looks the revocation up and closes the user's sockets,
// with or without a history position to repair from.
func TestRevocationSurvivesLinkLoss(t *testing.T) {
	redis := newStack(t, nil).redis // a Redis for this test
	proxy := newCutProxy(t, redis.Addr())
	st := newStack(t, func(c *stackConfig) {
		c.topology = &broker.Topology{URL: "redis://" + proxy.addr()}
		c.probe = time.Second
	})
	tok := st.token("victim", time.Hour)
	withPosition := st.dialURL(st.wsURL + "/ws/v1/status/victim?since=&token=" + tok).readAll()
	eventually(t, 10*time.Second, "resume.position", func() bool { return withPosition.count("resume.position") == 1 })
	legacy := st.dialURL(st.wsURL + "/ws/v1/status/victim?token=" + tok).readAll()
	bystander := st.dial("bystander").readAll()

	proxy.setCut(true)
	for _, r := range []*reader{withPosition, legacy, bystander} {
		eventually(t, 20*time.Second, "degraded", func() bool { return r.count("connection.degraded") == 1 })
	}
	res, err := disconnecter(t, redis.Addr(), false).Disconnect(context.Background(), "victim",
		notify.DisconnectOptions{Reason: "password changed", Revoke: true})
	if err != nil || res.Receivers != 0 {
		t.Fatalf("disconnect while the instance is cut off: %+v %v", res, err)
	}
	proxy.setCut(false)
	for name, r := range map[string]*reader{"with position": withPosition, "legacy": legacy} {
		eventually(t, 30*time.Second, name+" closed after the link came back", func() bool { return r.err() != nil })
		if code, ec, msg := closeOf(r); code != 4004 || ec != "REVOKED" || !strings.Contains(msg, "revoked") {
			t.Fatalf("%s: %d %s %q (%v)", name, code, ec, msg, r.err())
		}
	}
	// The cut also broke the instance's command connection: its next probe
	// may fail once more, so wait until every degraded has its restored.
	eventually(t, 30*time.Second, "bystander restored", func() bool {
		n := bystander.count("connection.restored")
		return n >= 1 && n == bystander.count("connection.degraded")
	})
	if bystander.err() != nil {
		t.Fatalf("bystander closed: %v", bystander.err())
	}
	expectRefused(t, st, "victim", tok, 1008, "AUTHENTICATION_ERROR", "revoked")
}

// TestTokenInSubprotocol: a browser sends the token as the subprotocol entry
// after "bearer"; the server answers "bearer" only, also when it refuses.
func TestTokenInSubprotocol(t *testing.T) {
	st := newStack(t, nil)
	d := websocket.Dialer{Subprotocols: []string{"bearer", st.token("sp", time.Hour)}}
	conn, resp, err := d.Dial(st.wsURL+"/ws/v1/status/sp", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "bearer" {
		t.Fatalf("answered protocol %q, want bearer", got)
	}
	st.publish("sp", `{"via":"subprotocol"}`)
	c := &client{t: t, conn: conn}
	if got := c.mustNext(); got != `{"via":"subprotocol"}` {
		t.Fatalf("got %s", got)
	}
	d.Subprotocols = []string{"bearer", "not.a.token"}
	bad, resp, err := d.Dial(st.wsURL+"/ws/v1/status/sp", http.Header{})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "bearer" {
		t.Fatalf("refusal answered protocol %q, want bearer (browsers fail the handshake otherwise)", got)
	}
	(&client{t: t, conn: bad}).expectClose(1008, "AUTHENTICATION_ERROR")
}
