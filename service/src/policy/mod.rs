//! Policies: named sets of probes with a filter, tags, a rate limit and an
//! enabled state, loaded from YAML or JSON documents ([`doc`]) by
//! `hvprobe run --policy FILE`, SIGHUP and the `LoadPolicy` RPC.
//!
//! A load is one transaction over every policy it names: all their probes
//! are parsed and resolved first, then registered in one engine batch
//! (which rolls back by itself), and only then are the probes that left
//! the policies removed. A probe is kept, with its id and counters, when a
//! policy of the same name had the same definition and filter before.
//!
//! On the event path a policy's probe costs one look at its rate limiter,
//! decided once per event however many subscribers take it (the decision of
//! the last event is remembered per vCPU thread: the engine offers an event
//! to its subscribers one after the other on the thread that fetched it).

mod apply;
pub mod doc;
pub mod limit;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use introspect::{Event, ProbeId};
use proto::v1;
use tonic::Status;

pub use doc::{DocError, PolicyDef, Pos, RateLimitDef};
pub use limit::{Limiter, Scope};

#[cfg(test)]
mod tests;

/// A probe of a policy as the diff compares it: its canonical definition
/// line and its (combined) filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ProbeKey {
    pub line: String,
    pub filter: String,
    /// The action as spelled (a changed action makes another probe: the
    /// engine holds the action, the filter alone can be swapped).
    pub action: Option<String>,
}

/// What a load may change without touching probes.
#[derive(Debug)]
pub(crate) struct PolicyConf {
    pub enabled: bool,
    pub source: String,
    pub filter: String,
    pub tags: BTreeMap<String, String>,
    pub rate_limit: Option<RateLimitDef>,
    pub limiter: Option<Arc<Limiter>>,
    /// Its probes in document order.
    pub probes: Vec<(ProbeKey, ProbeId)>,
    pub generation: u64,
}

/// A loaded policy: its configuration (replaced whole by a load that
/// changes it) and its counters (kept as long as the name is loaded).
#[derive(Debug)]
pub(crate) struct PolicyRun {
    pub name: String,
    conf: RwLock<Arc<PolicyConf>>,
    /// Events that passed the filter and the rate limit.
    pub events: AtomicU64,
    /// Events the rate limit dropped.
    pub rate_limited: AtomicU64,
    /// Hits of its probes that are gone (removed by a load or DeleteProbe).
    pub retired_hits: AtomicU64,
}

thread_local! {
    /// (seq, probe id, admitted) of the last event decided on this thread.
    static LAST: Cell<(u64, ProbeId, bool)> = const { Cell::new((u64::MAX, 0, false)) };
}

impl PolicyRun {
    fn new(name: String, conf: PolicyConf) -> Arc<PolicyRun> {
        Arc::new(PolicyRun {
            name,
            conf: RwLock::new(Arc::new(conf)),
            events: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            retired_hits: AtomicU64::new(0),
        })
    }

    pub fn conf(&self) -> Arc<PolicyConf> {
        self.conf.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_conf(&self, c: PolicyConf) {
        *self.conf.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
    }

    /// Whether `ev` (which passed the probe's filter) goes to subscribers:
    /// its rate limit decides, once per event, and it is counted.
    pub fn admit(&self, ev: &Event) -> bool {
        let (seq, id, was) = LAST.with(Cell::get);
        if seq == ev.seq && id == ev.probe_id {
            return was;
        }
        let limiter = self
            .conf
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .limiter
            .clone();
        let ok = limiter.is_none_or(|l| l.admit(ev.time_ns, ev.task.as_ref()));
        if ok {
            self.events.fetch_add(1, Ordering::Relaxed);
        } else {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        LAST.with(|c| c.set((ev.seq, ev.probe_id, ok)));
        ok
    }
}

/// What a load did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub policies: Vec<String>,
    pub added: usize,
    pub removed: usize,
    /// Probes kept (with their ids and counters), those whose filter
    /// changed included.
    pub kept: usize,
    /// Of `kept`: probes whose filter changed.
    pub refiltered: usize,
    pub deleted_policies: Vec<String>,
}

/// One row of `/metrics` per policy.
pub(crate) struct PolicyCounters {
    pub name: String,
    pub enabled: bool,
    pub probes: usize,
    pub hits: u64,
    pub events: u64,
    pub rate_limited: u64,
}

/// Parses the documents of a `LoadPolicy` request: errors are
/// INVALID_ARGUMENT with the source, line and column.
pub(crate) fn parse_request(r: &v1::LoadPolicyRequest) -> Result<Vec<PolicyDef>, Status> {
    if r.documents.is_empty() {
        return Err(Status::invalid_argument("documents: empty"));
    }
    let mut defs: Vec<PolicyDef> = Vec::new();
    for (i, d) in r.documents.iter().enumerate() {
        let source = if d.source.trim().is_empty() {
            format!("documents[{i}]")
        } else {
            crate::errors::quote(d.source.trim())
        };
        let more =
            doc::parse(&source, &d.text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        doc::check_unique(&defs, &more).map_err(|e| Status::invalid_argument(e.to_string()))?;
        defs.extend(more);
    }
    Ok(defs)
}
