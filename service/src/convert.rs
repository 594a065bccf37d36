//! Engine rows and events as API messages.

use introspect::{Event, EventKind, Handling, ProbeType};
use probe_spec::{BaseType, FetchType, FieldKind, FieldValue, Fields, Value};
use proto::v1;

use crate::server::ProbeMeta;
use crate::symbols::Symbols;

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
        policy: m
            .policy
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default(),
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
                    (k, b, elements.len() as u32)
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

/// One engine event as an API event. `meta` is `None` only for events of a
/// probe the service never knew (not created through it).
pub(crate) fn event(ev: Event, meta: Option<&ProbeMeta>, symbols: &Symbols) -> v1::Event {
    let guessed;
    let (group, event_name, kind, fields) = match meta {
        Some(m) => (m.group.clone(), m.event.clone(), m.kind, &m.fields[..]),
        None => {
            guessed = guess_fields(&ev);
            (
                String::new(),
                format!("probe{}", ev.probe_id),
                v1::ProbeKind::Unspecified,
                &guessed[..],
            )
        }
    };
    let (ret, ip_text, entry_args, args) = match ev.kind {
        EventKind::Entry => (
            None,
            meta.map_or_else(|| format!("0x{:x}", ev.ip), |m| m.ip_text.clone()),
            Vec::new(),
            ev.args,
        ),
        EventKind::Return {
            func,
            return_to,
            retval,
            duration_ns,
            entry_args,
        } => {
            let caller = symbols
                .sym_off(return_to)
                .map_or_else(|| format!("0x{return_to:x}"), |s| s.to_string());
            let callee = meta
                .filter(|m| !m.symbol.is_empty())
                .map_or_else(|| format!("0x{func:x}"), |m| m.symbol.clone());
            let info = v1::ReturnInfo {
                retval,
                return_address: return_to,
                entry_timestamp_ns: ev.time_ns.saturating_sub(duration_ns),
                duration_ns,
                entry_args: Vec::new(),
            };
            (
                Some(info),
                format!("{caller} <- {callee}"),
                entry_args,
                ev.args,
            )
        }
    };
    // Name the values: entry-time fields first, as `values` orders them.
    let n_entry = entry_args.len();
    let named: Vec<probe_spec::ArgValue> = entry_args
        .into_iter()
        .chain(args)
        .enumerate()
        .map(|(i, value)| match fields.get(i) {
            Some(f) => probe_spec::ArgValue {
                name: f.name.clone(),
                ty: f.r#type.clone(),
                value,
            },
            None => probe_spec::ArgValue {
                name: format!("arg{}", i + 1),
                ty: String::new(),
                value,
            },
        })
        .collect();
    // Trace text lists entry args then return-time args, as defined.
    let text = probe_spec::format_event_line(&event_name, &ip_text, &named);
    let (entry, at_return) = named.split_at(n_entry);
    let ret = ret.map(|mut r| {
        r.entry_args = entry.iter().map(v1::FetchedArg::from).collect();
        r
    });
    v1::Event {
        probe_id: ev.probe_id,
        group,
        event: event_name,
        kind: kind as i32,
        seq: ev.seq,
        vcpu: ev.vcpu,
        timestamp_ns: ev.time_ns,
        ip: ev.ip,
        pid: ev.task.as_ref().map(|t| t.pid),
        comm: ev
            .task
            .as_ref()
            .map(|t| String::from_utf8_lossy(t.comm()).into_owned()),
        tgid: ev.task.as_ref().map(|t| t.tgid),
        ppid: ev.task.as_ref().map(|t| t.ppid),
        exe: ev
            .task
            .as_ref()
            .and_then(|t| t.exe.as_deref())
            .map(<[u8]>::to_vec),
        args: at_return.iter().map(v1::FetchedArg::from).collect(),
        ret,
        text,
        policy: policy_name(meta),
        tags: policy_tags(meta),
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

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::GuestTask;

    fn return_event() -> Event {
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
        }
    }

    #[test]
    fn fields_cover_args_entry_args_task_cpu_and_retval() {
        let ev = return_event();
        let def = probe_spec::parse_probe("r:g/e f n=$retval:s32 path=+0(%di):string").unwrap();
        let fields = crate::packed::fields_of(&def);
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
    fn events_of_unknown_probes_get_generated_names() {
        let e = event(return_event(), None, &Symbols::none());
        let r = e.ret.as_ref().unwrap();
        assert_eq!(r.entry_timestamp_ns, 6);
        assert_eq!(r.entry_args[0].name, "arg1");
        assert_eq!(e.args[0].name, "arg2");
        assert_eq!((e.pid, e.comm.as_deref()), (Some(77), Some("cat")));
        assert_eq!((e.tgid, e.ppid), (Some(70), Some(1)));
        assert_eq!(e.exe.as_deref(), Some(&b"/bin/cat"[..]));
        assert_eq!(e.text, "probe1: (0x0 <- 0x0) arg1=\"/etc\" arg2=-1");
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
}
