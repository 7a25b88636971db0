#!/usr/bin/env bash
# Builds the vmferry test guest: Debian's cloud kernel and an initramfs whose /init is init.c.
#   usage: bash guest/build.sh OUTDIR
# Idempotent: the kernel is fetched once, the initramfs is rebuilt only when init.c (or this
# script, or a module) is newer than it.
# The cloud kernel has the ACPI power button and evdev as modules; they are taken from the same
# package as vmlinuz (OUTDIR/modules) and /init loads them, so the guest can honour a power-off.
# virtio_blk and its transport are modules too: /init loads them when it has a disk to write.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

log() { echo "guest: $*" >&2; }
tmpdirs=()
trap 'rm -rf "${tmpdirs[@]}"' EXIT
# The download goes to a private temp dir the _apt sandbox user cannot write to.
apt_dl=(apt-get download -qq -o APT::Sandbox::User=root)

# --- kernel -----------------------------------------------------------------------------
build_kernel() {
  local pkg tmp deb
  # The meta package only names the versioned image; resolving it keeps us on the current ABI.
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
  if [ -z "$pkg" ]; then
    log "apt has no linux-image-cloud-amd64; running apt-get update"
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 |
      awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$pkg" ] || { log "cannot resolve the package behind linux-image-cloud-amd64"; exit 1; }
  tmp=$(mktemp -d "$out/.kernel.XXXXXX")
  tmpdirs+=("$tmp")
  log "downloading $pkg"
  if ! (cd "$tmp" && "${apt_dl[@]}" "$pkg" >/dev/null); then
    # A stale package index points at a file the mirror no longer has.
    log "download failed; running apt-get update and retrying"
    apt-get update -qq
    (cd "$tmp" && "${apt_dl[@]}" "$pkg" >/dev/null)
  fi
  deb=$(ls "$tmp"/*.deb | head -n1)
  dpkg-deb -x "$deb" "$tmp/root"
  local img
  img=$(ls "$tmp"/root/boot/vmlinuz-* | head -n1)
  # Modules must come from the very package the kernel came from (vermagic), so both are copied.
  rm -rf "$out/modules.tmp"
  mkdir "$out/modules.tmp"
  for m in "${modules[@]}"; do
    local ko
    ko=$(find "$tmp/root/lib/modules" -name "$m.ko" | head -n1)
    [ -n "$ko" ] || { log "$m.ko is not in $pkg"; exit 1; }
    cp "$ko" "$out/modules.tmp/"
  done
  cp "$img" "$out/vmlinuz.tmp"
  rm -rf "$out/modules"
  mv "$out/modules.tmp" "$out/modules"
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  log "kernel: $(basename "$img") with ${modules[*]}"
}

# Loaded by /init: evdev first, so the button's input device gets its event node; the virtio
# modules (init.c's load_disk_modules) in dependency order, virtio_blk last.
modules=(evdev button virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  virtio_blk)
have_modules() {
  local m
  for m in "${modules[@]}"; do [ -s "$out/modules/$m.ko" ] || return 1; done
}

if [ ! -s "$out/vmlinuz" ] || ! have_modules; then
  build_kernel
fi

# --- initramfs ----------------------------------------------------------------------------
initrd="$out/initramfs.cpio.gz"
if [ ! -s "$initrd" ] || [ "$here/init.c" -nt "$initrd" ] || [ "$here/build.sh" -nt "$initrd" ] ||
  [ "$out/modules" -nt "$initrd" ]; then
  tmp=$(mktemp -d "$out/.initramfs.XXXXXX")
  tmpdirs+=("$tmp")
  mkdir -p "$tmp/root/proc" "$tmp/root/dev" "$tmp/root/sys" "$tmp/root/lib/modules"
  for m in "${modules[@]}"; do cp "$out/modules/$m.ko" "$tmp/root/lib/modules/"; done
  command -v gcc >/dev/null || { log "gcc is missing: apt-get install gcc libc6-dev"; exit 1; }
  gcc -static -O2 -Wall -Wextra -Werror -o "$tmp/root/init" "$here/init.c"
  strip "$tmp/root/init"
  # The kernel opens /dev/console for init's stdio before init runs; devtmpfs comes later.
  mknod -m 600 "$tmp/root/dev/console" c 5 1 2>/dev/null || true
  (cd "$tmp/root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner 0:0 | gzip -9 -n) > "$tmp/initramfs.cpio.gz"
  mv "$tmp/initramfs.cpio.gz" "$initrd"
  log "initramfs: $initrd ($(stat -c %s "$initrd") bytes)"
fi
