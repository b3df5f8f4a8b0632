#!/usr/bin/env bash
# The real-hypervisor test bed for the libvirt provider: installs libvirt,
# QEMU, genisoimage and the OpenSSH client from Debian packages when missing, starts virtlogd and
# libvirtd when they are not running (there is no systemd here), and builds
# the tiny test guest (a Debian kernel plus a busybox initramfs) into a cache
# directory. Source this file, then call ensure_libvirt / ensure_tiny_guest,
# or run it: `bash scripts/testbed.sh` does both and prints the guest's path.
#
# Guests run under QEMU's TCG emulation (domain type 'qemu'): on these
# machines /dev/kvm is a software KVM in which Linux guests never boot.

testbed_log() { echo "[testbed] $*" >&2; }

# Where the tiny guest is built; reused across runs when its inputs match.
HCP_TESTBED_DIR=${HCP_TESTBED_DIR:-/var/tmp/hcp-testbed}

# apt_install and the log helpers.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/services.sh"

ensure_libvirt_packages() {
  local missing=()
  command -v libvirtd >/dev/null 2>&1 || [ -x /usr/sbin/libvirtd ] || missing+=(libvirt-daemon-system)
  pkg-config --exists libvirt 2>/dev/null || missing+=(libvirt-dev pkg-config)
  command -v genisoimage >/dev/null 2>&1 || missing+=(genisoimage)
  command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
  # The self-booting test disk: SYSLINUX installed through mtools on FAT.
  { command -v syslinux && command -v mcopy; } >/dev/null 2>&1 || missing+=(syslinux syslinux-common mtools)
  command -v mkfs.fat >/dev/null 2>&1 || missing+=(dosfstools)
  # ssh and ssh-keygen for the test that logs into a guest with a key pair.
  { command -v ssh && command -v ssh-keygen; } >/dev/null 2>&1 || missing+=(openssh-client)
  if [ ${#missing[@]} -gt 0 ]; then
    testbed_log "installing ${missing[*]}"
    apt_install "${missing[@]}" || return 1
  fi
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1; then
    # qemu-system-x86 pins qemu-utils/qemu-block-extra to its own version;
    # the machine may carry a newer qemu-utils (which installing libvirt then
    # removes), so install the matching one.
    local version
    version=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
    testbed_log "installing qemu-system-x86 $version"
    apt_install --allow-downgrades "qemu-utils=$version" "qemu-block-extra=$version" \
      "qemu-system-x86=$version" || return 1
  fi
}

ensure_libvirt_daemons() {
  if [ ! -S /run/libvirt/virtlogd-sock ] || ! kill -0 "$(cat /run/virtlogd.pid 2>/dev/null)" 2>/dev/null; then
    testbed_log "starting virtlogd"
    /usr/sbin/virtlogd -d || return 1
  fi
  if [ ! -S /run/libvirt/libvirt-sock ] || ! kill -0 "$(cat /run/libvirtd.pid 2>/dev/null)" 2>/dev/null; then
    testbed_log "starting libvirtd"
    /usr/sbin/libvirtd -d || return 1
  fi
  for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  testbed_log "libvirtd did not answer"; return 1
}

ensure_libvirt() {
  ensure_libvirt_packages && ensure_libvirt_daemons && ensure_nat_network
}

# libvirt's "default" NAT network (a bridge with dnsmasq serving DHCP), for
# the test of addresses from DHCP leases. Not fatal: without it that test
# says why it skips.
ensure_nat_network() {
  local info
  info=$(virsh -c qemu:///system net-info default 2>/dev/null) || {
    testbed_log "libvirt has no 'default' network; the DHCP address test will skip"; return 0; }
  if ! grep -q '^Active: *yes' <<<"$info"; then
    testbed_log "starting libvirt's default NAT network"
    virsh -c qemu:///system net-start default >/dev/null 2>&1 ||
      testbed_log "cannot start libvirt's default network; the DHCP address test will skip"
  fi
  return 0
}

# Builds $HCP_TESTBED_DIR/guest/{vmlinux,initrd.gz,base.qcow2} and the
# self-booting disk boot.raw and boot.qcow2 (SYSLINUX, the same kernel and
# initramfs). The kernel
# is Debian's current linux-image-amd64 target; busybox comes from
# busybox-static. Nothing is installed on the host.
ensure_tiny_guest() {
  local out="$HCP_TESTBED_DIR/guest"
  local script; script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tiny-guest.sh"
  local stamp; stamp=$(sha256sum "$script" | cut -c1-16)
  if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -s "$out/vmlinux" ] &&
    [ -s "$out/boot.qcow2" ]; then
    return 0
  fi
  testbed_log "building the tiny guest in $out"
  OUT="$out" WORKDIR="$HCP_TESTBED_DIR/build" sh "$script" >&2 || return 1
  echo "$stamp" > "$out/stamp"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_libvirt
  ensure_tiny_guest
  echo "$HCP_TESTBED_DIR/guest"
fi
