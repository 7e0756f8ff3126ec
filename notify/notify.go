// Package notify is the publisher side of the gateway, for backend services:
// it names a user's channel exactly as the gateway subscribes it and
// publishes {"event":…,"data":…} notifications to it.
package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/redis/rueidis"
)

// DefaultPrefix is the channel prefix used when REDIS_CHANNEL_PREFIX is unset.
const DefaultPrefix = "ws"

// Channel is the Redis channel of a user: "<prefix>:<userID>".
func Channel(prefix, userID string) string { return prefix + ":" + userID }

// UserFromChannel is the inverse of Channel.
func UserFromChannel(prefix, channel string) (string, bool) {
	return strings.CutPrefix(channel, prefix+":")
}

// ErrInvalidPayload is returned for a payload that is not a JSON document
// (the gateway would drop it).
var ErrInvalidPayload = errors.New("notify: payload is not valid JSON")

// Notification is the envelope the HuleEdu frontend expects.
type Notification struct {
	Event string `json:"event"`
	Data  any    `json:"data"`
}

// Publisher publishes notifications through a rueidis client.
type Publisher struct {
	client  rueidis.Client
	prefix  string
	sharded bool
}

// NewPublisher returns a Publisher using client and the channel prefix
// (DefaultPrefix when empty).
func NewPublisher(client rueidis.Client, prefix string) *Publisher {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &Publisher{client: client, prefix: prefix}
}

// NewShardedPublisher is NewPublisher for gateways running with
// REDIS_PUBSUB_MODE=sharded: it publishes with SPUBLISH, which Redis Cluster
// routes to the node owning the channel's slot only.
func NewShardedPublisher(client rueidis.Client, prefix string) *Publisher {
	p := NewPublisher(client, prefix)
	p.sharded = true
	return p
}

// PublishUserNotification sends {"event":event,"data":data} to the user.
// receivers is the number of gateway instances subscribed to the user's
// channel (not the number of WebSockets).
func (p *Publisher) PublishUserNotification(ctx context.Context, userID, event string, data any) (receivers int64, err error) {
	payload, err := json.Marshal(Notification{Event: event, Data: data})
	if err != nil {
		return 0, fmt.Errorf("notify: encode %q: %w", event, err)
	}
	return p.Publish(ctx, userID, payload)
}

// Publish sends any JSON document to the user as is.
func (p *Publisher) Publish(ctx context.Context, userID string, payload json.RawMessage) (receivers int64, err error) {
	if userID == "" {
		return 0, errors.New("notify: empty user id")
	}
	if !json.Valid(payload) {
		return 0, ErrInvalidPayload
	}
	ch, msg := Channel(p.prefix, userID), rueidis.BinaryString(payload)
	cmd := p.client.B().Publish().Channel(ch).Message(msg).Build()
	if p.sharded {
		cmd = p.client.B().Spublish().Channel(ch).Message(msg).Build()
	}
	n, err := p.client.Do(ctx, cmd).AsInt64()
	if err != nil {
		return 0, fmt.Errorf("notify: publish: %w", err)
	}
	return n, nil
}
