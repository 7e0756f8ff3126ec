#!/usr/bin/env bash
# Runs P wsbench processes at once against any deployment, to pass the
# per-process open-file limit: each gets --conns/P connections, --rate/P
# msgs/s and its own range of users (--user-offset), and prints its JSON
# result on its own line (prefixed with its index).
#
#   scripts/wsbench-procs.sh 4 --scenario deliver --url ws://… --redis redis://… \
#       --jwt-secret … --conns 72000 --users 24000 --rate 2000 --sources 8
set -euo pipefail
P=${1:?usage: wsbench-procs.sh P [wsbench flags...]}; shift
bin=${WSBENCH:-$(dirname "$0")/../bin/wsbench}
[ -x "$bin" ] || { go build -o "$(dirname "$0")/../bin/" "$(dirname "$0")/../cmd/wsbench"; }
conns=1000 users=0 rate=1000 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) conns=$2; shift 2 ;;
    --users) users=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ "$users" -gt 0 ] || users=$conns
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
pids=()
for k in $(seq 0 $((P - 1))); do
  "$bin" "${args[@]}" --conns $((conns / P)) --users $((users / P)) --user-offset $((k * (users / P))) \
    --rate $((rate / P)) >"$work/$k.json" 2>"$work/$k.err" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for k in $(seq 0 $((P - 1))); do
  printf '%s ' "$k"; python3 -c 'import json,sys;print(json.dumps(json.load(open(sys.argv[1]))))' "$work/$k.json" 2>/dev/null || cat "$work/$k.err"
done
exit $status
