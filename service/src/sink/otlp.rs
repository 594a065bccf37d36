//! The OTLP sink's body: an `ExportLogsServiceRequest` (OTLP/HTTP, binary
//! protobuf, POST `/v1/logs`), from the official definitions
//! (`proto::otlp`). One ResourceLogs (the VM) with one ScopeLogs
//! (`hvprobe`), one LogRecord per event or lost record:
//!
//! - resource: `service.name` = `hvprobe`, `service.instance.id` (this
//!   run), `host.name`, `hvprobe.vm.name`;
//! - an event: `event_name` `hvprobe.event`, severity INFO, `body` the
//!   trace line, `time_unix_nano` when the probe fired, attributes
//!   `hvprobe.probe` (`GROUP/EVENT`), `hvprobe.probe.id`,
//!   `hvprobe.probe.kind`, `hvprobe.seq`, `hvprobe.record_seq`,
//!   `hvprobe.vcpu`, `hvprobe.ip`, `hvprobe.policy` and `hvprobe.tag.KEY`
//!   (when the probe belongs to a policy), `thread.id`/`thread.name` (the
//!   guest task's pid and comm), `process.pid` (tgid), `process.parent_pid`,
//!   `process.executable.path`, `hvprobe.arg.NAME` for each fetched
//!   argument (integers as int, strings as string, arrays as array,
//!   `x` types, symbols and faults as their trace text), and for return
//!   probes `hvprobe.ret.retval` (int, as the kernel's `long`),
//!   `hvprobe.ret.duration_ns`, `hvprobe.ret.caller` and
//!   `hvprobe.entry_arg.NAME`;
//! - lost events: `event_name` `hvprobe.lost`, severity WARN, attributes
//!   `hvprobe.lost.count`, `hvprobe.lost.reason` (the `LostReason` name),
//!   `hvprobe.record_seq`.

use hyper::body::Bytes;
use prost::Message;
use proto::otlp::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use proto::otlp::common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue};
use proto::otlp::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use proto::otlp::resource::v1::Resource;
use proto::v1::{self, export_record::Record, value::Kind};

/// `event_name` of an event's LogRecord.
pub const EVENT_NAME: &str = "hvprobe.event";
/// `event_name` of a lost record's LogRecord.
pub const LOST_NAME: &str = "hvprobe.lost";

fn kv(key: impl Into<String>, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

/// An unsigned value as an OTLP int when it fits, else its decimal string.
fn u(v: u64) -> any_value::Value {
    i64::try_from(v).map_or_else(|_| s(v.to_string()), any_value::Value::IntValue)
}

fn value(v: &v1::Value, text: &str) -> any_value::Value {
    match v.kind.as_ref() {
        Some(Kind::Unsigned(x)) => u(x.value),
        Some(Kind::Signed(x)) => any_value::Value::IntValue(x.value),
        Some(Kind::String(x)) => s(x.text.clone()),
        Some(Kind::Array(a)) => any_value::Value::ArrayValue(ArrayValue {
            values: a
                .elements
                .iter()
                .map(|e| AnyValue {
                    value: Some(value(e, "")),
                })
                .collect(),
        }),
        Some(Kind::Hex(x)) if text.is_empty() => s(format!("{:#x}", x.value)),
        Some(Kind::Char(c)) if text.is_empty() => s(char::from_u32(*c).unwrap_or('?').to_string()),
        Some(Kind::Symbol(x)) if text.is_empty() => s(x.symbol.clone()),
        Some(Kind::Fault(_)) if text.is_empty() => s("(fault)"),
        // x types, chars, symbols and faults: as the trace shows them.
        _ => s(text),
    }
}

fn args(out: &mut Vec<KeyValue>, prefix: &str, args: &[v1::FetchedArg]) {
    for a in args {
        let v = match &a.value {
            Some(v) => value(v, &a.text),
            None => s(a.text.clone()),
        };
        out.push(kv(format!("{prefix}{}", a.name), v));
    }
}

fn kind_name(k: i32) -> &'static str {
    match v1::ProbeKind::try_from(k) {
        Ok(v1::ProbeKind::Kprobe) => "kprobe",
        Ok(v1::ProbeKind::Kretprobe) => "kretprobe",
        _ => "unspecified",
    }
}

/// The LogRecord of one record.
pub fn log_record(r: &v1::ExportRecord, observed_ns: u64) -> LogRecord {
    let mut a = Vec::new();
    let mut rec = LogRecord {
        observed_time_unix_nano: observed_ns,
        ..Default::default()
    };
    match r.record.as_ref() {
        Some(Record::Event(e)) => {
            rec.time_unix_nano = e.timestamp_ns;
            rec.severity_number = SeverityNumber::Info as i32;
            rec.severity_text = "INFO".into();
            rec.event_name = EVENT_NAME.into();
            rec.body = Some(AnyValue {
                value: Some(s(e.text.clone())),
            });
            a.push(kv("hvprobe.probe", s(format!("{}/{}", e.group, e.event))));
            a.push(kv("hvprobe.probe.id", u(e.probe_id)));
            a.push(kv("hvprobe.probe.kind", s(kind_name(e.kind))));
            a.push(kv("hvprobe.seq", u(e.seq)));
            a.push(kv("hvprobe.record_seq", u(r.record_seq)));
            a.push(kv("hvprobe.vcpu", u(u64::from(e.vcpu))));
            a.push(kv("hvprobe.ip", s(format!("{:#x}", e.ip))));
            if !e.policy.is_empty() {
                a.push(kv("hvprobe.policy", s(e.policy.clone())));
            }
            for (k, v) in &e.tags {
                a.push(kv(format!("hvprobe.tag.{k}"), s(v.clone())));
            }
            if let Some(pid) = e.pid {
                a.push(kv("thread.id", any_value::Value::IntValue(pid.into())));
            }
            if let Some(comm) = &e.comm {
                a.push(kv("thread.name", s(comm.clone())));
            }
            if let Some(tgid) = e.tgid {
                a.push(kv("process.pid", any_value::Value::IntValue(tgid.into())));
            }
            if let Some(ppid) = e.ppid {
                a.push(kv(
                    "process.parent_pid",
                    any_value::Value::IntValue(ppid.into()),
                ));
            }
            if let Some(exe) = &e.exe {
                a.push(kv(
                    "process.executable.path",
                    s(String::from_utf8_lossy(exe).into_owned()),
                ));
            }
            args(&mut a, "hvprobe.arg.", &e.args);
            if let Some(ret) = &e.ret {
                // Kernel return values are `long`s: -2 is -ENOENT.
                a.push(kv(
                    "hvprobe.ret.retval",
                    any_value::Value::IntValue(i64::from_ne_bytes(ret.retval.to_ne_bytes())),
                ));
                a.push(kv("hvprobe.ret.duration_ns", u(ret.duration_ns)));
                a.push(kv(
                    "hvprobe.ret.caller",
                    s(format!("{:#x}", ret.return_address)),
                ));
                args(&mut a, "hvprobe.entry_arg.", &ret.entry_args);
            }
        }
        Some(Record::Lost(l)) => {
            rec.time_unix_nano = l.until_ns;
            rec.severity_number = SeverityNumber::Warn as i32;
            rec.severity_text = "WARN".into();
            rec.event_name = LOST_NAME.into();
            let reason = v1::LostReason::try_from(l.reason)
                .map_or_else(|_| l.reason.to_string(), |r| r.as_str_name().to_string());
            rec.body = Some(AnyValue {
                value: Some(s(format!("{} events lost ({reason})", l.count))),
            });
            a.push(kv("hvprobe.lost.count", u(l.count)));
            a.push(kv("hvprobe.lost.reason", s(reason)));
            a.push(kv("hvprobe.record_seq", u(r.record_seq)));
        }
        None => {}
    }
    rec.attributes = a;
    rec
}

/// The request for `records` of the VM `vm`, encoded.
pub fn encode(records: &[&v1::ExportRecord], vm: &v1::VmIdentity) -> (Bytes, &'static str) {
    let now = crate::time::now_ns();
    let req = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s("hvprobe")),
                    kv("service.instance.id", s(vm.instance.clone())),
                    kv("host.name", s(vm.host.clone())),
                    kv("hvprobe.vm.name", s(vm.name.clone())),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "hvprobe".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: records.iter().map(|r| log_record(r, now)).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    (Bytes::from(req.encode_to_vec()), "application/x-protobuf")
}

/// Records an acknowledged request's answer says were refused (OTLP
/// partial success); 0 for an empty or unreadable answer.
pub fn refused(body: &[u8]) -> u64 {
    ExportLogsServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map_or(0, |p| u64::try_from(p.rejected_log_records).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr<'a>(r: &'a LogRecord, key: &str) -> &'a any_value::Value {
        r.attributes
            .iter()
            .find(|k| k.key == key)
            .and_then(|k| k.value.as_ref())
            .and_then(|v| v.value.as_ref())
            .unwrap_or_else(|| panic!("no {key} in {r:?}"))
    }

    #[test]
    fn events_and_lost_records_become_log_records() {
        let ev = v1::ExportRecord {
            record_seq: 7,
            record: Some(Record::Event(v1::Event {
                probe_id: 3,
                group: "fs".into(),
                event: "open".into(),
                kind: v1::ProbeKind::Kretprobe as i32,
                seq: 41,
                timestamp_ns: 1_000,
                pid: Some(12),
                comm: Some("cat".into()),
                policy: "files".into(),
                tags: [("team".to_string(), "sec".to_string())].into(),
                args: vec![
                    v1::FetchedArg {
                        name: "path".into(),
                        r#type: "string".into(),
                        value: Some(v1::Value {
                            kind: Some(Kind::String(v1::StringValue {
                                text: "/etc/x".into(),
                                ..Default::default()
                            })),
                        }),
                        text: "\"/etc/x\"".into(),
                    },
                    v1::FetchedArg {
                        name: "flags".into(),
                        r#type: "x32".into(),
                        value: Some(v1::Value {
                            kind: Some(Kind::Hex(v1::UnsignedValue {
                                value: 0x41,
                                bits: 32,
                            })),
                        }),
                        text: "0x41".into(),
                    },
                    v1::FetchedArg {
                        name: "big".into(),
                        r#type: "u64".into(),
                        value: Some(v1::Value {
                            kind: Some(Kind::Unsigned(v1::UnsignedValue {
                                value: u64::MAX,
                                bits: 64,
                            })),
                        }),
                        text: String::new(),
                    },
                ],
                ret: Some(v1::ReturnInfo {
                    retval: (-2i64) as u64,
                    ..Default::default()
                }),
                text: "open: ...".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let lost = v1::ExportRecord {
            record_seq: 8,
            record: Some(Record::Lost(v1::LostEvents {
                count: 5,
                until_ns: 2_000,
                reason: v1::LostReason::SinkRetriesExhausted as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let vm = v1::VmIdentity {
            host: "h".into(),
            name: "vm".into(),
            instance: "i".into(),
        };
        let (body, ctype) = encode(&[&ev, &lost], &vm);
        assert_eq!(ctype, "application/x-protobuf");
        let req = ExportLogsServiceRequest::decode(&body[..]).unwrap();
        let rl = &req.resource_logs[0];
        let res = rl.resource.as_ref().unwrap();
        assert!(res.attributes.iter().any(|k| k.key == "service.name"));
        let recs = &rl.scope_logs[0].log_records;
        assert_eq!(recs.len(), 2);
        let e = &recs[0];
        assert_eq!(
            (e.event_name.as_str(), e.time_unix_nano),
            (EVENT_NAME, 1_000)
        );
        use any_value::Value::{IntValue, StringValue};
        assert_eq!(attr(e, "hvprobe.probe"), &StringValue("fs/open".into()));
        assert_eq!(
            attr(e, "hvprobe.probe.kind"),
            &StringValue("kretprobe".into())
        );
        assert_eq!(attr(e, "hvprobe.seq"), &IntValue(41));
        assert_eq!(attr(e, "hvprobe.record_seq"), &IntValue(7));
        assert_eq!(attr(e, "hvprobe.policy"), &StringValue("files".into()));
        assert_eq!(attr(e, "hvprobe.tag.team"), &StringValue("sec".into()));
        assert_eq!(attr(e, "thread.id"), &IntValue(12));
        assert_eq!(attr(e, "thread.name"), &StringValue("cat".into()));
        assert_eq!(attr(e, "hvprobe.arg.path"), &StringValue("/etc/x".into()));
        assert_eq!(attr(e, "hvprobe.arg.flags"), &StringValue("0x41".into()));
        assert_eq!(
            attr(e, "hvprobe.arg.big"),
            &StringValue(u64::MAX.to_string())
        );
        assert_eq!(attr(e, "hvprobe.ret.retval"), &IntValue(-2));
        let l = &recs[1];
        assert_eq!(l.event_name, LOST_NAME);
        assert_eq!(attr(l, "hvprobe.lost.count"), &IntValue(5));
        assert_eq!(
            attr(l, "hvprobe.lost.reason"),
            &StringValue("LOST_REASON_SINK_RETRIES_EXHAUSTED".into())
        );
    }

    #[test]
    fn partial_success_counts_refused_records() {
        use proto::otlp::collector::logs::v1::ExportLogsPartialSuccess;
        assert_eq!(refused(b""), 0);
        let r = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: 3,
                error_message: "no".into(),
            }),
        };
        assert_eq!(refused(&r.encode_to_vec()), 3);
    }
}
