#!/usr/bin/env bash
# Fetch a Debian 6.1 cloud kernel (and optionally its -dbg package) with
# apt-get download, and extract what hvprobe needs into artifacts/debian/:
#   vmlinuz        bzImage from the -unsigned package
#   config         the kernel config
#   vmlinux        ELF with DWARF, from the -dbg package   (with --dbg)
#   System.map     the real System.map, from the -dbg package (with --dbg;
#                  the one in the image package is a placeholder)
#   version        the ABI name, e.g. 6.1.0-54-cloud-amd64
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
if [ -z "${HVPROBE_KERNEL_ABI:-}" ]; then
  if ! apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' | grep -q .; then
    apt-get update -qq
  fi
  abi=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' \
        | awk '{print $1}' | sed -e 's/^linux-image-//' -e 's/-unsigned$//' | sort -V | tail -1)
else
  abi="$HVPROBE_KERNEL_ABI"
fi
[ -n "$abi" ] || { echo "fetch-kernel: no linux-image-6.1.0-*-cloud-amd64-unsigned package found" >&2; exit 1; }
echo "fetch-kernel: using $abi into $out"
work="$out/.work"; mkdir -p "$work"
cd "$work"
if [ ! -s "$out/vmlinuz" ] || [ "$(cat "$out/version" 2>/dev/null)" != "$abi" ]; then
  rm -f linux-image-"$abi"-unsigned_*.deb
  apt-get download "linux-image-$abi-unsigned" >/dev/null
  rm -rf x && mkdir x && dpkg-deb -x linux-image-"$abi"-unsigned_*.deb x
  cp x/boot/vmlinuz-"$abi" "$out/vmlinuz"
  cp x/boot/config-"$abi" "$out/config"
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
