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
mod xol;

pub use engine::{
    BatchError, Engine, EngineConfig, EngineState, EngineStats, Frozen, Handling, KernelSymbols,
    NoSymbols, ProbeError, ProbeInfo, ProbeRequest, ProbeType, SavedCounters, SavedInstance,
    SavedProbe, TaskLayout, KERNEL_TEXT_MAP, MAXACTIVE_MAX,
};
pub use events::{Event, EventFilter, EventKind, GuestTask, ProbeId, Subscription, Waker};
pub use symbols::SymbolIndex;
