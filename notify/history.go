package notify

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// PublishScript is publish.lua: it appends a notification to the user's
// history and publishes it, atomically. Backends in other languages run the
// same file (see docs/protocol.md for redis-py).
//
//go:embed publish.lua
var PublishScript string

// Retention defaults: enough for a reconnect, a deploy or a Redis failover
// (seconds) with a wide margin, at ~0.5 KB of Redis memory per entry.
const (
	DefaultHistoryLen     = 100
	DefaultHistoryAge     = 5 * time.Minute
	DefaultHistoryMetaTTL = 24 * time.Hour
)

// HistoryKey and MetaKey name a channel's history list and its metadata
// hash; their hash tag puts them in the channel's slot ("{<channel>}:h"
// for a channel without "}"; see hashTag).
func HistoryKey(channel string) string { return hashTag(channel) + ":h" }

// MetaKey: see HistoryKey.
func MetaKey(channel string) string { return hashTag(channel) + ":m" }

// idempotencyKeyName marks a publish already done under key.
func idempotencyKeyName(channel, key string) string { return hashTag(channel) + ":i:" + key }

// EmptyPosition is the position of a reader whose user had no history yet:
// resuming from it replays everything the history holds now.
const EmptyPosition = "0"

// ID is a parsed notification id, "<epoch>-<offset>-<check>".
type ID struct {
	Epoch  string
	Offset int64
	Check  string
}

// String formats the id as it appears on the wire.
func (id ID) String() string {
	return id.Epoch + "-" + strconv.FormatInt(id.Offset, 10) + "-" + id.Check
}

// ParseID parses an id; ok is false for anything publish.lua cannot have made.
func ParseID(s string) (id ID, ok bool) {
	epoch, rest, ok1 := strings.Cut(s, "-")
	off, check, ok2 := strings.Cut(rest, "-")
	if !ok1 || !ok2 || epoch == "" || check == "" || strings.Contains(check, "-") {
		return ID{}, false
	}
	n, err := strconv.ParseInt(off, 10, 64)
	if err != nil || n < 1 {
		return ID{}, false
	}
	return ID{Epoch: epoch, Offset: n, Check: check}, true
}

var idPrefix = []byte(`{"id":"`)

// PayloadID returns the id publish.lua put first in a published payload;
// ok is false for payloads published without history.
func PayloadID(payload []byte) (ID, bool) {
	if !bytes.HasPrefix(payload, idPrefix) {
		return ID{}, false
	}
	rest := payload[len(idPrefix):]
	end := bytes.IndexByte(rest, '"')
	if end < 0 {
		return ID{}, false
	}
	return ParseID(string(rest[:end]))
}

// HistoryOptions are publish.lua's retention arguments.
type HistoryOptions struct {
	MaxLen  int           // entries kept (DefaultHistoryLen when 0)
	MaxAge  time.Duration // age kept, and the history's expiry (DefaultHistoryAge when 0)
	MetaTTL time.Duration // expiry of the epoch and offset (DefaultHistoryMetaTTL when 0)
}

func (o HistoryOptions) withDefaults() HistoryOptions {
	if o.MaxLen <= 0 {
		o.MaxLen = DefaultHistoryLen
	}
	if o.MaxAge <= 0 {
		o.MaxAge = DefaultHistoryAge
	}
	if o.MetaTTL <= 0 {
		o.MetaTTL = DefaultHistoryMetaTTL
	}
	return o
}

// ErrNotObject: history publishing needs a JSON object to insert the id into.
var ErrNotObject = errors.New("notify: payload is not a JSON object")

// HistoryPublisher publishes with publish.lua: every notification is kept
// in the user's history and carries an id, so a client that reconnects with
// since=<last id> receives what it missed.
type HistoryPublisher struct {
	client  rueidis.Client
	prefix  string
	sharded bool
	opts    HistoryOptions
	script  *rueidis.Lua
}

// NewHistoryPublisher returns a publisher with history (prefix: DefaultPrefix
// when empty; sharded: SPUBLISH, for gateways with REDIS_PUBSUB_MODE=sharded).
func NewHistoryPublisher(client rueidis.Client, prefix string, sharded bool, opts HistoryOptions) *HistoryPublisher {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &HistoryPublisher{client: client, prefix: prefix, sharded: sharded, opts: opts.withDefaults(),
		script: rueidis.NewLuaScript(PublishScript)}
}

// Published is the result of one publish.
type Published struct {
	ID        string
	Receivers int64 // gateway instances subscribed to the channel
	Duplicate bool  // the idempotency key was seen within the window: nothing stored or sent
}

// PublishUserNotification sends {"event":event,"data":data} with history.
func (p *HistoryPublisher) PublishUserNotification(ctx context.Context, userID, event string, data any, idempotencyKey string) (Published, error) {
	payload, err := json.Marshal(Notification{Event: event, Data: data})
	if err != nil {
		return Published{}, fmt.Errorf("notify: encode %q: %w", event, err)
	}
	return p.Publish(ctx, userID, payload, idempotencyKey)
}

// Publish sends a JSON object with history; idempotencyKey ("" for none)
// makes a retried publish within the retention age a no-op.
func (p *HistoryPublisher) Publish(ctx context.Context, userID string, payload json.RawMessage, idempotencyKey string) (Published, error) {
	if userID == "" {
		return Published{}, errors.New("notify: empty user id")
	}
	if !json.Valid(payload) {
		return Published{}, ErrInvalidPayload
	}
	if t := bytes.TrimLeft(payload, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return Published{}, ErrNotObject
	}
	ch := Channel(p.prefix, userID)
	keys := []string{HistoryKey(ch), MetaKey(ch)}
	if idempotencyKey != "" {
		keys = append(keys, idempotencyKeyName(ch, idempotencyKey))
	}
	sharded := "0"
	if p.sharded {
		sharded = "1"
	}
	args := []string{ch, string(payload), strconv.Itoa(p.opts.MaxLen),
		strconv.FormatInt(p.opts.MaxAge.Milliseconds(), 10), strconv.FormatInt(p.opts.MetaTTL.Milliseconds(), 10), sharded}
	res, err := p.script.Exec(ctx, p.client, keys, args).ToArray()
	if err != nil {
		return Published{}, fmt.Errorf("notify: publish with history: %w", err)
	}
	if len(res) != 2 {
		return Published{}, fmt.Errorf("notify: publish.lua returned %d values", len(res))
	}
	id, err := res[0].ToString()
	if err != nil {
		return Published{}, fmt.Errorf("notify: publish.lua id: %w", err)
	}
	n, err := res[1].AsInt64()
	if err != nil {
		return Published{}, fmt.Errorf("notify: publish.lua receivers: %w", err)
	}
	if n < 0 {
		return Published{ID: id, Duplicate: true}, nil
	}
	return Published{ID: id, Receivers: n}, nil
}
