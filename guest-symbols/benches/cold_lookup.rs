//! Cold-start cost of "address of do_sys_openat2 and offset of
//! task_struct.comm" on the Debian -dbg vmlinux, against `gdb -batch`
//! answering the same on the same file, in one run.
//!
//! `cargo bench -p guest-symbols --bench cold_lookup`
//! (file: `$HVPROBE_DEBIAN_DIR/vmlinux`, default `<repo>/artifacts/debian`).

use guest_symbols::DebugInfo;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const FUNC: &str = "do_sys_openat2";
const MEMBER: &str = "task_struct.comm";

/// One answer from nothing: map the file, find both, drop everything.
fn ours(vmlinux: &PathBuf) -> (u64, u64, Duration) {
    let t = Instant::now();
    let dbg = DebugInfo::open(vmlinux).expect("open vmlinux");
    let addr = dbg
        .image()
        .and_then(|i| i.symbol_address(FUNC))
        .expect("symbol");
    let off = dbg.member_offset(MEMBER).expect("member");
    let el = t.elapsed();
    (addr, off, el)
}

fn gdb(vmlinux: &PathBuf) -> Option<(u64, u64, Duration)> {
    let t = Instant::now();
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-ex"])
        .arg(format!("print/x (unsigned long)&{FUNC}"))
        .arg("-ex")
        .arg("print/d (unsigned long)&((struct task_struct *)0)->comm")
        .arg(vmlinux)
        .output()
        .ok()?;
    let el = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let vals: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("= ").map(|(_, v)| v.trim()))
        .collect();
    let addr = u64::from_str_radix(vals.first()?.trim_start_matches("0x"), 16).ok()?;
    let off = vals.get(1)?.parse().ok()?;
    Some((addr, off, el))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let dir = std::env::var_os("HVPROBE_DEBIAN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../artifacts/debian"),
        PathBuf::from,
    );
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.exists() {
        println!(
            "SKIPPED: {} absent (tests/debian/fetch-kernel.sh --dbg)",
            vmlinux.display()
        );
        return;
    }
    // Both read the same file; warm the page cache once so neither pays
    // the disk and the comparison is of the work done.
    let _ = ours(&vmlinux);
    let runs = 5;
    let mut times: Vec<Duration> = Vec::new();
    let mut answer = (0, 0);
    for _ in 0..runs {
        let (a, o, t) = ours(&vmlinux);
        answer = (a, o);
        times.push(t);
    }
    times.sort();
    let median = times[runs / 2];
    println!(
        "guest-symbols: {FUNC}={:#x} {MEMBER}={} cold start median {:.1} ms (min {:.1}, max {:.1}, {runs} runs)",
        answer.0,
        answer.1,
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[runs - 1].as_secs_f64() * 1e3
    );
    match gdb(&vmlinux) {
        Some((a, o, t)) => {
            println!(
                "gdb -batch:    {FUNC}={a:#x} {MEMBER}={o} in {:.1} ms",
                t.as_secs_f64() * 1e3
            );
            assert_eq!((a, o), answer, "gdb and guest-symbols disagree");
            println!(
                "ratio: guest-symbols is {:.0}x faster (target >= 20x)",
                t.as_secs_f64() / median.as_secs_f64()
            );
        }
        None => println!("gdb not available or unparsable output; no ratio"),
    }
}
