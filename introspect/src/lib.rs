//! hvprobe's probe engine: kprobes and kretprobes kept on the host.
//!
//! - [`paging`]: guest virtual memory through the guest's own page tables.
//! - [`Engine`]: the probe table (one `int3` per address, many probes behind
//!   it), the breakpoint handler (emulate the displaced instruction, or stop
//!   the world and single-step), kretprobe instances redirected to a
//!   host-owned return trap, and bounded event queues.
//!
//! The engine sees the VM only through `guest_access`'s traits.

mod engine;
pub mod events;
pub mod paging;
mod symbols;
pub mod task;
mod xol;

pub use engine::{
    BatchError, Engine, EngineConfig, EngineState, EngineStats, ExeInterest, Frozen, Handling,
    InitText, KernelSymbols, NoSymbols, ProbeError, ProbeInfo, ProbeRequest, ProbeType,
    SavedCounters, SavedInstance, SavedProbe, TaskListingError, KERNEL_TEXT_MAP, MAXACTIVE_MAX,
    SYSTEM_FREEING_INITMEM,
};
pub use events::{Event, EventFilter, EventKind, GuestTask, ProbeId, Subscription, Waker};
pub use symbols::SymbolIndex;
pub use task::{ProcessLayout, TaskInfo, TaskLayout};
