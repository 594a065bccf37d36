//! Boots the guest under QEMU/TCG (QEMU loads ELF kernels through the PVH
//! note). Needs `qemu-system-x86_64`, so ignored by default:
//! `cargo test -p test-guest --test qemu_boot -- --ignored`.

use object::{Object, ObjectSection, ObjectSymbol};
use std::path::{Path, PathBuf};
use std::process::Command;
use test_guest::*;

struct Run {
    lines: Vec<String>,
    status: Option<GuestExit>,
}

fn boot(smp: u32, append: &str) -> Run {
    boot_kernel(kernel_path(), smp, append)
}

fn boot_kernel(kernel: &Path, smp: u32, append: &str) -> Run {
    let out = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-m", "256", "-smp"])
        .arg(smp.to_string())
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", append])
        .args([
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={EXIT_PORT:#x},iosize=0x04"),
        ])
        .output()
        .expect("running qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout);
    // isa-debug-exit makes QEMU exit with (status << 1) | 1.
    let status = out
        .status
        .code()
        .filter(|c| c & 1 == 1)
        .and_then(|c| GuestExit::from_code((c >> 1) as u32));
    let lines = text
        .lines()
        .filter_map(|l| l.find(LINE_PREFIX).map(|i| l[i..].trim_end().to_string()))
        .collect();
    Run { lines, status }
}

fn assert_ok(run: &Run, cpus: u32, iters: u64) {
    assert_eq!(run.status, Some(GuestExit::Ok), "{:#?}", run.lines);
    assert_eq!(
        run.lines[0],
        format!("hvtest: boot cpus={cpus} iters={iters}")
    );
    assert!(
        run.lines.iter().any(|l| l == "hvtest: int3 ok"),
        "{:#?}",
        run.lines
    );
    assert_eq!(
        run.lines.last().and_then(|l| parse_done_line(l)),
        Some(DoneLine { cpus, iters })
    );
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn boots_on_1_2_4_cpus_from_the_madt() {
    for cpus in [1, 2, 4] {
        let run = boot(cpus, &cmdline(Some(100), None, false));
        assert_ok(&run, cpus, 100);
    }
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn default_iters_and_cpu_override() {
    let run = boot(4, "hvtest.cpus=2 unrelated=word");
    assert_ok(&run, 2, DEFAULT_ITERS);
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn bad_options_are_reported_and_ignored() {
    let run = boot(1, "hvtest.iters=12x hvtest.cpus=0");
    assert_eq!(run.lines[0], "hvtest: ignoring bad option hvtest.iters=12x");
    assert_eq!(run.lines[1], "hvtest: ignoring bad option hvtest.cpus=0");
    assert_ok(
        &Run {
            lines: run.lines[2..].to_vec(),
            status: run.status,
        },
        1,
        DEFAULT_ITERS,
    );
}

/// A copy of the kernel with `bytes` written at `symbol + offset`: a stand-in
/// for a broken probe engine, to show the guest notices.
fn patched_kernel(tag: &str, symbol: &str, offset: u64, bytes: &[u8]) -> PathBuf {
    let image = kernel_image();
    let file = object::File::parse(image).unwrap();
    let addr = file
        .symbols()
        .find(|s| s.name() == Ok(symbol))
        .unwrap_or_else(|| panic!("{symbol} missing"))
        .address()
        + offset;
    let section = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&addr))
        .expect("address in a section");
    let (file_off, _) = section.file_range().expect("section has file data");
    let at = (file_off + addr - section.address()) as usize;
    let mut copy = image.to_vec();
    copy[at..at + bytes.len()].copy_from_slice(bytes);
    let path = std::env::temp_dir().join(format!("hvtest-{}-{tag}.elf", std::process::id()));
    std::fs::write(&path, copy).unwrap();
    path
}

fn boot_patched(tag: &str, symbol: &str, offset: u64, bytes: &[u8]) -> Run {
    let path = patched_kernel(tag, symbol, offset, bytes);
    let run = boot_kernel(&path, 2, &cmdline(Some(5), None, false));
    std::fs::remove_file(path).unwrap();
    run
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn wrong_return_value_is_caught() {
    // lea 0x11(%rdi,%rsi,2) -> lea 0x12(...): hv_lea_first returns one too many.
    let run = boot_patched("retval", "hv_lea_first", 9, &[0x12]);
    assert_eq!(
        run.status,
        Some(GuestExit::RetvalMismatch),
        "{:#?}",
        run.lines
    );
    let fail = run
        .lines
        .iter()
        .find(|l| l.contains("FAIL"))
        .expect("a FAIL line");
    assert!(fail.starts_with("hvtest: FAIL cpu="), "{fail}");
    assert!(fail.contains(" fn=hv_lea_first got="), "{fail}");
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn lost_counter_increment_is_caught() {
    // The "lock incq" after the lea becomes nops (8 bytes: f0 48 ff 05 rel32).
    let run = boot_patched("counter", "hv_lea_first", 10, &[0x90; 8]);
    assert_eq!(
        run.status,
        Some(GuestExit::CounterMismatch),
        "{:#?}",
        run.lines
    );
    assert!(
        run.lines
            .iter()
            .any(|l| l.starts_with("hvtest: FAIL counter fn=hv_lea_first got=0 want=")),
        "{:#?}",
        run.lines
    );
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn unexpected_exception_is_reported() {
    // ud2 in place of hv_add's ftrace nop.
    let run = boot_patched("exception", "hv_add", 0, &[0x0f, 0x0b, 0x66, 0x90, 0x90]);
    assert_eq!(run.status, Some(GuestExit::Exception), "{:#?}", run.lines);
    let file = object::File::parse(kernel_image()).unwrap();
    let hv_add = file
        .symbols()
        .find(|s| s.name() == Ok("hv_add"))
        .unwrap()
        .address();
    let want = format!("hvtest: EXCEPTION vec=6 rip={hv_add:#x} err=0x0 cpu=");
    assert!(
        run.lines.iter().any(|l| l.starts_with(&want)),
        "{want} in {:#?}",
        run.lines
    );
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn clobbered_callee_saved_register_is_caught() {
    // The counter increment in hv_lea_first becomes "mov $1,%ebx; nop3".
    let patch = [0xbb, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x1f, 0x00];
    let run = boot_patched("rbx", "hv_lea_first", 10, &patch);
    assert_eq!(
        run.status,
        Some(GuestExit::RegsClobbered),
        "{:#?}",
        run.lines
    );
    assert!(
        run.lines
            .iter()
            .any(|l| l.starts_with("hvtest: FAIL cpu=")
                && l.ends_with(" fn=hv_lea_first clobbered=0x1")),
        "{:#?}",
        run.lines
    );
    assert_eq!(CLOBBER_BITS[0], "rbx");
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn direction_flag_left_set_is_caught() {
    // hv_add's ftrace nop becomes "std; nop4".
    let run = boot_patched("df", "hv_add", 0, &[0xfd, 0x0f, 0x1f, 0x40, 0x00]);
    assert_eq!(
        run.status,
        Some(GuestExit::RegsClobbered),
        "{:#?}",
        run.lines
    );
    assert!(
        run.lines
            .iter()
            .any(|l| l.ends_with(" fn=hv_add clobbered=0x40")),
        "{:#?}",
        run.lines
    );
    assert_eq!(CLOBBER_BITS[6], "DF");
}

#[test]
#[ignore = "needs qemu-system-x86_64"]
fn changed_flags_at_the_nop_are_caught() {
    // hv_jcc_after_nop's nop becomes "cmp %rdi,%rsi; xchg %ax,%ax": reversed flags.
    let run = boot_patched(
        "flags",
        "hv_jcc_after_nop",
        0,
        &[0x48, 0x39, 0xfe, 0x66, 0x90],
    );
    assert_eq!(
        run.status,
        Some(GuestExit::RetvalMismatch),
        "{:#?}",
        run.lines
    );
    assert!(
        run.lines
            .iter()
            .any(|l| l.contains(" fn=hv_jcc_after_nop got=")),
        "{:#?}",
        run.lines
    );
}
