//! The hvprobe test guest: a small kernel in C, built by `build.rs` with the
//! Linux kernel's own gcc flags and linked at Linux's addresses, that a VMM
//! boots like `vmlinux` through the PVH entry.
//!
//! The guest runs worker loops on every CPU that call named kernel-like
//! functions ([`COUNTED_FUNCTIONS`]), counts every call in
//! [`COUNTER_SYMBOL`], checks every return value, and reports on the serial
//! port (lines start with [`LINE_PREFIX`]) and through an `outl` of its exit
//! status to [`EXIT_PORT`] (see [`GuestExit`]).
//!
//! Command line words: `hvtest.iters=N`, `hvtest.forever`, `hvtest.cpus=N`
//! (see [`cmdline`]). The full contract is in `tests/guest/README.md`.

use std::path::Path;

mod contract;
pub use contract::*;

/// The built guest kernel (an ELF `vmlinux` with symbols and DWARF).
pub fn kernel_path() -> &'static Path {
    Path::new(env!("HVTEST_KERNEL"))
}

/// `System.map` of [`kernel_path`], in the format of Linux's `scripts/mksysmap`.
pub fn system_map_path() -> &'static Path {
    Path::new(env!("HVTEST_SYSTEM_MAP"))
}

/// The bytes of [`kernel_path`], embedded at compile time.
pub fn kernel_image() -> &'static [u8] {
    include_bytes!(env!("HVTEST_KERNEL"))
}

/// Index of `name` in [`COUNTED_FUNCTIONS`] (= its slot in [`COUNTER_SYMBOL`]).
pub fn counter_index(name: &str) -> Option<usize> {
    COUNTED_FUNCTIONS.iter().position(|f| *f == name)
}

/// Builds a guest command line. `iters: None` keeps [`DEFAULT_ITERS`];
/// `cpus: None` takes the CPU count from the ACPI MADT.
pub fn cmdline(iters: Option<u64>, cpus: Option<u32>, forever: bool) -> String {
    let mut words = vec!["console=ttyS0".to_string()];
    if let Some(n) = iters {
        words.push(format!("hvtest.iters={n}"));
    }
    if let Some(n) = cpus {
        words.push(format!("hvtest.cpus={n}"));
    }
    if forever {
        words.push("hvtest.forever".into());
    }
    words.join(" ")
}

/// The meaning of a status the guest wrote to [`EXIT_PORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// All workers finished, every return value and counter checked out.
    Ok,
    /// A counted function returned a wrong value (a `FAIL cpu=.. fn=..` line says which).
    RetvalMismatch,
    /// An unexpected CPU exception (an `EXCEPTION vec=.. rip=.. err=..` line).
    Exception,
    /// The guest's own `int3` did not reach its #BP handler exactly once.
    Int3Selftest,
    /// `%ebx` at the PVH entry did not point at a `hvm_start_info`.
    BadBootInfo,
    /// An AP did not start after INIT-SIPI-SIPI.
    ApTimeout,
    /// A call counter disagrees with the callers' own count.
    CounterMismatch,
    /// A callee-saved register, `%rsp` or `DF` did not survive a call.
    RegsClobbered,
    /// User mode: a user-side check failed.
    UserCheck,
    /// User mode: a user system call never reached the kernel's entry.
    UserSyscall,
}

impl GuestExit {
    const ALL: [GuestExit; 10] = [
        GuestExit::Ok,
        GuestExit::RetvalMismatch,
        GuestExit::Exception,
        GuestExit::Int3Selftest,
        GuestExit::BadBootInfo,
        GuestExit::ApTimeout,
        GuestExit::CounterMismatch,
        GuestExit::RegsClobbered,
        GuestExit::UserCheck,
        GuestExit::UserSyscall,
    ];

    /// The value written to [`EXIT_PORT`].
    pub const fn code(self) -> u32 {
        match self {
            GuestExit::Ok => EXIT_OK,
            GuestExit::RetvalMismatch => EXIT_RETVAL_MISMATCH,
            GuestExit::Exception => EXIT_EXCEPTION,
            GuestExit::Int3Selftest => EXIT_INT3_SELFTEST,
            GuestExit::BadBootInfo => EXIT_BAD_BOOT_INFO,
            GuestExit::ApTimeout => EXIT_AP_TIMEOUT,
            GuestExit::CounterMismatch => EXIT_COUNTER_MISMATCH,
            GuestExit::RegsClobbered => EXIT_REGS_CLOBBERED,
            GuestExit::UserCheck => EXIT_USER_CHECK,
            GuestExit::UserSyscall => EXIT_USER_SYSCALL,
        }
    }

    /// Decodes a value written to [`EXIT_PORT`]; `None` for unknown values.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }
}

/// What the final line `hvtest: done ok cpus=N iters=M` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoneLine {
    pub cpus: u32,
    pub iters: u64,
}

/// Parses the guest's success line; `None` if `line` is not one.
pub fn parse_done_line(line: &str) -> Option<DoneLine> {
    let rest = line
        .trim_end()
        .strip_prefix(LINE_PREFIX)?
        .strip_prefix("done ok ")?;
    let mut words = rest.split(' ');
    let cpus = words.next()?.strip_prefix("cpus=")?.parse().ok()?;
    let iters = words.next()?.strip_prefix("iters=")?.parse().ok()?;
    words.next().is_none().then_some(DoneLine { cpus, iters })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_round_trip_and_are_distinct() {
        for e in GuestExit::ALL {
            assert_eq!(GuestExit::from_code(e.code()), Some(e));
        }
        let mut codes: Vec<u32> = GuestExit::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), GuestExit::ALL.len());
        assert_eq!(GuestExit::from_code(0x1234), None);
    }

    #[test]
    fn counted_functions_are_unique_and_indexed() {
        for (i, f) in COUNTED_FUNCTIONS.iter().enumerate() {
            assert_eq!(counter_index(f), Some(i));
        }
        for f in ENDBR_FUNCTIONS {
            assert!(counter_index(f).is_some(), "{f} is not counted");
        }
        assert_eq!(counter_index("nope"), None);
    }

    #[test]
    fn contract_arithmetic() {
        // FNV-1a reference values.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        assert_eq!(
            open_file_retval(0, "a", 0, 0),
            (0xe40c_292c_u32 & 0x7fff_ffff) as i32
        );
        assert!(open_file_retval(AT_FDCWD, OPEN_PATHS[0], 0x80000, 0o644) >= 0);
        let fibs: Vec<u64> = (0..10).map(fib).collect();
        assert_eq!(fibs, [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]);
        let calls: Vec<u64> = (0..7).map(fib_calls).collect();
        assert_eq!(calls, [1, 1, 3, 5, 9, 15, 25]);
        assert_eq!(RECURSE_RESULT, 36);
        assert_eq!(checksum_retval(0), 0);
        assert_eq!(checksum_retval(1), checksum_data_byte(0) as u32);
        assert_eq!(
            checksum_retval(2),
            (checksum_data_byte(0) as u32) << 1 ^ checksum_data_byte(1) as u32
        );
    }

    #[test]
    fn cmdline_words() {
        assert_eq!(cmdline(None, None, false), "console=ttyS0");
        assert_eq!(
            cmdline(Some(7), Some(2), true),
            "console=ttyS0 hvtest.iters=7 hvtest.cpus=2 hvtest.forever"
        );
    }

    #[test]
    fn done_line() {
        assert_eq!(
            parse_done_line("hvtest: done ok cpus=2 iters=100\r\n"),
            Some(DoneLine {
                cpus: 2,
                iters: 100
            })
        );
        assert_eq!(parse_done_line("hvtest: done ok cpus=2"), None);
        assert_eq!(parse_done_line("hvtest: done ok cpus=x iters=1"), None);
        assert_eq!(parse_done_line("hvtest: boot cpus=2 iters=1"), None);
    }

    #[test]
    fn paths_exist() {
        assert!(kernel_path().is_file(), "{}", kernel_path().display());
        assert!(
            system_map_path().is_file(),
            "{}",
            system_map_path().display()
        );
        assert_eq!(std::fs::read(kernel_path()).unwrap(), kernel_image());
    }
}
