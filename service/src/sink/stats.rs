//! The sinks' accounting: every event is delivered or dropped for one
//! [`DropReason`], and counted in [`SinkStats`] (read by `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use proto::v1;

use crate::subscribe::QueuedTotal;

/// Why events were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    QueueFull = 0,
    RetriesExhausted = 1,
    Rejected = 2,
    Shutdown = 3,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::QueueFull,
        DropReason::RetriesExhausted,
        DropReason::Rejected,
        DropReason::Shutdown,
    ];

    /// Its `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::RetriesExhausted => "retries_exhausted",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
        }
    }

    pub(super) fn lost_reason(self) -> v1::LostReason {
        match self {
            DropReason::QueueFull => v1::LostReason::SubscriberQueueFull,
            DropReason::RetriesExhausted => v1::LostReason::SinkRetriesExhausted,
            DropReason::Rejected => v1::LostReason::SinkRejected,
            DropReason::Shutdown => v1::LostReason::SinkShutdown,
        }
    }
}

/// Counters of a sink, read by `/metrics`.
#[derive(Default)]
pub struct SinkStats {
    /// Events the receiver acknowledged.
    pub delivered: AtomicU64,
    /// In-band lost records the receiver acknowledged.
    pub lost_records: AtomicU64,
    /// Requests acknowledged.
    pub batches: AtomicU64,
    /// Events dropped, by [`DropReason`] index.
    pub dropped: [AtomicU64; 4],
    /// Attempts after a batch's first.
    pub retries: AtomicU64,
    /// Host CLOCK_REALTIME (ns) of the last acknowledged request, 0: none.
    pub last_success_ns: AtomicU64,
    pub(super) queued: OnceLock<QueuedTotal>,
}

impl std::fmt::Debug for SinkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkStats")
            .field("delivered", &self.delivered)
            .field("dropped", &self.dropped)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl SinkStats {
    pub(super) fn l(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// Events dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        Self::l(&self.dropped[reason as usize])
    }

    /// Events dropped, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(Self::l).sum()
    }

    /// Events in the sink's queue or in flight: taken into its queue and
    /// neither delivered nor dropped yet.
    pub fn queue_depth(&self) -> u64 {
        let queued = self.queued.get().map_or(0, |f| f());
        let done =
            Self::l(&self.delivered) + self.dropped_total() - self.dropped(DropReason::QueueFull);
        queued.saturating_sub(done)
    }
}
