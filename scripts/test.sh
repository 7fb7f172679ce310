#!/usr/bin/env bash
# The test command: installs what is missing, builds every binary (the
# end-to-end tests start real processes), runs every test of the workspace
# and ends with one summary line. Extra arguments go to `cargo test`
# (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
