#!/bin/sh
# Builds HCP's tiny test guest from Debian packages only, without installing
# anything: Debian's kernel (as an uncompressed ELF vmlinux, which QEMU boots
# through its PVH entry point and so skips the slow xz decompressor under TCG)
# and a busybox initramfs whose init
#   - loads the virtio, cdrom and ACPI button modules,
#   - powers the guest off when the ACPI power button is pressed,
#   - reads a NoCloud seed (an ISO labelled `cidata`): hostname from
#     meta-data `local-hostname` or user-data `hostname:`, the meta-data's
#     `public-keys` into /root/.ssh/authorized_keys, runs user-data that
#     starts with `#!`,
#   - starts an SSH server (Debian's dropbear-bin with the dynamic loader and
#     the libraries it needs, host keys made at first use) on port 22; the
#     guest takes an address only when its user data runs
#     `udhcpc -s /etc/udhcpc.sh`,
#   - prints `HCP-GUEST-READY hostname=<name>` on the serial port and writes it
#     into the VGA text buffer (the kernel has no VGA console under PVH boot),
#   - leaves a root shell on ttyS0.
# Also writes an empty 1 GiB qcow2 base disk for overlays, and a self-booting
# disk (boot.raw, boot.qcow2): the same kernel (compressed, as a bootloader
# loads it) and initramfs on a FAT "superfloppy" (no partition table; the
# BIOS runs the FAT boot sector) with SYSLINUX from Debian's syslinux and
# mtools packages. SYSLINUX rather than extlinux: it installs into an image
# file through mtools, so nothing is mounted and no loop device or root is
# needed. Its command line is the direct boot's (serial console on ttyS0),
# so the guest behaves the same: READY banner, NoCloud user data.
# Environment: OUT (results), WORKDIR (scratch).
set -eu
OUT=${OUT:?}
WORKDIR=${WORKDIR:?}
mkdir -p "$OUT" "$WORKDIR/debs"

kpkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1)
[ -n "$kpkg" ] || { echo "cannot tell which kernel linux-image-amd64 depends on" >&2; exit 1; }
kver=${kpkg#linux-image-}
cd "$WORKDIR/debs"
ls "${kpkg}"_*.deb >/dev/null 2>&1 || apt-get download "$kpkg"
ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download busybox-static
# dropbear and what it links to (libc6 brings the dynamic loader).
ssh_pkgs="dropbear-bin libc6 libcrypt1 libtomcrypt1 libtommath1 libgmp10 zlib1g"
for p in $ssh_pkgs; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download "$p"; done

rm -rf "$WORKDIR/kernel" "$WORKDIR/busybox" "$WORKDIR/root" "$WORKDIR/ssh"
dpkg-deb -x "${kpkg}"_*.deb "$WORKDIR/kernel"
dpkg-deb -x busybox-static_*.deb "$WORKDIR/busybox"
for p in $ssh_pkgs; do dpkg-deb -x "${p}"_*.deb "$WORKDIR/ssh"; done
bb="$WORKDIR/busybox/bin/busybox"
moddir="$WORKDIR/kernel/lib/modules/$kver"
"$bb" depmod -b "$WORKDIR/kernel" "$kver"

root="$WORKDIR/root"
for d in bin proc sys dev run tmp seed etc/acpi/PWRF etc/dropbear root "lib/modules/$kver" lib64 \
  lib/x86_64-linux-gnu; do mkdir -p "$root/$d"; done
chmod 700 "$root/root"
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done

# dropbear, the dynamic loader and every library it needs (NEEDED entries,
# followed), from the extracted packages only.
cp "$WORKDIR/ssh/usr/sbin/dropbear" "$root/bin/dropbear"
ssh_lib() {
  for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
    [ -e "$WORKDIR/ssh/$dir/$1" ] && { echo "$WORKDIR/ssh/$dir/$1"; return 0; }
  done
  echo "no $1 in $ssh_pkgs" >&2; return 1
}
copy_needed() {
  for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    [ -e "$root/lib/x86_64-linux-gnu/$lib" ] && continue
    src=$(ssh_lib "$lib") || exit 1
    cp -L "$src" "$root/lib/x86_64-linux-gnu/$lib"
    copy_needed "$root/lib/x86_64-linux-gnu/$lib"
  done
}
copy_needed "$root/bin/dropbear"
cp -L "$(ssh_lib ld-linux-x86-64.so.2)" "$root/lib64/ld-linux-x86-64.so.2"
cp "$root/lib64/ld-linux-x86-64.so.2" "$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
printf '/bin/sh\n' > "$root/etc/shells"

# udhcpc's script: configures the leased address and the default route.
cat > "$root/etc/udhcpc.sh" <<'DHCP'
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "HCP-GUEST: address $ip on $interface" > /dev/ttyS0 ;;
esac
exit 0
DHCP
chmod 755 "$root/etc/udhcpc.sh"

# The wanted modules and everything they depend on, with a matching modules.dep.
deps="$root/lib/modules/$kver/modules.dep"
: > "$deps"
copy_module() {
  entry=$(grep -E "(^|/)$1\.ko(\.xz)?:" "$moddir/modules.dep" | head -n 1)
  [ -n "$entry" ] || { echo "kernel $kver has no module $1" >&2; exit 1; }
  for file in ${entry%%:*} ${entry#*:}; do
    grep -q "^$file:" "$deps" && continue
    mkdir -p "$root/lib/modules/$kver/${file%/*}"
    cp "$moddir/$file" "$root/lib/modules/$kver/$file"
    grep "^$file:" "$moddir/modules.dep" >> "$deps"
  done
}
modules="virtio_pci virtio_blk virtio_net button evdev isofs sr_mod ata_piix"
for m in $modules; do copy_module "$m"; done

cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin
exec /bin/init
INIT
chmod 755 "$root/init"

cat > "$root/etc/inittab" <<'TAB'
::sysinit:/etc/boot.sh
ttyS0::respawn:-/bin/sh
::shutdown:/bin/sync
TAB

cat > "$root/etc/acpi/PWRF/00000080" <<'PWR'
#!/bin/sh
echo "HCP-GUEST: power button, powering off" > /dev/ttyS0
poweroff -f
PWR
chmod 755 "$root/etc/acpi/PWRF/00000080"

cat > "$root/etc/boot.sh" <<BOOT
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $modules; do modprobe \$m 2>/dev/null; done
# Started before the banner so that a power button pressed right after it is seen.
acpid -c /etc/acpi -l /dev/null
hostname guest
seed=""
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  seed=\$(findfs LABEL=cidata 2>/dev/null) && break
  usleep 100000
done
if [ -n "\$seed" ] && mount -t iso9660 -o ro "\$seed" /seed; then
  name=\$(sed -n 's/^local-hostname:[[:space:]]*//p' /seed/meta-data 2>/dev/null | head -n 1)
  from_user=\$(sed -n 's/^hostname:[[:space:]]*//p' /seed/user-data 2>/dev/null | head -n 1)
  [ -n "\$from_user" ] && name=\$from_user
  [ -n "\$name" ] && hostname "\$name"
  # public-keys: one double-quoted OpenSSH line per item (hcp-nocloud
  # writes them so; JSON escapes of quote and backslash undone).
  keys=\$(sed -n '/^public-keys:/,/^[^ ]/s/^  - "\\(.*\\)"\$/\\1/p' /seed/meta-data 2>/dev/null |
    sed 's/\\\\"/"/g; s/\\\\\\\\/\\\\/g')
  if [ -n "\$keys" ]; then
    mkdir -p /root/.ssh && chmod 700 /root/.ssh
    printf '%s\\n' "\$keys" > /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
    echo "HCP-GUEST: \$(grep -c . /root/.ssh/authorized_keys) ssh keys installed"
  fi
  echo "HCP-GUEST: seed \$seed instance-id=\$(sed -n 's/^instance-id:[[:space:]]*//p' /seed/meta-data)"
  case \$(head -c 2 /seed/user-data 2>/dev/null) in '#!') sh /seed/user-data ;; esac
else
  echo "HCP-GUEST: no seed"
fi
# The SSH server: public keys only, host keys made at the first connection.
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
dropbear -R -s -E -p 22 -P /run/dropbear.pid 2>/dev/ttyS0 &&
  echo "HCP-GUEST: ssh server on port 22"
banner="HCP-GUEST-READY hostname=\$(hostname) kernel=\$(uname -r)"
echo "\$banner"
# Booted through PVH the kernel has no VGA console, so the banner is also
# written into the VGA text buffer (row 12, white on blue) for the console.
addr=\$((0xB8000 + 12 * 160))
printf '%s' "\$banner" | od -An -tu1 -v | tr -s ' ' '\\n' | while read -r c; do
  [ -n "\$c" ] || continue
  devmem \$addr 16 \$((0x1F00 + c)) 2>/dev/null
  addr=\$((addr + 2))
done
BOOT
chmod 755 "$root/etc/boot.sh"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"

(cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null) | gzip -1 > "$OUT/initrd.gz"
vmlinuz="$WORKDIR/kernel/boot/vmlinuz-$kver"
offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1)
[ -n "$offset" ] || { echo "no xz payload in $vmlinuz" >&2; exit 1; }
tail -c +$((offset + 1)) "$vmlinuz" | xz -dc > "$OUT/vmlinux" 2>/dev/null || true
[ -s "$OUT/vmlinux" ] || { echo "could not extract vmlinux" >&2; exit 1; }
rm -f "$OUT/base.qcow2"
qemu-img create -q -f qcow2 "$OUT/base.qcow2" 1G

# The self-booting disk: FAT sized to its files plus 4 MiB, whole MiB.
boot="$WORKDIR/boot.raw"
rm -f "$boot" "$OUT/boot.raw" "$OUT/boot.qcow2"
cat > "$WORKDIR/syslinux.cfg" <<'CFG'
DEFAULT hcp
PROMPT 0
TIMEOUT 0
LABEL hcp
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=tty0 console=ttyS0 panic=-1 quiet
CFG
files_kib=$(( ($(stat -c %s "$vmlinuz") + $(stat -c %s "$OUT/initrd.gz")) / 1024 ))
boot_mib=$(( files_kib / 1024 + 5 ))
mkfs.fat -C -n HCPBOOT "$boot" $(( boot_mib * 1024 )) >/dev/null
syslinux --install "$boot"
mcopy -i "$boot" "$vmlinuz" ::vmlinuz
mcopy -i "$boot" "$OUT/initrd.gz" ::initrd.gz
mcopy -i "$boot" "$WORKDIR/syslinux.cfg" ::syslinux.cfg
mv "$boot" "$OUT/boot.raw"
qemu-img convert -q -f raw -O qcow2 "$OUT/boot.raw" "$OUT/boot.qcow2"
chmod 644 "$OUT"/*
echo "tiny guest for kernel $kver in $OUT" >&2
