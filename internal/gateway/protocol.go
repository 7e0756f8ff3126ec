package gateway

import (
	"encoding/json"
	"strconv"
	"time"
)

// Frames the gateway itself sends (docs/protocol.md). Built with append: no
// reflection on paths that run per connection.

func eventFrame(event string, fields ...string) []byte {
	b := make([]byte, 0, 96)
	b = append(b, `{"event":`...)
	b = strconv.AppendQuote(b, event)
	b = append(b, `,"data":{`...)
	for i := 0; i+1 < len(fields); i += 2 {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendQuote(b, fields[i])
		b = append(b, ':')
		b = strconv.AppendQuote(b, fields[i+1])
	}
	return append(b, "}}"...)
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339) }

func pongFrame(now time.Time) []byte { return eventFrame("pong", "timestamp", rfc3339(now)) }

func degradedFrame(now time.Time) []byte {
	return eventFrame("connection.degraded", "reason", "redis_unavailable", "timestamp", rfc3339(now))
}

func refreshedFrame(exp time.Time) []byte {
	return eventFrame("token.refreshed", "expires_at", rfc3339(exp))
}

// clientFrame is what a client may send: {"type":"ping"} or
// {"type":"refresh","token":"…"}. Anything else is ignored.
type clientFrame struct {
	Type  string `json:"type"`
	Token string `json:"token"`
}

// parseClientFrame never fails: unknown or malformed input yields Type "".
func parseClientFrame(data []byte) clientFrame {
	var f clientFrame
	if json.Unmarshal(data, &f) != nil {
		return clientFrame{}
	}
	return f
}
