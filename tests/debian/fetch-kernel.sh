#!/usr/bin/env bash
# Fetch a Debian 6.1 cloud kernel (and optionally its -dbg package) with
# apt-get download, and extract what hvprobe needs into artifacts/debian/:
#   vmlinuz        bzImage from the -unsigned package
#   config         the kernel config
#   vmlinux        ELF with DWARF, from the -dbg package   (with --dbg)
#   System.map     the real System.map, from the -dbg package (with --dbg;
#                  the one in the image package is a placeholder)
#   binfmt_misc.ko a module from the same -unsigned package (module tests)
#   version        the ABI name, e.g. 6.1.0-54-cloud-amd64
# What is already here is kept (no network needed). Otherwise the newest
# 6.1 cloud kernel is taken after an `apt-get update`: a machine's stale
# package lists can name a kernel the mirror no longer has.
# Nothing here is committed; artifacts/ is ignored by git.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${HVPROBE_DEBIAN_DIR:-$root/artifacts/debian}"
want_dbg=0
for a in "$@"; do
  case "$a" in
    --dbg) want_dbg=1 ;;
    *) echo "usage: $0 [--dbg]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
have() { [ -s "$out/vmlinuz" ] && [ -s "$out/binfmt_misc.ko" ] \
  && { [ "$want_dbg" = 0 ] || [ -s "$out/vmlinux" ]; } \
  && [ "$(cat "$out/version" 2>/dev/null)" = "$1" ] \
  && { [ "$want_dbg" = 0 ] || [ "$(cat "$out/version.dbg" 2>/dev/null)" = "$1" ]; }; }
if [ -n "${HVPROBE_KERNEL_ABI:-}" ]; then
  abi="$HVPROBE_KERNEL_ABI"
elif have "$(cat "$out/version" 2>/dev/null)"; then
  abi=$(cat "$out/version")
else
  apt-get update -qq
  abi=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' \
        | awk '{print $1}' | sed -e 's/^linux-image-//' -e 's/-unsigned$//' | sort -V | tail -1)
fi
echo "fetch-kernel: using $abi into $out"
work="$out/.work"; mkdir -p "$work"
cd "$work"
if [ ! -s "$out/vmlinuz" ] || [ ! -s "$out/binfmt_misc.ko" ] \
   || [ "$(cat "$out/version" 2>/dev/null)" != "$abi" ]; then
  rm -f linux-image-"$abi"-unsigned_*.deb "$out/version"
  apt-get download "linux-image-$abi-unsigned" >/dev/null
  rm -rf x && mkdir x && dpkg-deb -x linux-image-"$abi"-unsigned_*.deb x
  cp x/boot/vmlinuz-"$abi" "$out/vmlinuz"
  cp x/boot/config-"$abi" "$out/config"
  cp x/lib/modules/"$abi"/kernel/fs/binfmt_misc.ko "$out/binfmt_misc.ko"
  rm -rf x linux-image-"$abi"-unsigned_*.deb
  echo "$abi" > "$out/version"
fi
if [ "$want_dbg" = 1 ] && { [ ! -s "$out/vmlinux" ] || [ "$(cat "$out/version.dbg" 2>/dev/null)" != "$abi" ]; }; then
  rm -f linux-image-"$abi"-dbg_*.deb
  apt-get download "linux-image-$abi-dbg" >/dev/null
  # Only vmlinux and System.map are needed; module debug info is large.
  rm -rf x && mkdir x
  dpkg-deb --fsys-tarfile linux-image-"$abi"-dbg_*.deb \
    | tar -x -C x "./usr/lib/debug/boot/vmlinux-$abi" "./usr/lib/debug/boot/System.map-$abi"
  mv "x/usr/lib/debug/boot/System.map-$abi" "$out/System.map"
  mv "x/usr/lib/debug/boot/vmlinux-$abi" "$out/vmlinux"
  rm -rf x
  rm -f linux-image-"$abi"-dbg_*.deb
  echo "$abi" > "$out/version.dbg"
fi
ls -la "$out"
