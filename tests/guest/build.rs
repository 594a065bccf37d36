//! Builds the test guest kernel with the system gcc and ld, Linux-style, and
//! writes `System.map` next to it. The C header `hv_contract.h` is generated
//! from `src/contract.rs`, so the guest and the host share one definition.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::{env, fs};

#[allow(dead_code)]
#[path = "src/contract.rs"]
mod contract;

/// The Linux kernel's code-generation flags (x86-64, CONFIG_FRAME_POINTER,
/// ftrace with nop'ed `__fentry__` calls).
const CFLAGS: &[&str] = &[
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-pic",
    "-fno-pie",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-strict-aliasing",
    "-fno-common",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-omit-frame-pointer",
    "-nostdlib",
    "-pg",
    "-mfentry",
    "-mnop-mcount",
    "-g",
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Werror",
];

/// Sources, and whether each is built like an IBT kernel (endbr64 first).
const SOURCES: &[(&str, bool)] = &[
    ("head.S", false),
    ("funcs_asm.S", false),
    ("main.c", false),
    ("funcs.c", false),
    ("user.S", false),
    ("user.c", false),
    ("ibt.c", true),
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("kernel");
    let cc = env::var("HVTEST_CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("HVTEST_LD").unwrap_or_else(|_| "ld".into());
    let nm = env::var("HVTEST_NM").unwrap_or_else(|_| "nm".into());

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/contract.rs");
    println!("cargo:rerun-if-changed=kernel");
    for var in ["HVTEST_CC", "HVTEST_LD", "HVTEST_NM"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    fs::write(out.join("hv_contract.h"), contract_header()).expect("writing hv_contract.h");

    let mut objs = Vec::new();
    for &(file, ibt) in SOURCES {
        let obj = out.join(format!("{file}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg(if ibt {
                "-fcf-protection=branch"
            } else {
                "-fcf-protection=none"
            })
            .arg("-I")
            .arg(&src)
            .arg("-I")
            .arg(&out)
            .arg("-c")
            .arg(src.join(file))
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, file);
        objs.push(obj);
    }

    let elf = out.join("hvtest-vmlinux");
    let mut cmd = Command::new(&ld);
    cmd.args([
        "-m",
        "elf_x86_64",
        "-static",
        "-nostdlib",
        "--build-id=none",
    ])
    .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
    .arg("-T")
    .arg(src.join("kernel.lds"))
    .arg("-o")
    .arg(&elf)
    .args(&objs);
    run(&mut cmd, "link");

    let mut cmd = Command::new(&nm);
    cmd.arg("-n").arg(&elf);
    let listing = run(&mut cmd, "nm");
    fs::write(out.join("System.map"), system_map(&listing)).expect("writing System.map");

    println!("cargo:rustc-env=HVTEST_KERNEL={}", elf.display());
    println!(
        "cargo:rustc-env=HVTEST_SYSTEM_MAP={}",
        out.join("System.map").display()
    );
}

/// Runs a tool and returns its stdout; on failure stops the build with the
/// tool's own messages.
fn run(cmd: &mut Command, what: &str) -> String {
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "test guest ({what}): cannot run {:?}: {e}",
            cmd.get_program()
        )
    });
    if !output.status.success() {
        panic!(
            "test guest ({what}): {:?} failed ({}):\n{}{}",
            cmd,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).expect("tool output is not UTF-8")
}

/// Linux's filter in scripts/mksysmap: no absolute, undefined, weak-undefined,
/// debugger-only or local-label symbols.
fn system_map(nm_listing: &str) -> String {
    let mut map = String::new();
    for line in nm_listing.lines() {
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if matches!(kind, "a" | "A" | "N" | "U" | "w" | "W") || name.starts_with(".L") {
            continue;
        }
        writeln!(map, "{addr} {kind} {name}").unwrap();
    }
    map
}

fn c_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => panic!("contract string has a character C cannot take as is: {c:?}"),
        }
    }
    out.push('"');
    out
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

fn contract_header() -> String {
    use contract::*;
    let mut h = String::new();
    let mut def = |name: &str, value: String| writeln!(h, "#define {name} {value}").unwrap();

    def("HV_EXIT_PORT", format!("{EXIT_PORT:#x}"));
    def("HV_BENCH_MARKER_PORT", format!("{BENCH_MARKER_PORT:#x}"));
    def("HV_BENCH_NOP_PORT", format!("{BENCH_NOP_PORT:#x}"));
    def("HV_BENCH_PHASE_EXITS", format!("{BENCH_PHASE_EXITS}"));
    def("HV_BENCH_PHASE_LOOP", format!("{BENCH_PHASE_LOOP}"));
    def("HV_BENCH_PHASE_CALLS", format!("{BENCH_PHASE_CALLS}"));
    def("HV_BENCH_PHASE_END", format!("{BENCH_PHASE_END}"));
    def(
        "HV_BENCH_PHASE_WATCH_WAIT",
        BENCH_PHASE_WATCH_WAIT.to_string(),
    );
    def("HV_BENCH_PHASE_WATCHED", BENCH_PHASE_WATCHED.to_string());
    def(
        "HV_BENCH_PHASE_PAGE_WRITES",
        BENCH_PHASE_PAGE_WRITES.to_string(),
    );
    def(
        "HV_BENCH_PHASE_WATCH_END",
        BENCH_PHASE_WATCH_END.to_string(),
    );
    def("HV_EXIT_OK", EXIT_OK.to_string());
    def("HV_EXIT_RETVAL_MISMATCH", EXIT_RETVAL_MISMATCH.to_string());
    def("HV_EXIT_EXCEPTION", EXIT_EXCEPTION.to_string());
    def("HV_EXIT_INT3_SELFTEST", EXIT_INT3_SELFTEST.to_string());
    def("HV_EXIT_BAD_BOOT_INFO", EXIT_BAD_BOOT_INFO.to_string());
    def("HV_EXIT_AP_TIMEOUT", EXIT_AP_TIMEOUT.to_string());
    def(
        "HV_EXIT_COUNTER_MISMATCH",
        EXIT_COUNTER_MISMATCH.to_string(),
    );
    def("HV_EXIT_REGS_CLOBBERED", EXIT_REGS_CLOBBERED.to_string());
    def("HV_EXIT_USER_CHECK", EXIT_USER_CHECK.to_string());
    def("HV_EXIT_USER_SYSCALL", EXIT_USER_SYSCALL.to_string());
    def(
        "HV_EXIT_INIT_TEXT_CHANGED",
        EXIT_INIT_TEXT_CHANGED.to_string(),
    );
    def("HV_INIT_CALLS", INIT_CALLS.to_string());
    def("HV_EXIT_FTRACE_BUG", EXIT_FTRACE_BUG.to_string());
    def("HV_FTRACE_PARAM", c_string(FTRACE_PARAM));
    def("HV_OVERRIDE_PARAM", c_string(OVERRIDE_PARAM));
    def(
        "HV_EXIT_OVERRIDE_MISMATCH",
        EXIT_OVERRIDE_MISMATCH.to_string(),
    );
    def("HV_INIT_HOLD_PARAM", c_string(INIT_HOLD_PARAM));
    def("HV_WATCH_PARAM", c_string(WATCH_PARAM));
    def("HV_EXIT_WATCH_MISMATCH", EXIT_WATCH_MISMATCH.to_string());
    def("HV_USER_PARAM", c_string(USER_PARAM));
    def("HV_IDT_GAP_PARAM", c_string(IDT_GAP_PARAM));
    def("HV_PF_ENTRY_CLD_PARAM", c_string(PF_ENTRY_CLD_PARAM));
    def("HV_USER_CS", format!("{USER_CS:#x}"));
    def("HV_USER_SS", format!("{USER_SS:#x}"));
    def("HV_SYS_OPENAT", SYS_OPENAT.to_string());
    def("HV_SYS_EXIT", SYS_EXIT.to_string());
    def("HV_SYS_GETPID", SYS_GETPID.to_string());
    def("HV_SYS_BENCH_MARK", format!("{SYS_BENCH_MARK:#x}"));
    def("HV_BENCH_PHASE_SYSCALLS", BENCH_PHASE_SYSCALLS.to_string());
    def(
        "HV_BENCH_PHASE_SYSCALLS_END",
        BENCH_PHASE_SYSCALLS_END.to_string(),
    );
    def("HV_USER_DEMAND_PAGES", USER_DEMAND_PAGES.to_string());
    def("HV_USER_POOL_PADDR", format!("{USER_POOL_PADDR:#x}"));
    def("HV_USER_BASE", format!("{USER_BASE:#x}"));
    def("HV_LINE_PREFIX", c_string(LINE_PREFIX));
    def("HV_LINUX_BANNER", c_string(LINUX_BANNER));
    def("HV_DEFAULT_ITERS", format!("{DEFAULT_ITERS}ULL"));
    def("HV_MAX_CPUS", MAX_CPUS.to_string());
    def("HV_TRAMPOLINE_PADDR", format!("{TRAMPOLINE_PADDR:#x}"));
    def("HV_RECURSE_DEPTH", RECURSE_DEPTH.to_string());
    def("HV_RECURSE_RESULT", format!("{RECURSE_RESULT}ULL"));
    def("HV_FIB_MODULUS", FIB_MODULUS.to_string());
    def("HV_AT_FDCWD", format!("({AT_FDCWD})"));
    def("HV_WORK_OFF_ID", HV_WORK_OFF_ID.to_string());
    def("HV_WORK_OFF_FLAGS", HV_WORK_OFF_FLAGS.to_string());
    def("HV_WORK_OFF_NAME", HV_WORK_OFF_NAME.to_string());
    def("HV_WORK_NAME_LEN", HV_WORK_NAME_LEN.to_string());
    def("HV_WORK_OFF_NEXT", HV_WORK_OFF_NEXT.to_string());
    def("HV_WORK_OFF_DATA", HV_WORK_OFF_DATA.to_string());
    def("HV_WORK_SIZE", HV_WORK_SIZE.to_string());
    def("HV_CHECKSUM_DATA_LEN", CHECKSUM_DATA_LEN.to_string());

    def("HV_NR_COUNTED", COUNTED_FUNCTIONS.len().to_string());
    for (i, f) in COUNTED_FUNCTIONS.iter().enumerate() {
        def(&format!("HV_FN_{f}"), i.to_string());
    }
    def(
        "HV_COUNTED_NAMES",
        COUNTED_FUNCTIONS
            .iter()
            .map(|f| c_string(f))
            .collect::<Vec<_>>()
            .join(", "),
    );
    def("HV_NR_OPEN_PATHS", OPEN_PATHS.len().to_string());
    def(
        "HV_OPEN_PATHS",
        OPEN_PATHS
            .iter()
            .map(|p| c_string(p))
            .collect::<Vec<_>>()
            .join(", "),
    );
    def(
        "HV_OPEN_PATH_HASHES",
        list(
            OPEN_PATHS
                .iter()
                .map(|p| format!("{:#010x}U", fnv1a32(p.as_bytes()))),
        ),
    );
    def(
        "HV_FIB_VALUES",
        list((0..FIB_MODULUS).map(|n| format!("{}ULL", fib(n)))),
    );
    def(
        "HV_FIB_CALLS",
        list((0..FIB_MODULUS).map(|n| format!("{}ULL", fib_calls(n)))),
    );
    def(
        "HV_CHECKSUM_DATA",
        list((0..CHECKSUM_DATA_LEN).map(|i| format!("{:#04x}", checksum_data_byte(i)))),
    );
    def(
        "HV_CHECKSUM_PREFIX",
        list((0..=CHECKSUM_DATA_LEN).map(|n| format!("{:#010x}U", checksum_retval(n)))),
    );

    format!(
        "/* Generated by tests/guest/build.rs from src/contract.rs. Do not edit. */\n\
         #ifndef HV_CONTRACT_H\n#define HV_CONTRACT_H\n{h}#endif\n"
    )
}
