package gateway

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/browsertest"
)

// TestBrowserSeesCloseCodes opens WebSockets from headless Chromium and
// checks that the browser's CloseEvent carries our codes and JSON reasons
// (the previous service refused the handshake instead, which browsers only
// report as 1006), and that a notification reaches the page.
func TestBrowserSeesCloseCodes(t *testing.T) {
	browsertest.Path(t) // skip before starting anything when chromium is missing
	st := newStack(t, func(c *stackConfig) { c.gw.MaxConnsPerUser = 1 })
	reports := make(chan string, 1)
	mux := http.NewServeMux()
	mux.Handle("/", st.gw.Handler())
	mux.HandleFunc("GET /page", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, browserPage, st.token("browser", time.Hour), st.token("browser", -time.Minute), st.token("someone", time.Hour))
	})
	mux.HandleFunc("POST /report", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		reports <- string(body)
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		// The page asks for a notification once its first socket is open.
		st.publish("browser", `{"event":"essay_graded","data":{"id":"e1"}}`)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close) // registered before Chromium's cleanup, so it runs after it

	browsertest.Open(t, srv.URL+"/page")

	var got map[string]string
	select {
	case r := <-reports:
		if err := json.Unmarshal([]byte(r), &got); err != nil {
			t.Fatalf("report %q: %v", r, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the page did not report within 60 s")
	}
	want := map[string]string{
		"message":   `{"event":"essay_graded","data":{"id":"e1"}}`,
		"quota":     "4000 QUOTA_EXCEEDED",
		"badtoken":  "1008 AUTHENTICATION_ERROR",
		"expired":   "1008 AUTHENTICATION_ERROR",
		"wronguser": "1008 AUTHORIZATION_ERROR",
		"binary":    "1003 UNSUPPORTED_DATA",
	}
	for k, v := range want {
		if !strings.HasPrefix(got[k], v) {
			t.Errorf("%s: browser saw %q, want %q", k, got[k], v)
		}
	}
}

// browserPage opens sockets in turn and posts what the browser saw.
const browserPage = `<!doctype html><script>
const base = "ws://" + location.host;
const tok = %q, expired = %q, other = %q;
function closeOf(ws) {
  return new Promise(res => { ws.onclose = e => {
    let code = "";
    try { code = JSON.parse(e.reason).error_code } catch (_) {}
    res(e.code + " " + code);
  }; });
}
(async () => {
  const r = {};
  const first = new WebSocket(base + "/ws/v1/status/browser?token=" + tok);
  r.message = await new Promise(res => {
    first.onopen = () => fetch("/ready");
    first.onmessage = e => res(e.data);
  });
  r.quota = await closeOf(new WebSocket(base + "/ws/?token=" + tok));
  r.badtoken = await closeOf(new WebSocket(base + "/ws/?token=nonsense"));
  r.expired = await closeOf(new WebSocket(base + "/ws/?token=" + expired));
  r.wronguser = await closeOf(new WebSocket(base + "/ws/v1/status/browser?token=" + other));
  const closed = closeOf(first);
  first.send(new Uint8Array([1, 2, 3]));
  r.binary = await closed;
  await fetch("/report", {method: "POST", body: JSON.stringify(r)});
})();
</script>`
