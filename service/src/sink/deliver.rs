//! The delivery engine of a sink: batches of records POSTed with retries
//! and backoff, answers classified per protocol, and the in-band `lost`
//! records owed for what was dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use proto::v1::{self, export_record::Record, subscribe_response::Payload};
use tokio_stream::StreamExt;

use super::config::{SinkConfig, SinkKind};
use super::stats::{DropReason, SinkStats};
use super::{otlp, webhook};
use crate::export::record::{envelope, Owed};
use crate::export::rfc3339;
use crate::time::now_ns;

/// How long the deliverer waits for the stream before looking at its flags
/// (the stream flushes a batch at least every 20 ms).
const IDLE: Duration = Duration::from_millis(100);

/// Most of a receiver's answer read (an OTLP partial success is small).
const MAX_ANSWER: usize = 1 << 20;

/// What a record in a batch stands for.
#[derive(Clone, Copy, Debug)]
enum What {
    Event(u64),
    Lost(DropReason, Owed),
}

/// The result of one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged; the receiver refused this many records of it (OTLP
    /// partial success).
    Ok { refused: u64 },
    /// Worth another attempt (after at least this long, if said).
    Retry(String, Option<Duration>),
    /// Refused for good.
    Rejected(String),
}

/// Classifies an answer: the webhook retries 408, 429 and 5xx; OTLP/HTTP
/// retries 429, 502, 503 and 504, as its specification says.
fn classify(
    kind: SinkKind,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Outcome {
    if status.is_success() {
        let refused = match kind {
            SinkKind::Webhook => 0,
            SinkKind::Otlp => otlp::refused(body),
        };
        return Outcome::Ok { refused };
    }
    let retry = match kind {
        SinkKind::Webhook => {
            status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
        }
        SinkKind::Otlp => matches!(status.as_u16(), 429 | 502 | 503 | 504),
    };
    let why = format!("HTTP {status}");
    if retry {
        Outcome::Retry(why, retry_after)
    } else {
        Outcome::Rejected(why)
    }
}

pub(super) struct Deliverer {
    cfg: SinkConfig,
    stats: Arc<SinkStats>,
    stop: Arc<AtomicBool>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Number of the last record sent (retries repeat a batch's numbers).
    record_seq: u64,
    owed: [Owed; 4],
    /// Set when the stop is seen: delivery ends then.
    deadline: Option<Instant>,
    warned: bool,
}

impl Deliverer {
    pub(super) fn new(
        cfg: SinkConfig,
        stats: Arc<SinkStats>,
        stop: Arc<AtomicBool>,
        rt: &tokio::runtime::Runtime,
    ) -> Self {
        let _enter = rt.enter();
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(conn);
        Deliverer {
            cfg,
            stats,
            stop,
            client,
            record_seq: 0,
            owed: [Owed::default(); 4],
            deadline: None,
            warned: false,
        }
    }

    fn stopping(&mut self) -> bool {
        if self.deadline.is_none() && self.stop.load(Ordering::SeqCst) {
            self.deadline = Some(Instant::now() + self.cfg.drain);
        }
        self.deadline.is_some()
    }

    fn out_of_time(&mut self) -> bool {
        self.stopping();
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub(super) async fn run<S>(&mut self, stream: S)
    where
        S: tokio_stream::Stream<Item = Result<v1::SubscribeResponse, tonic::Status>>,
    {
        tokio::pin!(stream);
        loop {
            let next = tokio::time::timeout(IDLE, stream.next()).await;
            match next {
                Ok(Some(Ok(msg))) => self.message(msg).await,
                Ok(Some(Err(s))) => {
                    tracing::warn!(
                        "{} sink: the event stream failed: {}",
                        self.cfg.kind.name(),
                        s.message()
                    );
                    break;
                }
                Ok(None) => break,
                Err(_) if self.stopping() => break,
                Err(_) => self.send_owed().await,
            }
        }
        self.send_owed().await;
    }

    async fn message(&mut self, msg: v1::SubscribeResponse) {
        match msg.payload {
            Some(Payload::Events(b)) => {
                let mut batch = self.take_owed();
                for ev in b.events {
                    let ts = ev.timestamp_ns;
                    let process = Some(v1::GuestProcess {
                        pid: ev.pid,
                        comm: ev.comm.clone(),
                    });
                    batch.push((
                        envelope(&self.cfg.vm, rfc3339(ts), process, Record::Event(ev)),
                        What::Event(ts),
                    ));
                }
                self.deliver(batch).await;
            }
            Some(Payload::Lost(l)) => {
                self.stats.dropped[DropReason::QueueFull as usize]
                    .fetch_add(l.count, Ordering::Relaxed);
                self.owed[DropReason::QueueFull as usize].add(l.count, l.since_ns, l.until_ns);
            }
            _ => {}
        }
    }

    /// Lost records owed, sent on their own when the stream is idle.
    async fn send_owed(&mut self) {
        let batch = self.take_owed();
        if !batch.is_empty() {
            self.deliver(batch).await;
        }
    }

    fn take_owed(&mut self) -> Vec<(v1::ExportRecord, What)> {
        let mut out = Vec::new();
        for reason in DropReason::ALL {
            if reason == DropReason::Shutdown {
                continue; // nothing is sent after it
            }
            let o = std::mem::take(&mut self.owed[reason as usize]);
            if o.count == 0 {
                continue;
            }
            out.push((
                envelope(
                    &self.cfg.vm,
                    rfc3339(o.until_ns),
                    None,
                    o.lost(reason.lost_reason()),
                ),
                What::Lost(reason, o),
            ));
        }
        out
    }

    /// Events of a batch that is given up are dropped for `reason`; its lost
    /// records are owed again (already counted).
    fn give_up(&mut self, batch: &[(v1::ExportRecord, What)], reason: DropReason) {
        for (_, what) in batch {
            match *what {
                What::Event(ts) => {
                    self.stats.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
                    self.owed[reason as usize].add(1, ts, ts);
                }
                What::Lost(r, o) => self.owed[r as usize].add(o.count, o.since_ns, o.until_ns),
            }
        }
    }

    fn warn(&mut self, what: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!("{} sink {}: {what}", self.cfg.kind.name(), self.cfg.uri);
        }
    }

    async fn deliver(&mut self, mut batch: Vec<(v1::ExportRecord, What)>) {
        if batch.is_empty() {
            return;
        }
        if self.out_of_time() {
            let events = batch
                .iter()
                .filter(|(_, w)| matches!(w, What::Event(_)))
                .count();
            self.stats.dropped[DropReason::Shutdown as usize]
                .fetch_add(events as u64, Ordering::Relaxed);
            return;
        }
        for (rec, _) in &mut batch {
            self.record_seq += 1;
            rec.record_seq = self.record_seq;
        }
        let records: Vec<&v1::ExportRecord> = batch.iter().map(|(r, _)| r).collect();
        let (body, ctype) = match self.cfg.kind {
            SinkKind::Webhook => webhook::encode(&records, self.cfg.format),
            SinkKind::Otlp => otlp::encode(&records, &self.cfg.vm),
        };
        let key = format!("{}-{}", self.cfg.vm.instance, batch[0].0.record_seq);
        let mut pause = self.cfg.backoff;
        let mut attempt = 1;
        loop {
            let outcome = self.post(body.clone(), ctype, &key).await;
            match outcome {
                Outcome::Ok { refused } => {
                    let events = batch
                        .iter()
                        .filter(|(_, w)| matches!(w, What::Event(_)))
                        .count() as u64;
                    let refused = refused.min(events);
                    let s = self.stats.clone();
                    s.delivered.fetch_add(events - refused, Ordering::Relaxed);
                    s.lost_records
                        .fetch_add(batch.len() as u64 - events, Ordering::Relaxed);
                    s.batches.fetch_add(1, Ordering::Relaxed);
                    s.last_success_ns.store(now_ns(), Ordering::Relaxed);
                    if refused > 0 {
                        self.warn(&format!("the receiver refused {refused} records"));
                        s.dropped[DropReason::Rejected as usize]
                            .fetch_add(refused, Ordering::Relaxed);
                        let (a, b) = ts_range(&batch);
                        self.owed[DropReason::Rejected as usize].add(refused, a, b);
                    }
                    self.warned = false;
                    return;
                }
                Outcome::Rejected(why) => {
                    self.warn(&format!("batch refused ({why}), dropped"));
                    self.give_up(&batch, DropReason::Rejected);
                    return;
                }
                Outcome::Retry(why, after) => {
                    if attempt >= self.cfg.max_attempts {
                        self.warn(&format!("{why}; batch dropped after {attempt} attempts"));
                        self.give_up(&batch, DropReason::RetriesExhausted);
                        return;
                    }
                    let mut wait = after.unwrap_or(pause).min(self.cfg.backoff_max).max(pause);
                    if self.out_of_time() {
                        self.give_up(&batch, DropReason::Shutdown);
                        return;
                    }
                    if let Some(d) = self.deadline {
                        wait = wait.min(d.saturating_duration_since(Instant::now()));
                    }
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(self.cfg.backoff_max);
                    attempt += 1;
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// One attempt, bounded by the timeout.
    async fn post(&self, body: Bytes, ctype: &'static str, key: &str) -> Outcome {
        let req = Request::post(self.cfg.uri.clone())
            .header(header::CONTENT_TYPE, ctype)
            .header(
                header::USER_AGENT,
                concat!("hvprobe/", env!("CARGO_PKG_VERSION")),
            )
            .header("idempotency-key", key)
            .body(Full::new(body));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Rejected(format!("building the request: {e}")),
        };
        let kind = self.cfg.kind;
        let attempt = async {
            let resp = self.client.request(req).await.map_err(|e| {
                // The connector's error says why (refused, reset...).
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            })?;
            let status = resp.status();
            let after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>(classify(kind, status, after, &body))
        };
        match tokio::time::timeout(self.cfg.timeout, attempt).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => Outcome::Retry(e, None),
            Err(_) => Outcome::Retry(format!("no answer within {:?}", self.cfg.timeout), None),
        }
    }
}

fn ts_range(batch: &[(v1::ExportRecord, What)]) -> (u64, u64) {
    let ts = batch.iter().filter_map(|(_, w)| match w {
        What::Event(t) => Some(*t),
        What::Lost(..) => None,
    });
    let (lo, hi) = ts.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    (if lo == u64::MAX { 0 } else { lo }, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_retried_or_refused_as_each_protocol_says() {
        let c = |k, code: u16| classify(k, StatusCode::from_u16(code).unwrap(), None, b"");
        assert_eq!(c(SinkKind::Webhook, 204), Outcome::Ok { refused: 0 });
        for code in [408, 429, 500, 502, 503] {
            assert!(
                matches!(c(SinkKind::Webhook, code), Outcome::Retry(..)),
                "{code}"
            );
        }
        for code in [400, 401, 404, 413] {
            assert!(
                matches!(c(SinkKind::Webhook, code), Outcome::Rejected(..)),
                "{code}"
            );
        }
        for code in [429, 502, 503, 504] {
            assert!(
                matches!(c(SinkKind::Otlp, code), Outcome::Retry(..)),
                "{code}"
            );
        }
        for code in [400, 500, 501] {
            assert!(
                matches!(c(SinkKind::Otlp, code), Outcome::Rejected(..)),
                "{code}"
            );
        }
    }

    #[test]
    fn a_batch_that_cannot_be_delivered_is_counted_and_owed_in_band() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // closed when dropped: connections are refused
        let mut cfg = SinkConfig::new(
            SinkKind::Webhook,
            &format!("http://127.0.0.1:{port}/"),
            Default::default(),
        )
        .unwrap();
        cfg.max_attempts = 3;
        cfg.backoff = Duration::from_millis(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stats = Arc::new(SinkStats::default());
        let mut d = Deliverer::new(cfg, stats.clone(), Arc::new(AtomicBool::new(false)), &rt);
        d.owed[DropReason::QueueFull as usize].add(4, 5, 6);
        let mut batch = d.take_owed();
        for ts in [10, 11, 12] {
            batch.push((
                envelope(
                    &d.cfg.vm,
                    String::new(),
                    None,
                    Record::Event(v1::Event::default()),
                ),
                What::Event(ts),
            ));
        }
        rt.block_on(d.deliver(batch));
        assert_eq!(stats.dropped(DropReason::RetriesExhausted), 3);
        assert_eq!(stats.retries.load(Ordering::Relaxed), 2);
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 0);
        // Owed again: the queue-full record (not counted twice) and the 3.
        let owed = d.take_owed();
        let lost: Vec<(i32, u64, u64, u64)> = owed
            .iter()
            .map(|(r, _)| match r.record.as_ref() {
                Some(Record::Lost(l)) => (l.reason, l.count, l.since_ns, l.until_ns),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            lost,
            [
                (v1::LostReason::SubscriberQueueFull as i32, 4, 5, 6),
                (v1::LostReason::SinkRetriesExhausted as i32, 3, 10, 12)
            ]
        );
        // After the stop and the drain time: dropped as shutdown, not sent.
        d.stop.store(true, Ordering::SeqCst);
        d.cfg.drain = Duration::ZERO;
        rt.block_on(d.deliver(owed));
        let ev = vec![(
            envelope(
                &d.cfg.vm,
                String::new(),
                None,
                Record::Event(v1::Event::default()),
            ),
            What::Event(1),
        )];
        rt.block_on(d.deliver(ev));
        assert_eq!(stats.dropped(DropReason::Shutdown), 1);
        assert_eq!(stats.dropped_total(), 4);
    }
}
