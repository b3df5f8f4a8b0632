#!/usr/bin/env bash
# Builds HCP's container image and runs it where containers can run.
#
# No registry is reachable from the test machines, so nothing comes FROM a
# public image: the root file system is made from Debian bookworm's
# packages with mmdebstrap (essential packages plus the runtime libraries
# and tools HCP's binaries use), HCP's binaries are added with buildah, and
# the image runs as the non-root user hcp (10001). The rootfs tarball is
# cached in /var/tmp/hcp-testbed/container, keyed by a hash of its recipe,
# so a second build takes seconds.
#
# Usage: bash scripts/container.sh [build|test|all|rootfs]   (default: all;
#        rootfs only makes the cached Debian tarball)
#   HCP_IMAGE    the image name (default localhost/hcp:dev)
#   HCP_BIN_DIR  where the binaries are (default target/debug; a release
#                build's target/release makes a smaller image)
#
# `test` runs the image: each binary's --version, qemu-img and virsh as the
# hcp user, then core with a configuration mounted from the host (SQLite,
# both roles, the secrets as files of mode 0600) until its /metrics answers
# through a published port, and core refusing a secret file of mode 0644.
# Where containers cannot run it prints `SKIP <why>` and exits 0, also under
# CI (the image is still built); missing tools it cannot install fail CI.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[container] $*" >&2; }
skip() {
  echo "SKIP the container image test: $*"
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  exit 0
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

IMAGE="${HCP_IMAGE:-localhost/hcp:dev}"
BIN_DIR="${HCP_BIN_DIR:-target/debug}"
CACHE="${HCP_TESTBED_DIR:-/var/tmp/hcp-testbed}/container"
BINS=(hcp-core hcp-gateway hcp-provider-libvirt hcp-provider-proxmox hcp-provider-vsphere hcp-provider-hyperv)
HCP_UID=10001

# The rootfs recipe; its hash names the cached tarball and the base image.
SUITE=bookworm
# What the binaries link (ldd: libc6 and libgcc-s1, both essential;
# libvirt0 for the libvirt provider) and run: qemu-img (core's image
# imports, the libvirt provider's disks), virsh (the libvirt provider's
# pool-define-as), the system's CA certificates (webhooks, image
# downloads, identity providers' JWKS).
PACKAGES="ca-certificates,libvirt0,libvirt-clients,qemu-utils"
# Documentation, manuals and translations are left out of the image.
DPKG_OPTS=(
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
)
# The non-root user, written straight into the files (the essential set
# has no useradd), and its home, which is also where core's SQLite file
# would go.
USER_HOOK="echo 'hcp:x:$HCP_UID:$HCP_UID:HCP:/var/lib/hcp:/usr/sbin/nologin' >> \"\$1/etc/passwd\"; \
echo 'hcp:x:$HCP_UID:' >> \"\$1/etc/group\"; \
echo 'hcp:!:19000::::::' >> \"\$1/etc/shadow\"; \
mkdir -p \"\$1/var/lib/hcp\" \"\$1/etc/hcp\"; chown $HCP_UID:$HCP_UID \"\$1/var/lib/hcp\"; chmod 0700 \"\$1/var/lib/hcp\""
RECIPE="$SUITE essential $PACKAGES ${DPKG_OPTS[*]} $USER_HOOK"
KEY="$(printf '%s\n' "$RECIPE" | sha256sum | cut -c1-16)"
ROOTFS="$CACHE/rootfs-$KEY.tar"
BASE="localhost/hcp-base:$KEY"

ensure_tools() {
  local missing=()
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v podman >/dev/null || missing+=(podman)
  # crun, podman's default runtime, refuses to run on hosts with cgroups
  # in hybrid mode; runc is the fallback.
  command -v runc >/dev/null || missing+=(runc)
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    skip "${missing[*]} missing, and installing them needs root"
  fi
  log "installing ${missing[*]} from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || skip "cannot install ${missing[*]}"
}

build_rootfs() {
  if [ -f "$ROOTFS" ]; then
    log "rootfs cached: $ROOTFS"
    return 0
  fi
  local t0; t0="$(now)"
  mkdir -p "$CACHE"
  # Older tarballs of another recipe are of no further use.
  find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' ! -name "rootfs-$KEY.tar" -delete
  # mmdebstrap picks the output format by the name's extension: .tar.
  local partial="$CACHE/partial-$KEY.tar"
  log "making the Debian $SUITE rootfs (mmdebstrap: essential + $PACKAGES)"
  mmdebstrap --quiet --variant=essential --include="$PACKAGES" "${DPKG_OPTS[@]}" \
    --customize-hook="$USER_HOOK" \
    "$SUITE" "$partial" >&2
  mv "$partial" "$ROOTFS"
  log "rootfs made in $(since "$t0") s: $(du -h "$ROOTFS" | cut -f1)"
}

build_image() {
  for b in "${BINS[@]}"; do
    [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b is missing: build the workspace first (cargo build --workspace)" >&2; exit 1; }
  done
  local t0; t0="$(now)"
  if ! podman image exists "$BASE"; then
    podman import --quiet "$ROOTFS" "$BASE" >/dev/null
    log "base image $BASE imported from the rootfs"
  fi
  # The binaries without their debug sections (the symbols stay, so
  # backtraces still name functions).
  local staged; staged="$(mktemp -d)"
  trap 'rm -rf "$staged"' RETURN
  for b in "${BINS[@]}"; do
    strip --strip-debug -o "$staged/$b" "$BIN_DIR/$b" \
      || { echo "cannot strip $BIN_DIR/$b (is a build writing it?)" >&2; exit 1; }
  done
  local ctr; ctr="$(buildah from --quiet "$BASE")"
  buildah copy --quiet --chown 0:0 --chmod 0755 "$ctr" "$staged/" /usr/local/bin/ >/dev/null
  buildah config \
    --user "$HCP_UID:$HCP_UID" \
    --workingdir /var/lib/hcp \
    --env PATH=/usr/local/bin:/usr/bin:/bin \
    --port 50051 --port 8080 --port 9464 \
    --entrypoint '[]' \
    --cmd '["hcp-core", "--config", "/etc/hcp/core.toml"]' \
    --label org.opencontainers.image.title=hcp \
    --label org.opencontainers.image.description="HCP: core, gateway and providers (run one per container)" \
    --label org.opencontainers.image.revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    --label org.opencontainers.image.base.name="debian:$SUITE (mmdebstrap, recipe $KEY)" \
    "$ctr"
  local previous; previous="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
  buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
  # The image this build replaced would be left untagged: remove it (a
  # container still using it keeps it).
  if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
  fi
  local size; size="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
  log "image $IMAGE built in $(since "$t0") s"
  echo "image $IMAGE: $(numfmt --to=iec --suffix=B "$size") ($size bytes; rootfs $(du -h "$ROOTFS" | cut -f1) of it)"
}

# The podman options that let a container start here, or a skip. Sandboxes
# may refuse the rlimits podman sets by default, and crun cgroups in hybrid
# mode (runc copes).
GLOBAL=()
RUNOPTS=()
find_runtime() {
  local err="" c global opts
  for c in \
    "|" \
    "|--ulimit nofile=1024:1024 --ulimit nproc=1024:1024" \
    "--runtime runc|--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"; do
    read -r -a global <<<"${c%%|*}"
    read -r -a opts <<<"${c#*|}"
    if err="$(podman "${global[@]}" run --rm "${opts[@]}" "$IMAGE" hcp-core --version 2>&1)"; then
      GLOBAL=("${global[@]}")
      RUNOPTS=("${opts[@]}")
      log "containers run here${global[*]:+ with ${global[*]}}${opts[*]:+ ${opts[*]}}"
      return 0
    fi
  done
  # The image is built (that part fails CI when it fails); a machine that
  # cannot run containers at all is said so and skipped, also in CI.
  echo "SKIP running the container image: containers cannot run here: $(printf '%s' "$err" | tail -n 1)"
  exit 0
}
prun() { podman "${GLOBAL[@]}" run "${RUNOPTS[@]}" "$@"; }
pod() { podman "${GLOBAL[@]}" "$@"; }

test_image() {
  local t0; t0="$(now)"
  podman image exists "$IMAGE" || { echo "no image $IMAGE: run scripts/container.sh build" >&2; exit 1; }
  find_runtime
  for b in "${BINS[@]}"; do
    prun --rm "$IMAGE" "$b" --version >/dev/null || { echo "$b --version failed in the image" >&2; exit 1; }
  done
  [ "$(prun --rm "$IMAGE" id -u)" = "$HCP_UID" ] || { echo "the image does not run as uid $HCP_UID" >&2; exit 1; }
  prun --rm "$IMAGE" qemu-img --version >/dev/null
  prun --rm "$IMAGE" virsh --version >/dev/null
  log "every binary, qemu-img and virsh run as hcp ($HCP_UID)"

  local dir name="hcp-smoke-$$"
  dir="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: the values are this run's
  trap "podman rm -f -t 0 $name >/dev/null 2>&1 || true; rm -rf '$dir'" EXIT
  head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$dir/jwt-secret"
  head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$dir/secrets.key"
  cat >"$dir/core.toml" <<'EOF'
listen = "0.0.0.0:50051"
metrics_listen = "0.0.0.0:9464"
database_url = "sqlite:///var/lib/hcp/hcp.db?mode=rwc"
[auth]
hs256_secret_file = "/etc/hcp/jwt-secret"
[secrets]
key_file = "/etc/hcp/secrets.key"
EOF
  chown -R "$HCP_UID:$HCP_UID" "$dir"
  chmod 0600 "$dir/jwt-secret" "$dir/secrets.key"
  chmod 0700 "$dir"

  # Core refuses a secret its group or others may read, inside the image too.
  chmod 0644 "$dir/jwt-secret"
  local out
  if out="$(prun --rm -v "$dir:/etc/hcp:ro" "$IMAGE" 2>&1)"; then
    echo "core started with a jwt-secret of mode 0644" >&2
    exit 1
  fi
  case "$out" in
    *"open to its group or others (mode 0644)"*) log "core refuses a secret file of mode 0644: ok" ;;
    *) echo "core failed otherwise than refusing the 0644 secret: $out" >&2; exit 1 ;;
  esac
  chmod 0600 "$dir/jwt-secret"

  prun -d --name "$name" -p 127.0.0.1::9464 -p 127.0.0.1::50051 -v "$dir:/etc/hcp:ro" "$IMAGE" >/dev/null
  local metrics="" ready=""
  for _ in $(seq 1 300); do
    if [ -z "$metrics" ]; then
      metrics="$(pod port "$name" 9464/tcp 2>/dev/null | head -n 1 || true)"
    fi
    if [ -n "$metrics" ] && curl -fsS "http://$metrics/metrics" 2>/dev/null | grep -q '^# TYPE hcp_'; then
      ready=yes
      break
    fi
    [ "$(pod inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || break
    sleep 0.2
  done
  if [ -z "$ready" ]; then
    echo "core in the container did not answer /metrics on ${metrics:-(no port)}; its log:" >&2
    pod logs "$name" >&2 || true
    exit 1
  fi
  pod logs "$name" 2>/dev/null | grep -q '"hcp_ready":{"service":"core"' \
    || { echo "core announced no readiness" >&2; pod logs "$name" >&2; exit 1; }
  local grpc; grpc="$(pod port "$name" 50051/tcp | head -n 1)"
  (exec 3<>"/dev/tcp/${grpc%:*}/${grpc##*:}") 2>/dev/null \
    || { echo "core's gRPC port $grpc does not accept connections" >&2; exit 1; }
  log "core ran in the container as hcp: ready, /metrics on $metrics, gRPC on $grpc ($(since "$t0") s)"
  pod stop -t 10 "$name" >/dev/null
  [ "$(pod inspect -f '{{.State.ExitCode}}' "$name")" = 0 ] \
    || { echo "core did not stop cleanly on SIGTERM" >&2; pod logs "$name" >&2; exit 1; }
  log "core stopped on SIGTERM with status 0"
}

what="${1:-all}"
case "$what" in
  build | all)
    ensure_tools
    build_rootfs
    build_image
    [ "$what" = all ] && test_image
    ;;
  rootfs)
    ensure_tools
    build_rootfs
    ;;
  test)
    ensure_tools
    test_image
    ;;
  *)
    echo "usage: $0 [build|test|all|rootfs]" >&2
    exit 2
    ;;
esac
