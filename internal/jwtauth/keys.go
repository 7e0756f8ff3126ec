package jwtauth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Algorithm families. A configuration is HMAC or asymmetric, never both, so
// a public key can never be used as an HMAC secret.
var (
	hmacAlgorithms       = []string{"HS256", "HS384", "HS512"}
	asymmetricAlgorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

// IsHMAC reports whether algs (as ParseAlgorithms returns them) are HMAC.
func IsHMAC(algs []string) bool { return len(algs) > 0 && slices.Contains(hmacAlgorithms, algs[0]) }

// ParseAlgorithms reads a comma-separated JWT_ALGORITHM value: known names
// (case-insensitive, returned canonical), not "none", all of one family.
func ParseAlgorithms(list string) ([]string, error) {
	var out []string
	for part := range strings.SplitSeq(list, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		i := slices.IndexFunc(append(slices.Clone(hmacAlgorithms), asymmetricAlgorithms...), func(a string) bool { return strings.EqualFold(a, part) })
		if i < 0 {
			return nil, fmt.Errorf("unknown algorithm %q (want HS256/384/512, RS256/384/512, PS256/384/512, ES256/384/512 or EdDSA)", part)
		}
		alg := append(slices.Clone(hmacAlgorithms), asymmetricAlgorithms...)[i]
		if !slices.Contains(out, alg) {
			out = append(out, alg)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no algorithm given")
	}
	hmac := slices.Contains(hmacAlgorithms, out[0])
	for _, a := range out {
		if slices.Contains(hmacAlgorithms, a) != hmac {
			return nil, errors.New("HMAC (HS*) and asymmetric algorithms cannot be mixed")
		}
	}
	return out, nil
}

// keyFits reports whether key can verify alg: RSA for RS/PS, ECDSA on the
// algorithm's curve for ES, Ed25519 for EdDSA.
func keyFits(key crypto.PublicKey, alg string) bool {
	switch k := key.(type) {
	case *rsa.PublicKey:
		return strings.HasPrefix(alg, "RS") || strings.HasPrefix(alg, "PS")
	case *ecdsa.PublicKey:
		return (alg == "ES256" && k.Curve == elliptic.P256()) || (alg == "ES384" && k.Curve == elliptic.P384()) ||
			(alg == "ES512" && k.Curve == elliptic.P521())
	case ed25519.PublicKey:
		return alg == "EdDSA"
	}
	return false
}

// ParsePublicKeys reads every PEM block of data (PUBLIC KEY, RSA PUBLIC KEY
// or CERTIFICATE): several keys allow a rotation without kid. Each must fit
// one of algs.
func ParsePublicKeys(data []byte, algs []string) ([]crypto.PublicKey, error) {
	var keys []crypto.PublicKey
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		var key crypto.PublicKey
		var err error
		switch block.Type {
		case "PUBLIC KEY":
			key, err = x509.ParsePKIXPublicKey(block.Bytes)
		case "RSA PUBLIC KEY":
			key, err = x509.ParsePKCS1PublicKey(block.Bytes)
		case "CERTIFICATE":
			var cert *x509.Certificate
			if cert, err = x509.ParseCertificate(block.Bytes); err == nil {
				key = cert.PublicKey
			}
		default:
			return nil, fmt.Errorf("PEM block %d is %q: want PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE", len(keys)+1, block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", len(keys)+1, err)
		}
		if !slices.ContainsFunc(algs, func(a string) bool { return keyFits(key, a) }) {
			return nil, fmt.Errorf("PEM block %d is a %T, which none of %s can verify", len(keys)+1, key, strings.Join(algs, ","))
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, errors.New("no PEM public key found")
	}
	return keys, nil
}

// ParsePrivateKey reads a PEM private key (PKCS#8, PKCS#1 or SEC 1) for
// minting development tokens.
func ParsePrivateKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	var key any
	var err error
	switch block.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	if err != nil {
		return nil, fmt.Errorf("PEM %q: %w", block.Type, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("unsupported private key %T", key)
	}
	return signer, nil
}

// DefaultAlgorithm is the first algorithm of the JWT_ALGORITHM list that
// fits key, or the usual one for its type when the list is empty or HMAC.
func DefaultAlgorithm(key crypto.PublicKey, list string) string {
	if algs, err := ParseAlgorithms(list); err == nil && !IsHMAC(algs) {
		for _, a := range algs {
			if keyFits(key, a) {
				return a
			}
		}
		return ""
	}
	for _, a := range asymmetricAlgorithms {
		if keyFits(key, a) && !strings.HasPrefix(a, "PS") {
			return a
		}
	}
	return ""
}
