package gateway

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/internal/metrics"
)

// FuzzInboundFrame drives the inbound text path (parse, ping, refresh) of a
// session that is not attached to a socket, and checks that whatever comes
// in, the session either answers with valid JSON or closes with a row of the
// close-code table.
func FuzzInboundFrame(f *testing.F) {
	auth, err := jwtauth.New(jwtauth.Options{Secret: []byte(testSecret), Algorithms: []string{"HS256"}})
	if err != nil {
		f.Fatal(err)
	}
	good, _ := auth.Mint("u", time.Hour)
	other, _ := auth.Mint("v", time.Hour)
	for _, seed := range []string{`{"type":"ping"}`, `{"type":"refresh","token":"` + good + `"}`,
		`{"type":"refresh","token":"` + other + `"}`, `{"type":"refresh"}`, `hello`, `{"type":1}`, `[`, "\x00\xff", `{"type":"ping","type":"refresh"}`} {
		f.Add([]byte(seed))
	}
	writers := newWriterPool(1)
	f.Cleanup(writers.close)
	g := &Gateway{opts: defaultOptions(), m: metrics.New(), auth: auth, writers: writers}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := newSession(g, jwtauth.Identity{UserID: "u", ExpiresAt: time.Now().Add(time.Hour)}, 0)
		g.handleText(s, time.Now(), data)
		s.mu.Lock()
		defer s.mu.Unlock()
		if r := s.closeNow; r != nil && r != reasonAuthentication && r != reasonAuthorization && r != reasonTokenRevoked {
			t.Fatalf("closed with %s", r.ErrorCode)
		}
		for _, o := range s.queue.items[s.queue.head:] {
			if !json.Valid(o.msg.Payload) {
				t.Fatalf("sent invalid JSON %q", o.msg.Payload)
			}
		}
	})
}

func TestCloseReasonsFitAControlFrame(t *testing.T) {
	long := strings.Repeat("\u2028<é>\"", 100) // JSON escapes expand these
	for _, r := range append(closeTable, revokedReason(long), revokedReason("short")) {
		if len(r.frame) > 125 || !json.Valid(r.frame[2:]) {
			t.Errorf("%s: %d bytes", r.ErrorCode, len(r.frame))
		}
	}
}

func TestTextFrame(t *testing.T) {
	for _, n := range []int{0, 125, 126, 65535, 65536} {
		f := TextFrame(make([]byte, n))
		hdr := map[bool]int{true: 2}[n < 126] + map[bool]int{true: 4}[n >= 126 && n <= 65535] + map[bool]int{true: 10}[n > 65535]
		if len(f) != hdr+n || f[0] != 0x81 {
			t.Errorf("TextFrame(%d bytes): %d bytes, first byte %#x", n, len(f), f[0])
		}
	}
}
