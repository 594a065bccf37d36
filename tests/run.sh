#!/usr/bin/env bash
# Run every hvprobe test. Fetches what the tests need first (nothing is
# committed): the Debian 6.1 cloud kernel with its vmlinux/System.map, and the
# Python gRPC client used by the independent-client test.
#
# Environment:
#   HVPROBE_REQUIRE_KVM=1     a missing /dev/kvm fails the KVM tests (CI sets it)
#   HVPROBE_REQUIRE_DEBIAN=1  missing Debian artifacts fail the real-kernel tests
#   HVPROBE_REQUIRE_PYTHON=1  a missing grpcio fails the Python client test
#   HVPROBE_SKIP_FETCH=1      do not download anything (nor build the Debian snapshot)
#   HVPROBE_DEBIAN_SNAPSHOT   a Debian snapshot to restore; by default the one
#                             tests/debian/snapshot.sh caches (built if missing:
#                             one Debian boot, minutes on an emulating KVM)
#   HVPROBE_DEBIAN_KASLR_SNAPSHOT  the same for the bzImage booted with KASLR
#                             (tests/debian/snapshot.sh --kaslr)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${HVPROBE_SKIP_FETCH:-0}" != 1 ]; then
  bash tests/debian/fetch-kernel.sh --dbg
  if ! python3 -c 'import grpc, grpc_reflection, google.protobuf' 2>/dev/null; then
    python3 -m pip install --quiet grpcio grpcio-reflection protobuf
  fi
  # The two cached Debian snapshots (each one boot when missing: minutes
  # here) are built side by side.
  snap_log="$(mktemp -d)"
  cargo build --release --quiet
  if [ -z "${HVPROBE_DEBIAN_SNAPSHOT:-}" ]; then
    bash tests/debian/snapshot.sh --print-dir >"$snap_log/default" &
    default_pid=$!
  fi
  if [ -z "${HVPROBE_DEBIAN_KASLR_SNAPSHOT:-}" ]; then
    bash tests/debian/snapshot.sh --print-dir --kaslr >"$snap_log/kaslr" &
    kaslr_pid=$!
  fi
  if [ -n "${default_pid:-}" ]; then
    wait "$default_pid"
    HVPROBE_DEBIAN_SNAPSHOT="$(cat "$snap_log/default")"
    export HVPROBE_DEBIAN_SNAPSHOT
  fi
  if [ -n "${kaslr_pid:-}" ]; then
    wait "$kaslr_pid"
    HVPROBE_DEBIAN_KASLR_SNAPSHOT="$(cat "$snap_log/kaslr")"
    export HVPROBE_DEBIAN_KASLR_SNAPSHOT
  fi
  rm -rf "$snap_log"
fi

# Release build: the DWARF tests read a 600 MB vmlinux and the KVM tests time
# guest runs; both are much faster optimised. --no-fail-fast: one failing
# test binary must not hide whether the others pass (the exit status is
# still non-zero).
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --release --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# cargo prints one result line per test binary (the last is usually an empty
# doc-test run); close with the totals.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
