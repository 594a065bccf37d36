//! The event stream: one engine subscription per client, drained by a task
//! that batches events and turns the engine's per-subscriber drop counter
//! into `lost` records. The vCPU side never waits: the engine drops what
//! does not fit the queue, and the task notices the loss on its next drain.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use introspect::events::SubscribeOptions;
use introspect::{Engine, Event, ExeInterest, ProbeId, Subscription};
use probe_spec::{FieldKind, Filter};
use proto::v1::{self, subscribe_response::Payload};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::catalog::{common_field_kind, guess_fields, EventFieldsView, ProbeMeta, ProbeTable};
use crate::config::ServiceConfig;
use crate::encode::Batch;
use crate::errors::parse_error;
use crate::symbols::Symbols;
use crate::time::now_ns;

/// What a subscription needs of the probe engine: a queue of its events,
/// and the reading of executable paths while someone filters on them.
pub(crate) trait EventSource: Send + Sync {
    fn subscribe_with(&self, opts: SubscribeOptions) -> Subscription;
    fn want_exe(&self) -> ExeInterest;
}

impl EventSource for Arc<Engine> {
    fn subscribe_with(&self, opts: SubscribeOptions) -> Subscription {
        Engine::subscribe_with(self, opts)
    }

    fn want_exe(&self) -> ExeInterest {
        Engine::want_exe(self)
    }
}

/// Every event stream of the service (gRPC subscribers, the export file,
/// the push sinks): what they read (the engine's queues, the probe
/// catalog, the symbols for trace lines), their limits and their counters.
pub(crate) struct Streams {
    source: Box<dyn EventSource>,
    /// Never held while the engine stops the world: the filters read it on
    /// vCPU threads.
    probes: Arc<RwLock<ProbeTable>>,
    symbols: Arc<Symbols>,
    config: ServiceConfig,
    next_subscription: AtomicU64,
    /// Streams admitted and their queue capacities, counted under one lock
    /// so that concurrent subscribes cannot pass the limits together.
    admitted: Arc<Mutex<Admitted>>,
    /// Totals over every stream since the start (metrics).
    pub totals: StreamTotals,
}

/// Counters of all event streams together (the export file's included),
/// for `/metrics`: a stream's own numbers are in its `lost` records.
#[derive(Debug, Default)]
pub(crate) struct StreamTotals {
    /// Events handed to streams.
    pub events: AtomicU64,
    /// Events counted in `lost` records (the subscribers' queues were full).
    pub lost: AtomicU64,
    /// Streams ever started.
    pub started: AtomicU64,
}

impl Streams {
    pub fn new(
        source: Box<dyn EventSource>,
        probes: Arc<RwLock<ProbeTable>>,
        symbols: Arc<Symbols>,
        config: ServiceConfig,
    ) -> Self {
        Streams {
            source,
            probes,
            symbols,
            config,
            next_subscription: AtomicU64::new(1),
            admitted: Arc::default(),
            totals: StreamTotals::default(),
        }
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.admitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .streams
    }
}

/// Effective parameters of one subscription.
#[derive(Clone, Copy, Debug)]
struct Params {
    batch: usize,
    delay: Duration,
    capacity: usize,
    packed: bool,
}

fn pick(asked: u32, default: u32, max: u32, what: &str) -> Result<u32, Status> {
    match asked {
        0 => Ok(default),
        n if n > max => Err(Status::invalid_argument(format!(
            "{what}: {n} is above the limit {max}"
        ))),
        n => Ok(n),
    }
}

/// Checks the request, subscribes to the engine and spawns the task that
/// feeds the returned stream.
pub(crate) fn start(
    streams: Arc<Streams>,
    req: v1::SubscribeRequest,
) -> Result<ReceiverStream<Result<v1::SubscribeResponse, Status>>, Status> {
    start_observed(streams, req).map(|(stream, _)| stream)
}

/// Events queued for a subscriber so far (taken into its queue; not those
/// dropped at a full queue).
pub(crate) type QueuedTotal = Box<dyn Fn() -> u64 + Send + Sync>;

/// [`start`], with a reader of the events queued for this subscriber so
/// far: a consumer that counts what it took out knows how many wait.
pub(crate) fn start_observed(
    streams: Arc<Streams>,
    req: v1::SubscribeRequest,
) -> Result<
    (
        ReceiverStream<Result<v1::SubscribeResponse, Status>>,
        QueuedTotal,
    ),
    Status,
> {
    let c = &streams.config;
    let batch = pick(
        req.max_batch_events,
        c.default_batch_events,
        c.max_batch_events,
        "max_batch_events",
    )?;
    let delay = pick(
        req.max_batch_delay_ms,
        c.default_batch_delay_ms,
        c.max_batch_delay_ms,
        "max_batch_delay_ms",
    )?;
    let capacity = pick(
        req.queue_capacity,
        c.default_queue_capacity,
        c.max_queue_capacity,
        "queue_capacity",
    )?;
    let packed = match v1::EventEncoding::try_from(req.encoding) {
        Ok(v1::EventEncoding::Unspecified | v1::EventEncoding::Full) => false,
        Ok(v1::EventEncoding::Packed) => true,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "encoding: unknown value {}",
                req.encoding
            )))
        }
    };
    for (what, n) in [
        ("probe_ids", req.probe_ids.len()),
        ("groups", req.groups.len()),
    ] {
        if n > c.max_probes {
            return Err(Status::invalid_argument(format!(
                "{what}: {n} entries, more than the probe limit of {}",
                c.max_probes
            )));
        }
    }
    let admission = Admission::take(&streams, capacity)?;
    let filter = parse_filter(&streams, &req)?;
    // Over-approximates (a quoted "exe" counts too): at worst hits read
    // paths nobody looks at.
    let names_exe = req
        .filter
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == "exe");
    let exe_interest = (req.with_exe || names_exe).then(|| streams.source.want_exe());
    // Sorted: a handful of ids is searched faster than hashed.
    let mut ids: Vec<ProbeId> = req.probe_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    let groups: HashSet<String> = req.groups.iter().cloned().collect();
    // Both run on vCPU threads: they only read, and never wait on anything
    // the API side holds while stopping the world.
    // By probe, before anything is fetched: hits of other probes cost this
    // subscriber nothing, and a full queue drops without fetching.
    let (named_upto, filtered) = {
        let t = streams.probes.read().unwrap_or_else(|e| e.into_inner());
        (t.named_upto.clone(), t.filtered.clone())
    };
    let probes = streams.probes.clone();
    // Hits of a probe armed but not yet named, lost to a stream that takes
    // every probe (one that names ids or groups cannot know it wants them).
    let unnamed = Arc::new(AtomicU64::new(0));
    let takes_all = ids.is_empty() && groups.is_empty();
    let unnamed_hits = unnamed.clone();
    let bell = Arc::new(Doorbell::default());
    let unnamed_bell = bell.clone();
    let select = move |id: ProbeId| -> bool {
        if id > named_upto.load(Ordering::Acquire) {
            if takes_all {
                unnamed_hits.fetch_add(1, Ordering::Relaxed);
                unnamed_bell.ring();
            }
            return false;
        }
        if !ids.is_empty() && ids.binary_search(&id).is_err() {
            return false;
        }
        groups.is_empty() || {
            let t = probes.read().unwrap_or_else(|e| e.into_inner());
            t.get(id).is_some_and(|m| groups.contains(&m.group))
        }
    };
    // By content: the probe's own filter, its policy's rate limit (decided
    // once per event, whichever subscriber asks first), then the
    // subscriber's filter.
    let probes = streams.probes.clone();
    let filter = move |ev: &Event| -> bool {
        if filter.is_none() && filtered.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let t = probes.read().unwrap_or_else(|e| e.into_inner());
        let meta = t.get(ev.probe_id);
        let own = meta.and_then(|m| m.filter.as_ref());
        let policy = meta.and_then(|m| m.policy.as_ref());
        if own.is_none() && filter.is_none() && policy.is_none() {
            return true;
        }
        let guessed;
        let fields = match meta {
            Some(m) => &m.fields[..],
            None => {
                guessed = guess_fields(ev);
                &guessed[..]
            }
        };
        let view = EventFieldsView { ev, fields };
        own.is_none_or(|pf| pf.matches(&view))
            && policy.is_none_or(|p| p.admit(ev))
            && filter.as_ref().is_none_or(|f| f.matches(&view))
    };
    let b = bell.clone();
    let sub = streams.source.subscribe_with(SubscribeOptions {
        capacity: capacity as usize,
        select: Some(Box::new(select)),
        filter: Some(Box::new(filter)),
        waker: Some(Box::new(move || b.ring())),
    });
    let queued: QueuedTotal = Box::new(sub.delivered_reader());
    let id = streams.next_subscription.fetch_add(1, Ordering::Relaxed);
    streams.totals.started.fetch_add(1, Ordering::Relaxed);
    let params = Params {
        batch: batch as usize,
        delay: Duration::from_millis(u64::from(delay)),
        capacity: capacity as usize,
        packed,
    };
    // Two messages in flight: a client that stops reading stops the task
    // soon, and the engine's queue (not memory here) absorbs the backlog.
    let (tx, rx) = mpsc::channel(2);
    let started = v1::SubscribeResponse {
        payload: Some(Payload::Started(v1::SubscribeStarted {
            subscription_id: id,
            max_batch_events: batch,
            max_batch_delay_ms: delay,
            queue_capacity: u32::try_from(params.capacity).unwrap_or(u32::MAX),
        })),
    };
    tx.try_send(Ok(started))
        .map_err(|_| Status::internal("cannot queue the started message"))?;
    tokio::spawn(async move {
        // The admission (and any interest in paths) is given back when the
        // stream's task ends.
        let _admission = admission;
        let _exe = exe_interest;
        pump(streams, sub, bell, unnamed, tx, params).await
    });
    Ok((ReceiverStream::new(rx), queued))
}

/// Streams admitted and the sum of their queue capacities.
#[derive(Debug, Default)]
struct Admitted {
    streams: usize,
    queued_events: u64,
}

/// One admitted stream; dropping it gives its share back.
struct Admission {
    admitted: Arc<Mutex<Admitted>>,
    capacity: u64,
}

impl Admission {
    /// Check both limits and count this stream in one step (a check and a
    /// later subscribe let 65 of 64 streams in when they raced).
    fn take(streams: &Streams, capacity: u32) -> Result<Self, Status> {
        let c = &streams.config;
        let mut a = streams.admitted.lock().unwrap_or_else(|e| e.into_inner());
        if a.streams >= c.max_subscribers {
            return Err(Status::resource_exhausted(format!(
                "too many subscribers (limit {})",
                c.max_subscribers
            )));
        }
        let capacity = u64::from(capacity);
        if a.queued_events + capacity > c.max_queued_events_total {
            return Err(Status::resource_exhausted(format!(
                "queue_capacity {capacity}: the subscribers' queues together may hold at most \
                 {} events and {} are taken; ask for a smaller queue",
                c.max_queued_events_total, a.queued_events
            )));
        }
        a.streams += 1;
        a.queued_events += capacity;
        Ok(Admission {
            admitted: streams.admitted.clone(),
            capacity,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut a = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        a.streams -= 1;
        a.queued_events -= self.capacity;
    }
}

/// Parses the subscriber's filter and checks its fields against the
/// selected probes (when there are any yet).
fn parse_filter(streams: &Streams, req: &v1::SubscribeRequest) -> Result<Option<Filter>, Status> {
    if req.filter.trim().is_empty() {
        return Ok(None);
    }
    let f = Filter::parse(&req.filter).map_err(|e| parse_error(&e, None))?;
    let t = streams.probes.read().unwrap_or_else(|e| e.into_inner());
    let selected: Vec<&Arc<ProbeMeta>> = t
        .live
        .values()
        .filter(|m| req.probe_ids.is_empty() || req.probe_ids.contains(&m.id))
        .filter(|m| req.groups.is_empty() || req.groups.contains(&m.group))
        .collect();
    if selected.is_empty() {
        return Ok(Some(f));
    }
    // A field is known if any selected probe has it.
    let kinds: HashMap<&str, FieldKind> = selected
        .iter()
        .flat_map(|m| &m.args)
        .filter_map(|(name, kind)| Some((name.as_str(), (*kind)?)))
        .collect();
    let any_return = selected.iter().any(|m| m.kind == v1::ProbeKind::Kretprobe);
    f.check(&|name: &str| {
        kinds
            .get(name)
            .copied()
            .or_else(|| common_field_kind(name, any_return))
    })
    .map_err(|e| parse_error(&e, None))?;
    Ok(Some(f))
}

type Tx = mpsc::Sender<Result<v1::SubscribeResponse, Status>>;

/// How often the pump looks at the queue while a batch is filling: it takes
/// no wake-up per event then (vCPUs only pay for a wake-up when the pump
/// sleeps with nothing batched). A queue must hold this long's events.
const FILL_POLL: Duration = Duration::from_millis(1);

/// Wakes the pump when it sleeps with an empty batch.
#[derive(Default)]
struct Doorbell {
    asleep: AtomicBool,
    notify: Notify,
}

impl Doorbell {
    /// Called by vCPUs after queuing (or dropping) an event.
    fn ring(&self) {
        // Pairs with the fence in `sleep_if_empty`: either the pump sees the
        // event, or this sees `asleep`.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Announces sleep unless the queue has something; false means go on.
    fn sleep_if_empty(&self, queue_is_empty: impl Fn() -> bool) -> bool {
        self.asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if queue_is_empty() {
            return true;
        }
        self.asleep.store(false, Ordering::Relaxed);
        false
    }
}

/// Drains the subscription into the stream until the client goes away.
/// Dropping `sub` at the end frees the engine-side queue.
async fn pump(
    streams: Arc<Streams>,
    mut sub: Subscription,
    bell: Arc<Doorbell>,
    // Hits of probes not yet named that this stream would have taken.
    unnamed: Arc<AtomicU64>,
    tx: Tx,
    p: Params,
) {
    let mut pending = Batch::new(p.packed, p.batch);
    let mut batch_started: Option<tokio::time::Instant> = None;
    let mut last_ts = now_ns();
    let mut evs = Vec::with_capacity(p.batch);
    'serve: loop {
        // Drops counted before this drain happened after the events still
        // queued were pushed (a full queue takes nothing new until drained),
        // so those events go out first, then the lost record.
        let lost = sub.take_dropped();
        let unnamed_lost = unnamed.swap(0, Ordering::Relaxed);
        let room = p.batch - pending.len();
        sub.drain_into(&mut evs, room);
        if !evs.is_empty() {
            batch_started.get_or_insert_with(tokio::time::Instant::now);
            last_ts = evs.last().map_or(last_ts, |e| e.time_ns);
            streams
                .totals
                .events
                .fetch_add(evs.len() as u64, Ordering::Relaxed);
            let t = streams.probes.read().unwrap_or_else(|e| e.into_inner());
            for ev in evs.drain(..) {
                let meta = t.get(ev.probe_id).map(|m| &**m);
                // Encoded by copy: its buffers go back to the vCPUs.
                if let Some(ev) = pending.push(ev, meta, &streams.symbols) {
                    sub.recycle(ev);
                }
            }
        }
        let due = batch_started.is_some_and(|t| t.elapsed() >= p.delay);
        if pending.len() > 0 && (lost > 0 || pending.len() >= p.batch || due) {
            batch_started = None;
            for payload in pending.take(p.batch) {
                let msg = v1::SubscribeResponse {
                    payload: Some(payload),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break 'serve;
                }
            }
        }
        if lost > 0 {
            streams.totals.lost.fetch_add(lost, Ordering::Relaxed);
            let msg = v1::SubscribeResponse {
                payload: Some(Payload::Lost(v1::LostEvents {
                    count: lost,
                    since_ns: last_ts,
                    until_ns: now_ns(),
                    probe_ids: Vec::new(),
                    reason: v1::LostReason::SubscriberQueueFull as i32,
                })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break 'serve;
            }
        }
        if unnamed_lost > 0 {
            streams
                .totals
                .lost
                .fetch_add(unnamed_lost, Ordering::Relaxed);
            let msg = v1::SubscribeResponse {
                payload: Some(Payload::Lost(v1::LostEvents {
                    count: unnamed_lost,
                    since_ns: last_ts,
                    until_ns: now_ns(),
                    probe_ids: Vec::new(),
                    reason: v1::LostReason::ProbeNotYetNamed as i32,
                })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break 'serve;
            }
        }
        if lost > 0 || unnamed_lost > 0 {
            continue;
        }
        if !sub.is_empty() {
            continue;
        }
        let wait = match batch_started {
            Some(t) => p.delay.saturating_sub(t.elapsed()).min(FILL_POLL),
            None if bell
                .sleep_if_empty(|| sub.is_empty() && unnamed.load(Ordering::Relaxed) == 0) =>
            {
                Duration::from_secs(3600)
            }
            None => continue,
        };
        tokio::select! {
            _ = bell.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = tx.closed() => break 'serve,
        }
        bell.asleep.store(false, Ordering::Relaxed);
    }
    tracing::debug!(
        "subscriber gone: {} events queued, {} dropped",
        sub.delivered_total(),
        sub.dropped_total()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn woken(bell: &Doorbell) -> bool {
        tokio::time::timeout(Duration::from_millis(50), bell.notify.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn doorbell_wakes_only_a_sleeping_pump() {
        let bell = Doorbell::default();
        // Busy pump: rings cost nothing and leave no wake-up behind.
        bell.ring();
        bell.ring();
        assert!(!woken(&bell).await);
        // Something queued: the pump does not sleep.
        assert!(!bell.sleep_if_empty(|| false));
        bell.ring();
        assert!(!woken(&bell).await);
        // Asleep on an empty queue: the next ring wakes it, once.
        assert!(bell.sleep_if_empty(|| true));
        bell.ring();
        bell.ring();
        assert!(woken(&bell).await);
        assert!(!woken(&bell).await);
    }
}
