package jwtauth

import (
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

func sign(t testing.TB, m jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(m, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func validator(t testing.TB, aud, iss string) *Validator {
	v, err := New(Options{Secret: secret, Algorithms: []string{"HS256"}, Audience: aud, Issuer: iss})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestValidate(t *testing.T) {
	future := time.Now().Add(time.Hour).Unix()
	v := validator(t, "", "")
	id, err := v.Validate(sign(t, jwt.SigningMethodHS256, secret, jwt.MapClaims{"sub": "u1", "exp": future}))
	if err != nil || id.UserID != "u1" || id.ExpiresAt.Unix() != future {
		t.Fatalf("valid token: %+v %v", id, err)
	}
	noneTok := sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, jwt.MapClaims{"sub": "u1", "exp": future})
	cases := map[string]struct {
		tok  string
		want error
	}{
		"empty":           {"", ErrMissingToken},
		"garbage":         {"not.a.jwt", ErrInvalidToken},
		"expired":         {sign(t, jwt.SigningMethodHS256, secret, jwt.MapClaims{"sub": "u1", "exp": time.Now().Add(-time.Second).Unix()}), ErrExpired},
		"no exp":          {sign(t, jwt.SigningMethodHS256, secret, jwt.MapClaims{"sub": "u1"}), ErrInvalidToken},
		"no sub":          {sign(t, jwt.SigningMethodHS256, secret, jwt.MapClaims{"exp": future}), ErrInvalidToken},
		"blank sub":       {sign(t, jwt.SigningMethodHS256, secret, jwt.MapClaims{"sub": " ", "exp": future}), ErrInvalidToken},
		"wrong secret":    {sign(t, jwt.SigningMethodHS256, []byte("another-secret-another-secret-xx"), jwt.MapClaims{"sub": "u1", "exp": future}), ErrInvalidToken},
		"alg none":        {noneTok, ErrInvalidToken},
		"other algorithm": {sign(t, jwt.SigningMethodHS512, secret, jwt.MapClaims{"sub": "u1", "exp": future}), ErrInvalidToken},
	}
	for name, tc := range cases {
		if _, err := v.Validate(tc.tok); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", name, err, tc.want)
		} else if err != nil && tc.tok != "" && strings.Contains(err.Error(), tc.tok) {
			t.Errorf("%s: error message contains the token", name)
		}
	}
}

func TestAudienceAndIssuer(t *testing.T) {
	future := time.Now().Add(time.Hour).Unix()
	v := validator(t, "huleedu-ws", "huleedu-identity")
	ok := sign(t, jwt.SigningMethodHS256, secret, jwt.MapClaims{"sub": "u", "exp": future, "aud": []string{"x", "huleedu-ws"}, "iss": "huleedu-identity"})
	if _, err := v.Validate(ok); err != nil {
		t.Fatalf("valid aud/iss rejected: %v", err)
	}
	for name, claims := range map[string]jwt.MapClaims{
		"wrong aud": {"sub": "u", "exp": future, "aud": "other", "iss": "huleedu-identity"},
		"no aud":    {"sub": "u", "exp": future, "iss": "huleedu-identity"},
		"wrong iss": {"sub": "u", "exp": future, "aud": "huleedu-ws", "iss": "evil"},
		"no iss":    {"sub": "u", "exp": future, "aud": "huleedu-ws"},
	} {
		if _, err := v.Validate(sign(t, jwt.SigningMethodHS256, secret, claims)); !errors.Is(err, ErrInvalidToken) {
			t.Errorf("%s: got %v", name, err)
		}
	}
	minted, err := v.Mint("u", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Validate(minted); err != nil {
		t.Fatalf("Mint output rejected: %v", err)
	}
}

func TestNewRejectsUnsafeAlgorithms(t *testing.T) {
	for _, alg := range []string{"none", "RS256", "", "HS1"} {
		if _, err := New(Options{Secret: secret, Algorithms: []string{alg}}); err == nil {
			t.Errorf("New accepted %q", alg)
		}
	}
}

func TestExtract(t *testing.T) {
	r := httptest.NewRequest("GET", "/ws?token=q", nil)
	r.Header.Set("Authorization", "Bearer h")
	if Extract(r) != "q" {
		t.Fatal("query parameter must win")
	}
	r = httptest.NewRequest("GET", "/ws", nil)
	r.Header.Set("Authorization", "bearer h")
	if Extract(r) != "h" {
		t.Fatal("bearer header ignored")
	}
	r.Header.Set("Authorization", "Basic abc")
	if Extract(r) != "" {
		t.Fatal("non-bearer header accepted")
	}
}

func BenchmarkValidateHS256(b *testing.B) {
	v := validator(b, "", "")
	tok := sign(b, jwt.SigningMethodHS256, secret, jwt.MapClaims{"sub": "u1", "exp": time.Now().Add(time.Hour).Unix()})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Validate(tok); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzValidateAndExtract(f *testing.F) {
	v := validator(f, "aud", "iss")
	good, _ := v.Mint("user", time.Hour)
	f.Add(good, "Bearer "+good)
	f.Add("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "bearer")
	f.Add("a.b.c", "Bearer a.b.c")
	f.Add("", "BEARER  x ")
	f.Fuzz(func(t *testing.T, tok, header string) {
		id, err := v.Validate(tok)
		if err == nil && (id.UserID == "" || !id.ExpiresAt.After(time.Now().Add(-time.Minute))) {
			t.Fatalf("accepted token with identity %+v", id)
		}
		if err != nil && !errors.Is(err, ErrMissingToken) && !errors.Is(err, ErrInvalidToken) && !errors.Is(err, ErrExpired) {
			t.Fatalf("unexpected error type %v", err)
		}
		r := httptest.NewRequest("GET", "/ws", nil)
		r.Header.Set("Authorization", header)
		_ = Extract(r)
	})
}
