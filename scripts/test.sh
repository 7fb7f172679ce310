#!/usr/bin/env bash
# The test command: installs what is missing, builds every binary (the
# end-to-end tests start real processes), runs every test of the workspace.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
