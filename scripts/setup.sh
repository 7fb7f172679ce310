#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and run geolog:
# PostgreSQL server binaries (apt) and, when running as root, the
# unprivileged user PostgreSQL runs as. Idempotent; fast when all is there.
set -euo pipefail

have_postgres() {
  local dirs=()
  [ -n "${GEOLOG_PG_BINDIR:-}" ] && dirs+=("$GEOLOG_PG_BINDIR")
  command -v pg_config >/dev/null 2>&1 && dirs+=("$(pg_config --bindir)")
  command -v initdb >/dev/null 2>&1 && dirs+=("$(dirname "$(command -v initdb)")")
  for d in /usr/lib/postgresql/*/bin; do dirs+=("$d"); done
  for d in "${dirs[@]}"; do
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && return 0
  done
  return 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust 1.94 or newer (https://rustup.rs)" >&2
  exit 1
fi

if ! have_postgres; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: PostgreSQL server binaries not found and apt-get is unavailable;" >&2
    echo "       install PostgreSQL (initdb, postgres) and/or set GEOLOG_PG_BINDIR" >&2
    exit 1
  fi
  echo "setup: installing PostgreSQL server binaries with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  have_postgres || { echo "setup: PostgreSQL still not found after install" >&2; exit 1; }
fi

# initdb and postgres refuse to run as root: geolog runs them as this user.
pg_user="${GEOLOG_PG_USER:-postgres}"
if [ "$(id -u)" -eq 0 ] && ! id "$pg_user" >/dev/null 2>&1; then
  echo "setup: creating system user $pg_user to run PostgreSQL"
  useradd --system --user-group --home-dir /var/lib/postgresql --shell /usr/sbin/nologin "$pg_user"
fi
