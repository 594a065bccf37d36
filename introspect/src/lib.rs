//! hvprobe's probe engine: kprobes and kretprobes kept on the host.
//!
//! The engine sees the VM only through `guest_access`'s traits.
//!
//! # Files
//!
//! | file           | what it does                                                      |
//! |----------------|-------------------------------------------------------------------|
//! | `kprobes.rs`   | [`Engine`] (lock order on the struct) and its public operations   |
//! | `hit.rs`       | the breakpoint handler: dispatch, emulate, out-of-line, step      |
//! | `action.rs`    | probe actions (override, freeze, snapshot) and the override return |
//! | `hold.rs`      | freeze/snapshot holds on the vCPUs, thaw                          |
//! | `kretprobe.rs` | kretprobe instances, the return trap, recycling                   |
//! | `fetch.rs`     | a hit's context (registers, current task) and building events     |
//! | `text.rs`      | every write of guest text, each taking a `World` (world stopped)  |
//! | `table.rs`     | probes, sites (one `int3`, many probes), checking a request       |
//! | `xol.rs`       | out-of-line slots: relocation, padding allocation, retirement     |
//! | `guest.rs`     | reading guest text and data; init text freed or not               |
//! | `list.rs`      | the probe listing and the bytes hvprobe changed (read-only)       |
//! | `snapshot.rs`  | the probe table in a snapshot: freeze and restore                 |
//! | `events.rs`    | events, bounded subscriber queues, filters                        |
//! | `stats.rs`, `error.rs`, `symbols.rs`, `paging.rs`, `task.rs`: counters, errors, what the engine asks of symbols, the guest page walk, guest tasks |
//!
//! # The path of a hit
//!
//! VM exit (the VMM's run loop) → `hit.rs` `on_breakpoint` → the site in
//! `table.rs` → the displaced instruction: emulated (`hit.rs`, insn-emu),
//! out of line (`xol.rs` slot), or restored and single-stepped with the
//! world stopped (`text.rs`) → `fetch.rs` (arguments, current task) →
//! `events.rs` (subscriber queues) → the service's gRPC stream.
//!
//! # Layering
//!
//! A module uses only modules below it in this list (no circles):
//!
//! ```text
//! hit, snapshot, list, hold   impl blocks on Engine: the handler, freeze/restore, listing, holds
//! kprobes                     Engine and its public operations
//! text                        writes of guest text (World token)
//! kretprobe                   instances, return trap state
//! fetch                       HitContext, Reporter
//! action                      Action, the holds' state, the override return (beside events: gates read an Event, an Event says the action taken)
//! table                       Probe, Site, Table, Prepare
//! guest                       reads of guest text and data
//! xol                         relocation, Scratch, XolSlot, Slots
//! stats, error, events        counters, errors, the event bus
//! symbols, paging, task       leaves
//! ```

mod action;
mod error;
pub mod events;
mod fetch;
mod guest;
mod hit;
mod hold;
mod kprobes;
mod kretprobe;
mod list;
pub mod paging;
mod snapshot;
mod stats;
mod symbols;
mod table;
pub mod task;
mod text;
mod xol;

pub use action::{Action, ActionGate, ActionSink, ActionTaken, FreezeInfo};
pub use error::{BatchError, ProbeError, TaskListingError};
pub use events::{Event, EventFilter, EventKind, GuestTask, ProbeId, Subscription, Waker};
pub use hold::SNAPSHOT_ACTION_INTERVAL;
pub use kprobes::{Engine, EngineConfig, ExeInterest};
pub use list::ProbeInfo;
pub use snapshot::{EngineState, Frozen, SavedCounters, SavedInstance, SavedProbe};
pub use stats::EngineStats;
pub use symbols::{
    InitText, KernelSymbols, NoSymbols, SymbolIndex, KERNEL_TEXT_MAP, SYSTEM_FREEING_INITMEM,
};
pub use table::{Gate, Handling, ProbeRequest, ProbeType, MAXACTIVE_MAX};
pub use task::{ProcessLayout, TaskInfo, TaskLayout};
