//! Reading `EVENT_ENCODING_PACKED` streams: a [`PackedReader`] keeps the
//! `ProbeSchema`s a stream sent and opens each `PackedEventBatch` as a
//! [`PackedBatch`], whose events can be read in place (no allocation per
//! event or value) or turned into full [`v1::Event`]s.

use std::collections::HashMap;
use std::fmt;

use prost::bytes::Bytes;

use crate::v1::{self, PackedKind};

/// A batch that does not match its schemas or its own columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedError(String);

impl fmt::Display for PackedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed packed batch: {}", self.0)
    }
}

impl std::error::Error for PackedError {}

fn bad(m: impl Into<String>) -> PackedError {
    PackedError(m.into())
}

/// The schemas of one stream.
#[derive(Default, Debug, Clone)]
pub struct PackedReader {
    schemas: HashMap<u64, v1::ProbeSchema>,
}

impl PackedReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a `schema` record (a later one for the same probe replaces it).
    pub fn add_schema(&mut self, s: v1::ProbeSchema) {
        self.schemas.insert(s.probe_id, s);
    }

    pub fn schema(&self, probe_id: u64) -> Option<&v1::ProbeSchema> {
        self.schemas.get(&probe_id)
    }

    /// Checks `batch` against the schemas and its column lengths, and
    /// indexes where each event's values start.
    pub fn open<'a>(
        &'a self,
        batch: &'a v1::PackedEventBatch,
    ) -> Result<PackedBatch<'a>, PackedError> {
        let n = batch.probe_id.len();
        for (name, len) in [
            ("seq", batch.seq.len()),
            ("vcpu", batch.vcpu.len()),
            ("timestamp_ns", batch.timestamp_ns.len()),
            ("pid", batch.pid.len()),
            ("comm", batch.comm.len()),
        ] {
            if len != n {
                return Err(bad(format!("{name} has {len} entries for {n} events")));
            }
        }
        // Added later: empty (an older server) or one entry per event.
        for (name, len) in [
            ("tgid", batch.tgid.len()),
            ("ppid", batch.ppid.len()),
            ("exe", batch.exe.len()),
        ] {
            if len != 0 && len != n {
                return Err(bad(format!("{name} has {len} entries for {n} events")));
            }
        }
        if batch
            .exe
            .iter()
            .any(|e| *e as usize >= batch.exes.len().max(1))
        {
            return Err(bad("an exe index is out of range"));
        }
        if batch.faulted.len() != batch.fault_address.len() {
            return Err(bad("faulted and fault_address differ in length"));
        }
        let mut starts = Vec::with_capacity(n);
        let (mut slot, mut value, mut string, mut ret) = (0u32, 0usize, 0usize, 0usize);
        for (i, id) in batch.probe_id.iter().enumerate() {
            let schema = self
                .schemas
                .get(id)
                .ok_or_else(|| bad(format!("event {i}: probe {id} has no schema")))?;
            if batch.comm[i] as usize >= batch.comms.len() {
                return Err(bad(format!("event {i}: comm index out of range")));
            }
            let is_return = schema.kind == v1::ProbeKind::Kretprobe as i32;
            starts.push(Start {
                slot,
                value,
                string,
                ret: is_return.then_some(ret),
            });
            ret += usize::from(is_return);
            for f in &schema.fields {
                let (v, s) = columns(f.kind);
                slot += f.count;
                value += v * f.count as usize;
                string += s * f.count as usize;
            }
        }
        if value != batch.values.len() || string != batch.strings.len() {
            return Err(bad(format!(
                "the schemas call for {value} values and {string} strings, the batch has {} and {}",
                batch.values.len(),
                batch.strings.len()
            )));
        }
        if [&batch.retval, &batch.return_address, &batch.duration_ns]
            .iter()
            .any(|c| c.len() != ret)
        {
            return Err(bad(format!("return columns do not have {ret} entries")));
        }
        let sorted_below =
            |v: &[u32]| v.windows(2).all(|w| w[0] < w[1]) && v.last().is_none_or(|l| *l < slot);
        if !sorted_below(&batch.faulted)
            || !sorted_below(&batch.truncated)
            || !sorted_below(&batch.unavailable)
        {
            return Err(bad("slot lists must be ascending and within the batch"));
        }
        Ok(PackedBatch {
            reader: self,
            batch,
            starts,
        })
    }
}

/// Entries of `values` and of `strings` one slot of `kind` takes.
fn columns(kind: i32) -> (usize, usize) {
    match PackedKind::try_from(kind) {
        Ok(PackedKind::String) => (0, 1),
        Ok(PackedKind::Symbol) => (1, 1),
        _ => (1, 0),
    }
}

#[derive(Debug, Clone, Copy)]
struct Start {
    slot: u32,
    value: usize,
    string: usize,
    ret: Option<usize>,
}

/// An opened batch.
#[derive(Debug)]
pub struct PackedBatch<'a> {
    reader: &'a PackedReader,
    batch: &'a v1::PackedEventBatch,
    starts: Vec<Start>,
}

impl<'a> PackedBatch<'a> {
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Event `i` (panics if `i >= len()`).
    pub fn event(&self, i: usize) -> PackedEvent<'_> {
        PackedEvent {
            batch: self,
            i,
            schema: &self.reader.schemas[&self.batch.probe_id[i]],
        }
    }

    pub fn events(&self) -> impl Iterator<Item = PackedEvent<'_>> {
        (0..self.len()).map(|i| self.event(i))
    }
}

/// One slot's value, borrowed from the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotValue<'a> {
    Unsigned(u64),
    Signed(i64),
    Hex(u64),
    Char(u8),
    Str {
        bytes: &'a Bytes,
        truncated: bool,
    },
    Symbol {
        address: u64,
        name: &'a Bytes,
    },
    /// The guest read of this address faulted.
    Fault(u64),
    /// Not fetched (e.g. `$comm` without DWARF).
    Unavailable,
}

/// One event of a batch, read in place.
#[derive(Debug)]
pub struct PackedEvent<'a> {
    batch: &'a PackedBatch<'a>,
    i: usize,
    schema: &'a v1::ProbeSchema,
}

impl<'a> PackedEvent<'a> {
    pub fn schema(&self) -> &'a v1::ProbeSchema {
        self.schema
    }
    pub fn probe_id(&self) -> u64 {
        self.batch.batch.probe_id[self.i]
    }
    pub fn seq(&self) -> u64 {
        self.batch.batch.seq[self.i]
    }
    pub fn vcpu(&self) -> u32 {
        self.batch.batch.vcpu[self.i]
    }
    pub fn timestamp_ns(&self) -> u64 {
        self.batch.batch.timestamp_ns[self.i]
    }
    /// The guest task's pid, if known.
    pub fn pid(&self) -> Option<i32> {
        Some(self.batch.batch.pid[self.i]).filter(|p| *p >= 0)
    }
    /// The guest task's name, if known.
    pub fn comm(&self) -> Option<&'a str> {
        let c = self.batch.batch.comm[self.i] as usize;
        (c != 0).then(|| self.batch.batch.comms[c].as_str())
    }
    /// The guest task's process id (tgid), if known.
    pub fn tgid(&self) -> Option<i32> {
        self.batch
            .batch
            .tgid
            .get(self.i)
            .copied()
            .filter(|p| *p >= 0)
    }
    /// The parent's process id, if known.
    pub fn ppid(&self) -> Option<i32> {
        self.batch
            .batch
            .ppid
            .get(self.i)
            .copied()
            .filter(|p| *p >= 0)
    }
    /// The executable path, if it was asked for and known.
    pub fn exe(&self) -> Option<&'a [u8]> {
        let e = *self.batch.batch.exe.get(self.i)? as usize;
        (e != 0).then(|| self.batch.batch.exes[e].as_slice())
    }
    /// `(retval, return_address, duration_ns)` of a return event.
    pub fn ret(&self) -> Option<(u64, u64, u64)> {
        let r = self.batch.starts[self.i].ret?;
        let b = self.batch.batch;
        Some((b.retval[r], b.return_address[r], b.duration_ns[r]))
    }

    /// Index of the field called `name` in the schema.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.schema.fields.iter().position(|f| f.name == name)
    }

    /// Element `element` of field `field` (0 for non-arrays); None past the
    /// field's count.
    pub fn value(&self, field: usize, element: u32) -> Option<SlotValue<'a>> {
        let fields = &self.schema.fields;
        let f = fields.get(field)?;
        if element >= f.count {
            return None;
        }
        let st = self.batch.starts[self.i];
        let (mut slot, mut value, mut string) = (st.slot, st.value, st.string);
        for g in &fields[..field] {
            let (v, s) = columns(g.kind);
            slot += g.count;
            value += v * g.count as usize;
            string += s * g.count as usize;
        }
        let (v, s) = columns(f.kind);
        slot += element;
        value += v * element as usize;
        string += s * element as usize;
        let b = self.batch.batch;
        if let Ok(k) = b.faulted.binary_search(&slot) {
            return Some(SlotValue::Fault(b.fault_address[k]));
        }
        if b.unavailable.binary_search(&slot).is_ok() {
            return Some(SlotValue::Unavailable);
        }
        let raw = b.values.get(value).copied().unwrap_or(0);
        Some(match PackedKind::try_from(f.kind) {
            Ok(PackedKind::Signed) => SlotValue::Signed(raw as i64),
            Ok(PackedKind::Hex) => SlotValue::Hex(raw),
            Ok(PackedKind::Char) => SlotValue::Char(raw as u8),
            Ok(PackedKind::String) if s > 0 => SlotValue::Str {
                bytes: &b.strings[string],
                truncated: b.truncated.binary_search(&slot).is_ok(),
            },
            Ok(PackedKind::Symbol) => SlotValue::Symbol {
                address: raw,
                name: &b.strings[string],
            },
            _ => SlotValue::Unsigned(raw),
        })
    }

    /// The event as a full [`v1::Event`], as `EVENT_ENCODING_FULL` sends
    /// it, except that return events name their caller by address in `text`
    /// (the server symbolizes it; a packed stream does not carry it).
    pub fn to_event(&self) -> v1::Event {
        let s = self.schema;
        let mut entry = Vec::new();
        let mut args = Vec::new();
        for (fi, f) in s.fields.iter().enumerate() {
            let value = if f.count == 1 && !f.r#type.ends_with(']') {
                self.spec_value(fi, 0)
            } else {
                probe_spec::Value::Array {
                    elements: (0..f.count).map(|e| self.spec_value(fi, e)).collect(),
                }
            };
            let a = probe_spec::ArgValue {
                name: f.name.as_str().into(),
                ty: f.r#type.as_str().into(),
                value,
            };
            if f.at_entry {
                entry.push(a);
            } else {
                args.push(a);
            }
        }
        let ret = self
            .ret()
            .map(|(retval, return_address, duration_ns)| v1::ReturnInfo {
                retval,
                return_address,
                entry_timestamp_ns: self.timestamp_ns().saturating_sub(duration_ns),
                duration_ns,
                entry_args: entry.iter().map(v1::FetchedArg::from).collect(),
            });
        let ip_text = match &ret {
            Some(r) => {
                let callee = s.ip_text.split('+').next().unwrap_or_default();
                format!("0x{:x} <- {callee}", r.return_address)
            }
            None => s.ip_text.clone(),
        };
        let all: Vec<probe_spec::ArgValue> = entry.iter().chain(&args).cloned().collect();
        v1::Event {
            probe_id: self.probe_id(),
            group: s.group.clone(),
            event: s.event.clone(),
            kind: s.kind,
            seq: self.seq(),
            vcpu: self.vcpu(),
            timestamp_ns: self.timestamp_ns(),
            ip: s.ip,
            pid: self.pid(),
            comm: self.comm().map(str::to_string),
            tgid: self.tgid(),
            ppid: self.ppid(),
            exe: self.exe().map(<[u8]>::to_vec),
            args: args.iter().map(v1::FetchedArg::from).collect(),
            ret,
            text: probe_spec::format_event_line(&s.event, &ip_text, &all),
            policy: s.policy.clone(),
            tags: s.tags.clone(),
            action: None,
        }
    }

    fn spec_value(&self, field: usize, element: u32) -> probe_spec::Value {
        use probe_spec::Value as V;
        let bits = self.schema.fields[field].bits as u8;
        match self.value(field, element) {
            Some(SlotValue::Unsigned(value)) => V::Unsigned { bits, value },
            Some(SlotValue::Signed(value)) => V::Signed { bits, value },
            Some(SlotValue::Hex(value)) => V::Hex { bits, value },
            Some(SlotValue::Char(value)) => V::Char { value },
            Some(SlotValue::Str { bytes, truncated }) => V::Str {
                bytes: bytes.to_vec(),
                truncated,
            },
            Some(SlotValue::Symbol { address, name }) => V::Symbol {
                addr: address,
                name: (!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned()),
            },
            Some(SlotValue::Fault(addr)) => V::Fault { addr },
            Some(SlotValue::Unavailable) | None => V::Unavailable {
                reason: String::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, ty: &str, kind: PackedKind, count: u32, bits: u32) -> v1::FieldSchema {
        v1::FieldSchema {
            name: name.into(),
            r#type: ty.into(),
            kind: kind as i32,
            count,
            bits,
            at_entry: false,
        }
    }

    fn reader() -> PackedReader {
        let mut r = PackedReader::new();
        r.add_schema(v1::ProbeSchema {
            probe_id: 1,
            event: "open".into(),
            kind: v1::ProbeKind::Kprobe as i32,
            ip_text: "do_sys_openat2+0x0/0x100".into(),
            fields: vec![
                field("dfd", "s32", PackedKind::Signed, 1, 32),
                field("path", "string", PackedKind::String, 1, 0),
                field("b", "x8[2]", PackedKind::Hex, 2, 8),
                field("s", "symbol", PackedKind::Symbol, 1, 64),
            ],
            ..Default::default()
        });
        r
    }

    fn batch() -> v1::PackedEventBatch {
        // Two events; slots: ev0 0..=4, ev1 5..=9.
        v1::PackedEventBatch {
            probe_id: vec![1, 1],
            seq: vec![10, 11],
            vcpu: vec![0, 1],
            timestamp_ns: vec![5, 6],
            pid: vec![-1, 42],
            comm: vec![0, 1],
            comms: vec![String::new(), "cat".into()],
            values: vec![(-100i64) as u64, 0xa, 0xb, 0x1234, 3, 0, 0, 0x99],
            strings: vec![
                Bytes::from("/etc/x"),
                Bytes::from("f+0x4/0x10"),
                Bytes::from("/tm"),
                Bytes::new(),
            ],
            faulted: vec![7, 8],
            fault_address: vec![0x70, 0x80],
            truncated: vec![6],
            ..Default::default()
        }
    }

    #[test]
    fn process_columns_are_optional_but_checked() {
        let r = reader();
        let mut b = batch();
        b.tgid = vec![-1, 40];
        b.ppid = vec![-1, 1];
        b.exe = vec![0, 1];
        b.exes = vec![Vec::new(), b"/bin/cat".to_vec()];
        let pb = r.open(&b).unwrap();
        let e1 = pb.event(1);
        assert_eq!(
            (e1.tgid(), e1.ppid(), e1.exe()),
            (Some(40), Some(1), Some(&b"/bin/cat"[..]))
        );
        let full = e1.to_event();
        assert_eq!((full.tgid, full.ppid), (Some(40), Some(1)));
        assert_eq!(full.exe.as_deref(), Some(&b"/bin/cat"[..]));
        assert_eq!(pb.event(0).to_event().exe, None);
        b.exe = vec![0, 2];
        assert!(r.open(&b).is_err(), "exe index past exes");
        b.exe = vec![0];
        assert!(r.open(&b).is_err(), "one exe entry for two events");
    }

    #[test]
    fn reads_values_in_place_and_as_full_events() {
        let r = reader();
        let b = batch();
        let pb = r.open(&b).unwrap();
        assert_eq!(pb.len(), 2);
        let e0 = pb.event(0);
        assert_eq!((e0.seq(), e0.pid(), e0.comm()), (10, None, None));
        assert_eq!(e0.value(0, 0), Some(SlotValue::Signed(-100)));
        assert_eq!(e0.value(2, 1), Some(SlotValue::Hex(0xb)));
        assert_eq!(e0.value(2, 2), None);
        assert_eq!(
            e0.value(3, 0),
            Some(SlotValue::Symbol {
                address: 0x1234,
                name: &Bytes::from("f+0x4/0x10")
            })
        );
        let e1 = pb.event(1);
        assert_eq!((e1.pid(), e1.comm()), (Some(42), Some("cat")));
        // A batch from a server without the process columns: unknown.
        assert_eq!((e1.tgid(), e1.ppid(), e1.exe()), (None, None, None));
        assert_eq!(
            e1.value(1, 0),
            Some(SlotValue::Str {
                bytes: &Bytes::from("/tm"),
                truncated: true
            })
        );
        assert_eq!(e1.value(2, 0), Some(SlotValue::Fault(0x70)));
        assert_eq!(e1.value(2, 1), Some(SlotValue::Fault(0x80)));
        assert_eq!(
            e1.value(3, 0),
            Some(SlotValue::Symbol {
                address: 0x99,
                name: &Bytes::new()
            })
        );
        let full = e0.to_event();
        assert_eq!(
            full.text,
            "open: (do_sys_openat2+0x0/0x100) dfd=-100 path=\"/etc/x\" b={0xa,0xb} s=f+0x4/0x10"
        );
        assert_eq!(
            pb.event(1).to_event().text,
            "open: (do_sys_openat2+0x0/0x100) dfd=3 path=\"/tm\" b={(fault),(fault)} s=0x99"
        );
    }

    #[test]
    fn refuses_batches_that_do_not_match() {
        let r = reader();
        let mut b = batch();
        b.values.pop();
        assert!(r.open(&b).unwrap_err().to_string().contains("8 values"));
        let mut b = batch();
        b.probe_id[1] = 9;
        assert!(r
            .open(&b)
            .unwrap_err()
            .to_string()
            .contains("probe 9 has no schema"));
        let mut b = batch();
        b.seq.pop();
        assert!(r.open(&b).is_err());
        let mut b = batch();
        b.faulted = vec![8, 7];
        assert!(r.open(&b).is_err());
        let mut b = batch();
        b.comm[0] = 5;
        assert!(r.open(&b).is_err());
    }
}
