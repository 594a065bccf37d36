//! The machine: the state a VM's vCPU threads and its handles share (guest
//! RAM, the port bus, stop-the-world, the vCPU slots, exit counters, the
//! breakpoint handler, how the run ended), and the [`VmControl`] face the
//! probe engine sees.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use guest_access::{
    AccessError, BreakpointHandler, GuestMemory, HwSlotError, HwSlotUse, StopGuard, VcpuTask,
    VmControl,
};

use crate::bridge::BridgeStatus;
use crate::control::{self, VcpuRunState, VcpuSlot, World};
use crate::debug::HwSlots;
use crate::devices;
use crate::memory::GuestRam;
use crate::protect::{ProtectedPages, PAGE};
use crate::snapshot::KvmFds;

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote its exit status to [`EXIT_PORT`](crate::EXIT_PORT).
    GuestExit { status: u32 },
    /// ACPI power-off (S5).
    PowerOff,
    /// The guest reset itself (reboot, or a panic with `panic=-1`).
    Reset { how: &'static str },
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: usize },
    /// The VMM could not continue the guest.
    Crashed { vcpu: usize, reason: String },
    /// The host stopped the VM.
    Stopped,
}

impl RunOutcome {
    /// Process exit code for `hvprobe run`: the guest's own status when it
    /// reported one, 0 for a power-off, and distinct codes for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::GuestExit { status } => {
                if *status == 0 {
                    0
                } else {
                    (*status & 0x7f).max(1) as i32
                }
            }
            RunOutcome::PowerOff => 0,
            RunOutcome::Stopped => 0,
            RunOutcome::Reset { .. } => 130,
            RunOutcome::TripleFault { .. } => 131,
            RunOutcome::Crashed { .. } => 132,
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::GuestExit { status } => write!(f, "guest exited with status {status}"),
            RunOutcome::PowerOff => write!(f, "guest powered off"),
            RunOutcome::Reset { how } => write!(f, "guest reset ({how})"),
            RunOutcome::TripleFault { vcpu } => write!(f, "guest triple-faulted on vCPU {vcpu}"),
            RunOutcome::Crashed { vcpu, reason } => {
                write!(f, "guest stopped on vCPU {vcpu}: {reason}")
            }
            RunOutcome::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// Per-vCPU exit counters.
#[derive(Default)]
pub(crate) struct VcpuStats {
    pub exits: AtomicU64,
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub breakpoints: AtomicU64,
    pub single_steps: AtomicU64,
    pub kicks: AtomicU64,
    pub gaps: AtomicU64,
    pub bridge_syscalls: AtomicU64,
    pub bridge_entries_on_host: AtomicU64,
    pub bridge_int80: AtomicU64,
    pub bridge_faults_passed: AtomicU64,
    pub bridge_step_fallbacks: AtomicU64,
    pub bridge_rearms: AtomicU64,
    pub bridge_no_pf_handler: AtomicU64,
    /// Every ioctl of this vCPU's thread on its fd but KVM_RUN.
    pub ioctls: AtomicU64,
    /// Breakpoint exits whose host time below was measured.
    pub hits_timed: AtomicU64,
    /// Host time from entering the trap exit's handling to the next
    /// KVM_RUN, summed over breakpoint exits, without the KVM_RUNs of
    /// single-steps inside the handling (those are `step_run_ns`).
    pub hit_host_ns: AtomicU64,
    /// ioctls made during those breakpoint exits.
    pub hit_ioctls: AtomicU64,
    /// KVM_RUNs of single-steps, and their time.
    pub step_runs: AtomicU64,
    pub step_run_ns: AtomicU64,
    /// Stops of the world this vCPU asked for, and the time each waited
    /// for the other vCPUs to park.
    pub world_stops: AtomicU64,
    pub world_stop_ns: AtomicU64,
    /// Guest writes to protected pages completed by the VMM, their host
    /// time (exit to next KVM_RUN), rolled-back read-modify-writes and
    /// dropped compare-exchange write-backs (see `protect.rs`).
    pub watch_writes: AtomicU64,
    pub watch_ns: AtomicU64,
    pub watch_rollbacks: AtomicU64,
    pub watch_dropped: AtomicU64,
}

/// What the system-call bridge did, summed over vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// User `syscall`s completed by the VMM.
    pub syscalls: u64,
    /// Of those, the ones whose entry the VMM ran up to the kernel stack
    /// (all of them on Linux with PTI off; see [`crate::bridge`]).
    pub entries_on_host: u64,
    /// User `int $0x80`s routed from #UD to the IDT[0x80] handler.
    pub int80: u64,
    /// Genuine #PF/#UD passed on to the guest's handler.
    pub faults_passed: u64,
    /// Of those, handler entries single-stepped because the emulator refused.
    pub step_fallbacks: u64,
    /// Times a vCPU re-armed its breakpoints after the guest IDT changed.
    pub rearms: u64,
    /// Times a vCPU found its IDT without a usable #PF gate and disarmed.
    pub no_pf_handler: u64,
}

/// Exit counters summed over all vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// All returns from KVM_RUN, including kicks.
    pub exits: u64,
    pub io: u64,
    pub mmio: u64,
    /// `int3` traps handed to the breakpoint handler.
    pub breakpoints: u64,
    pub single_steps: u64,
    /// KVM_RUN interrupted by the host (pause, requests).
    pub kicks: u64,
    /// Instructions KVM could not emulate that the VMM completed.
    pub gap_instructions: u64,
    /// The system-call bridge (all zero when it is off).
    pub bridge: BridgeStats,
    /// Host-side cost of breakpoint exits (what a probe hit costs the VMM
    /// and the engine, outside the kernel); see [`HitCost`].
    pub hit_cost: HitCost,
    /// Writes to write-protected (watched) pages.
    pub watch: WatchStats,
}

/// Guest writes to write-protected pages, summed over vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Writes the VMM completed (one per write exit).
    pub writes: u64,
    /// Host time of those: from the exit to the next KVM_RUN.
    pub host_ns: u64,
    /// Read-modify-writes rolled back and run again after another vCPU
    /// wrote their page while they ran.
    pub rollbacks: u64,
    /// Failed compare-exchanges whose write-back was skipped for the same reason.
    pub dropped: u64,
}

/// The host's share of breakpoint exits, summed over vCPUs: measured from
/// the start of a trap exit's handling to the next KVM_RUN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HitCost {
    /// Breakpoint exits measured.
    pub hits: u64,
    /// Host time of those, without the single-steps' own KVM_RUNs.
    pub host_ns: u64,
    /// ioctls (other than KVM_RUN) made while handling them.
    pub ioctls: u64,
    /// KVM_RUNs of single-steps and their time.
    pub step_runs: u64,
    pub step_run_ns: u64,
    /// Stops of the world asked by vCPUs, and the time spent parking the others.
    pub world_stops: u64,
    pub world_stop_ns: u64,
    /// ioctls of the vCPU threads at all (other than KVM_RUN).
    pub all_ioctls: u64,
}

/// A VM's machine state, shared by its vCPU threads and every handle on it
/// (the [`crate::Vm`]/[`crate::RunningVm`], the snapshot writer, the probe
/// engine through [`VmControl`]): guest RAM, the port bus, the
/// stop-the-world coordinator, one slot per vCPU (run state, kick, request
/// queue), exit counters, the breakpoint handler and the run's outcome.
pub struct Machine {
    pub(crate) ram: GuestRam,
    pub(crate) bus: Mutex<devices::PortBus>,
    pub(crate) world: World,
    pub(crate) slots: Vec<VcpuSlot>,
    pub(crate) stats: Vec<VcpuStats>,
    pub(crate) stopping: AtomicBool,
    pub(crate) outcome: Mutex<Option<RunOutcome>>,
    pub(crate) outcome_cv: Condvar,
    pub(crate) handler: OnceLock<Arc<dyn BreakpointHandler>>,
    pub(crate) blockirq_flag: u32,
    pub(crate) markers: Mutex<Vec<(u32, std::time::Instant)>>,
    pub(crate) bridge: BridgeStatus,
    /// vCPU 0's system registers from a snapshot, until its thread runs.
    pub(crate) saved_sregs: Option<guest_access::SystemRegs>,
    /// DR0..DR3: the bridge's and the engine's (see [`crate::debug`]).
    pub(crate) hw_slots: HwSlots,
    /// Every vCPU stays at its checkpoint while set ([`VmControl::hold_all`]).
    pub(crate) held: AtomicBool,
    /// Write-protected pages (memory watches, see [`crate::protect`]).
    pub(crate) protect: ProtectedPages,
    /// The VM fd, for memory-slot changes (set once the VM exists).
    pub(crate) kvm_fds: OnceLock<Arc<KvmFds>>,
}

impl Machine {
    pub(crate) fn handler(&self) -> &dyn BreakpointHandler {
        match self.handler.get() {
            Some(h) => &**h,
            None => &guest_access::NoProbes,
        }
    }

    /// Record how the run ended (first one wins) and stop every vCPU.
    pub(crate) fn finish(&self, o: RunOutcome) {
        {
            let mut g = self.outcome.lock().unwrap();
            if g.is_none() {
                tracing::debug!("run ends: {o}");
                *g = Some(o);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.outcome_cv.notify_all();
        // Wake parked vCPUs and stoppers waiting on them.
        {
            let _st = self.world.lock();
            self.world.cv.notify_all();
        }
        control::kick_all(&self.slots, None);
    }

    /// Stop the guest from any thread (as [`RunningVm::stop`](crate::RunningVm::stop)).
    pub fn stop(&self) {
        self.finish(RunOutcome::Stopped);
    }

    /// Exit counters summed over vCPUs.
    pub fn exit_stats(&self) -> ExitStats {
        let mut s = ExitStats::default();
        for v in &self.stats {
            s.exits += v.exits.load(Ordering::Relaxed);
            s.io += v.io.load(Ordering::Relaxed);
            s.mmio += v.mmio.load(Ordering::Relaxed);
            s.breakpoints += v.breakpoints.load(Ordering::Relaxed);
            s.single_steps += v.single_steps.load(Ordering::Relaxed);
            s.kicks += v.kicks.load(Ordering::Relaxed);
            s.gap_instructions += v.gaps.load(Ordering::Relaxed);
            let b = &mut s.bridge;
            b.syscalls += v.bridge_syscalls.load(Ordering::Relaxed);
            b.entries_on_host += v.bridge_entries_on_host.load(Ordering::Relaxed);
            b.int80 += v.bridge_int80.load(Ordering::Relaxed);
            b.faults_passed += v.bridge_faults_passed.load(Ordering::Relaxed);
            b.step_fallbacks += v.bridge_step_fallbacks.load(Ordering::Relaxed);
            b.rearms += v.bridge_rearms.load(Ordering::Relaxed);
            b.no_pf_handler += v.bridge_no_pf_handler.load(Ordering::Relaxed);
            let h = &mut s.hit_cost;
            h.hits += v.hits_timed.load(Ordering::Relaxed);
            h.host_ns += v.hit_host_ns.load(Ordering::Relaxed);
            h.ioctls += v.hit_ioctls.load(Ordering::Relaxed);
            h.step_runs += v.step_runs.load(Ordering::Relaxed);
            h.step_run_ns += v.step_run_ns.load(Ordering::Relaxed);
            h.world_stops += v.world_stops.load(Ordering::Relaxed);
            h.world_stop_ns += v.world_stop_ns.load(Ordering::Relaxed);
            h.all_ioctls += v.ioctls.load(Ordering::Relaxed);
            let w = &mut s.watch;
            w.writes += v.watch_writes.load(Ordering::Relaxed);
            w.host_ns += v.watch_ns.load(Ordering::Relaxed);
            w.rollbacks += v.watch_rollbacks.load(Ordering::Relaxed);
            w.dropped += v.watch_dropped.load(Ordering::Relaxed);
        }
        s
    }

    /// What vCPU `index`'s thread is doing (None: no such vCPU).
    pub fn vcpu_run_state(&self, index: usize) -> Option<VcpuRunState> {
        self.slots.get(index).map(VcpuSlot::state)
    }

    /// Whether the system-call bridge runs in this VM, and why.
    pub fn bridge_status(&self) -> &BridgeStatus {
        &self.bridge
    }

    pub(crate) fn record_marker(&self, tag: u32) {
        self.markers
            .lock()
            .unwrap()
            .push((tag, std::time::Instant::now()));
    }

    /// Timing markers the guest wrote to [`MARKER_PORT`](crate::MARKER_PORT), in order.
    pub fn markers(&self) -> Vec<(u32, std::time::Instant)> {
        self.markers.lock().unwrap().clone()
    }

    /// Guest RAM.
    /// Type into the guest console (16550 receive path, IRQ 4). Returns how
    /// many bytes the 64-byte FIFO took; retry the rest later.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .console_input(bytes)
    }

    /// Type all of `bytes` into the guest console, waiting (up to `timeout`)
    /// for the guest to drain the FIFO. Returns how many bytes were accepted.
    pub fn console_input_all(&self, bytes: &[u8], timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut done = 0;
        while done < bytes.len() && std::time::Instant::now() < deadline {
            let n = self.console_input(&bytes[done..]);
            done += n;
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        done
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

thread_local! {
    /// The index of the vCPU this thread runs (None off vCPU threads).
    pub(crate) static CURRENT_VCPU: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl VmControl for Machine {
    fn memory(&self) -> &dyn GuestMemory {
        &self.ram
    }

    fn vcpu_count(&self) -> usize {
        self.slots.len()
    }

    fn stop_others(&self, except: Option<usize>) -> StopGuard<'_> {
        let me = except.or_else(|| CURRENT_VCPU.with(|c| c.get()));
        let started = std::time::Instant::now();
        self.world.stop(me, &self.slots, &self.stopping);
        if let Some(stats) = me.and_then(|i| self.stats.get(i)) {
            stats.world_stops.fetch_add(1, Ordering::Relaxed);
            let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            stats.world_stop_ns.fetch_add(ns, Ordering::Relaxed);
        }
        StopGuard::new(move || self.world.resume())
    }

    fn with_vcpu(&self, index: usize, f: VcpuTask) -> Result<(), AccessError> {
        let slot = self.slots.get(index).ok_or(AccessError::VcpuGone(index))?;
        if CURRENT_VCPU.with(|c| c.get()) == Some(index) {
            return Err(AccessError::Kvm {
                op: "with_vcpu",
                vcpu: index,
                errno: "called from the vCPU's own thread; use the Vcpu you were given".into(),
            });
        }
        let (tx, rx) = mpsc::channel::<()>();
        let req: control::Request = Box::new(move |v| {
            f(v);
            let _ = tx.send(());
        });
        {
            let _st = self.world.lock();
            if slot.submit(req).is_err() {
                // Not started, or already left its loop.
                return Err(AccessError::VcpuGone(index));
            }
            self.world.cv.notify_all();
        }
        slot.kick();
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| AccessError::VcpuGone(index))
    }

    fn saved_system_regs(&self) -> Option<guest_access::SystemRegs> {
        self.saved_sregs
    }

    fn claim_hw_breakpoint(&self, addr: u64, owner: &str) -> Result<usize, HwSlotError> {
        // The engine claims with the world stopped: every vCPU picks the
        // slot up before it next enters the guest (run_once).
        self.hw_slots.claim(addr, owner)
    }

    fn release_hw_breakpoint(&self, slot: usize) {
        self.hw_slots.release(slot);
    }

    fn hw_slots(&self) -> Vec<HwSlotUse> {
        self.hw_slots.uses()
    }

    fn hold_all(&self) -> bool {
        self.held.store(true, Ordering::SeqCst);
        // A vCPU in KVM_RUN leaves it at once; the others see the flag at
        // their next checkpoint (a kick on the caller's own thread only
        // costs it one empty KVM_RUN later).
        control::kick_all(&self.slots, CURRENT_VCPU.with(|c| c.get()));
        true
    }

    fn release_all(&self) {
        let _st = self.world.lock();
        self.held.store(false, Ordering::SeqCst);
        self.world.cv.notify_all();
    }

    fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    fn protect_page(&self, page: u64) -> Result<(), String> {
        self.change_protection(page, true)
    }

    fn unprotect_page(&self, page: u64) -> Result<(), String> {
        self.change_protection(page, false)
    }

    fn data_breakpoints(&self) -> Result<(), String> {
        crate::detect::data_breakpoints_fire()
    }
}

impl Machine {
    /// Pages write-protected now.
    pub fn protected_pages(&self) -> Vec<u64> {
        self.protect.pages()
    }

    fn change_protection(&self, page: u64, protect: bool) -> Result<(), String> {
        if !page.is_multiple_of(PAGE) {
            return Err(format!("{page:#x} is not a 4 KiB page address"));
        }
        let in_ram = self
            .ram
            .regions()
            .iter()
            .any(|&(gpa, size, _)| page >= gpa && page + PAGE <= gpa + size);
        if !in_ram {
            return Err(format!("guest-physical page {page:#x} is not guest RAM"));
        }
        if self.stopping.load(Ordering::SeqCst) {
            // The run ended: its vCPU threads are leaving (a stop does not
            // wait for them then).
            self.world.wait_gone(Duration::from_secs(5));
        }
        if !self.world.is_stopped() {
            return Err(format!(
                "page {page:#x}: memory slots change only with every vCPU stopped"
            ));
        }
        let fds = self
            .kvm_fds
            .get()
            .ok_or("this VM has no KVM fd to change memory slots")?;
        if protect
            && fds
                .vm
                .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_READONLY_MEM) as _)
                <= 0
        {
            return Err(
                "this host's KVM has no read-only memory slots (KVM_CAP_READONLY_MEM)".into(),
            );
        }
        self.protect
            .set(&fds.vm, &self.ram.regions(), page, protect)
    }
}

pub(crate) struct MachineParts {
    pub ram: GuestRam,
    pub bus: devices::PortBus,
    pub vcpus: usize,
    pub blockirq_flag: u32,
    pub bridge: BridgeStatus,
    pub saved_sregs: Option<guest_access::SystemRegs>,
}

pub(crate) fn new_machine(p: MachineParts) -> Arc<Machine> {
    let n = p.vcpus;
    Arc::new(Machine {
        ram: p.ram,
        bus: Mutex::new(p.bus),
        world: World::new(),
        slots: (0..n).map(|_| VcpuSlot::new()).collect(),
        stats: (0..n).map(|_| VcpuStats::default()).collect(),
        stopping: AtomicBool::new(false),
        outcome: Mutex::new(None),
        outcome_cv: Condvar::new(),
        handler: OnceLock::new(),
        blockirq_flag: p.blockirq_flag,
        markers: Mutex::new(Vec::new()),
        hw_slots: HwSlots::new(if p.bridge.active {
            &[crate::bridge::PF_SLOT, crate::bridge::UD_SLOT]
        } else {
            &[]
        }),
        bridge: p.bridge,
        saved_sregs: p.saved_sregs,
        held: AtomicBool::new(false),
        protect: ProtectedPages::default(),
        kvm_fds: OnceLock::new(),
    })
}
