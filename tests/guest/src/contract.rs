//! The host <-> guest contract of the test kernel.
//!
//! This file is the single source of truth: `build.rs` includes it and
//! generates the C header `hv_contract.h` from it, and `lib.rs` re-exports it.
//! Keep it free of dependencies (only `core`), because the build script
//! compiles it on its own.

/// I/O port the guest writes its 32-bit exit status to with `outl`.
pub const EXIT_PORT: u16 = 0xf4;

/// `hvtest.bench=N`: the boot CPU writes the phase number (`outl`) here at
/// each phase boundary of the benchmark loop, so the host can time phases.
pub const BENCH_MARKER_PORT: u16 = 0xf5;
/// A port no device answers: `outb` to it is a bare VM exit.
pub const BENCH_NOP_PORT: u16 = 0x80;
/// Benchmark phases (value written to [`BENCH_MARKER_PORT`] when a phase starts):
/// N bare exits (`outb` to [`BENCH_NOP_PORT`]), N empty loop iterations,
/// N calls of [`BENCH_FUNCTION`]; [`BENCH_PHASE_END`] when done.
pub const BENCH_PHASE_EXITS: u32 = 1;
pub const BENCH_PHASE_LOOP: u32 = 2;
pub const BENCH_PHASE_CALLS: u32 = 3;
pub const BENCH_PHASE_END: u32 = 4;
/// With `hvtest.user=` set too, after [`BENCH_PHASE_END`] the boot CPU drops
/// to user mode and makes N minimal system calls ([`SYS_GETPID`]); the
/// kernel writes these two phase numbers around them (from [`SYS_BENCH_MARK`]).
pub const BENCH_PHASE_SYSCALLS: u32 = 5;
pub const BENCH_PHASE_SYSCALLS_END: u32 = 6;
/// With `hvtest.watch=` set too, after [`BENCH_PHASE_END`] the boot CPU
/// announces [`BENCH_PHASE_WATCH_WAIT`] and waits for [`WATCH_GO_SYMBOL`]
/// (the host adds its watch meanwhile), then N calls of [`WATCH_SETTER`]
/// ([`BENCH_PHASE_WATCHED`]), N plain stores to an unwatched `u64` of the
/// same page ([`BENCH_PHASE_PAGE_WRITES`]), then [`BENCH_PHASE_WATCH_END`].
pub const BENCH_PHASE_WATCH_WAIT: u32 = 7;
pub const BENCH_PHASE_WATCHED: u32 = 8;
pub const BENCH_PHASE_PAGE_WRITES: u32 = 9;
pub const BENCH_PHASE_WATCH_END: u32 = 10;
/// The function the benchmark calls N times: `hv_add(i, 1)`.
pub const BENCH_FUNCTION: &str = "hv_add";

/// Exit status written to [`EXIT_PORT`]: everything ran and every check passed.
pub const EXIT_OK: u32 = 0;
/// A counted function returned a wrong value (`hvtest: FAIL cpu=.. fn=.. got=.. want=..`).
pub const EXIT_RETVAL_MISMATCH: u32 = 1;
/// An unexpected CPU exception (`hvtest: EXCEPTION vec=.. rip=.. err=..`).
pub const EXIT_EXCEPTION: u32 = 2;
/// The guest's own `int3` self-test did not reach its #BP handler exactly once.
pub const EXIT_INT3_SELFTEST: u32 = 3;
/// `%ebx` at the PVH entry did not point at a `hvm_start_info` (bad magic).
pub const EXIT_BAD_BOOT_INFO: u32 = 4;
/// An application processor did not check in after INIT-SIPI-SIPI.
pub const EXIT_AP_TIMEOUT: u32 = 5;
/// At the end, a call counter differs from what the callers counted.
pub const EXIT_COUNTER_MISMATCH: u32 = 6;
/// A counted function called through `hv_call_checked` came back with a
/// callee-saved register, `%rsp`, or `DF` changed
/// (`hvtest: FAIL cpu=.. fn=.. clobbered=0x..`, bits per [`CLOBBER_BITS`]).
pub const EXIT_REGS_CLOBBERED: u32 = 7;

/// User mode (`hvtest.user=N`): a user-mode check failed (`hvtest: FAIL user cpu=.. what=..`).
pub const EXIT_USER_CHECK: u32 = 8;
/// User mode: a user `syscall` or `int $0x80` never reached the kernel's
/// entry (it arrived as #PF at `entry_SYSCALL_64` or as #UD; `hvtest: FAIL
/// user cpu=.. syscall did not reach the kernel ...`).
pub const EXIT_USER_SYSCALL: u32 = 9;

/// The freed init text changed after the guest poisoned it: someone wrote
/// into memory the guest had freed (`hvtest: FAIL init text changed at 0x..
/// got=0x..`).
pub const EXIT_INIT_TEXT_CHANGED: u32 = 10;

/// The guest found bytes it did not expect at hv_add's ftrace site before
/// patching it, as Linux's ftrace_bug() would (`hvtest: FAIL ftrace bug:
/// hv_add+I is 0x.., want 0x..`).
pub const EXIT_FTRACE_BUG: u32 = 11;
/// `hvtest.ftrace=N`: before starting the other CPUs the boot CPU plays
/// the guest's own ftrace on [`FTRACE_FUNCTION`] N times: check its fentry
/// nop, patch it into a call of `hv_ftrace_hook` (counted in
/// [`FTRACE_CALLS_SYMBOL`]), call the function, check the call, patch the nop
/// back, call it again (2N counted calls), then print `ftrace ok n=N`.
pub const FTRACE_PARAM: &str = "hvtest.ftrace=";
pub const FTRACE_FUNCTION: &str = "hv_add";
pub const FTRACE_CALLS_SYMBOL: &str = "hv_ftrace_calls";

/// Like Linux's `__init` code: [`INIT_FUNCTION`] lives in `.init.text`,
/// between `__init_begin` and `__init_end`. The boot CPU calls it
/// [`INIT_CALLS`] times (`long hv_init_func(long x)` returns `3x + 1`,
/// counted in [`INIT_CALLS_SYMBOL`]), then [`FREE_INITMEM`] sets
/// [`SYSTEM_STATE_SYMBOL`] to SYSTEM_FREEING_INITMEM (2), poisons the range
/// with 0xcc as Linux does, sets it to SYSTEM_RUNNING (3) and prints `init
/// freed`. At the end of the run the guest checks that every byte of the
/// range still holds 0xcc ([`EXIT_INIT_TEXT_CHANGED`] otherwise).
pub const INIT_FUNCTION: &str = "hv_init_func";
pub const INIT_CALLS: u64 = 8;
pub const INIT_CALLS_SYMBOL: &str = "hv_init_calls";
pub const FREE_INITMEM: &str = "free_initmem";
pub const SYSTEM_STATE_SYMBOL: &str = "system_state";
/// `hvtest.init_hold`: after `init freed` the boot CPU (the only one
/// running then) spins until the host writes a non-zero `u64` to
/// [`INIT_RELEASE_SYMBOL`], so a test can act on the freed text while the
/// guest runs.
pub const INIT_HOLD_PARAM: &str = "hvtest.init_hold";
pub const INIT_RELEASE_SYMBOL: &str = "hv_init_release";

/// `hvtest.override=N`: after its worker loop (which runs and is checked as
/// always) every CPU calls [`OVERRIDE_FUNCTION`]`(i)` for `i` in `0..N`
/// (`long hv_may_fail(long n)` returns `n + 1` and counts its own runs in
/// [`OVERRIDE_BODY_SYMBOL`]) and [`VOID_FUNCTION`]`(i)` (`void hv_note(long)`,
/// nothing to override). A result that is not `i + 1` counts as overridden;
/// the boot CPU then prints `override calls=C overridden=K body=B value=V`
/// (`V`: the overridden value, signed decimal) and fails with
/// [`EXIT_OVERRIDE_MISMATCH`] unless `body = calls - overridden` and every
/// overridden call returned the same value.
pub const OVERRIDE_PARAM: &str = "hvtest.override=";
pub const OVERRIDE_FUNCTION: &str = "hv_may_fail";
pub const OVERRIDE_BODY_SYMBOL: &str = "hv_may_fail_body";
pub const VOID_FUNCTION: &str = "hv_note";
/// `hvtest.override`: the body count or the overridden values disagree.
pub const EXIT_OVERRIDE_MISMATCH: u32 = 12;

/// `hvtest.watch=N`: instead of the workers, the boot CPU prints
/// `watch ready` and spins until the host writes a non-zero `u64` to
/// [`WATCH_GO_SYMBOL`]; then every CPU runs N rounds on the page-aligned
/// [`WATCH_PAGE_SYMBOL`] (4 KiB): CPU 0 calls [`WATCH_SETTER`]`(3i+1)`,
/// which stores its argument to the page's first `u64` (the watched
/// variable, [`WATCH_VALUE_OFFSET`]) and nothing else, and counts the call
/// in [`WATCH_WRITES_SYMBOL`] (another page); every CPU takes the page's
/// `lock cmpxchg` spinlock and increments a plain counter under it, does a
/// `lock xadd` on a counter (summing what it got back), an `xchg` of a
/// unique token, and a plain store to its own slot. The boot CPU then
/// checks the totals exactly and prints
/// `watch writes=W locked=L xadd=X` or fails with [`EXIT_WATCH_MISMATCH`]
/// (`FAIL watch ...`).
pub const WATCH_PARAM: &str = "hvtest.watch=";
pub const WATCH_PAGE_SYMBOL: &str = "hv_watch_page";
pub const WATCH_VALUE_OFFSET: u64 = 0;
pub const WATCH_SETTER: &str = "hv_watch_set";
pub const WATCH_WRITES_SYMBOL: &str = "hv_watch_writes";
pub const WATCH_GO_SYMBOL: &str = "hv_watch_go";
/// `hvtest.watch`: a total on the watched page is off (a lost update).
pub const EXIT_WATCH_MISMATCH: u32 = 13;

/// Bit `i` of the `clobbered=` mask names `CLOBBER_BITS[i]`.
pub const CLOBBER_BITS: &[&str] = &["rbx", "r12", "r13", "r14", "r15", "rsp/rbp", "DF"];
/// Functions the workers call through `hv_call_checked`, which fills the
/// callee-saved registers with canaries around the call and checks them after.
pub const CHECKED_CALL_FUNCTIONS: &[&str] = &["hv_add", "hv_lea_first"];

/// Every line the guest prints on the serial port starts with this.
pub const LINE_PREFIX: &str = "hvtest: ";

/// Name of the `u64` array of per-function call counters (`[u64; COUNTED_FUNCTIONS.len()]`).
/// Each counted function increments its own slot atomically once per call
/// (recursive calls included), so a probe at `sym+0` should hit exactly that often.
pub const COUNTER_SYMBOL: &str = "hv_call_counts";
/// Name of the `u64` array the *callers* fill once their loop ends: the number
/// of calls they expect per function. After a clean finite run it equals
/// [`COUNTER_SYMBOL`] slot for slot (the guest checks this itself).
pub const EXPECTED_COUNTER_SYMBOL: &str = "hv_expected_counts";
/// `u64` incremented by the guest's own #BP handler (vector 3).
pub const BP_HANDLED_SYMBOL: &str = "hv_bp_handled";
/// The first C function, called exactly once by the boot CPU.
pub const FIRST_C_FUNCTION: &str = "hv_start_kernel";
/// C entry of every application processor: `void hv_ap_main(unsigned cpu)`.
pub const AP_C_FUNCTION: &str = "hv_ap_main";
/// The 32-bit PVH entry point (physical address in the `.note.Xen` note).
pub const PVH_ENTRY_SYMBOL: &str = "pvh_start_xen";
/// `MSR_LSTAR` is set to this function's address, as on Linux.
pub const SYSCALL_ENTRY_SYMBOL: &str = "entry_SYSCALL_64";
/// Symbol of the NUL-terminated banner string.
pub const BANNER_SYMBOL: &str = "linux_banner";
/// Content of [`BANNER_SYMBOL`] (without the trailing NUL).
pub const LINUX_BANNER: &str =
    "Linux version 6.1.0-hvtest (hvprobe test guest) (gcc) #1 SMP PREEMPT_DYNAMIC\n";

/// Functions with a call counter; index `i` is slot `i` of [`COUNTER_SYMBOL`].
/// All are global, `noinline`, and start with the 5-byte ftrace nop
/// (`hv_ibt_func` with `endbr64` first). Prototypes and probe-site shapes are
/// documented in `tests/guest/README.md`.
pub const COUNTED_FUNCTIONS: &[&str] = &[
    "hv_open_file",
    "hv_fib",
    "hv_recurse",
    "hv_add",
    "hv_many_args",
    "hv_work_item",
    "hv_checksum",
    "hv_sub_tail",
    "hv_stack_frame",
    "hv_lea_first",
    "hv_jcc_after_nop",
    "hv_tail_jmp",
    "hv_ibt_func",
];

/// Functions compiled with `-fcf-protection=branch`: they start `endbr64; nop5`.
pub const ENDBR_FUNCTIONS: &[&str] = &["hv_ibt_func"];

/// `hvtest.recurse_on=N`: only CPU N calls `hv_recurse` (the others keep
/// running everything else), so nested return probes have one caller.
pub const RECURSE_ON_PARAM: &str = "hvtest.recurse_on=";

/// `hvtest.user=N`: after its kernel-mode loop each CPU loads its own
/// GDT/TSS (user CS [`USER_CS`], SS [`USER_SS`]), STAR/LSTAR/SFMASK, and runs
/// a user-mode (CPL3) loop of N iterations, each: one `syscall`
/// ([`SYS_OPENAT`], path copied in from user memory, the kernel calls
/// `hv_open_file`; the user checks the value), one `int $0x80` (the kernel
/// calls `hv_add`; checked), and for the first [`USER_DEMAND_PAGES`]
/// iterations a store to a not-present demand-zero page the kernel maps on
/// the fault. Then [`SYS_EXIT`]. Needs RAM up to [`USER_POOL_PADDR`] + 12 KiB
/// + 256 KiB per CPU.
pub const USER_PARAM: &str = "hvtest.user=";
/// `hvtest.idt_gap`: before the workers the boot CPU loads an IDT whose #PF
/// gate is not present, writes a line (VM exits), then loads its real IDT.
pub const IDT_GAP_PARAM: &str = "hvtest.idt_gap";
/// `hvtest.pf_entry_cld`: IDT[14] points at `hv_pf_entry_cld`, which starts
/// with `cld` (not emulated by the VMM's emulator) and then jumps to the
/// usual #PF stub: genuine page faults make the bridge single-step.
pub const PF_ENTRY_CLD_PARAM: &str = "hvtest.pf_entry_cld";
/// Linux's user selectors (`__USER_CS`, `__USER_DS`).
pub const USER_CS: u16 = 0x33;
pub const USER_SS: u16 = 0x2b;
/// System call numbers of the test kernel (Linux's numbers for the same idea).
pub const SYS_OPENAT: u64 = 257;
pub const SYS_EXIT: u64 = 60;
/// Returns 1000 + the CPU number; used by the benchmark loop.
pub const SYS_GETPID: u64 = 39;
/// Test-kernel private: `outl` of the argument to [`BENCH_MARKER_PORT`].
pub const SYS_BENCH_MARK: u64 = 0x1000;
/// Demand-zero pages each CPU's user loop touches (at most, one per iteration).
pub const USER_DEMAND_PAGES: u64 = 16;
/// Physical base of the pages user mode uses (page tables, user data,
/// stacks, demand-zero pages): 256 KiB per CPU after 3 shared pages.
pub const USER_POOL_PADDR: u64 = 0x200_0000;
/// User virtual base: the user text; CPU `c` has its data page at
/// `USER_BASE + (c + 1) * 2 MiB`, its stack above it, demand pages at +64 KiB.
pub const USER_BASE: u64 = 0x0000_0080_0000_0000;
/// `u64` counters, summed over CPUs: system calls the user loops made
/// (counted by user code before each `syscall`, the exit included) ...
pub const USER_MADE_SYMBOL: &str = "hv_user_made";
/// ... system calls the kernel's `entry_SYSCALL_64` handled ...
pub const USER_SYSCALLS_SYMBOL: &str = "hv_user_syscalls";
/// ... `int $0x80`s the kernel's IDT[0x80] handler handled ...
pub const USER_INT80_SYMBOL: &str = "hv_user_int80";
/// ... and demand-zero pages the #PF handler mapped for user code.
pub const USER_FAULTS_SYMBOL: &str = "hv_user_faults";

/// Default worker loop iterations per CPU (`hvtest.iters=` overrides).
pub const DEFAULT_ITERS: u64 = 20;
/// Highest number of CPUs the guest brings up (more in the MADT are ignored).
pub const MAX_CPUS: u32 = 64;
/// Physical address the real-mode AP trampoline is copied to (SIPI vector 0x08).
/// The guest overwrites this page after it has read its boot information.
pub const TRAMPOLINE_PADDR: u32 = 0x8000;

/// `hv_recurse(RECURSE_DEPTH)` is called once per worker iteration: it has
/// exactly `RECURSE_DEPTH` activations in flight at its deepest point.
pub const RECURSE_DEPTH: u32 = 8;
/// Return value of `hv_recurse(RECURSE_DEPTH)`.
pub const RECURSE_RESULT: u64 = recurse_result(RECURSE_DEPTH);
/// `hv_fib(n)` is called with `n = (cpu + iter) % FIB_MODULUS`.
pub const FIB_MODULUS: u32 = 8;

/// Paths passed to `hv_open_file`, `OPEN_PATHS[(cpu + iter) % OPEN_PATHS.len()]`.
pub const OPEN_PATHS: &[&str] = &[
    "/etc/passwd",
    "/etc/hostname",
    "/proc/self/status",
    "/var/log/hvtest.log",
    "/tmp/hvprobe-test",
    "/dev/null",
    "/sys/kernel/tracing/kprobe_events",
    "/home/user/.bashrc",
];
/// `dfd` argument of every `hv_open_file` call (Linux's `AT_FDCWD`).
pub const AT_FDCWD: i32 = -100;

/// Byte offsets in `struct hv_work` (the argument of `hv_work_item`):
/// `{ u32 id; u32 flags; char name[16]; struct hv_work *next; u64 data; }`.
pub const HV_WORK_OFF_ID: usize = 0;
pub const HV_WORK_OFF_FLAGS: usize = 4;
pub const HV_WORK_OFF_NAME: usize = 8;
pub const HV_WORK_NAME_LEN: usize = 16;
pub const HV_WORK_OFF_NEXT: usize = 24;
pub const HV_WORK_OFF_DATA: usize = 32;
pub const HV_WORK_SIZE: usize = 40;

/// Length of the `hv_checksum_data` buffer; `hv_checksum` is called on a
/// prefix of `1 + (cpu + iter) % CHECKSUM_DATA_LEN` bytes.
pub const CHECKSUM_DATA_LEN: usize = 32;

/// 32-bit FNV-1a, the string hash `hv_open_file` computes.
pub const fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

/// Return value of `hv_open_file(dfd, path, flags, mode)`: the guest computes
/// it from the string it is given, so a probe can check `$retval`.
pub const fn open_file_retval(dfd: i32, path: &str, flags: i32, mode: u32) -> i32 {
    ((fnv1a32(path.as_bytes()) ^ flags as u32 ^ (mode << 8) ^ dfd as u32) & 0x7fff_ffff) as i32
}

/// Byte `i` of the `hv_checksum_data` buffer.
pub const fn checksum_data_byte(i: usize) -> u8 {
    (i.wrapping_mul(37).wrapping_add(11) & 0xff) as u8
}

/// Return value of `hv_checksum(hv_checksum_data, len)`.
pub const fn checksum_retval(len: usize) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < len {
        sum = sum.rotate_left(1) ^ checksum_data_byte(i) as u32;
        i += 1;
    }
    sum
}

/// `hv_fib(n)`.
pub const fn fib(n: u32) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    let mut i = 0;
    while i < n {
        let t = a + b;
        a = b;
        b = t;
        i += 1;
    }
    a
}

/// Number of `hv_fib` calls (the counter increments) made by one `hv_fib(n)`.
pub const fn fib_calls(n: u32) -> u64 {
    // calls(n) = 1 + calls(n-1) + calls(n-2), calls(0) = calls(1) = 1.
    let (mut a, mut b) = (1u64, 1u64);
    let mut i = 1;
    while i < n {
        let t = 1 + a + b;
        a = b;
        b = t;
        i += 1;
    }
    if n == 0 {
        a
    } else {
        b
    }
}

/// `hv_recurse(depth)` = depth + (depth-1) + ... + 1.
pub const fn recurse_result(depth: u32) -> u64 {
    depth as u64 * (depth as u64 + 1) / 2
}
