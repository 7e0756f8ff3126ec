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
// same file (clients/python ships a copy for the Python services).
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
//
// The grammar is narrow on purpose, so that no ordinary id a backend puts in
// its own payloads ("order-7", "job-7-done") passes for one: the epoch and
// the check are instants of Redis TIME in microseconds, in lowercase base36
// without leading zeros, 10 to 12 digits (every date from 1973 to the year
// 150,000); the offset is a decimal count from 1 without leading zeros; and
// the check does not precede the epoch by more than MaxClockStep. A position
// may have an empty check, "<epoch>-<offset>-": the newest offset of a
// history whose entries expired, where nothing is left to compare. Every id
// publish.lua has ever made matches.
type ID struct {
	Epoch  string
	Offset int64
	Check  string // "" in a position whose entry expired
}

// MaxClockStep is how far a check may precede its epoch: a failover to a
// replica whose clock is behind the old master's.
const MaxClockStep = time.Hour

// String formats the id as it appears on the wire.
func (id ID) String() string {
	return id.Epoch + "-" + strconv.FormatInt(id.Offset, 10) + "-" + id.Check
}

// ParseID parses an id; ok is false for anything publish.lua (or a position
// the gateway sends) cannot have made. ParseID(id.String()) gives id back.
func ParseID(s string) (id ID, ok bool) {
	epoch, rest, ok1 := strings.Cut(s, "-")
	off, check, ok2 := strings.Cut(rest, "-")
	if !ok1 || !ok2 {
		return ID{}, false
	}
	e, ok1 := instant(epoch)
	n, ok2 := offset(off)
	if !ok1 || !ok2 {
		return ID{}, false
	}
	if check != "" {
		c, ok := instant(check)
		if !ok || c < e-MaxClockStep.Microseconds() {
			return ID{}, false
		}
	}
	return ID{Epoch: epoch, Offset: n, Check: check}, true
}

// instant decodes an epoch or a check: base36 microseconds as publish.lua
// spells them.
func instant(s string) (int64, bool) {
	if len(s) < 10 || len(s) > 12 || s[0] == '0' {
		return 0, false
	}
	for i := range len(s) {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'z') {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 36, 64) // 12 digits < 2^63
	return n, err == nil
}

// offset decodes an offset: 1 or more, decimal digits only.
func offset(s string) (int64, bool) {
	if len(s) == 0 || len(s) > 18 || s[0] < '1' || s[0] > '9' {
		return 0, false
	}
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
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
	id, ok := ParseID(string(rest[:end]))
	return id, ok && id.Check != "" // publish.lua always writes a check
}

// HistoryOptions are publish.lua's retention arguments.
type HistoryOptions struct {
	MaxLen  int           // entries kept (DefaultHistoryLen when 0)
	MaxAge  time.Duration // age kept, and the history's expiry (DefaultHistoryAge when 0)
	MetaTTL time.Duration // expiry of the epoch and offset (DefaultHistoryMetaTTL when 0)
	// MaxBytes refuses notifications larger than this, id included: set it
	// to the gateways' WEBSOCKET_MAX_MESSAGE_BYTES (DefaultMaxBytes, its
	// default, when 0; negative: no limit).
	MaxBytes int
}

// DefaultMaxBytes is the gateway's default WEBSOCKET_MAX_MESSAGE_BYTES.
const DefaultMaxBytes = 65536

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
	if o.MaxBytes == 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	return o
}

// ErrNotObject: history publishing needs a JSON object to insert the id into.
var ErrNotObject = errors.New("notify: payload is not a JSON object")

// ErrReservedID: the payload has a top-level "id" of its own; publish.lua
// inserts the history id there, and the wire would carry two.
var ErrReservedID = errors.New(`notify: "id" is reserved at the top level of a notification published with history`)

// ErrTooLarge: the notification with its id would be larger than
// HistoryOptions.MaxBytes, so the gateway would drop it live and on replay.
var ErrTooLarge = errors.New("notify: notification larger than the size limit")

// CheckHistoryPayload reports why publish.lua would refuse payload (nil:
// it would not, as far as can be told before the id is inserted): not
// valid JSON, not an object, a top-level "id" of its own, or more than
// maxBytes (<= 0: no limit) already without the id.
func CheckHistoryPayload(payload []byte, maxBytes int) error {
	if !json.Valid(payload) {
		return ErrInvalidPayload
	}
	if t := bytes.TrimLeft(payload, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return ErrNotObject
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(payload, &top); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidPayload, err)
	}
	if _, ok := top["id"]; ok {
		return ErrReservedID
	}
	if maxBytes > 0 && len(payload) > maxBytes {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(payload), maxBytes)
	}
	return nil
}

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
	if err := CheckHistoryPayload(payload, p.opts.MaxBytes); err != nil {
		return Published{}, err
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
		strconv.FormatInt(p.opts.MaxAge.Milliseconds(), 10), strconv.FormatInt(p.opts.MetaTTL.Milliseconds(), 10), sharded,
		strconv.Itoa(max(p.opts.MaxBytes, 0))}
	res, err := p.script.Exec(ctx, p.client, keys, args).ToArray()
	if err != nil {
		if strings.Contains(err.Error(), "notification too large") { // the exact size, id included, is known to the script
			return Published{}, fmt.Errorf("%w: %w", ErrTooLarge, err)
		}
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
