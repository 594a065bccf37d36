//! Stream messages to export records and lines: each event a line, each
//! loss a `lost` record, and what could not be written (a failing disk)
//! owed and reported in band once a write works again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::v1::{self, export_record::Record, subscribe_response::Payload};

use super::record::{envelope, Owed};
use super::rotate::Rotator;
use crate::time::{now_ns, rfc3339};

/// Counters of the exporter, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Event records written.
    pub events: AtomicU64,
    /// Lost records written.
    pub lost_records: AtomicU64,
    /// Events lost because the exporter's queue was full.
    pub lost_queue_full: AtomicU64,
    /// Events lost because writing them failed.
    pub lost_write_failed: AtomicU64,
    /// Bytes written (whole lines only).
    pub bytes: AtomicU64,
    /// Host CLOCK_REALTIME (ns) of the last successful write, 0: none yet.
    pub last_write_ns: AtomicU64,
    /// Rotations done.
    pub rotations: AtomicU64,
    /// Failed writes (each loses one batch).
    pub write_errors: AtomicU64,
    /// Failed rotations (the file goes on growing).
    pub rotate_errors: AtomicU64,
    /// Rotated files left uncompressed because gzip failed.
    pub gzip_errors: AtomicU64,
}

const REASONS: [v1::LostReason; 3] = [
    v1::LostReason::SubscriberQueueFull,
    v1::LostReason::ExportWriteFailed,
    v1::LostReason::ProbeNotYetNamed,
];

pub(super) struct Writer {
    rotator: Rotator,
    stats: Arc<ExportStats>,
    vm: v1::VmIdentity,
    record_seq: u64,
    /// By `REASONS` index.
    unreported: [Owed; 3],
}

/// A line waiting to be written: its bytes and what it stands for.
enum Line {
    Event(u64),
    Lost(usize, Owed),
}

impl Writer {
    pub(super) fn new(rotator: Rotator, stats: Arc<ExportStats>, vm: v1::VmIdentity) -> Self {
        Writer {
            rotator,
            stats,
            vm,
            record_seq: 0,
            unreported: Default::default(),
        }
    }

    /// Writes what one stream message stands for.
    pub(super) fn message(&mut self, msg: v1::SubscribeResponse) {
        match msg.payload {
            Some(Payload::Events(b)) => {
                let mut lines = self.take_unreported();
                for ev in b.events {
                    let time = rfc3339(ev.timestamp_ns);
                    let process = Some(v1::GuestProcess {
                        pid: ev.pid,
                        comm: ev.comm.clone(),
                    });
                    let ts = ev.timestamp_ns;
                    lines.push((
                        envelope(&self.vm, time, process, Record::Event(ev)),
                        Line::Event(ts),
                    ));
                }
                self.write(lines);
            }
            Some(Payload::Lost(l)) => {
                // The stream's own reasons: its queue was full, or a probe
                // was not named yet.
                let i = if l.reason == v1::LostReason::ProbeNotYetNamed as i32 {
                    2
                } else {
                    self.stats
                        .lost_queue_full
                        .fetch_add(l.count, Ordering::Relaxed);
                    0
                };
                self.unreported[i].add(l.count, l.since_ns, l.until_ns);
                self.retry_unreported();
            }
            _ => {}
        }
    }

    /// Write the lost records still owed, if any.
    pub(super) fn retry_unreported(&mut self) {
        let lines = self.take_unreported();
        if !lines.is_empty() {
            self.write(lines);
        }
    }

    fn take_unreported(&mut self) -> Vec<(v1::ExportRecord, Line)> {
        let mut lines = Vec::new();
        for (i, reason) in REASONS.iter().enumerate() {
            let u = std::mem::take(&mut self.unreported[i]);
            if u.count == 0 {
                continue;
            }
            let line = envelope(&self.vm, rfc3339(u.until_ns), None, u.lost(*reason));
            lines.push((line, Line::Lost(i, u)));
        }
        lines
    }

    /// The record as a line, with the next record number.
    fn line(&self, rec: &mut v1::ExportRecord, written: u64) -> String {
        rec.record_seq = self.record_seq + written + 1;
        let mut s = serde_json::to_string(&*rec).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Write the lines; on failure count them lost (events) or owe them
    /// again (lost records).
    /// Record numbers are taken only by lines that were written.
    fn write(&mut self, lines: Vec<(v1::ExportRecord, Line)>) {
        let mut chunk: Vec<u8> = Vec::new();
        let mut meaning: Vec<Line> = Vec::new();
        for (mut rec, what) in lines {
            let mut text = self.line(&mut rec, meaning.len() as u64);
            if self
                .rotator
                .needs_rotation(chunk.len() as u64, text.len() as u64)
            {
                self.flush(&mut chunk, &mut meaning);
                self.rotate();
                text = self.line(&mut rec, 0);
            }
            chunk.extend_from_slice(text.as_bytes());
            meaning.push(what);
        }
        self.flush(&mut chunk, &mut meaning);
    }

    fn rotate(&mut self) {
        match self.rotator.rotate() {
            Ok(gz_ok) => {
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                if !gz_ok {
                    self.stats.gzip_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                self.stats.rotate_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("export: rotating {}: {e}", self.rotator.path.display());
            }
        }
    }

    fn flush(&mut self, chunk: &mut Vec<u8>, meaning: &mut Vec<Line>) {
        if chunk.is_empty() {
            return;
        }
        let s = &self.stats;
        match self.rotator.append(chunk) {
            Ok(()) => {
                self.record_seq += meaning.len() as u64;
                let events = meaning
                    .iter()
                    .filter(|m| matches!(m, Line::Event(_)))
                    .count();
                s.events.fetch_add(events as u64, Ordering::Relaxed);
                s.lost_records
                    .fetch_add((meaning.len() - events) as u64, Ordering::Relaxed);
                s.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                s.last_write_ns.store(now_ns(), Ordering::Relaxed);
            }
            Err(e) => {
                if s.write_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("export: writing {}: {e}", self.rotator.path.display());
                }
                for m in meaning.iter() {
                    match *m {
                        Line::Event(ts) => {
                            s.lost_write_failed.fetch_add(1, Ordering::Relaxed);
                            self.unreported[1].add(1, ts, ts);
                        }
                        Line::Lost(i, u) => self.unreported[i].add(u.count, u.since_ns, u.until_ns),
                    }
                }
            }
        }
        chunk.clear();
        meaning.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::config::ExportConfig;
    use crate::export::record::EXPORT_VERSION;
    use crate::export::rotate::create_private;
    use crate::export::rotate::tests::{cfg, read};
    use std::fs::File;
    use std::path::PathBuf;

    fn writer(c: &ExportConfig, stats: &Arc<ExportStats>) -> Writer {
        Writer {
            rotator: Rotator::open(c).unwrap(),
            stats: stats.clone(),
            vm: v1::VmIdentity {
                host: "h".into(),
                name: "vm".into(),
                instance: "i".into(),
            },
            record_seq: 0,
            unreported: Default::default(),
        }
    }

    #[test]
    fn writer_rotates_inside_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1000, 100, true);
        let stats = Arc::new(ExportStats::default());
        let mut w = writer(&c, &stats);
        let events = (0..40)
            .map(|seq| v1::Event {
                seq,
                ..Default::default()
            })
            .collect();
        w.message(v1::SubscribeResponse {
            payload: Some(Payload::Events(v1::EventBatch { events })),
        });
        let rotations = stats.rotations.load(Ordering::Relaxed);
        assert!(rotations >= 3, "{rotations}");
        let mut seqs = Vec::new();
        let mut files: Vec<PathBuf> = (1..=rotations)
            .rev()
            .map(|i| w.rotator.backup(u32::try_from(i).unwrap(), true))
            .collect();
        files.push(c.path.clone());
        for f in files {
            let text = read(&f);
            assert!(text.len() <= 1000, "{}: {} bytes", f.display(), text.len());
            for l in text.lines() {
                let r: v1::ExportRecord = serde_json::from_str(l).unwrap();
                seqs.push(r.record_seq);
            }
        }
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn writer_counts_every_event_and_owes_lost_records() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20, 1, false);
        let stats = Arc::new(ExportStats::default());
        let mut w = writer(&c, &stats);
        let batch = |seqs: std::ops::Range<u64>| v1::SubscribeResponse {
            payload: Some(Payload::Events(v1::EventBatch {
                events: seqs
                    .map(|seq| v1::Event {
                        seq,
                        timestamp_ns: 1_000_000_000 + seq,
                        pid: Some(7),
                        ..Default::default()
                    })
                    .collect(),
            })),
        };
        w.message(batch(0..3));
        w.message(v1::SubscribeResponse {
            payload: Some(Payload::Lost(v1::LostEvents {
                count: 5,
                since_ns: 1,
                until_ns: 2,
                ..Default::default()
            })),
        });
        // Writes fail: a read-only file. The batch is lost and owed.
        w.rotator.file = Some(File::open(&c.path).unwrap());
        w.message(batch(3..5));
        assert_eq!(stats.lost_write_failed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.write_errors.load(Ordering::Relaxed), 1);
        // Writable again: the owed record comes first.
        w.rotator.file = Some(create_private(&c.path, true).unwrap());
        w.message(batch(5..6));
        let text = read(&c.path);
        let recs: Vec<v1::ExportRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let mut events = Vec::new();
        let mut lost = Vec::new();
        for r in &recs {
            assert_eq!(r.version, EXPORT_VERSION);
            assert_eq!(r.vm.as_ref().unwrap().name, "vm");
            match r.record.as_ref().unwrap() {
                Record::Event(e) => {
                    assert_eq!(r.process.as_ref().unwrap().pid, Some(7));
                    assert_eq!(r.time, rfc3339(e.timestamp_ns));
                    events.push(e.seq);
                }
                Record::Lost(l) => lost.push((l.reason, l.count)),
            }
        }
        assert_eq!(events, [0, 1, 2, 5]);
        assert_eq!(
            lost,
            [
                (v1::LostReason::SubscriberQueueFull as i32, 5),
                (v1::LostReason::ExportWriteFailed as i32, 2)
            ]
        );
        // Record numbers: every record written, in order, no gap (failed
        // lines take none).
        let seqs: Vec<u64> = recs.iter().map(|r| r.record_seq).collect();
        assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
        assert_eq!(stats.events.load(Ordering::Relaxed), 4);
        assert_eq!(stats.lost_records.load(Ordering::Relaxed), 2);
        assert_eq!(stats.bytes.load(Ordering::Relaxed), text.len() as u64);
    }
}
