//! The system-call bridge, for hosts whose KVM leaves a guest user-mode
//! `syscall` half done (see DESIGN.md, "User space on this host").
//!
//! On such a host (a nested KVM that emulates guest kernel mode), a user
//! `syscall` sets RIP=LSTAR, RCX, R11 and masks RFLAGS, but keeps the user
//! CS/SS, so the fetch at LSTAR raises #PF (error 0x15, CR2=LSTAR) straight
//! into the guest, with no VM exit. `int $0x80` gives #UD. Guest kernel code
//! is emulated here, and a VMM hardware breakpoint does fire on it, so:
//!
//! - DR0 sits on the guest's current #PF entry (IDT[14]), DR1 on its #UD
//!   entry (IDT[6]). They follow the live IDT: before every KVM_RUN the IDTR
//!   and the two gates are compared with what was armed (the gates are read
//!   from guest RAM at a cached physical address, re-translated only when
//!   IDTR or CR3 change).
//! - At the #PF entry, a frame that says "user fetch at LSTAR, CR2 = LSTAR"
//!   is a system call: the VMM completes it (CS/SS from STAR, RIP=LSTAR,
//!   RSP=user RSP, RFLAGS masked with SFMASK, R11 = the user flags), then
//!   runs the entry's first instructions itself up to the switch to the
//!   kernel stack ([`run_entry_prologue`]: `swapgs`, saving the user RSP in
//!   per-CPU data, loading the kernel stack), and the guest runs the rest of
//!   its own entry code and returns with its own `sysretq`/`iretq`. The
//!   prologue runs on the host because this host can deliver an interrupt
//!   that was already on its way when the `syscall` faulted, with IF clear,
//!   to the first instruction at LSTAR: on the user stack, before `swapgs`,
//!   which the guest cannot survive (measured: a double fault within
//!   seconds when the host stops the vCPUs every 5 ms, tests/debian_kicks.rs).
//!   After the prologue such an interrupt finds the kernel stack and the
//!   kernel's GS, as after any kernel instruction.
//! - Any other #PF is genuine: the VMM steps over the handler's first
//!   instruction (emulated with `insn-emu`, decoded from the bytes there at
//!   the time; a single-step only when the emulator refuses), so the guest's
//!   handler runs with the breakpoint still armed.
//! - At the #UD entry, `cd 80` at a user RIP with a DPL3 gate at IDT[0x80]
//!   is an `int $0x80`: the frame's RIP is advanced past it and the vCPU
//!   enters the IDT[0x80] handler. Other #UDs are passed on like page faults.
//!
//! None of this is needed on hardware KVM; [`crate::detect`] finds out.

pub(crate) const PF_VECTOR: u64 = 14;
pub(crate) const UD_VECTOR: u64 = 6;
pub(crate) const INT80_VECTOR: u64 = 0x80;
/// Slots of the guest-debug state the bridge uses.
pub(crate) const PF_SLOT: usize = 0;
pub(crate) const UD_SLOT: usize = 1;

pub(crate) const MSR_STAR: u32 = 0xc000_0081;
pub(crate) const MSR_LSTAR: u32 = 0xc000_0082;
pub(crate) const MSR_SFMASK: u32 = 0xc000_0084;
pub(crate) const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub(crate) const EFER_SCE: u64 = 1;
pub(crate) const EFER_LMA: u64 = 0x400;
pub(crate) const RFLAGS_RF: u64 = 1 << 16;
pub(crate) const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bits user code can change (CF PF AF ZF SF TF DF OF NT AC ID) plus
/// IF: what a real `syscall` leaves in R11 for user code.
pub(crate) const USER_RFLAGS: u64 = 0x0024_4dd5 | RFLAGS_IF;
/// #PF error code bits: U/S (user access), I/D (instruction fetch).
pub(crate) const PF_USER: u64 = 0x4;
pub(crate) const PF_FETCH: u64 = 0x10;
pub(crate) const EFER_NXE: u64 = 0x800;
pub(crate) const CR4_SMEP: u64 = 1 << 20;

/// A user-mode instruction fetch, as far as the error code can tell: the
/// CPU reports I/D only with NX or SMEP enabled; without either a user
/// fault at LSTAR (with CR2 = LSTAR) is taken as the fetch.
pub(crate) fn is_user_fetch(err: u64, efer: u64, cr4: u64) -> bool {
    let id_reported = efer & EFER_NXE != 0 || cr4 & CR4_SMEP != 0;
    err & PF_USER != 0 && (err & PF_FETCH != 0 || !id_reported)
}

/// What the bridge does, per process or per VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BridgeMode {
    /// On when the host needs it (detected once per process).
    #[default]
    Auto,
    /// On; refused on a host that completes system calls itself.
    On,
    /// Off (on a host that needs it, guest user system calls fail).
    Off,
}

impl std::str::FromStr for BridgeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BridgeMode::Auto),
            "on" => Ok(BridgeMode::On),
            "off" => Ok(BridgeMode::Off),
            other => Err(format!(
                "unknown system-call bridge mode {other:?} (auto, on, off)"
            )),
        }
    }
}

impl std::fmt::Display for BridgeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BridgeMode::Auto => "auto",
            BridgeMode::On => "on",
            BridgeMode::Off => "off",
        })
    }
}

/// Whether the bridge runs in a VM, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeStatus {
    pub requested: BridgeMode,
    pub active: bool,
    /// What detection found: `Some(true)` the host leaves user system calls
    /// half done, `Some(false)` it completes them, `None` not detected
    /// (mode `off`) or detection failed.
    pub host_needs_bridge: Option<bool>,
    /// One line for `hvprobe info` and logs.
    pub detail: String,
}

/// Decide from the requested mode and what detection found. `on` on a host
/// that completes system calls itself is refused: the bridge would only add
/// an exit to every page fault there.
pub(crate) fn resolve(
    requested: BridgeMode,
    detect: impl FnOnce() -> Result<bool, String>,
) -> Result<BridgeStatus, String> {
    let st = |active, host_needs_bridge, detail: String| BridgeStatus {
        requested,
        active,
        host_needs_bridge,
        detail,
    };
    Ok(match requested {
        BridgeMode::Off => st(false, None, "off (as requested)".into()),
        BridgeMode::Auto => match detect() {
            Ok(true) => st(
                true,
                Some(true),
                "on (detected: this host's KVM leaves guest user system calls half done)".into(),
            ),
            Ok(false) => st(
                false,
                Some(false),
                "off (detected: this host's KVM completes guest system calls)".into(),
            ),
            Err(e) => {
                tracing::warn!("system-call bridge: detection failed ({e}); leaving it off");
                st(false, None, format!("off (detection failed: {e})"))
            }
        },
        BridgeMode::On => {
            match detect() {
                Ok(true) => st(
                    true,
                    Some(true),
                    "on (as requested; detection agrees the host needs it)".into(),
                ),
                Ok(false) => return Err(
                    "--syscall-bridge on: this host's KVM completes guest system calls itself, \
                     so the bridge is not needed (use auto or off)"
                        .into(),
                ),
                Err(e) => {
                    tracing::warn!("system-call bridge: detection failed ({e}); on as requested");
                    st(
                        true,
                        None,
                        format!("on (as requested; detection failed: {e})"),
                    )
                }
            }
        }
    })
}

/// A decoded 64-bit IDT gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gate {
    pub handler: u64,
    pub dpl: u8,
    pub ist: u8,
    /// 0xe interrupt gate, 0xf trap gate.
    pub kind: u8,
}

/// Decode a 16-byte IDT entry; `None` unless it is a present 64-bit
/// interrupt or trap gate.
pub(crate) fn parse_gate(b: &[u8; 16]) -> Option<Gate> {
    let attr = b[5];
    let kind = attr & 0xf;
    if attr & 0x80 == 0 || !(kind == 0xe || kind == 0xf) {
        return None;
    }
    let lo = u64::from(u16::from_le_bytes([b[0], b[1]]));
    let mid = u64::from(u16::from_le_bytes([b[6], b[7]]));
    let hi = u64::from(u32::from_le_bytes([b[8], b[9], b[10], b[11]]));
    Some(Gate {
        handler: lo | (mid << 16) | (hi << 32),
        dpl: (attr >> 5) & 3,
        ist: b[4] & 7,
        kind,
    })
}

/// The bridge's per-vCPU view of the guest IDT.
#[derive(Default)]
pub(crate) struct BridgeState {
    /// (IDTR base, IDTR limit, CR3) the cached gate addresses belong to.
    pub(crate) key: Option<(u64, u16, u64)>,
    /// Guest-physical address of IDT[14] and IDT[6] (None: beyond the limit
    /// or not mapped).
    pub(crate) pf_gpa: Option<u64>,
    pub(crate) ud_gpa: Option<u64>,
    /// Raw gates last seen.
    pub(crate) pf_raw: Option<[u8; 16]>,
    pub(crate) ud_raw: Option<[u8; 16]>,
    /// The gates were looked at once (the first look always decides).
    pub(crate) looked: bool,
    /// The IDT had no usable #PF gate at the last look.
    pub(crate) no_pf_handler: bool,
}

/// The registers the system-call entry's prologue changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
}

/// Guest memory through the vCPU's page tables, for [`run_entry_prologue`].
pub(crate) trait EntryMemory {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&mut self, gva: u64, data: &[u8]) -> Result<(), String>;
}

/// How far [`run_entry_prologue`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryProgress {
    /// Instructions completed.
    pub instructions: u32,
    /// RSP now holds the kernel stack (the last one was the load of it).
    pub on_kernel_stack: bool,
}

/// Most instructions the prologue may take before the stack switch (Linux:
/// swapgs, the save, a jump over the page-table switch, the load).
const PROLOGUE_MAX: u32 = 8;

/// Run a Linux-shaped `entry_SYSCALL_64` prologue from `st.rip` on the host:
/// `swapgs`, `mov %rsp, %gs:ABS` (the user RSP into per-CPU data), `jmp`,
/// `nop`s and `endbr64`, up to and including `mov %gs:ABS, %rsp` (the
/// kernel stack). Each instruction is decoded from guest memory as it is
/// now and done exactly as the CPU would; the first one of another shape
/// (or one whose memory access fails) stops the run there, with `st` as it
/// stood after the last completed instruction, so the guest can go on from
/// any stop.
pub(crate) fn run_entry_prologue(mem: &mut dyn EntryMemory, st: &mut EntryState) -> EntryProgress {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    let mut progress = EntryProgress {
        instructions: 0,
        on_kernel_stack: false,
    };
    // A per-CPU operand: %gs:ABS with no base or index register.
    let gs_abs = |i: &iced_x86::Instruction, st: &EntryState| {
        (i.segment_prefix() == Register::GS
            && i.memory_base() == Register::None
            && i.memory_index() == Register::None)
            .then(|| st.gs_base.wrapping_add(i.memory_displacement64()))
    };
    while progress.instructions < PROLOGUE_MAX && !progress.on_kernel_stack {
        let mut code = [0u8; 16];
        // The next page may be unmapped: then take the rest of this one.
        let to_page_end = usize::try_from(0x1000 - (st.rip & 0xfff)).unwrap_or(16);
        let Some(n) = [16, to_page_end.min(16)]
            .into_iter()
            .find(|&n| mem.read(st.rip, &mut code[..n]).is_ok())
        else {
            break;
        };
        let i = Decoder::with_ip(64, &code[..n], st.rip, DecoderOptions::NONE).decode();
        if i.is_invalid() {
            break;
        }
        let next = i.next_ip();
        match i.mnemonic() {
            Mnemonic::Swapgs => {
                std::mem::swap(&mut st.gs_base, &mut st.kernel_gs_base);
                st.rip = next;
            }
            Mnemonic::Nop | Mnemonic::Endbr64 => st.rip = next,
            Mnemonic::Jmp if matches!(i.op0_kind(), OpKind::NearBranch64) => {
                st.rip = i.near_branch_target();
            }
            Mnemonic::Mov
                if i.op0_kind() == OpKind::Memory
                    && i.op1_kind() == OpKind::Register
                    && i.op1_register() == Register::RSP =>
            {
                let Some(addr) = gs_abs(&i, st) else { break };
                if mem.write(addr, &st.rsp.to_le_bytes()).is_err() {
                    break;
                }
                st.rip = next;
            }
            Mnemonic::Mov
                if i.op0_kind() == OpKind::Register
                    && i.op0_register() == Register::RSP
                    && i.op1_kind() == OpKind::Memory =>
            {
                let Some(addr) = gs_abs(&i, st) else { break };
                let mut b = [0u8; 8];
                if mem.read(addr, &mut b).is_err() {
                    break;
                }
                st.rsp = u64::from_le_bytes(b);
                st.rip = next;
                progress.on_kernel_stack = true;
            }
            _ => break,
        }
        progress.instructions += 1;
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;

    // The handler address is split into the gate's 16/16/32-bit offset fields.
    #[allow(clippy::cast_possible_truncation)]
    fn gate(handler: u64, attr: u8, ist: u8) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        b[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        b[4] = ist;
        b[5] = attr;
        b[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        b[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        b
    }

    #[test]
    fn gates_decode() {
        let g = parse_gate(&gate(0xffff_ffff_8160_0a10, 0x8e, 0)).unwrap();
        assert_eq!(g.handler, 0xffff_ffff_8160_0a10);
        assert_eq!((g.dpl, g.ist, g.kind), (0, 0, 0xe));
        let g = parse_gate(&gate(0xffff_ffff_8160_0b00, 0xef, 2)).unwrap();
        assert_eq!((g.dpl, g.ist, g.kind), (3, 2, 0xf));
        // Not present, or not a 64-bit gate: no handler.
        assert_eq!(parse_gate(&gate(0xffff_ffff_8160_0a10, 0x0e, 0)), None);
        assert_eq!(parse_gate(&[0u8; 16]), None);
        assert_eq!(parse_gate(&gate(0x1000, 0x85, 0)), None);
    }

    #[test]
    fn modes_resolve() {
        let needs = || Ok(true);
        let native = || Ok(false);
        let broken = || Err("no KVM".to_string());
        let s = resolve(BridgeMode::Auto, needs).unwrap();
        assert!(s.active && s.host_needs_bridge == Some(true));
        let s = resolve(BridgeMode::Auto, native).unwrap();
        assert!(!s.active && s.host_needs_bridge == Some(false));
        assert!(!resolve(BridgeMode::Auto, broken).unwrap().active);
        // Off never asks the host.
        let s = resolve(BridgeMode::Off, || panic!("detected")).unwrap();
        assert!(!s.active && s.host_needs_bridge.is_none());
        assert!(resolve(BridgeMode::On, needs).unwrap().active);
        assert!(resolve(BridgeMode::On, broken).unwrap().active);
        let e = resolve(BridgeMode::On, native).unwrap_err();
        assert!(e.contains("not needed"), "{e}");
    }

    #[test]
    fn user_fetch_from_the_error_code() {
        // Linux (NX on): 0x15 = present | user | fetch.
        assert!(is_user_fetch(0x15, EFER_NXE, 0));
        // A user read of the same page is not a fetch when NX is on.
        assert!(!is_user_fetch(0x5, EFER_NXE, 0));
        // Without NX or SMEP the CPU never sets I/D.
        assert!(is_user_fetch(0x5, 0, 0));
        assert!(!is_user_fetch(0x5, 0, CR4_SMEP));
        // Kernel-mode faults never are.
        assert!(!is_user_fetch(0x11, EFER_NXE, 0));
        assert!(!is_user_fetch(0x1, 0, 0));
    }

    #[test]
    fn modes_parse() {
        for m in [BridgeMode::Auto, BridgeMode::On, BridgeMode::Off] {
            assert_eq!(m.to_string().parse::<BridgeMode>().unwrap(), m);
        }
        assert!("yes".parse::<BridgeMode>().is_err());
    }

    /// Guest memory for the prologue tests: a few byte ranges.
    struct Mem(Vec<(u64, Vec<u8>)>);

    impl Mem {
        fn at(&mut self, gva: u64, len: usize) -> Option<&mut [u8]> {
            self.0.iter_mut().find_map(|(base, bytes)| {
                let off = usize::try_from(gva.checked_sub(*base)?).ok()?;
                bytes.get_mut(off..off.checked_add(len)?)
            })
        }
        fn u64_at(&mut self, gva: u64) -> u64 {
            u64::from_le_bytes(self.at(gva, 8).unwrap().try_into().unwrap())
        }
    }

    impl EntryMemory for Mem {
        fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), String> {
            let src = self.at(gva, buf.len()).ok_or("unmapped")?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&mut self, gva: u64, data: &[u8]) -> Result<(), String> {
            self.at(gva, data.len())
                .ok_or("unmapped")?
                .copy_from_slice(data);
            Ok(())
        }
    }

    const LSTAR: u64 = 0xffff_ffff_81c0_0080;
    const KGS: u64 = 0xffff_8880_1f20_0000;
    const USER_RSP: u64 = 0x7ffe_4ebf_4dd8;
    const KSTACK: u64 = 0xffff_c900_0040_3ff8;

    /// Debian 6.1's entry_SYSCALL_64 as alternatives leave it with PTI off:
    /// swapgs; mov %rsp,%gs:0x6014; jmp over the CR3 switch; mov %gs:0x1fb50,%rsp.
    fn debian_entry() -> Vec<u8> {
        let mut code = vec![0x0f, 0x01, 0xf8];
        code.extend([0x65, 0x48, 0x89, 0x24, 0x25, 0x14, 0x60, 0x00, 0x00]);
        code.extend([0xeb, 0x12]);
        code.extend([0x0f, 0x20, 0xdc, 0x0f, 0x1f, 0x44, 0x00, 0x00]);
        code.extend([0x48, 0x81, 0xe4, 0xff, 0xe7, 0xff, 0xff, 0x0f, 0x22, 0xdc]);
        code.extend([0x65, 0x48, 0x8b, 0x24, 0x25, 0x50, 0xfb, 0x01, 0x00]);
        code.extend([0x6a, 0x2b]);
        code.resize(64, 0xcc);
        code
    }

    fn percpu() -> Vec<u8> {
        let mut p = vec![0u8; 0x20000];
        p[0x1fb50..0x1fb58].copy_from_slice(&KSTACK.to_le_bytes());
        p
    }

    fn user_state() -> EntryState {
        EntryState {
            rip: LSTAR,
            rsp: USER_RSP,
            gs_base: 0,
            kernel_gs_base: KGS,
        }
    }

    #[test]
    fn debian_entry_prologue_ends_on_the_kernel_stack() {
        let mut mem = Mem(vec![(LSTAR, debian_entry()), (KGS, percpu())]);
        let mut st = user_state();
        let p = run_entry_prologue(&mut mem, &mut st);
        assert_eq!(
            p,
            EntryProgress {
                instructions: 4,
                on_kernel_stack: true
            }
        );
        assert_eq!(
            st,
            EntryState {
                rip: LSTAR + 0x29,
                rsp: KSTACK,
                gs_base: KGS,
                kernel_gs_base: 0,
            }
        );
        // The user RSP is where the kernel will push it from (TSS.sp2).
        assert_eq!(mem.u64_at(KGS + 0x6014), USER_RSP);
    }

    #[test]
    fn prologue_stops_at_an_unknown_instruction_with_what_it_did() {
        // PTI on: the CR3 switch is not jumped over; the run stops at it.
        let mut code = debian_entry();
        code[12..14].copy_from_slice(&[0x66, 0x90]);
        let mut mem = Mem(vec![(LSTAR, code), (KGS, percpu())]);
        let mut st = user_state();
        let p = run_entry_prologue(&mut mem, &mut st);
        assert_eq!(
            p,
            EntryProgress {
                instructions: 3,
                on_kernel_stack: false
            }
        );
        assert_eq!((st.rip, st.rsp, st.gs_base), (LSTAR + 14, USER_RSP, KGS));
        assert_eq!(mem.u64_at(KGS + 0x6014), USER_RSP);
    }

    #[test]
    fn prologue_without_the_per_cpu_page_stops_after_swapgs() {
        // The save faults: swapgs is done, the save is not, RSP stays.
        let mut mem = Mem(vec![(LSTAR, debian_entry())]);
        let mut st = user_state();
        let p = run_entry_prologue(&mut mem, &mut st);
        assert_eq!(p.instructions, 1);
        assert!(!p.on_kernel_stack);
        assert_eq!(
            st,
            EntryState {
                rip: LSTAR + 3,
                rsp: USER_RSP,
                gs_base: KGS,
                kernel_gs_base: 0,
            }
        );
        // Unreadable code: nothing at all.
        let mut mem = Mem(vec![]);
        let mut st = user_state();
        assert_eq!(run_entry_prologue(&mut mem, &mut st).instructions, 0);
        assert_eq!(st, user_state());
    }

    #[test]
    fn prologue_runs_at_most_a_few_instructions() {
        // A loop of nops never becomes a stack switch: bounded.
        let mut mem = Mem(vec![(LSTAR, vec![0x90; 64])]);
        let mut st = user_state();
        let p = run_entry_prologue(&mut mem, &mut st);
        assert_eq!(p.instructions, PROLOGUE_MAX);
        assert!(!p.on_kernel_stack);
        // A load of RSP from anything but %gs:ABS is not the stack switch.
        let mut mem = Mem(vec![(LSTAR, vec![0x48, 0x8b, 0x24, 0x24])]);
        let mut st = user_state();
        assert_eq!(run_entry_prologue(&mut mem, &mut st).instructions, 0);
    }
}
