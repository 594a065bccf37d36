#!/usr/bin/env bash
# The documented long fuzz run (issue 14): every target, one at a time, to
# RUNS inputs (default 10 M) or CAP seconds (default 600), whichever comes
# first, each with its own corpus; then a minimized copy of each corpus into
# the committed corpus-min/ of its fuzz crate. Logs go to fuzz/logs/.
#
# usage: fuzz/run-long.sh [TARGET...]   (default: all six)
#   targets: parse system_map kallsyms elf dwarf rpc
#   env: RUNS (10000000), CAP (600 s per target)
#
# Build: the one stable toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz's
# -Z flags), no sanitizer (-s none: safe Rust, and ASan would cost ~3x on
# two shared cores), debug assertions on (-a: overflow checks panic), one
# build job, one fuzzer process (libFuzzer's default: no -jobs/-workers).
# guest-symbols' seeds need gcc and the test guest:
#   cargo build --release -p test-guest, then make-seeds.py (done here).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-10000000}
CAP=${CAP:-600}
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=1
mkdir -p "$root/fuzz/logs"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(parse system_map kallsyms elf dwarf rpc)

dir_of() {
    case $1 in
        parse) echo probe-spec/fuzz ;;
        rpc) echo service/fuzz ;;
        *) echo guest-symbols/fuzz ;;
    esac
}

guest_seeds() {
    local d=$root/guest-symbols/fuzz
    [ -d "$d/corpus/elf" ] && return
    (cd "$root" && cargo build -q --release -p test-guest)
    local out
    out=$(ls -d "${CARGO_TARGET_DIR:-$root/target}"/release/build/test-guest-*/out | head -1)
    gcc -O2 -g -mcmodel=kernel -fno-pic -fno-pie -no-pie -mno-red-zone -ffreestanding \
        -nostdlib -static -fno-asynchronous-unwind-tables -Wl,-Ttext=0xffffffff81000000 \
        -Wl,--build-id=none -o "$d/fixture.elf" "$root/guest-symbols/tests/fixture/types.c"
    python3 "$d/make-seeds.py" "$d/fixture.elf" "$out/hvtest-vmlinux" "$out/System.map"
}

for t in "${targets[@]}"; do
    d=$root/$(dir_of "$t")
    extra=()
    case $t in
        parse) extra=(-dict=parse.dict -max_len=256) ;;
        rpc) extra=(-dict=rpc.dict -max_len=4096) ;;
        system_map | kallsyms | elf | dwarf) guest_seeds ;;
    esac
    seeds=()
    for s in "$d/seeds/$t" "$d/corpus-min/$t"; do [ -d "$s" ] && seeds+=("$s"); done
    mkdir -p "$d/corpus/$t"
    log=$root/fuzz/logs/$t.log
    echo "== $t: $(date -u +%FT%TZ) runs=$RUNS cap=${CAP}s" | tee "$log"
    start=$(date +%s)
    (cd "$d" && cargo fuzz run -O -a -s none "$t" "corpus/$t" "${seeds[@]}" -- \
        -runs="$RUNS" -max_total_time="$CAP" -print_final_stats=1 "${extra[@]}") \
        >>"$log" 2>&1 || { echo "== $t FAILED (see $log)"; tail -40 "$log"; exit 1; }
    end=$(date +%s)
    echo "== $t: wall $((end - start)) s (build included)" | tee -a "$log"
    grep -E "^stat::|DONE|Done [0-9]+ runs" "$log" | tee "$log.summary" >/dev/null || true
    # Minimized corpus: committed in corpus-min/ when it is at most 2 MiB,
    # else kept beside the full one in corpus/TARGET.min (not committed).
    rm -rf "$d/corpus/$t.min" && mkdir -p "$d/corpus/$t.min"
    (cd "$d" && cargo fuzz run -O -a -s none "$t" "corpus/$t.min" "corpus/$t" -- \
        -merge=1 "${extra[@]}") >>"$log" 2>&1
    bytes=$(du -sb --apparent-size "$d/corpus/$t.min" | cut -f1)
    where=corpus/$t.min
    if [ "$bytes" -le $((2 << 20)) ]; then
        rm -rf "$d/corpus-min/$t" && mkdir -p "$d/corpus-min" && mv "$d/corpus/$t.min" "$d/corpus-min/$t"
        where=corpus-min/$t
    fi
    echo "== $t: corpus $(ls "$d/corpus/$t" | wc -l) files $(du -sh --apparent-size "$d/corpus/$t" | cut -f1)," \
        "minimized $(ls "$d/$where" | wc -l) files $(du -sh --apparent-size "$d/$where" | cut -f1) in $where" | tee -a "$log"
done
