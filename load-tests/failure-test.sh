#!/usr/bin/env bash
# Availability per consistency level while nodes stop and a region is cut
# off: steady load at ONE, LOCAL_QUORUM, QUORUM, EACH_QUORUM and ALL (all at
# once, through region a's gateway) on a local 3 x 3 cluster (RF 3) it
# starts itself, phase by phase, then a table of the share of requests
# answered 2xx per level and phase — and a check that every write
# acknowledged during the run is readable at ALL after the faults heal.
#
#   load-tests/failure-test.sh              # ~2 minutes
#   TUTORIAL=1 load-tests/failure-test.sh   # the tutorial's single region of 5 replicas:
#                                           # ONE, QUORUM, ALL while 1, 2, then 3 nodes stop
#
# Environment: PHASE_SECS (8), CLIENTS (4 per level), OUT (./load-results).
source "$(dirname "$0")/cluster.sh"
PHASE_SECS=${PHASE_SECS:-8}
CLIENTS=${CLIENTS:-4}
OUT=${OUT:-$PWD/load-results}
TUTORIAL=${TUTORIAL:-0}
if [ "$TUTORIAL" = 1 ]; then
  LEVELS=(ONE QUORUM ALL)
  SHAPE=(--regions 1 --nodes-per-region 5 --replication-factor 5)
else
  LEVELS=(ONE LOCAL_QUORUM QUORUM EACH_QUORUM ALL)
  SHAPE=()
fi
mkdir -p "$OUT"
build
WORK=$(mktemp -d)
start_cluster "$WORK/cluster" "${SHAPE[@]}"
DIR="$WORK/cluster"
geolog() { "$BIN/geolog" "$@" --data-dir "$DIR" >/dev/null; }

declare -A AVAIL
PHASES=()
phase() {
  local name="$1"
  PHASES+=("$name")
  sleep 3 # let failure detection see the change
  echo "== $name"
  "$BIN/geolog-load" --cluster "$DIR/cluster.json" --region a --concurrent-levels \
    --consistency "$(IFS=,; echo "${LEVELS[*]}")" --clients "$CLIENTS" --duration "$PHASE_SECS" \
    --keys 100000 --acked "$WORK/acked.tsv" --json "$OUT/failure-${#PHASES[@]}.json" | tee "$WORK/phase.txt"
  for level in "${LEVELS[@]}"; do
    AVAIL["$name/$level"]=$(awk -v l="$level" '$1 == l { print $5 }' "$WORK/phase.txt")
  done
}

phase "healthy"
geolog node stop a1
phase "a1 down"
geolog node stop a2
phase "a1 a2 down"
if [ "$TUTORIAL" = 1 ]; then
  geolog node stop a3
  phase "a1-a3 down"
  for n in a1 a2 a3; do geolog node start "$n"; done
  phase "restarted"
else
  geolog node start a1
  geolog node start a2
  geolog fault partition a c
  geolog fault partition b c
  phase "c cut off"
  geolog fault heal
  phase "healed"
fi

echo
echo "availability (share of requests answered 2xx) per level and phase, region a's gateway"
printf '%-14s' "level"
for p in "${PHASES[@]}"; do printf '%12s' "$p"; done
echo
for level in "${LEVELS[@]}"; do
  printf '%-14s' "$level"
  for p in "${PHASES[@]}"; do printf '%12s' "${AVAIL["$p/$level"]}"; done
  echo
done

echo
echo "== after the faults healed: every acknowledged write, read back at ALL"
"$BIN/geolog-load" --cluster "$DIR/cluster.json" --region a --verify "$WORK/acked.tsv"
