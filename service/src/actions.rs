//! Probe actions through the API: a definition's `action` checked (the
//! server allows actions, `override` at a non-void function's entry, a
//! snapshot directory that exists) and turned into the engine's
//! [`introspect::Action`] with its gate (the probe's filter); the actions
//! taken as event fields; `Resume`; and the sink that writes the snapshots
//! of `snapshot` actions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use introspect::{Action, ActionSink, ActionTaken, FreezeInfo, Gate, ProbeId};
use probe_spec::Filter;
use proto::v1;
use tonic::Status;

use crate::catalog::EventFieldsView;
use crate::errors::quote;
use crate::state::Inner;

/// A checked action: the engine's, its gate, and the definition's message
/// (listed back in ProbeInfo).
pub(crate) struct Checked {
    pub action: Action,
    pub gate: Option<Gate>,
    pub message: v1::ProbeAction,
}

/// Where a probe's action is, for error messages.
pub(crate) struct Target<'a> {
    pub symbol: &'a str,
    pub offset: u64,
    pub address: u64,
    pub is_return: bool,
}

impl Inner {
    /// Checks `def.action`; None when the definition has none.
    pub(crate) fn check_action(
        &self,
        msg: Option<&v1::ProbeAction>,
        target: &Target<'_>,
        filter: Option<&Filter>,
        fields: &[v1::FieldSchema],
        prefix: &dyn Fn(String) -> String,
    ) -> Result<Option<Checked>, Status> {
        let Some(msg) = msg else {
            return Ok(None);
        };
        let Some(which) = &msg.action else {
            return Err(Status::invalid_argument(prefix(
                "action: empty (override_return, freeze or snapshot)".into(),
            )));
        };
        if !self.config.allow_actions {
            return Err(Status::failed_precondition(prefix(
                "action: probe actions (override, freeze, snapshot) change what the guest does; \
                 start the server with --allow-actions to allow them"
                    .into(),
            )));
        }
        if target.is_return {
            return Err(Status::invalid_argument(prefix(
                "action: actions belong on kprobes ('p:'); a return probe fires after the function ran"
                    .into(),
            )));
        }
        let action = match which {
            v1::probe_action::Action::OverrideReturn(v) => {
                self.check_override(target, prefix)?;
                Action::Override { value: *v as u64 }
            }
            v1::probe_action::Action::Freeze(_) => Action::Freeze,
            v1::probe_action::Action::Snapshot(s) => {
                check_snapshot_dir(&s.dir).map_err(|m| {
                    Status::invalid_argument(prefix(format!("action.snapshot.dir: {m}")))
                })?;
                Action::Snapshot
            }
        };
        let gate = filter.map(|f| {
            let (f, fields) = (f.clone(), fields.to_vec());
            Gate(Arc::new(move |ev: &introspect::Event| {
                f.matches(&EventFieldsView {
                    ev,
                    fields: &fields,
                })
            }))
        });
        Ok(Some(Checked {
            action,
            gate,
            message: msg.clone(),
        }))
    }

    /// `override` only at a function's entry, and only for a function that
    /// returns something (DWARF says so).
    fn check_override(
        &self,
        t: &Target<'_>,
        prefix: &dyn Fn(String) -> String,
    ) -> Result<(), Status> {
        if t.symbol.is_empty() || t.offset != 0 {
            let at = if t.symbol.is_empty() {
                format!("0x{:x}", t.address)
            } else {
                format!("{}+{:#x}", quote(t.symbol), t.offset)
            };
            return Err(Status::invalid_argument(prefix(format!(
                "action: override only at a function's entry (SYMBOL or SYMBOL+0), not at {at}"
            ))));
        }
        match self.symbols.return_type(t.symbol) {
            None => Err(Status::failed_precondition(prefix(format!(
                "action: override needs the kernel's DWARF to check that '{}' returns a value \
                 (load a vmlinux with debug info)",
                quote(t.symbol)
            )))),
            Some(Err(e)) => Err(Status::failed_precondition(prefix(format!(
                "action: cannot read the return type of '{}' from DWARF: {e}",
                quote(t.symbol)
            )))),
            Some(Ok(None)) => Err(Status::invalid_argument(prefix(format!(
                "action: '{}' returns void: there is no value to override",
                quote(t.symbol)
            )))),
            Some(Ok(Some(_))) => Ok(()),
        }
    }

    /// Lets a frozen guest run again.
    pub(crate) fn resume(&self) -> Result<v1::ResumeResponse, Status> {
        match self.engine.thaw() {
            Some(was) => Ok(v1::ResumeResponse {
                was: Some(freeze_info(&was)),
            }),
            None => Err(Status::failed_precondition(
                "the guest is not frozen (no probe's freeze action holds it)",
            )),
        }
    }
}

/// A snapshot action's directory: absolute or relative, it must exist.
fn check_snapshot_dir(dir: &str) -> Result<(), String> {
    if dir.trim().is_empty() {
        return Err("empty".into());
    }
    if dir.len() > 4096 {
        return Err(format!("{} bytes, longer than PATH_MAX (4096)", dir.len()));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("'{}' is not a directory", quote(dir))),
        Err(e) => Err(format!("'{}': {e}", quote(dir))),
    }
}

pub(crate) fn freeze_info(f: &FreezeInfo) -> v1::FreezeInfo {
    v1::FreezeInfo {
        probe_id: f.probe,
        vcpu: f.vcpu,
        since_ns: f.since_ns,
    }
}

/// The event field for what a hit's action did.
pub(crate) fn taken(t: &ActionTaken) -> v1::ActionTaken {
    use v1::action_taken::Taken;
    let taken = match t {
        ActionTaken::Override { value } => Taken::OverrideReturn(*value as i64),
        ActionTaken::Freeze => Taken::Freeze(true),
        ActionTaken::AlreadyFrozen => Taken::AlreadyFrozen(true),
        ActionTaken::Snapshot { path } => Taken::Snapshot(path.clone()),
        ActionTaken::Skipped { why } => Taken::Skipped(why.clone()),
    };
    v1::ActionTaken { taken: Some(taken) }
}

/// Writes the snapshots of `snapshot` actions, each on a thread of its own
/// (the hitting vCPU only starts it; the engine holds the guest meanwhile).
pub(crate) struct SnapshotSink(pub Weak<Inner>);

impl SnapshotSink {
    fn dir_of(inner: &Inner, probe: ProbeId) -> Option<PathBuf> {
        let t = inner.probes.read().unwrap_or_else(|e| e.into_inner());
        match t.get(probe)?.action.as_ref()?.action.as_ref()? {
            v1::probe_action::Action::Snapshot(s) => Some(PathBuf::from(&s.dir)),
            _ => None,
        }
    }
}

impl ActionSink for SnapshotSink {
    fn begin_snapshot(&self, probe: ProbeId, seq: u64) -> Result<String, String> {
        let inner = self.0.upgrade().ok_or("the server is gone")?;
        let dir = Self::dir_of(&inner, probe)
            .ok_or_else(|| format!("probe {probe} has no snapshot directory"))?
            .join(format!("hit-{seq}"));
        let path = dir.display().to_string();
        std::thread::Builder::new()
            .name("hvprobe-snapshot-action".into())
            .spawn(move || write_snapshot(&inner, &dir))
            .map_err(|e| format!("cannot start the snapshot thread: {e}"))?;
        Ok(path)
    }
}

fn write_snapshot(inner: &Inner, dir: &Path) {
    let result = std::fs::create_dir(dir)
        .map_err(|e| Status::failed_precondition(format!("{}: {e}", dir.display())))
        .and_then(|()| inner.create_snapshot(dir, false));
    inner.engine.release_snapshot_hold();
    match result {
        Ok(r) => tracing::info!(
            "snapshot action: {} written ({} bytes)",
            r.directory,
            r.written_bytes
        ),
        Err(e) => eprintln!(
            "hvprobe: snapshot action: {}: {}",
            dir.display(),
            e.message()
        ),
    }
}
