#!/usr/bin/env bash
# Runs every HCP test: formatting, lints, and the unit (dependency
# boundaries included), store (SQLite and PostgreSQL), system and real-VM
# tests. PostgreSQL, NATS, RabbitMQ and libvirt are started (or installed) first
# when they are not running, the tiny test guest and vcsim are built when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
. scripts/testbed.sh
. scripts/console-assets.sh
. scripts/vcsim.sh

# Where the time goes: each phase says how long it took, and a machine that
# is busy with something else (a process left running) shows here.
phase_start=$SECONDS
phase() {
  echo "== $* (the step before took $((SECONDS - phase_start)) s)"
  phase_start=$SECONDS
}
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
ps -eo pcpu,etimes,comm --sort=-pcpu | head -n 4

ensure_postgres
ensure_nats
# RabbitMQ, the other production queue: the tests start nodes of their own
# from Debian's package (testkit/src/rabbitmq.rs).
ensure_rabbitmq
ensure_python_grpc
# A test tool that CI must have; elsewhere its tests are skipped, and said so.
# Usage: need_tool ENSURE_FUNCTION "what it is for"
need_tool() {
  if ! "$1"; then
    if [ "${CI:-}" = "true" ]; then
      echo "$1 failed; CI must run $2" >&2
      exit 1
    fi
    echo "SKIP $2: $1 failed"
  fi
}
# pywinrm, the independent client of the Hyper-V simulator's check.
need_tool ensure_python_winrm "the Hyper-V simulator's pywinrm check"
# A real Prometheus server scrapes a running stack in the metrics test.
need_tool ensure_prometheus "the Prometheus scrape test"
# The API contract tests' generated clients and schemathesis (PyPI, npm),
# installed before the tests so that no test waits for them; the tests call
# the same script, which returns at once when nothing changed.
ensure_contract_tools() { bash scripts/contract-tools.sh >/dev/null; }
need_tool ensure_contract_tools "the API contract tests (generated clients, schemathesis)"
# Patroni + etcd + HAProxy: the PostgreSQL failover test (cli/tests/failover.rs).
need_tool ensure_patroni "the PostgreSQL failover test (Patroni, etcd, HAProxy)"
# tmux drives the CLI's interactive session test.
need_tool ensure_tmux "the CLI's terminal test (tmux)"
# Before the build: the virt crate links libvirt through pkg-config.
ensure_libvirt
ensure_tiny_guest
# VMware's vCenter simulator for the vSphere provider (Go + govmomi from
# Debian); exports HCP_VCSIM.
ensure_vcsim
# noVNC for the console page, and Chromium + playwright-core for its test.
ensure_console_assets
# The previous release's hcp for the rolling-upgrade and provider-skew tests
# (cli/tests/upgrade.rs), built before the main build: it compiles only
# HCP's own crates of that commit on the dependencies already in target/,
# and leaves the main build's binary as it was. Cached after the first run.
. scripts/prev-release.sh
need_tool ensure_prev_release "the rolling-upgrade and provider-skew tests (the previous release, $PREV_RELEASE)"

phase "format"
cargo fmt --all -- --check

phase "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Dependency boundaries (no sqlx or NATS under the SDK or hcp-proto): providers/sdk/tests/boundary.rs, run with the tests below.

phase "doc tests"
cargo test --workspace --locked --doc

phase "fuzzing"
# Coverage-guided (cargo fuzz, libFuzzer), bounded in time; before the
# tests so that nextest's summary line closes the run.
bash scripts/fuzz.sh "${HCP_FUZZ_SECONDS:-30}"

phase "tests"
# The Proxmox tests need the PVE API schema (AGPL data, not in this
# repository; ../shared beside it, or HCP_PROXMOX_SCHEMA). Without it they
# skip, and say so here too, since nextest shows no output of a passing test.
schema="${HCP_PROXMOX_SCHEMA:-../shared/reference/proxmox/pve-api-schema-9.1.3.json}"
if [ ! -f "$schema" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "the PVE API schema is missing at $schema; CI must run the Proxmox tests" >&2
    exit 1
  fi
  echo "SKIP the Proxmox tests that validate against the PVE API schema: not found at $schema (set HCP_PROXMOX_SCHEMA)"
fi
status=0
if cargo nextest --version >/dev/null 2>&1; then
  # One process per test; the summary line closes the run.
  cargo nextest run --workspace --locked --no-fail-fast || status=$?
else
  cargo test --workspace --locked --no-fail-fast || status=$?
fi

phase "container image"
# The container image (scripts/container.sh): built from the binaries the
# tests just built and run where containers can run (SKIP otherwise). A step
# here, not a Rust test: it needs root and podman, and its I/O would compete
# with the tests; the Debian rootfs is cached, so it takes seconds after the
# first run.
bash scripts/container.sh || status=1
phase "done"

# Every test deletes what it made, also when it fails: nothing of HCP's may
# be left on the hypervisor or in the test bed.
left="$(virsh -c qemu:///system list --all --name 2>/dev/null | grep '^hcp-' || true)"
files="$(find "${HCP_TESTBED_DIR:-/var/tmp/hcp-testbed}/state" -mindepth 1 -maxdepth 1 2>/dev/null || true)"
if [ -n "$left" ] || [ -n "$files" ]; then
  echo "tests left behind: ${left:+domains: $left }${files:+state: $files}" >&2
  status=1
fi
exit "$status"
