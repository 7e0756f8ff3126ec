package gateway

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"
)

// rawConn is a WebSocket client that sees every frame as it arrives, to
// check frame order on the wire (a library client stops at the close frame).
type rawConn struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func (st *stack) dialRaw(t *testing.T, user string) *rawConn {
	t.Helper()
	addr := strings.TrimPrefix(st.wsURL, "ws://")
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	fmt.Fprintf(c, "GET /ws/v1/status/%s?token=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", user, st.token(user, time.Hour), addr)
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	return &rawConn{t: t, conn: c, r: r}
}

// write sends one masked frame (client frames must be masked).
func (c *rawConn) write(opcode byte, payload []byte) error {
	frame := []byte{0x80 | opcode, 0x80 | byte(len(payload)), 1, 2, 3, 4}
	for i, b := range payload {
		frame = append(frame, b^frame[2+i%4])
	}
	_, err := c.conn.Write(frame)
	return err
}

// next reads one frame: opcode and payload.
func (c *rawConn) next() (byte, []byte, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var h [2]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, nil, err
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(c.r, b[:]); err != nil {
			return 0, nil, err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(c.r, b[:]); err != nil {
			return 0, nil, err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	payload := make([]byte, n)
	_, err := io.ReadFull(c.r, payload)
	return h[0] & 0x0f, payload, err
}

// TestNothingFollowsTheCloseFrame: while notifications stream to a client,
// the client closes; the server's close frame must be the last frame it
// sends (RFC 6455 §5.5.1), whatever its writer was doing at that moment.
func TestNothingFollowsTheCloseFrame(t *testing.T) {
	st := newStack(t, func(c *stackConfig) { c.gw.SendQueueMsgs = 1 << 16; c.gw.SendQueueBytes = 64 << 20 })
	pub := st.publisher()
	for round := range 20 {
		user := fmt.Sprintf("closer-%d", round)
		c := st.dialRaw(t, user)
		payload := `{"event":"tick","data":{"pad":"` + strings.Repeat("x", 200) + `"}}`
		cmds := make(rueidis.Commands, 0, 2000)
		for range 2000 {
			cmds = append(cmds, pub.B().Publish().Channel("ws:"+user).Message(payload).Build())
		}
		for _, res := range pub.DoMulti(context.Background(), cmds...) {
			if err := res.Error(); err != nil {
				t.Fatal(err)
			}
		}
		// Read a few frames so the writer is mid-stream, then close.
		for range 5 {
			if _, _, err := c.next(); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.write(0x8, []byte{0x03, 0xe8}); err != nil {
			t.Fatal(err)
		}
		sawClose := false
		for {
			op, _, err := c.next()
			if err != nil {
				break // the server dropped the socket after the close handshake
			}
			if sawClose {
				t.Fatalf("round %d: frame with opcode %d after the close frame", round, op)
			}
			sawClose = op == 0x8
		}
		if !sawClose {
			t.Fatalf("round %d: no close frame", round)
		}
	}
}

// TestSubscribeTimeoutRefuses: when Redis does not confirm a subscription
// within SubscribeWait (here: frozen with SIGSTOP while the link looks up),
// the connection is refused with 1013 SUBSCRIBE_TIMEOUT rather than opened
// without a subscription; once Redis answers, connecting works again.
func TestSubscribeTimeoutRefuses(t *testing.T) {
	st := newStack(t, func(c *stackConfig) {
		c.gw.SubscribeWait = 300 * time.Millisecond
		c.probe = time.Minute // the link must still look up while Redis is frozen
	})
	st.redis.Pause()
	paused := true
	defer func() {
		if paused {
			st.redis.Resume()
		}
	}()
	c := st.dial("frozen")
	c.expectClose(1013, "SUBSCRIBE_TIMEOUT")
	st.redis.Resume()
	paused = false
	eventually(t, 10*time.Second, "hub empty", func() bool { return st.hub.Count() == 0 })
	ok := st.dial("frozen")
	st.publish("frozen", `{"event":"e","data":{}}`)
	if msg := ok.mustNext(); !strings.Contains(msg, `"event":"e"`) {
		t.Fatalf("got %s", msg)
	}
}
