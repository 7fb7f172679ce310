#!/usr/bin/env bash
# The tutorial's latency-per-level demonstration and batch ingest on a default
# local cluster (3 regions x 3 storage nodes, RF 3, fsync on) it starts
# itself and stops at the end. Results (JSON, SVG) go to OUT.
#
#   load-tests/load-test.sh              # levels, mixed, hot key, batches, ~4 minutes
#   SOAK_SECS=600 load-tests/load-test.sh  # also: 10 minutes of steady load, RSS at start and end
#
# Environment: DURATION (s per level, 10), CLIENTS (32), BATCH (records per
# batch request, 100), OUT (directory, ./load-results), SOAK_SECS (0).
source "$(dirname "$0")/cluster.sh"
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-32}
BATCH=${BATCH:-100}
SOAK_SECS=${SOAK_SECS:-0}
OUT=${OUT:-$PWD/load-results}
mkdir -p "$OUT"
build
WORK=$(mktemp -d)
start_cluster "$WORK/cluster"
LOAD=("$BIN/geolog-load" --cluster "$WORK/cluster/cluster.json" --duration "$DURATION")
LEVELS=ONE,LOCAL_ONE,LOCAL_QUORUM,QUORUM,EACH_QUORUM,ALL

echo "== single-record writes per level ($CLIENTS clients)"
"${LOAD[@]}" --clients "$CLIENTS" --consistency "$LEVELS" --json "$OUT/write-levels.json" --plot "$OUT/write-levels.svg"
echo
echo "== reads per level ($CLIENTS clients)"
"${LOAD[@]}" --clients "$CLIENTS" --scenario read --consistency "$LEVELS" --json "$OUT/read-levels.json" --plot "$OUT/read-levels.svg"
echo
echo "== mixed 80 % reads / 20 % writes at LOCAL_QUORUM"
"${LOAD[@]}" --clients "$CLIENTS" --scenario mixed --json "$OUT/mixed.json"
echo
echo "== one hot key at LOCAL_QUORUM"
"${LOAD[@]}" --clients "$CLIENTS" --keys 1 --json "$OUT/hot-key.json"
echo
echo "== batches of $BATCH at LOCAL_QUORUM ($CLIENTS clients); the side-by-side comparison with PostgreSQL is load-tests/peer.sh"
"${LOAD[@]}" --clients "$CLIENTS" --scenario batch --batch-size "$BATCH" --json "$OUT/batch.json"

if [ "$SOAK_SECS" -gt 0 ]; then
  echo
  echo "== steady load for $SOAK_SECS s at LOCAL_QUORUM, open loop at 200 writes/s: resident memory at start and end"
  "$BIN/geolog-load" --cluster "$WORK/cluster/cluster.json" --duration "$SOAK_SECS" --clients "$CLIENTS" \
    --rate 200 --rss --json "$OUT/soak.json" --plot "$OUT/soak.svg"
fi
echo "results in $OUT"
