package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/gorilla/websocket"

	"github.com/huleedu/websocket-service/internal/redistest"
)

// TestAsymmetricTokensAndDisconnect runs the service with ES256 keys from a
// JWKS, mints a token with `token --key-file --kid`, connects, and ends the
// session with `disconnect --revoke`.
func TestAsymmetricTokensAndDisconnect(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	keyFile := filepath.Join(t.TempDir(), "private.pem")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	jwk, err := jwkset.NewJWKFromKey(key.Public(), jwkset.JWKOptions{Metadata: jwkset.JWKMetadataOptions{KID: "k1", ALG: jwkset.AlgES256, USE: jwkset.UseSig}})
	if err != nil {
		t.Fatal(err)
	}
	set, _ := json.Marshal(jwkset.JWKSMarshal{Keys: []jwkset.JWKMarshal{jwk.Marshal()}})
	idp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(set) }))
	defer idp.Close()

	redis := redistest.Start(t)
	env := map[string]string{"REDIS_URL": redis.URL(), "JWT_SECRET_KEY": "", "JWT_ALGORITHM": "ES256", "JWT_JWKS_URL": idp.URL}
	s := startServe(t, env)
	getenv := func(k string) string { return env[k] }

	var out bytes.Buffer
	if err := run(context.Background(), []string{"token", "--sub", "carol", "--key-file", keyFile, "--kid", "k1"}, getenv, &out, &out); err != nil {
		t.Fatalf("token --key-file: %v (%s)", err, out.String())
	}
	tok := strings.TrimSpace(out.String())
	conn, _, err := websocket.DefaultDialer.Dial(s.url("ws")+"/ws/v1/status/carol?token="+tok, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if code := getStatus(t, s.url("http")+"/readyz"); code != 200 {
		t.Fatalf("readyz with the JWKS fetched: %d", code)
	}

	out.Reset()
	if err := run(context.Background(), []string{"disconnect", "--user", "carol", "--reason", "left the school", "--revoke"}, getenv, &out, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "1 ") {
		t.Fatalf("disconnect printed %q, want 1 instance and the revocation time", out.String())
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err = conn.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 4004 || !strings.Contains(ce.Text, "left the school") {
		t.Fatalf("want 4004 with the reason, got %v", err)
	}
	// The audit line is written once this instance has closed its sockets,
	// which may be just after the client read its close frame.
	waitFor(t, 10*time.Second, "the audit line for the disconnect", func() bool {
		return strings.Contains(s.logs.String(), `"msg":"disconnect"`) && strings.Contains(s.logs.String(), `"closed_here":1`)
	})
	if strings.Contains(s.logs.String(), tok) {
		t.Fatal("a token appears in the logs")
	}
}

// TestUnreachableJWKSAtStart: the service starts, /readyz says why it is
// not ready, and the process does not exit.
func TestUnreachableJWKSAtStart(t *testing.T) {
	port, err := redistest.FreePort() // nothing listens there
	if err != nil {
		t.Fatal(err)
	}
	redis := redistest.Start(t)
	s := startServe(t, map[string]string{"REDIS_URL": redis.URL(), "JWT_SECRET_KEY": "", "JWT_ALGORITHM": "RS256",
		"JWT_JWKS_URL": "http://127.0.0.1:" + itoa(port) + "/jwks"})
	if code := getStatus(t, s.url("http")+"/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("readyz without keys: %d, want 503", code)
	}
	if code := getStatus(t, s.url("http")+"/healthz"); code != 200 {
		t.Fatalf("healthz: %d", code)
	}
	if !strings.Contains(s.logs.String(), "JWKS not reachable at start") {
		t.Fatalf("no warning about the JWKS:\n%s", s.logs.String())
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// getStatus GETs url on a client of its own, leaving no connection behind.
func getStatus(t *testing.T, url string) int {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
