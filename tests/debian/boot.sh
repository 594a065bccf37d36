#!/usr/bin/env bash
# Boot Debian's 6.1 cloud kernel (PVH entry of the -dbg vmlinux) with the
# busybox initramfs under hvprobe; reports the minutes to "Run /init" and to
# each marker of the workload, and exits 0 only if both markers were reached
# and the guest powered off.
# On the project's emulating KVM this takes a long time (see README); on
# hardware KVM seconds. Usage: tests/debian/boot.sh [VCPUS] [MEMORY_MIB]
set -euo pipefail
cd "$(dirname "$0")/../.."
vcpus="${1:-1}"
mem="${2:-512}"
dir="${HVPROBE_DEBIAN_DIR:-artifacts/debian}"
[ -s "$dir/vmlinux" ] || bash tests/debian/fetch-kernel.sh --dbg
bash tests/debian/make-initramfs.sh >/dev/null   # cheap; keeps the /init workload current
cargo build --release --quiet
# Steers around what the instruction-emulating KVM lacks (README: "Booting
# Debian's 6.1 cloud kernel"); the VMM completes popcnt/ldmxcsr/fxsave itself.
cmdline="console=ttyS0 earlyprintk=serial,ttyS0 noxsave nokaslr pci=off panic=-1 \
mitigations=off clearcpuid=129,137,141,147,148,153,308 cryptomgr.notests nowatchdog \
audit=0 tsc=reliable"
console="${HVPROBE_CONSOLE:-$dir/console.log}"
: > "$console"
start=$(date +%s)
target/release/hvprobe run --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio.gz" \
  --memory "$mem" --vcpus "$vcpus" --serial "$console" --cmdline "$cmdline" \
  --listen "unix:${TMPDIR:-/tmp}/hvprobe-debian.sock" &
pid=$!
# Minutes from start to each milestone, as the console shows them.
declare -A seen=()
report() {
  for m in "Run /init" HVPROBE-INIT-REACHED HVPROBE-WORKLOAD-START HVPROBE-WORKLOAD-DONE; do
    if [ -z "${seen[$m]:-}" ] && grep -q -- "$m" "$console"; then
      seen[$m]=$(( $(date +%s) - start ))
      echo "debian boot: '$m' after $(awk "BEGIN{printf \"%.1f\", ${seen[$m]}/60}") min"
    fi
  done
}
while kill -0 "$pid" 2>/dev/null; do report; sleep 5; done
set +e
wait "$pid"
rc=$?
set -e
report
secs=$(( $(date +%s) - start ))
grep -E "HVPROBE-|hvopen|hvprobe-guest" "$console" | sed 's/^/  console: /' | head -40
if [ -n "${seen[HVPROBE-INIT-REACHED]:-}" ] && [ -n "${seen[HVPROBE-WORKLOAD-DONE]:-}" ] && [ "$rc" = 0 ]; then
  echo "debian boot: both markers reached, guest powered off; run ended after ${secs}s"
else
  echo "debian boot: markers or power-off missing after ${secs}s (exit $rc); last lines of $console:"
  tail -5 "$console"
  exit 1
fi
