#!/usr/bin/env bash
# Runs every test with the race detector. Installs redis-server (Debian) when
# missing: integration tests start their own redis-server processes on free
# loopback ports and never use the Redis on 6379.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools
fi

go test -race -count=1 -timeout 20m ./... "$@"
