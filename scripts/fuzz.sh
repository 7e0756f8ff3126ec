#!/usr/bin/env bash
# Runs each fuzz target for FUZZTIME (default 60s). Crashers land in
# testdata/fuzz/<Target>/ and become regression seeds: commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${FUZZTIME:-60s}
go test -run '^$' -fuzz '^FuzzLoad$' -fuzztime "$t" ./internal/config/
go test -run '^$' -fuzz '^FuzzJWTKeyConfig$' -fuzztime "$t" ./internal/config/
go test -run '^$' -fuzz '^FuzzValidateAndExtract$' -fuzztime "$t" ./internal/jwtauth/
go test -run '^$' -fuzz '^FuzzParsePublicKeys$' -fuzztime "$t" ./internal/jwtauth/
go test -run '^$' -fuzz '^FuzzInboundFrame$' -fuzztime "$t" ./internal/gateway/
