//! The probe table and the breakpoint handler.
//!
//! One `int3` per address (a [`Site`]) with the probes behind it; the table
//! owns the original bytes. Every write to guest text happens while all other
//! vCPUs are parked (`stop_others`), so no vCPU can run through a half-updated
//! site. A hit costs one exit when the displaced instruction is emulated;
//! otherwise the world is stopped, the byte restored, the vCPU single-stepped
//! and the `int3` planted again.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use guest_access::{
    AccessError, BreakpointAction, BreakpointHandler, Regs, SystemRegs, TrapKind, Vcpu, VmControl,
};
use insn_emu::Displaced;
use probe_spec::{EntryArgs, EvalOptions, Fault, FetchContext, ProbeDef, Reg, Value};

use crate::events::{
    Event, EventBus, EventFilter, EventKind, GuestTask, Interest, ProbeId, SubscribeOptions,
    Subscription, Waker,
};
use crate::paging::{Access, GuestVirt};
use crate::task::{self, TaskLayout};
use crate::xol::{self, Scratch};

mod snapshot;
pub use snapshot::{EngineState, Frozen, SavedCounters, SavedInstance, SavedProbe};

const INT3: u8 = 0xcc;
/// Linux's (and the test guest's) kernel-text mapping: virtual
/// `0xffffffff80000000 + x` is physical `x` when the kernel is not relocated.
pub const KERNEL_TEXT_MAP: u64 = 0xffff_ffff_8000_0000;
/// Upper bound for `maxactive` (the kernel's KRETPROBE_MAXACTIVE_MAX).
pub const MAXACTIVE_MAX: u32 = 4096;

/// What the engine needs to know about guest symbols.
pub trait KernelSymbols: Send + Sync {
    /// The function containing `addr`: (name, start, end).
    fn function_at(&self, addr: u64) -> Option<(String, u64, u64)>;
    /// Why `addr` must not be probed, if it must not.
    fn blacklisted(&self, _addr: u64) -> Option<String> {
        None
    }
    /// `sym+0x5/0x40` for `addr`.
    fn describe(&self, addr: u64) -> Option<String> {
        self.function_at(addr)
            .map(|(n, s, e)| format!("{n}+{:#x}/{:#x}", addr - s, e - s))
    }
    /// `[start, end)` kernel-text ranges the guest never executes (padding
    /// between functions): room for out-of-line instruction slots.
    fn scratch_ranges(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Where Linux keeps the current task and its name (for `$comm`).
    fn task_layout(&self) -> Option<TaskLayout> {
        None
    }
    /// Whether `addr` is inside kernel text the guest runs (a sized text
    /// symbol), like Linux's `kernel_text_address()`; None when there is no
    /// symbol information to say (raw addresses are then taken on trust,
    /// with the page-table checks only).
    fn is_kernel_text(&self, _addr: u64) -> Option<bool> {
        None
    }
    /// The kernel text the guest frees once it has booted, if it has any.
    fn init_text(&self) -> Option<InitText> {
        None
    }
}

/// Kernel text the guest frees when it has booted: Linux's `__init` code,
/// `[__init_begin, __init_end)`, which `free_initmem()` poisons with 0xcc and
/// gives to the page allocator. `kernel_init()` sets `system_state` to
/// SYSTEM_FREEING_INITMEM before it frees anything, and nothing runs init
/// code after that, so a probe there is gone from that moment: from then on
/// hvprobe writes nothing into the range (no restore, no plant, no
/// snapshot overlay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitText {
    pub start: u64,
    pub end: u64,
    /// Virtual address of the kernel's `system_state` (an `enum`, 4 bytes).
    pub system_state: u64,
}

impl InitText {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// Linux's `enum system_states`: SYSTEM_BOOTING, SYSTEM_SCHEDULING, then
/// SYSTEM_FREEING_INITMEM (2), SYSTEM_RUNNING, ...
pub const SYSTEM_FREEING_INITMEM: u32 = 2;

/// No symbols known: no boundary, entry or blacklist checks are possible.
pub struct NoSymbols;

impl KernelSymbols for NoSymbols {
    fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
        None
    }
}

/// kprobe or kretprobe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeType {
    Kprobe,
    Kretprobe { maxactive: Option<u32> },
}

/// How the displaced instruction is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Emulated on the host: one exit per hit.
    Emulated,
    /// Run out of line in a host-owned slot followed by an int3: two exits,
    /// no other vCPU stops.
    OutOfLine,
    /// Stop the world, restore the byte, single-step, re-plant.
    SingleStep,
}

/// A probe to register.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    /// `group/event`, unique.
    pub name: String,
    pub address: u64,
    pub kind: ProbeType,
    /// Fetch arguments (kprobe_events syntax, resolved).
    pub fetch: Option<ProbeDef>,
    pub enabled: bool,
    /// Force the stop-the-world single-step even if the instruction is emulable.
    pub force_single_step: bool,
    /// Force out-of-line execution even if the instruction is emulable.
    pub force_out_of_line: bool,
    /// The definition as the user wrote it (for listings).
    pub definition: String,
}

impl ProbeRequest {
    pub fn kprobe(name: impl Into<String>, address: u64) -> Self {
        Self {
            name: name.into(),
            address,
            kind: ProbeType::Kprobe,
            fetch: None,
            enabled: true,
            force_single_step: false,
            force_out_of_line: false,
            definition: String::new(),
        }
    }

    pub fn kretprobe(name: impl Into<String>, address: u64, maxactive: Option<u32>) -> Self {
        Self {
            kind: ProbeType::Kretprobe { maxactive },
            ..Self::kprobe(name, address)
        }
    }
}

/// Why a probe operation was refused. Says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{addr:#x} ({location}) is not an instruction boundary: it is inside the instruction at {insn_start:#x} ({insn})")]
    NotInstructionBoundary {
        addr: u64,
        location: String,
        insn_start: u64,
        insn: String,
    },
    #[error("{addr:#x} ({location}) is blacklisted: {why}")]
    Blacklisted {
        addr: u64,
        location: String,
        why: String,
    },
    #[error("{addr:#x} cannot be probed: {why}")]
    Unmapped { addr: u64, why: String },
    /// Like Linux's `kernel_text_address()` check: data, user addresses, the
    /// direct map, padding and host-owned bytes are never patched.
    #[error("{addr:#x} ({location}) is not kernel text: {why}")]
    NotKernelText {
        addr: u64,
        location: String,
        why: String,
    },
    #[error("a return probe must be at a function entry; {addr:#x} is {location}")]
    RetprobeNotAtEntry { addr: u64, location: String },
    #[error("a probe named {name} already exists (id {id})")]
    AlreadyExists { name: String, id: ProbeId },
    #[error("the exact same probe already exists at {addr:#x} (id {id})")]
    Duplicate { addr: u64, id: ProbeId },
    #[error("probe {0} does not exist")]
    NotFound(ProbeId),
    #[error("cannot decode the instruction at {addr:#x}: {why}")]
    Undecodable { addr: u64, why: String },
    #[error("return probes need a host-owned return trap address and none is configured")]
    NoReturnTrap,
    #[error("maxactive {got} is out of range (1..={max})")]
    BadMaxactive { got: u32, max: u32 },
    #[error("{addr:#x} ({location}) is in the kernel's init text, which the guest freed when it finished booting (system_state {state})")]
    InitTextFreed {
        addr: u64,
        location: String,
        state: u32,
    },
    #[error("{addr:#x} ({location}) is in the kernel's init text and hvprobe cannot read system_state at {state_addr:#x} to tell whether the guest freed it: {why}")]
    InitStateUnknown {
        addr: u64,
        location: String,
        state_addr: u64,
        why: String,
    },
    #[error("guest access failed: {0}")]
    Guest(String),
}

/// A failed batch: which request failed, why; nothing of the batch remains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("probe {index} of the batch: {error} (nothing was registered)")]
pub struct BatchError {
    pub index: usize,
    pub error: ProbeError,
}

/// A row of the probe listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    pub id: ProbeId,
    pub name: String,
    pub kind: ProbeType,
    pub address: u64,
    /// Where the int3 is; after the ftrace site when `address` is a
    /// function's entry (listed as `[FTRACE]`, like Linux's ftrace-based
    /// kprobes).
    pub site: u64,
    pub location: String,
    pub enabled: bool,
    pub gone: bool,
    pub hits: u64,
    /// kretprobes: entries with no free instance (nmissed).
    pub missed: u64,
    /// Events lost to full subscriber queues.
    pub dropped: u64,
    pub handling: Handling,
    /// The displaced instruction.
    pub instruction: String,
    /// kretprobes: the effective maxactive.
    pub maxactive: u32,
    pub definition: String,
}

impl std::fmt::Display for ProbeInfo {
    /// Like debugfs `kprobes/list`: address, type, location, flags.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            ProbeType::Kprobe => 'k',
            ProbeType::Kretprobe { .. } => 'r',
        };
        write!(f, "{:016x}  {k}  {}", self.address, self.location)?;
        if !self.enabled {
            f.write_str(" [DISABLED]")?;
        }
        if self.gone {
            f.write_str(" [GONE]")?;
        }
        if self.site != self.address {
            write!(f, " [FTRACE: at +{:#x}]", self.site - self.address)?;
        }
        let how = match self.handling {
            Handling::Emulated => "EMULATED",
            Handling::OutOfLine => "OUT-OF-LINE",
            Handling::SingleStep => "SINGLESTEP",
        };
        write!(f, " [{how}: {}]", self.instruction)
    }
}

/// Engine-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub hits: u64,
    pub emulated: u64,
    pub single_stepped: u64,
    pub out_of_line: u64,
    /// Emulation declined at run time (e.g. a fault) and fell back to a step.
    pub emulation_fallbacks: u64,
    pub return_traps: u64,
    /// Traps at an address whose int3 was removed meanwhile.
    pub stale_traps: u64,
    /// int3s that belonged to the guest.
    pub guest_int3: u64,
    pub live_instances: u64,
    /// kretprobe instances reclaimed from frames that never returned.
    pub recycled_instances: u64,
    pub events_dropped: u64,
}

struct Probe {
    id: ProbeId,
    name: String,
    address: u64,
    /// Where its int3 is: `address`, or the instruction after the function's
    /// ftrace site for a probe on a function entry (see [`Engine::placement`]).
    site: u64,
    kind: ProbeType,
    maxactive: u32,
    fetch: Option<ProbeDef>,
    definition: String,
    force_single_step: bool,
    force_out_of_line: bool,
    enabled: AtomicBool,
    registered: AtomicBool,
    hits: AtomicU64,
    missed: AtomicU64,
    dropped: AtomicU64,
    active: AtomicU32,
}

/// The probes at one address. A hit takes a snapshot (one reference count,
/// no copy); registration replaces the list (copy on write).
#[derive(Default)]
struct SiteProbes(RwLock<Arc<Vec<Arc<Probe>>>>);

impl SiteProbes {
    fn new(probes: Vec<Arc<Probe>>) -> Self {
        SiteProbes(RwLock::new(Arc::new(probes)))
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Probe>>> {
        self.0.read().unwrap().clone()
    }

    fn push(&self, p: Arc<Probe>) {
        Arc::make_mut(&mut self.0.write().unwrap()).push(p);
    }

    /// Removes probe `id`; true if none is left.
    fn remove(&self, id: ProbeId) -> bool {
        let mut w = self.0.write().unwrap();
        Arc::make_mut(&mut w).retain(|q| q.id != id);
        w.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.0.read().unwrap().is_empty()
    }
}

struct Site {
    addr: u64,
    gpa: u64,
    original: u8,
    /// The displaced instruction's other bytes (guest-physical address,
    /// original byte). The int3 is put back only while all of them still
    /// hold the instruction: a guest that freed or rewrote the code (its
    /// init text poisoned with 0xcc, a module's memory reused, a jump label
    /// flipped) gets nothing written into it.
    tail: Vec<(u64, u8)>,
    displaced: Displaced,
    handling: Handling,
    /// The int3 is in guest memory. Changed only by the world's stopper.
    planted: AtomicBool,
    /// The guest overwrote the int3 (its code changed or went away).
    gone: AtomicBool,
    probes: SiteProbes,
    /// The out-of-line slot, for [`Handling::OutOfLine`].
    slot: Option<Arc<XolSlot>>,
}

/// A relocated copy of a displaced instruction plus an int3, in guest padding.
struct XolSlot {
    addr: u64,
    /// Relocated instruction followed by 0xcc.
    code: Vec<u8>,
    /// The padding bytes the slot replaced.
    saved: Vec<u8>,
    /// Guest-physical address of each slot byte, translated once when the
    /// slot was written (so freeing it touches the same bytes).
    gpas: Vec<u64>,
    /// Where execution continues after the slot.
    resume: u64,
    /// vCPUs between entering the slot and its trailing int3.
    in_flight: AtomicU32,
}

impl XolSlot {
    fn end(&self) -> u64 {
        self.addr + self.code.len() as u64 - 1
    }
}

/// A site to create for a new probe.
struct SiteText {
    gpa: u64,
    original: u8,
    displaced: Displaced,
    tail: Vec<(u64, u8)>,
}
type NewSite = Option<SiteText>;

/// A kretprobe activation in flight.
struct Instance {
    probe: Arc<Probe>,
    return_to: u64,
    func: u64,
    entered: Instant,
    entry_args: Vec<Value>,
    saved: EntryArgs,
}

/// The host-owned address return addresses are redirected to.
struct ReturnTrap {
    addr: u64,
    gpa: u64,
    original: u8,
    planted: bool,
}

#[derive(Default)]
struct Table {
    sites: HashMap<u64, Arc<Site>>,
    probes: HashMap<ProbeId, Arc<Probe>>,
    next_id: ProbeId,
    /// Each out-of-line slot by the address of its trailing int3 (retired
    /// slots stay until no vCPU is inside them).
    slot_ends: HashMap<u64, Arc<XolSlot>>,
    /// Slots of removed sites with a vCPU still inside.
    retired: Vec<Arc<XolSlot>>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    emulated: AtomicU64,
    single_stepped: AtomicU64,
    out_of_line: AtomicU64,
    emulation_fallbacks: AtomicU64,
    return_traps: AtomicU64,
    stale_traps: AtomicU64,
    guest_int3: AtomicU64,
    recycled: AtomicU64,
    dropped: AtomicU64,
    seq: AtomicU64,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Default kretprobe maxactive (Linux: max(10, 2 × CPUs)).
    pub default_maxactive: u32,
    /// Longest string a fetch reads.
    pub max_string_len: usize,
}

impl EngineConfig {
    pub fn for_vcpus(vcpus: usize) -> Self {
        Self {
            default_maxactive: (2 * vcpus as u32).max(10),
            max_string_len: 256,
        }
    }
}

/// The probe engine. Register it as the VM's breakpoint handler.
pub struct Engine {
    vm: Arc<dyn VmControl>,
    symbols: Arc<dyn KernelSymbols>,
    config: EngineConfig,
    table: RwLock<Table>,
    armed: AtomicBool,
    trap: Mutex<Option<ReturnTrap>>,
    /// Address of the return trap, readable without the lock on the hit path.
    trap_addr: AtomicU64,
    instances: Mutex<HashMap<u64, Vec<Instance>>>,
    /// No kretprobe is left but instances were live: the last return removes the trap.
    trap_retire_pending: AtomicBool,
    bus: Arc<EventBus>,
    counters: Counters,
    /// Serialises API operations (registration etc.).
    api: Mutex<()>,
    /// Free padding for out-of-line slots (built on first use).
    scratch: Mutex<Option<Scratch>>,
    /// Per vCPU: RFLAGS.IF to restore when it leaves an out-of-line slot.
    xol_if: Vec<AtomicBool>,
    /// The symbols' padding ranges, asked for once (refusing probes there).
    scratch_ranges: std::sync::OnceLock<Vec<(u64, u64)>>,
    /// vCPUs inside [`BreakpointHandler::on_breakpoint`]. With the world
    /// stopped, a non-zero count means a vCPU waits inside a handler to stop
    /// the world itself (a single-step): not a point to snapshot.
    in_handler: AtomicU32,
    /// Executable paths already walked by hits.
    exe_cache: task::ExeCache,
    /// Live [`ExeInterest`]s: hits read `mm->exe_file` only while some
    /// subscriber or filter wants it (three more reads per hit).
    exe_interest: std::sync::atomic::AtomicUsize,
    /// The symbols' init text, asked for once.
    init_text: std::sync::OnceLock<Option<InitText>>,
    /// Guest-physical address of `system_state` (the kernel image's mapping
    /// never moves once set up), found by the first probe in init text.
    system_state_gpa: std::sync::OnceLock<u64>,
    /// The guest has freed its init text (never goes back).
    init_freed: AtomicBool,
}

/// Held while a subscriber or filter wants executable paths on events.
pub struct ExeInterest(Arc<Engine>);

impl Drop for ExeInterest {
    fn drop(&mut self) {
        self.0.exe_interest.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why [`Engine::list_tasks`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskListingError {
    #[error("the task list needs the kernel's DWARF (task_struct, mm_struct, file, dentry and mount offsets, init_task)")]
    NoLayout,
    #[error("the guest has not enabled paging yet")]
    NoPaging,
    #[error(transparent)]
    Walk(#[from] task::TaskListError),
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn guest_err(e: AccessError) -> ProbeError {
    ProbeError::Guest(e.to_string())
}

/// Fetch-argument context of a hit: registers plus a page walk.
struct HitContext<'a> {
    regs: Regs,
    virt: GuestVirt<'a>,
    symbols: &'a dyn KernelSymbols,
    /// The current task, read at most once per hit (event and `$comm`).
    task: OnceCell<Option<GuestTask>>,
    /// Set when someone wants executable paths: their cache.
    exe: Option<&'a task::ExeCache>,
}

impl<'a> HitContext<'a> {
    fn new(regs: Regs, virt: GuestVirt<'a>, symbols: &'a dyn KernelSymbols) -> Self {
        HitContext {
            regs,
            virt,
            symbols,
            task: OnceCell::new(),
            exe: None,
        }
    }

    fn with_exe(mut self, exe: Option<&'a task::ExeCache>) -> Self {
        self.exe = exe;
        self
    }

    /// The current task: per-CPU base (GS at CPL0) + current-task pointer,
    /// then `task->pid` and `task->comm`. None outside kernel mode, without
    /// a layout, or when a read faults.
    fn current_task(&self) -> Option<GuestTask> {
        self.task.get_or_init(|| self.read_current_task()).clone()
    }

    fn read_current_task(&self) -> Option<GuestTask> {
        let layout = self.symbols.task_layout()?;
        let s = &self.virt.sregs;
        if s.cpl != 0 || s.gs_base == 0 {
            return None;
        }
        let read = |addr: u64, buf: &mut [u8]| self.virt.read(addr, buf, Access::Inspect).ok();
        let mut p = [0u8; 8];
        read(s.gs_base.wrapping_add(layout.current_task_percpu), &mut p)?;
        let task = u64::from_le_bytes(p);
        let mut t = task::identity(&read, &layout, task)?;
        if let (Some(exe), Some(process)) = (self.exe, layout.process) {
            t.exe = exe.lookup(&read, &process, task);
        }
        Some(t)
    }
}

impl FetchContext for HitContext<'_> {
    fn reg(&self, r: Reg) -> u64 {
        let g = &self.regs;
        match r {
            Reg::R15 => g.r15,
            Reg::R14 => g.r14,
            Reg::R13 => g.r13,
            Reg::R12 => g.r12,
            Reg::R11 => g.r11,
            Reg::R10 => g.r10,
            Reg::R9 => g.r9,
            Reg::R8 => g.r8,
            Reg::Bx => g.rbx,
            Reg::Cx => g.rcx,
            Reg::Dx => g.rdx,
            Reg::Si => g.rsi,
            Reg::Di => g.rdi,
            Reg::Bp => g.rbp,
            Reg::Ax | Reg::OrigAx => g.rax,
            Reg::Ip => g.rip,
            Reg::Cs => 0x10,
            Reg::Flags => g.rflags,
            Reg::Sp => g.rsp,
            Reg::Ss => 0x18,
        }
    }

    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.virt
            .read(addr, buf, Access::Inspect)
            .map_err(|e| Fault { addr: e.gva() })
    }

    fn symbolize(&self, addr: u64) -> Option<String> {
        self.symbols.describe(addr)
    }

    fn comm(&self) -> Option<String> {
        self.current_task()
            .map(|t| String::from_utf8_lossy(t.comm()).into_owned())
    }
}

fn emu_regs(r: &Regs) -> insn_emu::Regs {
    insn_emu::Regs {
        gpr: r.gprs(),
        rip: r.rip,
        rflags: r.rflags,
    }
}

impl Engine {
    pub fn new(
        vm: Arc<dyn VmControl>,
        symbols: Arc<dyn KernelSymbols>,
        config: EngineConfig,
    ) -> Arc<Self> {
        let vcpus = vm.vcpu_count();
        Arc::new(Self {
            vm,
            symbols,
            config,
            table: RwLock::new(Table {
                next_id: 1,
                ..Default::default()
            }),
            armed: AtomicBool::new(true),
            trap: Mutex::new(None),
            trap_addr: AtomicU64::new(0),
            instances: Mutex::new(HashMap::new()),
            trap_retire_pending: AtomicBool::new(false),
            bus: Arc::new(EventBus::default()),
            counters: Counters::default(),
            api: Mutex::new(()),
            scratch: Mutex::new(None),
            xol_if: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            scratch_ranges: std::sync::OnceLock::new(),
            in_handler: AtomicU32::new(0),
            exe_cache: task::ExeCache::default(),
            exe_interest: std::sync::atomic::AtomicUsize::new(0),
            init_text: std::sync::OnceLock::new(),
            system_state_gpa: std::sync::OnceLock::new(),
            init_freed: AtomicBool::new(false),
        })
    }

    /// Ask for executable paths on events until the returned guard drops.
    pub fn want_exe(self: &Arc<Self>) -> ExeInterest {
        self.exe_interest.fetch_add(1, Ordering::SeqCst);
        ExeInterest(self.clone())
    }

    fn exe_for_hit(&self) -> Option<&task::ExeCache> {
        (self.exe_interest.load(Ordering::Relaxed) > 0).then_some(&self.exe_cache)
    }

    /// The guest's processes (thread-group leaders on `init_task.tasks`),
    /// read with the other vCPUs stopped so no task exits mid-walk.
    pub fn list_tasks(&self) -> Result<Vec<task::TaskInfo>, TaskListingError> {
        let layout = self
            .symbols
            .task_layout()
            .filter(|l| l.process.is_some())
            .ok_or(TaskListingError::NoLayout)?;
        let sregs = self
            .kernel_system_regs()
            .ok_or(TaskListingError::NoPaging)?;
        let _world = self.vm.stop_others(None);
        let virt = GuestVirt::new(self.vm.memory(), sregs, 0);
        let read = |addr: u64, buf: &mut [u8]| virt.read(addr, buf, Access::Inspect).ok();
        Ok(task::list(&read, &layout)?)
    }

    /// The host-owned return trap's address, once set.
    pub fn return_trap_address(&self) -> Option<u64> {
        Some(self.trap_addr.load(Ordering::SeqCst)).filter(|a| *a != 0)
    }

    /// Set the host-owned return trap: a kernel-text byte the guest never
    /// executes (e.g. padding after a function). Required for kretprobes.
    pub fn set_return_trap(&self, addr: u64) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let mut t = self.trap.lock().unwrap();
        if t.as_ref().is_some_and(|t| t.planted) {
            return Err(ProbeError::Guest(
                "the return trap is in use by live kretprobes".into(),
            ));
        }
        if self.init_text().is_some_and(|i| i.contains(addr)) {
            return Err(ProbeError::Blacklisted {
                addr,
                location: self.location(addr),
                why: "the return trap cannot live in init text, which the guest frees".into(),
            });
        }
        let sregs = self.kernel_system_regs();
        let gpa = self.text_gpa(addr, sregs.as_ref())?;
        let mut b = [0u8; 1];
        self.vm.memory().read_phys(gpa, &mut b).map_err(guest_err)?;
        *t = Some(ReturnTrap {
            addr,
            gpa,
            original: b[0],
            planted: false,
        });
        self.trap_addr.store(addr, Ordering::SeqCst);
        Ok(())
    }

    /// Subscribe to events; see [`Subscription`].
    pub fn subscribe(
        &self,
        capacity: usize,
        filter: Option<EventFilter>,
        waker: Option<Waker>,
    ) -> Subscription {
        self.bus.subscribe(SubscribeOptions {
            capacity,
            select: None,
            filter,
            waker,
        })
    }

    /// Subscribe with a probe selector; see [`SubscribeOptions`].
    pub fn subscribe_with(&self, opts: SubscribeOptions) -> Subscription {
        self.bus.subscribe(opts)
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            hits: c.hits.load(Ordering::Relaxed),
            emulated: c.emulated.load(Ordering::Relaxed),
            single_stepped: c.single_stepped.load(Ordering::Relaxed),
            out_of_line: c.out_of_line.load(Ordering::Relaxed),
            emulation_fallbacks: c.emulation_fallbacks.load(Ordering::Relaxed),
            return_traps: c.return_traps.load(Ordering::Relaxed),
            stale_traps: c.stale_traps.load(Ordering::Relaxed),
            guest_int3: c.guest_int3.load(Ordering::Relaxed),
            live_instances: self
                .instances
                .lock()
                .unwrap()
                .values()
                .map(|v| v.len() as u64)
                .sum(),
            recycled_instances: c.recycled.load(Ordering::Relaxed),
            events_dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Number of live event subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.bus.subscriber_count()
    }

    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    /// Paging state of a running vCPU (fresh), or None before boot.
    /// A vCPU's system registers when the guest has paging on (the first
    /// vCPU that answers, or a restored VM's saved ones before its vCPUs
    /// run): what reading kernel memory by virtual address needs.
    pub fn kernel_system_regs(&self) -> Option<SystemRegs> {
        // Any vCPU with paging on will do (the kernel half is shared); ask
        // the next one when one cannot answer.
        let mut any_thread = false;
        for index in 0..self.vm.vcpu_count() {
            let out = Arc::new(Mutex::new(None));
            let o = out.clone();
            let r = self.vm.with_vcpu(
                index,
                Box::new(move |v: &mut dyn Vcpu| {
                    *o.lock().unwrap() = v.system_regs().ok();
                }),
            );
            any_thread |= r.is_ok();
            let s = *out.lock().unwrap();
            if let Some(s) = s.filter(|s| s.paging()) {
                return Some(s);
            }
        }
        if !any_thread {
            // No vCPU thread yet: a restored VM still knows its paging.
            return self.vm.saved_system_regs().filter(|s| s.paging());
        }
        None
    }

    /// Guest-physical address of kernel text at `addr`.
    fn text_gpa(&self, addr: u64, sregs: Option<&SystemRegs>) -> Result<u64, ProbeError> {
        match sregs {
            Some(s) => {
                let v = GuestVirt::new(self.vm.memory(), *s, 0);
                let t = v
                    .translate(addr, Access::Inspect)
                    .map_err(|e| ProbeError::Unmapped {
                        addr,
                        why: e.to_string(),
                    })?;
                if !t.executable {
                    return Err(ProbeError::Unmapped {
                        addr,
                        why: "the page is not executable (NX)".into(),
                    });
                }
                // Mapped by the guest but not to RAM (a hole, MMIO): a bad
                // address, not a guest that went away.
                if let Err(e) = self.vm.memory().read_phys(t.gpa, &mut [0u8; 1]) {
                    return Err(ProbeError::Unmapped {
                        addr,
                        why: format!("it maps to {:#x}, which is not guest RAM ({e})", t.gpa),
                    });
                }
                Ok(t.gpa)
            }
            None if addr >= KERNEL_TEXT_MAP => {
                let gpa = addr - KERNEL_TEXT_MAP;
                if gpa >= self.vm.memory().ram_end() {
                    return Err(ProbeError::Unmapped {
                        addr,
                        why: "outside the loaded kernel image".into(),
                    });
                }
                Ok(gpa)
            }
            None => Err(ProbeError::Unmapped {
                addr,
                why: "not a kernel-text address and the guest has not enabled paging yet".into(),
            }),
        }
    }

    fn location(&self, addr: u64) -> String {
        self.symbols
            .describe(addr)
            .unwrap_or_else(|| format!("{addr:#x}"))
    }

    /// Guest bytes of `[addr, addr+len)` with every planted int3 replaced by
    /// its original byte.
    fn original_bytes(
        &self,
        addr: u64,
        len: usize,
        sregs: Option<&SystemRegs>,
        table: &Table,
    ) -> Result<Vec<u8>, ProbeError> {
        let mut out = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let a = addr + done as u64;
            let gpa = self.text_gpa(a, sregs)?;
            let n = (len - done).min((0x1000 - (a & 0xfff)) as usize);
            self.vm
                .memory()
                .read_phys(gpa, &mut out[done..done + n])
                .map_err(guest_err)?;
            done += n;
        }
        for (a, s) in &table.sites {
            if *a >= addr && *a < addr + len as u64 && s.planted.load(Ordering::SeqCst) {
                out[(*a - addr) as usize] = s.original;
            }
        }
        if let Some(t) = self.trap.lock().unwrap().as_ref() {
            if t.planted && t.addr >= addr && t.addr < addr + len as u64 {
                out[(t.addr - addr) as usize] = t.original;
            }
        }
        Ok(out)
    }

    /// Why `addr` belongs to the host (an out-of-line slot or the free
    /// padding they are taken from), if it does.
    fn host_owned(&self, addr: u64, table: &Table) -> Option<String> {
        if let Some(sl) = table
            .slot_ends
            .values()
            .chain(table.retired.iter())
            .find(|sl| addr >= sl.addr && addr <= sl.end())
        {
            return Some(format!(
                "it is inside hvprobe's out-of-line slot at {:#x}",
                sl.addr
            ));
        }
        self.scratch_ranges
            .get_or_init(|| self.symbols.scratch_ranges())
            .iter()
            .any(|(s, e)| addr >= *s && addr < *e)
            .then(|| {
                "it is padding between functions, which hvprobe owns for out-of-line slots".into()
            })
    }

    /// Check a request and build its site data (without planting).
    fn prepare(
        &self,
        req: &ProbeRequest,
        sregs: Option<&SystemRegs>,
        table: &Table,
    ) -> Result<(Probe, NewSite), ProbeError> {
        let addr = req.address;
        if let Some(p) = table.probes.values().find(|p| p.name == req.name) {
            return Err(ProbeError::AlreadyExists {
                name: req.name.clone(),
                id: p.id,
            });
        }
        // Like the kernel's SAME_PROBE: the same point with the same
        // definition again. Other probes at one address are welcome.
        if let Some(p) = table.probes.values().find(|p| {
            p.address == addr
                && p.kind == req.kind
                && p.fetch == req.fetch
                && !req.definition.is_empty()
                && p.definition == req.definition
        }) {
            return Err(ProbeError::Duplicate { addr, id: p.id });
        }
        if let Some(why) = self.symbols.blacklisted(addr) {
            return Err(ProbeError::Blacklisted {
                addr,
                location: self.location(addr),
                why,
            });
        }
        if self.trap_addr.load(Ordering::SeqCst) == addr && addr != 0 {
            return Err(ProbeError::Blacklisted {
                addr,
                location: self.location(addr),
                why: "it is hvprobe's own return trap".into(),
            });
        }
        if let Some(why) = self.host_owned(addr, table) {
            return Err(ProbeError::NotKernelText {
                addr,
                location: self.location(addr),
                why,
            });
        }
        // Before the page-table checks: freed init text is also unmapped or
        // NX by then, and this says why.
        self.check_init_text(addr, sregs)?;
        let maxactive = match req.kind {
            ProbeType::Kprobe => 0,
            ProbeType::Kretprobe { maxactive } => {
                let m = maxactive.unwrap_or(self.config.default_maxactive);
                if m == 0 || m > MAXACTIVE_MAX {
                    return Err(ProbeError::BadMaxactive {
                        got: m,
                        max: MAXACTIVE_MAX,
                    });
                }
                if self.trap_addr.load(Ordering::SeqCst) == 0 {
                    return Err(ProbeError::NoReturnTrap);
                }
                m
            }
        };
        let func = self.symbols.function_at(addr);
        if let ProbeType::Kretprobe { .. } = req.kind {
            if let Some((_, start, _)) = &func {
                if *start != addr {
                    return Err(ProbeError::RetprobeNotAtEntry {
                        addr,
                        location: self.location(addr),
                    });
                }
            }
        }
        if self.symbols.is_kernel_text(addr) == Some(false) {
            // An unmapped address says so first.
            self.text_gpa(addr, sregs)?;
            return Err(ProbeError::NotKernelText {
                addr,
                location: self.location(addr),
                why: "it is not inside any function of the kernel's symbol table \
                      (data, padding, user or direct-map addresses are never patched)"
                    .into(),
            });
        }
        // Instruction boundary: decode from the function start.
        if let Some((_, start, _)) = &func {
            if *start < addr {
                let code = self.original_bytes(*start, (addr - start) as usize, sregs, table)?;
                let mut off = 0usize;
                while (off as u64) < addr - start {
                    let ip = start + off as u64;
                    let d = insn_emu::prepare(&code[off..], ip).or_else(|_| {
                        let tail = self.original_bytes(ip, 15, sregs, table)?;
                        insn_emu::prepare(&tail, ip).map_err(|e| ProbeError::Undecodable {
                            addr: ip,
                            why: e.to_string(),
                        })
                    })?;
                    if ip + d.len() as u64 > addr {
                        return Err(ProbeError::NotInstructionBoundary {
                            addr,
                            location: self.location(addr),
                            insn_start: ip,
                            insn: d.disassembly().to_string(),
                        });
                    }
                    off += d.len();
                }
            }
        }
        let site_addr = self.placement(addr, func.as_ref(), sregs, table)?;
        if site_addr != addr {
            if let Some(why) = self.symbols.blacklisted(site_addr) {
                return Err(ProbeError::Blacklisted {
                    addr,
                    location: self.location(addr),
                    why: format!(
                        "its int3 would go after the ftrace site, at {site_addr:#x}, which is {why}"
                    ),
                });
            }
            if let Some(why) = self.host_owned(site_addr, table) {
                return Err(ProbeError::NotKernelText {
                    addr: site_addr,
                    location: self.location(site_addr),
                    why,
                });
            }
        }
        self.check_init_text(site_addr, sregs)?;
        let site = if table.sites.contains_key(&site_addr) {
            None
        } else {
            Some(self.site_text(site_addr, sregs, table)?)
        };
        let probe = Probe {
            id: 0,
            name: req.name.clone(),
            address: addr,
            site: site_addr,
            kind: req.kind,
            maxactive,
            fetch: req.fetch.clone(),
            definition: req.definition.clone(),
            force_single_step: req.force_single_step,
            force_out_of_line: req.force_out_of_line,
            enabled: AtomicBool::new(req.enabled),
            registered: AtomicBool::new(true),
            hits: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            active: AtomicU32::new(0),
        };
        Ok((probe, site))
    }

    /// The bytes of a new site at `addr`: its address in guest memory and
    /// the instruction it displaces, byte by byte.
    fn site_text(
        &self,
        addr: u64,
        sregs: Option<&SystemRegs>,
        table: &Table,
    ) -> Result<SiteText, ProbeError> {
        let gpa = self.text_gpa(addr, sregs)?;
        let bytes = self.original_bytes(addr, 15, sregs, table)?;
        let displaced = insn_emu::prepare(&bytes, addr).map_err(|e| ProbeError::Undecodable {
            addr,
            why: e.to_string(),
        })?;
        let len = displaced.len();
        let tail_gpas = self.text_gpas(addr + 1, len - 1, sregs)?;
        let tail = tail_gpas
            .into_iter()
            .zip(bytes[1..len].iter().copied())
            .collect();
        Ok(SiteText {
            gpa,
            original: bytes[0],
            displaced,
            tail,
        })
    }

    /// Where the int3 of a probe at `addr` goes. Linux's ftrace rewrites the
    /// five bytes of every function's fentry site (`call __fentry__`, a nop
    /// once booted) when the guest's function tracer or its own ftrace-based
    /// kprobes attach, and it first checks that they hold what it expects:
    /// an int3 there is an ftrace bug (a WARN, and ftrace turns itself off).
    /// So a probe on a function's entry (or on its fentry site) is planted
    /// on the instruction after the site, as KPROBES_ON_FTRACE moves the
    /// kernel's own: the registers there are the entry's (the nop changes
    /// nothing, ftrace's call returns with them restored) and the return
    /// address is still on top of the stack.
    fn placement(
        &self,
        addr: u64,
        func: Option<&(String, u64, u64)>,
        sregs: Option<&SystemRegs>,
        table: &Table,
    ) -> Result<u64, ProbeError> {
        const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
        const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let Some((_, start, end)) = func else {
            return Ok(addr);
        };
        let head = self.original_bytes(*start, (end - start).min(9) as usize, sregs, table)?;
        let skip = if head.starts_with(&ENDBR64) { 4 } else { 0 };
        let fentry = start + skip as u64;
        let site = &head[skip..];
        if (addr != *start && addr != fentry) || site.len() < 5 || fentry + 5 >= *end {
            return Ok(addr);
        }
        let ftrace = site[..5] == NOP5
            || (site[0] == 0xe8 && {
                let rel = i32::from_le_bytes([site[1], site[2], site[3], site[4]]);
                let target = (fentry + 5).wrapping_add(rel as i64 as u64);
                self.is_ftrace_target(target)
            });
        Ok(if ftrace { fentry + 5 } else { addr })
    }

    fn init_text(&self) -> Option<InitText> {
        *self.init_text.get_or_init(|| self.symbols.init_text())
    }

    /// Refuse a site in init text that the guest has freed, or when whether
    /// it has cannot be told.
    fn check_init_text(&self, addr: u64, sregs: Option<&SystemRegs>) -> Result<(), ProbeError> {
        let Some(init) = self.init_text().filter(|i| i.contains(addr)) else {
            return Ok(());
        };
        let unknown = |why: String| ProbeError::InitStateUnknown {
            addr,
            location: self.location(addr),
            state_addr: init.system_state,
            why,
        };
        if self.system_state_gpa.get().is_none() {
            let gpa = self
                .kernel_data_gpa(init.system_state, sregs)
                .map_err(unknown)?;
            let _ = self.system_state_gpa.set(gpa);
        }
        match self.read_system_state() {
            Some(state) if state >= SYSTEM_FREEING_INITMEM => {
                self.init_freed.store(true, Ordering::SeqCst);
                Err(ProbeError::InitTextFreed {
                    addr,
                    location: self.location(addr),
                    state,
                })
            }
            Some(_) => Ok(()),
            None => Err(unknown("it is not in guest RAM".into())),
        }
    }

    fn read_system_state(&self) -> Option<u32> {
        let gpa = *self.system_state_gpa.get()?;
        let mut b = [0u8; 4];
        self.vm.memory().read_phys(gpa, &mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    /// Whether `addr` is init text the guest has freed or is freeing: then
    /// nothing may be written there. Unknown counts as freed.
    fn in_freed_init(&self, addr: u64) -> bool {
        if !self.init_text().is_some_and(|i| i.contains(addr)) {
            return false;
        }
        if self.init_freed.load(Ordering::SeqCst) {
            return true;
        }
        match self.read_system_state() {
            Some(state) if state < SYSTEM_FREEING_INITMEM => false,
            Some(_) => {
                self.init_freed.store(true, Ordering::SeqCst);
                true
            }
            None => true,
        }
    }

    /// Guest-physical address of kernel data at `addr` (no NX check).
    fn kernel_data_gpa(&self, addr: u64, sregs: Option<&SystemRegs>) -> Result<u64, String> {
        let gpa = match sregs {
            Some(s) => {
                GuestVirt::new(self.vm.memory(), *s, 0)
                    .translate(addr, Access::Inspect)
                    .map_err(|e| e.to_string())?
                    .gpa
            }
            None if addr >= KERNEL_TEXT_MAP => addr - KERNEL_TEXT_MAP,
            None => return Err("the guest has not enabled paging yet".into()),
        };
        if gpa + 4 > self.vm.memory().ram_end() {
            return Err(format!("it maps to {gpa:#x}, outside guest RAM"));
        }
        Ok(gpa)
    }

    /// A call at a function's entry into `__fentry__`, ftrace's own code or
    /// a trampoline outside the kernel's text (ftrace allocates those).
    fn is_ftrace_target(&self, target: u64) -> bool {
        match self.symbols.function_at(target) {
            Some((name, _, _)) => name == "__fentry__" || name.starts_with("ftrace_"),
            None => self.symbols.is_kernel_text(target) != Some(true),
        }
    }

    /// Register one probe.
    pub fn register(&self, req: ProbeRequest) -> Result<ProbeId, ProbeError> {
        self.register_batch(vec![req])
            .map(|v| v[0])
            .map_err(|e| e.error)
    }

    /// Register all probes or none.
    pub fn register_batch(&self, reqs: Vec<ProbeRequest>) -> Result<Vec<ProbeId>, BatchError> {
        self.register_batch_as(reqs, None)
    }

    /// [`Self::register_batch`] with the probes' ids given (a restored
    /// table keeps its ids) or taken from the counter.
    fn register_batch_as(
        &self,
        reqs: Vec<ProbeRequest>,
        given_ids: Option<&[ProbeId]>,
    ) -> Result<Vec<ProbeId>, BatchError> {
        let _api = self.api.lock().unwrap();
        let sregs = self.kernel_system_regs();
        let _world = self.vm.stop_others(None);
        let mut table = self.table.write().unwrap();
        // Validate everything first: a batch that fails leaves no trace.
        let mut staged: Vec<(Probe, NewSite)> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (index, req) in reqs.iter().enumerate() {
            if !names.insert(req.name.clone()) {
                return Err(BatchError {
                    index,
                    error: ProbeError::AlreadyExists {
                        name: req.name.clone(),
                        id: 0,
                    },
                });
            }
            let mut s = self
                .prepare(req, sregs.as_ref(), &table)
                .map_err(|error| BatchError { index, error })?;
            // Two new probes at one new address share one site.
            if s.1.is_some()
                && staged
                    .iter()
                    .any(|(p, site)| p.site == s.0.site && site.is_some())
            {
                s.1 = None;
            }
            staged.push(s);
        }
        let mut ids = Vec::new();
        let mut new_sites = Vec::new();
        if let Some(given) = given_ids {
            let taken = given.iter().position(|id| table.probes.contains_key(id));
            if given.len() != staged.len() || taken.is_some() {
                return Err(BatchError {
                    index: taken.unwrap_or(0),
                    error: ProbeError::Guest("restored probe ids collide or miscount".into()),
                });
            }
        }
        for (n, (mut probe, site)) in staged.into_iter().enumerate() {
            match given_ids {
                Some(given) => {
                    probe.id = given[n];
                    table.next_id = table.next_id.max(given[n] + 1);
                }
                None => {
                    probe.id = table.next_id;
                    table.next_id += 1;
                }
            }
            let probe = Arc::new(probe);
            if let Some(text) = site {
                let want = self.wanted_handling(&text.displaced, &probe);
                let s = self.build_site(
                    probe.site,
                    text,
                    want,
                    sregs.as_ref(),
                    &mut table,
                    Vec::new(),
                );
                table.sites.insert(probe.site, Arc::new(s));
                new_sites.push(probe.site);
            }
            let site = table.sites[&probe.site].clone();
            site.probes.push(probe.clone());
            let want = self.wanted_handling(&site.displaced, &probe);
            if rank(want) > rank(site.handling) {
                // A stricter probe joined: rebuild the site (no handler runs
                // on it while we hold the world).
                self.release_slot(&site, &mut table);
                let probes = site.probes.snapshot().to_vec();
                let s2 = self.build_site(
                    site.addr,
                    SiteText {
                        gpa: site.gpa,
                        original: site.original,
                        displaced: site.displaced.clone(),
                        tail: site.tail.clone(),
                    },
                    want,
                    sregs.as_ref(),
                    &mut table,
                    probes,
                );
                s2.planted
                    .store(site.planted.load(Ordering::SeqCst), Ordering::SeqCst);
                table.sites.insert(site.addr, Arc::new(s2));
            }
            ids.push(probe.id);
            table.probes.insert(probe.id, probe);
        }
        let need_trap = table
            .probes
            .values()
            .any(|p| matches!(p.kind, ProbeType::Kretprobe { .. }));
        // `addrs[i]` is the site of `reqs[i]`: a failure names that request.
        let addrs: Vec<u64> = ids.iter().map(|id| table.probes[id].site).collect();
        let mut failed = addrs
            .iter()
            .enumerate()
            .find_map(|(index, a)| self.sync_site(&table, *a).err().map(|e| (index, e)));
        if failed.is_none() && need_trap {
            if let Err(e) = self.plant_trap() {
                // Planted already if an older kretprobe needed it, so it is
                // for this batch's first one.
                let index = reqs
                    .iter()
                    .position(|r| matches!(r.kind, ProbeType::Kretprobe { .. }))
                    .unwrap_or(0);
                failed = Some((index, e));
            }
        }
        if let Some((index, error)) = failed {
            // Roll back: remove what this batch added and restore its bytes.
            for id in &ids {
                if let Some(p) = table.probes.remove(id) {
                    p.registered.store(false, Ordering::SeqCst);
                    if let Some(s) = table.sites.get(&p.site).cloned() {
                        s.probes.remove(*id);
                    }
                }
            }
            for a in &addrs {
                let _ = self.sync_site(&table, *a);
                if table.sites.get(a).is_some_and(|s| s.probes.is_empty()) {
                    if let Some(site) = table.sites.remove(a) {
                        self.release_slot(&site, &mut table);
                    }
                }
            }
            return Err(BatchError { index, error });
        }
        Ok(ids)
    }

    /// The handling a probe asks for at a site.
    fn wanted_handling(&self, d: &Displaced, p: &Probe) -> Handling {
        if p.force_single_step {
            Handling::SingleStep
        } else if p.force_out_of_line || !d.is_emulated() {
            Handling::OutOfLine
        } else {
            Handling::Emulated
        }
    }

    /// A site with `want` handling, or the next best: out-of-line needs a
    /// relocatable instruction and free padding, else single-step.
    #[allow(clippy::too_many_arguments)]
    fn build_site(
        &self,
        addr: u64,
        text: SiteText,
        want: Handling,
        sregs: Option<&SystemRegs>,
        table: &mut Table,
        probes: Vec<Arc<Probe>>,
    ) -> Site {
        let SiteText {
            gpa,
            original,
            displaced,
            tail,
        } = text;
        let mut handling = want;
        let mut slot = None;
        if want == Handling::OutOfLine {
            slot = self.alloc_slot(&displaced, sregs, table);
            if slot.is_none() {
                handling = Handling::SingleStep;
            }
        }
        if let Some(sl) = &slot {
            table.slot_ends.insert(sl.end(), sl.clone());
        }
        Site {
            addr,
            gpa,
            original,
            tail,
            displaced,
            handling,
            planted: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            probes: SiteProbes::new(probes),
            slot,
        }
    }

    /// Relocate the instruction into free padding and write the slot.
    /// Caller holds the world stopped.
    fn alloc_slot(
        &self,
        d: &Displaced,
        sregs: Option<&SystemRegs>,
        table: &Table,
    ) -> Option<Arc<XolSlot>> {
        let mut guard = self.scratch.lock().unwrap();
        let scratch = guard.get_or_insert_with(|| {
            let trap = self.trap_addr.load(Ordering::SeqCst);
            let mut ranges = Vec::new();
            let init = self.init_text();
            for (s, e) in self.symbols.scratch_ranges() {
                // Never in text the guest frees.
                if init.is_some_and(|i| s < i.end && e > i.start) {
                    continue;
                }
                // Keep the return trap byte out of the pool.
                if trap >= s && trap < e {
                    ranges.push((s, trap));
                    ranges.push((trap + 1, e));
                } else {
                    ranges.push((s, e));
                }
            }
            Scratch::new(ranges)
        });
        let need = d.len() as u64 + 1;
        let candidates: Vec<u64> = scratch.candidates(need + 4).take(64).collect();
        for at in candidates {
            let mut code = xol::relocate(d.bytes(), d.ip(), at)?;
            code.push(INT3);
            let len = code.len() as u64;
            // Never over a probe site (one registered before the padding
            // rule, or by raw address without symbols).
            if table.sites.keys().any(|a| *a >= at && *a < at + len) {
                continue;
            }
            let Ok(gpas) = self.text_gpas(at, code.len(), sregs) else {
                continue;
            };
            let mut saved = vec![0u8; code.len()];
            if self.read_gpas(&gpas, &mut saved).is_err() || !scratch.take(at, len) {
                continue;
            }
            if self.write_gpas(&gpas, &code).is_err() {
                scratch.give_back(at, len);
                continue;
            }
            return Some(Arc::new(XolSlot {
                addr: at,
                code,
                saved,
                gpas,
                resume: d.next_ip(),
                in_flight: AtomicU32::new(0),
            }));
        }
        None
    }

    /// Put a site's slot padding back, or retire the slot while a vCPU is
    /// still inside it. Caller holds the world stopped.
    fn release_slot(&self, site: &Site, table: &mut Table) {
        let Some(sl) = &site.slot else { return };
        if sl.in_flight.load(Ordering::SeqCst) > 0 {
            table.retired.push(sl.clone());
            return;
        }
        self.free_slot(sl, table);
    }

    fn free_slot(&self, sl: &XolSlot, table: &mut Table) {
        table.slot_ends.remove(&sl.end());
        let mut now = vec![0u8; sl.code.len()];
        // Restore only what is still ours.
        if self.read_gpas(&sl.gpas, &mut now).is_ok() && now == sl.code {
            let _ = self.write_gpas(&sl.gpas, &sl.saved);
        }
        if let Some(sc) = self.scratch.lock().unwrap().as_mut() {
            sc.give_back(sl.addr, sl.code.len() as u64);
        }
    }

    /// Guest-physical address of each byte of kernel text `[addr, addr+len)`.
    fn text_gpas(
        &self,
        addr: u64,
        len: usize,
        sregs: Option<&SystemRegs>,
    ) -> Result<Vec<u64>, ProbeError> {
        (0..len as u64)
            .map(|i| self.text_gpa(addr + i, sregs))
            .collect()
    }

    fn read_gpas(&self, gpas: &[u64], buf: &mut [u8]) -> Result<(), ProbeError> {
        for (gpa, b) in gpas.iter().zip(buf.iter_mut()) {
            let mut x = [0u8; 1];
            self.vm
                .memory()
                .read_phys(*gpa, &mut x)
                .map_err(guest_err)?;
            *b = x[0];
        }
        Ok(())
    }

    fn write_gpas(&self, gpas: &[u64], data: &[u8]) -> Result<(), ProbeError> {
        for (gpa, b) in gpas.iter().zip(data) {
            self.vm
                .memory()
                .write_phys(*gpa, &[*b])
                .map_err(guest_err)?;
        }
        Ok(())
    }

    /// Plant or remove the int3 at `addr` to match the probes' state. Caller
    /// holds the world stopped and the table lock.
    fn sync_site(&self, table: &Table, addr: u64) -> Result<(), ProbeError> {
        let Some(site) = table.sites.get(&addr) else {
            return Ok(());
        };
        if site.gone.load(Ordering::SeqCst) {
            return Ok(());
        }
        let want = self.armed()
            && site
                .probes
                .snapshot()
                .iter()
                .any(|p| p.enabled.load(Ordering::SeqCst));
        let have = site.planted.load(Ordering::SeqCst);
        let mem = self.vm.memory();
        if want && !have {
            let mut b = [0u8; 1];
            mem.read_phys(site.gpa, &mut b).map_err(guest_err)?;
            if b[0] != site.original || !self.tail_intact(site) || self.in_freed_init(site.addr) {
                // The code changed since registration, or the guest freed it.
                site.gone.store(true, Ordering::SeqCst);
                return Ok(());
            }
            mem.write_phys(site.gpa, &[INT3]).map_err(guest_err)?;
            site.planted.store(true, Ordering::SeqCst);
        } else if !want && have {
            self.restore_site(site)?;
        }
        Ok(())
    }

    /// Whether the displaced instruction's other bytes still hold what the
    /// site was built on.
    fn tail_intact(&self, site: &Site) -> bool {
        let mem = self.vm.memory();
        site.tail.iter().all(|(gpa, want)| {
            let mut b = [0u8; 1];
            mem.read_phys(*gpa, &mut b).is_ok() && b[0] == *want
        })
    }

    /// Put the original byte back, unless the guest replaced our int3 or
    /// the instruction around it (then the memory is no longer that code).
    fn restore_site(&self, site: &Site) -> Result<(), ProbeError> {
        let mem = self.vm.memory();
        let mut b = [0u8; 1];
        mem.read_phys(site.gpa, &mut b).map_err(guest_err)?;
        if b[0] == INT3 && self.tail_intact(site) && !self.in_freed_init(site.addr) {
            mem.write_phys(site.gpa, &[site.original])
                .map_err(guest_err)?;
        } else {
            site.gone.store(true, Ordering::SeqCst);
        }
        site.planted.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn plant_trap(&self) -> Result<(), ProbeError> {
        let mut t = self.trap.lock().unwrap();
        let Some(t) = t.as_mut() else {
            return Err(ProbeError::NoReturnTrap);
        };
        if !t.planted {
            self.vm
                .memory()
                .write_phys(t.gpa, &[INT3])
                .map_err(guest_err)?;
            t.planted = true;
        }
        Ok(())
    }

    /// Remove the return trap when no kretprobe and no live instance needs it.
    /// Caller holds the world stopped.
    fn maybe_retire_trap(&self, table: &Table) {
        let any_ret = table
            .probes
            .values()
            .any(|p| matches!(p.kind, ProbeType::Kretprobe { .. }));
        if any_ret {
            self.trap_retire_pending.store(false, Ordering::SeqCst);
            return;
        }
        if !self.instances.lock().unwrap().is_empty() {
            self.trap_retire_pending.store(true, Ordering::SeqCst);
            return;
        }
        self.trap_retire_pending.store(false, Ordering::SeqCst);
        let mut t = self.trap.lock().unwrap();
        if let Some(t) = t.as_mut() {
            if t.planted {
                let mut b = [0u8; 1];
                let mem = self.vm.memory();
                if mem.read_phys(t.gpa, &mut b).is_ok() && b[0] == INT3 {
                    let _ = mem.write_phys(t.gpa, &[t.original]);
                }
                t.planted = false;
            }
        }
    }

    /// Unregister one probe.
    pub fn unregister(&self, id: ProbeId) -> Result<(), ProbeError> {
        self.unregister_batch(&[id])
    }

    /// Unregister all of `ids`, or none if any is unknown.
    pub fn unregister_batch(&self, ids: &[ProbeId]) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let _world = self.vm.stop_others(None);
        let mut table = self.table.write().unwrap();
        if let Some(missing) = ids.iter().find(|id| !table.probes.contains_key(id)) {
            return Err(ProbeError::NotFound(*missing));
        }
        let mut first_err = None;
        for id in ids {
            let Some(p) = table.probes.remove(id) else {
                continue;
            };
            p.registered.store(false, Ordering::SeqCst);
            let addr = p.site;
            let empty = match table.sites.get(&addr) {
                Some(s) => s.probes.remove(*id),
                None => false,
            };
            if let Err(e) = self.sync_site(&table, addr) {
                first_err.get_or_insert(e);
            }
            if empty {
                if let Some(site) = table.sites.remove(&addr) {
                    self.release_slot(&site, &mut table);
                }
            }
        }
        self.maybe_retire_trap(&table);
        first_err.map_or(Ok(()), Err)
    }

    /// Enable or disable one probe; the int3 stays while any probe at the
    /// address is enabled.
    pub fn set_enabled(&self, id: ProbeId, enabled: bool) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let _world = self.vm.stop_others(None);
        let table = self.table.read().unwrap();
        let p = table.probes.get(&id).ok_or(ProbeError::NotFound(id))?;
        p.enabled.store(enabled, Ordering::SeqCst);
        self.sync_site(&table, p.site)
    }

    /// Arm or disarm every probe at once; each keeps its own enabled state.
    pub fn set_armed(&self, armed: bool) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let _world = self.vm.stop_others(None);
        let table = self.table.read().unwrap();
        self.armed.store(armed, Ordering::SeqCst);
        let mut first_err = None;
        let addrs: Vec<u64> = table.sites.keys().copied().collect();
        for a in addrs {
            if let Err(e) = self.sync_site(&table, a) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Planted sites whose int3 is no longer in guest memory: the guest
    /// overwrote it (its code changed or went away), so mark them gone. Only
    /// believed with the world stopped: a single-step puts the original byte
    /// back for the length of one step, and a site marked gone then would
    /// keep its int3 in guest text after its last probe is deleted (the guest
    /// would take it as its own breakpoint and resume one byte into the
    /// instruction).
    fn detect_gone_sites(&self) {
        let reads_not_int3 = |table: &Table| -> Vec<u64> {
            table
                .sites
                .values()
                .filter(|s| s.planted.load(Ordering::SeqCst) && !s.gone.load(Ordering::SeqCst))
                .filter(|s| {
                    if self.in_freed_init(s.addr) {
                        return true;
                    }
                    let mut b = [0u8; 1];
                    let ours = self.vm.memory().read_phys(s.gpa, &mut b).is_ok() && b[0] == INT3;
                    !ours || !self.tail_intact(s)
                })
                .map(|s| s.addr)
                .collect()
        };
        if reads_not_int3(&self.table.read().unwrap()).is_empty() {
            return;
        }
        // Lock order: world, then table (a stopper may wait for the table).
        let _world = self.vm.stop_others(None);
        let table = self.table.read().unwrap();
        for a in reads_not_int3(&table) {
            table.sites[&a].gone.store(true, Ordering::SeqCst);
        }
    }

    /// The probe listing.
    pub fn list(&self) -> Vec<ProbeInfo> {
        self.detect_gone_sites();
        let table = self.table.read().unwrap();
        let mut v: Vec<ProbeInfo> = table
            .probes
            .values()
            .map(|p| {
                let site = table.sites.get(&p.site);
                ProbeInfo {
                    id: p.id,
                    name: p.name.clone(),
                    kind: p.kind,
                    address: p.address,
                    site: p.site,
                    location: self.location(p.address),
                    enabled: p.enabled.load(Ordering::SeqCst),
                    gone: site.is_some_and(|s| s.gone.load(Ordering::SeqCst)),
                    hits: p.hits.load(Ordering::Relaxed),
                    missed: p.missed.load(Ordering::Relaxed),
                    dropped: p.dropped.load(Ordering::Relaxed),
                    handling: site.map_or(Handling::SingleStep, |s| s.handling),
                    instruction: site
                        .map_or(String::new(), |s| s.displaced.disassembly().to_string()),
                    maxactive: p.maxactive,
                    definition: p.definition.clone(),
                }
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Guest-physical addresses and original bytes of every planted int3
    /// (sites and the return trap): what differs from pristine guest text.
    pub fn planted_bytes(&self) -> Vec<(u64, u8)> {
        let table = self.table.read().unwrap();
        let mut v: Vec<(u64, u8)> = table
            .sites
            .values()
            .filter(|s| s.planted.load(Ordering::SeqCst))
            .map(|s| (s.gpa, s.original))
            .collect();
        if let Some(t) = self.trap.lock().unwrap().as_ref() {
            if t.planted {
                v.push((t.gpa, t.original));
            }
        }
        for sl in table.slot_ends.values() {
            v.extend(sl.gpas.iter().copied().zip(sl.saved.iter().copied()));
        }
        v
    }

    // ---- the hit path (vCPU threads) ----

    fn publish(&self, probe: &Probe, ev: Event) {
        let dropped = self.bus.publish(ev);
        self.count_dropped(probe, dropped);
    }

    fn count_dropped(&self, probe: &Probe, dropped: u64) {
        if dropped > 0 {
            probe.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Whether a hit of `probe` is worth fetching. A hit that only finds full
    /// queues is counted lost here, unfetched, and still takes a sequence
    /// number so that gaps keep meaning losses.
    fn wants_event(&self, probe: &Probe) -> bool {
        match self.bus.interest(probe.id) {
            Interest::Fetch => true,
            Interest::Nobody => false,
            Interest::Dropped(n) => {
                self.counters.seq.fetch_add(1, Ordering::Relaxed);
                self.count_dropped(probe, n);
                false
            }
        }
    }

    fn eval_opts(&self) -> EvalOptions {
        EvalOptions {
            max_string_len: self.config.max_string_len,
        }
    }

    fn kprobe_hit(&self, probe: &Probe, ctx: &HitContext<'_>, vcpu: u32) {
        if !self.wants_event(probe) {
            return;
        }
        let args = match &probe.fetch {
            Some(def) => self.fetch(def, ctx, |_| true),
            None => Vec::new(),
        };
        let ev = Event {
            probe_id: probe.id,
            seq: self.counters.seq.fetch_add(1, Ordering::Relaxed),
            vcpu,
            time_ns: now_ns(),
            ip: probe.address,
            kind: EventKind::Entry,
            task: ctx.current_task(),
            args,
        };
        self.publish(probe, ev);
    }

    /// Values of the arguments of `def` that `pick` accepts, in order. Only
    /// values: names and types are the definition's, and sharing them per
    /// event (reference counts touched by vCPU and consumer threads alike)
    /// cost more than the fetch itself.
    fn fetch<C: FetchContext + ?Sized>(
        &self,
        def: &ProbeDef,
        ctx: &C,
        pick: impl Fn(&probe_spec::FetchArg) -> bool,
    ) -> Vec<Value> {
        let opts = self.eval_opts();
        def.args
            .iter()
            .filter(|a| pick(a))
            .map(|a| probe_spec::evaluate_value(a, ctx, &opts))
            .collect()
    }

    /// kretprobe entry: take an instance and redirect the return address.
    fn kretprobe_entry(&self, probes: &[Arc<Probe>], ctx: &HitContext<'_>, trap: u64) {
        let slot = ctx.regs.rsp;
        let mut ret = [0u8; 8];
        if ctx.virt.read(slot, &mut ret, Access::KernelRead).is_err() {
            for p in probes {
                p.missed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let return_to = u64::from_le_bytes(ret);
        let mut live = self.instances.lock().unwrap();
        // A new call at a slot with live instances: those frames were abandoned.
        if return_to != trap {
            if let Some(stale) = live.remove(&slot) {
                for i in stale {
                    i.probe.active.fetch_sub(1, Ordering::SeqCst);
                    self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let mut taken = Vec::new();
        for p in probes {
            if p.active.load(Ordering::SeqCst) >= p.maxactive {
                self.recycle_stale(&mut live, p, &ctx.virt, trap);
            }
            if p.active.load(Ordering::SeqCst) >= p.maxactive {
                p.missed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            p.active.fetch_add(1, Ordering::SeqCst);
            let (entry_args, saved) = match &p.fetch {
                Some(def) => (
                    self.fetch(def, ctx, |a| !a.uses_retval()),
                    EntryArgs::capture(def, ctx),
                ),
                None => (Vec::new(), EntryArgs::default()),
            };
            taken.push(Instance {
                probe: p.clone(),
                return_to,
                func: p.address,
                entered: Instant::now(),
                entry_args,
                saved,
            });
        }
        if taken.is_empty() {
            return;
        }
        let real_return = live
            .get(&slot)
            .and_then(|v| v.first().map(|i| i.return_to))
            .unwrap_or(return_to);
        if ctx.virt.write(slot, &trap.to_le_bytes()).is_err() {
            for i in taken {
                i.probe.active.fetch_sub(1, Ordering::SeqCst);
                i.probe.missed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let entry = live.entry(slot).or_default();
        for mut i in taken {
            i.return_to = real_return;
            entry.push(i);
        }
    }

    /// Free instances of `p` whose stack slot no longer holds the trap
    /// address (the frame is gone without returning).
    fn recycle_stale(
        &self,
        live: &mut HashMap<u64, Vec<Instance>>,
        p: &Arc<Probe>,
        virt: &GuestVirt<'_>,
        trap: u64,
    ) {
        let mut freed = 0;
        live.retain(|slot, v| {
            let mut b = [0u8; 8];
            let still_ours =
                virt.read(*slot, &mut b, Access::Inspect).is_ok() && u64::from_le_bytes(b) == trap;
            if still_ours {
                return true;
            }
            v.retain(|i| {
                if Arc::ptr_eq(&i.probe, p) {
                    freed += 1;
                    i.probe.active.fetch_sub(1, Ordering::SeqCst);
                    false
                } else {
                    true
                }
            });
            !v.is_empty()
        });
        self.counters.recycled.fetch_add(freed, Ordering::Relaxed);
    }

    /// The guest returned into the trap: report and continue at the real
    /// return address. The guest's `ret` already ran, so no emulation is needed.
    fn return_trap(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        mut regs: Regs,
    ) -> BreakpointAction {
        self.counters.return_traps.fetch_add(1, Ordering::Relaxed);
        let slot = regs.rsp.wrapping_sub(8);
        let found = self.instances.lock().unwrap().remove(&slot);
        let Some(instances) = found else {
            tracing::error!(
                "vCPU {} returned into the return trap with no instance at stack slot {slot:#x}",
                vcpu.index()
            );
            // Nothing to return to: let the guest see the int3 (it will oops
            // with a clear backtrace rather than run off somewhere).
            return BreakpointAction::DeliverToGuest;
        };
        let return_to = instances[0].return_to;
        let sregs = vcpu.system_regs().unwrap_or_default();
        // The popped slot keeps the trap address in the guest's dead stack;
        // put the real return address there, as a native call would have
        // left it (nothing of hvprobe's stays in guest memory, snapshots
        // included). Best effort: the slot is below RSP, free stack.
        let _ =
            GuestVirt::new(vm.memory(), sregs, regs.rflags).write(slot, &return_to.to_le_bytes());
        if self.bus.has_subscribers() {
            let ctx = HitContext::new(
                regs,
                GuestVirt::new(vm.memory(), sregs, regs.rflags),
                &*self.symbols,
            )
            .with_exe(self.exe_for_hit());
            for i in &instances {
                if !i.probe.registered.load(Ordering::SeqCst) || !self.wants_event(&i.probe) {
                    continue;
                }
                let args = match &i.probe.fetch {
                    Some(def) => {
                        let at = probe_spec::AtReturn {
                            inner: &ctx,
                            entry: &i.saved,
                        };
                        self.fetch(def, &at, probe_spec::FetchArg::uses_retval)
                    }
                    None => Vec::new(),
                };
                let ev = Event {
                    probe_id: i.probe.id,
                    seq: self.counters.seq.fetch_add(1, Ordering::Relaxed),
                    vcpu: vcpu.index() as u32,
                    time_ns: now_ns(),
                    ip: i.func,
                    kind: EventKind::Return {
                        func: i.func,
                        return_to,
                        retval: regs.rax,
                        duration_ns: i.entered.elapsed().as_nanos() as u64,
                        entry_args: i.entry_args.clone(),
                    },
                    task: ctx.current_task(),
                    args,
                };
                self.publish(&i.probe, ev);
            }
        }
        for i in &instances {
            i.probe.active.fetch_sub(1, Ordering::SeqCst);
        }
        regs.rip = return_to;
        if vcpu.set_regs(&regs).is_err() {
            return BreakpointAction::DeliverToGuest;
        }
        if self.trap_retire_pending.load(Ordering::SeqCst)
            && self.instances.lock().unwrap().is_empty()
        {
            // The last orphaned instance came home: give the byte back.
            let _world = vm.stop_others(Some(vcpu.index()));
            let table = self.table.read().unwrap();
            self.maybe_retire_trap(&table);
        }
        BreakpointAction::Resume
    }

    /// The trap was not at one of our sites.
    fn not_ours(&self, vcpu: &mut dyn Vcpu, vm: &dyn VmControl, rip: u64) -> BreakpointAction {
        let sregs = vcpu.system_regs().unwrap_or_default();
        let virt = GuestVirt::new(vm.memory(), sregs, 0);
        let mut b = [0u8; 1];
        match virt.read(rip, &mut b, Access::Inspect) {
            Ok(()) if b[0] == INT3 => {
                self.counters.guest_int3.fetch_add(1, Ordering::Relaxed);
                BreakpointAction::DeliverToGuest
            }
            _ => {
                // Our int3 was removed after the vCPU trapped: run the original.
                self.counters.stale_traps.fetch_add(1, Ordering::Relaxed);
                BreakpointAction::Resume
            }
        }
    }

    /// Back from an out-of-line slot: restore IF and continue after the
    /// original instruction; free the slot if it was retired meanwhile.
    fn leave_slot(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        regs: Regs,
        slot: &Arc<XolSlot>,
    ) -> BreakpointAction {
        const RFLAGS_IF: u64 = 1 << 9;
        let mut r = regs;
        r.rip = slot.resume;
        if self.xol_if[vcpu.index()].load(Ordering::SeqCst) {
            r.rflags |= RFLAGS_IF;
        }
        let left = slot.in_flight.fetch_sub(1, Ordering::SeqCst) == 1;
        if vcpu.set_regs(&r).is_err() {
            return BreakpointAction::DeliverToGuest;
        }
        if left
            && self
                .table
                .read()
                .unwrap()
                .retired
                .iter()
                .any(|s| Arc::ptr_eq(s, slot))
        {
            let _world = vm.stop_others(Some(vcpu.index()));
            let mut table = self.table.write().unwrap();
            if slot.in_flight.load(Ordering::SeqCst) == 0 {
                table.retired.retain(|s| !Arc::ptr_eq(s, slot));
                self.free_slot(slot, &mut table);
            }
        }
        BreakpointAction::Resume
    }

    /// Stop the world, restore, step, re-plant.
    fn step_over(&self, site: &Site, vcpu: &mut dyn Vcpu, vm: &dyn VmControl) -> BreakpointAction {
        self.counters.single_stepped.fetch_add(1, Ordering::Relaxed);
        let _world = vm.stop_others(Some(vcpu.index()));
        // While this vCPU waited to stop the world (it counts as parked
        // then), an API call may have removed the site or rebuilt it as a
        // new object. Act on what the table holds now, never on the stale
        // copy: re-planting from a removed site would leave an int3 nobody
        // owns, which the guest would then receive as its own #BP and
        // resume one byte into the instruction.
        let current = self.table.read().unwrap().sites.get(&site.addr).cloned();
        let Some(current) = current else {
            // Gone: the original byte is back; run it natively.
            return BreakpointAction::Resume;
        };
        let site = &*current;
        let planted = site.planted.load(Ordering::SeqCst);
        let mem = vm.memory();
        if planted && mem.write_phys(site.gpa, &[site.original]).is_err() {
            return BreakpointAction::Resume;
        }
        let stepped = vcpu.single_step();
        if planted {
            let _ = mem.write_phys(site.gpa, &[INT3]);
        }
        if let Err(e) = stepped {
            tracing::warn!("single-step at {:#x} failed: {e}", site.addr);
        }
        BreakpointAction::Resume
    }
}

impl BreakpointHandler for Engine {
    fn owns_address(&self, rip: u64) -> bool {
        let trap = self.trap_addr.load(Ordering::Relaxed);
        if trap != 0 && rip == trap {
            return true;
        }
        let table = self.table.read().unwrap();
        table.slot_ends.contains_key(&rip)
            || table
                .sites
                .get(&rip)
                .is_some_and(|s| s.planted.load(Ordering::Relaxed))
    }

    fn on_breakpoint(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        kind: TrapKind,
    ) -> BreakpointAction {
        self.in_handler.fetch_add(1, Ordering::SeqCst);
        let action = self.handle_breakpoint(vcpu, vm, kind);
        self.in_handler.fetch_sub(1, Ordering::SeqCst);
        action
    }
}

impl Engine {
    fn handle_breakpoint(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        _kind: TrapKind,
    ) -> BreakpointAction {
        let Ok(regs) = vcpu.regs() else {
            return BreakpointAction::DeliverToGuest;
        };
        let rip = regs.rip;
        let trap = self.trap_addr.load(Ordering::Relaxed);
        if trap != 0 && rip == trap {
            return self.return_trap(vcpu, vm, regs);
        }
        let (site, resume) = {
            let t = self.table.read().unwrap();
            (t.sites.get(&rip).cloned(), t.slot_ends.get(&rip).cloned())
        };
        if let Some(slot) = resume {
            return self.leave_slot(vcpu, vm, regs, &slot);
        }
        let Some(site) = site else {
            return self.not_ours(vcpu, vm, rip);
        };
        if !site.planted.load(Ordering::SeqCst) {
            self.counters.stale_traps.fetch_add(1, Ordering::Relaxed);
            return BreakpointAction::Resume;
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        let sregs = vcpu.system_regs().unwrap_or_default();
        let ctx = HitContext::new(
            regs,
            GuestVirt::new(vm.memory(), sregs, regs.rflags),
            &*self.symbols,
        )
        .with_exe(self.exe_for_hit());
        let probes = site.probes.snapshot();
        let armed = self.armed();
        let mut returns = Vec::new();
        for p in probes.iter() {
            if !armed || !p.enabled.load(Ordering::Relaxed) {
                continue;
            }
            p.hits.fetch_add(1, Ordering::Relaxed);
            match p.kind {
                ProbeType::Kprobe => self.kprobe_hit(p, &ctx, vcpu.index() as u32),
                ProbeType::Kretprobe { .. } => returns.push(p.clone()),
            }
        }
        if !returns.is_empty() && trap != 0 {
            self.kretprobe_entry(&returns, &ctx, trap);
        }
        if site.handling == Handling::Emulated {
            let mut er = emu_regs(&regs);
            let mut virt = GuestVirt::new(vm.memory(), sregs, regs.rflags);
            match site.displaced.emulate(&mut er, &mut virt) {
                Ok(_) => {
                    let mut out = regs;
                    out.set_gprs(er.gpr);
                    out.rip = er.rip;
                    out.rflags = er.rflags;
                    if vcpu.set_regs(&out).is_ok() {
                        self.counters.emulated.fetch_add(1, Ordering::Relaxed);
                        return BreakpointAction::Resume;
                    }
                }
                Err(e) => tracing::debug!("emulation declined at {rip:#x}: {e}"),
            }
            self.counters
                .emulation_fallbacks
                .fetch_add(1, Ordering::Relaxed);
        }
        const RFLAGS_TF: u64 = 1 << 8;
        const RFLAGS_IF: u64 = 1 << 9;
        if let (Handling::OutOfLine, Some(sl)) = (site.handling, &site.slot) {
            // (With TF set the guest's own #DB must see the real RIP: step instead.)
            if regs.rflags & RFLAGS_TF == 0 {
                // Interrupts stay masked in the slot, so no interrupt frame
                // can ever point into it (it may be freed later).
                let mut r = regs;
                r.rip = sl.addr;
                r.rflags &= !RFLAGS_IF;
                self.xol_if[vcpu.index()].store(regs.rflags & RFLAGS_IF != 0, Ordering::SeqCst);
                sl.in_flight.fetch_add(1, Ordering::SeqCst);
                if vcpu.set_regs(&r).is_ok() {
                    self.counters.out_of_line.fetch_add(1, Ordering::Relaxed);
                    return BreakpointAction::Resume;
                }
                sl.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.step_over(&site, vcpu, vm)
    }
}

/// How strict a handling is: a site takes the strictest any probe asks for.
fn rank(h: Handling) -> u8 {
    match h {
        Handling::Emulated => 0,
        Handling::OutOfLine => 1,
        Handling::SingleStep => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_access::fake::FakeMemory;
    use guest_access::GuestMemory;

    struct Layout;
    impl KernelSymbols for Layout {
        fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
            None
        }
        fn task_layout(&self) -> Option<TaskLayout> {
            Some(TaskLayout {
                process: None,
                ..crate::task::tests::LAYOUT
            })
        }
    }

    #[test]
    fn pid_and_comm_of_the_current_task() {
        let ram = FakeMemory::new(1 << 16);
        // per-CPU area at 0x1000; current_task -> task at 0x4000; pid 4242;
        // comm "kworker/0:1".
        ram.write_u64(0x1040, 0x4000);
        ram.write_phys(0x4080, &4242i32.to_le_bytes()).unwrap();
        ram.write_phys(0x4084, &4240i32.to_le_bytes()).unwrap();
        // real_parent -> task at 0x5000 with tgid 2.
        ram.write_u64(0x4090, 0x5000);
        ram.write_phys(0x5084, &2i32.to_le_bytes()).unwrap();
        ram.write_phys(0x4100, b"kworker/0:1\0").unwrap();
        let sregs = SystemRegs {
            gs_base: 0x1000,
            ..Default::default()
        };
        let ctx = HitContext::new(Regs::default(), GuestVirt::new(&ram, sregs, 0), &Layout);
        assert_eq!(ctx.comm().as_deref(), Some("kworker/0:1"));
        let task = ctx.current_task().unwrap();
        assert_eq!(
            (task.pid, task.tgid, task.ppid, task.comm()),
            (4242, 4240, 2, &b"kworker/0:1"[..])
        );
        // Read once per hit: a later change in guest memory is not seen.
        ram.write_phys(0x4080, &7i32.to_le_bytes()).unwrap();
        assert_eq!(ctx.current_task().unwrap().pid, 4242);
        // Without a GS base (user GS before swapgs) there is no answer.
        let ctx = HitContext::new(
            Regs::default(),
            GuestVirt::new(&ram, SystemRegs::default(), 0),
            &Layout,
        );
        assert_eq!(ctx.comm(), None);
        assert_eq!(ctx.current_task(), None);
        // And none without a layout (e.g. System.map only).
        let ctx = HitContext::new(Regs::default(), GuestVirt::new(&ram, sregs, 0), &NoSymbols);
        assert_eq!(ctx.comm(), None);
        // Nor when the task pointer leads nowhere.
        ram.write_u64(0x1040, 0xdead_0000_0000);
        let ctx = HitContext::new(Regs::default(), GuestVirt::new(&ram, sregs, 0), &Layout);
        assert_eq!(ctx.current_task(), None);
    }
}
