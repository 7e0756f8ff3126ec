package jwtauth

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/time/rate"
)

// JWKSOptions configure a JWKS key source.
type JWKSOptions struct {
	URL     string
	Refresh time.Duration // periodic refresh (default 1h)
	// UnknownKIDEvery bounds refreshes caused by tokens with an unknown kid
	// (default one per 30s): a flood of made-up kids cannot flood the
	// identity provider. A token arriving when none is allowed is refused
	// at once instead of waiting.
	UnknownKIDEvery time.Duration
	HTTPTimeout     time.Duration // per fetch (default 5s)
	Client          *http.Client  // default: a client of its own, its idle connections closed by Close
	Logger          *slog.Logger
}

// JWKS is a key set fetched from an identity provider's JWKS endpoint and
// refreshed in the background (MicahParks/keyfunc over jwkset). When the
// endpoint is down, the last good set keeps working; a new kid is fetched
// on first sight (rate-limited), so a key rotation needs no restart.
type JWKS struct {
	o      JWKSOptions
	kf     atomic.Pointer[keyfunc.Keyfunc] // nil until the first fetch succeeded
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the first-fetch retry loop has ended
}

// NewJWKS fetches url once; when that fails it keeps retrying in the
// background (every 1s, doubling to 30s) instead of failing: until a fetch
// succeeds Ready is false and every token is refused, and the service runs.
func NewJWKS(o JWKSOptions) (*JWKS, error) {
	if o.Refresh <= 0 {
		o.Refresh = time.Hour
	}
	if o.UnknownKIDEvery <= 0 {
		o.UnknownKIDEvery = 30 * time.Second
	}
	if o.HTTPTimeout <= 0 {
		o.HTTPTimeout = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Client == nil {
		o.Client = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	c := *o.Client // a copy: the caller's client keeps its own transport
	c.Transport = limitTransport{base: c.Transport}
	o.Client = &c
	j := &JWKS{o: o, done: make(chan struct{})}
	j.ctx, j.cancel = context.WithCancel(context.Background())
	if err := j.fetch(); err == nil {
		close(j.done)
		return j, nil
	} else if !errors.Is(err, errFetch) {
		j.cancel()
		return nil, err
	} else {
		o.Logger.Warn("JWKS not reachable at start: refusing tokens until it is", "url", o.URL, "error", err)
	}
	go j.retry()
	return j, nil
}

var errFetch = errors.New("fetch JWKS")

// MaxJWKSBytes bounds a JWKS response body. A key set is a few KiB; a
// broken or hostile endpoint must not make every instance read without end.
const MaxJWKSBytes = 1 << 20

// ErrJWKSTooLarge fails a fetch whose body passes MaxJWKSBytes: the fetch
// fails like any other (the last good key set stays in use).
var ErrJWKSTooLarge = errors.New("JWKS response larger than 1 MiB")

// limitTransport caps every response body it returns at MaxJWKSBytes. The
// key set library decodes the body itself, so the cap sits below it.
type limitTransport struct{ base http.RoundTripper }

func (t limitTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	base := t.base
	if base == nil {
		base = http.DefaultTransport
	}
	resp, err := base.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	resp.Body = &limitedBody{rc: resp.Body, left: MaxJWKSBytes}
	return resp, nil
}

// CloseIdleConnections lets http.Client.CloseIdleConnections (JWKS.Close)
// reach the transport underneath.
func (t limitTransport) CloseIdleConnections() {
	if c, ok := t.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// limitedBody reads at most left bytes and fails with ErrJWKSTooLarge when
// there is more (io.LimitReader would end with a silent EOF instead).
type limitedBody struct {
	rc   io.ReadCloser
	left int64
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.rc.Read(p)
	if int64(n) > b.left {
		n = int(b.left)
		b.left = 0
		return n, ErrJWKSTooLarge
	}
	b.left -= int64(n)
	return n, err
}

func (b *limitedBody) Close() error { return b.rc.Close() }

// fetch builds the key set with a first fetch that must succeed.
func (j *JWKS) fetch() error {
	o := j.o
	mustFetch := false
	kf, err := keyfunc.NewDefaultOverrideCtx(j.ctx, []string{o.URL}, keyfunc.Override{
		Client:                    o.Client,
		HTTPTimeout:               o.HTTPTimeout,
		NoErrorReturnFirstHTTPReq: &mustFetch,
		RefreshInterval:           o.Refresh,
		RefreshUnknownKID:         rate.NewLimiter(rate.Every(o.UnknownKIDEvery), 1),
		// Wait for an allowed refresh only briefly: a longer wait is refused
		// at once (the limiter's reservation would pass the deadline).
		RateLimitWaitMax: time.Second,
		RefreshErrorHandlerFunc: func(u string) func(context.Context, error) {
			return func(_ context.Context, err error) {
				o.Logger.Warn("JWKS refresh failed: keeping the last good key set", "url", u, "error", err)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("%w: %w", errFetch, err)
	}
	j.kf.Store(&kf)
	return nil
}

func (j *JWKS) retry() {
	defer close(j.done)
	wait := time.Second
	for {
		select {
		case <-j.ctx.Done():
			return
		case <-time.After(wait):
		}
		if err := j.fetch(); err == nil {
			j.o.Logger.Info("JWKS fetched", "url", j.o.URL)
			return
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// Ready reports whether a key set has been fetched.
func (j *JWKS) Ready() bool { return j.kf.Load() != nil }

// Close stops the background refresh and retries.
func (j *JWKS) Close() {
	j.cancel()
	<-j.done
	j.o.Client.CloseIdleConnections()
}

func (j *JWKS) keyfunc(t *jwt.Token) (any, error) {
	if kid, _ := t.Header["kid"].(string); kid == "" {
		return nil, errors.New("token has no kid") // a JWKS selects keys by kid only
	}
	kf := j.kf.Load()
	if kf == nil {
		return nil, errors.New("JWKS not fetched yet")
	}
	return (*kf).Keyfunc(t)
}
