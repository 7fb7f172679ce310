#!/usr/bin/env bash
# Starts a local geolog cluster in the foreground (Ctrl-C stops it):
# installs what is missing, builds the binaries, runs `geolog up` with the
# arguments given (see `geolog up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --workspace --bins --release --locked
exec ./target/release/geolog up "$@"
