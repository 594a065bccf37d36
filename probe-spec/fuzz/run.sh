#!/usr/bin/env bash
# Bounded fuzz run of the kprobe_events and filter parsers (plus resolution
# and evaluation of what parses). Usage: probe-spec/fuzz/run.sh [seconds]
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets a stable toolchain do it.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/parse
RUSTC_BOOTSTRAP=1 cargo fuzz run parse corpus/parse seeds/parse -- \
    -max_total_time="${1:-120}" -dict=parse.dict -max_len=256
