//! The vCPU thread: runs KVM_RUN, serves device exits, routes `int3` traps to
//! the breakpoint handler, parks when the world is stopped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use guest_access::{AccessError, BreakpointAction, GuestMemory, Regs, SystemRegs, TrapKind, Vcpu};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_regs, KVM_GUESTDBG_INJECT_BP, KVM_INTERNAL_ERROR_EMULATION,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::bridge::BridgeState;
use crate::control::{self, Request, VcpuRunState};
use crate::debug::GuestDebug;
use crate::devices::PortAction;
use crate::gaps;
use crate::machine::{Machine, RunOutcome, VcpuStats};
use crate::regs::{to_kvm_regs, to_regs, to_system_regs};

const BP_VECTOR: u8 = 3;
const DB_VECTOR: u32 = 1;
const INT3: u8 = 0xcc;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Continue,
    Stop(RunOutcome),
}

/// Owns one vCPU fd; lives on that vCPU's thread.
pub(crate) struct VcpuRunner {
    pub index: usize,
    pub fd: VcpuFd,
    pub shared: Arc<Machine>,
    /// RIP and exit count of the last emulation failure we could not explain,
    /// to tell a stale trap (retry once) from a stuck instruction.
    last_unexplained: Option<(u64, u64)>,
    exits: u64,
    /// The one owner of this vCPU's KVM_SET_GUEST_DEBUG state.
    pub(crate) debug: GuestDebug,
    /// The system-call bridge's view of the guest IDT (unused when inactive).
    pub(crate) bridge: BridgeState,
    /// When the current trap exit's handling began, and the ioctl count then.
    trap_began: Option<(Instant, u64)>,
    /// Set by a breakpoint exit: its cost is booked before the next KVM_RUN.
    hit_open: Option<(Instant, u64)>,
    /// Time of single-step KVM_RUNs since the trap began (not host time).
    step_ns_in_trap: u64,
    /// The protected-page write sequence when this vCPU last entered the
    /// guest (`protect.rs`).
    pub(crate) watch_entry: u64,
}

/// What serving a device exit asks of the loop that got it.
#[derive(Debug, PartialEq, Eq)]
enum DeviceExit {
    /// Served; run the guest on.
    Served,
    /// The guest asked to end the run this way (exit port, ACPI power-off
    /// or reset).
    Ends(RunOutcome),
}

/// Serve a port or MMIO exit: the one device-exit handler of both the vCPU
/// run loop ([`VcpuRunner::run_once`]) and the single-step loop
/// ([`VcpuRunner::step_until_db`]). Any other exit (or KVM_RUN error) is
/// handed back for the caller's own handling.
fn device_exit<'a>(
    shared: &Machine,
    stats: &VcpuStats,
    exit: Result<VcpuExit<'a>, kvm_ioctls::Error>,
) -> Result<DeviceExit, Result<VcpuExit<'a>, kvm_ioctls::Error>> {
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => {
            stats.io.fetch_add(1, Ordering::Relaxed);
            let action = shared.bus.lock().unwrap().write(port, data);
            Ok(match action {
                PortAction::None => DeviceExit::Served,
                PortAction::Marker(tag) => {
                    shared.record_marker(tag);
                    DeviceExit::Served
                }
                PortAction::Exit(status) => DeviceExit::Ends(RunOutcome::GuestExit { status }),
                PortAction::PowerOff => DeviceExit::Ends(RunOutcome::PowerOff),
                PortAction::Reset(how) => DeviceExit::Ends(RunOutcome::Reset { how }),
            })
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            stats.io.fetch_add(1, Ordering::Relaxed);
            shared.bus.lock().unwrap().read(port, data);
            Ok(DeviceExit::Served)
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            // No MMIO devices: reads float high, as on an empty bus.
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
            Ok(DeviceExit::Served)
        }
        Ok(VcpuExit::MmioWrite(..)) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            Ok(DeviceExit::Served)
        }
        other => Err(other),
    }
}

/// A write exit to a write-protected page, copied out of kvm_run: (address,
/// data, length).
fn protected_write_of(
    shared: &Machine,
    exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>,
) -> Option<(u64, [u8; 8], usize)> {
    let Ok(VcpuExit::MmioWrite(gpa, data)) = exit else {
        return None;
    };
    if !shared.protect.covers(*gpa) {
        return None;
    }
    let len = data.len().min(8);
    let mut d = [0u8; 8];
    d[..len].copy_from_slice(&data[..len]);
    Some((*gpa, d, len))
}

/// Bytes from `addr` to the end of its 4 KiB page (1..=0x1000).
// At most 0x1000, so the cast cannot cut on any target.
#[allow(clippy::cast_possible_truncation)]
fn page_rest(addr: u64) -> usize {
    (0x1000 - (addr & 0xfff)) as usize
}

fn is_retry(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::EINTR | libc::EAGAIN)
}

impl VcpuRunner {
    pub fn new(index: usize, fd: VcpuFd, shared: Arc<Machine>) -> Self {
        Self {
            index,
            fd,
            last_unexplained: None,
            exits: 0,
            debug: GuestDebug {
                sw_bp: true,
                blockirq_flag: shared.blockirq_flag,
                ..Default::default()
            },
            bridge: BridgeState::default(),
            trap_began: None,
            hit_open: None,
            step_ns_in_trap: 0,
            watch_entry: 0,
            shared,
        }
    }

    /// Count one ioctl on the fd (other than KVM_RUN), before making it.
    pub(crate) fn count_ioctl(&self) {
        self.shared.stats[self.index]
            .ioctls
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Book the host cost of the breakpoint exit just handled: called right
    /// before the next KVM_RUN.
    fn book_hit(&mut self) {
        let Some((began, ioctls)) = self.hit_open.take() else {
            return;
        };
        let stats = &self.shared.stats[self.index];
        let ns = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stats.hits_timed.fetch_add(1, Ordering::Relaxed);
        stats
            .hit_host_ns
            .fetch_add(ns.saturating_sub(self.step_ns_in_trap), Ordering::Relaxed);
        let now = stats.ioctls.load(Ordering::Relaxed);
        stats.hit_ioctls.fetch_add(now - ioctls, Ordering::Relaxed);
    }

    fn kvm_err(&self, op: &'static str, e: kvm_ioctls::Error) -> AccessError {
        AccessError::Kvm {
            op,
            vcpu: self.index,
            errno: e.to_string(),
        }
    }

    /// Push the composed guest-debug state to KVM.
    pub(crate) fn apply_debug(&self) -> Result<(), AccessError> {
        self.count_ioctl();
        self.fd
            .set_guest_debug(&self.debug.control())
            .map_err(|e| self.kvm_err("KVM_SET_GUEST_DEBUG", e))
    }

    /// Single-step on (or off), keeping every other part of the debug state.
    fn set_step(&mut self, step: bool) -> Result<(), AccessError> {
        self.debug.step = step;
        self.apply_debug()
    }

    /// Copy the engine's hardware breakpoints in when they changed (one
    /// atomic load otherwise). Runs before every KVM_RUN of the run loop;
    /// the engine changes them with the world stopped, so no vCPU enters
    /// the guest with a stale set.
    pub(crate) fn engine_slots_refresh(&mut self) {
        if self.shared.hw_slots.generation() == self.debug.engine_generation {
            return;
        }
        let (slots, generation) = self.shared.hw_slots.engine_slots();
        if self.debug.take_engine_slots(slots, generation) {
            if let Err(e) = self.apply_debug() {
                tracing::warn!(
                    "vCPU {}: cannot arm the hardware breakpoints: {e}",
                    self.index
                );
            }
        }
    }

    /// Single-step the instruction at `pc` with the hardware breakpoints
    /// left out (one of them sits on it), then put them back.
    pub(crate) fn step_without_hw_breakpoints(&mut self, pc: u64) -> Result<(), AccessError> {
        self.debug.hw_suppressed = true;
        let result = self.set_step(true).and_then(|()| self.step_until_db(pc));
        self.debug.hw_suppressed = false;
        let restore = self.set_step(false);
        result.and(restore)
    }

    /// The thread body.
    pub fn run_loop(mut self) {
        let shared = self.shared.clone();
        let slot = &shared.slots[self.index];
        slot.enter();
        control::set_thread_kvm_run(self.fd.get_kvm_run() as *mut _);
        crate::snapshot_state::set_thread_vcpu_fd(&self.fd);
        self.fd.set_sync_valid_reg(SyncReg::Register);
        self.fd.set_sync_valid_reg(SyncReg::SystemRegister);

        let outcome = match self.apply_debug() {
            Err(e) => Some(RunOutcome::Crashed {
                vcpu: self.index,
                reason: e.to_string(),
            }),
            Ok(()) => loop {
                if self.shared.stopping.load(Ordering::SeqCst) {
                    break None;
                }
                self.checkpoint();
                if self.shared.stopping.load(Ordering::SeqCst) {
                    break None;
                }
                match self.run_once() {
                    Next::Continue => {}
                    Next::Stop(o) => break Some(o),
                }
            },
        };
        if let Some(o) = outcome {
            self.shared.finish(o);
        }
        // No kick or request reaches this thread after `exit`; a kick sent
        // before it finds the kvm_run pointer still set or already null.
        slot.exit();
        control::set_thread_kvm_run(std::ptr::null_mut());
        crate::snapshot_state::clear_thread_vcpu_fd();
        // Drop queued requests: their senders learn the vCPU is gone.
        slot.requests.lock().unwrap().clear();
        let mut st = self.shared.world.lock();
        st.alive -= 1;
        self.shared.world.cv.notify_all();
    }

    fn take_request(&self) -> Option<Request> {
        self.shared.slots[self.index]
            .requests
            .lock()
            .unwrap()
            .pop_front()
    }

    fn serve_requests(&mut self) {
        while let Some(r) = self.take_request() {
            r(self);
        }
    }

    /// Serve requests and park while another thread holds the world stopped
    /// or the vCPUs are held (a `freeze` action, [`Machine::held`]).
    fn checkpoint(&mut self) {
        self.serve_requests();
        let held = || self.shared.held.load(Ordering::SeqCst);
        if !self.shared.world.stop_requested.load(Ordering::SeqCst) && !held() {
            return;
        }
        let shared = self.shared.clone();
        let world = &shared.world;
        let mut st = world.lock();
        let held = || shared.held.load(Ordering::SeqCst);
        if (st.stopper.is_none() || st.stopper == Some(self.index)) && !held() {
            return;
        }
        let slot = &shared.slots[self.index];
        slot.set(VcpuRunState::Parked);
        st.parked += 1;
        world.parked_hint.store(st.parked, Ordering::SeqCst);
        world.cv.notify_all();
        loop {
            let other_stopper = st.stopper.is_some() && st.stopper != Some(self.index);
            if (!other_stopper && !held()) || self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let pending = !self.shared.slots[self.index]
                .requests
                .lock()
                .unwrap()
                .is_empty();
            if pending {
                drop(st);
                self.serve_requests();
                st = self.shared.world.lock();
                continue;
            }
            st = world.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= 1;
        world.parked_hint.store(st.parked, Ordering::SeqCst);
        slot.set(VcpuRunState::Running);
    }

    fn run_once(&mut self) -> Next {
        let shared = self.shared.clone();
        // Also before the very first KVM_RUN: a restored vCPU (or one woken
        // from HLT) may reach user mode and `syscall` without a single exit,
        // and an unarmed bridge lets the guest kill that process.
        if shared.bridge.active {
            self.bridge_refresh();
        }
        // Booked before the slot refresh: a changed register set (rare, at
        // a probe's arming) is not the cost of the hit that came before.
        self.book_hit();
        self.engine_slots_refresh();
        self.watch_enter();
        let exit = self.fd.run();
        self.exits += 1;
        let stats = &shared.stats[self.index];
        stats.exits.fetch_add(1, Ordering::Relaxed);
        if let Some((gpa, data, len)) = protected_write_of(&shared, &exit) {
            self.protected_write(gpa, &data[..len]);
            return Next::Continue;
        }
        let exit = match device_exit(&shared, stats, exit) {
            Ok(DeviceExit::Served) => return Next::Continue,
            Ok(DeviceExit::Ends(outcome)) => return Next::Stop(outcome),
            Err(other) => other,
        };
        let trap = match exit {
            Ok(VcpuExit::Debug(arch)) => TrapExit::Debug(arch),
            Ok(VcpuExit::InternalError) => TrapExit::InternalError {
                suberror: self.internal_error_suberror(),
            },
            Ok(VcpuExit::Shutdown) => {
                return Next::Stop(RunOutcome::TripleFault { vcpu: self.index })
            }
            Ok(VcpuExit::SystemEvent(ty, _)) => {
                return Next::Stop(match ty {
                    KVM_SYSTEM_EVENT_SHUTDOWN => RunOutcome::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => RunOutcome::Reset {
                        how: "KVM system event",
                    },
                    KVM_SYSTEM_EVENT_CRASH => RunOutcome::Crashed {
                        vcpu: self.index,
                        reason: "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into(),
                    },
                    other => RunOutcome::Crashed {
                        vcpu: self.index,
                        reason: format!("unknown KVM system event {other}"),
                    },
                })
            }
            Ok(VcpuExit::Hlt) => {
                return Next::Stop(RunOutcome::Crashed {
                    vcpu: self.index,
                    reason: "guest halted with no interrupt controller to wake it".into(),
                })
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Next::Stop(RunOutcome::Crashed {
                    vcpu: self.index,
                    reason: format!("VM entry failed: hardware reason {reason:#x} on cpu {cpu}"),
                })
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => return Next::Continue,
            Ok(other) => {
                return Next::Stop(RunOutcome::Crashed {
                    vcpu: self.index,
                    reason: format!("unexpected VM exit {other:?}"),
                })
            }
            Err(e) if is_retry(&e) => {
                self.fd.set_kvm_immediate_exit(0);
                stats.kicks.fetch_add(1, Ordering::Relaxed);
                return Next::Continue;
            }
            Err(e) => {
                return Next::Stop(RunOutcome::Crashed {
                    vcpu: self.index,
                    reason: format!("KVM_RUN failed: {e}"),
                })
            }
        };
        self.dispatch(trap)
    }

    /// Map a trap exit to what it means and handle it: the part of the exit
    /// handling after KVM_RUN that tests drive with synthetic exits.
    pub(crate) fn dispatch(&mut self, exit: TrapExit) -> Next {
        let ioctls = self.shared.stats[self.index].ioctls.load(Ordering::Relaxed);
        self.trap_began = Some((Instant::now(), ioctls));
        self.step_ns_in_trap = 0;
        let kind = match exit {
            TrapExit::Debug(arch) => {
                if arch.exception == u32::from(BP_VECTOR) {
                    ExitKind::Breakpoint(TrapKind::DebugExit)
                } else if let Some(slot) = self.debug.slot_at(arch.pc) {
                    if self.debug.engine[slot] {
                        ExitKind::Breakpoint(TrapKind::HardwareBreakpoint)
                    } else {
                        ExitKind::Bridge(slot, arch.pc)
                    }
                } else {
                    // A stray single-step trap (e.g. after a step was cut short).
                    return Next::Continue;
                }
            }
            TrapExit::InternalError { suberror } => {
                if suberror == KVM_INTERNAL_ERROR_EMULATION {
                    ExitKind::EmulationFailure
                } else {
                    return Next::Stop(RunOutcome::Crashed {
                        vcpu: self.index,
                        reason: format!("KVM internal error, suberror {suberror}"),
                    });
                }
            }
        };
        match kind {
            ExitKind::Breakpoint(k) => self.breakpoint(k),
            ExitKind::EmulationFailure => self.emulation_failure(),
            ExitKind::Bridge(slot, pc) => match self.bridge_exit(slot, pc) {
                Ok(()) => Next::Continue,
                Err(reason) => Next::Stop(RunOutcome::Crashed {
                    vcpu: self.index,
                    reason: format!("system-call bridge: {reason}"),
                }),
            },
        }
    }

    /// Read up to 16 instruction bytes at the current RIP through the guest's
    /// page tables (KVM_TRANSLATE), without crossing into an unmapped page.
    fn code_at(&mut self, rip: u64) -> Vec<u8> {
        let Ok(gpa) = self.gva_to_gpa(rip) else {
            return Vec::new();
        };
        let len = 16.min(page_rest(gpa));
        let mut buf = vec![0u8; len];
        match self.shared.ram.read_phys(gpa, &mut buf) {
            Ok(()) => buf,
            Err(_) => Vec::new(),
        }
    }

    fn emulation_failure(&mut self) -> Next {
        let regs = self.fd.sync_regs().regs;
        let rip = regs.rip;
        if self.shared.handler().owns_address(rip) {
            self.last_unexplained = None;
            return self.breakpoint(TrapKind::EmulationFailure);
        }
        let code = self.code_at(rip);
        match code.first() {
            Some(&INT3) => {
                self.last_unexplained = None;
                self.breakpoint(TrapKind::EmulationFailure)
            }
            Some(_) if self.complete_gap(&code) => Next::Continue,
            _ => {
                // A trap whose int3 was removed before we looked succeeds when
                // retried; the same failure on the very next exit is real.
                if self.last_unexplained == Some((rip, self.exits - 1)) {
                    let bytes: Vec<String> = code.iter().map(|b| format!("{b:02x}")).collect();
                    Next::Stop(RunOutcome::Crashed {
                        vcpu: self.index,
                        reason: format!(
                            "KVM cannot emulate the instruction at {rip:#x} (bytes: {})",
                            if bytes.is_empty() {
                                "unreadable".to_string()
                            } else {
                                bytes.join(" ")
                            }
                        ),
                    })
                } else {
                    self.last_unexplained = Some((rip, self.exits));
                    Next::Continue
                }
            }
        }
    }

    fn breakpoint(&mut self, kind: TrapKind) -> Next {
        self.shared.stats[self.index]
            .breakpoints
            .fetch_add(1, Ordering::Relaxed);
        self.hit_open = self.trap_began;
        let shared = self.shared.clone();
        let slot = &shared.slots[self.index];
        slot.set(VcpuRunState::InHandler);
        let action = shared.handler().on_breakpoint(self, &*shared, kind);
        slot.set(VcpuRunState::Running);
        match action {
            BreakpointAction::Resume => Next::Continue,
            BreakpointAction::DeliverToGuest => match self.deliver_bp(kind) {
                Ok(()) => Next::Continue,
                Err(e) => Next::Stop(RunOutcome::Crashed {
                    vcpu: self.index,
                    reason: format!("cannot deliver #BP to the guest: {e}"),
                }),
            },
        }
    }

    /// Hand a guest-owned int3 back to the guest as #BP, once.
    ///
    /// After KVM_EXIT_DEBUG for #BP (hardware KVM with USE_SW_BP) RIP is
    /// still at the int3, and KVM keeps what it needs to re-inject the
    /// software exception (VMX: the exit's instruction length, used as the
    /// VM-entry instruction length; SVM: it decodes the int3 at RIP to find
    /// the next RIP). So RIP stays and the #BP is queued with
    /// KVM_GUESTDBG_INJECT_BP; the CPU then pushes int3 + 1. Advancing RIP
    /// first would make VMX push int3 + 2, and SVM decode the instruction
    /// after the int3 (skipping it too, or, since the kernel checks for a
    /// soft-interrupt instruction there, dropping the #BP).
    ///
    /// An emulation failure at an int3 (emulating KVM) carries no such
    /// length: move RIP past the int3 and inject vector 3 as an event.
    fn deliver_bp(&mut self, kind: TrapKind) -> Result<(), AccessError> {
        if kind == TrapKind::DebugExit {
            // KVM_SET_REGS (also the sync-regs copy applied at the next
            // KVM_RUN) drops a pending exception: push registers first.
            self.flush_dirty_regs()?;
            let mut dbg = self.debug.control();
            dbg.control |= KVM_GUESTDBG_INJECT_BP;
            self.count_ioctl();
            return self
                .fd
                .set_guest_debug(&dbg)
                .map_err(|e| self.kvm_err("KVM_SET_GUEST_DEBUG(INJECT_BP)", e));
        }
        let mut regs = self.regs()?;
        regs.rip += 1;
        self.set_regs(&regs)?;
        self.flush_dirty_regs()?;
        self.count_ioctl();
        let mut ev = self
            .fd
            .get_vcpu_events()
            .map_err(|e| self.kvm_err("KVM_GET_VCPU_EVENTS", e))?;
        ev.exception.injected = 1;
        ev.exception.nr = BP_VECTOR;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        ev.flags = 0;
        self.count_ioctl();
        self.fd
            .set_vcpu_events(&ev)
            .map_err(|e| self.kvm_err("KVM_SET_VCPU_EVENTS", e))
    }

    /// Push sync-regs changes to KVM now (they are otherwise applied on the
    /// next KVM_RUN), for ioctls that must see them.
    fn flush_dirty_regs(&mut self) -> Result<(), AccessError> {
        let run = self.fd.get_kvm_run();
        if run.kvm_dirty_regs & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) != 0 {
            let regs = self.fd.sync_regs().regs;
            self.fd.clear_sync_dirty_reg(SyncReg::Register);
            self.count_ioctl();
            self.fd
                .set_regs(&regs)
                .map_err(|e| self.kvm_err("KVM_SET_REGS", e))?;
        }
        Ok(())
    }

    /// Complete an instruction KVM's emulator lacks (see [`gaps`]).
    fn complete_gap(&mut self, code: &[u8]) -> bool {
        match gaps::complete(self, code) {
            Ok(gaps::Gap::Completed(m)) => {
                self.shared.stats[self.index]
                    .gaps
                    .fetch_add(1, Ordering::Relaxed);
                tracing::trace!("vCPU {} completed {m:?} for KVM", self.index);
                true
            }
            Ok(gaps::Gap::Unknown) => false,
            Err(e) => {
                tracing::warn!(
                    "vCPU {}: cannot complete the instruction for KVM: {e}",
                    self.index
                );
                false
            }
        }
    }

    pub(crate) fn gva_to_gpa(&mut self, gva: u64) -> Result<u64, String> {
        let sregs = self.current_sregs()?;
        if sregs.cr0 & SystemRegs::CR0_PG == 0 {
            return Ok(gva);
        }
        self.count_ioctl();
        match self.fd.translate_gva(gva) {
            Ok(t) if t.valid != 0 => Ok(t.physical_address),
            _ => Err(format!("{gva:#x} is not mapped")),
        }
    }

    /// The suberror of the KVM_EXIT_INTERNAL_ERROR that KVM_RUN just
    /// returned (call only right after `VcpuExit::InternalError`).
    fn internal_error_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        debug_assert_eq!(run.exit_reason, kvm_bindings::KVM_EXIT_INTERNAL_ERROR);
        // SAFETY: kvm_run's exit union is discriminated by `exit_reason`;
        // both callers run this straight after KVM_RUN returned
        // KVM_EXIT_INTERNAL_ERROR (kvm-ioctls maps that reason, and only
        // it, to `VcpuExit::InternalError`), so `internal` is the member KVM
        // wrote. Reading a u32 of it is a plain load from the mmapped page.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// The vCPU's system registers: kvm_run's copy once KVM_RUN filled it,
    /// KVM_GET_SREGS before that (a fresh or restored vCPU).
    pub(crate) fn current_sregs(&mut self) -> Result<kvm_bindings::kvm_sregs, String> {
        if self.sync_valid() {
            Ok(self.fd.sync_regs().sregs)
        } else {
            self.count_ioctl();
            self.fd
                .get_sregs()
                .map_err(|e| format!("KVM_GET_SREGS on vCPU {}: {e}", self.index))
        }
    }

    /// False before the first KVM_RUN has filled kvm_run's register copy.
    fn sync_valid(&self) -> bool {
        self.exits > 0
    }
}

/// The exits [`VcpuRunner::dispatch`] handles: built from `VcpuExit` after
/// KVM_RUN, or constructed directly by tests (hardware-KVM exits that this
/// kind of host never produces, e.g. KVM_EXIT_DEBUG for `int3`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum TrapExit {
    /// KVM_EXIT_DEBUG: exception 3 for an `int3` under USE_SW_BP, 1 for a
    /// single-step or hardware-breakpoint #DB.
    Debug(kvm_debug_exit_arch),
    /// KVM_EXIT_INTERNAL_ERROR with its suberror.
    InternalError { suberror: u32 },
}

enum ExitKind {
    Breakpoint(TrapKind),
    EmulationFailure,
    /// A hardware breakpoint of the system-call bridge (slot, address).
    Bridge(usize, u64),
}

impl Vcpu for VcpuRunner {
    fn index(&self) -> usize {
        self.index
    }

    fn regs(&mut self) -> Result<Regs, AccessError> {
        if self.sync_valid() {
            Ok(to_regs(&self.fd.sync_regs().regs))
        } else {
            self.count_ioctl();
            let r = self
                .fd
                .get_regs()
                .map_err(|e| self.kvm_err("KVM_GET_REGS", e))?;
            Ok(to_regs(&r))
        }
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), AccessError> {
        if self.sync_valid() {
            self.fd.sync_regs_mut().regs = to_kvm_regs(regs);
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            self.count_ioctl();
            self.fd
                .set_regs(&to_kvm_regs(regs))
                .map_err(|e| self.kvm_err("KVM_SET_REGS", e))
        }
    }

    fn system_regs(&mut self) -> Result<SystemRegs, AccessError> {
        let s = if self.sync_valid() {
            self.fd.sync_regs().sregs
        } else {
            self.count_ioctl();
            self.fd
                .get_sregs()
                .map_err(|e| self.kvm_err("KVM_GET_SREGS", e))?
        };
        Ok(to_system_regs(&s))
    }

    fn single_step(&mut self) -> Result<(), AccessError> {
        let start_rip = self.regs()?.rip;
        // An execute breakpoint on the instruction would fire before it
        // runs (RF does not suppress it on this host): leave them out for
        // the one step.
        let over_hw = self.debug.slot_at(start_rip).is_some();
        self.debug.hw_suppressed = over_hw;
        let result = self
            .set_step(true)
            .and_then(|()| self.step_until_db(start_rip));
        self.debug.hw_suppressed = false;
        let restore = self.set_step(false);
        self.shared.stats[self.index]
            .single_steps
            .fetch_add(1, Ordering::Relaxed);
        result.and(restore)
    }
}

impl VcpuRunner {
    pub(crate) fn step_until_db(&mut self, start_rip: u64) -> Result<(), AccessError> {
        let index = self.index;
        let fail = |why: String| AccessError::StepFailed {
            vcpu: index,
            rip: start_rip,
            why,
        };
        let shared = self.shared.clone();
        for _ in 0..64 {
            let began = Instant::now();
            self.watch_enter();
            let exit = self.fd.run();
            let ns = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.step_ns_in_trap += ns;
            shared.stats[self.index]
                .step_runs
                .fetch_add(1, Ordering::Relaxed);
            shared.stats[self.index]
                .step_run_ns
                .fetch_add(ns, Ordering::Relaxed);
            self.exits += 1;
            let stats = &shared.stats[self.index];
            stats.exits.fetch_add(1, Ordering::Relaxed);
            if let Some((gpa, data, len)) = protected_write_of(&shared, &exit) {
                self.protected_write(gpa, &data[..len]);
                continue;
            }
            let exit = match device_exit(&shared, stats, exit) {
                Ok(DeviceExit::Served) => continue,
                Ok(DeviceExit::Ends(outcome)) => {
                    shared.finish(outcome);
                    return Err(fail("the guest stopped during the step".into()));
                }
                Err(other) => other,
            };
            match exit {
                Ok(VcpuExit::Debug(arch)) => {
                    return self.step_dispatch(TrapExit::Debug(arch), start_rip)
                }
                Ok(VcpuExit::InternalError) => {
                    let suberror = self.internal_error_suberror();
                    return self.step_dispatch(TrapExit::InternalError { suberror }, start_rip);
                }
                Err(e) if is_retry(&e) => self.fd.set_kvm_immediate_exit(0),
                Ok(other) => return Err(fail(format!("unexpected exit {other:?}"))),
                Err(e) => return Err(fail(format!("KVM_RUN: {e}"))),
            }
        }
        Err(fail("no #DB after 64 exits".into()))
    }
}

impl VcpuRunner {
    /// A trap exit while single-stepping from `start_rip` ends the step: the
    /// expected #DB completes it; an instruction KVM could not emulate is
    /// completed here if we can; anything else fails it.
    pub(crate) fn step_dispatch(
        &mut self,
        exit: TrapExit,
        start_rip: u64,
    ) -> Result<(), AccessError> {
        let index = self.index;
        let fail = |why: String| AccessError::StepFailed {
            vcpu: index,
            rip: start_rip,
            why,
        };
        match exit {
            TrapExit::Debug(arch) if arch.exception == DB_VECTOR => Ok(()),
            TrapExit::Debug(arch) => Err(fail(format!("unexpected exit Debug({arch:?})"))),
            TrapExit::InternalError { .. } => {
                let regs = self.fd.sync_regs().regs;
                let code = self.code_at(regs.rip);
                if self.complete_gap(&code) {
                    self.flush_dirty_regs()?;
                    return Ok(());
                }
                Err(fail(format!(
                    "KVM could not emulate the stepped instruction at {:#x}",
                    regs.rip
                )))
            }
        }
    }
}

impl gaps::GapCpu for VcpuRunner {
    fn regs(&mut self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    fn sregs(&mut self) -> kvm_bindings::kvm_sregs {
        self.fd.sync_regs().sregs
    }

    fn set_regs(&mut self, regs: &kvm_regs) {
        self.fd.sync_regs_mut().regs = *regs;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    fn fpu(&mut self) -> Result<kvm_bindings::kvm_fpu, String> {
        self.count_ioctl();
        self.fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))
    }

    fn set_fpu(&mut self, fpu: &kvm_bindings::kvm_fpu) -> Result<(), String> {
        self.count_ioctl();
        self.fd
            .set_fpu(fpu)
            .map_err(|e| format!("KVM_SET_FPU: {e}"))
    }

    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = 0;
        while done < buf.len() {
            let va = gva + done as u64;
            let n = (buf.len() - done).min(page_rest(va));
            let gpa = self.gva_to_gpa(va)?;
            self.shared
                .ram
                .read_phys(gpa, &mut buf[done..done + n])
                .map_err(|e| e.to_string())?;
            done += n;
        }
        Ok(())
    }

    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), String> {
        // Translate every page first: all or nothing.
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let va = gva + done as u64;
            let n = (data.len() - done).min(page_rest(va));
            pieces.push((self.gva_to_gpa(va)?, done, n));
            done += n;
        }
        for (gpa, off, n) in pieces {
            self.shared
                .ram
                .write_phys(gpa, &data[off..off + n])
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

mod bridge_exit;
#[cfg(test)]
mod dispatch_tests;
mod watch_exit;
