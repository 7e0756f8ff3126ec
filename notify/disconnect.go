package notify

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/rueidis"
)

// DisconnectScript is disconnect.lua: it ends every socket of a user on
// every gateway instance and optionally revokes the user's tokens.
//
//go:embed disconnect.lua
var DisconnectScript string

// DefaultRevokeFor keeps a revocation for a day: set it to the longest
// lifetime your identity provider gives a token.
const DefaultRevokeFor = 24 * time.Hour

// RevocationKey names a channel's revocation (unix seconds; tokens with
// iat <= it are refused), in the channel's slot.
func RevocationKey(channel string) string { return hashTag(channel) + ":r" }

// Control is a control message to the gateways, on the user's channel.
type Control struct {
	Op        string `json:"op"` // "disconnect"
	Reason    string `json:"reason"`
	RevokedAt int64  `json:"revoked_at"` // unix seconds; 0 when not revoking
}

// IsControl reports whether a channel payload is a control message (it
// starts with a NUL byte, which no JSON document does).
func IsControl(payload []byte) bool { return len(payload) > 0 && payload[0] == 0 }

// ParseControl decodes a control message.
func ParseControl(payload []byte) (Control, error) {
	if !IsControl(payload) {
		return Control{}, errors.New("notify: not a control message")
	}
	var c Control
	dec := json.NewDecoder(bytes.NewReader(payload[1:]))
	if err := dec.Decode(&c); err != nil {
		return Control{}, fmt.Errorf("notify: control message: %w", err)
	}
	if c.Op != "disconnect" {
		return Control{}, fmt.Errorf("notify: unknown control op %q", c.Op)
	}
	return c, nil
}

// DisconnectOptions say why and whether to revoke.
type DisconnectOptions struct {
	Reason string // shown to the client in the 4004 close reason (bounded by the gateway)
	// Revoke refuses the user's tokens issued up to now (iat <= now, or no
	// iat) from now on, for RevokeFor (DefaultRevokeFor when 0).
	Revoke    bool
	RevokeFor time.Duration
}

// Disconnected is the result of a Disconnect.
type Disconnected struct {
	RevokedAt int64 // unix seconds (Redis's clock); 0 without Revoke
	Receivers int64 // gateway instances that held a subscription for the user
}

// Disconnecter ends users' sessions on every gateway instance.
type Disconnecter struct {
	client  rueidis.Client
	prefix  string
	sharded bool
	script  *rueidis.Lua
}

// NewDisconnecter returns a Disconnecter (prefix: DefaultPrefix when empty;
// sharded: SPUBLISH, for gateways with REDIS_PUBSUB_MODE=sharded).
func NewDisconnecter(client rueidis.Client, prefix string, sharded bool) *Disconnecter {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &Disconnecter{client: client, prefix: prefix, sharded: sharded, script: rueidis.NewLuaScript(DisconnectScript)}
}

// Disconnect closes every socket of userID with 4004 REVOKED and, with
// opts.Revoke, refuses the user's earlier tokens from now on.
func (d *Disconnecter) Disconnect(ctx context.Context, userID string, opts DisconnectOptions) (Disconnected, error) {
	if userID == "" {
		return Disconnected{}, errors.New("notify: empty user id")
	}
	if opts.RevokeFor <= 0 {
		opts.RevokeFor = DefaultRevokeFor
	}
	ch := Channel(d.prefix, userID)
	revoke, sharded := "0", "0"
	if opts.Revoke {
		revoke = "1"
	}
	if d.sharded {
		sharded = "1"
	}
	res, err := d.script.Exec(ctx, d.client, []string{RevocationKey(ch)},
		[]string{ch, opts.Reason, revoke, strconv.FormatInt(opts.RevokeFor.Milliseconds(), 10), sharded}).ToArray()
	if err != nil {
		return Disconnected{}, fmt.Errorf("notify: disconnect: %w", err)
	}
	if len(res) != 2 {
		return Disconnected{}, fmt.Errorf("notify: disconnect.lua returned %d values", len(res))
	}
	at, err1 := res[0].AsInt64()
	n, err2 := res[1].AsInt64()
	if err := errors.Join(err1, err2); err != nil {
		return Disconnected{}, fmt.Errorf("notify: disconnect.lua: %w", err)
	}
	return Disconnected{RevokedAt: at, Receivers: n}, nil
}
