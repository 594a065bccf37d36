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
//!   RSP=user RSP, RFLAGS masked with SFMASK, R11 = the user flags) and the
//!   guest runs its own entry code and returns with its own `sysretq`/`iretq`.
//! - Any other #PF is genuine: the VMM steps over the handler's first
//!   instruction (emulated with `insn-emu`, decoded from the bytes there at
//!   the time; a single-step only when the emulator refuses), so the guest's
//!   handler runs with the breakpoint still armed.
//! - At the #UD entry, `cd 80` at a user RIP with a DPL3 gate at IDT[0x80]
//!   is an `int $0x80`: the frame's RIP is advanced past it and the vCPU
//!   enters the IDT[0x80] handler. Other #UDs are passed on like page faults.
//!
//! None of this is needed on hardware KVM; [`crate::detect`] finds out.

use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::SyncReg;

use guest_access::GuestMemory;

use crate::cpu::flat_long_mode_segment;
use crate::gaps::GapCpu;
use crate::vcpu::VcpuRunner;

const PF_VECTOR: u64 = 14;
const UD_VECTOR: u64 = 6;
const INT80_VECTOR: u64 = 0x80;
/// Slots of the guest-debug state the bridge uses.
pub(crate) const PF_SLOT: usize = 0;
pub(crate) const UD_SLOT: usize = 1;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1;
const EFER_LMA: u64 = 0x400;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bits user code can change (CF PF AF ZF SF TF DF OF NT AC ID) plus
/// IF: what a real `syscall` leaves in R11 for user code.
const USER_RFLAGS: u64 = 0x0024_4dd5 | RFLAGS_IF;
/// #PF error code bits: U/S (user access), I/D (instruction fetch).
const PF_USER: u64 = 0x4;
const PF_FETCH: u64 = 0x10;
const EFER_NXE: u64 = 0x800;
const CR4_SMEP: u64 = 1 << 20;

/// A user-mode instruction fetch, as far as the error code can tell: the
/// CPU reports I/D only with NX or SMEP enabled; without either a user
/// fault at LSTAR (with CR2 = LSTAR) is taken as the fetch.
fn is_user_fetch(err: u64, efer: u64, cr4: u64) -> bool {
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
    key: Option<(u64, u16, u64)>,
    /// Guest-physical address of IDT[14] and IDT[6] (None: beyond the limit
    /// or not mapped).
    pf_gpa: Option<u64>,
    ud_gpa: Option<u64>,
    /// Raw gates last seen.
    pf_raw: Option<[u8; 16]>,
    ud_raw: Option<[u8; 16]>,
    /// The gates were looked at once (the first look always decides).
    looked: bool,
    /// The IDT had no usable #PF gate at the last look.
    pub no_pf_handler: bool,
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}

/// insn-emu's view of guest memory: the vCPU's current page tables.
struct EmuMem<'a>(&'a mut VcpuRunner);

impl insn_emu::GuestMemory for EmuMem<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), insn_emu::MemFault> {
        self.0
            .read_virt(addr, buf)
            .map_err(|_| insn_emu::MemFault { addr })
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), insn_emu::MemFault> {
        self.0
            .write_virt(addr, data)
            .map_err(|_| insn_emu::MemFault { addr })
    }
}

fn to_emu(r: &kvm_regs) -> insn_emu::Regs {
    insn_emu::Regs {
        gpr: [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn from_emu(e: &insn_emu::Regs, r: &mut kvm_regs) {
    let g = e.gpr;
    (r.rax, r.rcx, r.rdx, r.rbx) = (g[0], g[1], g[2], g[3]);
    (r.rsp, r.rbp, r.rsi, r.rdi) = (g[4], g[5], g[6], g[7]);
    (r.r8, r.r9, r.r10, r.r11) = (g[8], g[9], g[10], g[11]);
    (r.r12, r.r13, r.r14, r.r15) = (g[12], g[13], g[14], g[15]);
    r.rip = e.rip;
    r.rflags = e.rflags;
}

impl VcpuRunner {
    /// Follow the guest's live IDT: re-arm DR0/DR1 when the #PF or #UD gate
    /// changed. Runs before every KVM_RUN (after the first exit, when the
    /// sync-regs copy is valid); costs two 16-byte reads of guest RAM unless
    /// IDTR or CR3 changed.
    pub(crate) fn bridge_refresh(&mut self) {
        let sregs = self.fd.sync_regs().sregs;
        // Only a 64-bit guest that enabled `syscall` (EFER.SCE; Linux does at
        // CPU init) gets the breakpoints: armed DR0..DR3 make every VM entry
        // and exit dearer on this host (measured: a bare exit ~2x).
        let (pf, ud) = if sregs.efer & EFER_LMA == 0 || sregs.efer & EFER_SCE == 0 {
            self.bridge.key = None;
            (None, None)
        } else {
            let key = (sregs.idt.base, sregs.idt.limit, sregs.cr3);
            if self.bridge.key != Some(key) {
                self.bridge.key = Some(key);
                self.bridge.pf_gpa = self.gate_gpa(sregs.idt.base, sregs.idt.limit, PF_VECTOR);
                self.bridge.ud_gpa = self.gate_gpa(sregs.idt.base, sregs.idt.limit, UD_VECTOR);
            }
            let read = |gpa: Option<u64>, me: &Self| {
                let gpa = gpa?;
                let mut b = [0u8; 16];
                me.shared.ram.read_phys(gpa, &mut b).ok()?;
                Some(b)
            };
            (
                read(self.bridge.pf_gpa, self),
                read(self.bridge.ud_gpa, self),
            )
        };
        if pf == self.bridge.pf_raw && ud == self.bridge.ud_raw && self.bridge.looked {
            return;
        }
        self.bridge.looked = true;
        self.bridge.pf_raw = pf;
        self.bridge.ud_raw = ud;
        let pf_gate = pf.as_ref().and_then(parse_gate);
        let ud_gate = ud.as_ref().and_then(parse_gate);
        self.bridge.no_pf_handler = pf_gate.is_none();
        let want = (pf_gate.map(|g| g.handler), ud_gate.map(|g| g.handler));
        if (self.debug.hw[PF_SLOT], self.debug.hw[UD_SLOT]) == want {
            return;
        }
        self.debug.hw[PF_SLOT] = want.0;
        self.debug.hw[UD_SLOT] = want.1;
        let stats = &self.shared.stats[self.index];
        stats.bridge_rearms.fetch_add(1, Ordering::Relaxed);
        if pf_gate.is_none() {
            stats.bridge_no_pf_handler.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            "vCPU {}: system-call bridge follows the IDT at {:#x}: #PF entry {:?}, #UD entry {:?}",
            self.index,
            sregs.idt.base,
            want.0.map(|a| format!("{a:#x}")),
            want.1.map(|a| format!("{a:#x}"))
        );
        if let Err(e) = self.apply_debug() {
            tracing::warn!(
                "vCPU {}: cannot arm the system-call bridge: {e}",
                self.index
            );
        }
    }

    fn gate_gpa(&mut self, base: u64, limit: u16, vector: u64) -> Option<u64> {
        if u64::from(limit) < vector * 16 + 15 {
            return None;
        }
        let gva = base.wrapping_add(vector * 16);
        // A gate never straddles a page in a 16-byte-aligned IDT; check anyway.
        if gva & 0xfff > 0xff0 {
            return None;
        }
        self.gva_to_gpa(gva).ok()
    }

    /// A VM exit at one of the bridge's breakpoints. `Err` stops the vCPU.
    pub(crate) fn bridge_exit(&mut self, slot: usize, pc: u64) -> Result<(), String> {
        match slot {
            PF_SLOT => self.bridge_page_fault(pc),
            UD_SLOT => self.bridge_invalid_opcode(pc),
            _ => Err(format!("hardware breakpoint slot {slot} has no owner")),
        }
    }

    fn msr3(&self) -> Result<(u64, u64, u64), String> {
        let mut m = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_STAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_LSTAR,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_SFMASK,
                ..Default::default()
            },
        ])
        .map_err(|e| format!("MSR list: {e:?}"))?;
        let n = self
            .fd
            .get_msrs(&mut m)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        if n != 3 {
            return Err(format!("KVM_GET_MSRS returned {n} of 3"));
        }
        let e = m.as_slice();
        Ok((e[0].data, e[1].data, e[2].data))
    }

    fn bridge_page_fault(&mut self, pc: u64) -> Result<(), String> {
        let mut regs = self.fd.sync_regs().regs;
        let mut sregs = self.fd.sync_regs().sregs;
        let mut frame = [0u8; 48];
        if self.read_virt(regs.rsp, &mut frame).is_ok() && sregs.efer & EFER_SCE != 0 {
            let (err, rip, cs, rflags, rsp) = (
                u64_at(&frame, 0),
                u64_at(&frame, 1),
                u64_at(&frame, 2),
                u64_at(&frame, 3),
                u64_at(&frame, 4),
            );
            if cs & 3 == 3 && is_user_fetch(err, sregs.efer, sregs.cr4) {
                let (star, lstar, sfmask) = self.msr3()?;
                if rip == lstar && sregs.cr2 == lstar {
                    let kcs = ((star >> 32) & 0xffff) as u16;
                    regs.rip = lstar;
                    regs.rsp = rsp;
                    regs.rflags = (rflags & !(sfmask | RFLAGS_RF)) | 2;
                    regs.r11 = (regs.r11 & USER_RFLAGS) | 2;
                    sregs.cs = flat_long_mode_segment(kcs, true, 0);
                    sregs.ss = flat_long_mode_segment(kcs.wrapping_add(8), false, 0);
                    self.fd.sync_regs_mut().regs = regs;
                    self.fd.sync_regs_mut().sregs = sregs;
                    self.fd.set_sync_dirty_reg(SyncReg::Register);
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                    self.shared.stats[self.index]
                        .bridge_syscalls
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        self.pass_on_counted(pc)
    }

    fn bridge_invalid_opcode(&mut self, pc: u64) -> Result<(), String> {
        let mut regs = self.fd.sync_regs().regs;
        let sregs = self.fd.sync_regs().sregs;
        let mut frame = [0u8; 40];
        if self.read_virt(regs.rsp, &mut frame).is_ok() {
            let (rip, cs, rflags) = (u64_at(&frame, 0), u64_at(&frame, 1), u64_at(&frame, 2));
            let mut insn = [0u8; 2];
            let is_int80 =
                cs & 3 == 3 && self.read_virt(rip, &mut insn).is_ok() && insn == [0xcd, 0x80];
            let gates = if is_int80 {
                let ud = self.bridge.ud_raw.as_ref().and_then(parse_gate);
                let int80 = self
                    .gate_gpa(sregs.idt.base, sregs.idt.limit, INT80_VECTOR)
                    .and_then(|gpa| {
                        let mut b = [0u8; 16];
                        self.shared.ram.read_phys(gpa, &mut b).ok()?;
                        parse_gate(&b)
                    });
                ud.zip(int80)
            } else {
                None
            };
            if let Some((ud, g)) = gates {
                if g.dpl == 3 && g.ist == 0 && ud.ist == 0 {
                    self.write_virt(regs.rsp, &(rip + 2).to_le_bytes())?;
                    regs.rip = g.handler;
                    // The #UD gate may have cleared IF where a trap gate would not.
                    if g.kind == 0xf {
                        regs.rflags |= rflags & RFLAGS_IF;
                    }
                    self.fd.sync_regs_mut().regs = regs;
                    self.fd.set_sync_dirty_reg(SyncReg::Register);
                    self.shared.stats[self.index]
                        .bridge_int80
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        self.pass_on_counted(pc)
    }

    /// Not a system call: count it and let the guest's handler have it.
    fn pass_on_counted(&mut self, pc: u64) -> Result<(), String> {
        self.shared.stats[self.index]
            .bridge_faults_passed
            .fetch_add(1, Ordering::Relaxed);
        self.pass_on(pc)
    }

    /// Let the guest's own handler run: execute its first instruction on the
    /// host (RF does not suppress the breakpoint on this host), or single-step
    /// it with the hardware breakpoints left out when the emulator refuses.
    fn pass_on(&mut self, pc: u64) -> Result<(), String> {
        let mut code = [0u8; 16];
        let mut got = 0;
        // The entry may sit near the end of a page: take what is readable.
        for n in [16usize, 8, 4, 2, 1] {
            if self.read_virt(pc, &mut code[..n]).is_ok() {
                got = n;
                break;
            }
        }
        if got > 0 {
            if let Ok(d) = insn_emu::prepare(&code[..got], pc) {
                if d.is_emulated() {
                    let mut kregs = self.fd.sync_regs().regs;
                    let mut e = to_emu(&kregs);
                    if d.emulate(&mut e, &mut EmuMem(self)).is_ok() {
                        from_emu(&e, &mut kregs);
                        self.fd.sync_regs_mut().regs = kregs;
                        self.fd.set_sync_dirty_reg(SyncReg::Register);
                        return Ok(());
                    }
                }
            }
        }
        self.shared.stats[self.index]
            .bridge_step_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        self.step_without_hw_breakpoints(pc)
            .map_err(|e| format!("stepping over the handler entry at {pc:#x}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
