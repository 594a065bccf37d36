//! The `hvprobe.v1.HvProbe` service over the probe engine.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use guest_access::VmControl;
use introspect::{Engine, ProbeId, ProbeRequest, ProbeType};
use probe_spec::{Command, FieldKind, Filter, ProbeDef, ProbeTarget};
use proto::v1::{self, hv_probe_server::HvProbe};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::catalog::{self, ProbeMeta, ProbeTable};
use crate::config::ServiceConfig;
use crate::errors::{check_len, engine_error, engine_op_error, parse_error, quote};
use crate::export::{ExportConfig, Exporter};
use crate::sink::{Sink, SinkConfig};
use crate::subscribe::{self, Streams};
use crate::symbols::Symbols;

/// The guest's lifecycle as the runner reports it, plus the VM for reads.
pub struct Guest {
    state: AtomicI32,
    vm: Arc<dyn VmControl>,
    bridge: std::sync::OnceLock<BridgeInfoFn>,
    snapshot: std::sync::OnceLock<Arc<dyn crate::snapshot::SnapshotWriter>>,
    kaslr_possible: AtomicBool,
}

/// Reports the VMM's system-call bridge (the service does not know the VMM).
pub type BridgeInfoFn = Box<dyn Fn() -> v1::SyscallBridgeInfo + Send + Sync>;

impl Guest {
    pub fn new(vm: Arc<dyn VmControl>) -> Arc<Self> {
        Arc::new(Guest {
            state: AtomicI32::new(v1::GuestState::Created as i32),
            vm,
            bridge: std::sync::OnceLock::new(),
            snapshot: std::sync::OnceLock::new(),
            kaslr_possible: AtomicBool::new(false),
        })
    }

    /// Whether the guest kernel may run at a randomized base (the VMM knows:
    /// a bzImage without `nokaslr`). Then no probe is placed before the
    /// slide is found in guest memory.
    pub fn set_kaslr_possible(&self, possible: bool) {
        self.kaslr_possible.store(possible, Ordering::SeqCst);
    }

    pub fn kaslr_possible(&self) -> bool {
        self.kaslr_possible.load(Ordering::SeqCst)
    }

    /// Who writes the VMM's part of a snapshot (set once; without it
    /// `CreateSnapshot` is refused).
    pub fn set_snapshot_writer(&self, w: Arc<dyn crate::snapshot::SnapshotWriter>) {
        let _ = self.snapshot.set(w);
    }

    pub(crate) fn snapshot_writer(&self) -> Option<Arc<dyn crate::snapshot::SnapshotWriter>> {
        self.snapshot.get().cloned()
    }

    /// Where GetGuestInfo gets the system-call bridge's state (set once).
    pub fn set_bridge_info(&self, f: BridgeInfoFn) {
        let _ = self.bridge.set(f);
    }

    fn bridge_info(&self) -> Option<v1::SyscallBridgeInfo> {
        self.bridge.get().map(|f| f())
    }

    /// vCPUs of the guest.
    pub fn vcpu_count(&self) -> usize {
        self.vm.vcpu_count()
    }

    pub fn set_state(&self, s: v1::GuestState) {
        self.state.store(s as i32, Ordering::SeqCst);
    }

    pub fn state(&self) -> v1::GuestState {
        v1::GuestState::try_from(self.state.load(Ordering::SeqCst))
            .unwrap_or(v1::GuestState::Unspecified)
    }
}

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
    pub policies: RwLock<BTreeMap<String, Arc<crate::policy::PolicyRun>>>,
    /// Serialises policy loads (taken before `ops`).
    pub policy_ops: Mutex<()>,
}

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct HvProbeService {
    pub(crate) inner: Arc<Inner>,
}

/// Longest `GROUP/EVENT` a probe reference may name: both parts are shorter
/// than the kernel's `MAX_EVENT_NAME_LEN`.
pub const MAX_PROBE_NAME_LEN: usize = 2 * probe_spec::limits::MAX_EVENT_NAME_LEN - 1;

/// Longest ResolveSymbol query, `[MODULE:]SYMBOL[+OFFSET]`: a module and a
/// symbol name within the kernel's `MODULE_NAME_LEN` and `KSYM_NAME_LEN`, a
/// colon and a 64-bit offset in hex with its `+0x`.
pub const MAX_LOCATION_LEN: usize =
    probe_spec::limits::MODULE_NAME_LEN - 1 + 1 + probe_spec::limits::KSYM_NAME_LEN - 1 + 19;

/// A definition checked and resolved, ready for the engine.
pub(crate) struct Prepared {
    pub request: ProbeRequest,
    pub meta: ProbeMeta,
}

impl HvProbeService {
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
        HvProbeService {
            inner: Arc::new(Inner {
                engine,
                symbols,
                guest,
                config,
                probes,
                ops: Mutex::new(()),
                streams,
                policies: RwLock::default(),
                policy_ops: Mutex::new(()),
            }),
        }
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
}

impl Inner {
    /// The KASLR slide, found once in guest memory: the #PF gate of a
    /// vCPU's IDT against `asm_exc_page_fault`, checked with the banner at
    /// the slid `linux_banner`. Until the kernel has an IDT the slide can
    /// only be assumed 0, which is refused where the boot may randomize
    /// (`Guest::set_kaslr_possible`).
    pub(crate) fn settle_slide(&self) -> Result<i64, Status> {
        if let Some(s) = self.symbols.slide() {
            return Ok(s);
        }
        let possible = self.guest.kaslr_possible();
        let sregs = self
            .engine
            .kernel_system_regs()
            .filter(|s| s.long_mode && s.idt_base != 0);
        let Some(sregs) = sregs else {
            if possible {
                return Err(Status::failed_precondition(
                    "the guest kernel may run at a randomized base (a bzImage booted without \
                     nokaslr) and has not set up its IDT yet, so its KASLR slide is unknown: \
                     create probes once it runs, or boot with nokaslr for probes before boot",
                ));
            }
            // Not running yet, and it cannot move: link-time addresses.
            return Ok(self.symbols.set_slide(0));
        };
        let mem = crate::kaslr::KernelVirt {
            mem: self.guest.vm.memory(),
            sregs,
        };
        match guest_symbols::slide_from_idt(
            &mem,
            sregs.idt_base,
            self.symbols.table(),
            self.symbols.image(),
        ) {
            Ok(k) => {
                let slide = self.symbols.set_slide(k.slide);
                tracing::info!("KASLR slide {slide:#x} (banner at the slid linux_banner matches)");
                // Not placed yet (a randomizable boot), or placed before
                // the slide was known: put it at the slid padding byte.
                if let Some(t) = self.symbols.return_trap_candidate() {
                    if self.engine.return_trap_address() != Some(t) {
                        self.engine.set_return_trap(t).map_err(|e| {
                            Status::failed_precondition(format!(
                                "placing the kretprobe return trap at {t:#x}: {e}"
                            ))
                        })?;
                    }
                }
                Ok(slide)
            }
            Err(e) if possible => Err(Status::failed_precondition(format!(
                "the guest kernel may run at a randomized base and its KASLR slide could \
                 not be established: {e}"
            ))),
            Err(e) => {
                tracing::debug!("no KASLR slide found ({e}); the boot cannot randomize: 0");
                Ok(self.symbols.set_slide(0))
            }
        }
    }

    pub(crate) fn prepare(
        &self,
        def: &v1::ProbeDefinition,
        index: Option<u32>,
    ) -> Result<Prepared, Status> {
        self.settle_slide()?;
        let prefix = |m: String| match index {
            Some(i) => format!("definitions[{i}]: {m}"),
            None => format!("definition: {m}"),
        };
        let line = match &def.definition {
            Some(v1::probe_definition::Definition::Spec(s)) => proto::spec_to_line(s)
                .map_err(|m| Status::invalid_argument(prefix(format!("spec.{m}"))))?,
            // Stored and quoted without its surrounding whitespace (a valid
            // line with 1 MB of trailing spaces is a short probe).
            Some(v1::probe_definition::Definition::KprobeEvents(l)) => {
                probe_spec::trim_line(l).to_string()
            }
            None => {
                return Err(Status::invalid_argument(prefix(
                    "missing (spec or kprobe_events)".into(),
                )))
            }
        };
        let mut pd = match probe_spec::parse_command(&line) {
            Ok(Command::Add(d)) => d,
            Ok(Command::Remove(_)) => {
                return Err(Status::invalid_argument(prefix(
                    "'-:' lines delete probes: use DeleteProbe".into(),
                )))
            }
            Err(e) => return Err(parse_error(&e, index)),
        };
        let (address, symbol, offset, module) = self.resolve_target(&pd, &line, index)?;
        if pd.has_unresolved_names() {
            let Some(dbg) = self.symbols.debug_info() else {
                let pos = crate::errors::word_position(&line, 2);
                return Err(Status::invalid_argument(prefix(format!(
                    "NOSUP_BTFARG: named arguments need DWARF (load a vmlinux with debug info) at position {pos}"
                ))));
            };
            probe_spec::resolve_names(&mut pd, &line, &dbg).map_err(|e| parse_error(&e, index))?;
        }
        probe_spec::resolve_symbols(&mut pd, &line, &|s: &str| self.symbols.lookup(s).ok())
            .map_err(|e| parse_error(&e, index))?;
        let args: Vec<(String, Option<FieldKind>)> = pd
            .args
            .iter()
            .map(|a| (a.name.clone(), catalog::arg_field_kind(&a.ty)))
            .collect();
        let filter_text = probe_spec::trim_line(&def.filter);
        let names_exe = std::cell::Cell::new(false);
        let filter = if filter_text.is_empty() {
            None
        } else {
            let f = Filter::parse(filter_text).map_err(|e| parse_error(&e, index))?;
            let is_return = pd.kind.is_return();
            f.check(&|name: &str| {
                names_exe.set(names_exe.get() || name == "exe");
                catalog::probe_field_kind(&args, is_return, name)
            })
            .map_err(|e| parse_error(&e, index))?;
            Some(f)
        };
        let kind = match pd.kind {
            probe_spec::ProbeKind::Kprobe => ProbeType::Kprobe,
            probe_spec::ProbeKind::Kretprobe { maxactive } => ProbeType::Kretprobe { maxactive },
        };
        let location = if symbol.is_empty() {
            format!("0x{address:x}")
        } else if offset == 0 {
            symbol.clone()
        } else {
            format!("{symbol}+{offset}")
        };
        let ip_text = self
            .symbols
            .sym_off(address)
            .map_or_else(|| format!("0x{address:x}"), |s| s.to_string());
        let meta = ProbeMeta {
            id: 0,
            group: pd.group.clone(),
            event: pd.event.clone(),
            kind: pd.kind.into(),
            symbol,
            offset,
            module,
            location,
            definition: line.clone(),
            filter,
            filter_text: def.filter.trim().to_string(),
            args,
            ip_text,
            fields: catalog::fields_of(&pd),
            _exe: names_exe.get().then(|| self.engine.want_exe()),
            policy: None,
        };
        let request = ProbeRequest {
            name: pd.full_name(),
            address,
            kind,
            fetch: Some(pd),
            enabled: !def.create_disabled,
            force_single_step: false,
            force_out_of_line: false,
            definition: line,
        };
        Ok(Prepared { request, meta })
    }

    /// Address, symbol, offset and module of the probe point.
    fn resolve_target(
        &self,
        pd: &ProbeDef,
        line: &str,
        index: Option<u32>,
    ) -> Result<(u64, String, u64, String), Status> {
        let pos = crate::errors::word_position(line, 1);
        let at = |m: String| match index {
            Some(i) => format!("definition {i}: {m} at position {pos}"),
            None => format!("{m} at position {pos}"),
        };
        match &pd.target {
            ProbeTarget::Symbol {
                module,
                symbol,
                offset,
            } => {
                if let Some(m) = module.as_deref().filter(|m| *m != "vmlinux") {
                    return Err(Status::not_found(at(format!(
                        "BAD_PROBE_ADDR: module '{}' is not loaded (only vmlinux symbols are known)",
                        quote(m)
                    ))));
                }
                let base = self.symbols.lookup(symbol).map_err(|e| match e {
                    guest_symbols::LookupError::NotFound(_) => Status::not_found(at(format!(
                        "BAD_PROBE_ADDR: symbol '{}' not found",
                        quote(symbol)
                    ))),
                    other => Status::invalid_argument(at(format!("BAD_PROBE_ADDR: {other}"))),
                })?;
                let addr = base.checked_add(*offset).ok_or_else(|| {
                    Status::invalid_argument(at("BAD_PROBE_ADDR: offset overflows".into()))
                })?;
                Ok((addr, symbol.clone(), *offset, String::new()))
            }
            ProbeTarget::Address(a) => {
                let (symbol, offset, module) = match self.symbols.sym_off(*a) {
                    Some(s) => (s.name, s.offset, s.module.unwrap_or_default()),
                    None => (String::new(), 0, String::new()),
                };
                Ok((*a, symbol, offset, module))
            }
        }
    }

    pub(crate) fn lock_ops(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a saved probe table back (see `HvProbeService::restore_probes`).
    pub(crate) fn restore(
        &self,
        state: &introspect::EngineState,
        filters: &std::collections::BTreeMap<ProbeId, String>,
    ) -> Result<Vec<v1::ProbeInfo>, Status> {
        let mut prepared = Vec::with_capacity(state.probes.len());
        for (i, p) in state.probes.iter().enumerate() {
            let def = v1::ProbeDefinition {
                definition: Some(v1::probe_definition::Definition::KprobeEvents(
                    p.definition.clone(),
                )),
                filter: filters.get(&p.id).cloned().unwrap_or_default(),
                create_disabled: !p.enabled,
            };
            let mut pr = self
                .prepare(&def, Some(u32::try_from(i).unwrap_or(u32::MAX)))
                .map_err(|s| {
                    Status::new(
                        s.code(),
                        format!("saved probe {} ({}): {}", p.id, p.name, s.message()),
                    )
                })?;
            pr.request.kind = p.kind();
            pr.request.force_single_step = p.force_single_step;
            pr.request.force_out_of_line = p.force_out_of_line;
            prepared.push(pr);
        }
        let _ops = self.lock_ops();
        let (requests, metas): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| (p.request, p.meta)).unzip();
        let ids = self.engine.restore(state, requests).map_err(|e| {
            let p = &state.probes[e.index.min(state.probes.len().saturating_sub(1))];
            engine_error(&e.error, &p.definition, u32::try_from(e.index).ok())
        })?;
        {
            let mut t = self.probes.write().unwrap_or_else(|e| e.into_inner());
            for (id, mut m) in ids.iter().zip(metas) {
                m.id = *id;
                t.insert(m);
            }
        }
        self.infos(Some(&ids))
    }

    /// Creates every definition or none.
    fn create(
        &self,
        defs: Vec<v1::ProbeDefinition>,
        batch: bool,
    ) -> Result<Vec<v1::ProbeInfo>, Status> {
        if defs.is_empty() {
            return Err(Status::invalid_argument("definitions: empty"));
        }
        // More than can ever be defined is refused before any is parsed.
        if defs.len() > self.config.max_probes {
            return Err(Status::invalid_argument(format!(
                "definitions: {} in one call, more than the probe limit of {}",
                defs.len(),
                self.config.max_probes
            )));
        }
        let mut prepared = Vec::with_capacity(defs.len());
        for (i, d) in defs.iter().enumerate() {
            let index = batch.then(|| u32::try_from(i).unwrap_or(u32::MAX));
            prepared.push(self.prepare(d, index)?);
        }
        let _ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.engine.list().len();
        if live + prepared.len() > self.config.max_probes {
            return Err(Status::resource_exhausted(format!(
                "too many probes: {live} defined, {} requested, limit {}",
                prepared.len(),
                self.config.max_probes
            )));
        }
        let (requests, metas): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| (p.request, p.meta)).unzip();
        let lines: Vec<String> = requests.iter().map(|r| r.definition.clone()).collect();
        let ids = self.engine.register_batch(requests).map_err(|e| {
            let i = e.index.min(lines.len().saturating_sub(1));
            engine_error(
                &e.error,
                &lines[i],
                batch.then(|| u32::try_from(e.index).unwrap_or(u32::MAX)),
            )
        })?;
        {
            let mut t = self.probes.write().unwrap_or_else(|e| e.into_inner());
            for (id, mut m) in ids.iter().zip(metas) {
                m.id = *id;
                t.insert(m);
            }
        }
        self.infos(Some(&ids))
    }

    /// ProbeInfo messages for `ids` (all live probes if `None`), by id.
    pub(crate) fn infos(&self, ids: Option<&[ProbeId]>) -> Result<Vec<v1::ProbeInfo>, Status> {
        let rows = self.engine.list();
        let t = self.probes.read().unwrap_or_else(|e| e.into_inner());
        Ok(rows
            .iter()
            .filter(|r| ids.is_none_or(|ids| ids.contains(&r.id)))
            .filter_map(|r| t.live.get(&r.id).map(|m| catalog::probe_info(r, m)))
            .collect())
    }

    fn resolve_ref(&self, r: Option<&v1::ProbeRef>, what: &str) -> Result<ProbeId, Status> {
        let t = self.probes.read().unwrap_or_else(|e| e.into_inner());
        match r.and_then(|r| r.r#ref.as_ref()) {
            Some(v1::probe_ref::Ref::Id(id)) => t
                .live
                .contains_key(id)
                .then_some(*id)
                .ok_or_else(|| Status::not_found(format!("{what}: no probe with id {id}"))),
            Some(v1::probe_ref::Ref::Name(n)) => {
                check_len(&format!("{what}.name"), n, MAX_PROBE_NAME_LEN)?;
                let (group, event) = n
                    .split_once('/')
                    .unwrap_or((probe_spec::DEFAULT_GROUP, n.as_str()));
                t.live
                    .values()
                    .find(|m| m.group == group && m.event == event)
                    .map(|m| m.id)
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "{what}: no probe named {}/{}",
                            quote(group),
                            quote(event)
                        ))
                    })
            }
            None => Err(Status::invalid_argument(format!(
                "{what}: missing (id or name)"
            ))),
        }
    }

    fn delete(&self, ids: Vec<ProbeId>) -> Result<Vec<v1::ProbeInfo>, Status> {
        let _ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.infos(Some(&ids))?;
        self.engine
            .unregister_batch(&ids)
            .map_err(|e| engine_op_error(&e))?;
        // A policy's probe deleted by itself: its hits stay the policy's.
        let hits = before.iter().map(|p| (p.id, p.hits)).collect();
        self.retire_ids(&ids, &hits);
        Ok(before)
    }

    fn set_enabled(&self, r: Option<&v1::ProbeRef>, on: bool) -> Result<v1::ProbeInfo, Status> {
        let id = self.resolve_ref(r, "probe")?;
        self.engine
            .set_enabled(id, on)
            .map_err(|e| engine_op_error(&e))?;
        self.one(id)
    }

    fn one(&self, id: ProbeId) -> Result<v1::ProbeInfo, Status> {
        self.infos(Some(&[id]))?
            .pop()
            .ok_or_else(|| Status::not_found(format!("probe {id} does not exist")))
    }

    fn resolve_symbol(
        &self,
        q: &v1::ResolveSymbolRequest,
    ) -> Result<v1::ResolveSymbolResponse, Status> {
        let address = match &q.query {
            Some(v1::resolve_symbol_request::Query::Address(a)) => *a,
            Some(v1::resolve_symbol_request::Query::Symbol(s)) => {
                check_len("symbol", s, MAX_LOCATION_LEN)?;
                let text = match s.split_once(':') {
                    Some(("vmlinux", rest)) => rest,
                    Some((m, _)) => {
                        return Err(Status::not_found(format!(
                            "symbol: module '{}' is not loaded",
                            quote(m)
                        )))
                    }
                    None => s.as_str(),
                };
                let loc = guest_symbols::parse_location(text)
                    .map_err(|e| Status::invalid_argument(format!("symbol: {e}")))?;
                self.symbols.resolve(&loc).map_err(|e| match e {
                    guest_symbols::LookupError::NotFound(_) => {
                        Status::not_found(format!("symbol: {e}"))
                    }
                    e => Status::invalid_argument(format!("symbol: {e}")),
                })?
            }
            None => {
                return Err(Status::invalid_argument(
                    "query: missing (symbol or address)",
                ))
            }
        };
        let so = self
            .symbols
            .sym_off(address)
            .ok_or_else(|| Status::not_found(format!("no symbol covers {address:#x}")))?;
        let module = so.module.clone().unwrap_or_default();
        let base = if module.is_empty() {
            String::new()
        } else {
            format!("{module}:")
        };
        Ok(v1::ResolveSymbolResponse {
            address,
            kind: self
                .symbols
                .kind_at(&so.name, address)
                .map(String::from)
                .unwrap_or_default(),
            location: format!("{base}{}+{:#x}", so.name, so.offset),
            symbol: so.name,
            offset: so.offset,
            module,
            size: so.size,
        })
    }

    /// The kernel's banner, and whether guest memory holds it at the
    /// link-time address (the test guest and `nokaslr` kernels are not
    /// relocated): equal bytes verify a zero slide.
    /// The image's banner, and whether the guest has the same bytes at the
    /// (slid) `linux_banner`: read through a vCPU's page tables once the
    /// kernel runs, else at the unrelocated physical address.
    pub(crate) fn kernel_banner(&self) -> (String, bool) {
        let Some((addr, want)) = self.symbols.image_banner() else {
            return (String::new(), false);
        };
        let mut got = vec![0u8; want.len()];
        let read = match self.engine.kernel_system_regs() {
            Some(sregs) => {
                use guest_symbols::GuestMemory as _;
                crate::kaslr::KernelVirt {
                    mem: self.guest.vm.memory(),
                    sregs,
                }
                .read_virt(addr, &mut got)
                .is_ok()
            }
            None => {
                addr >= introspect::KERNEL_TEXT_MAP
                    && self
                        .guest
                        .vm
                        .memory()
                        .read_phys(addr - introspect::KERNEL_TEXT_MAP, &mut got)
                        .is_ok()
            }
        };
        (
            String::from_utf8_lossy(&want).trim_end().to_string(),
            read && got == want,
        )
    }

    fn guest_info(&self) -> v1::GetGuestInfoResponse {
        let (source, detail) = self.symbols.source();
        let vm = &self.guest.vm;
        // Best effort: an unknown slide is reported as 0, not verified.
        let slide = self.settle_slide().ok();
        let (banner, verified) = self.kernel_banner();
        v1::GetGuestInfoResponse {
            state: self.guest.state() as i32,
            vcpus: u32::try_from(vm.vcpu_count()).unwrap_or(u32::MAX),
            kernel_banner: banner,
            kaslr_slide: slide.unwrap_or(0),
            kaslr_verified: verified && slide.is_some(),
            symbol_source: source as i32,
            symbol_source_detail: detail.to_string(),
            symbol_count: self.symbols.table().len() as u64,
            memory_bytes: vm.memory().ram_end(),
            armed: self.engine.armed(),
            probe_count: u32::try_from(self.engine.list().len()).unwrap_or(u32::MAX),
            syscall_bridge: self.guest.bridge_info(),
        }
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
        let r = req.into_inner();
        if r.probes.len() > self.inner.config.max_probes {
            return Err(Status::invalid_argument(format!(
                "probes: {} in one call, more than the probe limit of {}",
                r.probes.len(),
                self.inner.config.max_probes
            )));
        }
        let ids = if r.all {
            if !r.probes.is_empty() {
                return Err(Status::invalid_argument(
                    "probes: must be empty when all is set",
                ));
            }
            let t = self.inner.probes.read().unwrap_or_else(|e| e.into_inner());
            t.live.keys().copied().collect()
        } else {
            let mut ids = Vec::new();
            for (i, p) in r.probes.iter().enumerate() {
                ids.push(self.inner.resolve_ref(Some(p), &format!("probes[{i}]"))?);
            }
            ids.sort_unstable();
            ids.dedup();
            ids
        };
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
