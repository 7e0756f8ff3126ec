// Package jwtauth extracts a bearer token from a WebSocket upgrade request and
// validates it into an Identity. Tokens are never logged.
package jwtauth

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Errors returned by Validate and Extract; callers map them to close codes.
var (
	ErrMissingToken = errors.New("missing token")
	ErrInvalidToken = errors.New("invalid token")
	ErrExpired      = errors.New("token expired")
)

// Identity is what a valid token proves.
type Identity struct {
	UserID    string
	ExpiresAt time.Time
}

// Options configure a Validator.
type Options struct {
	Secret    []byte
	Algorithm string // HS256, HS384 or HS512
	Audience  string // checked when non-empty
	Issuer    string // checked when non-empty
}

// Validator checks tokens with one pinned algorithm.
type Validator struct {
	opts   Options
	parser *jwt.Parser
	method jwt.SigningMethod
}

// New returns a Validator; the algorithm must be one of the HMAC family.
func New(opts Options) (*Validator, error) {
	method := jwt.GetSigningMethod(opts.Algorithm)
	if _, ok := method.(*jwt.SigningMethodHMAC); !ok {
		return nil, fmt.Errorf("jwtauth: unsupported algorithm %q", opts.Algorithm)
	}
	if len(opts.Secret) == 0 {
		return nil, errors.New("jwtauth: empty secret")
	}
	popts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{opts.Algorithm}),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(0),
	}
	if opts.Audience != "" {
		popts = append(popts, jwt.WithAudience(opts.Audience))
	}
	if opts.Issuer != "" {
		popts = append(popts, jwt.WithIssuer(opts.Issuer))
	}
	return &Validator{opts: opts, parser: jwt.NewParser(popts...), method: method}, nil
}

// Validate verifies signature, algorithm, exp, sub and (when configured) aud
// and iss. It wraps ErrExpired or ErrInvalidToken.
func (v *Validator) Validate(token string) (Identity, error) {
	if token == "" {
		return Identity{}, ErrMissingToken
	}
	var claims jwt.RegisteredClaims
	_, err := v.parser.ParseWithClaims(token, &claims, func(*jwt.Token) (any, error) { return v.opts.Secret, nil })
	if err != nil {
		if errors.Is(err, jwt.ErrTokenExpired) {
			return Identity{}, ErrExpired
		}
		return Identity{}, fmt.Errorf("%w: %s", ErrInvalidToken, reason(err))
	}
	if strings.TrimSpace(claims.Subject) == "" {
		return Identity{}, fmt.Errorf("%w: missing sub", ErrInvalidToken)
	}
	return Identity{UserID: claims.Subject, ExpiresAt: claims.ExpiresAt.Time}, nil
}

// reason turns a jwt error into a short, token-free description.
func reason(err error) string {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "malformed"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, jwt.ErrSignatureInvalid):
		return "bad signature"
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return "unverifiable (algorithm not accepted)"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return "missing required claim"
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return "wrong audience"
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return "wrong issuer"
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return "not valid yet"
	default:
		return "invalid"
	}
}

// Mint signs a token for sub that expires after ttl, with the configured
// audience and issuer. It is for development tools and tests.
func (v *Validator) Mint(sub string, ttl time.Duration) (string, error) {
	now := time.Now()
	claims := jwt.RegisteredClaims{
		Subject:   sub,
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
		Issuer:    v.opts.Issuer,
	}
	if v.opts.Audience != "" {
		claims.Audience = jwt.ClaimStrings{v.opts.Audience}
	}
	return jwt.NewWithClaims(v.method, claims).SignedString(v.opts.Secret)
}

// Extract returns the token of an upgrade request: the `token` query
// parameter wins over an `Authorization: Bearer` header.
func Extract(r *http.Request) string {
	if t := r.URL.Query().Get("token"); t != "" {
		return t
	}
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}
