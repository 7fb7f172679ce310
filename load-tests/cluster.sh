# Shared by the load-test scripts (sourced, not run): builds the release
# binaries and starts a local cluster of its own in a temporary directory,
# stopped (by PID) when the script exits. Every run is bounded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"

build() {
  "$ROOT/scripts/setup.sh"
  (cd "$ROOT" && cargo build --workspace --bins --release --locked)
}

# start_cluster DIR [geolog up options...]: returns once every process is healthy.
start_cluster() {
  local dir="$1"; shift
  # PostgreSQL runs as its own user when we are root: it must reach DIR.
  chmod 755 "$(dirname "$dir")"
  "$BIN/geolog" up --data-dir "$dir" --gateway-port 0 "$@" >"$dir.up.log" 2>&1 &
  CLUSTER_PID=$!
  CLUSTER_DIR="$dir"
  trap on_exit EXIT
  for _ in $(seq 1 600); do
    if grep -q "press Ctrl-C" "$dir.up.log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$CLUSTER_PID" 2>/dev/null; then
      echo "geolog up failed:" >&2; cat "$dir.up.log" >&2; exit 1
    fi
    sleep 0.2
  done
  echo "the cluster did not come up within 120 s" >&2; exit 1
}

# What runs when a script ends: the cluster stops, then a script's own
# `extra_cleanup` if it defines one (start_cluster installs this trap, so a
# script's own `trap ... EXIT` would be replaced); then the script's
# scratch directory `WORK` (clusters' data: gigabytes after a load run)
# goes, unless the script failed or KEEP_WORK=1 — then it is kept and named.
on_exit() {
  local status=$?
  stop_cluster
  if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    if [ "$status" = 0 ] && [ "${KEEP_WORK:-0}" != 1 ]; then
      rm -rf "$WORK"
    else
      echo "data and logs kept in $WORK" >&2
    fi
  fi
}

stop_cluster() {
  if [ -n "${CLUSTER_PID:-}" ] && kill -0 "$CLUSTER_PID" 2>/dev/null; then
    kill -TERM "$CLUSTER_PID"
    wait "$CLUSTER_PID" 2>/dev/null || true
  fi
}
