#!/usr/bin/env bash
# Boot Debian's 6.1 cloud kernel (PVH entry of the -dbg vmlinux) with the
# busybox initramfs under hvprobe, and report how long /init took to run.
# On the project's emulating KVM this takes a long time (see README); on
# hardware KVM seconds. Usage: tests/debian/boot.sh [VCPUS] [MEMORY_MIB]
set -euo pipefail
cd "$(dirname "$0")/../.."
vcpus="${1:-1}"
mem="${2:-512}"
dir="${HVPROBE_DEBIAN_DIR:-artifacts/debian}"
[ -s "$dir/vmlinux" ] || bash tests/debian/fetch-kernel.sh --dbg
[ -s "$dir/initramfs.cpio.gz" ] || bash tests/debian/make-initramfs.sh
cargo build --release --quiet
# Steers around what the instruction-emulating KVM lacks (README: "Booting
# Debian's 6.1 cloud kernel"); the VMM completes popcnt/ldmxcsr/fxsave itself.
cmdline="console=ttyS0 earlyprintk=serial,ttyS0 noxsave nokaslr pci=off panic=-1 \
mitigations=off clearcpuid=129,137,141,147,148,153,308 cryptomgr.notests nowatchdog \
audit=0 tsc=reliable"
console="${HVPROBE_CONSOLE:-$dir/console.log}"
start=$(date +%s)
set +e
target/release/hvprobe run --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio.gz" \
  --memory "$mem" --vcpus "$vcpus" --serial "$console" --cmdline "$cmdline" \
  --listen "unix:${TMPDIR:-/tmp}/hvprobe-debian.sock"
rc=$?
set -e
secs=$(( $(date +%s) - start ))
if grep -q HVPROBE-INIT-REACHED "$console"; then
  echo "debian boot: /init reached; run ended after ${secs}s (exit $rc); console: $console"
else
  echo "debian boot: /init NOT reached after ${secs}s (exit $rc); last lines of $console:"
  tail -5 "$console"
  exit 1
fi
