#!/usr/bin/env bash
# What exporting every span costs the request path: the same single-record
# write load at LOCAL_QUORUM on a default local cluster (3 x 3, RF 3, fsync
# on), once with OTLP export of every request's trace (no sampling) to a
# counting receiver (geolog-otlp-sink), once without, side by side.
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
stop_all() { stop_cluster; kill -TERM "$SINK_PID" 2>/dev/null || true; }
for _ in $(seq 1 50); do grep -q "listening on" "$WORK/sink.log" && break; sleep 0.1; done
SINK=$(sed -n 's/^listening on //p' "$WORK/sink.log")

run() {
  "$BIN/geolog-load" --cluster "$1/cluster.json" --duration "$DURATION" --clients "$CLIENTS" \
    --json "$OUT/trace-overhead-$2.json" | grep -E "^LOCAL_QUORUM "
}

echo "== traces exported to $SINK"
OTEL_EXPORTER_OTLP_ENDPOINT="http://$SINK" start_cluster "$WORK/traced"
trap stop_all EXIT
traced=$(run "$WORK/traced" traced)
stop_cluster
kill -TERM "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true
spans=$(grep "^received" "$WORK/sink.log")

echo "== no export"
start_cluster "$WORK/plain"
trap stop_all EXIT
plain=$(run "$WORK/plain" plain)
stop_cluster

printf '%s\n' "run      level          requests     req/s  records/s      ok    p50 ms   p90 ms   p99 ms p99.9 ms   max ms  statuses"
printf 'traced   %s\nplain    %s\n' "$traced" "$plain"
echo "sink: $spans"
awk -v a="$(awk '{print $4}' <<<"$traced")" -v b="$(awk '{print $4}' <<<"$plain")" \
  'BEGIN { printf "throughput with every trace exported: %.0f %% of without\n", 100 * a / b }'
