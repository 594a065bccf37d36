//! The full encoding (`EVENT_ENCODING_FULL`): one engine event as one
//! [`v1::Event`], named by its probe's metadata, with the trace line.

use introspect::{Event, EventKind};
use proto::v1;

use crate::catalog::{guess_fields, policy_name, policy_tags, ProbeMeta};
use crate::symbols::Symbols;

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
    // Each value's text is made once, for its own field and for the line
    // (which lists entry args then return-time args, as defined).
    let n_entry = entry_args.len();
    let mut text = format!("{event_name}: ({ip_text})");
    let mut named: Vec<v1::FetchedArg> = Vec::with_capacity(n_entry + args.len());
    for (i, value) in entry_args.into_iter().chain(args).enumerate() {
        let (name, ty) = match fields.get(i) {
            Some(f) => (f.name.clone(), f.r#type.clone()),
            None => (format!("arg{}", i + 1), String::new()),
        };
        let value_text = value.to_string();
        text.reserve(name.len() + value_text.len() + 2);
        text.push(' ');
        text.push_str(&name);
        text.push('=');
        text.push_str(&value_text);
        named.push(v1::FetchedArg {
            name,
            r#type: ty,
            value: Some(v1::Value::from(value)),
            text: value_text,
        });
    }
    let at_return = named.split_off(n_entry);
    let ret = ret.map(|mut r| {
        r.entry_args = named;
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
        args: at_return,
        ret,
        text,
        policy: policy_name(meta),
        tags: policy_tags(meta),
        action: ev.action.as_ref().map(crate::actions::taken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::return_event;

    /// What the encoder made before it formatted each value once: every
    /// argument through `ArgValue`, the line by `format_event_line`.
    fn reference_args_and_text(ev: &Event) -> (Vec<v1::FetchedArg>, String) {
        let fields = guess_fields(ev);
        let (entry, name_text): (&[probe_spec::Value], _) = match &ev.kind {
            EventKind::Entry => (&[], "0x0"),
            EventKind::Return { entry_args, .. } => (entry_args, "0x0 <- 0x0"),
        };
        let named: Vec<probe_spec::ArgValue> = entry
            .iter()
            .chain(&ev.args)
            .enumerate()
            .map(|(i, v)| probe_spec::ArgValue {
                name: fields
                    .get(i)
                    .map_or(format!("arg{}", i + 1), |f| f.name.clone()),
                ty: fields.get(i).map_or(String::new(), |f| f.r#type.clone()),
                value: v.clone(),
            })
            .collect();
        let line = probe_spec::format_event_line("probe1", name_text, &named);
        (named.iter().map(v1::FetchedArg::from).collect(), line)
    }

    #[test]
    fn fields_and_line_are_those_of_the_per_argument_conversion() {
        let mut ev = return_event();
        ev.args.push(probe_spec::Value::Str {
            bytes: b"tab\there\xff".to_vec(),
            truncated: true,
        });
        ev.args.push(probe_spec::Value::Array {
            elements: vec![
                probe_spec::Value::Hex { bits: 8, value: 3 },
                probe_spec::Value::Fault { addr: 1 },
            ],
        });
        ev.args
            .push(probe_spec::Value::Unavailable { reason: "x".into() });
        let (want, line) = reference_args_and_text(&ev);
        let got = event(ev, None, &Symbols::none());
        let mut all = got.ret.as_ref().unwrap().entry_args.clone();
        all.extend(got.args.iter().cloned());
        assert_eq!(all, want);
        assert_eq!(got.text, line);
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
}
