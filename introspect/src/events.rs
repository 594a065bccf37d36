//! Probe events and their delivery: bounded per-subscriber queues that a vCPU
//! fills without ever blocking. A full queue drops the event and counts it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crossbeam_queue::ArrayQueue;
use guest_access::Regs;
use probe_spec::ArgValue;

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
        /// Arguments fetched at entry.
        entry_args: Vec<ArgValue>,
    },
}

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
    /// Registers at the hit (entry) or at the return.
    pub regs: Regs,
    /// Fetched arguments (for returns: those fetched at return, e.g. `$retval`).
    pub args: Vec<ArgValue>,
}

/// Selects events for a subscriber; runs on the vCPU thread, so keep it cheap.
pub type EventFilter = Box<dyn Fn(&Event) -> bool + Send + Sync>;
/// Called after an event is queued (e.g. to wake an async task).
pub type Waker = Box<dyn Fn() + Send + Sync>;

pub(crate) struct SubscriberQueue {
    pub id: u64,
    queue: ArrayQueue<Event>,
    dropped: AtomicU64,
    delivered: AtomicU64,
    filter: Option<EventFilter>,
    waker: Option<Waker>,
}

/// All subscribers.
#[derive(Default)]
pub(crate) struct EventBus {
    subs: RwLock<Vec<Arc<SubscriberQueue>>>,
    next_id: AtomicU64,
}

impl EventBus {
    /// Offer an event to every subscriber. Returns how many queues were full.
    pub fn publish(&self, ev: &Event) -> u64 {
        let subs = self.subs.read().unwrap();
        let mut dropped = 0;
        for s in subs.iter() {
            if let Some(f) = &s.filter {
                if !f(ev) {
                    continue;
                }
            }
            if s.queue.push(ev.clone()).is_err() {
                s.dropped.fetch_add(1, Ordering::Relaxed);
                dropped += 1;
            } else {
                s.delivered.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(w) = &s.waker {
                w();
            }
        }
        dropped
    }

    pub fn has_subscribers(&self) -> bool {
        !self.subs.read().unwrap().is_empty()
    }

    pub fn subscribe(
        self: &Arc<Self>,
        capacity: usize,
        filter: Option<EventFilter>,
        waker: Option<Waker>,
    ) -> Subscription {
        let q = Arc::new(SubscriberQueue {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            queue: ArrayQueue::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            filter,
            waker,
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

    pub fn pop(&self) -> Option<Event> {
        self.queue.queue.pop()
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
            regs: Regs::default(),
            args: vec![],
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let bus = Arc::new(EventBus::default());
        let mut sub = bus.subscribe(2, None, None);
        assert_eq!(bus.publish(&ev(1)), 0);
        assert_eq!(bus.publish(&ev(1)), 0);
        assert_eq!(bus.publish(&ev(1)), 1);
        assert_eq!(bus.publish(&ev(1)), 1);
        assert_eq!(sub.take_dropped(), 2);
        assert_eq!(sub.take_dropped(), 0);
        assert_eq!(sub.drain(10).len(), 2);
        assert_eq!(bus.publish(&ev(1)), 0);
        assert_eq!(sub.dropped_total(), 2);
    }

    #[test]
    fn filter_and_unsubscribe_on_drop() {
        let bus = Arc::new(EventBus::default());
        let only_7 = bus.subscribe(8, Some(Box::new(|e: &Event| e.probe_id == 7)), None);
        bus.publish(&ev(1));
        bus.publish(&ev(7));
        assert_eq!(only_7.drain(8).len(), 1);
        assert_eq!(bus.subscriber_count(), 1);
        drop(only_7);
        assert_eq!(bus.subscriber_count(), 0);
    }
}
