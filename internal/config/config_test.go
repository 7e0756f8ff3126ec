package config

import (
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/huleedu/websocket-service/internal/jwtauth"
)

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestDefaults(t *testing.T) {
	c, err := Load(env())
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr() != "0.0.0.0:8080" || strings.Join(c.JWTAlgorithms, ",") != "HS256" || c.ChannelPrefix != "ws" ||
		c.MaxConnsPerUser != 5 || c.MaxConns != 0 || c.PingInterval != 30*time.Second ||
		c.IdleTimeout != 90*time.Second || c.LogLevel != slog.LevelInfo || c.LogFormat != "json" ||
		c.Environment != Development || !c.JWTSecretIsDev || c.RedisURL != "" || c.ShutdownTimeout != 10*time.Second ||
		c.SendQueueMsgs != 256 || c.SendQueueBytes != 1<<20 || c.MaxMessageBytes != 65536 || c.RateLimit != 10 || c.RateBurst != 20 {
		t.Fatalf("unexpected defaults: %+v", c)
	}
}

func TestParsesValues(t *testing.T) {
	c, err := Load(env("WEBSOCKET_PORT", "9000", "WEBSOCKET_PING_INTERVAL", "15", "WEBSOCKET_IDLE_TIMEOUT", "1m",
		"CORS_ORIGINS", `["https://a.se","https://b.se/"]`, "LOG_LEVEL", "DEBUG", "JWT_ALGORITHM", "hs512",
		"REDIS_URL", "rediss://user:pw@redis.example:6380/0"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 9000 || c.PingInterval != 15*time.Second || c.IdleTimeout != time.Minute ||
		strings.Join(c.CORSOrigins, " ") != "https://a.se https://b.se" || c.LogLevel != slog.LevelDebug || strings.Join(c.JWTAlgorithms, ",") != "HS512" {
		t.Fatalf("%+v", c)
	}
	c, _ = Load(env("CORS_ORIGINS", "https://a.se, https://b.se"))
	if len(c.CORSOrigins) != 2 {
		t.Fatalf("comma list: %q", c.CORSOrigins)
	}
}

func TestRejectsBadValuesNamingTheVariable(t *testing.T) {
	cases := [][2]string{
		{"WEBSOCKET_PORT", "0"}, {"WEBSOCKET_PORT", "70000"}, {"WEBSOCKET_PORT", "http"},
		{"WEBSOCKET_PING_INTERVAL", "-5"}, {"WEBSOCKET_PING_INTERVAL", "soon"}, {"WEBSOCKET_IDLE_TIMEOUT", "-1s"},
		{"WEBSOCKET_MAX_CONNECTIONS_PER_USER", "-1"}, {"WEBSOCKET_MAX_CONNECTIONS", "many"},
		{"ENVIRONMENT", "staging"}, {"LOG_LEVEL", "verbose"}, {"LOG_FORMAT", "xml"},
		{"JWT_ALGORITHM", "none"}, {"JWT_ALGORITHM", "RS256"}, {"REDIS_URL", "http://localhost:6379"},
		{"REDIS_URL", "localhost:6379"}, {"CORS_ORIGINS", "[not json"}, {"PPROF_ADDR", "0.0.0.0:6060"},
		{"WEBSOCKET_RATE_LIMIT", "0"}, {"REDIS_PUBSUB_PROBE_TIMEOUT", "0"},
	}
	for _, tc := range cases {
		_, err := Load(env(tc[0], tc[1]))
		if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc[0]) {
			t.Errorf("%s=%q: error %v does not name the variable", tc[0], tc[1], err)
		}
	}
}

func TestPingMustBeShorterThanIdle(t *testing.T) {
	_, err := Load(env("WEBSOCKET_PING_INTERVAL", "90", "WEBSOCKET_IDLE_TIMEOUT", "60"))
	if err == nil || !strings.Contains(err.Error(), "WEBSOCKET_PING_INTERVAL") {
		t.Fatalf("got %v", err)
	}
}

// SHUTDOWN_READINESS_DELAY is part of the shutdown, not added to it: it
// must leave SHUTDOWN_TIMEOUT time to close the connections.
func TestReadinessDelayWithinShutdownTimeout(t *testing.T) {
	c, err := Load(env("SHUTDOWN_READINESS_DELAY", "5s", "SHUTDOWN_TIMEOUT", "20s"))
	if err != nil || c.ShutdownReadinessDelay != 5*time.Second {
		t.Fatalf("delay %s, %v", c.ShutdownReadinessDelay, err)
	}
	if c, _ := Load(env()); c.ShutdownReadinessDelay != 0 {
		t.Errorf("default delay %s, want 0 (Kubernetes' preStop does the waiting)", c.ShutdownReadinessDelay)
	}
	for _, v := range []string{"20s", "30s", "-1s", "soon"} {
		_, err := Load(env("SHUTDOWN_READINESS_DELAY", v, "SHUTDOWN_TIMEOUT", "20s"))
		if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "SHUTDOWN_READINESS_DELAY") {
			t.Errorf("SHUTDOWN_READINESS_DELAY=%s with SHUTDOWN_TIMEOUT=20s: %v", v, err)
		}
	}
}

func TestProductionRequirements(t *testing.T) {
	strong := strings.Repeat("k", 32)
	for name, e := range map[string]func(string) string{
		"no redis":     env("ENVIRONMENT", "production", "JWT_SECRET_KEY", strong),
		"no secret":    env("ENVIRONMENT", "production", "REDIS_URL", "redis://r:6379"),
		"short secret": env("ENVIRONMENT", "production", "REDIS_URL", "redis://r:6379", "JWT_SECRET_KEY", "short"),
		"dev secret":   env("ENVIRONMENT", "production", "REDIS_URL", "redis://r:6379", "JWT_SECRET_KEY", DevJWTSecret),
	} {
		if _, err := Load(e); err == nil {
			t.Errorf("%s: production started", name)
		}
	}
	if _, err := Load(env("ENVIRONMENT", "production", "REDIS_URL", "redis://r:6379", "JWT_SECRET_KEY", strong)); err != nil {
		t.Fatal(err)
	}
}

func TestMaskURL(t *testing.T) {
	got := MaskURL("redis://user:s3cret@host:6379/0")
	if strings.Contains(got, "s3cret") || strings.Contains(got, "user") || !strings.Contains(got, "host:6379") {
		t.Fatalf("MaskURL = %q", got)
	}
	if got := MaskURL("redis://host:6379"); got != "redis://host:6379" {
		t.Fatalf("MaskURL = %q", got)
	}
}

func FuzzLoad(f *testing.F) {
	f.Add("8080", "30", "90", "HS256", "redis://127.0.0.1:6379", `["https://a"]`, "production")
	f.Add("-1", "1e400", "NaN", "none", "redis://", "[", "x")
	f.Add("65535", "0.5", "1h", "HS512", "rediss://u:p@h:1", "a,b,,", "development")
	f.Fuzz(func(t *testing.T, port, ping, idle, alg, redis, cors, envName string) {
		c, err := Load(env("WEBSOCKET_PORT", port, "WEBSOCKET_PING_INTERVAL", ping, "WEBSOCKET_IDLE_TIMEOUT", idle,
			"JWT_ALGORITHM", alg, "REDIS_URL", redis, "CORS_ORIGINS", cors, "ENVIRONMENT", envName))
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error not wrapping ErrInvalid: %v", err)
			}
			return
		}
		if c.Port < 1 || c.Port > 65535 || c.PingInterval <= 0 || c.IdleTimeout <= 0 || c.PingInterval >= c.IdleTimeout {
			t.Fatalf("accepted invalid config %+v", c)
		}
		if c.Production() && (c.RedisURL == "" || (jwtauth.IsHMAC(c.JWTAlgorithms) && len(c.JWTSecret) < 32)) {
			t.Fatalf("production accepted without redis or strong secret")
		}
	})
}

func TestRedisTopologies(t *testing.T) {
	strong := strings.Repeat("k", 32)
	c, err := Load(env("ENVIRONMENT", "production", "JWT_SECRET_KEY", strong, "REDIS_CLUSTER_NODES", "10.0.0.1:6379, 10.0.0.2:6379",
		"REDIS_PUBSUB_MODE", "sharded", "REDIS_PASSWORD", "pw", "REDIS_TLS", "true"))
	if err != nil {
		t.Fatalf("production with cluster nodes and no REDIS_URL: %v", err)
	}
	if len(c.ClusterNodes) != 2 || c.PubSubMode != "sharded" || !c.RedisTLS || c.RedisPassword != "pw" || !c.RedisConfigured() {
		t.Fatalf("%+v", c)
	}
	if _, err := Load(env("ENVIRONMENT", "production", "JWT_SECRET_KEY", strong, "REDIS_SENTINEL_ADDRS", "s1:26379", "REDIS_SENTINEL_MASTER", "m")); err != nil {
		t.Fatalf("production with Sentinel: %v", err)
	}
	for name, e := range map[string]func(string) string{
		"REDIS_SENTINEL_MASTER": env("REDIS_SENTINEL_ADDRS", "s1:26379"),
		"only one of":           env("REDIS_URL", "redis://a:1", "REDIS_CLUSTER_NODES", "b:2"),
		"REDIS_CLUSTER_NODES":   env("REDIS_CLUSTER_NODES", "nohostport"),
		"REDIS_PUBSUB_MODE":     env("REDIS_PUBSUB_MODE", "fanout"),
		"REDIS_TLS":             env("REDIS_TLS", "maybe"),
	} {
		if _, err := Load(e); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: got %v", name, err)
		}
	}
}

// The README's configuration table names every variable Load reads.
func TestReadmeDocumentsEveryVariable(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range Variables {
		if !strings.Contains(string(readme), "`"+v.Name+"`") {
			t.Errorf("README does not document %s", v.Name)
		}
	}
}

const testPEM = `-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEMKBCTNIcKUSDii11ySs3526iDZ8A
iTo7Tu6KPAqv7D7gS2XpJFbZiItSs3m9+9Ue6GnvHw/GW2ZZaVtszggXIw==
-----END PUBLIC KEY-----`

func TestJWTKeySources(t *testing.T) {
	file := t.TempDir() + "/key.pem"
	if err := os.WriteFile(file, []byte(testPEM), 0o600); err != nil {
		t.Fatal(err)
	}
	ok := map[string]func(string) string{
		"PEM":                  env("JWT_ALGORITHM", "ES256", "JWT_PUBLIC_KEY", testPEM),
		"PEM with \\n escapes": env("JWT_ALGORITHM", "ES256", "JWT_PUBLIC_KEY", strings.ReplaceAll(testPEM, "\n", `\n`)),
		"file":                 env("JWT_ALGORITHM", "es256,RS256", "JWT_PUBLIC_KEY_FILE", file),
		"JWKS https":           env("JWT_ALGORITHM", "RS256", "JWT_JWKS_URL", "https://idp.example/jwks.json"),
		"JWKS http loopback":   env("JWT_ALGORITHM", "RS256", "JWT_JWKS_URL", "http://127.0.0.1:9/jwks"),
		"production JWKS":      env("JWT_ALGORITHM", "EdDSA", "JWT_JWKS_URL", "https://idp/jwks", "ENVIRONMENT", "production", "REDIS_URL", "redis://r:6379"),
	}
	for name, getenv := range ok {
		c, err := Load(getenv)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if len(c.JWTSecret) != 0 || c.JWTSecretIsDev {
			t.Errorf("%s: an HMAC secret set for asymmetric algorithms", name)
		}
		if (c.JWKSURL == "") == (len(c.JWTPublicKeys) == 0) {
			t.Errorf("%s: want exactly one key source, got url %q and %d keys", name, c.JWKSURL, len(c.JWTPublicKeys))
		}
	}
	bad := map[string]struct {
		getenv func(string) string
		names  string // the variables the message must name
	}{
		"mixed families":         {env("JWT_ALGORITHM", "HS256,RS256"), "JWT_ALGORITHM"},
		"none":                   {env("JWT_ALGORITHM", "none"), "JWT_ALGORITHM"},
		"asymmetric without key": {env("JWT_ALGORITHM", "RS256"), "JWT_PUBLIC_KEY"},
		"two key sources":        {env("JWT_ALGORITHM", "ES256", "JWT_PUBLIC_KEY", testPEM, "JWT_JWKS_URL", "https://x/j"), "JWT_JWKS_URL"},
		"secret with asymmetric": {env("JWT_ALGORITHM", "ES256", "JWT_PUBLIC_KEY", testPEM, "JWT_SECRET_KEY", "s"), "JWT_SECRET_KEY"},
		"public key with HMAC":   {env("JWT_PUBLIC_KEY", testPEM), "JWT_PUBLIC_KEY"},
		"key of the wrong type":  {env("JWT_ALGORITHM", "RS256", "JWT_PUBLIC_KEY", testPEM), "JWT_PUBLIC_KEY"},
		"garbage PEM":            {env("JWT_ALGORITHM", "RS256", "JWT_PUBLIC_KEY", "nope"), "JWT_PUBLIC_KEY"},
		"missing file":           {env("JWT_ALGORITHM", "RS256", "JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem"), "JWT_PUBLIC_KEY_FILE"},
		"JWKS over http":         {env("JWT_ALGORITHM", "RS256", "JWT_JWKS_URL", "http://idp.example/jwks"), "JWT_JWKS_URL"},
		"JWKS loopback http in production": {env("JWT_ALGORITHM", "RS256", "JWT_JWKS_URL", "http://127.0.0.1/jwks",
			"ENVIRONMENT", "production", "REDIS_URL", "redis://r:6379"), "JWT_JWKS_URL"},
		"JWKS not a URL":   {env("JWT_ALGORITHM", "RS256", "JWT_JWKS_URL", "ftp://x"), "JWT_JWKS_URL"},
		"refresh interval": {env("JWT_JWKS_REFRESH_INTERVAL", "-1s"), "JWT_JWKS_REFRESH_INTERVAL"},
	}
	for name, tc := range bad {
		_, err := Load(tc.getenv)
		if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.names) {
			t.Errorf("%s: got %v, want an error naming %s", name, err, tc.names)
		}
	}
}

// FuzzJWTKeyConfig: whatever the key variables hold, Load either refuses
// with ErrInvalid or returns one consistent key source.
func FuzzJWTKeyConfig(f *testing.F) {
	f.Add("ES256", testPEM, "", "", "development")
	f.Add("RS256,PS256", "", "https://idp/jwks", "", "production")
	f.Add("HS256", "", "", "secret", "development")
	f.Add("EdDSA", "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----", "http://[::1]:1/j", "", "development")
	f.Fuzz(func(t *testing.T, alg, pem, jwks, secret, envName string) {
		c, err := Load(env("JWT_ALGORITHM", alg, "JWT_PUBLIC_KEY", pem, "JWT_JWKS_URL", jwks, "JWT_SECRET_KEY", secret,
			"ENVIRONMENT", envName, "REDIS_URL", "redis://r:6379"))
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error not wrapping ErrInvalid: %v", err)
			}
			return
		}
		if jwtauth.IsHMAC(c.JWTAlgorithms) {
			if len(c.JWTSecret) == 0 || len(c.JWTPublicKeys) > 0 || c.JWKSURL != "" {
				t.Fatalf("HMAC config with keys: %+v", c)
			}
		} else if len(c.JWTSecret) > 0 || (len(c.JWTPublicKeys) > 0) == (c.JWKSURL != "") {
			t.Fatalf("asymmetric config without exactly one key source: %+v", c)
		}
		if _, err := jwtauth.New(jwtauth.Options{Algorithms: c.JWTAlgorithms, Secret: c.JWTSecret, PublicKeys: c.JWTPublicKeys,
			JWKS: jwksIf(c.JWKSURL != "")}); err != nil {
			t.Fatalf("accepted configuration refused by jwtauth.New: %v", err)
		}
	})
}

// jwksIf stands in for a JWKS in FuzzJWTKeyConfig (nothing is fetched).
func jwksIf(set bool) *jwtauth.JWKS {
	if !set {
		return nil
	}
	return &jwtauth.JWKS{}
}
