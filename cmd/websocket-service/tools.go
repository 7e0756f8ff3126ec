package main

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/config"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/notify"
)

// redisToolVars are the variables the tools that talk to Redis read.
var redisToolVars = []string{"REDIS_URL (default redis://127.0.0.1:6379), or REDIS_CLUSTER_NODES, or REDIS_SENTINEL_ADDRS + REDIS_SENTINEL_MASTER",
	"REDIS_USERNAME, REDIS_PASSWORD, REDIS_TLS (cluster/Sentinel)", "REDIS_PUBSUB_MODE (sharded: SPUBLISH)", "REDIS_CHANNEL_PREFIX (default ws)"}

// publish sends one notification to a user's channel.
func publish(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("publish",
		"Publish {\"event\":E,\"data\":D} (or --raw JSON as is) to the user's channel <REDIS_CHANNEL_PREFIX>:<user>,\n"+
			"kept in the user's history with an id (notify/publish.lua) unless --no-history.\n"+
			"Prints the number of gateway instances subscribed to that channel (not WebSockets) and the id.",
		redisToolVars, stderr)
	user := fs.String("user", "", "user id (the token's sub)")
	event := fs.String("event", "", "event name, e.g. batch_phase_concluded")
	data := fs.String("data", "{}", "event data, a JSON value")
	raw := fs.String("raw", "", "publish this JSON document as is instead of {event,data} (with history: an object without a top-level \"id\", which is reserved for the history id)")
	noHistory := fs.Bool("no-history", false, "plain PUBLISH: not kept in the user's history, no id, not resumable")
	idemKey := fs.String("idempotency-key", "", "a retry with the same key within the retention age is neither stored nor sent again")
	historyLen := fs.Int("history-len", notify.DefaultHistoryLen, "notifications kept per user")
	historyAge := fs.Duration("history-age", notify.DefaultHistoryAge, "age kept, and the history's expiry")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *user == "" || (*event == "" && *raw == "") {
		fs.Usage()
		return errors.New("publish needs --user and --event (or --raw)")
	}
	payload := []byte(*raw)
	if *raw != "" && !*noHistory {
		// Refused before connecting, with the reason: what publish.lua would refuse.
		if err := notify.CheckHistoryPayload(payload, 0); err != nil {
			return fmt.Errorf("--raw: %w", err)
		}
	}
	if *raw == "" {
		if !json.Valid([]byte(*data)) {
			return fmt.Errorf("--data is not valid JSON")
		}
		payload, _ = json.Marshal(notify.Notification{Event: *event, Data: json.RawMessage(*data)})
	}
	cfg, client, err := toolClient(getenv)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if !*noHistory {
		hp := notify.NewHistoryPublisher(client, cfg.ChannelPrefix, cfg.PubSubMode == "sharded",
			notify.HistoryOptions{MaxLen: *historyLen, MaxAge: *historyAge, MaxBytes: cfg.MaxMessageBytes})
		res, err := hp.Publish(ctx, *user, payload, *idemKey)
		if err != nil {
			return err
		}
		if res.Duplicate {
			fmt.Fprintf(stdout, "duplicate %s\n", res.ID)
			return nil
		}
		fmt.Fprintf(stdout, "%d %s\n", res.Receivers, res.ID)
		return nil
	}
	pub := notify.NewPublisher(client, cfg.ChannelPrefix)
	if cfg.PubSubMode == "sharded" {
		pub = notify.NewShardedPublisher(client, cfg.ChannelPrefix)
	}
	n, err := pub.Publish(ctx, *user, payload)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, n)
	return nil
}

// toolClient connects the operator tools to the configured Redis (the
// development default when none is).
func toolClient(getenv func(string) string) (config.Config, rueidis.Client, error) {
	cfg, err := config.Load(getenv)
	if err != nil {
		return cfg, nil, err
	}
	topo := topology(cfg)
	if !cfg.RedisConfigured() {
		topo.URL = config.DefaultRedisURL
	}
	opt, err := topo.ClientOption()
	if err != nil {
		return cfg, nil, err
	}
	opt.AlwaysRESP2 = !cfg.RedisConfigured() // the embedded development server speaks RESP2 only
	client, err := rueidis.NewClient(opt)
	if err != nil {
		return cfg, nil, fmt.Errorf("connect to %s: %w", topo.Describe(), err)
	}
	return cfg, client, nil
}

// disconnect closes a user's sockets on every instance (4004) and can
// revoke the user's tokens issued up to now.
func disconnect(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("disconnect",
		"Close every socket of a user on every gateway instance with 4004 REVOKED (notify/disconnect.lua);\n"+
			"with --revoke, also refuse the user's tokens issued up to now (iat <= now, or no iat) for --revoke-for.\n"+
			"Prints the number of gateway instances that held the user, and the revocation time (unix seconds, 0 without --revoke).",
		redisToolVars, stderr)
	user := fs.String("user", "", "user id (the token's sub)")
	reason := fs.String("reason", "", "shown to the client in the close reason (cut to fit 123 bytes)")
	revoke := fs.Bool("revoke", false, "also refuse the user's tokens issued up to now")
	revokeFor := fs.Duration("revoke-for", notify.DefaultRevokeFor, "how long the revocation is kept: your tokens' longest lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *user == "" {
		fs.Usage()
		return errors.New("disconnect needs --user")
	}
	cfg, client, err := toolClient(getenv)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	res, err := notify.NewDisconnecter(client, cfg.ChannelPrefix, cfg.PubSubMode == "sharded").
		Disconnect(ctx, *user, notify.DisconnectOptions{Reason: *reason, Revoke: *revoke, RevokeFor: *revokeFor})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%d %d\n", res.Receivers, res.RevokedAt)
	return nil
}

// token mints a development token signed with JWT_SECRET_KEY, or with a
// private key (--key-file) for asymmetric configurations.
func token(args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("token", "Mint a token signed with JWT_SECRET_KEY, or with --key-file (adding aud/iss when configured).",
		[]string{"JWT_SECRET_KEY", "JWT_ALGORITHM", "JWT_AUDIENCE", "JWT_ISSUER"}, stderr)
	sub := fs.String("sub", "", "the user id (sub claim)")
	ttl := fs.Duration("ttl", time.Hour, "lifetime")
	keyFile := fs.String("key-file", "", "PEM private key (RSA, ECDSA or Ed25519) to sign with instead of JWT_SECRET_KEY")
	kid := fs.String("kid", "", "key id for the header (JWKS configurations select keys by kid)")
	alg := fs.String("alg", "", "algorithm with --key-file (default: the first of JWT_ALGORITHM that fits the key)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sub == "" {
		fs.Usage()
		return errors.New("token needs --sub")
	}
	var t string
	var err error
	if *keyFile != "" {
		t, err = mintWithKey(getenv, *keyFile, *alg, *kid, *sub, *ttl)
	} else {
		t, err = mint(getenv, *sub, *ttl)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, t)
	return nil
}

func mint(getenv func(string) string, sub string, ttl time.Duration) (string, error) {
	cfg, err := config.Load(getenv)
	if err != nil {
		return "", err
	}
	v, err := jwtauth.New(authOptions(cfg, nil))
	if err != nil {
		return "", err
	}
	return v.Mint(sub, ttl)
}

// mintWithKey signs with a private key; it reads only the JWT_* variables
// it needs, so it works without the service's key configuration.
func mintWithKey(getenv func(string) string, keyFile, alg, kid, sub string, ttl time.Duration) (string, error) {
	data, err := os.ReadFile(keyFile)
	if err != nil {
		return "", fmt.Errorf("--key-file: %w", err)
	}
	key, err := jwtauth.ParsePrivateKey(data)
	if err != nil {
		return "", fmt.Errorf("--key-file: %w", err)
	}
	if alg == "" {
		alg = jwtauth.DefaultAlgorithm(key.Public(), getenv("JWT_ALGORITHM"))
		if alg == "" {
			return "", fmt.Errorf("--key-file holds a %T that no algorithm of JWT_ALGORITHM fits: pass --alg", key)
		}
	}
	algs, err := jwtauth.ParseAlgorithms(alg)
	if err != nil || jwtauth.IsHMAC(algs) {
		return "", fmt.Errorf("--alg %q: want an asymmetric algorithm", alg)
	}
	v, err := jwtauth.New(jwtauth.Options{Algorithms: algs, PublicKeys: []crypto.PublicKey{key.Public()},
		Audience: strings.TrimSpace(getenv("JWT_AUDIENCE")), Issuer: strings.TrimSpace(getenv("JWT_ISSUER"))})
	if err != nil {
		return "", fmt.Errorf("--key-file with --alg %s: %w", algs[0], err)
	}
	return v.MintWith(algs[0], key, kid, sub, ttl)
}

// listen connects as a user and prints each notification as one line.
func listen(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("listen", "Connect to the gateway as a user and print each notification as one line until interrupted.",
		[]string{"JWT_SECRET_KEY, JWT_ALGORITHM, JWT_AUDIENCE, JWT_ISSUER (to mint a token when --token is not given)"}, stderr)
	user := fs.String("user", "", "user id")
	tok := fs.String("token", "", "token to use (default: mint one for --user)")
	base := fs.String("url", "ws://127.0.0.1:8080", "gateway base URL")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *user == "" {
		fs.Usage()
		return errors.New("listen needs --user")
	}
	if *tok == "" {
		t, err := mint(getenv, *user, time.Hour)
		if err != nil {
			return err
		}
		*tok = t
	}
	u := *base + "/ws/v1/status/" + url.PathEscape(*user) + "?token=" + url.QueryEscape(*tok)
	conn, resp, err := websocket.DefaultDialer.DialContext(ctx, u, nil)
	if err != nil {
		if resp != nil {
			return fmt.Errorf("connect: %w (HTTP %d)", err, resp.StatusCode)
		}
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() {
		_ = conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
		_ = conn.Close()
	})
	defer stop()
	fmt.Fprintf(stderr, "listening as %s (Ctrl-C to stop)\n", *user)
	for {
		_, msg, err := conn.ReadMessage()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				return fmt.Errorf("closed by server: %d %s", ce.Code, ce.Text)
			}
			return err
		}
		fmt.Fprintln(stdout, string(msg))
	}
}
