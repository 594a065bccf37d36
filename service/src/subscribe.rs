//! The event stream: one engine subscription per client, drained by a task
//! that batches events and turns the engine's per-subscriber drop counter
//! into `lost` records. The vCPU side never waits: the engine drops what
//! does not fit the queue, and the task notices the loss on its next drain.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use introspect::{Event, ProbeId, Subscription};
use probe_spec::{FieldKind, Filter};
use proto::v1::{self, subscribe_response::Payload};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::convert::{self, EventFieldsView};
use crate::errors::parse_error;
use crate::server::{common_field_kind, Inner, ProbeMeta};

/// Effective parameters of one subscription.
#[derive(Clone, Copy, Debug)]
struct Params {
    batch: usize,
    delay: Duration,
    capacity: usize,
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

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Checks the request, subscribes to the engine and spawns the task that
/// feeds the returned stream.
pub(crate) fn start(
    inner: Arc<Inner>,
    req: v1::SubscribeRequest,
) -> Result<ReceiverStream<Result<v1::SubscribeResponse, Status>>, Status> {
    let c = &inner.config;
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
    if inner.engine.subscriber_count() >= c.max_subscribers {
        return Err(Status::resource_exhausted(format!(
            "too many subscribers (limit {})",
            c.max_subscribers
        )));
    }
    let filter = parse_filter(&inner, &req)?;
    let ids: HashSet<ProbeId> = req.probe_ids.iter().copied().collect();
    let groups: HashSet<String> = req.groups.iter().cloned().collect();
    let probes = inner.probes.clone();
    // Runs on vCPU threads: only reads, never waits on anything the API
    // side holds while stopping the world.
    let select = move |ev: &Event| -> bool {
        if !ids.is_empty() && !ids.contains(&ev.probe_id) {
            return false;
        }
        let t = probes.read().unwrap_or_else(|e| e.into_inner());
        let meta = t.get(ev.probe_id);
        if !groups.is_empty() && !meta.is_some_and(|m| groups.contains(&m.group)) {
            return false;
        }
        let fields = EventFieldsView(ev);
        if let Some(pf) = meta.and_then(|m| m.filter.as_ref()) {
            if !pf.matches(&fields) {
                return false;
            }
        }
        filter.as_ref().is_none_or(|f| f.matches(&fields))
    };
    let notify = Arc::new(Notify::new());
    let n = notify.clone();
    let sub = inner.engine.subscribe(
        capacity as usize,
        Some(Box::new(select)),
        Some(Box::new(move || n.notify_one())),
    );
    let id = inner.next_subscription.fetch_add(1, Ordering::Relaxed);
    let params = Params {
        batch: batch as usize,
        delay: Duration::from_millis(u64::from(delay)),
        capacity: capacity as usize,
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
    tokio::spawn(pump(inner, sub, notify, tx, params));
    Ok(ReceiverStream::new(rx))
}

/// Parses the subscriber's filter and checks its fields against the
/// selected probes (when there are any yet).
fn parse_filter(inner: &Inner, req: &v1::SubscribeRequest) -> Result<Option<Filter>, Status> {
    if req.filter.trim().is_empty() {
        return Ok(None);
    }
    let f = Filter::parse(&req.filter).map_err(|e| parse_error(&e, None))?;
    let t = inner.probes.read().unwrap_or_else(|e| e.into_inner());
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
    let kinds: HashMap<String, FieldKind> = selected
        .iter()
        .flat_map(|m| field_kinds(inner, m))
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

fn field_kinds(inner: &Inner, m: &ProbeMeta) -> Vec<(String, FieldKind)> {
    let Ok(probe_spec::Command::Add(def)) = probe_spec::parse_command(&m.definition) else {
        return Vec::new();
    };
    let mut def = def;
    if let Some(dbg) = inner.symbols.debug_info() {
        // Named args get their DWARF types here as at creation.
        let _ = probe_spec::resolve_names(&mut def, &m.definition, &dbg);
    }
    def.args
        .iter()
        .filter_map(|a| convert::arg_field_kind(&a.ty).map(|k| (a.name.clone(), k)))
        .collect()
}

type Tx = mpsc::Sender<Result<v1::SubscribeResponse, Status>>;

/// Drains the subscription into the stream until the client goes away.
/// Dropping `sub` at the end frees the engine-side queue.
async fn pump(inner: Arc<Inner>, mut sub: Subscription, notify: Arc<Notify>, tx: Tx, p: Params) {
    let mut pending: Vec<v1::Event> = Vec::with_capacity(p.batch);
    let mut batch_started: Option<tokio::time::Instant> = None;
    let mut last_ts = now_ns();
    loop {
        // Drops counted before this drain happened after the events still
        // queued were pushed (a full queue takes nothing new until drained),
        // so those events go out first, then the lost record.
        let lost = sub.take_dropped();
        let room = p.batch - pending.len();
        let evs = sub.drain(room);
        if !evs.is_empty() {
            batch_started.get_or_insert_with(tokio::time::Instant::now);
            let t = inner.probes.read().unwrap_or_else(|e| e.into_inner());
            for ev in &evs {
                let meta = t.get(ev.probe_id).map(|m| &**m);
                pending.push(convert::event(ev, meta, &inner.symbols));
            }
            last_ts = evs.last().map_or(last_ts, |e| e.time_ns);
        }
        let due = batch_started.is_some_and(|t| t.elapsed() >= p.delay);
        if !pending.is_empty() && (lost > 0 || pending.len() >= p.batch || due) {
            let events = std::mem::replace(&mut pending, Vec::with_capacity(p.batch));
            batch_started = None;
            let msg = v1::SubscribeResponse {
                payload: Some(Payload::Events(v1::EventBatch { events })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break;
            }
        }
        if lost > 0 {
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
                break;
            }
            continue;
        }
        if !sub.is_empty() {
            continue;
        }
        let wait = match batch_started {
            Some(t) => p.delay.saturating_sub(t.elapsed()),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = tx.closed() => break,
        }
    }
    tracing::debug!(
        "subscriber gone: {} events queued, {} dropped",
        sub.delivered_total(),
        sub.dropped_total()
    );
}
