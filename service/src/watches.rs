//! `WatchMemory`, `UnwatchMemory`, `ListWatches`, `TakeWatchHits`: watches
//! on guest data (introspect's `watch.rs`), their locations resolved here.

use std::time::Duration;

use introspect::{WatchAccess, WatchError, WatchHit, WatchInfo, WatchMechanism, WatchRequest};
use proto::v1;
use tonic::Status;

use crate::errors::check_len;
use crate::kernel::MAX_LOCATION_LEN;
use crate::state::Inner;

fn status(e: &WatchError) -> Status {
    let msg = e.to_string();
    match e {
        WatchError::BadLength { .. } | WatchError::ReadNeedsDebugRegister { .. } => {
            Status::invalid_argument(msg)
        }
        WatchError::NotFound(_) => Status::not_found(msg),
        _ => Status::failed_precondition(msg),
    }
}

fn access_to_proto(a: WatchAccess) -> v1::WatchAccess {
    match a {
        WatchAccess::Write => v1::WatchAccess::WatchWrite,
        WatchAccess::ReadWrite => v1::WatchAccess::WatchReadWrite,
    }
}

fn mechanism_to_proto(m: WatchMechanism) -> v1::WatchMechanism {
    match m {
        WatchMechanism::Page => v1::WatchMechanism::WatchPage,
        WatchMechanism::DebugRegister => v1::WatchMechanism::WatchDebugRegister,
    }
}

pub(crate) fn info_to_proto(w: &WatchInfo) -> v1::WatchInfo {
    let mut pages: Vec<u64> = w.pieces.iter().map(|p| p.gpa & !0xfff).collect();
    pages.dedup();
    v1::WatchInfo {
        id: w.id,
        location: w.name.clone(),
        address: w.addr,
        length: w.len,
        access: access_to_proto(w.access) as i32,
        mechanism: mechanism_to_proto(w.mechanism) as i32,
        pages,
        hits: w.hits,
    }
}

fn hit_to_proto(h: &WatchHit) -> v1::WatchHit {
    v1::WatchHit {
        watch_id: h.watch,
        location: h.name.clone(),
        vcpu: h.vcpu,
        address: h.addr,
        length: u32::try_from(h.len).unwrap_or(u32::MAX),
        writer_ip: h.writers.first().copied().unwrap_or(0),
        writer_candidates: h.writers.clone(),
        writer: h.writer.clone(),
        rip_after: h.rip_after,
        pid: h.task.as_ref().map_or(0, |t| t.pid),
        comm: h
            .task
            .as_ref()
            .map(|t| String::from_utf8_lossy(t.comm()).into_owned())
            .unwrap_or_default(),
        old_value: h.old.clone(),
        new_value: h.new.clone(),
        time_ns: h.time_ns,
    }
}

impl Inner {
    /// Resolve `location` (`SYM`, `SYM+OFF`, an address) to a kernel address.
    fn watch_address(&self, location: &str) -> Result<u64, Status> {
        check_len("location", location, MAX_LOCATION_LEN)?;
        if location.trim().is_empty() {
            return Err(Status::invalid_argument("location: empty"));
        }
        let loc = guest_symbols::parse_location(location)
            .map_err(|e| Status::invalid_argument(format!("location: {e}")))?;
        self.symbols.resolve(&loc).map_err(|e| match e {
            guest_symbols::LookupError::NotFound(_) => Status::not_found(format!("location: {e}")),
            e => Status::invalid_argument(format!("location: {e}")),
        })
    }

    pub(crate) fn watch_memory(&self, r: &v1::WatchMemoryRequest) -> Result<v1::WatchInfo, Status> {
        let addr = self.watch_address(&r.location)?;
        let access = match v1::WatchAccess::try_from(r.access) {
            Ok(v1::WatchAccess::WatchWrite) => WatchAccess::Write,
            Ok(v1::WatchAccess::WatchReadWrite) => WatchAccess::ReadWrite,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "access: unknown value {}",
                    r.access
                )))
            }
        };
        let mechanism = match v1::WatchMechanism::try_from(r.mechanism) {
            Ok(v1::WatchMechanism::Default) => None,
            Ok(v1::WatchMechanism::WatchPage) => Some(WatchMechanism::Page),
            Ok(v1::WatchMechanism::WatchDebugRegister) => Some(WatchMechanism::DebugRegister),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "mechanism: unknown value {}",
                    r.mechanism
                )))
            }
        };
        let id = self
            .engine
            .watch(WatchRequest {
                name: r.location.trim().to_string(),
                addr,
                len: r.length,
                access,
                mechanism,
            })
            .map_err(|e| status(&e))?;
        self.one_watch(id)
    }

    fn one_watch(&self, id: u64) -> Result<v1::WatchInfo, Status> {
        self.engine
            .watches()
            .iter()
            .find(|w| w.id == id)
            .map(info_to_proto)
            .ok_or_else(|| status(&WatchError::NotFound(id)))
    }

    pub(crate) fn unwatch_memory(&self, id: u64) -> Result<v1::WatchInfo, Status> {
        let info = self.one_watch(id)?;
        self.engine.unwatch(id).map_err(|e| status(&e))?;
        Ok(info)
    }

    pub(crate) fn list_watches(&self) -> Vec<v1::WatchInfo> {
        self.engine.watches().iter().map(info_to_proto).collect()
    }

    pub(crate) fn take_watch_hits(&self, wait_ms: u32) -> v1::TakeWatchHitsResponse {
        if wait_ms > 0 {
            self.engine
                .wait_watch_hits(Duration::from_millis(u64::from(wait_ms.min(10_000))));
        }
        let (hits, dropped) = self.engine.take_watch_hits();
        v1::TakeWatchHitsResponse {
            hits: hits.iter().map(hit_to_proto).collect(),
            dropped,
        }
    }
}
