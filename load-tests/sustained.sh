#!/usr/bin/env bash
# Sustained ingest, not a burst: is geolog fast because it keeps up, or
# because copies pile up in memory? Starts a fresh cluster, measures the
# closed-loop maximum of 100-record batches (CALIBRATE s), then runs an
# open-loop load at SHARE % of it for DURATION s and samples, every SAMPLE s,
# every process's RSS and every backlog the cluster has: the coordinators'
# write queues (items queued for a replica or a remote region, not yet
# sent), the hints waiting per target replica and the cross-region outbox
# per region. Prints the samples, the start/end comparison and the load
# generator's figures (open-loop: latency from each request's scheduled
# time, so falling behind shows).
#
#   load-tests/sustained.sh                          # 1 x 3, 5 minutes at 80 %
#   DURATION=60 load-tests/sustained.sh              # a shorter look
#   GEOLOG_UP_ARGS="--regions 3" load-tests/sustained.sh
#   SHARE=200 CLIENTS=1000 DURATION=60 load-tests/sustained.sh   # overload:
#       twice the maximum offered; the refused share and how fast the
#       refusals and the accepted requests were answered are printed
#
# Environment: DURATION (300), SHARE (80), CALIBRATE (15), RATE (records/s;
# skips calibration), SAMPLE (30), CLIENTS (32; the open loop's requests in
# flight at most), BATCH (100; 1 sends single writes), CALIBRATE_CLIENTS (32),
# GEOLOG_UP_ARGS ("--regions 1 --nodes-per-region 3 --replication-factor 3"),
# OUT (./load-results).
source "$(dirname "$0")/cluster.sh"
DURATION=${DURATION:-300}
SHARE=${SHARE:-80}
CALIBRATE=${CALIBRATE:-15}
SAMPLE=${SAMPLE:-30}
CLIENTS=${CLIENTS:-32}
BATCH=${BATCH:-100}
GEOLOG_UP_ARGS=${GEOLOG_UP_ARGS:---regions 1 --nodes-per-region 3 --replication-factor 3}
OUT=${OUT:-$PWD/load-results}
mkdir -p "$OUT"
build

WORK=$(mktemp -d)
# shellcheck disable=SC2086
start_cluster "$WORK/cluster" $GEOLOG_UP_ARGS
CLUSTER_JSON="$WORK/cluster/cluster.json"
CALIBRATE_CLIENTS=${CALIBRATE_CLIENTS:-32}
if [ "$BATCH" = 1 ]; then SCENARIO=(--scenario write); else SCENARIO=(--scenario batch --batch-size "$BATCH"); fi
LOAD=("$BIN/geolog-load" --cluster "$CLUSTER_JSON" "${SCENARIO[@]}" --consistency LOCAL_QUORUM)

if [ -z "${RATE:-}" ]; then
  echo "calibrating: closed-loop ${BATCH}-record requests, $CALIBRATE_CLIENTS clients, for ${CALIBRATE} s"
  line=$("${LOAD[@]}" --clients "$CALIBRATE_CLIENTS" --duration "${CALIBRATE}s" | tee "$OUT/sustained-calibration.txt" | grep '^LOCAL_QUORUM')
  max=$(echo "$line" | awk '{print $4}')
  RATE=$(awk -v m="$max" -v s="$SHARE" 'BEGIN { printf "%d", m * s / 100 }')
  echo "closed-loop maximum: $max records/s; open loop at ${SHARE} %: $RATE records/s"
fi
REQUESTS_PER_S=$(awk -v r="$RATE" -v b="$BATCH" 'BEGIN { printf "%.3f", r / b }')

# One sample: a line per process (RSS MiB) and per backlog series.
sample() {
  python3 - "$CLUSTER_JSON" <<'EOF'
import json, re, subprocess, sys, urllib.request
cluster = json.load(open(sys.argv[1]))
def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
def tree(pid):
    out = [pid]
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for kid in kids:
        out += tree(int(kid))
    return out
rows = {}
backlog = re.compile(r'^(write_queue_items|hints_pending|outbox_depth)(\{[^}]*\})? (\S+)$')
for p in cluster["processes"]:
    rows[f"rss_mib {p['id']}"] = rss_kib(p["pid"]) / 1024
    if "postgres_pid" in p:
        # Shared buffers are counted once per backend that touched them:
        # an upper bound, flat when nothing grows.
        rows[f"rss_mib {p['id']}-postgres"] = sum(rss_kib(x) for x in tree(p["postgres_pid"])) / 1024
    url = p.get("metrics_url")
    if p["role"] != "coordinator" or not url:
        continue
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        continue
    for line in text.splitlines():
        m = backlog.match(line)
        if m:
            rows[f"{m.group(1)} {p['id']}{m.group(2) or ''}"] = float(m.group(3))
print(json.dumps(rows))
EOF
}

echo "open loop: $RATE records/s ($REQUESTS_PER_S requests/s, $CLIENTS clients) for $DURATION s, sampled every $SAMPLE s"
"${LOAD[@]}" --clients "$CLIENTS" --rate "$REQUESTS_PER_S" --duration "${DURATION}s" >"$OUT/sustained-load.txt" 2>&1 &
LOAD_PID=$!
SAMPLES="$OUT/sustained-samples.jsonl"
: >"$SAMPLES"
sleep 5
elapsed=5
while kill -0 "$LOAD_PID" 2>/dev/null; do
  echo "{\"t\": $elapsed, \"values\": $(sample)}" >>"$SAMPLES"
  sleep "$SAMPLE"
  elapsed=$((elapsed + SAMPLE))
done
wait "$LOAD_PID" || { cat "$OUT/sustained-load.txt" >&2; exit 1; }
sleep 5
echo "{\"t\": $((elapsed + 5)), \"after\": true, \"values\": $(sample)}" >>"$SAMPLES"

python3 - "$SAMPLES" <<'EOF'
import json, sys
samples = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
during = [s for s in samples if not s.get("after")]
after = [s for s in samples if s.get("after")]
first, last = during[0], during[-1]
names = sorted(set().union(*(s["values"] for s in samples)))
cols = [f"t={first['t']} s", "peak", f"t={last['t']} s"] + ([f"after, t={after[0]['t']} s"] if after else [])
print(f"\n{'series':58s}" + "".join(f"{c:>16s}" for c in cols))
for n in names:
    row = [first["values"].get(n, 0), max(s["values"].get(n, 0) for s in during), last["values"].get(n, 0)]
    row += [after[0]["values"].get(n, 0)] if after else []
    print(f"{n:58s}" + "".join(f"{v:16.1f}" for v in row))
EOF
echo
echo "load generator (open loop, latency from each request's scheduled time):"
grep -A2 '^level' "$OUT/sustained-load.txt"
achieved=$(grep '^LOCAL_QUORUM' "$OUT/sustained-load.txt" | awk '{print $4}')
awk -v o="$RATE" -v a="$achieved" 'BEGIN {
  printf "offered %d records/s, achieved %d (%.0f %%)%s\n", o, a, 100 * a / o,
    (a < 0.97 * o ? ": it fell behind (see the latency from schedule)" : "") }'
echo "samples: $SAMPLES"
