//! Engine rows and events as API messages.

use introspect::{Event, EventKind, Handling, ProbeType};
use probe_spec::{BaseType, FetchType, FieldKind, FieldValue, Fields};
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
        arg_names: m.arg_names.clone(),
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

/// An event's fields for filters: fetched args (entry args of return
/// probes too), `cpu`, and `retval` for returns.
pub(crate) struct EventFieldsView<'a>(pub &'a Event);

impl Fields for EventFieldsView<'_> {
    fn field(&self, name: &str) -> Option<FieldValue<'_>> {
        let ev = self.0;
        let entry: &[probe_spec::ArgValue] = match &ev.kind {
            EventKind::Return { entry_args, .. } => entry_args,
            EventKind::Entry => &[],
        };
        if let Some(a) = ev.args.iter().chain(entry).find(|a| a.name == name) {
            return FieldValue::from_value(&a.value);
        }
        match (name, &ev.kind) {
            ("cpu", _) => Some(FieldValue::Unsigned(u64::from(ev.vcpu))),
            ("retval", EventKind::Return { retval, .. }) => Some(FieldValue::Unsigned(*retval)),
            _ => None,
        }
    }
}

/// One engine event as an API event. `meta` is `None` only for events of a
/// probe the service never knew (not created through it).
pub(crate) fn event(ev: &Event, meta: Option<&ProbeMeta>, symbols: &Symbols) -> v1::Event {
    let (group, event_name, kind) = match meta {
        Some(m) => (m.group.clone(), m.event.clone(), m.kind),
        None => (
            String::new(),
            format!("probe{}", ev.probe_id),
            v1::ProbeKind::Unspecified,
        ),
    };
    let args: Vec<v1::FetchedArg> = ev.args.iter().map(v1::FetchedArg::from).collect();
    let (ret, ip_text) = match &ev.kind {
        EventKind::Entry => (
            None,
            meta.map_or_else(|| format!("0x{:x}", ev.ip), |m| m.ip_text.clone()),
        ),
        EventKind::Return {
            func,
            return_to,
            retval,
            duration_ns,
            entry_args,
        } => {
            let caller = symbols
                .sym_off(*return_to)
                .map_or_else(|| format!("0x{return_to:x}"), |s| s.to_string());
            let callee = meta
                .filter(|m| !m.symbol.is_empty())
                .map_or_else(|| format!("0x{func:x}"), |m| m.symbol.clone());
            (
                Some(v1::ReturnInfo {
                    retval: *retval,
                    return_address: *return_to,
                    entry_timestamp_ns: ev.time_ns.saturating_sub(*duration_ns),
                    duration_ns: *duration_ns,
                    entry_args: entry_args.iter().map(v1::FetchedArg::from).collect(),
                }),
                format!("{caller} <- {callee}"),
            )
        }
    };
    // Return probes print entry args then return-time args, in the kernel's
    // order of definition as far as the engine keeps it.
    let text = match &ev.kind {
        EventKind::Return { entry_args, .. } if !entry_args.is_empty() => {
            let all: Vec<probe_spec::ArgValue> =
                entry_args.iter().chain(&ev.args).cloned().collect();
            probe_spec::format_event_line(&event_name, &ip_text, &all)
        }
        _ => probe_spec::format_event_line(&event_name, &ip_text, &ev.args),
    };
    v1::Event {
        probe_id: ev.probe_id,
        group,
        event: event_name,
        kind: kind as i32,
        seq: ev.seq,
        vcpu: ev.vcpu,
        timestamp_ns: ev.time_ns,
        ip: ev.ip,
        pid: None,
        comm: None,
        args,
        ret,
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_access::Regs;

    fn arg(name: &str, v: probe_spec::Value) -> probe_spec::ArgValue {
        probe_spec::ArgValue {
            name: name.into(),
            ty: "x".into(),
            value: v,
        }
    }

    #[test]
    fn fields_cover_args_entry_args_cpu_and_retval() {
        let ev = Event {
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
                entry_args: vec![arg(
                    "path",
                    probe_spec::Value::Str {
                        bytes: b"/etc".to_vec(),
                        truncated: false,
                    },
                )],
            },
            regs: Regs::default(),
            args: vec![arg(
                "n",
                probe_spec::Value::Signed {
                    bits: 32,
                    value: -1,
                },
            )],
        };
        let f = EventFieldsView(&ev);
        assert_eq!(f.field("n"), Some(FieldValue::Signed(-1)));
        assert_eq!(f.field("path"), Some(FieldValue::Str(b"/etc")));
        assert_eq!(f.field("cpu"), Some(FieldValue::Unsigned(3)));
        assert_eq!(f.field("retval"), Some(FieldValue::Unsigned(7)));
        assert_eq!(f.field("comm"), None);
        let filt = probe_spec::Filter::parse("path ~ \"/e*\" && retval == 7 && cpu < 4").unwrap();
        assert!(filt.matches(&f));
        let e = event(&ev, None, &Symbols::none());
        assert_eq!(e.ret.as_ref().unwrap().entry_timestamp_ns, 6);
        assert_eq!(e.text, "probe1: (0x0 <- 0x0) path=\"/etc\" n=-1");
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
