#!/usr/bin/env bash
# Runs every HCP test: formatting, lints, dependency boundaries, and the
# unit, store (SQLite and PostgreSQL), system and real-VM tests. PostgreSQL,
# NATS and libvirt are started (or installed) first when they are not
# running, and the tiny test guest is built when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
. scripts/testbed.sh
. scripts/console-assets.sh

ensure_postgres
ensure_nats
ensure_python_grpc
# Before the build: the virt crate links libvirt through pkg-config.
ensure_libvirt
ensure_tiny_guest
# noVNC for the console page, and Chromium + playwright-core for its test.
ensure_console_assets

echo "== format"
cargo fmt --all -- --check

echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== dependency boundaries"
# The provider SDK is a public product for vendors: it must not drag in a
# database driver or a message queue client.
for dep in sqlx async-nats; do
  if cargo tree --locked -p hcp-provider-sdk -e normal -i "$dep" >/dev/null 2>&1; then
    echo "hcp-provider-sdk depends on $dep" >&2
    exit 1
  fi
done
echo "hcp-provider-sdk depends on neither sqlx nor async-nats"

echo "== doc tests"
cargo test --workspace --locked --doc

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  # One process per test; the summary line closes the run.
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
