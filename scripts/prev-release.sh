#!/usr/bin/env bash
# The previous release's `hcp` binary (core, gateway and the sim provider
# by subcommand), for the rolling-upgrade and provider-skew tests
# (cli/tests/upgrade.rs). Built from the pinned commit below out of this
# repository's history (`git archive`: no worktree is registered), in the
# same target directory as the main build, so that only HCP's own crates
# compile and every dependency is the one already built; the binary is kept
# in the cache directory and a second run returns at once.
#
# Source it and call ensure_prev_release, or run it: `bash
# scripts/prev-release.sh` builds (when needed) and prints the binary's path.
#
# Run it BEFORE the main build: it leaves the main build's target/debug/hcp
# as it found it (moved aside during the old build, then back), and what the
# old build compiled of HCP's crates sits under other names (see the
# version given them below), so the main build recompiles nothing for it.

# The previous release: the last commit that passed CI and landed before the
# migrations this release adds. Bump it when a release ships; the tests read
# it from here.
PREV_RELEASE=9174ef0865a8690b11ac61e7b5e460b774949903

HCP_TESTBED_DIR=${HCP_TESTBED_DIR:-/var/tmp/hcp-testbed}

prev_log() { echo "[prev-release] $*" >&2; }

# The cached binary's path (whether built or not).
prev_release_bin() { echo "$HCP_TESTBED_DIR/prev-$PREV_RELEASE/hcp"; }

ensure_prev_release() {
  local repo out src target bin aside start
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  out="$HCP_TESTBED_DIR/prev-$PREV_RELEASE"
  bin="$out/hcp"
  if [ -x "$bin" ]; then
    return 0
  fi
  if ! git -C "$repo" cat-file -e "$PREV_RELEASE^{commit}" 2>/dev/null; then
    # A shallow clone lacks it; CI has the full history.
    prev_log "commit $PREV_RELEASE is not in this clone's history (shallow? git fetch --unshallow)"
    return 1
  fi
  start=$(date +%s)
  # A fixed source path: HCP's crates of the old release get the same
  # hashes every time, so an interrupted build resumes.
  src="$out/src"
  if [ ! -e "$src/.extracted" ]; then
    rm -rf "$src"
    mkdir -p "$src"
    git -C "$repo" archive "$PREV_RELEASE" | tar -x -C "$src" || return 1
    # Cargo names a workspace crate's artifacts by its name, version and
    # path relative to the workspace root: the same for both releases, so
    # the old build would overwrite the main build's artifacts of HCP's
    # crates and, worse, take one of them as fresh (git archive's files are
    # older than it) and link the new code into the old binary. A version
    # of their own (`-prev-<commit>`, in Cargo.toml and, for --locked,
    # Cargo.lock's path packages) gives them other names, also from another
    # pinned commit's; the dependencies keep theirs.
    local suffix="-prev-${PREV_RELEASE:0:12}"
    sed -i "/^\\[workspace.package\\]/,/^\\[/ s/^version = \"\\(.*\\)\"\$/version = \"\\1$suffix\"/" "$src/Cargo.toml" \
      || return 1
    awk -v suffix="$suffix" 'BEGIN { RS = ""; ORS = "\n\n" }
         !/\nsource = / { sub(/\nversion = "[^"]*/, "&" suffix) } { print }' "$src/Cargo.lock" >"$src/Cargo.lock.prev" \
      && mv "$src/Cargo.lock.prev" "$src/Cargo.lock" || return 1
    touch "$src/.extracted"
  fi
  target="${CARGO_TARGET_DIR:-$repo/target}"
  aside=""
  if [ -e "$target/debug/hcp" ]; then
    # The old build would put its binary where the main build's is; keep
    # the main one aside (cargo does not copy a fresh binary out again).
    aside="$target/debug/hcp.main-$$"
    mv "$target/debug/hcp" "$aside" || return 1
  fi
  prev_log "building hcp at ${PREV_RELEASE:0:9} (target $target)"
  local status=0
  # As many jobs as the main build's (CARGO_BUILD_JOBS limits both).
  (cd "$src" && CARGO_TARGET_DIR="$target" cargo build --locked -p hcp-cli --bin hcp) || status=$?
  if [ "$status" -eq 0 ]; then
    cp "$target/debug/hcp" "$bin.tmp" && mv "$bin.tmp" "$bin" || status=1
  fi
  rm -f "$target/debug/hcp"
  if [ -n "$aside" ]; then
    mv "$aside" "$target/debug/hcp" || status=1
  fi
  if [ "$status" -ne 0 ]; then
    prev_log "building the previous release failed"
    return 1
  fi
  rm -rf "$src"
  prev_log "built $bin in $(( $(date +%s) - start )) s"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_prev_release
  prev_release_bin
fi
