//! Engine-wide counters: bumped on the hit path (relaxed atomics, no lock),
//! read by [`crate::Engine::stats`] and saved in snapshots.

use std::sync::atomic::{AtomicU64, Ordering};

/// Engine-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub hits: u64,
    /// Of `hits`, those trapped by a debug register (`%hw` probes).
    pub hardware_hits: u64,
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
    /// Module loads and unloads the host's internal hooks saw.
    pub module_events: u64,
    /// `freeze` actions that froze the guest.
    pub freezes: u64,
    /// `snapshot` actions skipped for the rate limit.
    pub snapshots_rate_limited: u64,
}

/// The live counters behind [`EngineStats`], plus the event sequence number.
#[derive(Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub hardware_hits: AtomicU64,
    pub emulated: AtomicU64,
    pub single_stepped: AtomicU64,
    pub out_of_line: AtomicU64,
    pub emulation_fallbacks: AtomicU64,
    pub return_traps: AtomicU64,
    pub stale_traps: AtomicU64,
    pub guest_int3: AtomicU64,
    pub recycled: AtomicU64,
    pub dropped: AtomicU64,
    pub module_events: AtomicU64,
    pub freezes: AtomicU64,
    pub snapshots_rate_limited: AtomicU64,
    /// The next event's sequence number (a gap is a loss).
    pub seq: AtomicU64,
}

impl Counters {
    pub fn stats(&self, live_instances: u64) -> EngineStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            hits: get(&self.hits),
            hardware_hits: get(&self.hardware_hits),
            emulated: get(&self.emulated),
            single_stepped: get(&self.single_stepped),
            out_of_line: get(&self.out_of_line),
            emulation_fallbacks: get(&self.emulation_fallbacks),
            return_traps: get(&self.return_traps),
            stale_traps: get(&self.stale_traps),
            guest_int3: get(&self.guest_int3),
            live_instances,
            recycled_instances: get(&self.recycled),
            events_dropped: get(&self.dropped),
            module_events: get(&self.module_events),
            freezes: get(&self.freezes),
            snapshots_rate_limited: get(&self.snapshots_rate_limited),
        }
    }
}
