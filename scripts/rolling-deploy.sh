#!/usr/bin/env bash
# Zero-loss rolling deploy: INSTANCES gateways on one Redis, CONNS clients
# (wsbench --reconnect: a client the server closes reconnects at once to any
# instance with since=<last id>), RATE msgs/s published with history for
# DURATION, and every instance restarted in turn (SIGTERM, wait for it to
# exit, start it again) while that runs. Prints wsbench's result: lost and
# duplicated must be 0. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
INSTANCES=${INSTANCES:-3}
CONNS=${CONNS:-9000}
USERS=${USERS:-3000}
RATE=${RATE:-2000}
DURATION=${DURATION:-40s}
SECRET=rolling-deploy-secret-rolling-deploy-secret
. scripts/local-stack.sh

ports=(); spid=()
start_instance() { # $1: index
  JWT_SECRET_KEY=$SECRET WEBSOCKET_HOST=127.0.0.1 WEBSOCKET_PORT=${ports[$1]} REDIS_URL=redis://127.0.0.1:$rport \
    LOG_LEVEL=warn WEBSOCKET_MAX_CONNECTIONS_PER_USER=20 SHUTDOWN_TIMEOUT=10 "$work/websocket-service" serve 2>>"$work/gw$1.log" &
  spid[$1]=$!; pids+=($!)
  until curl -fs "http://127.0.0.1:${ports[$1]}/readyz" >/dev/null 2>&1; do sleep 0.05; done
}
urls=()
for i in $(seq 0 $((INSTANCES - 1))); do
  ports[$i]=$(port); urls+=("ws://127.0.0.1:${ports[$i]}")
  start_instance "$i"
done
url_list=$(IFS=,; echo "${urls[*]}")

"$work/wsbench" --scenario deliver --history --reconnect --url "$url_list" --redis "redis://127.0.0.1:$rport" \
  --jwt-secret "$SECRET" --conns "$CONNS" --users "$USERS" --sources 4 --concurrency 128 \
  --rate "$RATE" --duration "$DURATION" --drain 10s >"$work/bench.json" 2>"$work/bench.err" &
bench=$!; pids+=($bench)

# Wait until every client is connected, then restart each instance in turn.
until grep -q "open in" "$work/bench.err" 2>/dev/null; do sleep 0.2; done
sleep 3
for i in $(seq 0 $((INSTANCES - 1))); do
  t0=$(date +%s.%N)
  kill -TERM "${spid[$i]}"
  wait "${spid[$i]}" || true
  start_instance "$i"
  echo "instance $((i + 1)) restarted in $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s"
  sleep 4
done
wait "$bench"
python3 - "$work/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); r = d["result"]; l = r["latency"]
print(f'clients {d["conns"]} over {d["users"]} users, published {r["published"]} at {r["achieved_publish_rate"]:.0f} msgs/s with history')
print(f'expected {r["expected_deliveries"]}, received {r["received"]}, lost {r["lost"]}, duplicated {r["duplicated"]}')
print(f'latency p50 {l["p50_ms"]} ms, p99 {l["p99_ms"]} ms, max {l["max_ms"]} ms; failures {d["failures"]}')
PY
