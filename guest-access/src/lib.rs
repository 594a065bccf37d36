//! The narrow interface between the hvprobe VMM and the probe engine.
//!
//! The VMM (crate `vmm`) implements these traits over KVM; the probe engine
//! (crate `introspect`) only sees them, so it can be unit-tested against fakes
//! and the VMM knows nothing about probes.
//!
//! Threading model: every vCPU is owned by one thread. A breakpoint handler runs
//! on the thread of the vCPU that trapped, with that vCPU stopped in its exit
//! ([`Vcpu`]). Whole-VM actions (memory, stopping the other vCPUs) go through
//! [`VmControl`], which is shared by all threads.
//!
//! With the cargo feature `fake`, [`fake`] implements these traits in memory
//! (guest RAM, page tables, vCPUs a test drives) for tests without KVM.

use std::fmt;

#[cfg(feature = "fake")]
pub mod fake;

/// General-purpose registers, instruction pointer and flags of a vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl Regs {
    /// The 16 GPRs in hardware encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi,
    /// rdi, r8..r15), the order instruction decoders and emulators use.
    pub fn gprs(&self) -> [u64; 16] {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi,
            self.r8, self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    /// Set the 16 GPRs from hardware encoding order (see [`Regs::gprs`]).
    pub fn set_gprs(&mut self, g: [u64; 16]) {
        [
            self.rax, self.rcx, self.rdx, self.rbx, self.rsp, self.rbp, self.rsi, self.rdi,
            self.r8, self.r9, self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ] = g;
    }
}

/// The system state a probe engine needs: paging mode and privilege level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemRegs {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Current privilege level (CS.RPL / SS.DPL).
    pub cpl: u8,
    /// True when the vCPU executes 64-bit code (EFER.LMA and CS.L).
    pub long_mode: bool,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    /// IDTR base: where the guest's interrupt gates are (0 before it set one).
    pub idt_base: u64,
}

impl SystemRegs {
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_LA57: u64 = 1 << 12;

    /// Whether paging is enabled at all.
    pub fn paging(&self) -> bool {
        self.cr0 & Self::CR0_PG != 0
    }

    /// Whether 5-level paging is active.
    pub fn la57(&self) -> bool {
        self.cr4 & Self::CR4_LA57 != 0
    }
}

/// An error from a guest access. Says what was attempted and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// A guest-physical address outside guest RAM.
    #[error("guest-physical address {gpa:#x} (+{len} bytes) is outside guest RAM")]
    OutOfRam { gpa: u64, len: usize },
    /// A KVM ioctl failed.
    #[error("{op} failed on vCPU {vcpu}: {errno}")]
    Kvm {
        op: &'static str,
        vcpu: usize,
        errno: String,
    },
    /// The vCPU thread is gone (the guest stopped).
    #[error("vCPU {0} is no longer running")]
    VcpuGone(usize),
    /// Single-step did not complete (the guest stopped or an unexpected exit came first).
    #[error("single-step on vCPU {vcpu} at {rip:#x} did not complete: {why}")]
    StepFailed { vcpu: usize, rip: u64, why: String },
}

/// Why no debug-register slot could be had for a hardware breakpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HwSlotError {
    /// Every slot is held; `holders` names each ("DR0: system-call bridge, ...").
    #[error(
        "no free debug register for a hardware breakpoint at {addr:#x}: all {total} are in use ({holders})"
    )]
    NoneFree {
        addr: u64,
        total: usize,
        holders: String,
    },
    /// The VM offers no debug-register breakpoints.
    #[error("this VM offers no debug-register breakpoints")]
    Unsupported,
}

/// One held debug-register slot (DR0..DR3), for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwSlotUse {
    pub slot: usize,
    /// "system-call bridge", or what the engine named when it claimed it.
    pub owner: String,
    /// The breakpoint's address (None for the bridge, whose address
    /// follows each vCPU's IDT).
    pub addr: Option<u64>,
}

/// A guest write to a write-protected page ([`VmControl::protect_page`]),
/// already completed into guest RAM by the VMM: one KVM write exit, 1..8
/// bytes inside one page (larger writes and `rep` string instructions
/// arrive as several).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtectedWrite {
    pub gpa: u64,
    pub len: usize,
    /// The bytes at `gpa` before and after the write (first `len` valid).
    pub old: [u8; 8],
    pub new: [u8; 8],
    /// RIP after the writing instruction (KVM advances it before the exit).
    pub rip_after: u64,
}

/// Guest-physical memory, shared by all threads.
pub trait GuestMemory: Send + Sync {
    /// Read `buf.len()` bytes at guest-physical `gpa`.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Write `data` at guest-physical `gpa`.
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError>;
    /// One past the highest guest-physical RAM address.
    fn ram_end(&self) -> u64;
}

/// A vCPU stopped in a VM exit, accessed from its own thread.
pub trait Vcpu {
    /// The vCPU index (0 is the boot CPU).
    fn index(&self) -> usize;
    fn regs(&mut self) -> Result<Regs, AccessError>;
    fn set_regs(&mut self, regs: &Regs) -> Result<(), AccessError>;
    fn system_regs(&mut self) -> Result<SystemRegs, AccessError>;
    /// Execute exactly one guest instruction with interrupts blocked, then stop.
    /// Device exits met on the way are served as usual.
    fn single_step(&mut self) -> Result<(), AccessError>;
}

/// Keeps the other vCPUs parked until dropped.
pub struct StopGuard<'a> {
    resume: Option<Box<dyn FnOnce() + 'a>>,
}

impl<'a> StopGuard<'a> {
    /// A guard that runs `resume` when dropped.
    pub fn new(resume: impl FnOnce() + 'a) -> Self {
        Self {
            resume: Some(Box::new(resume)),
        }
    }
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        if let Some(resume) = self.resume.take() {
            resume();
        }
    }
}

impl fmt::Debug for StopGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StopGuard")
    }
}

/// Work to run on a vCPU's own thread (see [`VmControl::with_vcpu`]).
pub type VcpuTask = Box<dyn FnOnce(&mut dyn Vcpu) + Send>;

/// Whole-VM control, shared by all threads.
pub trait VmControl: Send + Sync {
    fn memory(&self) -> &dyn GuestMemory;
    fn vcpu_count(&self) -> usize;
    /// Park every vCPU except `except` (the caller's own, when called from a
    /// handler) outside guest mode; returns once they are all parked. The
    /// vCPUs run again when the guard is dropped. Safe to call from several
    /// vCPU threads at once: one stopper at a time, the others park.
    fn stop_others(&self, except: Option<usize>) -> StopGuard<'_>;
    /// Run `f` on vCPU `index`'s own thread (waits for it). Used to read
    /// registers of a parked vCPU.
    fn with_vcpu(&self, index: usize, f: VcpuTask) -> Result<(), AccessError>;

    /// System registers of vCPU 0 while no vCPU thread runs yet, when the
    /// VM starts from saved state (a restored snapshot: paging is already
    /// on, so guest virtual addresses need the saved CR3). None for a VM
    /// that boots from its first instruction.
    fn saved_system_regs(&self) -> Option<SystemRegs> {
        None
    }

    /// Claim a debug-register slot for an execute breakpoint at `addr` on
    /// every vCPU. Call with the world stopped: each vCPU arms it before it
    /// next enters the guest. A hit arrives as [`TrapKind::HardwareBreakpoint`]
    /// with RIP at `addr` and the instruction not yet run (the handler must
    /// run it, e.g. emulate it; resuming at `addr` traps again).
    fn claim_hw_breakpoint(&self, addr: u64, _owner: &str) -> Result<usize, HwSlotError> {
        let _ = addr;
        Err(HwSlotError::Unsupported)
    }

    /// Give back a slot from [`VmControl::claim_hw_breakpoint`] (world
    /// stopped; each vCPU disarms it before it next enters the guest).
    fn release_hw_breakpoint(&self, _slot: usize) {}

    /// Every held debug-register slot.
    fn hw_slots(&self) -> Vec<HwSlotUse> {
        Vec::new()
    }

    /// Hold every vCPU at its next checkpoint (outside guest mode, still
    /// serving requests, counted as parked for stoppers) until
    /// [`Self::release_all`]: a probe's `freeze` action. The caller's own
    /// vCPU holds as soon as its handler returns. False when this VM cannot
    /// hold its vCPUs (nothing changed then).
    fn hold_all(&self) -> bool {
        false
    }

    /// Let held vCPUs run again (see [`Self::hold_all`]).
    fn release_all(&self) {}

    /// Whether the vCPUs are held (see [`Self::hold_all`]).
    fn is_held(&self) -> bool {
        false
    }

    /// Write-protect the guest-physical page at `page` (4 KiB aligned):
    /// from now on every guest write to it is completed by the VMM, which
    /// reports it to [`BreakpointHandler::on_protected_write`]. Call with
    /// the world stopped (the VMM refuses otherwise: changing KVM memory
    /// slots under a running vCPU would show it a hole).
    fn protect_page(&self, page: u64) -> Result<(), String> {
        Err(format!(
            "this VM cannot write-protect guest pages (page {page:#x})"
        ))
    }

    /// Undo [`Self::protect_page`] (world stopped); unknown pages are ignored.
    fn unprotect_page(&self, _page: u64) -> Result<(), String> {
        Ok(())
    }

    /// Whether debug-register data breakpoints fire for guest kernel code
    /// on this host (Err says why not).
    fn data_breakpoints(&self) -> Result<(), String> {
        Err("this VM offers no debug-register data breakpoints".into())
    }
}

/// What the VMM does after a breakpoint handler returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakpointAction {
    /// The handler dealt with the hit (it set RIP and any registers); resume.
    /// Also for a stale trap whose `int3` was removed in the meantime: resume
    /// at the same RIP and the original instruction runs.
    Resume,
    /// Not a host breakpoint: the guest placed this `int3` itself; deliver #BP.
    DeliverToGuest,
}

/// Where a breakpoint exit came from (for statistics and diagnostics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapKind {
    /// KVM_EXIT_DEBUG with exception 3 (hardware KVM with USE_SW_BP).
    DebugExit,
    /// KVM_EXIT_INTERNAL_ERROR emulation failure at an `int3` (emulating KVM).
    EmulationFailure,
    /// A #DB from a debug-register execute breakpoint the handler claimed
    /// ([`VmControl::claim_hw_breakpoint`]); guest text holds no `int3`.
    HardwareBreakpoint,
}

/// Receives every `int3` trap of the guest. Implemented by the probe engine.
pub trait BreakpointHandler: Send + Sync {
    /// Whether `rip` is an address where this handler planted an `int3`.
    /// Lets the VMM skip reading guest code on the hot path; a `false` is
    /// always safe (the VMM then looks for the 0xcc itself).
    fn owns_address(&self, _rip: u64) -> bool {
        false
    }

    /// Called on the trapping vCPU's thread with RIP at the `int3`.
    fn on_breakpoint(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        kind: TrapKind,
    ) -> BreakpointAction;

    /// A guest write to a protected page, completed already (see
    /// [`VmControl::protect_page`]); called on the writing vCPU's thread
    /// with that page's completions held, so the page does not change
    /// meanwhile. Must not stop the world.
    fn on_protected_write(&self, _vcpu: &mut dyn Vcpu, _vm: &dyn VmControl, _w: &ProtectedWrite) {}
}

/// A handler for guests without probes: every `int3` goes to the guest.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbes;

impl BreakpointHandler for NoProbes {
    fn on_breakpoint(&self, _: &mut dyn Vcpu, _: &dyn VmControl, _: TrapKind) -> BreakpointAction {
        BreakpointAction::DeliverToGuest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn gpr_order_round_trips() {
        let mut r = Regs::default();
        let g: [u64; 16] = std::array::from_fn(|i| i as u64 * 3 + 1);
        r.set_gprs(g);
        assert_eq!(r.gprs(), g);
        assert_eq!(r.rcx, g[1]);
        assert_eq!(r.rsp, g[4]);
        assert_eq!(r.rdi, g[7]);
        assert_eq!(r.r15, g[15]);
    }

    #[test]
    fn stop_guard_resumes_once_on_drop() {
        let n = Cell::new(0);
        {
            let _g = StopGuard::new(|| n.set(n.get() + 1));
            assert_eq!(n.get(), 0);
        }
        assert_eq!(n.get(), 1);
    }
}
