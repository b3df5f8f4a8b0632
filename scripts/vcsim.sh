#!/usr/bin/env bash
# The vSphere test bed: VMware's vCenter simulator (vcsim), built from the
# govmomi 0.24.2 simulator library that Debian packages
# (golang-github-vmware-govmomi-dev) with Debian's Go, plus HCP's own
# main.go and additions (providers/vsphere/vcsim). Debian ships the library
# but not the vcsim command; proxy.golang.org is not needed. Source this
# file and call ensure_vcsim, or run it: `bash scripts/vcsim.sh` builds and
# prints the binary's path. The tests find it through HCP_VCSIM.

HCP_TESTBED_DIR=${HCP_TESTBED_DIR:-/var/tmp/hcp-testbed}

. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/services.sh"

ensure_vcsim() {
  local src gocode out stamp want
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")/../providers/vsphere/vcsim" && pwd)"
  gocode=/usr/share/gocode/src/github.com/vmware/govmomi/simulator
  local missing=()
  command -v go >/dev/null 2>&1 || missing+=(golang-go)
  [ -d "$gocode" ] || missing+=(golang-github-vmware-govmomi-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}" || return 1
  fi
  out="$HCP_TESTBED_DIR/vcsim"
  mkdir -p "$out"
  # Rebuilt when our sources or the library change.
  want="$( (cat "$src/main.go" "$src/overlay/hcp_additions.go" "${BASH_SOURCE[0]}"; dpkg-query -W golang-github-vmware-govmomi-dev golang-go 2>/dev/null) | sha256sum | cut -c1-16)"
  stamp="$out/hcp-vcsim.$want"
  if [ ! -x "$stamp" ]; then
    log "building vcsim (govmomi $(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev))"
    # One fix of the library, made at build time in a copy outside the
    # repository: removing the current snapshot when it is a root and other
    # snapshots remain sets currentSnapshot to a nil parent, which panics
    # in 0.24.2 (the request dies half-done). Leave currentSnapshot alone
    # then, as the later upstream versions do not panic either.
    sed 's/changes = append(changes, types.PropertyChange{Name: "snapshot.currentSnapshot", Val: parent})/if parent != nil { & }/' \
      "$gocode/snapshot.go" >"$out/snapshot.go"
    grep -q 'if parent != nil {' "$out/snapshot.go" || { log "the snapshot.go fix no longer applies"; return 1; }
    printf '{"Replace":{"%s/hcp_additions.go":"%s/overlay/hcp_additions.go","%s/snapshot.go":"%s/snapshot.go"}}\n' \
      "$gocode" "$src" "$gocode" "$out" >"$out/overlay.json"
    rm -f "$out"/hcp-vcsim.*
    (cd "$src" && GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="$out/gocache" \
      go build -overlay "$out/overlay.json" -o "$stamp.tmp" .) || return 1
    mv "$stamp.tmp" "$stamp"
  fi
  ln -sf "$stamp" "$out/hcp-vcsim"
  export HCP_VCSIM="$out/hcp-vcsim"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_vcsim
  echo "$HCP_VCSIM"
fi
