//! Why an engine operation was refused. Each error says what and where, in
//! kernel terms (`sym+off`, the kernel's own error names in the service).

use guest_access::AccessError;

use crate::events::ProbeId;
use crate::task;

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
    /// The trap mechanism asked for cannot be had at this address.
    #[error("{addr:#x} ({location}): {why}")]
    Mechanism {
        addr: u64,
        location: String,
        why: String,
    },
    /// A probe's action cannot be had there (not an entry, a return
    /// probe, a second override of one function, ...).
    #[error("action refused at {addr:#x} ({location}): {why}")]
    ActionRefused {
        addr: u64,
        location: String,
        why: String,
    },
    /// No debug register was free for a hardware-breakpoint probe.
    #[error("probe {name}: {source}")]
    NoHwSlot {
        name: String,
        source: guest_access::HwSlotError,
    },
    #[error("the return trap at {addr:#x} is in use by live kretprobes")]
    ReturnTrapInUse { addr: u64 },
    /// A snapshot could not be taken, or its probe table does not fit the
    /// requests it was restored with.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Module probes need the module layout (DWARF) and a readable list.
    #[error("module probes are not available: {0}")]
    ModulesUnavailable(String),
    #[error("module {module} is loaded but has no function {symbol} in its kallsyms")]
    ModuleSymbolNotFound { module: String, symbol: String },
    #[error("{target} is outside the function ({size} bytes)")]
    ModuleOffsetOutside { target: String, size: u64 },
    #[error("guest access failed: {0}")]
    Guest(#[from] AccessError),
}

/// A failed batch: which request failed, why; nothing of the batch remains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("probe {index} of the batch: {error} (nothing was registered)")]
pub struct BatchError {
    pub index: usize,
    pub error: ProbeError,
}

/// Why [`crate::Engine::list_tasks`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskListingError {
    #[error("the task list needs the kernel's DWARF (task_struct, mm_struct, file, dentry and mount offsets, init_task)")]
    NoLayout,
    #[error("the guest has not enabled paging yet")]
    NoPaging,
    #[error(transparent)]
    Walk(#[from] task::TaskListError),
}
