// Package jwtauth extracts a bearer token from a WebSocket upgrade request and
// validates it into an Identity. Tokens are never logged.
package jwtauth

import (
	"crypto"
	"errors"
	"fmt"
	"net/http"
	"slices"
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
	IssuedAt  time.Time // zero when the token has no iat
}

// Options configure a Validator: Secret for HMAC algorithms; PublicKeys or
// JWKS for asymmetric ones.
type Options struct {
	Algorithms []string // from ParseAlgorithms: one family
	Secret     []byte
	PublicKeys []crypto.PublicKey
	JWKS       *JWKS
	Audience   string // checked when non-empty
	Issuer     string // checked when non-empty
}

// Validator checks tokens against pinned algorithms and keys.
type Validator struct {
	opts    Options
	parser  *jwt.Parser
	keyfunc jwt.Keyfunc
}

// New returns a Validator. HMAC algorithms need Secret and nothing else;
// asymmetric ones need PublicKeys or JWKS, and no Secret.
func New(opts Options) (*Validator, error) {
	if len(opts.Algorithms) == 0 {
		return nil, errors.New("jwtauth: no algorithm")
	}
	if _, err := ParseAlgorithms(strings.Join(opts.Algorithms, ",")); err != nil {
		return nil, fmt.Errorf("jwtauth: %w", err)
	}
	v := &Validator{opts: opts}
	switch {
	case IsHMAC(opts.Algorithms):
		if len(opts.Secret) == 0 || len(opts.PublicKeys) > 0 || opts.JWKS != nil {
			return nil, errors.New("jwtauth: HMAC algorithms take a secret and no public key")
		}
		v.keyfunc = func(*jwt.Token) (any, error) { return opts.Secret, nil }
	case len(opts.Secret) > 0 || (len(opts.PublicKeys) > 0) == (opts.JWKS != nil):
		return nil, errors.New("jwtauth: asymmetric algorithms take public keys or a JWKS, and no secret")
	case opts.JWKS != nil:
		v.keyfunc = opts.JWKS.keyfunc
	default:
		for i, k := range opts.PublicKeys {
			if !slices.ContainsFunc(opts.Algorithms, func(a string) bool { return keyFits(k, a) }) {
				return nil, fmt.Errorf("jwtauth: public key %d fits none of %v", i+1, opts.Algorithms)
			}
		}
		// Each key is offered only to the algorithms it fits: an RSA key is
		// never handed to an ECDSA verifier, nor any key to HMAC.
		v.keyfunc = func(t *jwt.Token) (any, error) {
			var set jwt.VerificationKeySet
			for _, k := range opts.PublicKeys {
				if keyFits(k, t.Method.Alg()) {
					set.Keys = append(set.Keys, k)
				}
			}
			if len(set.Keys) == 0 {
				return nil, errors.New("no key for this algorithm")
			}
			return set, nil
		}
	}
	popts := []jwt.ParserOption{
		jwt.WithValidMethods(opts.Algorithms),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(0),
	}
	if opts.Audience != "" {
		popts = append(popts, jwt.WithAudience(opts.Audience))
	}
	if opts.Issuer != "" {
		popts = append(popts, jwt.WithIssuer(opts.Issuer))
	}
	v.parser = jwt.NewParser(popts...)
	return v, nil
}

// Ready reports whether the validator has keys (a JWKS may not be fetched yet).
func (v *Validator) Ready() bool { return v.opts.JWKS == nil || v.opts.JWKS.Ready() }

// Validate verifies signature, algorithm, exp, sub and (when configured) aud
// and iss. It wraps ErrExpired or ErrInvalidToken.
func (v *Validator) Validate(token string) (Identity, error) {
	if token == "" {
		return Identity{}, ErrMissingToken
	}
	var claims jwt.RegisteredClaims
	_, err := v.parser.ParseWithClaims(token, &claims, v.keyfunc)
	if err != nil {
		if errors.Is(err, jwt.ErrTokenExpired) {
			return Identity{}, ErrExpired
		}
		return Identity{}, fmt.Errorf("%w: %s", ErrInvalidToken, reason(err))
	}
	if strings.TrimSpace(claims.Subject) == "" {
		return Identity{}, fmt.Errorf("%w: missing sub", ErrInvalidToken)
	}
	id := Identity{UserID: claims.Subject, ExpiresAt: claims.ExpiresAt.Time}
	if claims.IssuedAt != nil {
		id.IssuedAt = claims.IssuedAt.Time
	}
	return id, nil
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
// audience and issuer, using the HMAC secret and the first algorithm. It is
// for development tools and tests; MintWith signs with a private key.
func (v *Validator) Mint(sub string, ttl time.Duration) (string, error) {
	if !IsHMAC(v.opts.Algorithms) {
		return "", errors.New("jwtauth: asymmetric configuration: mint with a private key (--key-file)")
	}
	return v.MintWith(v.opts.Algorithms[0], v.opts.Secret, "", sub, ttl)
}

// MintWith signs a token for sub with alg and key (an HMAC secret or a
// crypto.Signer), adding kid to the header when non-empty.
func (v *Validator) MintWith(alg string, key any, kid, sub string, ttl time.Duration) (string, error) {
	method := jwt.GetSigningMethod(alg)
	if method == nil {
		return "", fmt.Errorf("jwtauth: unknown algorithm %q", alg)
	}
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
	t := jwt.NewWithClaims(method, claims)
	if kid != "" {
		t.Header["kid"] = kid
	}
	return t.SignedString(key)
}

// Protocol is the WebSocket subprotocol name a browser offers with its token
// as the next entry (new WebSocket(url, ["bearer", token])); the server
// answers with this name only, never the token.
const Protocol = "bearer"

// Extract returns the token of an upgrade request, from (first found) the
// `token` query parameter, the Sec-WebSocket-Protocol entry after "bearer",
// or an `Authorization: Bearer` header.
func Extract(r *http.Request) string {
	if t := r.URL.Query().Get("token"); t != "" {
		return t
	}
	if t := fromProtocols(r.Header.Values("Sec-WebSocket-Protocol")); t != "" {
		return t
	}
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// fromProtocols finds the entry after "bearer" in Sec-WebSocket-Protocol.
func fromProtocols(values []string) string {
	after := false
	for _, v := range values {
		for p := range strings.SplitSeq(v, ",") {
			p = strings.TrimSpace(p)
			if after {
				return p
			}
			after = p == Protocol
		}
	}
	return ""
}
