//! The probe catalog: what the service knows about each probe beyond the
//! engine's table ([`ProbeMeta`], kept in a [`ProbeTable`]), and the fields
//! of its events: their types for checking filters ([`common_field_kind`],
//! [`arg_field_kind`]), their schemas for encoders ([`fields_of`],
//! [`guess_fields`]) and their values for matching filters
//! ([`EventFieldsView`]).
//!
//! A leaf of the service: it imports no other module of it but the
//! policy's run-time object a probe may belong to.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use introspect::{Event, EventKind, Handling, ProbeId, ProbeType};
use probe_spec::{BaseType, FetchType, FieldKind, FieldValue, Fields, Filter, ProbeDef, Value};
use proto::v1::{self, PackedKind};

use crate::policy::PolicyRun;

/// What the service knows about a probe beyond the engine's table.
pub(crate) struct ProbeMeta {
    pub id: ProbeId,
    pub group: String,
    pub event: String,
    pub kind: v1::ProbeKind,
    pub symbol: String,
    pub offset: u64,
    pub module: String,
    pub location: String,
    pub definition: String,
    pub filter: Option<Filter>,
    /// The filter as written (empty: none), saved with snapshots.
    pub filter_text: String,
    /// Argument names in definition order, with their filter field types
    /// (`None`: not filterable, e.g. arrays), resolved once at creation.
    pub args: Vec<(String, Option<FieldKind>)>,
    /// `sym+0x0/0x40` of the probed address, for trace lines.
    pub ip_text: String,
    /// The fields of its events as packed streams send them.
    pub fields: Vec<v1::FieldSchema>,
    /// Held while its filter names `exe`: hits then read executable paths.
    pub _exe: Option<introspect::ExeInterest>,
    /// The policy it belongs to (its rate limit, tags and counters).
    pub policy: Option<Arc<PolicyRun>>,
    /// Its action as the definition gave it (checked), if any.
    pub action: Option<v1::ProbeAction>,
}

impl ProbeMeta {
    /// Whether its events need a look of their own on the event path (a
    /// filter or a policy).
    fn per_event(&self) -> bool {
        self.filter.is_some() || self.policy.is_some()
    }
}

/// Live probes plus recently deleted ones (their queued events still need
/// names after the probe is gone).
#[derive(Default)]
pub(crate) struct ProbeTable {
    pub live: BTreeMap<ProbeId, Arc<ProbeMeta>>,
    pub retired: HashMap<ProbeId, Arc<ProbeMeta>>,
    /// Live probes with a filter of their own or a policy; read without the
    /// table's lock by subscriptions, which skip per-event lookups while it
    /// is 0.
    pub filtered: Arc<AtomicUsize>,
    /// Highest probe id whose metadata is in the table (engine ids only
    /// grow). A probe hit between its registration and this mark reaches
    /// no stream: a stream must never name its fields by guesswork.
    pub named_upto: Arc<AtomicU64>,
}

impl ProbeTable {
    pub fn get(&self, id: ProbeId) -> Option<&Arc<ProbeMeta>> {
        self.live.get(&id).or_else(|| self.retired.get(&id))
    }

    pub(crate) fn insert(&mut self, m: ProbeMeta) {
        if m.per_event() {
            self.filtered.fetch_add(1, Ordering::SeqCst);
        }
        let id = m.id;
        self.live.insert(id, Arc::new(m));
        self.named_upto.fetch_max(id, Ordering::Release);
    }

    /// Puts `m` in place of the live probe of its id (a new filter).
    pub(crate) fn replace(&mut self, m: ProbeMeta) {
        if let Some(old) = self.live.remove(&m.id) {
            if old.per_event() {
                self.filtered.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.insert(m);
    }

    pub(crate) fn retire(&mut self, id: ProbeId) {
        if let Some(m) = self.live.remove(&id) {
            if m.per_event() {
                self.filtered.fetch_sub(1, Ordering::SeqCst);
            }
            // Bounded: the oldest retired names go first.
            if self.retired.len() >= 4096 {
                if let Some(&old) = self.retired.keys().min() {
                    self.retired.remove(&old);
                }
            }
            self.retired.insert(id, m);
        }
    }
}

/// The name of the probe's policy, empty if none.
pub(crate) fn policy_name(meta: Option<&ProbeMeta>) -> String {
    meta.and_then(|m| m.policy.as_ref())
        .map(|p| p.name.clone())
        .unwrap_or_default()
}

/// The tags of the probe's policy now.
pub(crate) fn policy_tags(meta: Option<&ProbeMeta>) -> std::collections::BTreeMap<String, String> {
    meta.and_then(|m| m.policy.as_ref())
        .map(|p| p.conf().tags.clone())
        .unwrap_or_default()
}

/// Type of a field a probe's own filter may name.
pub(crate) fn probe_field_kind(
    args: &[(String, Option<FieldKind>)],
    is_return: bool,
    name: &str,
) -> Option<FieldKind> {
    match args.iter().find(|(n, _)| n == name) {
        Some((_, kind)) => *kind,
        None => common_field_kind(name, is_return),
    }
}

/// Fields every event has: the vCPU, the guest task (`common_pid`, `comm`:
/// known when the guest's DWARF gives `task_struct`'s layout; without it
/// predicates on them are false), and the return value of return probes.
pub(crate) fn common_field_kind(name: &str, is_return: bool) -> Option<FieldKind> {
    match name {
        "cpu" => Some(FieldKind::Unsigned),
        "common_pid" | "tgid" | "ppid" => Some(FieldKind::Signed),
        "comm" | "exe" => Some(FieldKind::String),
        "retval" if is_return => Some(FieldKind::Unsigned),
        _ => None,
    }
}

/// The filter field type of a fetch argument (`None`: not filterable).
pub(crate) fn arg_field_kind(t: &FetchType) -> Option<FieldKind> {
    if t.array.is_some() {
        return None;
    }
    Some(match t.base {
        BaseType::S8 | BaseType::S16 | BaseType::S32 | BaseType::S64 => FieldKind::Signed,
        BaseType::String | BaseType::UString | BaseType::SymStr => FieldKind::String,
        _ => FieldKind::Unsigned,
    })
}

/// The packed fields of a definition: entry-time ones first for return
/// probes, the order the engine reports them in.
pub(crate) fn fields_of(def: &ProbeDef) -> Vec<v1::FieldSchema> {
    let is_return = def.kind.is_return();
    let field = |a: &probe_spec::FetchArg| {
        let (kind, bits) = kind_of(&a.ty);
        v1::FieldSchema {
            name: a.name.clone(),
            r#type: a.ty.to_string(),
            kind: kind as i32,
            count: a.ty.array.unwrap_or(1),
            bits,
            at_entry: is_return && !a.uses_retval(),
        }
    };
    if !is_return {
        return def.args.iter().map(field).collect();
    }
    let entry = def.args.iter().filter(|a| !a.uses_retval()).map(field);
    let at_return = def.args.iter().filter(|a| a.uses_retval()).map(field);
    entry.chain(at_return).collect()
}

/// Column and width of a fetch type.
fn kind_of(t: &FetchType) -> (PackedKind, u32) {
    let bits = u32::try_from(8 * t.base.size()).unwrap_or(u32::MAX);
    match t.base {
        BaseType::U8 | BaseType::U16 | BaseType::U32 | BaseType::U64 => {
            (PackedKind::Unsigned, bits)
        }
        BaseType::S8 | BaseType::S16 | BaseType::S32 | BaseType::S64 => (PackedKind::Signed, bits),
        BaseType::X8 | BaseType::X16 | BaseType::X32 | BaseType::X64 => (PackedKind::Hex, bits),
        BaseType::Char => (PackedKind::Char, 8),
        BaseType::String | BaseType::UString | BaseType::SymStr => (PackedKind::String, 0),
        BaseType::Symbol => (PackedKind::Symbol, 64),
    }
}

/// An event's values in field order: a return probe's entry-time values
/// first, then those fetched at return (the order of `ProbeMeta::fields`).
fn values(ev: &Event) -> impl Iterator<Item = &Value> {
    let entry: &[Value] = match &ev.kind {
        EventKind::Return { entry_args, .. } => entry_args,
        EventKind::Entry => &[],
    };
    entry.iter().chain(&ev.args)
}

/// Fields for an event of a probe the service never knew (created on the
/// engine directly): `argN`, typed by the values.
pub(crate) fn guess_fields(ev: &Event) -> Vec<v1::FieldSchema> {
    let entry = match &ev.kind {
        EventKind::Return { entry_args, .. } => entry_args.len(),
        EventKind::Entry => 0,
    };
    values(ev)
        .enumerate()
        .map(|(i, v)| {
            let (kind, bits, count) = match v {
                Value::Array { elements } => {
                    let (k, b) = packed_kind_of_value(elements.first());
                    (k, b, u32::try_from(elements.len()).unwrap_or(u32::MAX))
                }
                v => {
                    let (k, b) = packed_kind_of_value(Some(v));
                    (k, b, 1)
                }
            };
            v1::FieldSchema {
                name: format!("arg{}", i + 1),
                r#type: String::new(),
                kind: kind as i32,
                count,
                bits,
                at_entry: i < entry,
            }
        })
        .collect()
}

fn packed_kind_of_value(v: Option<&Value>) -> (v1::PackedKind, u32) {
    use v1::PackedKind as K;
    match v {
        Some(Value::Signed { bits, .. }) => (K::Signed, u32::from(*bits)),
        Some(Value::Hex { bits, .. }) => (K::Hex, u32::from(*bits)),
        Some(Value::Unsigned { bits, .. }) => (K::Unsigned, u32::from(*bits)),
        Some(Value::Char { .. }) => (K::Char, 8),
        Some(Value::Str { .. }) => (K::String, 0),
        Some(Value::Symbol { .. }) => (K::Symbol, 64),
        _ => (K::Unsigned, 64),
    }
}

/// An event's fields for filters: fetched args (entry args of return
/// probes too) named by `fields` (the probe's), `cpu`, `common_pid` and
/// `comm` when the task is known, and `retval` for returns.
pub(crate) struct EventFieldsView<'a> {
    pub ev: &'a Event,
    pub fields: &'a [v1::FieldSchema],
}

impl Fields for EventFieldsView<'_> {
    fn field(&self, name: &str) -> Option<FieldValue<'_>> {
        let ev = self.ev;
        if let Some(i) = self.fields.iter().position(|f| f.name == name) {
            return values(ev).nth(i).and_then(FieldValue::from_value);
        }
        match (name, &ev.kind) {
            ("cpu", _) => Some(FieldValue::Unsigned(u64::from(ev.vcpu))),
            ("common_pid", _) => ev
                .task
                .as_ref()
                .map(|t| FieldValue::Signed(i64::from(t.pid))),
            ("tgid", _) => ev
                .task
                .as_ref()
                .map(|t| FieldValue::Signed(i64::from(t.tgid))),
            ("ppid", _) => ev
                .task
                .as_ref()
                .map(|t| FieldValue::Signed(i64::from(t.ppid))),
            ("comm", _) => ev.task.as_ref().map(|t| FieldValue::Str(t.comm())),
            ("exe", _) => ev
                .task
                .as_ref()
                .and_then(|t| t.exe.as_deref())
                .map(FieldValue::Str),
            ("retval", EventKind::Return { retval, .. }) => Some(FieldValue::Unsigned(*retval)),
            _ => None,
        }
    }
}

/// The API message of a probe: the engine's row and the service's metadata.
pub(crate) fn probe_info(r: &introspect::ProbeInfo, m: &ProbeMeta) -> v1::ProbeInfo {
    v1::ProbeInfo {
        id: r.id,
        group: m.group.clone(),
        event: m.event.clone(),
        kind: m.kind as i32,
        address: r.address,
        symbol: m.symbol.clone(),
        offset: m.offset,
        module: m.module.clone(),
        location: m.location.clone(),
        enabled: r.enabled,
        gone: r.gone,
        pending: r.pending,
        module_error: r.module_error.clone().unwrap_or_default(),
        hits: r.hits,
        misses: r.missed,
        dropped: r.dropped,
        handling: match r.handling {
            Handling::Emulated => v1::HandlingMode::Emulate,
            Handling::SingleStep => v1::HandlingMode::SingleStep,
            Handling::OutOfLine => v1::HandlingMode::OutOfLine,
        } as i32,
        maxactive: match r.kind {
            ProbeType::Kprobe => 0,
            ProbeType::Kretprobe { .. } => r.maxactive,
        },
        definition: m.definition.clone(),
        filter: m
            .filter
            .as_ref()
            .map(|f| f.text.clone())
            .unwrap_or_default(),
        arg_names: m.args.iter().map(|(name, _)| name.clone()).collect(),
        site_address: r.site,
        action: m.action.clone(),
        actions: r.actions,
        policy: m
            .policy
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        hardware: r.hardware,
        hw_slot: r.hw_slot.and_then(|s| u32::try_from(s).ok()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use introspect::GuestTask;

    /// A return event of probe 1 with a task, an entry-time string and a
    /// value fetched at return.
    pub(crate) fn return_event() -> Event {
        Event {
            probe_id: 1,
            seq: 0,
            vcpu: 3,
            time_ns: 10,
            ip: 0,
            kind: EventKind::Return {
                func: 0,
                return_to: 0,
                retval: 7,
                duration_ns: 4,
                entry_args: vec![Value::Str {
                    bytes: b"/etc".to_vec(),
                    truncated: false,
                }],
            },
            task: Some(GuestTask {
                pid: 77,
                tgid: 70,
                ppid: 1,
                comm: *b"cat\0\0\0\0\0\0\0\0\0\0\0\0\0",
                exe: Some(b"/bin/cat".to_vec().into()),
            }),
            args: vec![Value::Signed {
                bits: 32,
                value: -1,
            }],
            action: None,
        }
    }

    #[test]
    fn fields_cover_args_entry_args_task_cpu_and_retval() {
        let ev = return_event();
        let def = probe_spec::parse_probe("r:g/e f n=$retval:s32 path=+0(%di):string").unwrap();
        let fields = fields_of(&def);
        let f = EventFieldsView {
            ev: &ev,
            fields: &fields,
        };
        assert_eq!(f.field("n"), Some(FieldValue::Signed(-1)));
        assert_eq!(f.field("path"), Some(FieldValue::Str(b"/etc")));
        assert_eq!(f.field("cpu"), Some(FieldValue::Unsigned(3)));
        assert_eq!(f.field("retval"), Some(FieldValue::Unsigned(7)));
        assert_eq!(f.field("common_pid"), Some(FieldValue::Signed(77)));
        assert_eq!(f.field("comm"), Some(FieldValue::Str(b"cat")));
        assert_eq!(f.field("tgid"), Some(FieldValue::Signed(70)));
        assert_eq!(f.field("ppid"), Some(FieldValue::Signed(1)));
        assert_eq!(f.field("exe"), Some(FieldValue::Str(b"/bin/cat")));
        assert_eq!(f.field("nope"), None);
        let filt = probe_spec::Filter::parse(
            "path ~ \"/e*\" && retval == 7 && cpu < 4 && comm == \"cat\" && common_pid == 77 \
             && tgid == 70 && ppid == 1 && exe ~ \"/bin/*\"",
        )
        .unwrap();
        assert!(filt.matches(&f));
    }

    #[test]
    fn field_kinds_of_types() {
        let t = |s: &str| {
            probe_spec::parse_probe(&format!("p f a=+0(%di):{s}"))
                .unwrap()
                .args[0]
                .ty
        };
        assert_eq!(arg_field_kind(&t("s32")), Some(FieldKind::Signed));
        assert_eq!(arg_field_kind(&t("x8")), Some(FieldKind::Unsigned));
        assert_eq!(arg_field_kind(&t("u8[4]")), None);
    }

    #[test]
    fn fields_of_a_return_probe_put_entry_args_first() {
        let def = probe_spec::parse_probe(
            "r:g/e f ret=$retval:s32 path=+0($arg2):string c=+0(%di):char[2] s=%si:symbol",
        )
        .unwrap();
        let f = fields_of(&def);
        let names: Vec<_> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["path", "c", "s", "ret"]);
        assert!(f[0].at_entry && !f[3].at_entry);
        assert_eq!(f[1].kind, PackedKind::Char as i32);
        assert_eq!((f[1].count, f[1].bits), (2, 8));
        assert_eq!(f[2].kind, PackedKind::Symbol as i32);
        assert_eq!((f[3].kind, f[3].bits), (PackedKind::Signed as i32, 32));
    }
}
