//! The engine's holds on the vCPUs: a `freeze` action (until
//! [`Engine::thaw`]) and a `snapshot` action in progress (until the sink
//! calls [`Engine::release_snapshot_hold`]). The VMM keeps every vCPU at its
//! checkpoint while any hold is taken ([`guest_access::VmControl::hold_all`]):
//! outside guest mode, still serving requests and counted as parked, so the
//! API, event streams and snapshots go on while the guest stands still.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::action::{ActionSink, ActionTaken, FreezeInfo, HoldState};
use crate::events::ProbeId;
use crate::fetch::now_ns;
use crate::kprobes::Engine;

/// At most one snapshot action per probe in this long: a hot function
/// would otherwise write a snapshot per hit.
pub const SNAPSHOT_ACTION_INTERVAL: Duration = Duration::from_secs(5);

impl Engine {
    /// Where snapshot actions go; without a sink they are skipped.
    pub fn set_action_sink(&self, sink: Arc<dyn ActionSink>) {
        *self.action_sink.lock().unwrap() = Some(sink);
    }

    /// Who froze the guest, while it is frozen.
    pub fn frozen_by(&self) -> Option<FreezeInfo> {
        self.holds.state.lock().unwrap().frozen.clone()
    }

    /// Let a frozen guest run again; returns who froze it (None: it was not
    /// frozen). A snapshot action still being written keeps its own hold.
    pub fn thaw(&self) -> Option<FreezeInfo> {
        let mut st = self.holds.state.lock().unwrap();
        let was = st.frozen.take();
        self.release_if_free(&st);
        was
    }

    /// A snapshot action's sink is done with the guest (written or failed).
    pub fn release_snapshot_hold(&self) {
        let mut st = self.holds.state.lock().unwrap();
        st.snapshots = st.snapshots.saturating_sub(1);
        self.release_if_free(&st);
    }

    fn release_if_free(&self, st: &HoldState) {
        if !st.any() {
            self.vm().release_all();
        }
    }

    /// Take a hold under the state lock; false if the VM cannot hold.
    fn hold(&self, st: &HoldState) -> bool {
        st.any() || self.vm().hold_all()
    }

    /// A `freeze` action: the first hit freezes, later ones (another vCPU
    /// at the same moment, or the same probe again after a thaw raced) see
    /// the guest frozen already.
    pub(crate) fn freeze_action(&self, probe: ProbeId, vcpu: u32) -> ActionTaken {
        let mut st = self.holds.state.lock().unwrap();
        if st.frozen.is_some() {
            return ActionTaken::AlreadyFrozen;
        }
        if !self.hold(&st) {
            return ActionTaken::Skipped {
                why: "this VM cannot hold its vCPUs".into(),
            };
        }
        st.frozen = Some(FreezeInfo {
            probe,
            vcpu,
            since_ns: now_ns(),
        });
        self.counters.freezes.fetch_add(1, Ordering::Relaxed);
        ActionTaken::Freeze
    }

    /// A `snapshot` action: hold the guest as it is at this hit and hand the
    /// snapshot to the sink, at most once per [`SNAPSHOT_ACTION_INTERVAL`]
    /// per probe and one at a time.
    pub(crate) fn snapshot_action(&self, probe: ProbeId, seq: u64) -> ActionTaken {
        let skipped = |why: String| ActionTaken::Skipped { why };
        let Some(sink) = self.action_sink.lock().unwrap().clone() else {
            return skipped("no snapshot directory is configured".into());
        };
        {
            let mut st = self.holds.state.lock().unwrap();
            if st.snapshots > 0 {
                return skipped("a snapshot action is being written".into());
            }
            let now = Instant::now();
            if let Some(last) = st.last_snapshot.get(&probe) {
                if now.duration_since(*last) < SNAPSHOT_ACTION_INTERVAL {
                    self.counters
                        .snapshots_rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    return skipped(format!(
                        "rate limit: one snapshot per {} s per probe",
                        SNAPSHOT_ACTION_INTERVAL.as_secs()
                    ));
                }
            }
            if !self.hold(&st) {
                return skipped("this VM cannot hold its vCPUs".into());
            }
            st.snapshots += 1;
            st.last_snapshot.insert(probe, now);
        }
        // Outside the lock: the sink only starts its work here.
        match sink.begin_snapshot(probe, seq) {
            Ok(path) => ActionTaken::Snapshot { path },
            Err(why) => {
                self.release_snapshot_hold();
                skipped(why)
            }
        }
    }
}
