#!/usr/bin/env bash
# geolog against what a user would pick instead (DESIGN.md §10), side by
# side in one run on this machine: PostgreSQL with a primary and two
# streaming standbys, synchronous_standby_names = 'ANY 1 (s1, s2)' (two of
# three copies durable before a commit returns, fsync on), started here;
# and a fresh geolog cluster of one region with 3 replicas (RF 3) at
# LOCAL_QUORUM (two of three copies durable before the answer). Both use
# the same PostgreSQL settings (shared_buffers, max_connections, fsync),
# the same load generator, clients, payloads (100 B) and keys (10,000).
# Workloads alternate peer / geolog, ROUNDS times, and the table gives
# each figure's range and geolog's share of the peer's.
#
#   load-tests/peer.sh                        # 20 s per workload, 1 round (~4 min)
#   ROUNDS=3 DURATION=20 load-tests/peer.sh   # ranges over 3 alternated rounds
#
# Environment: DURATION (s per workload, 20), CLIENTS (32), BATCH (100),
# ROUNDS (1), GEOLOG_UP_ARGS (the geolog cluster's shape, default
# "--regions 1 --nodes-per-region 3 --replication-factor 3"), WORKLOADS
# (comma-separated subset of batch,single,single1,read), OUT (./load-results).
source "$(dirname "$0")/cluster.sh"
DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-32}
BATCH=${BATCH:-100}
ROUNDS=${ROUNDS:-1}
WORKLOADS=${WORKLOADS:-batch,single,single1,read}
GEOLOG_UP_ARGS=${GEOLOG_UP_ARGS:---regions 1 --nodes-per-region 3 --replication-factor 3}
OUT=${OUT:-$PWD/load-results}
mkdir -p "$OUT"
build

PGBIN=${GEOLOG_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d)
chmod 755 "$WORK"
PEER="$WORK/peer"
mkdir -p "$PEER"
# initdb/postgres refuse root: run them as postgres then, like geolog up does.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "${GEOLOG_PG_USER:-postgres}" -- "$@"; else "$@"; fi
}
[ "$(id -u)" = 0 ] && chown "${GEOLOG_PG_USER:-postgres}" "$PEER"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
P0=$(free_port); P1=$(free_port); P2=$(free_port)
PEER_PIDS=()
stop_peer() {
  for dir in "$PEER/s2" "$PEER/s1" "$PEER/primary"; do
    [ -f "$dir/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
  done
}
extra_cleanup() { stop_peer; }
trap on_exit EXIT

# Same server settings as geolog's storage nodes get from `geolog up`.
COMMON=(-c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=100
        -c shared_buffers=64MB -c fsync=on)
as_pg "$PGBIN/initdb" -D "$PEER/primary" -U geolog --auth=trust -E UTF8 --locale=C >"$PEER/initdb.log"
cat >>"$PEER/primary/postgresql.conf" <<EOF
wal_level = replica
max_wal_senders = 5
synchronous_commit = on
synchronous_standby_names = 'ANY 1 (s1, s2)'
EOF
as_pg "$PGBIN/pg_ctl" -D "$PEER/primary" -l "$PEER/primary.log" -o "-p $P0 ${COMMON[*]}" -w start >/dev/null
for s in 1 2; do
  port_var="P$s"
  as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P0" -U geolog -D "$PEER/s$s" -X stream -R
  echo "primary_conninfo = 'host=127.0.0.1 port=$P0 user=geolog application_name=s$s'" >>"$PEER/s$s/postgresql.auto.conf"
  as_pg "$PGBIN/pg_ctl" -D "$PEER/s$s" -l "$PEER/s$s.log" -o "-p ${!port_var} ${COMMON[*]}" -w start >/dev/null
done
PEER_URL="postgres://geolog@127.0.0.1:$P0/postgres"
for _ in $(seq 1 100); do
  n=$(as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$P0" -U geolog -d postgres -Atc \
      "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'")
  [ "$n" = 2 ] && break
  sleep 0.1
done
[ "$n" = 2 ] || { echo "the standbys did not reach quorum sync state" >&2; exit 1; }
echo "peer: primary on $P0, standbys s1 on $P1 and s2 on $P2, both in quorum sync state"

# shellcheck disable=SC2086
start_cluster "$WORK/cluster" $GEOLOG_UP_ARGS
CLUSTER=(--cluster "$WORK/cluster/cluster.json")

# workload name -> geolog-load arguments
args_of() {
  case "$1" in
    batch) echo "--scenario batch --batch-size $BATCH --clients $CLIENTS" ;;
    single) echo "--scenario write --clients $CLIENTS" ;;
    single1) echo "--scenario write --clients 1" ;;
    read) echo "--scenario read --clients $CLIENTS" ;;
  esac
}
label_of() {
  case "$1" in
    batch) echo "$BATCH-record batches, $CLIENTS clients" ;;
    single) echo "single-record writes, $CLIENTS clients" ;;
    single1) echo "single-record writes, 1 client" ;;
    read) echo "reads of a key's current value, $CLIENTS clients" ;;
  esac
}

IFS=, read -r -a LIST <<<"$WORKLOADS"
for round in $(seq 1 "$ROUNDS"); do
  for w in "${LIST[@]}"; do
    # shellcheck disable=SC2046
    "$BIN/geolog-load" --duration "$DURATION" $(args_of "$w") --peer-postgres "$PEER_URL" \
      --json "$OUT/peer-$w-$round.json" | tail -n +2
    # shellcheck disable=SC2046
    "$BIN/geolog-load" "${CLUSTER[@]}" --duration "$DURATION" $(args_of "$w") \
      --consistency LOCAL_QUORUM --json "$OUT/geolog-$w-$round.json" | tail -n +2
  done
done

echo
echo "== geolog ($GEOLOG_UP_ARGS, LOCAL_QUORUM) against PostgreSQL primary + 2 standbys (ANY 1), $ROUNDS round(s) of $DURATION s"
python3 - "$OUT" "$ROUNDS" "${LIST[@]}" <<'EOF'
import json, sys
out, rounds, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
labels = {"batch": "batches", "single": "single writes", "single1": "single writes, 1 client", "read": "reads"}
def load(who, w):
    return [json.load(open(f"{out}/{who}-{w}-{r}.json"))["reports"][0] for r in range(1, rounds + 1)]
def rng(xs, fmt):
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if lo == hi else (fmt + "–" + fmt).format(lo, hi)
print(f"| workload | peer records/s | peer p50 / p99 ms | geolog records/s | geolog p50 / p99 ms | share |")
print(f"|---|---|---|---|---|---|")
for w in workloads:
    p, g = load("peer", w), load("geolog", w)
    share = [gr["records_per_second"] / pr["records_per_second"] * 100 for pr, gr in zip(p, g)]
    lat = lambda rs: rng([r["p50_ms"] for r in rs], "{:.1f}") + " / " + rng([r["p99_ms"] for r in rs], "{:.1f}")
    ok = min(r["availability"] for r in g) * 100
    print(f"| {labels[w]} | {rng([r['records_per_second'] for r in p], '{:,.0f}')} | {lat(p)} "
          f"| {rng([r['records_per_second'] for r in g], '{:,.0f}')} | {lat(g)} "
          f"| {rng(share, '{:.1f}')} %{'' if ok == 100 else f' ({ok:.1f} % ok)'} |")
EOF
echo "results in $OUT"
