//! Policy loads as one transaction over the probe table (see the module
//! above): parse and resolve every probe, register the new ones in one
//! engine batch, then retire what left; and the policies' infos and
//! counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use introspect::ProbeId;
use proto::v1;
use tonic::Status;

use super::{
    doc, Limiter, LoadReport, PolicyConf, PolicyCounters, PolicyDef, PolicyRun, ProbeKey,
    RateLimitDef,
};
use crate::state::Inner;

/// The key a definition is compared by: the line the engine would store.
fn key_of(d: &v1::ProbeDefinition) -> Result<ProbeKey, String> {
    let line = match &d.definition {
        Some(v1::probe_definition::Definition::KprobeEvents(l)) => {
            probe_spec::trim_line(l).to_string()
        }
        Some(v1::probe_definition::Definition::Spec(s)) => {
            proto::spec_to_line(s).map_err(|m| format!("spec.{m}"))?
        }
        None => return Err("missing (spec or kprobe_events)".into()),
    };
    Ok(ProbeKey {
        line,
        filter: probe_spec::trim_line(&d.filter).to_string(),
        action: d.action.as_ref().map(proto::format_action),
    })
}

fn new_limiter(r: Option<RateLimitDef>) -> Option<Arc<Limiter>> {
    r.map(|r| Arc::new(Limiter::new(r.events, r.window_ns, r.scope)))
}

/// A status whose message starts with `ctx`, keeping code and details.
fn with_context(ctx: &str, s: &Status) -> Status {
    Status::with_details(
        s.code(),
        format!("{ctx}: {}", s.message()),
        s.details().to_vec().into(),
    )
}

/// One probe to create, and for whom.
struct Add {
    policy: usize,
    index: usize,
    key: ProbeKey,
    name: String,
    /// A probe of the same definition whose filter changed: the engine's
    /// probe stays (id, counters), only the service's view is replaced.
    refilters: Option<ProbeId>,
}

impl Inner {
    /// Loads `defs` (creating or replacing policies by name) and deletes the
    /// policies named in `delete`, all or nothing.
    pub(crate) fn apply_policies(
        &self,
        defs: &[PolicyDef],
        delete: &[String],
    ) -> Result<LoadReport, Status> {
        let _p = self.policy_ops.lock().unwrap_or_else(|e| e.into_inner());
        let current: BTreeMap<String, Arc<PolicyRun>> = self
            .policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut seen = std::collections::HashSet::new();
        for d in defs {
            if !seen.insert(d.name.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "{}: policy '{}' is defined twice in this load",
                    d.pos.map_or_else(
                        || d.source.clone(),
                        |p| format!("{}:{}:{}", d.source, p.line, p.column)
                    ),
                    d.name
                )));
            }
        }
        for n in delete {
            if !current.contains_key(n) {
                return Err(Status::not_found(format!("no policy named '{n}'")));
            }
            if defs.iter().any(|d| &d.name == n) {
                return Err(Status::invalid_argument(format!(
                    "policy '{n}' is both loaded and deleted"
                )));
            }
        }
        let after = current
            .keys()
            .filter(|n| !delete.contains(n))
            .chain(defs.iter().map(|d| &d.name))
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if after > doc::MAX_POLICIES {
            return Err(Status::resource_exhausted(format!(
                "too many policies: {after}, limit {}",
                doc::MAX_POLICIES
            )));
        }
        let live: HashMap<ProbeId, (String, bool)> = self
            .engine
            .list()
            .into_iter()
            .map(|r| (r.id, (r.name, r.enabled)))
            .collect();
        // The plan: which probes stay, which come, which go.
        let mut keeps: Vec<Vec<(usize, ProbeId)>> = vec![Vec::new(); defs.len()];
        let mut adds: Vec<Add> = Vec::new();
        let mut removes: Vec<(ProbeId, Arc<PolicyRun>)> = Vec::new();
        let mut enable: Vec<(ProbeId, bool)> = Vec::new();
        let mut keys: Vec<Vec<ProbeKey>> = Vec::with_capacity(defs.len());
        for (pi, d) in defs.iter().enumerate() {
            let mut old: HashMap<ProbeKey, Vec<ProbeId>> = HashMap::new();
            if let Some(run) = current.get(&d.name) {
                for (k, id) in run.conf().probes.iter().rev() {
                    if live.contains_key(id) {
                        old.entry(k.clone()).or_default().push(*id);
                    }
                }
            }
            let mut pkeys = Vec::with_capacity(d.probes.len());
            for (i, p) in d.probes.iter().enumerate() {
                let key = key_of(&p.definition).map_err(|m| {
                    Status::invalid_argument(format!("{}: {m}", d.probe_context(i)))
                })?;
                match old.get_mut(&key).and_then(Vec::pop) {
                    Some(id) => {
                        if live.get(&id).is_some_and(|(_, on)| *on != d.enabled) {
                            enable.push((id, d.enabled));
                        }
                        keeps[pi].push((i, id));
                    }
                    None => adds.push(Add {
                        policy: pi,
                        index: i,
                        key: key.clone(),
                        name: String::new(),
                        refilters: None,
                    }),
                }
                pkeys.push(key);
            }
            // A probe whose filter alone changed keeps its engine probe;
            // not one with an action, whose gate (the filter) the engine holds.
            for a in adds
                .iter_mut()
                .filter(|a| a.policy == pi && a.key.action.is_none())
            {
                let same_line = old
                    .iter_mut()
                    .find(|(k, ids)| k.line == a.key.line && k.action.is_none() && !ids.is_empty())
                    .and_then(|(_, ids)| ids.pop());
                if let Some(id) = same_line {
                    if live.get(&id).is_some_and(|(_, on)| *on != d.enabled) {
                        enable.push((id, d.enabled));
                    }
                    a.refilters = Some(id);
                }
            }
            if let Some(run) = current.get(&d.name) {
                for id in old.into_values().flatten() {
                    removes.push((id, run.clone()));
                }
            }
            keys.push(pkeys);
        }
        for n in delete {
            let run = &current[n];
            for (_, id) in &run.conf().probes {
                if live.contains_key(id) {
                    removes.push((*id, run.clone()));
                }
            }
        }
        // Every new probe parses and resolves before anything changes.
        let mut prepared = Vec::with_capacity(adds.len());
        for a in &mut adds {
            let d = &defs[a.policy];
            let pr = self
                .prepare(&d.probes[a.index].definition, None)
                .map_err(|s| with_context(&d.probe_context(a.index), &s))?;
            a.name = pr.request.name.clone();
            prepared.push(pr);
        }
        // The runs the new probes will belong to; a new one has its rate
        // limit from the start (its probes may fire before the commit).
        let runs: Vec<Arc<PolicyRun>> = defs
            .iter()
            .map(|d| match current.get(&d.name) {
                Some(r) => r.clone(),
                None => PolicyRun::new(
                    d.name.clone(),
                    PolicyConf {
                        enabled: d.enabled,
                        source: d.source.clone(),
                        filter: d.filter.clone(),
                        tags: d.tags.clone(),
                        rate_limit: d.rate_limit,
                        limiter: new_limiter(d.rate_limit),
                        probes: Vec::new(),
                        generation: 0,
                    },
                ),
            })
            .collect();
        let _ops = self.lock_ops();
        let n_live = self.engine.list().len();
        let n_new = adds.iter().filter(|a| a.refilters.is_none()).count();
        if n_live.saturating_sub(removes.len()) + n_new > self.config.max_probes {
            return Err(Status::resource_exhausted(format!(
                "too many probes: {n_live} defined, this load removes {} and adds {n_new}, limit {}",
                removes.len(),
                self.config.max_probes
            )));
        }
        // Probes that are replaced by one of the same name must go first;
        // all others are added before anything is removed.
        let removed_names: HashMap<&str, ProbeId> = removes
            .iter()
            .filter_map(|(id, _)| live.get(id).map(|(n, _)| (n.as_str(), *id)))
            .collect();
        let (late, early): (Vec<usize>, Vec<usize>) = (0..adds.len())
            .filter(|&i| adds[i].refilters.is_none())
            .partition(|&i| removed_names.contains_key(adds[i].name.as_str()));
        let mut prepared: Vec<Option<crate::probes::Prepared>> =
            prepared.into_iter().map(Some).collect();
        let mut ids: Vec<Option<ProbeId>> = vec![None; adds.len()];
        let mut metas: Vec<Option<crate::catalog::ProbeMeta>> =
            (0..adds.len()).map(|_| None).collect();
        let register = |which: &[usize],
                        prepared: &mut Vec<Option<crate::probes::Prepared>>,
                        ids: &mut Vec<Option<ProbeId>>,
                        metas: &mut Vec<Option<crate::catalog::ProbeMeta>>|
         -> Result<(), Status> {
            if which.is_empty() {
                return Ok(());
            }
            let mut reqs = Vec::with_capacity(which.len());
            for &i in which {
                let p = prepared[i].take().expect("prepared once");
                reqs.push(p.request);
                metas[i] = Some(p.meta);
            }
            let lines: Vec<String> = reqs.iter().map(|r| r.definition.clone()).collect();
            let got = self.engine.register_batch(reqs).map_err(|e| {
                let k = e.index.min(which.len() - 1);
                let a = &adds[which[k]];
                with_context(
                    &defs[a.policy].probe_context(a.index),
                    &crate::errors::engine_error(&e.error, &lines[k], None),
                )
            })?;
            for (&i, id) in which.iter().zip(got) {
                ids[i] = Some(id);
            }
            Ok(())
        };
        register(&early, &mut prepared, &mut ids, &mut metas)?;
        let late_removed: Vec<ProbeId> = late
            .iter()
            .map(|&i| removed_names[adds[i].name.as_str()])
            .collect();
        // Final hits of the probes that go, for their policies' totals.
        let mut hits: HashMap<ProbeId, u64> = HashMap::new();
        if !late.is_empty() {
            hits.extend(self.quiesce(&late_removed));
            let early_ids: Vec<ProbeId> = early.iter().filter_map(|&i| ids[i]).collect();
            let undo_early = |why: Status| {
                if let Err(e) = self.engine.unregister_batch(&early_ids) {
                    tracing::error!("policy load: undoing its new probes failed: {e}");
                }
                why
            };
            self.engine
                .unregister_batch(&late_removed)
                .map_err(|e| undo_early(crate::errors::engine_op_error(&e)))?;
            if let Err(st) = register(&late, &mut prepared, &mut ids, &mut metas) {
                let st = undo_early(st);
                self.restore_replaced(&late_removed, &hits);
                return Err(st);
            }
        }
        let other_removed: Vec<ProbeId> = removes
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !late_removed.contains(id))
            .collect();
        if !other_removed.is_empty() {
            hits.extend(self.quiesce(&other_removed));
            if let Err(e) = self.engine.unregister_batch(&other_removed) {
                // Only a probe that vanished meanwhile: report, keep going.
                tracing::warn!("policy load: removing probes {other_removed:?}: {e}");
            }
        }
        // Commit: names, policies, counters.
        {
            let mut t = self.probes.write().unwrap_or_else(|e| e.into_inner());
            for (i, a) in adds.iter().enumerate() {
                if let Some(old) = a.refilters {
                    if let Some(p) = prepared[i].take() {
                        let mut m = p.meta;
                        m.id = old;
                        m.policy = Some(runs[a.policy].clone());
                        t.replace(m);
                    }
                    ids[i] = Some(old);
                } else if let (Some(id), Some(mut m)) = (ids[i], metas[i].take()) {
                    m.id = id;
                    m.policy = Some(runs[a.policy].clone());
                    t.insert(m);
                }
            }
        }
        let all_removed: Vec<ProbeId> = removes.iter().map(|(id, _)| *id).collect();
        self.retire_ids(&all_removed, &hits);
        for (id, on) in &enable {
            if let Err(e) = self.engine.set_enabled(*id, *on) {
                tracing::warn!("policy load: enabling probe {id}: {e}");
            }
        }
        let refiltered = adds.len() - n_new;
        let mut report = LoadReport {
            added: n_new,
            removed: removes.len(),
            kept: keeps.iter().map(Vec::len).sum::<usize>() + refiltered,
            refiltered,
            ..Default::default()
        };
        let mut reg = self.policies.write().unwrap_or_else(|e| e.into_inner());
        for (pi, d) in defs.iter().enumerate() {
            let run = &runs[pi];
            let mut probes: Vec<(usize, ProbeKey, ProbeId)> = keeps[pi]
                .iter()
                .map(|&(i, id)| (i, keys[pi][i].clone(), id))
                .collect();
            for (ai, a) in adds.iter().enumerate() {
                if a.policy == pi {
                    if let Some(id) = ids[ai] {
                        probes.push((a.index, a.key.clone(), id));
                    }
                }
            }
            probes.sort_by_key(|(i, _, _)| *i);
            let old = run.conf();
            let same_limit = old.rate_limit == d.rate_limit;
            let probes: Vec<(ProbeKey, ProbeId)> =
                probes.into_iter().map(|(_, k, id)| (k, id)).collect();
            let changed = old.generation == 0
                || old.enabled != d.enabled
                || old.filter != d.filter
                || old.tags != d.tags
                || old.rate_limit != d.rate_limit
                || old.source != d.source
                || old.probes != probes;
            run.set_conf(PolicyConf {
                enabled: d.enabled,
                source: d.source.clone(),
                filter: d.filter.clone(),
                tags: d.tags.clone(),
                rate_limit: d.rate_limit,
                limiter: if same_limit {
                    old.limiter.clone()
                } else {
                    new_limiter(d.rate_limit)
                },
                probes,
                generation: old.generation + u64::from(changed),
            });
            reg.insert(d.name.clone(), run.clone());
            report.policies.push(d.name.clone());
        }
        for n in delete {
            reg.remove(n);
            report.deleted_policies.push(n.clone());
        }
        Ok(report)
    }

    /// Disables the probes of `ids` that are enabled (no hit counts after)
    /// and returns their final hits, for probes about to be unregistered.
    fn quiesce(&self, ids: &[ProbeId]) -> HashMap<ProbeId, u64> {
        for r in self.engine.list() {
            if r.enabled && ids.contains(&r.id) {
                if let Err(e) = self.engine.set_enabled(r.id, false) {
                    tracing::warn!("policy load: disabling probe {} before removal: {e}", r.id);
                }
            }
        }
        self.engine
            .list()
            .into_iter()
            .filter(|r| ids.contains(&r.id))
            .map(|r| (r.id, r.hits))
            .collect()
    }

    /// Registers again the probes of `old` (unregistered to make room for
    /// same-named replacements that the engine then refused), from their
    /// definitions, filters and enabled state: they come back with new ids
    /// and fresh counters (their hits so far go to their policies), and
    /// their policies point at the new ids.
    fn restore_replaced(&self, old: &[ProbeId], hits: &HashMap<ProbeId, u64>) {
        let metas: Vec<Arc<crate::catalog::ProbeMeta>> = {
            let t = self.probes.read().unwrap_or_else(|e| e.into_inner());
            old.iter()
                .filter_map(|id| t.live.get(id).cloned())
                .collect()
        };
        let mut reqs = Vec::new();
        let mut new_metas = Vec::new();
        for m in &metas {
            let def = v1::ProbeDefinition {
                definition: Some(v1::probe_definition::Definition::KprobeEvents(
                    m.definition.clone(),
                )),
                filter: m.filter_text.clone(),
                create_disabled: !m.policy.as_ref().is_none_or(|p| p.conf().enabled),
                action: m.action.clone(),
            };
            match self.prepare(&def, None) {
                Ok(p) => {
                    reqs.push(p.request);
                    new_metas.push((m.id, p.meta, m.policy.clone()));
                }
                Err(s) => tracing::error!(
                    "policy load: probe {} ({}) cannot be put back: {}",
                    m.id,
                    m.definition,
                    s.message()
                ),
            }
        }
        let new_ids = match self.engine.register_batch(reqs) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(
                    "policy load: putting back probes {old:?} failed: {}",
                    e.error
                );
                Vec::new()
            }
        };
        self.retire_ids(old, hits);
        let mut moved: HashMap<ProbeId, ProbeId> = HashMap::new();
        {
            let mut t = self.probes.write().unwrap_or_else(|e| e.into_inner());
            for ((old_id, mut m, policy), id) in new_metas.into_iter().zip(new_ids) {
                m.id = id;
                m.policy = policy;
                t.insert(m);
                moved.insert(old_id, id);
            }
        }
        let reg = self.policies.read().unwrap_or_else(|e| e.into_inner());
        for run in reg.values() {
            let c = run.conf();
            if c.probes.iter().any(|(_, id)| moved.contains_key(id)) {
                run.set_conf(PolicyConf {
                    enabled: c.enabled,
                    source: c.source.clone(),
                    filter: c.filter.clone(),
                    tags: c.tags.clone(),
                    rate_limit: c.rate_limit,
                    limiter: c.limiter.clone(),
                    probes: c
                        .probes
                        .iter()
                        .map(|(k, id)| (k.clone(), moved.get(id).copied().unwrap_or(*id)))
                        .collect(),
                    generation: c.generation,
                });
            }
        }
        tracing::warn!(
            "policy load failed after replacing probes {old:?}; they were put back as {:?}",
            moved.values().collect::<Vec<_>>()
        );
    }

    /// Moves probes that are gone from the table's live set, adding their
    /// hits to their policies.
    pub(crate) fn retire_ids(&self, ids: &[ProbeId], hits: &HashMap<ProbeId, u64>) {
        let mut t = self.probes.write().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(p) = t.live.get(id).and_then(|m| m.policy.clone()) {
                p.retired_hits
                    .fetch_add(hits.get(id).copied().unwrap_or(0), Ordering::Relaxed);
            }
            t.retire(*id);
        }
    }

    /// The loaded policies (those named, all if `names` is empty).
    pub(crate) fn policy_infos(&self, names: &[String]) -> Result<Vec<v1::PolicyInfo>, Status> {
        let reg = self
            .policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for n in names {
            if !reg.contains_key(n) {
                return Err(Status::not_found(format!("no policy named '{n}'")));
            }
        }
        let all = self.infos(None)?;
        let by_id: HashMap<ProbeId, &v1::ProbeInfo> = all.iter().map(|p| (p.id, p)).collect();
        Ok(reg
            .values()
            .filter(|r| names.is_empty() || names.contains(&r.name))
            .map(|r| policy_info(r, &by_id))
            .collect())
    }
}

fn policy_info(r: &PolicyRun, by_id: &HashMap<ProbeId, &v1::ProbeInfo>) -> v1::PolicyInfo {
    let c = r.conf();
    let probes: Vec<v1::ProbeInfo> = c
        .probes
        .iter()
        .filter_map(|(_, id)| by_id.get(id).map(|p| (*p).clone()))
        .collect();
    v1::PolicyInfo {
        name: r.name.clone(),
        enabled: c.enabled,
        source: c.source.clone(),
        filter: c.filter.clone(),
        tags: c.tags.clone(),
        rate_limit: c.rate_limit.map(|l| v1::RateLimit {
            events: l.events,
            window_ms: l.window_ns / 1_000_000,
            scope: l.scope.to_proto() as i32,
        }),
        hits: r.retired_hits.load(Ordering::Relaxed) + probes.iter().map(|p| p.hits).sum::<u64>(),
        probes,
        events: r.events.load(Ordering::Relaxed),
        rate_limited: r.rate_limited.load(Ordering::Relaxed),
        generation: c.generation,
    }
}

impl Inner {
    pub(crate) fn policy_counters(&self) -> Vec<PolicyCounters> {
        self.policy_infos(&[])
            .unwrap_or_default()
            .into_iter()
            .map(|p| PolicyCounters {
                name: p.name,
                enabled: p.enabled,
                probes: p.probes.len(),
                hits: p.hits,
                events: p.events,
                rate_limited: p.rate_limited,
            })
            .collect()
    }
}
