// Package config parses and validates the service's environment once, at the
// edge, into one typed Config that the rest of the program receives.
package config

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/huleedu/websocket-service/internal/jwtauth"
)

// DevJWTSecret signs tokens in development when JWT_SECRET_KEY is unset.
// Production refuses to start with it.
const DevJWTSecret = "huleedu-websocket-service-development-secret"

// DefaultRedisURL is where development looks for a Redis when REDIS_URL is unset.
const DefaultRedisURL = "redis://127.0.0.1:6379"

// Environments.
const (
	Development = "development"
	Production  = "production"
)

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid configuration")

// Config is every setting of the service, parsed from the environment.
type Config struct {
	Host string // WEBSOCKET_HOST
	Port int    // WEBSOCKET_PORT

	JWTSecret       []byte   // JWT_SECRET_KEY (HMAC algorithms only)
	JWTSecretIsDev  bool     // true when JWT_SECRET_KEY was unset and DevJWTSecret is used
	JWTAlgorithms   []string // JWT_ALGORITHM: one family, HMAC or asymmetric
	JWTPublicKeys   []crypto.PublicKey
	JWKSURL         string        // JWT_JWKS_URL
	JWKSRefresh     time.Duration // JWT_JWKS_REFRESH_INTERVAL
	JWTAudience     string        // JWT_AUDIENCE
	JWTIssuer       string        // JWT_ISSUER
	RedisURL        string        // REDIS_URL ("" in development: probe 127.0.0.1:6379, else embedded)
	ClusterNodes    []string      // REDIS_CLUSTER_NODES: seed host:port list
	SentinelAddrs   []string      // REDIS_SENTINEL_ADDRS
	SentinelMaster  string        // REDIS_SENTINEL_MASTER
	RedisUsername   string        // REDIS_USERNAME (cluster/Sentinel; a URL carries its own)
	RedisPassword   string        // REDIS_PASSWORD
	RedisTLS        bool          // REDIS_TLS
	PubSubMode      string        // REDIS_PUBSUB_MODE: classic or sharded
	ChannelPrefix   string        // REDIS_CHANNEL_PREFIX
	ProbeInterval   time.Duration
	ProbeTimeout    time.Duration
	MaxConnsPerUser int // WEBSOCKET_MAX_CONNECTIONS_PER_USER
	MaxConns        int // WEBSOCKET_MAX_CONNECTIONS (0: no limit)
	MaxHandshakes   int // WEBSOCKET_MAX_PENDING_HANDSHAKES
	PingInterval    time.Duration
	IdleTimeout     time.Duration
	SendQueueMsgs   int // WEBSOCKET_SEND_QUEUE_MESSAGES
	SendQueueBytes  int // WEBSOCKET_SEND_QUEUE_BYTES
	MaxMessageBytes int // WEBSOCKET_MAX_MESSAGE_BYTES (payloads from Redis)
	RateLimit       float64
	RateBurst       int
	CORSOrigins     []string
	LogLevel        slog.Level
	LogFormat       string // json or text
	Environment     string
	ShutdownTimeout time.Duration
	// ShutdownReadinessDelay (SHUTDOWN_READINESS_DELAY) is how long /readyz
	// answers 503 on SIGTERM before the listener closes, so that load
	// balancers health-checking it stop routing here first; part of
	// ShutdownTimeout, not added to it.
	ShutdownReadinessDelay time.Duration
	PprofAddr              string // PPROF_ADDR: loopback address for net/http/pprof, "" = off
}

// Addr is the listen address.
func (c Config) Addr() string { return fmt.Sprintf("%s:%d", c.Host, c.Port) }

// RedisConfigured reports whether a Redis topology was given (otherwise
// development falls back to 127.0.0.1:6379 or the embedded server).
func (c Config) RedisConfigured() bool {
	return c.RedisURL != "" || len(c.ClusterNodes) > 0 || len(c.SentinelAddrs) > 0
}

// Production reports whether ENVIRONMENT=production.
func (c Config) Production() bool { return c.Environment == Production }

// Variable documents one environment variable; Variables is the table the
// README and --help are written from.
type Variable struct {
	Name, Default, Meaning string
}

// Variables lists every variable the service reads.
var Variables = []Variable{
	{"WEBSOCKET_HOST", "0.0.0.0", "listen address"},
	{"WEBSOCKET_PORT", "8080", "listen port (1-65535)"},
	{"JWT_SECRET_KEY", "development: a fixed dev secret (warning logged)", "HMAC secret; production requires >= 32 bytes; must be unset with asymmetric algorithms"},
	{"JWT_ALGORITHM", "HS256", "accepted algorithms, comma-separated, one family: HS256/384/512, or RS256/384/512, PS256/384/512, ES256/384/512, EdDSA"},
	{"JWT_PUBLIC_KEY", "unset", "asymmetric algorithms: PEM public key(s) or certificate(s); \\n escapes allowed"},
	{"JWT_PUBLIC_KEY_FILE", "unset", "asymmetric algorithms: a file holding the PEM instead"},
	{"JWT_JWKS_URL", "unset", "asymmetric algorithms: JWKS endpoint (https; http only to loopback in development); keys by kid"},
	{"JWT_JWKS_REFRESH_INTERVAL", "1h", "periodic JWKS refresh; an unknown kid also refreshes, at most every 30s"},
	{"JWT_AUDIENCE", "unset", "when set, a token's aud must contain it"},
	{"JWT_ISSUER", "unset", "when set, a token's iss must equal it"},
	{"REDIS_URL", "development: redis://127.0.0.1:6379, else an embedded dev Redis", "redis:// or rediss:// URL"},
	{"REDIS_CLUSTER_NODES", "unset", "Redis Cluster seed nodes host:port,host:port (instead of REDIS_URL)"},
	{"REDIS_SENTINEL_ADDRS", "unset", "Sentinel addresses host:port,... (instead of REDIS_URL)"},
	{"REDIS_SENTINEL_MASTER", "unset", "the master name Sentinel monitors (required with REDIS_SENTINEL_ADDRS)"},
	{"REDIS_USERNAME", "unset", "ACL user for cluster/Sentinel nodes"},
	{"REDIS_PASSWORD", "unset", "password for cluster/Sentinel nodes"},
	{"REDIS_TLS", "false", "TLS to cluster/Sentinel nodes"},
	{"REDIS_PUBSUB_MODE", "classic", "classic (PUBLISH/SUBSCRIBE) or sharded (SPUBLISH/SSUBSCRIBE)"},
	{"REDIS_CHANNEL_PREFIX", "ws", "channel = <prefix>:<user_id>"},
	{"REDIS_PUBSUB_PROBE_INTERVAL", "5s", "quiet time after which the pub/sub link is probed"},
	{"REDIS_PUBSUB_PROBE_TIMEOUT", "3s", "a probe not back by then marks the link broken"},
	{"WEBSOCKET_MAX_CONNECTIONS_PER_USER", "5", "per user, per instance"},
	{"WEBSOCKET_MAX_CONNECTIONS", "0 (no limit)", "per instance"},
	{"WEBSOCKET_MAX_PENDING_HANDSHAKES", "1024", "upgrades in progress at once; more get HTTP 503"},
	{"WEBSOCKET_PING_INTERVAL", "30", "seconds, or a Go duration such as 30s"},
	{"WEBSOCKET_IDLE_TIMEOUT", "90", "seconds, or a Go duration; nothing received for this long closes 1001"},
	{"WEBSOCKET_SEND_QUEUE_MESSAGES", "256", "outbound queue bound per connection (messages)"},
	{"WEBSOCKET_SEND_QUEUE_BYTES", "1048576", "outbound queue bound per connection (bytes)"},
	{"WEBSOCKET_MAX_MESSAGE_BYTES", "65536", "larger payloads from Redis are dropped"},
	{"WEBSOCKET_RATE_LIMIT", "10", "inbound frames per second per connection"},
	{"WEBSOCKET_RATE_BURST", "20", "inbound burst per connection"},
	{"CORS_ORIGINS", "unset", "allowed browser origins, comma-separated or a JSON list"},
	{"LOG_LEVEL", "info", "debug, info, warn, error"},
	{"LOG_FORMAT", "json", "json or text"},
	{"ENVIRONMENT", "development", "development or production"},
	{"SHUTDOWN_TIMEOUT", "10s", "bound on graceful shutdown"},
	{"SHUTDOWN_READINESS_DELAY", "0s", "on SIGTERM, /readyz answers 503 for this long before the listener closes (within SHUTDOWN_TIMEOUT)"},
	{"PPROF_ADDR", "unset (off)", "loopback host:port serving net/http/pprof"},
}

// Load parses the environment given by getenv and validates it.
func Load(getenv func(string) string) (Config, error) {
	p := parser{getenv: getenv}
	c := Config{
		Host:                   p.str("WEBSOCKET_HOST", "0.0.0.0"),
		Port:                   p.intRange("WEBSOCKET_PORT", 8080, 1, 65535),
		JWKSRefresh:            p.duration("JWT_JWKS_REFRESH_INTERVAL", time.Hour, true),
		JWTAudience:            p.str("JWT_AUDIENCE", ""),
		JWTIssuer:              p.str("JWT_ISSUER", ""),
		RedisURL:               p.redisURL("REDIS_URL"),
		ChannelPrefix:          p.str("REDIS_CHANNEL_PREFIX", "ws"),
		ClusterNodes:           p.addrList("REDIS_CLUSTER_NODES"),
		SentinelAddrs:          p.addrList("REDIS_SENTINEL_ADDRS"),
		SentinelMaster:         p.str("REDIS_SENTINEL_MASTER", ""),
		RedisUsername:          p.str("REDIS_USERNAME", ""),
		RedisPassword:          getenv("REDIS_PASSWORD"),
		RedisTLS:               p.boolean("REDIS_TLS"),
		PubSubMode:             p.oneOf("REDIS_PUBSUB_MODE", "classic", "classic", "sharded"),
		ProbeInterval:          p.duration("REDIS_PUBSUB_PROBE_INTERVAL", 5*time.Second, true),
		ProbeTimeout:           p.duration("REDIS_PUBSUB_PROBE_TIMEOUT", 3*time.Second, true),
		MaxConnsPerUser:        p.intRange("WEBSOCKET_MAX_CONNECTIONS_PER_USER", 5, 1, 1<<20),
		MaxConns:               p.intRange("WEBSOCKET_MAX_CONNECTIONS", 0, 0, 1<<30),
		MaxHandshakes:          p.intRange("WEBSOCKET_MAX_PENDING_HANDSHAKES", 1024, 1, 1<<20),
		PingInterval:           p.duration("WEBSOCKET_PING_INTERVAL", 30*time.Second, true),
		IdleTimeout:            p.duration("WEBSOCKET_IDLE_TIMEOUT", 90*time.Second, true),
		SendQueueMsgs:          p.intRange("WEBSOCKET_SEND_QUEUE_MESSAGES", 256, 1, 1<<20),
		SendQueueBytes:         p.intRange("WEBSOCKET_SEND_QUEUE_BYTES", 1<<20, 1024, 1<<30),
		MaxMessageBytes:        p.intRange("WEBSOCKET_MAX_MESSAGE_BYTES", 65536, 1, 1<<30),
		RateLimit:              p.positiveFloat("WEBSOCKET_RATE_LIMIT", 10),
		RateBurst:              p.intRange("WEBSOCKET_RATE_BURST", 20, 1, 1<<20),
		CORSOrigins:            p.list("CORS_ORIGINS"),
		LogLevel:               p.level("LOG_LEVEL"),
		LogFormat:              p.oneOf("LOG_FORMAT", "json", "json", "text"),
		Environment:            p.oneOf("ENVIRONMENT", Development, Development, Production),
		ShutdownTimeout:        p.duration("SHUTDOWN_TIMEOUT", 10*time.Second, true),
		ShutdownReadinessDelay: p.duration("SHUTDOWN_READINESS_DELAY", 0, false),
		PprofAddr:              p.loopbackAddr("PPROF_ADDR"),
	}
	p.jwt(&c)
	if c.IdleTimeout > 0 && c.PingInterval >= c.IdleTimeout {
		p.fail("WEBSOCKET_PING_INTERVAL", getenv("WEBSOCKET_PING_INTERVAL"), "a duration shorter than WEBSOCKET_IDLE_TIMEOUT")
	}
	if c.ShutdownReadinessDelay >= c.ShutdownTimeout {
		p.fail("SHUTDOWN_READINESS_DELAY", getenv("SHUTDOWN_READINESS_DELAY"), "a duration shorter than SHUTDOWN_TIMEOUT ("+c.ShutdownTimeout.String()+"), which bounds the whole shutdown")
	}
	if strings.ContainsAny(c.ChannelPrefix, " \r\n") {
		p.fail("REDIS_CHANNEL_PREFIX", c.ChannelPrefix, "a prefix without spaces or newlines")
	}
	topologies := 0
	for _, set := range []bool{c.RedisURL != "", len(c.ClusterNodes) > 0, len(c.SentinelAddrs) > 0} {
		if set {
			topologies++
		}
	}
	if topologies > 1 {
		p.errs = append(p.errs, fmt.Errorf("%w: set only one of REDIS_URL, REDIS_CLUSTER_NODES and REDIS_SENTINEL_ADDRS", ErrInvalid))
	}
	if (len(c.SentinelAddrs) > 0) != (c.SentinelMaster != "") {
		p.errs = append(p.errs, fmt.Errorf("%w: REDIS_SENTINEL_ADDRS and REDIS_SENTINEL_MASTER go together", ErrInvalid))
	}
	if c.Production() {
		if topologies == 0 {
			p.errs = append(p.errs, fmt.Errorf("%w: REDIS_URL (or REDIS_CLUSTER_NODES, or REDIS_SENTINEL_ADDRS) is required when ENVIRONMENT=production", ErrInvalid))
		}
		switch {
		case !jwtauth.IsHMAC(c.JWTAlgorithms):
		case c.JWTSecretIsDev || string(c.JWTSecret) == DevJWTSecret:
			p.errs = append(p.errs, fmt.Errorf("%w: JWT_SECRET_KEY must be set (and not the development secret) when ENVIRONMENT=production", ErrInvalid))
		case len(c.JWTSecret) < 32:
			p.errs = append(p.errs, fmt.Errorf("%w: JWT_SECRET_KEY must be at least 32 bytes when ENVIRONMENT=production (got %d)", ErrInvalid, len(c.JWTSecret)))
		}
	}
	return c, errors.Join(p.errs...)
}

// jwt reads the algorithms and the one key source they need: the HMAC
// secret, or PEM public keys, or a JWKS URL.
func (p *parser) jwt(c *Config) {
	algs, err := jwtauth.ParseAlgorithms(p.str("JWT_ALGORITHM", "HS256"))
	if err != nil {
		p.errs = append(p.errs, fmt.Errorf("%w: JWT_ALGORITHM=%q: %w", ErrInvalid, p.getenv("JWT_ALGORITHM"), err))
		algs = []string{"HS256"}
	}
	c.JWTAlgorithms = algs
	secret := p.getenv("JWT_SECRET_KEY")
	pemText := strings.ReplaceAll(strings.TrimSpace(p.getenv("JWT_PUBLIC_KEY")), `\n`, "\n")
	pemFile := strings.TrimSpace(p.getenv("JWT_PUBLIC_KEY_FILE"))
	jwks := strings.TrimSpace(p.getenv("JWT_JWKS_URL"))
	sources := []string{}
	for name, v := range map[string]string{"JWT_PUBLIC_KEY": pemText, "JWT_PUBLIC_KEY_FILE": pemFile, "JWT_JWKS_URL": jwks} {
		if v != "" {
			sources = append(sources, name)
		}
	}
	slices.Sort(sources)
	if jwtauth.IsHMAC(algs) {
		if len(sources) > 0 {
			p.errs = append(p.errs, fmt.Errorf("%w: %s is set, but JWT_ALGORITHM=%s is HMAC: public keys need RS*, PS*, ES* or EdDSA", ErrInvalid, strings.Join(sources, " and "), strings.Join(algs, ",")))
		}
		if secret != "" {
			c.JWTSecret = []byte(secret)
		} else {
			c.JWTSecret, c.JWTSecretIsDev = []byte(DevJWTSecret), true
		}
		return
	}
	if secret != "" {
		p.errs = append(p.errs, fmt.Errorf("%w: JWT_SECRET_KEY is set, but JWT_ALGORITHM=%s is asymmetric: HMAC and public-key algorithms are never mixed", ErrInvalid, strings.Join(algs, ",")))
	}
	if len(sources) != 1 {
		p.errs = append(p.errs, fmt.Errorf("%w: JWT_ALGORITHM=%s needs exactly one of JWT_PUBLIC_KEY, JWT_PUBLIC_KEY_FILE and JWT_JWKS_URL (got %d)", ErrInvalid, strings.Join(algs, ","), len(sources)))
		return
	}
	switch {
	case jwks != "":
		c.JWKSURL = p.jwksURL(jwks)
	case pemFile != "":
		data, err := os.ReadFile(pemFile)
		if err != nil {
			p.errs = append(p.errs, fmt.Errorf("%w: JWT_PUBLIC_KEY_FILE: %w", ErrInvalid, err))
			return
		}
		p.publicKeys(c, "JWT_PUBLIC_KEY_FILE", data)
	default:
		p.publicKeys(c, "JWT_PUBLIC_KEY", []byte(pemText))
	}
}

func (p *parser) publicKeys(c *Config, name string, data []byte) {
	keys, err := jwtauth.ParsePublicKeys(data, c.JWTAlgorithms)
	if err != nil {
		p.errs = append(p.errs, fmt.Errorf("%w: %s: %w", ErrInvalid, name, err))
		return
	}
	c.JWTPublicKeys = keys
}

// jwksURL accepts https, and http to a loopback host outside production.
func (p *parser) jwksURL(v string) string {
	u, err := url.Parse(v)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		p.fail("JWT_JWKS_URL", v, "an https:// URL")
		return ""
	}
	if u.Scheme == "http" {
		host := u.Hostname()
		ip := net.ParseIP(host)
		loopback := host == "localhost" || (ip != nil && ip.IsLoopback())
		if !loopback || strings.EqualFold(strings.TrimSpace(p.getenv("ENVIRONMENT")), Production) {
			p.fail("JWT_JWKS_URL", v, "an https:// URL (http only to a loopback host, in development)")
			return ""
		}
	}
	return v
}

// parser collects every error, so one start reports every bad variable.
type parser struct {
	getenv func(string) string
	errs   []error
}

func (p *parser) fail(name, value, want string) {
	p.errs = append(p.errs, fmt.Errorf("%w: %s=%q: want %s", ErrInvalid, name, value, want))
}

func (p *parser) str(name, def string) string {
	if v := strings.TrimSpace(p.getenv(name)); v != "" {
		return v
	}
	return def
}

func (p *parser) intRange(name string, def, lo, hi int) int {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		p.fail(name, v, fmt.Sprintf("an integer from %d to %d", lo, hi))
		return def
	}
	return n
}

func (p *parser) positiveFloat(name string, def float64) float64 {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || !(f > 0) || f > 1e9 {
		p.fail(name, v, "a number greater than 0")
		return def
	}
	return f
}

// duration accepts whole seconds ("30") or a Go duration ("30s", "500ms").
func (p *parser) duration(name string, def time.Duration, positive bool) time.Duration {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.ParseFloat(v, 64)
		if nerr != nil || n > 1e9 || n != n {
			p.fail(name, v, "seconds or a Go duration such as 30s")
			return def
		}
		d = time.Duration(n * float64(time.Second))
	}
	if d < 0 || (positive && d == 0) {
		p.fail(name, v, "a positive duration")
		return def
	}
	return d
}

func (p *parser) oneOf(name, def string, allowed ...string) string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return def
	}
	for _, a := range allowed {
		if strings.EqualFold(v, a) {
			return a
		}
	}
	p.fail(name, v, "one of "+strings.Join(allowed, ", "))
	return def
}

func (p *parser) level(name string) slog.Level {
	switch v := strings.ToLower(strings.TrimSpace(p.getenv(name))); v {
	case "", "info":
		return slog.LevelInfo
	case "debug":
		return slog.LevelDebug
	case "warn", "warning":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	default:
		p.fail(name, v, "one of debug, info, warn, error")
		return slog.LevelInfo
	}
}

func (p *parser) redisURL(name string) string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return ""
	}
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		p.fail(name, MaskURL(v), "a redis:// or rediss:// URL with a host")
		return ""
	}
	return v
}

// list accepts "a,b" or a JSON list `["a","b"]`.
func (p *parser) list(name string) []string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return nil
	}
	var out []string
	if strings.HasPrefix(v, "[") {
		if err := json.Unmarshal([]byte(v), &out); err != nil {
			p.fail(name, v, "comma-separated origins or a JSON list of strings")
			return nil
		}
	} else {
		out = strings.Split(v, ",")
	}
	clean := out[:0]
	for _, o := range out {
		if o = strings.TrimRight(strings.TrimSpace(o), "/"); o != "" {
			clean = append(clean, o)
		}
	}
	return clean
}

func (p *parser) boolean(name string) bool {
	switch v := strings.ToLower(strings.TrimSpace(p.getenv(name))); v {
	case "", "0", "false", "no":
		return false
	case "1", "true", "yes":
		return true
	default:
		p.fail(name, v, "true or false")
		return false
	}
}

// addrList parses "host:port,host:port".
func (p *parser) addrList(name string) []string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return nil
	}
	var out []string
	for a := range strings.SplitSeq(v, ",") {
		a = strings.TrimSpace(a)
		if _, port, err := splitHostPort(a); err != nil || port < 1 || port > 65535 {
			p.fail(name, v, "comma-separated host:port addresses")
			return nil
		}
		out = append(out, a)
	}
	return out
}

func (p *parser) loopbackAddr(name string) string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return ""
	}
	host, port, err := splitHostPort(v)
	if err != nil || port < 1 || port > 65535 || (host != "127.0.0.1" && host != "localhost" && host != "::1") {
		p.fail(name, v, "a loopback host:port such as 127.0.0.1:6060")
		return ""
	}
	return v
}

func splitHostPort(v string) (string, int, error) {
	i := strings.LastIndexByte(v, ':')
	if i < 0 {
		return "", 0, errors.New("no port")
	}
	port, err := strconv.Atoi(v[i+1:])
	return strings.Trim(v[:i], "[]"), port, err
}

// MaskURL hides the password (and user) of a URL for logs and health output.
func MaskURL(raw string) string {
	if !strings.Contains(raw, "://") {
		return raw // not a URL (e.g. "cluster host:port,..."): nothing to mask
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "<unparsable url>"
	}
	if u.User != nil {
		u.User = url.User("***")
	}
	return u.String()
}
