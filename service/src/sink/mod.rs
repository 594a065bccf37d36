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

//!
//! Files: `config.rs` (receivers and URLs), `stats.rs` (drop reasons and
//! counters), `deliver.rs` (the batching, retry and in-band loss engine),
//! [`webhook`] and [`otlp`] (the two body encodings), and this one (the
//! running [`Sink`]).

mod config;
mod deliver;
pub mod otlp;
mod stats;
pub mod webhook;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proto::v1;

use crate::subscribe::{self, Streams};
use deliver::Deliverer;

pub use config::{parse_url, SinkConfig, SinkKind};
pub use stats::{DropReason, SinkStats};
pub use webhook::WebhookFormat;

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
