#!/usr/bin/env bash
# Runs every test with the race detector. Installs redis-server (Debian) when
# missing: integration tests start their own redis-server processes on free
# loopback ports and never use the Redis on 6379. Installs Debian's chromium
# for the browser tests when it can (they skip without it), and Debian's Python
# packages for the Python publisher's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools
fi

if ! command -v chromium >/dev/null 2>&1; then
  echo "chromium not found: installing it with apt-get for TestBrowserSeesCloseCodes" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; } ||
    echo "chromium could not be installed: the browser test will skip" >&2
fi

# The Python publisher's tests (clients/python/python_test.go) run Debian's
# /usr/bin/python3 with Debian's packages (no PyPI): redis-py, pytest,
# pytest-asyncio, mypy, websockets, venv. They skip when these cannot be had.
if ! /usr/bin/python3 -c 'import redis, pytest, pytest_asyncio, mypy, websockets, ensurepip, setuptools' >/dev/null 2>&1; then
  echo "Python test packages not found: installing them with apt-get for clients/python" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  PYPKGS="python3-redis python3-pytest python3-pytest-asyncio python3-mypy python3-websockets python3-venv python3-setuptools"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $PYPKGS >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $PYPKGS >/dev/null 2>&1; } ||
    echo "the Python packages could not be installed: the Python client tests will skip" >&2
fi

# The browser client's tests (node --test, ws, playwright-core, tsc,
# @asyncapi/parser) run inside `go test` (clients/js/js_test.go) from the
# packages the committed lockfile names.
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: installing nodejs and npm with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm
fi
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error)

go test -race -count=1 -timeout 20m ./... "$@"
