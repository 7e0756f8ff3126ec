package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/internal/config"
	"github.com/huleedu/websocket-service/internal/jwtauth"
	"github.com/huleedu/websocket-service/notify"
)

// publish sends one notification to a user's channel.
func publish(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("publish",
		"Publish {\"event\":E,\"data\":D} (or --raw JSON as is) to the user's channel <REDIS_CHANNEL_PREFIX>:<user>,\n"+
			"kept in the user's history with an id (notify/publish.lua) unless --no-history.\n"+
			"Prints the number of gateway instances subscribed to that channel (not WebSockets) and the id.",
		[]string{"REDIS_URL (default redis://127.0.0.1:6379), or REDIS_CLUSTER_NODES, or REDIS_SENTINEL_ADDRS + REDIS_SENTINEL_MASTER",
			"REDIS_USERNAME, REDIS_PASSWORD, REDIS_TLS (cluster/Sentinel)", "REDIS_PUBSUB_MODE (sharded: SPUBLISH)", "REDIS_CHANNEL_PREFIX (default ws)"}, stderr)
	user := fs.String("user", "", "user id (the token's sub)")
	event := fs.String("event", "", "event name, e.g. batch_phase_concluded")
	data := fs.String("data", "{}", "event data, a JSON value")
	raw := fs.String("raw", "", "publish this JSON document as is instead of {event,data}")
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
	if *raw == "" {
		if !json.Valid([]byte(*data)) {
			return fmt.Errorf("--data is not valid JSON")
		}
		payload, _ = json.Marshal(notify.Notification{Event: *event, Data: json.RawMessage(*data)})
	}
	cfg, err := config.Load(getenv)
	if err != nil {
		return err
	}
	topo := topology(cfg)
	if !cfg.RedisConfigured() {
		topo.URL = config.DefaultRedisURL
	}
	opt, err := topo.ClientOption()
	if err != nil {
		return err
	}
	opt.AlwaysRESP2 = !cfg.RedisConfigured() // the embedded development server speaks RESP2 only
	client, err := rueidis.NewClient(opt)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", topo.Describe(), err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if !*noHistory {
		hp := notify.NewHistoryPublisher(client, cfg.ChannelPrefix, cfg.PubSubMode == "sharded",
			notify.HistoryOptions{MaxLen: *historyLen, MaxAge: *historyAge})
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

// token mints a development token signed with JWT_SECRET_KEY.
func token(args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("token", "Mint a token signed with JWT_SECRET_KEY (adding aud/iss when configured).",
		[]string{"JWT_SECRET_KEY", "JWT_ALGORITHM", "JWT_AUDIENCE", "JWT_ISSUER"}, stderr)
	sub := fs.String("sub", "", "the user id (sub claim)")
	ttl := fs.Duration("ttl", time.Hour, "lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sub == "" {
		fs.Usage()
		return errors.New("token needs --sub")
	}
	t, err := mint(getenv, *sub, *ttl)
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
	v, err := jwtauth.New(jwtauth.Options{Secret: cfg.JWTSecret, Algorithm: cfg.JWTAlgorithm, Audience: cfg.JWTAudience, Issuer: cfg.JWTIssuer})
	if err != nil {
		return "", err
	}
	return v.Mint(sub, ttl)
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
