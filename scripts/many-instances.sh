#!/usr/bin/env bash
# Runs N gateway instances (separate processes and ports) on one machine and
# one Redis, spreads CONNS connections over them with WSBENCH_PROCS wsbench
# processes (each below the 20,000 open-file limit, on disjoint users), and
# delivers RATE msgs/s to random users for DURATION. Prints each wsbench
# result and each instance's RSS per connection. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
INSTANCES=${INSTANCES:-5}
CONNS=${CONNS:-72000}
WSBENCH_PROCS=${WSBENCH_PROCS:-4}
USERS_PER_PROC=${USERS_PER_PROC:-6000}
RATE=${RATE:-2000}
DURATION=${DURATION:-20s}
SECRET=many-instances-secret-many-instances-secret
. scripts/local-stack.sh

urls=(); spids=()
for i in $(seq 1 "$INSTANCES"); do
  p=$(port)
  JWT_SECRET_KEY=$SECRET WEBSOCKET_HOST=127.0.0.1 WEBSOCKET_PORT=$p REDIS_URL=redis://127.0.0.1:$rport \
    LOG_LEVEL=warn WEBSOCKET_MAX_CONNECTIONS_PER_USER=20 "$work/websocket-service" serve 2>"$work/gw$i.log" &
  pids+=($!); spids+=($!); urls+=("ws://127.0.0.1:$p")
  until curl -fs "http://127.0.0.1:$p/healthz" >/dev/null 2>&1; do sleep 0.1; done
done
url_list=$(IFS=,; echo "${urls[*]}")
pid_list=$(IFS=,; echo "${spids[*]}")
declare -A rss0
for p in "${spids[@]}"; do rss0[$p]=$(awk '/VmRSS/{print $2}' "/proc/$p/status"); done

per=$((CONNS / WSBENCH_PROCS))
bpids=()
for j in $(seq 0 $((WSBENCH_PROCS - 1))); do
  "$work/wsbench" --scenario deliver --url "$url_list" --redis "redis://127.0.0.1:$rport" --jwt-secret "$SECRET" \
    --conns "$per" --users "$USERS_PER_PROC" --user-offset $((j * USERS_PER_PROC)) --sources 8 --concurrency 128 \
    --rate $((RATE / WSBENCH_PROCS)) --duration "$DURATION" --drain 5s --server-pid "$pid_list" \
    >"$work/bench$j.json" 2>"$work/bench$j.err" &
  bpids+=($!)
done
# RSS while everything is connected: sample when the connection count peaks.
peak=0
for _ in $(seq 1 600); do
  total=0
  for u in "${urls[@]}"; do
    n=$(curl -fs "${u/ws:/http:}/healthz/websocket" | python3 -c 'import json,sys;print(json.load(sys.stdin)["total_connections"])' 2>/dev/null || echo 0)
    total=$((total + n))
  done
  if [ "$total" -ge "$CONNS" ] || { [ "$total" -gt 0 ] && [ "$total" -eq "$peak" ]; }; then break; fi
  peak=$total; sleep 1
done
echo "instances: $INSTANCES, connections: $total"
for i in "${!spids[@]}"; do
  p=${spids[$i]}; u=${urls[$i]}
  n=$(curl -fs "${u/ws:/http:}/healthz/websocket" | python3 -c 'import json,sys;print(json.load(sys.stdin)["total_connections"])')
  rss=$(awk '/VmRSS/{print $2}' "/proc/$p/status")
  echo "instance $((i + 1)): $n connections, RSS ${rss} kB, $(( (rss - ${rss0[$p]}) * 1024 / (n > 0 ? n : 1) )) B per connection"
done
for p in "${bpids[@]}"; do wait "$p"; done
for j in $(seq 0 $((WSBENCH_PROCS - 1))); do
  python3 - "$work/bench$j.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); r = d["result"]; l = r["latency"]
print(f'wsbench {sys.argv[1].split("bench")[-1][:-5]}: open {d["open"]}/{d["conns"]}, expected {r["expected_deliveries"]}, received {r["received"]}, lost {r["lost"]}, dup {r["duplicated"]}, p50 {l["p50_ms"]} ms, p99 {l["p99_ms"]} ms, p99.9 {l["p99.9_ms"]} ms, max {l["max_ms"]} ms, failures {d["failures"]}')
PY
done
