package jwtauth

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testKeys are generated once per run: RSA 2048 takes a while.
var testKeys = sync.OnceValue(func() map[string]crypto.Signer {
	r, _ := rsa.GenerateKey(rand.Reader, 2048)
	r2, _ := rsa.GenerateKey(rand.Reader, 2048)
	e, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	e384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	return map[string]crypto.Signer{"rsa": r, "rsa2": r2, "ec": e, "ec384": e384, "ed": ed}
})

func pemPublic(t testing.TB, k crypto.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func signKid(t testing.TB, m jwt.SigningMethod, key any, kid string, claims jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func claims(sub string) jwt.MapClaims {
	return jwt.MapClaims{"sub": sub, "exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix()}
}

func TestParseAlgorithms(t *testing.T) {
	for in, want := range map[string]string{"HS256": "HS256", "rs256, ES256": "RS256,ES256", "EdDSA,eddsa": "EdDSA", " PS512 ": "PS512"} {
		got, err := ParseAlgorithms(in)
		if err != nil || strings.Join(got, ",") != want {
			t.Errorf("%q: %v %v, want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "none", "HS256,RS256", "RS256,HS512", "HS1", "ES256K", ","} {
		if _, err := ParseAlgorithms(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func TestPublicKeysFromPEM(t *testing.T) {
	k := testKeys()
	rsaPEM, ecPEM, edPEM := pemPublic(t, k["rsa"].Public()), pemPublic(t, k["ec"].Public()), pemPublic(t, k["ed"].Public())
	for _, tc := range []struct {
		alg    string
		method jwt.SigningMethod
		signer crypto.Signer
		pem    []byte
	}{
		{"RS256", jwt.SigningMethodRS256, k["rsa"], rsaPEM},
		{"PS256", jwt.SigningMethodPS256, k["rsa"], rsaPEM},
		{"ES256", jwt.SigningMethodES256, k["ec"], ecPEM},
		{"EdDSA", jwt.SigningMethodEdDSA, k["ed"], edPEM},
	} {
		keys, err := ParsePublicKeys(tc.pem, []string{tc.alg})
		if err != nil {
			t.Fatalf("%s: %v", tc.alg, err)
		}
		v, err := New(Options{Algorithms: []string{tc.alg}, PublicKeys: keys})
		if err != nil {
			t.Fatal(err)
		}
		id, err := v.Validate(signKid(t, tc.method, tc.signer, "", claims("u-"+tc.alg)))
		if err != nil || id.UserID != "u-"+tc.alg || id.IssuedAt.IsZero() {
			t.Errorf("%s: %+v %v", tc.alg, id, err)
		}
	}
	// A key that no configured algorithm can use is refused at start.
	if _, err := ParsePublicKeys(ecPEM, []string{"RS256"}); err == nil {
		t.Error("an ECDSA key accepted for RS256")
	}
	if _, err := ParsePublicKeys(pemPublic(t, k["ec384"].Public()), []string{"ES256"}); err == nil {
		t.Error("a P-384 key accepted for ES256")
	}
	if _, err := ParsePublicKeys([]byte("not pem"), []string{"RS256"}); err == nil {
		t.Error("garbage accepted")
	}
	// Two keys (a rotation without kid): both verify.
	both, err := ParsePublicKeys(append(pemPublic(t, k["rsa2"].Public()), rsaPEM...), []string{"RS256"})
	if err != nil || len(both) != 2 {
		t.Fatalf("two PEM blocks: %d %v", len(both), err)
	}
	v, _ := New(Options{Algorithms: []string{"RS256"}, PublicKeys: both})
	for _, name := range []string{"rsa", "rsa2"} {
		if _, err := v.Validate(signKid(t, jwt.SigningMethodRS256, k[name], "", claims("u"))); err != nil {
			t.Errorf("key %s of two: %v", name, err)
		}
	}
}

// TestAlgorithmConfusion: tokens that try to use the wrong algorithm or key
// type are refused.
func TestAlgorithmConfusion(t *testing.T) {
	k := testKeys()
	rsaPEM := pemPublic(t, k["rsa"].Public())
	keys, _ := ParsePublicKeys(rsaPEM, []string{"RS256", "ES256"})
	v, err := New(Options{Algorithms: []string{"RS256", "ES256"}, PublicKeys: keys})
	if err != nil {
		t.Fatal(err)
	}
	for name, tok := range map[string]string{
		"HS256 signed with the RSA public key's PEM": signKid(t, jwt.SigningMethodHS256, rsaPEM, "", claims("u")),
		"alg none":                      signKid(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, "", claims("u")),
		"RS512 (not configured)":        signKid(t, jwt.SigningMethodRS512, k["rsa"], "", claims("u")),
		"ES256 by a key not configured": signKid(t, jwt.SigningMethodES256, k["ec"], "", claims("u")),
		"RS256 by another RSA key":      signKid(t, jwt.SigningMethodRS256, k["rsa2"], "", claims("u")),
		"expired":                       signKid(t, jwt.SigningMethodRS256, k["rsa"], "", jwt.MapClaims{"sub": "u", "exp": time.Now().Add(-time.Minute).Unix()}),
	} {
		if _, err := v.Validate(tok); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := New(Options{Algorithms: []string{"RS256"}, PublicKeys: keys, Secret: []byte("x")}); err == nil {
		t.Error("a secret accepted beside public keys")
	}
	if _, err := New(Options{Algorithms: []string{"HS256"}, Secret: secret, PublicKeys: keys}); err == nil {
		t.Error("public keys accepted with HMAC")
	}
}

// jwksServer serves a JWK Set that the test can replace, and counts fetches.
type jwksServer struct {
	*httptest.Server
	mu      sync.Mutex
	body    []byte
	down    bool
	fetches atomic.Int64
}

func newJWKSServer(t *testing.T) *jwksServer {
	s := &jwksServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		s.fetches.Add(1)
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.down {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(s.body)
	}))
	t.Cleanup(s.Close)
	return s
}

// publish replaces the served set with these kid → key pairs.
func (s *jwksServer) publish(t *testing.T, keys map[string]crypto.Signer, algs map[string]jwkset.ALG) {
	t.Helper()
	var set jwkset.JWKSMarshal
	for kid, k := range keys {
		jwk, err := jwkset.NewJWKFromKey(k.Public(), jwkset.JWKOptions{Metadata: jwkset.JWKMetadataOptions{KID: kid, ALG: algs[kid], USE: jwkset.UseSig}})
		if err != nil {
			t.Fatal(err)
		}
		set.Keys = append(set.Keys, jwk.Marshal())
	}
	body, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.body, s.down = body, false
	s.mu.Unlock()
}

func (s *jwksServer) setDown(down bool) {
	s.mu.Lock()
	s.down = down
	s.mu.Unlock()
}

func TestJWKS(t *testing.T) {
	k := testKeys()
	srv := newJWKSServer(t)
	srv.publish(t, map[string]crypto.Signer{"r1": k["rsa"], "e1": k["ec"], "d1": k["ed"]},
		map[string]jwkset.ALG{"r1": jwkset.AlgRS256, "e1": jwkset.AlgES256, "d1": jwkset.AlgEdDSA})
	jwks, err := NewJWKS(JWKSOptions{URL: srv.URL, Refresh: time.Hour, UnknownKIDEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer jwks.Close()
	v, err := New(Options{Algorithms: []string{"RS256", "ES256", "EdDSA"}, JWKS: jwks})
	if err != nil || !v.Ready() {
		t.Fatalf("validator: %v ready=%v", err, v.Ready())
	}
	for kid, tok := range map[string]string{
		"r1": signKid(t, jwt.SigningMethodRS256, k["rsa"], "r1", claims("a")),
		"e1": signKid(t, jwt.SigningMethodES256, k["ec"], "e1", claims("a")),
		"d1": signKid(t, jwt.SigningMethodEdDSA, k["ed"], "d1", claims("a")),
	} {
		if _, err := v.Validate(tok); err != nil {
			t.Errorf("kid %s: %v", kid, err)
		}
	}
	refused := map[string]string{
		"wrong kid (another key's)": signKid(t, jwt.SigningMethodRS256, k["rsa"], "e1", claims("a")),
		"no kid":                    signKid(t, jwt.SigningMethodRS256, k["rsa"], "", claims("a")),
		"wrong alg for the key":     signKid(t, jwt.SigningMethodPS256, k["rsa"], "r1", claims("a")),
		"HS256 with the public key": signKid(t, jwt.SigningMethodHS256, pemPublic(t, k["rsa"].Public()), "r1", claims("a")),
		"none":                      signKid(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, "r1", claims("a")),
		"expired":                   signKid(t, jwt.SigningMethodRS256, k["rsa"], "r1", jwt.MapClaims{"sub": "a", "exp": time.Now().Add(-time.Second).Unix()}),
	}
	for name, tok := range refused {
		if _, err := v.Validate(tok); !errors.Is(err, ErrInvalidToken) && !errors.Is(err, ErrExpired) {
			t.Errorf("%s: got %v", name, err)
		}
	}

	// Endpoint down: the cached keys keep working.
	srv.setDown(true)
	if _, err := v.Validate(signKid(t, jwt.SigningMethodRS256, k["rsa"], "r1", claims("a"))); err != nil {
		t.Errorf("cached key while the endpoint is down: %v", err)
	}
}

func TestJWKSRotationAndUnknownKIDRateLimit(t *testing.T) {
	k := testKeys()
	srv := newJWKSServer(t)
	srv.publish(t, map[string]crypto.Signer{"old": k["rsa"]}, nil)
	jwks, err := NewJWKS(JWKSOptions{URL: srv.URL, Refresh: time.Hour, UnknownKIDEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer jwks.Close()
	v, _ := New(Options{Algorithms: []string{"RS256"}, JWKS: jwks})
	if _, err := v.Validate(signKid(t, jwt.SigningMethodRS256, k["rsa"], "old", claims("a"))); err != nil {
		t.Fatal(err)
	}
	fetched := srv.fetches.Load()

	// The provider rotates: a new kid appears, the old one goes. The first
	// token with the new kid triggers one refresh; no restart.
	srv.publish(t, map[string]crypto.Signer{"new": k["rsa2"]}, nil)
	if _, err := v.Validate(signKid(t, jwt.SigningMethodRS256, k["rsa2"], "new", claims("a"))); err != nil {
		t.Fatalf("rotated key: %v", err)
	}
	if got := srv.fetches.Load() - fetched; got != 1 {
		t.Fatalf("%d fetches for the new kid, want 1", got)
	}
	if _, err := v.Validate(signKid(t, jwt.SigningMethodRS256, k["rsa"], "old", claims("a"))); err == nil {
		t.Error("the removed key still accepted after the refresh")
	}
	// More unknown kids within the limit's interval: refused at once, no fetch.
	fetched = srv.fetches.Load()
	for i := range 20 {
		if _, err := v.Validate(signKid(t, jwt.SigningMethodRS256, k["rsa2"], "made-up-"+string(rune('a'+i)), claims("a"))); err == nil {
			t.Fatal("unknown kid accepted")
		}
	}
	if got := srv.fetches.Load() - fetched; got != 0 {
		t.Fatalf("%d fetches for 20 unknown kids within the rate limit, want 0", got)
	}
}

func TestJWKSUnreachableAtStart(t *testing.T) {
	k := testKeys()
	srv := newJWKSServer(t)
	srv.setDown(true)
	jwks, err := NewJWKS(JWKSOptions{URL: srv.URL, Refresh: time.Hour})
	if err != nil {
		t.Fatalf("an unreachable JWKS must not fail the start: %v", err)
	}
	defer jwks.Close()
	v, _ := New(Options{Algorithms: []string{"ES256"}, JWKS: jwks})
	if v.Ready() {
		t.Fatal("ready without keys")
	}
	tok := signKid(t, jwt.SigningMethodES256, k["ec"], "e1", claims("a"))
	if _, err := v.Validate(tok); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("token accepted without keys: %v", err)
	}
	srv.publish(t, map[string]crypto.Signer{"e1": k["ec"]}, nil)
	deadline := time.Now().Add(10 * time.Second)
	for !v.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("JWKS not fetched after the endpoint came back")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := v.Validate(tok); err != nil {
		t.Fatalf("after the endpoint came back: %v", err)
	}
}

// TestJWKSBodyLimit: a JWKS endpoint that answers 2 MiB (here a valid set,
// padded) fails the refresh with a clear error instead of being read whole,
// and the last good key set stays in use.
func TestJWKSBodyLimit(t *testing.T) {
	k := testKeys()
	srv := newJWKSServer(t)
	srv.publish(t, map[string]crypto.Signer{"old": k["rsa"]}, nil)
	logs := &recordHandler{}
	jwks, err := NewJWKS(JWKSOptions{URL: srv.URL, Refresh: 20 * time.Millisecond, UnknownKIDEvery: time.Hour, Logger: slog.New(logs)})
	if err != nil {
		t.Fatal(err)
	}
	defer jwks.Close()
	v, _ := New(Options{Algorithms: []string{"RS256"}, JWKS: jwks})
	old := signKid(t, jwt.SigningMethodRS256, k["rsa"], "old", claims("a"))
	if _, err := v.Validate(old); err != nil {
		t.Fatal(err)
	}

	// The new body replaces "old" with "new": accepted whole, it would
	// remove the old key.
	jwk, err := jwkset.NewJWKFromKey(k["rsa2"].Public(), jwkset.JWKOptions{Metadata: jwkset.JWKMetadataOptions{KID: "new"}})
	if err != nil {
		t.Fatal(err)
	}
	big, err := json.Marshal(map[string]any{"keys": []jwkset.JWKMarshal{jwk.Marshal()}, "pad": strings.Repeat("x", 2<<20)})
	if err != nil {
		t.Fatal(err)
	}
	srv.mu.Lock()
	srv.body = big
	srv.mu.Unlock()
	// Refreshes run one after another: the second fetch after the swap
	// starts after the first one's outcome was decided.
	from := srv.fetches.Load()
	deadline := time.Now().Add(20 * time.Second)
	for srv.fetches.Load() < from+2 {
		if time.Now().After(deadline) {
			t.Fatal("no refresh of the big body")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := v.Validate(old); err != nil {
		t.Fatalf("the last good key after a 2 MiB answer: %v", err)
	}
	if !logs.has(ErrJWKSTooLarge.Error()) {
		t.Fatalf("no refresh error naming the limit; logged: %q", logs.all())
	}
}

// recordHandler keeps every log record's message and attributes as text.
type recordHandler struct {
	mu    sync.Mutex
	lines []string
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recordHandler) WithGroup(string) slog.Handler            { return h }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	line := r.Message
	r.Attrs(func(a slog.Attr) bool {
		line += " " + a.String()
		return true
	})
	h.mu.Lock()
	h.lines = append(h.lines, line)
	h.mu.Unlock()
	return nil
}

func (h *recordHandler) all() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.lines...)
}

func (h *recordHandler) has(s string) bool {
	for _, l := range h.all() {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

func TestExtractFromSubprotocol(t *testing.T) {
	r := httptest.NewRequest("GET", "/ws", nil)
	r.Header.Set("Sec-WebSocket-Protocol", "bearer, tok.en.x")
	r.Header.Set("Authorization", "Bearer h")
	if got := Extract(r); got != "tok.en.x" {
		t.Fatalf("subprotocol token: %q", got)
	}
	r.Header.Set("Sec-WebSocket-Protocol", "chat, superchat")
	if got := Extract(r); got != "h" {
		t.Fatalf("without bearer: %q", got)
	}
	r.Header.Set("Sec-WebSocket-Protocol", "bearer")
	r.Header.Del("Authorization")
	if got := Extract(r); got != "" {
		t.Fatalf("bearer without a token: %q", got)
	}
}

func BenchmarkValidate(b *testing.B) {
	k := testKeys()
	for _, tc := range []struct {
		alg    string
		method jwt.SigningMethod
		key    any
		opts   Options
	}{
		{"HS256", jwt.SigningMethodHS256, secret, Options{Algorithms: []string{"HS256"}, Secret: secret}},
		{"RS256", jwt.SigningMethodRS256, k["rsa"], Options{Algorithms: []string{"RS256"}, PublicKeys: []crypto.PublicKey{k["rsa"].Public()}}},
		{"ES256", jwt.SigningMethodES256, k["ec"], Options{Algorithms: []string{"ES256"}, PublicKeys: []crypto.PublicKey{k["ec"].Public()}}},
		{"EdDSA", jwt.SigningMethodEdDSA, k["ed"], Options{Algorithms: []string{"EdDSA"}, PublicKeys: []crypto.PublicKey{k["ed"].Public()}}},
	} {
		b.Run(tc.alg, func(b *testing.B) {
			v, err := New(tc.opts)
			if err != nil {
				b.Fatal(err)
			}
			tok := signKid(b, tc.method, tc.key, "", claims("u1"))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := v.Validate(tok); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkValidateJWKS: RS256 with the key looked up by kid in a fetched set.
func BenchmarkValidateJWKS(b *testing.B) {
	k := testKeys()
	jwk, err := jwkset.NewJWKFromKey(k["rsa"].Public(), jwkset.JWKOptions{Metadata: jwkset.JWKMetadataOptions{KID: "r1", ALG: jwkset.AlgRS256}})
	if err != nil {
		b.Fatal(err)
	}
	body, _ := json.Marshal(jwkset.JWKSMarshal{Keys: []jwkset.JWKMarshal{jwk.Marshal()}})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(body) }))
	defer srv.Close()
	jwks, err := NewJWKS(JWKSOptions{URL: srv.URL})
	if err != nil {
		b.Fatal(err)
	}
	defer jwks.Close()
	v, _ := New(Options{Algorithms: []string{"RS256"}, JWKS: jwks})
	tok := signKid(b, jwt.SigningMethodRS256, k["rsa"], "r1", claims("u1"))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Validate(tok); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzParsePublicKeys(f *testing.F) {
	k := testKeys()
	f.Add(string(pemPublic(f, k["rsa"].Public())), "RS256")
	f.Add(string(pemPublic(f, k["ec"].Public())), "ES256,ES384")
	f.Add(string(pemPublic(f, k["ed"].Public())), "EdDSA")
	f.Add("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "HS256,RS256")
	f.Add("", "none")
	f.Fuzz(func(t *testing.T, data, algList string) {
		algs, err := ParseAlgorithms(algList)
		if err != nil {
			return
		}
		keys, err := ParsePublicKeys([]byte(data), algs)
		if err != nil {
			return
		}
		if len(keys) == 0 {
			t.Fatal("no error and no key")
		}
		if IsHMAC(algs) {
			t.Fatalf("public keys accepted for HMAC %v", algs)
		}
		if _, err := New(Options{Algorithms: algs, PublicKeys: keys}); err != nil {
			t.Fatalf("parsed keys refused by New: %v", err)
		}
	})
}
