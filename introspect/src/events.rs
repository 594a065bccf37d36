//! Probe events and their delivery: bounded per-subscriber queues that a vCPU
//! fills without ever blocking. A full queue drops the event and counts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crossbeam_queue::ArrayQueue;
use probe_spec::Value;

/// Identifies a registered probe.
pub type ProbeId = u64;

/// What kind of hit produced an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A kprobe hit.
    Entry,
    /// A kretprobe: the function returned.
    Return {
        /// Function entry address.
        func: u64,
        /// Where the function returned to.
        return_to: u64,
        /// RAX at return.
        retval: u64,
        /// Time from entry to return.
        duration_ns: u64,
        /// Values of the arguments fetched at entry (those not reading
        /// `$retval`), in definition order.
        entry_args: Vec<Value>,
    },
}

pub use crate::task::GuestTask;

/// One probe hit.
#[derive(Clone, Debug)]
pub struct Event {
    pub probe_id: ProbeId,
    /// Sequence number across all events of the engine (gaps = drops upstream).
    pub seq: u64,
    pub vcpu: u32,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Probed address (for returns: the function entry).
    pub ip: u64,
    pub kind: EventKind,
    /// The guest task, when the guest's symbols say where to find it.
    pub task: Option<GuestTask>,
    /// Values of the fetched arguments, in definition order (for returns:
    /// those fetched at return, the ones reading `$retval`). Names and
    /// types are the probe definition's.
    pub args: Vec<Value>,
    /// What the probe's action did at this hit (None: no action ran).
    pub action: Option<crate::action::ActionTaken>,
}

/// Selects events for a subscriber by their content; runs on the vCPU
/// thread after the probe's arguments were fetched, so keep it cheap.
pub type EventFilter = Box<dyn Fn(&Event) -> bool + Send + Sync>;
/// Selects events for a subscriber by probe alone, before anything is
/// fetched (e.g. the probe ids or groups a client asked for).
pub type ProbeSelector = Box<dyn Fn(ProbeId) -> bool + Send + Sync>;
/// Called after an event is queued (e.g. to wake an async task).
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// How to subscribe.
///
/// With a `select`or, interest is known before a hit's arguments are
/// fetched: a hit of a selected probe that finds the queue full is counted
/// lost without fetching and without running `filter` (like the kernel's
/// ring buffer, which drops before filtering), and hits of probes nobody
/// selected are not fetched at all. Without one, `filter` alone decides, so
/// every hit is fetched while this subscriber exists and a full queue counts
/// only the events `filter` accepts.
pub struct SubscribeOptions {
    /// Queue size in events (at least 1).
    pub capacity: usize,
    pub select: Option<ProbeSelector>,
    pub filter: Option<EventFilter>,
    pub waker: Option<Waker>,
}

impl SubscribeOptions {
    /// Every event, no waker.
    pub fn new(capacity: usize) -> Self {
        SubscribeOptions {
            capacity,
            select: None,
            filter: None,
            waker: None,
        }
    }
}

pub(crate) struct SubscriberQueue {
    pub id: u64,
    queue: ArrayQueue<Event>,
    dropped: AtomicU64,
    delivered: AtomicU64,
    select: Option<ProbeSelector>,
    filter: Option<EventFilter>,
    waker: Option<Waker>,
}

impl SubscriberQueue {
    fn selects(&self, probe: ProbeId) -> bool {
        self.select.as_ref().is_none_or(|s| s(probe))
    }

    /// The content filter can be skipped for a full queue: interest was
    /// settled by the selector (or there is no filter).
    fn drops_unfiltered(&self) -> bool {
        self.select.is_some() || self.filter.is_none()
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w();
        }
    }
}

/// What a hit of a probe needs, decided before its arguments are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interest {
    /// No subscriber selects the probe: nothing to fetch or count.
    Nobody,
    /// Every subscriber that selects it has a full queue; the event was
    /// counted lost for each of them (this many), nothing to fetch.
    Dropped(u64),
    /// Fetch the arguments and [`EventBus::publish`].
    Fetch,
}

/// Argument lists kept for reuse at most: a consumer's batch or two. Each
/// holds its values (strings keep their buffers, at most the longest string
/// fetched, 4 KiB by default).
const SPARE_ARG_LISTS: usize = 1024;

/// All subscribers, and the argument lists consumers gave back.
pub(crate) struct EventBus {
    subs: RwLock<Vec<Arc<SubscriberQueue>>>,
    next_id: AtomicU64,
    /// Argument lists of consumed events ([`Subscription::recycle`]),
    /// values kept: the next events are fetched into them, so a consumer
    /// that gives its events back makes every hit allocation-free.
    spare_args: ArrayQueue<Vec<Value>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            subs: RwLock::default(),
            next_id: AtomicU64::new(0),
            spare_args: ArrayQueue::new(SPARE_ARG_LISTS),
        }
    }
}

impl EventBus {
    /// An argument list to fetch into: a given-back one (with its old
    /// values, to be overwritten), else a new empty one.
    pub fn take_args(&self) -> Vec<Value> {
        self.spare_args.pop().unwrap_or_default()
    }

    /// Keep `args` for a later event (freed when enough are kept).
    fn give_back_args(&self, args: Vec<Value>) {
        if args.capacity() > 0 {
            let _ = self.spare_args.push(args);
        }
    }

    /// Keep what `ev` owns for later events.
    fn give_back(&self, ev: Event) {
        if let EventKind::Return { entry_args, .. } = ev.kind {
            self.give_back_args(entry_args);
        }
        self.give_back_args(ev.args);
    }

    #[cfg(test)]
    pub fn spare_count(&self) -> usize {
        self.spare_args.len()
    }

    /// Whether a hit of `probe` must be fetched; when every interested
    /// queue is full, counts the loss right here instead.
    pub fn interest(&self, probe: ProbeId) -> Interest {
        let subs = self.subs.read().unwrap();
        let mut full = 0;
        for s in subs.iter().filter(|s| s.selects(probe)) {
            if !s.drops_unfiltered() || !s.queue.is_full() {
                return Interest::Fetch;
            }
            full += 1;
        }
        if full == 0 {
            return Interest::Nobody;
        }
        // Still under the read lock: the same set of subscribers.
        for s in subs.iter().filter(|s| s.selects(probe)) {
            s.drop_one();
            s.wake();
        }
        Interest::Dropped(full)
    }

    /// Offer an event to every subscriber. Returns how many queues were full.
    pub fn publish(&self, ev: Event) -> u64 {
        let subs = self.subs.read().unwrap();
        let mut dropped = 0;
        // The event moves into the last taker; only the others get clones.
        let mut taker: Option<&SubscriberQueue> = None;
        for s in subs.iter() {
            if !s.selects(ev.probe_id) {
                continue;
            }
            if s.drops_unfiltered() && s.queue.is_full() {
                s.drop_one();
                dropped += 1;
                s.wake();
                continue;
            }
            if s.filter.as_ref().is_some_and(|f| !f(&ev)) {
                continue;
            }
            if let Some(t) = taker.replace(s) {
                dropped += Self::push(t, ev.clone());
            }
        }
        match taker {
            Some(t) => dropped += Self::push(t, ev),
            // Filtered out everywhere: its buffers serve the next event.
            None => self.give_back(ev),
        }
        dropped
    }

    /// Queue `ev` for `s`; 1 if the queue was full.
    fn push(s: &SubscriberQueue, ev: Event) -> u64 {
        let full = s.queue.push(ev).is_err();
        if full {
            s.drop_one();
        } else {
            s.delivered.fetch_add(1, Ordering::Relaxed);
        }
        s.wake();
        u64::from(full)
    }

    pub fn has_subscribers(&self) -> bool {
        !self.subs.read().unwrap().is_empty()
    }

    pub fn subscribe(self: &Arc<Self>, opts: SubscribeOptions) -> Subscription {
        let q = Arc::new(SubscriberQueue {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: ArrayQueue::new(opts.capacity.max(1)),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            select: opts.select,
            filter: opts.filter,
            waker: opts.waker,
        });
        self.subs.write().unwrap().push(q.clone());
        Subscription {
            queue: q,
            bus: self.clone(),
            dropped_reported: 0,
        }
    }

    fn unsubscribe(&self, id: u64) {
        self.subs.write().unwrap().retain(|s| s.id != id);
    }

    pub fn subscriber_count(&self) -> usize {
        self.subs.read().unwrap().len()
    }
}

/// A consumer's end of an event queue. Dropping it frees the queue.
pub struct Subscription {
    queue: Arc<SubscriberQueue>,
    bus: Arc<EventBus>,
    dropped_reported: u64,
}

impl Subscription {
    /// Take up to `max` queued events.
    pub fn drain(&self, max: usize) -> Vec<Event> {
        let mut v = Vec::with_capacity(max.min(self.queue.queue.len()));
        while v.len() < max {
            match self.queue.queue.pop() {
                Some(e) => v.push(e),
                None => break,
            }
        }
        v
    }

    /// [`Self::drain`] into `out` (appended), reusing its capacity.
    pub fn drain_into(&self, out: &mut Vec<Event>, max: usize) {
        for _ in 0..max {
            match self.queue.queue.pop() {
                Some(e) => out.push(e),
                None => break,
            }
        }
    }

    pub fn pop(&self) -> Option<Event> {
        self.queue.queue.pop()
    }

    /// Give a consumed event back: its argument lists (values and string
    /// buffers) are reused for later events instead of new allocations on
    /// the vCPU threads. Optional; an event simply dropped is freed.
    pub fn recycle(&self, ev: Event) {
        self.bus.give_back(ev);
    }

    /// Events dropped for this subscriber since the last call (a full queue).
    pub fn take_dropped(&mut self) -> u64 {
        let total = self.queue.dropped.load(Ordering::Relaxed);
        let new = total - self.dropped_reported;
        self.dropped_reported = total;
        new
    }

    /// Total events dropped for this subscriber.
    pub fn dropped_total(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Total events queued for this subscriber.
    pub fn delivered_total(&self) -> u64 {
        self.queue.delivered.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.queue.queue.capacity()
    }

    /// A reader of [`Subscription::delivered_total`] that outlives any
    /// borrow of the subscription (for a consumer behind a stream that
    /// reports how far it is behind).
    pub fn delivered_reader(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let q = self.queue.clone();
        move || q.delivered.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.queue.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.queue.is_empty()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.unsubscribe(self.queue.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: ProbeId) -> Event {
        Event {
            probe_id: id,
            seq: 0,
            vcpu: 0,
            time_ns: 0,
            ip: 0,
            kind: EventKind::Entry,
            task: None,
            args: vec![],
            action: None,
        }
    }

    fn opts(capacity: usize) -> SubscribeOptions {
        SubscribeOptions::new(capacity)
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let bus = Arc::new(EventBus::default());
        let mut sub = bus.subscribe(opts(2));
        assert_eq!(bus.publish(ev(1)), 0);
        assert_eq!(bus.publish(ev(1)), 0);
        assert_eq!(bus.publish(ev(1)), 1);
        assert_eq!(bus.publish(ev(1)), 1);
        assert_eq!(sub.take_dropped(), 2);
        assert_eq!(sub.take_dropped(), 0);
        assert_eq!(sub.drain(10).len(), 2);
        assert_eq!(bus.publish(ev(1)), 0);
        assert_eq!(sub.dropped_total(), 2);
    }

    #[test]
    fn filter_and_unsubscribe_on_drop() {
        let bus = Arc::new(EventBus::default());
        let only_7 = bus.subscribe(SubscribeOptions {
            filter: Some(Box::new(|e: &Event| e.probe_id == 7)),
            ..opts(8)
        });
        bus.publish(ev(1));
        bus.publish(ev(7));
        assert_eq!(only_7.drain(8).len(), 1);
        assert_eq!(bus.subscriber_count(), 1);
        drop(only_7);
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[test]
    fn every_taker_gets_the_event_and_its_args() {
        let bus = Arc::new(EventBus::default());
        let a = bus.subscribe(opts(4));
        let b = bus.subscribe(opts(4));
        let c = bus.subscribe(SubscribeOptions {
            select: Some(Box::new(|p| p == 2)),
            ..opts(4)
        });
        let mut e = ev(1);
        e.args.push(Value::Unsigned { bits: 8, value: 5 });
        assert_eq!(bus.publish(e), 0);
        for s in [&a, &b] {
            let got = s.drain(4);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].args[0], Value::Unsigned { bits: 8, value: 5 });
        }
        assert!(c.is_empty());
    }

    #[test]
    fn recycled_events_give_their_argument_lists_to_later_events() {
        let bus = Arc::new(EventBus::default());
        let sub = bus.subscribe(opts(4));
        assert!(bus.take_args().capacity() == 0, "nothing given back yet");
        let mut e = ev(1);
        e.args.push(Value::Unsigned { bits: 8, value: 5 });
        let args_at = e.args.as_ptr();
        let mut r = ev(2);
        r.kind = EventKind::Return {
            func: 0,
            return_to: 0,
            retval: 0,
            duration_ns: 0,
            entry_args: vec![Value::Char { value: 1 }],
        };
        let entry_at = match &r.kind {
            EventKind::Return { entry_args, .. } => entry_args.as_ptr(),
            EventKind::Entry => unreachable!(),
        };
        bus.publish(e);
        bus.publish(r);
        for e in sub.drain(4) {
            sub.recycle(e);
        }
        // The return's own list is empty (never allocated): not kept.
        assert_eq!(bus.spare_count(), 2);
        let got: Vec<_> = (0..2).map(|_| bus.take_args()).collect();
        assert_eq!(got[0].as_ptr(), args_at);
        assert_eq!(got[1].as_ptr(), entry_at);
        // Values stay, for the next fetch to overwrite in place.
        assert_eq!(got[0], vec![Value::Unsigned { bits: 8, value: 5 }]);
        assert_eq!(bus.spare_count(), 0);
        // Bounded: what does not fit is freed.
        for _ in 0..SPARE_ARG_LISTS + 5 {
            bus.give_back_args(Vec::with_capacity(1));
        }
        assert_eq!(bus.spare_count(), SPARE_ARG_LISTS);
    }

    #[test]
    fn interest_skips_fetch_only_when_every_interested_queue_is_full() {
        let bus = Arc::new(EventBus::default());
        assert_eq!(bus.interest(1), Interest::Nobody);
        let mut sel = bus.subscribe(SubscribeOptions {
            select: Some(Box::new(|p| p == 1)),
            // Would reject everything, but a full queue never asks it.
            filter: Some(Box::new(|_: &Event| false)),
            ..opts(1)
        });
        assert_eq!(bus.interest(2), Interest::Nobody);
        assert_eq!(bus.interest(1), Interest::Fetch);
        // Fill the queue past the filter: drain() is the consumer's only way in.
        sel.queue.queue.push(ev(1)).unwrap();
        assert_eq!(bus.interest(1), Interest::Dropped(1));
        assert_eq!(bus.interest(2), Interest::Nobody);
        assert_eq!(bus.publish(ev(1)), 1);
        assert_eq!(sel.take_dropped(), 2);

        // A filter-only subscriber must see the arguments: fetch again.
        let mut legacy = bus.subscribe(SubscribeOptions {
            filter: Some(Box::new(|e: &Event| e.probe_id == 3)),
            ..opts(1)
        });
        assert_eq!(bus.interest(1), Interest::Fetch);
        assert_eq!(bus.publish(ev(1)), 1); // sel full; legacy filters it out
        assert_eq!(legacy.take_dropped(), 0);
        assert_eq!(sel.take_dropped(), 1);
        drop(legacy);

        // Room again: fetch.
        assert_eq!(sel.drain(8).len(), 1);
        assert_eq!(bus.interest(1), Interest::Fetch);
    }
}
