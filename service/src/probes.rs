//! The probe table's operations: a definition checked and resolved against
//! the guest's symbols (`prepare`), created or deleted in engine batches
//! (all or nothing, under `Inner::lock_ops`), probe references resolved,
//! and the `ProbeInfo` rows listed.

use introspect::{ProbeId, ProbeRequest, ProbeType};
use probe_spec::{Command, FieldKind, Filter, ProbeDef, ProbeTarget};
use proto::v1;
use tonic::Status;

use crate::catalog::{self, ProbeMeta};
use crate::errors::{check_len, engine_error, engine_op_error, parse_error, quote};
use crate::state::Inner;

/// Longest `GROUP/EVENT` a probe reference may name: both parts are shorter
/// than the kernel's `MAX_EVENT_NAME_LEN`.
pub const MAX_PROBE_NAME_LEN: usize = 2 * probe_spec::limits::MAX_EVENT_NAME_LEN - 1;

/// A definition checked and resolved, ready for the engine.
pub(crate) struct Prepared {
    pub request: ProbeRequest,
    pub meta: ProbeMeta,
}

impl Inner {
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
        let fields = catalog::fields_of(&pd);
        let checked = self.check_action(
            def.action.as_ref(),
            &crate::actions::Target {
                symbol: &symbol,
                offset,
                address,
                is_return: pd.kind.is_return(),
            },
            filter.as_ref(),
            &fields,
            &prefix,
        )?;
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
        // kprobe_events spells a module's point MOD:SYM[+offs].
        let location = if module.is_empty() || address != 0 {
            location
        } else {
            format!("{module}:{location}")
        };
        let ip_text = if module.is_empty() {
            self.symbols
                .sym_off(address)
                .map_or_else(|| format!("0x{address:x}"), |s| s.to_string())
        } else {
            location.clone()
        };
        let module_target = (!module.is_empty()).then(|| introspect::ModuleTarget {
            module: module.clone(),
            symbol: symbol.clone(),
            offset,
        });
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
            fields,
            _exe: names_exe.get().then(|| self.engine.want_exe()),
            policy: None,
            action: checked.as_ref().map(|c| c.message.clone()),
        };
        let hardware = pd.hardware;
        let request = ProbeRequest {
            name: pd.full_name(),
            address,
            kind,
            fetch: Some(pd),
            enabled: !def.create_disabled,
            force_single_step: false,
            force_out_of_line: false,
            hardware,
            definition: line,
            module: module_target,
            action: checked.as_ref().map(|c| c.action.clone()),
            action_gate: checked.and_then(|c| c.gate),
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
                    // Resolved by the engine from the guest's module list
                    // (pending until the module loads).
                    self.watch_modules().map_err(|why| {
                        Status::failed_precondition(at(format!(
                            "NO_MODULES: module probes ('{}:{}') are not available: {why}",
                            quote(m),
                            quote(symbol)
                        )))
                    })?;
                    return Ok((0, symbol.clone(), *offset, m.to_string()));
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

    /// Starts watching the guest's module loads and unloads (once).
    fn watch_modules(&self) -> Result<(), String> {
        let layout = self.symbols.module_layout()?;
        self.engine.watch_modules(layout).map_err(|e| e.to_string())
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
                // Actions are not saved: a restored guest never starts
                // overriding, freezing or snapshotting by itself.
                action: None,
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
        self.name_registered(&ids, metas)
    }

    /// Creates every definition or none.
    pub(crate) fn create(
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
        let _ops = self.lock_ops();
        let live = self.engine.list().len();
        if live + prepared.len() > self.config.max_probes {
            return Err(Status::resource_exhausted(format!(
                "too many probes: {live} defined, {} requested, limit {}",
                prepared.len(),
                self.config.max_probes
            )));
        }
        let (mut requests, metas): (Vec<_>, Vec<_>) =
            prepared.into_iter().map(|p| (p.request, p.meta)).unzip();
        // A probe with an action is enabled only once its metadata names its
        // events: a hit before that would act, and its event would reach no
        // stream (streams never guess a probe's fields).
        let enable_after: Vec<usize> = requests
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.action.is_some() && r.enabled)
            .map(|(i, r)| {
                r.enabled = false;
                i
            })
            .collect();
        let lines: Vec<String> = requests.iter().map(|r| r.definition.clone()).collect();
        let ids = self.engine.register_batch(requests).map_err(|e| {
            let i = e.index.min(lines.len().saturating_sub(1));
            engine_error(
                &e.error,
                &lines[i],
                batch.then(|| u32::try_from(e.index).unwrap_or(u32::MAX)),
            )
        })?;
        let infos = self.name_registered(&ids, metas)?;
        if enable_after.is_empty() {
            return Ok(infos);
        }
        for i in enable_after {
            self.engine
                .set_enabled(ids[i], true)
                .map_err(|e| engine_op_error(&e))?;
        }
        self.infos(Some(&ids))
    }

    /// Puts the metadata of probes the engine just registered (as `ids`, in
    /// request order) in the table, which names their events from now on;
    /// their ProbeInfo messages.
    fn name_registered(
        &self,
        ids: &[ProbeId],
        metas: Vec<ProbeMeta>,
    ) -> Result<Vec<v1::ProbeInfo>, Status> {
        {
            let mut t = self.probes.write().unwrap_or_else(|e| e.into_inner());
            for (id, mut m) in ids.iter().zip(metas) {
                m.id = *id;
                t.insert(m);
            }
        }
        self.infos(Some(ids))
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

    pub(crate) fn resolve_ref(
        &self,
        r: Option<&v1::ProbeRef>,
        what: &str,
    ) -> Result<ProbeId, Status> {
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

    pub(crate) fn delete(&self, ids: Vec<ProbeId>) -> Result<Vec<v1::ProbeInfo>, Status> {
        let _ops = self.lock_ops();
        let before = self.infos(Some(&ids))?;
        self.engine
            .unregister_batch(&ids)
            .map_err(|e| engine_op_error(&e))?;
        // A policy's probe deleted by itself: its hits stay the policy's.
        let hits = before.iter().map(|p| (p.id, p.hits)).collect();
        self.retire_ids(&ids, &hits);
        Ok(before)
    }

    pub(crate) fn set_enabled(
        &self,
        r: Option<&v1::ProbeRef>,
        on: bool,
    ) -> Result<v1::ProbeInfo, Status> {
        let id = self.resolve_ref(r, "probe")?;
        self.engine
            .set_enabled(id, on)
            .map_err(|e| engine_op_error(&e))?;
        self.one(id)
    }

    pub(crate) fn one(&self, id: ProbeId) -> Result<v1::ProbeInfo, Status> {
        self.infos(Some(&[id]))?
            .pop()
            .ok_or_else(|| Status::not_found(format!("probe {id} does not exist")))
    }

    /// The probes a DeleteProbes request names (all live ones with `all`),
    /// sorted and without repeats.
    pub(crate) fn delete_targets(
        &self,
        r: &v1::DeleteProbesRequest,
    ) -> Result<Vec<ProbeId>, Status> {
        if r.probes.len() > self.config.max_probes {
            return Err(Status::invalid_argument(format!(
                "probes: {} in one call, more than the probe limit of {}",
                r.probes.len(),
                self.config.max_probes
            )));
        }
        if r.all {
            if !r.probes.is_empty() {
                return Err(Status::invalid_argument(
                    "probes: must be empty when all is set",
                ));
            }
            let t = self.probes.read().unwrap_or_else(|e| e.into_inner());
            Ok(t.live.keys().copied().collect())
        } else {
            let mut ids = Vec::new();
            for (i, p) in r.probes.iter().enumerate() {
                ids.push(self.resolve_ref(Some(p), &format!("probes[{i}]"))?);
            }
            ids.sort_unstable();
            ids.dedup();
            Ok(ids)
        }
    }
}
