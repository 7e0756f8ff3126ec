package gateway

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"unicode/utf8"

	"github.com/huleedu/websocket-service/internal/hub"
	"github.com/huleedu/websocket-service/internal/jwtauth"
)

// Reasons a connection is refused or closed. closeFor is the one place that
// maps them (and the jwtauth and hub errors) to close codes.
var (
	errWrongClient   = errors.New("client_id differs from the token's sub")
	errBinaryFrame   = errors.New("binary frame")
	errFrameTooBig   = errors.New("frame too big")
	errIdle          = errors.New("idle timeout")
	errShutdown      = errors.New("server shutting down")
	errRateLimited   = errors.New("rate limited")
	errSlowConsumer  = errors.New("slow consumer")
	errTokenExpired  = errors.New("token expired")
	errRefreshFailed = errors.New("refresh token invalid")
	errInternal      = errors.New("internal error")
	errTokenRevoked  = errors.New("token revoked")
	// errRevocationUnchecked: Redis could not be read to confirm that the
	// token is not revoked within Options.RevocationHold.
	errRevocationUnchecked = errors.New("revocation could not be checked")
)

// revokedError is an operator's disconnect (notify.Disconnect): 4004 with
// the operator's reason.
type revokedError struct{ reason string }

func (e *revokedError) Error() string { return "disconnected: " + e.reason }

// closeReason is one row of the close-code table.
type closeReason struct {
	Code      int
	ErrorCode string
	Message   string
	Metric    string // bounded metric label
	frame     []byte // close frame payload: code + JSON reason (<= 125 bytes)
}

func newReason(code int, errorCode, message, metric string) *closeReason {
	body, _ := json.Marshal(struct {
		ErrorCode string `json:"error_code"`
		Message   string `json:"message"`
	}{errorCode, message})
	if len(body) > 123 {
		panic("close reason longer than 123 bytes: " + string(body))
	}
	frame := binary.BigEndian.AppendUint16(nil, uint16(code))
	return &closeReason{Code: code, ErrorCode: errorCode, Message: message, Metric: metric, frame: append(frame, body...)}
}

// The close-code table (README "Close codes").
var (
	reasonAuthentication = newReason(1008, "AUTHENTICATION_ERROR", "missing, invalid or expired token", "authentication")
	reasonAuthorization  = newReason(1008, "AUTHORIZATION_ERROR", "token subject does not match client_id", "authorization")
	reasonQuota          = newReason(4000, "QUOTA_EXCEEDED", "too many connections for this user", "quota_exceeded")
	reasonBusy           = newReason(1013, "SERVER_BUSY", "instance connection limit reached", "server_busy")
	reasonSubscribeSlow  = newReason(1013, "SUBSCRIBE_TIMEOUT", "redis did not confirm the subscription in time; retry", "subscribe_timeout")
	reasonUnsupported    = newReason(1003, "UNSUPPORTED_DATA", "binary frames are not supported", "unsupported_data")
	reasonTooBig         = newReason(1009, "MESSAGE_TOO_BIG", "client frames are limited to 4096 bytes", "message_too_big")
	reasonIdle           = newReason(1001, "IDLE_TIMEOUT", "nothing received within the idle timeout", "idle_timeout")
	reasonShutdown       = newReason(1001, "SERVER_SHUTDOWN", "server is shutting down", "server_shutdown")
	reasonInternal       = newReason(1011, "INTERNAL_ERROR", "unexpected server error", "internal_error")
	reasonExpired        = newReason(4001, "TOKEN_EXPIRED", "token expired; reconnect with a fresh token", "token_expired")
	reasonSlow           = newReason(4002, "SLOW_CONSUMER", "outbound queue overflowed", "slow_consumer")
	reasonRateLimited    = newReason(4003, "RATE_LIMITED", "too many frames from client", "rate_limited")
	reasonTokenRevoked   = newReason(1008, "AUTHENTICATION_ERROR", "token revoked", "token_revoked")
	reasonUnchecked      = newReason(1013, "REVOCATION_UNCHECKED", "redis could not confirm the token is not revoked; retry", "revocation_unchecked")
)

// closeTable lists every row, for metrics and documentation checks.
var closeTable = []*closeReason{reasonAuthentication, reasonAuthorization, reasonQuota, reasonBusy, reasonSubscribeSlow,
	reasonUnsupported, reasonTooBig, reasonIdle, reasonShutdown, reasonInternal, reasonExpired, reasonSlow,
	reasonRateLimited, reasonTokenRevoked, reasonUnchecked, revokedReason("")}

// revokedReason is the 4004 row with the operator's reason in the message,
// cut (at a rune boundary) to fit the 123-byte close reason.
func revokedReason(reason string) *closeReason {
	msg := "disconnected"
	if reason = strings.ToValidUTF8(strings.TrimSpace(reason), ""); reason != "" {
		msg += ": " + reason
	}
	for {
		body, _ := json.Marshal(struct {
			ErrorCode string `json:"error_code"`
			Message   string `json:"message"`
		}{"REVOKED", msg})
		if len(body) <= 123 {
			return newReason(4004, "REVOKED", msg, "revoked")
		}
		_, size := utf8.DecodeLastRuneInString(msg)
		msg = msg[:len(msg)-size]
	}
}

// closeFor maps an error to its row of the close-code table.
func closeFor(err error) *closeReason {
	var revoked *revokedError
	switch {
	case errors.As(err, &revoked):
		return revokedReason(revoked.reason)
	case errors.Is(err, jwtauth.ErrMissingToken), errors.Is(err, jwtauth.ErrInvalidToken),
		errors.Is(err, jwtauth.ErrExpired), errors.Is(err, errRefreshFailed):
		return reasonAuthentication
	case errors.Is(err, errWrongClient):
		return reasonAuthorization
	case errors.Is(err, hub.ErrUserQuota):
		return reasonQuota
	case errors.Is(err, hub.ErrServerBusy):
		return reasonBusy
	case errors.Is(err, hub.ErrSubscribeTimeout):
		return reasonSubscribeSlow
	case errors.Is(err, errBinaryFrame):
		return reasonUnsupported
	case errors.Is(err, errFrameTooBig):
		return reasonTooBig
	case errors.Is(err, errIdle):
		return reasonIdle
	case errors.Is(err, errShutdown):
		return reasonShutdown
	case errors.Is(err, errTokenExpired):
		return reasonExpired
	case errors.Is(err, errSlowConsumer):
		return reasonSlow
	case errors.Is(err, errRateLimited):
		return reasonRateLimited
	case errors.Is(err, errTokenRevoked):
		return reasonTokenRevoked
	case errors.Is(err, errRevocationUnchecked):
		return reasonUnchecked
	default:
		return reasonInternal
	}
}
