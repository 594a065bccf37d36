//! `EVENT_ENCODING_PACKED`: events laid out in columns
//! (`PackedEventBatch`), with each probe's field names and types sent once
//! per stream (`ProbeSchema`). The proto file documents the layout; the
//! decoder in `proto::packed` reads it back.

use std::collections::HashMap;
use std::sync::Arc;

use introspect::{Event, EventKind, ProbeId};
use probe_spec::Value;
use prost::bytes::{Bytes, BytesMut};
use proto::v1::{self, PackedKind};

use crate::catalog::{guess_fields, policy_name, policy_tags, ProbeMeta};

/// The schema of `ev`'s probe.
fn schema(ev: &Event, meta: Option<&ProbeMeta>) -> v1::ProbeSchema {
    match meta {
        Some(m) => v1::ProbeSchema {
            probe_id: ev.probe_id,
            group: m.group.clone(),
            event: m.event.clone(),
            kind: m.kind as i32,
            ip: ev.ip,
            ip_text: m.ip_text.clone(),
            fields: m.fields.clone(),
            policy: policy_name(Some(m)),
            tags: policy_tags(Some(m)),
        },
        None => v1::ProbeSchema {
            probe_id: ev.probe_id,
            event: format!("probe{}", ev.probe_id),
            kind: match ev.kind {
                EventKind::Entry => v1::ProbeKind::Kprobe,
                EventKind::Return { .. } => v1::ProbeKind::Kretprobe,
            } as i32,
            ip: ev.ip,
            ip_text: format!("0x{:x}", ev.ip),
            fields: guess_fields(ev),
            ..Default::default()
        },
    }
}

/// Column and slot count of each field of a probe.
type Layout = Arc<[(PackedKind, u32)]>;

/// Builds one stream's packed batches; remembers which schemas the stream
/// has been sent.
#[derive(Default)]
pub(crate) struct PackedEncoder {
    batch: v1::PackedEventBatch,
    /// Schemas due before `batch`.
    schemas: Vec<v1::ProbeSchema>,
    /// Fields of every probe whose schema this stream has (or will have).
    known: HashMap<ProbeId, Layout>,
    /// The probe of the previous event and its fields (events come in runs).
    last: Option<(ProbeId, Layout)>,
    comms: HashMap<[u8; 16], u32>,
    slot: u32,
    /// The bytes of the batch's strings, one buffer: each string is a view
    /// into it (no allocation per string).
    text: BytesMut,
}

impl PackedEncoder {
    pub fn len(&self) -> usize {
        self.batch.probe_id.len()
    }

    /// Adds `ev`, copying its strings into the batch's one string buffer
    /// (the caller may give the event back to the engine afterwards: its
    /// buffers then serve later hits).
    pub fn push(&mut self, ev: &Event, meta: Option<&ProbeMeta>) {
        if self.last.as_ref().is_none_or(|(id, _)| *id != ev.probe_id) {
            self.switch_probe(ev, meta);
        }
        let b = &mut self.batch;
        if b.probe_id.is_empty() {
            b.comms.push(String::new());
            b.exes.push(Vec::new());
        }
        b.probe_id.push(ev.probe_id);
        b.seq.push(ev.seq);
        b.vcpu.push(ev.vcpu);
        b.timestamp_ns.push(ev.time_ns);
        match &ev.task {
            Some(t) => {
                b.pid.push(t.pid);
                let next = u32::try_from(b.comms.len()).unwrap_or(u32::MAX);
                let i = *self.comms.entry(t.comm).or_insert_with(|| {
                    b.comms.push(String::from_utf8_lossy(t.comm()).into_owned());
                    next
                });
                b.comm.push(i);
                b.tgid.push(t.tgid);
                b.ppid.push(t.ppid);
                let e = match &t.exe {
                    Some(path) => match b.exes.iter().position(|x| x[..] == path[..]) {
                        Some(e) => u32::try_from(e).unwrap_or(u32::MAX),
                        None => {
                            b.exes.push(path.to_vec());
                            u32::try_from(b.exes.len() - 1).unwrap_or(u32::MAX)
                        }
                    },
                    None => 0,
                };
                b.exe.push(e);
            }
            None => {
                b.pid.push(-1);
                b.comm.push(0);
                b.tgid.push(-1);
                b.ppid.push(-1);
                b.exe.push(0);
            }
        }
        let entry: &[Value] = match &ev.kind {
            EventKind::Entry => &[],
            EventKind::Return {
                return_to,
                retval,
                duration_ns,
                entry_args,
                ..
            } => {
                b.retval.push(*retval);
                b.return_address.push(*return_to);
                b.duration_ns.push(*duration_ns);
                entry_args
            }
        };
        let layout = match &self.last {
            Some((_, l)) => l.clone(),
            None => Layout::from([]),
        };
        let mut values = entry.iter().chain(&ev.args);
        let mut out = Slots {
            b,
            slot: &mut self.slot,
            text: &mut self.text,
        };
        let none = Value::Unavailable {
            reason: String::new(),
        };
        for &(kind, count) in layout.iter() {
            match values.next() {
                Some(Value::Array { elements }) => {
                    let mut el = elements.iter();
                    for _ in 0..count {
                        out.put(kind, el.next().unwrap_or(&none));
                    }
                }
                Some(v @ (Value::Fault { .. } | Value::Unavailable { .. })) => {
                    for _ in 0..count {
                        out.put(kind, v);
                    }
                }
                Some(v) if count == 1 => out.put(kind, v),
                // A value that does not fit its field: no content.
                _ => {
                    for _ in 0..count {
                        out.put(kind, &none);
                    }
                }
            }
        }
    }

    /// Makes `ev`'s probe the current one, queuing its schema if this
    /// stream has not had it.
    fn switch_probe(&mut self, ev: &Event, meta: Option<&ProbeMeta>) {
        let layout = match self.known.get(&ev.probe_id) {
            Some(l) => l.clone(),
            None => {
                let s = schema(ev, meta);
                let l: Layout = s
                    .fields
                    .iter()
                    .map(|f| {
                        let k = PackedKind::try_from(f.kind).unwrap_or(PackedKind::Unsigned);
                        (k, f.count)
                    })
                    .collect();
                self.known.insert(ev.probe_id, l.clone());
                self.schemas.push(s);
                l
            }
        };
        self.last = Some((ev.probe_id, layout));
    }

    /// The messages that send what was pushed (schemas first, then the
    /// batch), leaving the encoder empty; none if nothing was pushed.
    pub fn take(&mut self) -> Vec<v1::subscribe_response::Payload> {
        use v1::subscribe_response::Payload;
        if self.len() == 0 {
            return Vec::new();
        }
        let mut out: Vec<Payload> = self.schemas.drain(..).map(Payload::Schema).collect();
        let next = with_capacity_of(&self.batch);
        out.push(Payload::Packed(std::mem::replace(&mut self.batch, next)));
        self.slot = 0;
        self.comms.clear();
        out
    }

    /// Probes whose schema this stream was given.
    #[cfg(test)]
    fn known(&self) -> std::collections::HashSet<ProbeId> {
        self.known.keys().copied().collect()
    }
}

/// An empty batch with room for as much as `b` holds: batches of a stream
/// tend to be alike, and growing a dozen columns from zero each time is
/// most of a batch's copying.
fn with_capacity_of(b: &v1::PackedEventBatch) -> v1::PackedEventBatch {
    let n = b.probe_id.len();
    let r = b.retval.len();
    v1::PackedEventBatch {
        probe_id: Vec::with_capacity(n),
        seq: Vec::with_capacity(n),
        vcpu: Vec::with_capacity(n),
        timestamp_ns: Vec::with_capacity(n),
        pid: Vec::with_capacity(n),
        comm: Vec::with_capacity(n),
        tgid: Vec::with_capacity(n),
        ppid: Vec::with_capacity(n),
        exe: Vec::with_capacity(n),
        retval: Vec::with_capacity(r),
        return_address: Vec::with_capacity(r),
        duration_ns: Vec::with_capacity(r),
        values: Vec::with_capacity(b.values.len()),
        strings: Vec::with_capacity(b.strings.len()),
        ..Default::default()
    }
}

/// Bytes of string buffer taken at a time.
const TEXT_BLOCK: usize = 64 * 1024;

/// Where the values of one event go: the batch's columns, the running
/// slot number, the batch's string buffer.
struct Slots<'a> {
    b: &'a mut v1::PackedEventBatch,
    slot: &'a mut u32,
    text: &'a mut BytesMut,
}

impl Slots<'_> {
    /// `bytes` as a view into the batch's string buffer.
    fn string(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if self.text.capacity() < bytes.len() {
            // A new block shared by the next strings too; the old one is
            // freed with the last message that views it.
            self.text.reserve(bytes.len().max(TEXT_BLOCK));
        }
        self.text.extend_from_slice(bytes);
        self.text.split().freeze()
    }

    /// Writes one slot of `kind` holding `v`.
    fn put(&mut self, kind: PackedKind, v: &Value) {
        let n = *self.slot;
        *self.slot += 1;
        let takes_value = kind != PackedKind::String;
        let takes_string = matches!(kind, PackedKind::String | PackedKind::Symbol);
        let empty = |b: &mut v1::PackedEventBatch| {
            if takes_value {
                b.values.push(0);
            }
            if takes_string {
                b.strings.push(Bytes::new());
            }
        };
        match (kind, v) {
            (_, Value::Fault { addr }) => {
                self.b.faulted.push(n);
                self.b.fault_address.push(*addr);
                empty(self.b);
            }
            (PackedKind::String, Value::Str { bytes, truncated }) => {
                if *truncated {
                    self.b.truncated.push(n);
                }
                let s = self.string(bytes);
                self.b.strings.push(s);
            }
            (PackedKind::Symbol, Value::Symbol { addr, name }) => {
                self.b.values.push(*addr);
                let s = self.string(name.as_deref().unwrap_or("").as_bytes());
                self.b.strings.push(s);
            }
            (PackedKind::Unsigned | PackedKind::Hex, Value::Unsigned { value, .. })
            | (PackedKind::Unsigned | PackedKind::Hex, Value::Hex { value, .. }) => {
                self.b.values.push(*value)
            }
            (PackedKind::Signed, Value::Signed { value, .. }) => self.b.values.push(*value as u64),
            (PackedKind::Char, Value::Char { value }) => self.b.values.push(u64::from(*value)),
            _ => {
                self.b.unavailable.push(n);
                empty(self.b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::GuestTask;
    use std::collections::HashSet;

    fn entry(probe_id: u64, seq: u64, args: Vec<Value>) -> Event {
        Event {
            probe_id,
            seq,
            vcpu: 1,
            time_ns: 100 + seq,
            ip: 0xffff_ffff_8100_0000,
            kind: EventKind::Entry,
            task: None,
            args,
            action: None,
        }
    }

    fn string(s: &str) -> Value {
        Value::Str {
            bytes: s.as_bytes().to_vec(),
            truncated: false,
        }
    }

    #[test]
    fn slots_columns_and_markers() {
        let mut enc = PackedEncoder::default();
        enc.push(
            &entry(
                7,
                0,
                vec![
                    Value::Signed {
                        bits: 32,
                        value: -2,
                    },
                    string("/etc"),
                    Value::Array {
                        elements: vec![
                            Value::Hex { bits: 8, value: 1 },
                            Value::Fault { addr: 0x99 },
                        ],
                    },
                ],
            ),
            None,
        );
        let mut second = entry(
            7,
            1,
            vec![
                Value::Signed { bits: 32, value: 5 },
                Value::Str {
                    bytes: b"/very/long".to_vec(),
                    truncated: true,
                },
                Value::Fault { addr: 0x42 },
            ],
        );
        second.task = Some(GuestTask {
            pid: 12,
            tgid: 10,
            ppid: 1,
            comm: *b"sh\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            exe: Some(b"/bin/busybox".to_vec().into()),
        });
        enc.push(&second, None);
        assert_eq!(enc.len(), 2);
        assert_eq!(enc.known(), HashSet::from([7]));
        let out = enc.take();
        assert_eq!(out.len(), 2, "one schema, one batch");
        let v1::subscribe_response::Payload::Schema(s) = &out[0] else {
            panic!("schema first: {out:?}")
        };
        assert_eq!(s.fields.len(), 3);
        assert_eq!(s.fields[2].count, 2);
        let v1::subscribe_response::Payload::Packed(b) = &out[1] else {
            panic!("then the batch")
        };
        assert_eq!(b.seq, [0, 1]);
        assert_eq!(b.pid, [-1, 12]);
        assert_eq!(b.comms, ["", "sh"]);
        assert_eq!(b.comm, [0, 1]);
        assert_eq!(
            (&b.tgid[..], &b.ppid[..], &b.exe[..]),
            (&[-1, 10][..], &[-1, 1][..], &[0, 1][..])
        );
        assert_eq!(b.exes, [Vec::new(), b"/bin/busybox".to_vec()]);
        // Slots: ev0 n=0 p=1 xs=2,3; ev1 n=4 p=5 xs=6,7.
        assert_eq!(b.values, [(-2i64) as u64, 1, 0, 5, 0, 0]);
        assert_eq!(b.strings, [Bytes::from("/etc"), Bytes::from("/very/long")]);
        assert_eq!(b.faulted, [3, 6, 7]);
        assert_eq!(b.fault_address, [0x99, 0x42, 0x42]);
        assert_eq!(b.truncated, [5]);
        assert!(b.unavailable.is_empty());
        assert!(b.retval.is_empty());
        // Empty after take; the schema is not sent again.
        assert!(enc.take().is_empty());
        enc.push(
            &entry(7, 2, vec![Value::Signed { bits: 32, value: 1 }]),
            None,
        );
        let out = enc.take();
        assert_eq!(out.len(), 1);
        let v1::subscribe_response::Payload::Packed(b) = &out[0] else {
            panic!()
        };
        // Missing args of a known layout are unavailable, not shifted.
        assert_eq!(b.unavailable, [1, 2, 3]);
        assert_eq!(b.strings.len(), 1);
        assert_eq!(b.values, [1, 0, 0]);
    }
}
