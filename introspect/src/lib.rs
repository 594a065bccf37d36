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
//! | `hwbp.rs`      | hardware-breakpoint sites: claiming and releasing debug registers |
//! | `table.rs`     | probes, sites (one `int3`, many probes), checking a request       |
//! | `xol.rs`       | out-of-line slots: relocation, padding allocation, retirement     |
//! | `guest.rs`     | reading guest text and data; init text freed or not               |
//! | `modules.rs`   | the guest's `modules` list and each module's kallsyms             |
//! | `guest_modules.rs` | loaded modules as the table sees them; unloaded text is gone  |
//! | `module_watch.rs`  | `MOD:SYM` probes: pending, armed at load, gone at unload      |
//! | `watch.rs`     | watches on guest data: protected pages, write hits with writer and values |
//! | `list.rs`      | the probe listing and the bytes hvprobe changed (read-only)       |
//! | `snapshot.rs`  | the probe table in a snapshot: freeze and restore                 |
//! | `events.rs`    | events, bounded subscriber queues, filters                        |
//! | `stats.rs`, `error.rs`, `symbols.rs`, `paging.rs`, `task.rs`, `addr_map.rs`: counters, errors, what the engine asks of symbols, the guest page walk, guest tasks, the address-keyed map of the hit's lookups |
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
//! watch                       impl block on Engine: watches on guest data
//! module_watch                impl block on Engine: module loads and unloads
//! kprobes                     Engine and its public operations
//! text, hwbp                  writes of guest text (World token); debug-register sites
//! kretprobe                   instances, return trap state
//! fetch                       HitContext, Reporter
//! action                      Action, the holds' state, the override return (beside events: gates read an Event, an Event says the action taken)
//! table                       Probe, Site, Table, Prepare
//! guest, guest_modules        reads of guest text and data, loaded modules
//! xol                         relocation, Scratch, XolSlot, Slots
//! stats, error, events        counters, errors, the event bus
//! symbols, paging, task,      leaves
//!   modules, addr_map
//! ```

mod action;
mod addr_map;
mod error;
pub mod events;
mod fetch;
mod guest;
mod guest_modules;
mod hit;
mod hold;
mod hwbp;
mod kprobes;
mod kretprobe;
mod list;
mod module_watch;
pub mod modules;
pub mod paging;
mod snapshot;
mod stats;
mod symbols;
mod table;
pub mod task;
mod text;
mod watch;
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
pub use table::{Gate, Handling, ModuleTarget, ProbeRequest, ProbeType, MAXACTIVE_MAX};
pub use task::{ProcessLayout, TaskInfo, TaskLayout};
pub use watch::{
    WatchAccess, WatchError, WatchHit, WatchId, WatchInfo, WatchMechanism, WatchPiece,
    WatchRequest, MAX_WATCH_LEN, VALUE_CAP,
};
