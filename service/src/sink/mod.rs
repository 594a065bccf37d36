//! Push sinks of `hvprobe run`: `--webhook-url` (batches of
//! [`v1::ExportRecord`] in the proto3 JSON mapping, POSTed) and
//! `--otlp-endpoint` (OTLP/HTTP logs, protobuf bodies, one LogRecord an
//! event).
//!
//! Each sink is one more subscriber of the engine, like the exporter, with
//! its own bounded queue (the subscription's, `queue_capacity` events) and
//! its own thread running a single-threaded tokio runtime for its HTTP
//! client: a dead, slow or failing receiver backs the sink's queue up, and
//! what does not fit is dropped there and counted; the vCPUs, the gRPC
//! subscribers and the other sinks never wait for it.
//!
//! Delivery is at least once: a batch is retried with exponential backoff
//! (`backoff` doubled each time up to `backoff_max`, `Retry-After` honoured
//! within that cap) for at most `max_attempts` attempts, each bounded by
//! `timeout`. Every event is either acknowledged by the receiver (2xx) or
//! counted as dropped, by reason: the queue was full, the attempts ran out,
//! the receiver refused it (4xx other than 408/429; OTLP partial success),
//! or hvprobe stopped before it could be delivered. All but the last are
//! also reported in band: a `lost` record (webhook) or a `hvprobe.lost`
//! LogRecord (OTLP) goes out at the head of the next batch delivered.
//!
//! The spool is the subscription queue plus the one batch in flight: at
//! most `queue_capacity + batch_events` events (and the two messages the
//! stream's pump holds) per sink; nothing else is buffered.

pub mod otlp;
pub mod webhook;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use proto::v1::{self, export_record::Record, subscribe_response::Payload};
use tokio_stream::StreamExt;

use crate::export::{rfc3339, EXPORT_VERSION};
use crate::subscribe::{self, QueuedTotal, Streams};

/// Which sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    Webhook,
    Otlp,
}

impl SinkKind {
    /// Its name in metrics, logs and flags.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Otlp => "otlp",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            SinkKind::Webhook => "--webhook-url",
            SinkKind::Otlp => "--otlp-endpoint",
        }
    }
}

/// The webhook's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookFormat {
    /// One JSON array of records (`application/json`).
    JsonArray,
    /// One record a line (`application/x-ndjson`).
    JsonLines,
}

/// Where and how a sink delivers.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub kind: SinkKind,
    /// The URL POSTed to (for OTLP: the endpoint with `/v1/logs`).
    pub uri: Uri,
    /// Webhook only.
    pub format: WebhookFormat,
    /// Events at most in one request.
    pub batch_events: u32,
    /// The sink's queue in events.
    pub queue_capacity: u32,
    /// Bound of one attempt (connect, send, answer).
    pub timeout: Duration,
    /// Attempts at most for one batch (1: no retry).
    pub max_attempts: u32,
    /// Pause before the first retry; doubled each time up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// After the stop: time left to deliver what is queued; what is not
    /// delivered then is dropped (reason shutdown).
    pub drain: Duration,
    /// Identity written into every record.
    pub vm: v1::VmIdentity,
}

impl SinkConfig {
    /// Defaults for `url` (checked by [`parse_url`]): batches of 500
    /// events, a 16384-event queue, 5 s a try, 5 tries, 200 ms .. 5 s
    /// backoff, 5 s to drain at the stop.
    pub fn new(kind: SinkKind, url: &str, vm: v1::VmIdentity) -> Result<Self, String> {
        Ok(SinkConfig {
            kind,
            uri: parse_url(kind, url)?,
            format: WebhookFormat::JsonArray,
            batch_events: 500,
            queue_capacity: 16384,
            timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            drain: Duration::from_secs(5),
            vm,
        })
    }
}

/// Checks a sink's URL: `http://` to a loopback address (`localhost`,
/// 127.0.0.0/8, `[::1]`) only, no TLS yet. For OTLP the URL is the
/// endpoint (as `OTEL_EXPORTER_OTLP_ENDPOINT`): `/v1/logs` is appended to
/// its path, and the port defaults to 4318.
pub fn parse_url(kind: SinkKind, url: &str) -> Result<Uri, String> {
    let flag = kind.flag();
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{flag} {url}: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{flag} {url}: https is not supported yet: use http:// to a loopback address (e.g. a local collector that forwards with TLS)"
            ))
        }
        _ => {
            return Err(format!(
                "{flag} {url}: only http://HOST:PORT/PATH URLs to a loopback address are supported"
            ))
        }
    }
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{flag} {url}: no host"))?;
    if auth.as_str().contains('@') {
        return Err(format!(
            "{flag} {url}: credentials in the URL are not supported"
        ));
    }
    let host = auth.host();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !loopback {
        return Err(format!(
            "{flag} {url}: {host} is not a loopback address: only localhost, 127.0.0.0/8 and [::1] are supported (plain http, no TLS)"
        ));
    }
    let port = match (auth.port_u16(), kind) {
        (Some(p), _) => p,
        (None, SinkKind::Webhook) => 80,
        (None, SinkKind::Otlp) => 4318,
    };
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let path = match kind {
        SinkKind::Webhook => uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
        SinkKind::Otlp => {
            if uri.query().is_some() {
                return Err(format!("{flag} {url}: a query is not supported"));
            }
            format!("{}/v1/logs", uri.path().trim_end_matches('/'))
        }
    };
    format!("http://{host}:{port}{path}")
        .parse()
        .map_err(|e| format!("{flag} {url}: not a URL ({e})"))
}

/// Why events were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    QueueFull = 0,
    RetriesExhausted = 1,
    Rejected = 2,
    Shutdown = 3,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::QueueFull,
        DropReason::RetriesExhausted,
        DropReason::Rejected,
        DropReason::Shutdown,
    ];

    /// Its `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::RetriesExhausted => "retries_exhausted",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
        }
    }

    fn lost_reason(self) -> v1::LostReason {
        match self {
            DropReason::QueueFull => v1::LostReason::SubscriberQueueFull,
            DropReason::RetriesExhausted => v1::LostReason::SinkRetriesExhausted,
            DropReason::Rejected => v1::LostReason::SinkRejected,
            DropReason::Shutdown => v1::LostReason::SinkShutdown,
        }
    }
}

/// Counters of a sink, read by `/metrics`.
#[derive(Default)]
pub struct SinkStats {
    /// Events the receiver acknowledged.
    pub delivered: AtomicU64,
    /// In-band lost records the receiver acknowledged.
    pub lost_records: AtomicU64,
    /// Requests acknowledged.
    pub batches: AtomicU64,
    /// Events dropped, by [`DropReason`] index.
    pub dropped: [AtomicU64; 4],
    /// Attempts after a batch's first.
    pub retries: AtomicU64,
    /// Host CLOCK_REALTIME (ns) of the last acknowledged request, 0: none.
    pub last_success_ns: AtomicU64,
    queued: OnceLock<QueuedTotal>,
}

impl std::fmt::Debug for SinkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkStats")
            .field("delivered", &self.delivered)
            .field("dropped", &self.dropped)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl SinkStats {
    fn l(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// Events dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        Self::l(&self.dropped[reason as usize])
    }

    /// Events dropped, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(Self::l).sum()
    }

    /// Events in the sink's queue or in flight: taken into its queue and
    /// neither delivered nor dropped yet.
    pub fn queue_depth(&self) -> u64 {
        let queued = self.queued.get().map_or(0, |f| f());
        let done =
            Self::l(&self.delivered) + self.dropped_total() - self.dropped(DropReason::QueueFull);
        queued.saturating_sub(done)
    }
}

/// A running sink. [`Sink::finish`] delivers what is queued (within the
/// drain time) and stops.
pub struct Sink {
    kind: SinkKind,
    stats: Arc<SinkStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    pub fn kind(&self) -> SinkKind {
        self.kind
    }

    pub fn stats(&self) -> Arc<SinkStats> {
        self.stats.clone()
    }

    /// Deliver what the stream still holds (call this after the guest
    /// stopped), within the drain time, then stop; returns
    /// [`Sink::summary`].
    pub fn finish(mut self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.summary()
    }

    /// A one-line summary for the end of a run.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            "hvprobe: {}: {} events delivered, {} dropped (queue full {}, retries exhausted {}, rejected {}, shutdown {}), {} retries",
            self.kind.name(),
            SinkStats::l(&s.delivered),
            s.dropped_total(),
            s.dropped(DropReason::QueueFull),
            s.dropped(DropReason::RetriesExhausted),
            s.dropped(DropReason::Rejected),
            s.dropped(DropReason::Shutdown),
            SinkStats::l(&s.retries),
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Sink {
    /// Starts a push sink over `streams` (see `HvProbeService::start_sink`).
    pub(crate) fn start(
        streams: Arc<Streams>,
        cfg: SinkConfig,
        rt: &tokio::runtime::Handle,
    ) -> Result<Sink, String> {
        let (stream, queued) = {
            let _enter = rt.enter();
            subscribe::start_observed(
                streams,
                v1::SubscribeRequest {
                    queue_capacity: cfg.queue_capacity,
                    max_batch_events: cfg.batch_events,
                    ..Default::default()
                },
            )
            .map_err(|s| format!("subscribing the {} sink: {}", cfg.kind.name(), s.message()))?
        };
        let stats = Arc::new(SinkStats::default());
        let _ = stats.queued.set(queued);
        let stop = Arc::new(AtomicBool::new(false));
        let kind = cfg.kind;
        let own = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the {} sink's runtime: {e}", kind.name()))?;
        let mut w = Deliverer::new(cfg, stats.clone(), stop.clone(), &own);
        let thread = std::thread::Builder::new()
            .name(format!("hvprobe-{}", kind.name()))
            .spawn(move || own.block_on(w.run(stream)))
            .map_err(|e| format!("starting the {} sink's thread: {e}", kind.name()))?;
        Ok(Sink {
            kind,
            stats,
            stop,
            thread: Some(thread),
        })
    }
}

/// How long the deliverer waits for the stream before looking at its flags
/// (the stream flushes a batch at least every 20 ms).
const IDLE: Duration = Duration::from_millis(100);

/// Most of a receiver's answer read (an OTLP partial success is small).
const MAX_ANSWER: usize = 1 << 20;

/// Dropped events not yet reported in band.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Owed {
    count: u64,
    since_ns: u64,
    until_ns: u64,
}

impl Owed {
    fn add(&mut self, count: u64, since_ns: u64, until_ns: u64) {
        if count == 0 {
            return;
        }
        if self.count == 0 || since_ns < self.since_ns {
            self.since_ns = since_ns;
        }
        self.until_ns = self.until_ns.max(until_ns);
        self.count += count;
    }
}

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

struct Deliverer {
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
    fn new(
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

    async fn run<S>(&mut self, stream: S)
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
                        self.record(rfc3339(ts), process, Record::Event(ev)),
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
            let lost = v1::LostEvents {
                count: o.count,
                since_ns: o.since_ns,
                until_ns: o.until_ns,
                probe_ids: Vec::new(),
                reason: reason.lost_reason() as i32,
            };
            out.push((
                self.record(rfc3339(o.until_ns), None, Record::Lost(lost)),
                What::Lost(reason, o),
            ));
        }
        out
    }

    fn record(
        &self,
        time: String,
        process: Option<v1::GuestProcess>,
        r: Record,
    ) -> v1::ExportRecord {
        v1::ExportRecord {
            version: EXPORT_VERSION,
            time,
            vm: Some(self.cfg.vm.clone()),
            process,
            record_seq: 0,
            record: Some(r),
        }
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

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_to_loopback_only() {
        let ok = |k, u: &str| parse_url(k, u).unwrap().to_string();
        assert_eq!(
            ok(SinkKind::Webhook, "http://127.0.0.1:8080/a?b=c"),
            "http://127.0.0.1:8080/a?b=c"
        );
        assert_eq!(
            ok(SinkKind::Webhook, "http://localhost/"),
            "http://127.0.0.1:80/"
        );
        assert_eq!(
            ok(SinkKind::Webhook, "http://[::1]:9/x"),
            "http://[::1]:9/x"
        );
        assert_eq!(
            ok(SinkKind::Otlp, "http://127.0.0.1"),
            "http://127.0.0.1:4318/v1/logs"
        );
        assert_eq!(
            ok(SinkKind::Otlp, "http://127.0.0.2:4000/otlp/"),
            "http://127.0.0.2:4000/otlp/v1/logs"
        );
        let err = |k, u: &str| parse_url(k, u).unwrap_err();
        assert!(err(SinkKind::Webhook, "https://127.0.0.1/").contains("https is not supported"));
        assert!(err(SinkKind::Webhook, "http://10.0.0.1/").contains("not a loopback address"));
        assert!(err(SinkKind::Webhook, "http://example.com/").contains("not a loopback address"));
        assert!(err(SinkKind::Webhook, "http://u:p@127.0.0.1/").contains("credentials"));
        assert!(err(SinkKind::Otlp, "127.0.0.1:4318").starts_with("--otlp-endpoint 127.0.0.1:4318"));
    }

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
                d.record(String::new(), None, Record::Event(v1::Event::default())),
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
            d.record(String::new(), None, Record::Event(v1::Event::default())),
            What::Event(1),
        )];
        rt.block_on(d.deliver(ev));
        assert_eq!(stats.dropped(DropReason::Shutdown), 1);
        assert_eq!(stats.dropped_total(), 4);
    }
}
