//! The service's shared state ([`Inner`]): the engine, the guest, the
//! symbols, the probe catalog, the event streams and the policies. Its
//! behaviour is in the files named for what it does: `probes.rs` (the
//! probe table), `kernel.rs` (the guest kernel: slide, banner, symbols),
//! `policy/apply.rs` (policy loads) and `snapshot.rs`; `server.rs` only
//! turns RPCs into calls on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use introspect::Engine;

use crate::catalog::ProbeTable;
use crate::config::ServiceConfig;
use crate::guest::Guest;
use crate::policy::PolicyRun;
use crate::subscribe::Streams;
use crate::symbols::Symbols;

/// Locks, in the order they are taken: `policy_ops`, then `ops`, then
/// `probes` (held briefly, never while the engine stops the world).
pub(crate) struct Inner {
    pub engine: Arc<Engine>,
    pub symbols: Arc<Symbols>,
    pub guest: Arc<Guest>,
    pub config: ServiceConfig,
    /// Never held while the engine stops the world: the subscriber filters
    /// read it on vCPU threads.
    pub probes: Arc<RwLock<ProbeTable>>,
    /// Serialises create/delete so the limit check and the table agree.
    ops: Mutex<()>,
    /// The event streams (gRPC subscribers, export file, sinks).
    pub streams: Arc<Streams>,
    /// Loaded policies by name.
    pub policies: RwLock<BTreeMap<String, Arc<PolicyRun>>>,
    /// Serialises policy loads (taken before `ops`).
    pub policy_ops: Mutex<()>,
}

impl Inner {
    pub fn new(
        engine: Arc<Engine>,
        symbols: Arc<Symbols>,
        guest: Arc<Guest>,
        config: ServiceConfig,
    ) -> Self {
        let probes = Arc::new(RwLock::new(ProbeTable::default()));
        let streams = Arc::new(Streams::new(
            Box::new(engine.clone()),
            probes.clone(),
            symbols.clone(),
            config.clone(),
        ));
        Inner {
            engine,
            symbols,
            guest,
            config,
            probes,
            ops: Mutex::new(()),
            streams,
            policies: RwLock::default(),
            policy_ops: Mutex::new(()),
        }
    }

    /// Serialises probe creation and deletion (the limit check and the
    /// table agree under it).
    pub(crate) fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}
