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
        action: ev.action.as_ref().map(crate::actions::taken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::return_event;

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
