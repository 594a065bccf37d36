#!/usr/bin/env bash
# Boot Debian's 6.1 cloud kernel once to the console loop of
# initramfs-console.cpio, snapshot it there (`hvprobe snapshot --stop`)
# and cache the snapshot for this machine, keyed by the kernel version,
# hvprobe's snapshot format and the /init script. Later runs restore it in
# well under a second instead of booting for minutes; a missing cache is
# rebuilt (one boot: minutes on this project's emulating KVM).
#
# Usage: tests/debian/snapshot.sh [--print-dir] [--rebuild] [--kaslr]
#   prints the snapshot directory (with --print-dir: only that, on stdout).
#   --kaslr: boot the bzImage (vmlinuz) the way distributions do, KASLR on,
#   1 vCPU; a separate cache (debian-<abi>-kaslr-snap-...).
# Cache: ${HVPROBE_CACHE:-~/.cache/hvprobe}/debian-<abi>-snap-v<format>-<hash>/
#   vmlinux      the kernel's ELF with DWARF (the default snapshot boots it
#                through PVH; for --kaslr, vmlinuz is beside it and booted)
#   snap/        the snapshot (manifest.json, memory.raw, state.json, ...)
#   console.log  the boot's console
set -euo pipefail
cd "$(dirname "$0")/../.."
quiet=0 rebuild=0 kaslr=0
for a in "$@"; do
  case "$a" in
    --print-dir) quiet=1 ;;
    --rebuild) rebuild=1 ;;
    --kaslr) kaslr=1 ;;
    *) echo "usage: $0 [--print-dir] [--rebuild] [--kaslr]" >&2; exit 2 ;;
  esac
done
log() { if [ "$quiet" = 1 ]; then echo "$*" >&2; else echo "$*"; fi; }
dir="${HVPROBE_DEBIAN_DIR:-artifacts/debian}"
if [ ! -s "$dir/vmlinux" ]; then
  bash tests/debian/fetch-kernel.sh --dbg >&2
fi
abi=$(cat "$dir/version.dbg")
fmt=$(sed -n 's/^pub const FORMAT_VERSION: u32 = \([0-9]*\);/\1/p' vmm/src/snapshot.rs)
cmdline="console=ttyS0 earlyprintk=serial,ttyS0 noxsave nokaslr pci=off panic=-1 \
mitigations=off clearcpuid=129,137,141,147,148,153,308 cryptomgr.notests nowatchdog \
audit=0 tsc=reliable"
vcpus=2 mem=512 kind=snap
# An early probe on __init code (tests/debian_init_text.rs): it fires once
# during boot, is [GONE] once the guest frees its init text, and deleting it
# must write nothing there. Its listing is kept beside the snapshot.
early="p:hvinit/populate_rootfs populate_rootfs"
if [ "$kaslr" = 1 ]; then
  cmdline="${cmdline/ nokaslr/}" vcpus=1 kind=kaslr-snap early=""
fi
# Keyed by what the guest runs (comments do not count), how it boots, and the
# CPU the VMM shows it (a guest decides its paravirtual features at boot).
hash=$( { grep -v '^[[:space:]]*#' tests/debian/make-initramfs.sh; echo "$cmdline $vcpus $mem${early:+ $early}";
          grep -v '^[[:space:]]*//' vmm/src/cpu.rs; } \
  | sha256sum | cut -c1-12)
cache="${HVPROBE_CACHE:-$HOME/.cache/hvprobe}/debian-$abi-$kind-v$fmt-$hash"
if [ "$rebuild" = 0 ] && [ -s "$cache/snap/manifest.json" ]; then
  log "debian snapshot: cached at $cache/snap"
  [ "$quiet" = 1 ] && echo "$cache/snap"
  exit 0
fi
cargo build --release --quiet
# tests/run.sh builds both snapshots at once: one initramfs build at a time.
flock "$dir/.initramfs.lock" bash tests/debian/make-initramfs.sh >/dev/null
# The snapshot records the kernel path: the kernel lives in the cache from
# the start, the snapshot is written beside it and renamed into place last.
rm -rf "$cache" && mkdir -p "$cache"
ln -f "$dir/vmlinux" "$cache/vmlinux" 2>/dev/null || cp "$dir/vmlinux" "$cache/vmlinux"
boot="$cache/vmlinux"
if [ "$kaslr" = 1 ]; then
  cp "$dir/vmlinuz" "$cache/vmlinuz"
  boot="$cache/vmlinuz"
fi
build="$cache/build.$$"
mkdir -p "$build"
trap 'rm -rf "$build"' EXIT
sock="$build/api.sock"
console="$build/console.log"
start=$(date +%s)
log "debian snapshot: booting $abi ($vcpus vCPU, $mem MiB) to the console loop; minutes here"
early_args=()
[ -n "$early" ] && early_args=(--probe "$early")
target/release/hvprobe run --kernel "$boot" \
  --initrd "$dir/initramfs-console.cpio" --memory "$mem" --vcpus "$vcpus" \
  --serial "$console" --cmdline "$cmdline" --listen "unix:$sock" "${early_args[@]}" \
  >"$build/hvprobe.log" 2>&1 &
pid=$!
deadline=$(( start + ${HVPROBE_DEBIAN_BOOT_TIMEOUT:-2700} ))
until grep -q "HVPROBE-CONSOLE-READY" "$console" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then
    log "debian snapshot: hvprobe exited before the console loop; last lines:"
    tail -n 20 "$console" "$build/hvprobe.log" >&2
    exit 1
  fi
  if [ "$(date +%s)" -gt "$deadline" ]; then
    log "debian snapshot: no HVPROBE-CONSOLE-READY after $(( $(date +%s) - start )) s"
    kill "$pid"; wait "$pid" || true
    tail -n 20 "$console" >&2
    exit 1
  fi
  sleep 5
done
# Let the shell settle into its read.
sleep 5
ready=$(( $(date +%s) - start ))
if [ -n "$early" ]; then
  target/release/hvprobe probe --server "unix:$sock" ls --json >"$build/init-probe.json"
  # Deleting a [GONE] probe must work and write nothing into the freed text.
  target/release/hvprobe probe --server "unix:$sock" rm hvinit/populate_rootfs >&2
fi
target/release/hvprobe snapshot --server "unix:$sock" "$build/snap" --stop >&2
wait "$pid" || true
mv "$console" "$cache/console.log"
[ -n "$early" ] && mv "$build/init-probe.json" "$cache/init-probe.json"
mv "$build/snap" "$cache/snap"
rm -rf "$build"
trap - EXIT
log "debian snapshot: console loop after $(awk "BEGIN{printf \"%.1f\", $ready/60}") min; cached at $cache/snap"
[ "$quiet" = 1 ] && echo "$cache/snap"
exit 0
