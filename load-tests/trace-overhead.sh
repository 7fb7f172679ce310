#!/usr/bin/env bash
# What exporting every span costs the request path: the same single-record
# write load at LOCAL_QUORUM on a default local cluster (3 x 3, RF 3, fsync
# on), with OTLP export of every request's trace (no sampling) to a
# counting receiver (geolog-otlp-sink) and without. Runs in the order
# plain, traced, traced, plain (drift on a shared machine falls on both
# sides), each on a fresh cluster, and prints every run and the totals.
#
#   load-tests/trace-overhead.sh
#
# Environment: DURATION (s per run, 30), CLIENTS (32), OUT (./load-results).
source "$(dirname "$0")/cluster.sh"
DURATION=${DURATION:-30}
CLIENTS=${CLIENTS:-32}
OUT=${OUT:-$PWD/load-results}
mkdir -p "$OUT"
build
WORK=$(mktemp -d)

"$BIN/geolog-otlp-sink" --listen 127.0.0.1:0 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
stop_all() {
  stop_cluster
  kill -TERM "$SINK_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
for _ in $(seq 1 50); do grep -q "listening on" "$WORK/sink.log" && break; sleep 0.1; done
SINK=$(sed -n 's/^listening on //p' "$WORK/sink.log")

# run NAME [traced]: one fresh cluster, one load run; prints the result line.
run() {
  local dir="$WORK/$1"
  if [ "${2:-}" = traced ]; then
    OTEL_EXPORTER_OTLP_ENDPOINT="http://$SINK" start_cluster "$dir"
  else
    start_cluster "$dir"
  fi
  trap stop_all EXIT
  "$BIN/geolog-load" --cluster "$dir/cluster.json" --duration "$DURATION" --clients "$CLIENTS" \
    --json "$OUT/trace-overhead-$1.json" | grep -E "^LOCAL_QUORUM "
  stop_cluster
  rm -rf "$dir"
  sync
}

echo "traces go to $SINK; $DURATION s per run, $CLIENTS clients"
printf '%s\n' "run       level          requests     req/s  records/s      ok    p50 ms   p90 ms   p99 ms p99.9 ms   max ms  statuses"
plain1=$(run plain1); echo "plain1    $plain1"
traced1=$(run traced1 traced); echo "traced1   $traced1"
traced2=$(run traced2 traced); echo "traced2   $traced2"
plain2=$(run plain2); echo "plain2    $plain2"
kill -TERM "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true
echo "sink: $(grep '^received' "$WORK/sink.log")"
total() { awk '{ s += $2 } END { print s }' <<<"$(printf '%s\n%s\n' "$1" "$2")"; }
traced=$(total "$traced1" "$traced2")
plain=$(total "$plain1" "$plain2")
awk -v a="$traced" -v b="$plain" -v d="$DURATION" \
  'BEGIN { printf "traced %.0f req/s, plain %.0f req/s: with every trace exported, %.0f %% of the throughput\n", a / (2 * d), b / (2 * d), 100 * a / b }'
