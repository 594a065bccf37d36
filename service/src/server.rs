//! The `hvprobe.v1.HvProbe` service: [`HvProbeService`], a thin layer that
//! checks each request's shape and hands it to the service's state
//! ([`Inner`]) off the async workers. What each RPC does is in the file
//! named for it: `probes.rs`, `kernel.rs`, `policy/apply.rs`,
//! `snapshot.rs`, `subscribe.rs`.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use introspect::Engine;
use proto::v1::{self, hv_probe_server::HvProbe};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::ServiceConfig;
use crate::errors::{check_len, engine_op_error};
use crate::export::{ExportConfig, Exporter};
use crate::guest::Guest;
use crate::policy::{LoadReport, PolicyDef};
use crate::sink::{Sink, SinkConfig};
use crate::state::Inner;
use crate::subscribe;
use crate::symbols::Symbols;

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct HvProbeService {
    pub(crate) inner: Arc<Inner>,
}

impl HvProbeService {
    pub fn new(
        engine: Arc<Engine>,
        symbols: Arc<Symbols>,
        guest: Arc<Guest>,
        config: ServiceConfig,
    ) -> Self {
        let inner = Arc::new(Inner::new(engine, symbols, guest, config));
        inner
            .engine
            .set_action_sink(Arc::new(crate::actions::SnapshotSink(Arc::downgrade(
                &inner,
            ))));
        HvProbeService { inner }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Creates probes from kprobe_events lines, all or nothing (used for
    /// `--probe` before the guest starts: these become early probes).
    pub fn create_lines(&self, lines: &[String]) -> Result<Vec<v1::ProbeInfo>, Status> {
        let defs = lines
            .iter()
            .map(|l| v1::ProbeDefinition {
                definition: Some(v1::probe_definition::Definition::KprobeEvents(l.clone())),
                ..Default::default()
            })
            .collect();
        self.inner.create(defs, true)
    }

    /// Starts exporting every event to `cfg.path`. The file is opened (and
    /// its directory checked) here, so a bad path is an error now. `rt`
    /// runs the stream; the writing happens on a thread of its own.
    pub fn start_export(
        &self,
        cfg: ExportConfig,
        rt: &tokio::runtime::Handle,
    ) -> Result<Exporter, String> {
        Exporter::start(self.inner.streams.clone(), cfg, rt)
    }

    /// Starts a push sink: subscribes with its own queue now (so nothing
    /// produced after this returns is missed) and delivers on a thread of
    /// its own. `rt` runs the subscription's pump.
    pub fn start_sink(&self, cfg: SinkConfig, rt: &tokio::runtime::Handle) -> Result<Sink, String> {
        Sink::start(self.inner.streams.clone(), cfg, rt)
    }

    /// The event stream `Subscribe` serves, for in-process consumers (the
    /// demo). Must be called inside a tokio runtime.
    pub fn subscribe_stream(
        &self,
        req: v1::SubscribeRequest,
    ) -> Result<impl Stream<Item = Result<v1::SubscribeResponse, Status>> + Send + 'static, Status>
    {
        subscribe::start(self.inner.streams.clone(), req)
    }

    /// Write a snapshot of the running guest into `dir` (see the
    /// `CreateSnapshot` RPC).
    pub fn create_snapshot(
        &self,
        dir: &Path,
        stop: bool,
    ) -> Result<v1::CreateSnapshotResponse, Status> {
        self.inner.create_snapshot(dir, stop)
    }

    /// Put a snapshot's probe table (`probes.json`) back before the
    /// restored guest runs: every probe is resolved again from its
    /// definition and keeps its id, filter, enabled state and counters;
    /// live kretprobe instances are taken back. All or nothing.
    pub fn restore_probes(&self, json: &[u8]) -> Result<Vec<v1::ProbeInfo>, Status> {
        self.inner.restore_probe_table(json)
    }

    /// Loads policies (from `--policy` files or a reload), replacing those
    /// of the same names by difference and deleting those in `delete`, all
    /// or nothing. Blocking: call it off the async workers.
    pub fn apply_policies(
        &self,
        defs: &[PolicyDef],
        delete: &[String],
    ) -> Result<LoadReport, Status> {
        self.inner.apply_policies(defs, delete)
    }

    /// The loaded policies with their counters.
    pub fn list_policies(&self) -> Result<Vec<v1::PolicyInfo>, Status> {
        self.inner.policy_infos(&[])
    }
}

/// Runs a blocking engine operation off the async workers (it may stop the
/// world and wait for vCPUs).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("operation failed: {e}")))?
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HvProbe for HvProbeService {
    async fn create_snapshot(
        &self,
        req: Request<v1::CreateSnapshotRequest>,
    ) -> Result<Response<v1::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.directory.trim().is_empty() {
            return Err(Status::invalid_argument("directory: empty"));
        }
        if r.directory.len() > 4096 {
            return Err(Status::invalid_argument(format!(
                "directory: {} bytes, longer than PATH_MAX (4096)",
                r.directory.len()
            )));
        }
        let inner = self.inner.clone();
        let resp =
            blocking(move || inner.create_snapshot(std::path::Path::new(&r.directory), r.stop))
                .await?;
        Ok(Response::new(resp))
    }

    async fn watch_memory(
        &self,
        req: Request<v1::WatchMemoryRequest>,
    ) -> Result<Response<v1::WatchMemoryResponse>, Status> {
        let r = req.into_inner();
        let inner = self.inner.clone();
        let watch = blocking(move || inner.watch_memory(&r)).await?;
        Ok(Response::new(v1::WatchMemoryResponse {
            watch: Some(watch),
        }))
    }

    async fn unwatch_memory(
        &self,
        req: Request<v1::UnwatchMemoryRequest>,
    ) -> Result<Response<v1::UnwatchMemoryResponse>, Status> {
        let id = req.get_ref().id;
        let inner = self.inner.clone();
        let watch = blocking(move || inner.unwatch_memory(id)).await?;
        Ok(Response::new(v1::UnwatchMemoryResponse {
            watch: Some(watch),
        }))
    }

    async fn list_watches(
        &self,
        _: Request<v1::ListWatchesRequest>,
    ) -> Result<Response<v1::ListWatchesResponse>, Status> {
        Ok(Response::new(v1::ListWatchesResponse {
            watches: self.inner.list_watches(),
        }))
    }

    async fn take_watch_hits(
        &self,
        req: Request<v1::TakeWatchHitsRequest>,
    ) -> Result<Response<v1::TakeWatchHitsResponse>, Status> {
        let wait = req.get_ref().wait_ms;
        let inner = self.inner.clone();
        let resp = blocking(move || Ok(inner.take_watch_hits(wait))).await?;
        Ok(Response::new(resp))
    }

    async fn resume(
        &self,
        _: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::ResumeResponse>, Status> {
        self.inner.resume().map(Response::new)
    }

    async fn create_probe(
        &self,
        req: Request<v1::CreateProbeRequest>,
    ) -> Result<Response<v1::CreateProbeResponse>, Status> {
        let def = req.into_inner().definition.ok_or_else(|| {
            Status::invalid_argument("definition: missing (spec or kprobe_events)")
        })?;
        let inner = self.inner.clone();
        let mut v = blocking(move || inner.create(vec![def], false)).await?;
        Ok(Response::new(v1::CreateProbeResponse { probe: v.pop() }))
    }

    async fn create_probes(
        &self,
        req: Request<v1::CreateProbesRequest>,
    ) -> Result<Response<v1::CreateProbesResponse>, Status> {
        let defs = req.into_inner().definitions;
        let inner = self.inner.clone();
        let probes = blocking(move || inner.create(defs, true)).await?;
        Ok(Response::new(v1::CreateProbesResponse { probes }))
    }

    async fn delete_probe(
        &self,
        req: Request<v1::DeleteProbeRequest>,
    ) -> Result<Response<v1::DeleteProbeResponse>, Status> {
        let id = self
            .inner
            .resolve_ref(req.get_ref().probe.as_ref(), "probe")?;
        let inner = self.inner.clone();
        let mut v = blocking(move || inner.delete(vec![id])).await?;
        Ok(Response::new(v1::DeleteProbeResponse { probe: v.pop() }))
    }

    async fn delete_probes(
        &self,
        req: Request<v1::DeleteProbesRequest>,
    ) -> Result<Response<v1::DeleteProbesResponse>, Status> {
        let ids = self.inner.delete_targets(&req.into_inner())?;
        if ids.is_empty() {
            return Ok(Response::new(v1::DeleteProbesResponse::default()));
        }
        let inner = self.inner.clone();
        let probes = blocking(move || inner.delete(ids)).await?;
        Ok(Response::new(v1::DeleteProbesResponse { probes }))
    }

    async fn enable_probe(
        &self,
        req: Request<v1::EnableProbeRequest>,
    ) -> Result<Response<v1::EnableProbeResponse>, Status> {
        let inner = self.inner.clone();
        let r = req.into_inner();
        let probe = blocking(move || inner.set_enabled(r.probe.as_ref(), true)).await?;
        Ok(Response::new(v1::EnableProbeResponse {
            probe: Some(probe),
        }))
    }

    async fn disable_probe(
        &self,
        req: Request<v1::DisableProbeRequest>,
    ) -> Result<Response<v1::DisableProbeResponse>, Status> {
        let inner = self.inner.clone();
        let r = req.into_inner();
        let probe = blocking(move || inner.set_enabled(r.probe.as_ref(), false)).await?;
        Ok(Response::new(v1::DisableProbeResponse {
            probe: Some(probe),
        }))
    }

    async fn arm(&self, _: Request<v1::ArmRequest>) -> Result<Response<v1::ArmResponse>, Status> {
        let engine = self.inner.engine.clone();
        let was_armed = blocking(move || {
            let was = engine.armed();
            engine.set_armed(true).map_err(|e| engine_op_error(&e))?;
            Ok(was)
        })
        .await?;
        Ok(Response::new(v1::ArmResponse { was_armed }))
    }

    async fn disarm(
        &self,
        _: Request<v1::DisarmRequest>,
    ) -> Result<Response<v1::DisarmResponse>, Status> {
        let engine = self.inner.engine.clone();
        let was_armed = blocking(move || {
            let was = engine.armed();
            engine.set_armed(false).map_err(|e| engine_op_error(&e))?;
            Ok(was)
        })
        .await?;
        Ok(Response::new(v1::DisarmResponse { was_armed }))
    }

    async fn list_probes(
        &self,
        req: Request<v1::ListProbesRequest>,
    ) -> Result<Response<v1::ListProbesResponse>, Status> {
        let r = req.into_inner();
        let max = self.inner.config.max_probes;
        for (what, n) in [("ids", r.ids.len()), ("groups", r.groups.len())] {
            if n > max {
                return Err(Status::invalid_argument(format!(
                    "{what}: {n} entries, more than the probe limit of {max}"
                )));
            }
        }
        let inner = self.inner.clone();
        let probes = blocking(move || inner.infos(None)).await?;
        let probes = probes
            .into_iter()
            .filter(|p| r.groups.is_empty() || r.groups.contains(&p.group))
            .filter(|p| r.ids.is_empty() || r.ids.contains(&p.id))
            .collect();
        Ok(Response::new(v1::ListProbesResponse {
            probes,
            armed: self.inner.engine.armed(),
        }))
    }

    async fn get_probe(
        &self,
        req: Request<v1::GetProbeRequest>,
    ) -> Result<Response<v1::GetProbeResponse>, Status> {
        let id = self
            .inner
            .resolve_ref(req.get_ref().probe.as_ref(), "probe")?;
        let inner = self.inner.clone();
        let probe = blocking(move || inner.one(id)).await?;
        Ok(Response::new(v1::GetProbeResponse { probe: Some(probe) }))
    }

    async fn resolve_symbol(
        &self,
        req: Request<v1::ResolveSymbolRequest>,
    ) -> Result<Response<v1::ResolveSymbolResponse>, Status> {
        self.inner.resolve_symbol(req.get_ref()).map(Response::new)
    }

    async fn get_guest_info(
        &self,
        _: Request<v1::GetGuestInfoRequest>,
    ) -> Result<Response<v1::GetGuestInfoResponse>, Status> {
        let inner = self.inner.clone();
        let info = blocking(move || Ok(inner.guest_info())).await?;
        Ok(Response::new(info))
    }

    async fn list_tasks(
        &self,
        _: Request<v1::ListTasksRequest>,
    ) -> Result<Response<v1::ListTasksResponse>, Status> {
        let engine = self.inner.engine.clone();
        let tasks = blocking(move || {
            engine.list_tasks().map_err(|e| match e {
                introspect::TaskListingError::Walk(w) => Status::data_loss(w.to_string()),
                other => Status::failed_precondition(other.to_string()),
            })
        })
        .await?;
        Ok(Response::new(v1::ListTasksResponse {
            tasks: tasks
                .into_iter()
                .map(|t| v1::GuestTaskInfo {
                    pid: t.pid,
                    tgid: t.tgid,
                    ppid: t.ppid,
                    comm: String::from_utf8_lossy(&t.comm).into_owned(),
                    state: t.state.to_string(),
                    kernel_thread: t.kernel_thread,
                    exe: t.exe,
                    address: t.address,
                })
                .collect(),
        }))
    }

    async fn load_policy(
        &self,
        req: Request<v1::LoadPolicyRequest>,
    ) -> Result<Response<v1::LoadPolicyResponse>, Status> {
        let r = req.into_inner();
        let defs = crate::policy::parse_request(&r)?;
        let inner = self.inner.clone();
        let (report, policies) = blocking(move || {
            let report = inner.apply_policies(&defs, &[])?;
            let infos = inner.policy_infos(&report.policies)?;
            Ok((report, infos))
        })
        .await?;
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(Response::new(v1::LoadPolicyResponse {
            policies,
            probes_added: n(report.added),
            probes_removed: n(report.removed),
            probes_kept: n(report.kept),
        }))
    }

    async fn list_policies(
        &self,
        req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        let names = req.into_inner().names;
        if names.len() > crate::policy::doc::MAX_POLICIES {
            return Err(Status::invalid_argument(format!(
                "names: {} entries, more than the policy limit of {}",
                names.len(),
                crate::policy::doc::MAX_POLICIES
            )));
        }
        let inner = self.inner.clone();
        let policies = blocking(move || inner.policy_infos(&names)).await?;
        Ok(Response::new(v1::ListPoliciesResponse { policies }))
    }

    async fn delete_policy(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        let name = req.into_inner().name;
        check_len("name", &name, crate::policy::doc::MAX_NAME_LEN)?;
        let inner = self.inner.clone();
        let policy = blocking(move || {
            let names = vec![name];
            let before = inner.policy_infos(&names)?.pop();
            inner.apply_policies(&[], &names)?;
            Ok(before)
        })
        .await?;
        Ok(Response::new(v1::DeletePolicyResponse { policy }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let stream = subscribe::start(self.inner.streams.clone(), req.into_inner())?;
        Ok(Response::new(Box::pin(stream)))
    }
}
