//! Heap allocations per probe hit on the fake VM, counted by a global
//! allocator on the hitting thread only. After a warm-up (queues, instance
//! tables and caches reach their size), the engine's own work per hit
//! (site lookup, page walk, emulation, slot, kretprobe instance, event
//! numbering) allocates nothing; a delivered event allocates exactly its own
//! payload (the argument list, and each string's bytes), which the consumer
//! owns afterwards, unless the consumer gives its events back
//! (`Subscription::recycle`, as the service's stream does): then a hit
//! allocates nothing either.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use introspect::events::SubscribeOptions;

mod common {
    pub mod hit_rig;
}

use common::hit_rig::{rig, Hitter, Rig, Shape};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting touches only const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARM_UP: u64 = 64;
const HITS: u64 = 1000;

/// Hits between two calls of a consumer that runs while allocations count.
const CONSUME_EVERY: u64 = 32;

/// Allocations per hit of `shape` once warm, on this thread. `drain` runs
/// before and after the counted hits, `consume` every [`CONSUME_EVERY`]
/// hits, warm-up and counted alike (its own allocations count too).
fn allocations_per_hit(r: &Rig, shape: Shape, drain: &dyn Fn(), consume: &dyn Fn()) -> f64 {
    let mut h = Hitter::new(r, shape);
    for i in 0..WARM_UP {
        h.hit(r);
        if (i + 1) % CONSUME_EVERY == 0 {
            consume();
        }
    }
    drain();
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    for i in 0..HITS {
        h.hit(r);
        if (i + 1) % CONSUME_EVERY == 0 {
            consume();
        }
    }
    COUNTING.with(|on| on.set(false));
    drain();
    ALLOCATIONS.with(|n| n.get()) as f64 / HITS as f64
}

/// What one delivered event of `shape` owns on the heap: its argument list
/// (when it has arguments) and each string's bytes.
fn payload(shape: Shape) -> f64 {
    match shape {
        Shape::NoArgs => 0.0,
        Shape::ThreeInts | Shape::OutOfLine => 1.0,
        Shape::String | Shape::ThreeWithString => 2.0,
        // The entry args kept with the instance, the return's own list.
        Shape::Kretprobe => 2.0,
    }
}

/// `measure` run for each shape on a fresh rig with the shape's probe.
fn per_shape(measure: impl Fn(&Rig, Shape) -> f64) -> Vec<(Shape, f64)> {
    Shape::ALL
        .iter()
        .map(|&shape| {
            let r = rig();
            shape.register(&r);
            (shape, measure(&r, shape))
        })
        .collect()
}

#[test]
fn the_engine_allocates_nothing_per_hit_without_a_taker() {
    let got = per_shape(|r, shape| allocations_per_hit(r, shape, &|| {}, &|| {}));
    let want: Vec<(Shape, f64)> = Shape::ALL.iter().map(|&s| (s, 0.0)).collect();
    assert_eq!(got, want, "allocations per hit, no subscriber");
}

#[test]
fn a_subscriber_that_selects_other_probes_costs_no_allocation() {
    let got = per_shape(|r, shape| {
        let sub = r.engine.subscribe_with(SubscribeOptions {
            select: Some(Box::new(|_| false)),
            ..SubscribeOptions::new(16)
        });
        let n = allocations_per_hit(r, shape, &|| {}, &|| {});
        assert!(sub.is_empty());
        n
    });
    let want: Vec<(Shape, f64)> = Shape::ALL.iter().map(|&s| (s, 0.0)).collect();
    assert_eq!(
        got, want,
        "allocations per hit, a subscriber of other probes"
    );
}

#[test]
fn a_delivered_event_allocates_only_its_own_payload() {
    let got = per_shape(|r, shape| {
        let sub = r.engine.subscribe(4 * HITS as usize, None, None);
        let n = allocations_per_hit(r, shape, &|| drop(sub.drain(usize::MAX)), &|| {});
        assert_eq!(sub.dropped_total(), 0);
        n
    });
    let want: Vec<(Shape, f64)> = Shape::ALL.iter().map(|&s| (s, payload(s))).collect();
    assert_eq!(got, want, "allocations per delivered event");
}

#[test]
fn a_delivered_event_allocates_nothing_when_the_consumer_gives_events_back() {
    let got = per_shape(|r, shape| {
        let sub = r.engine.subscribe(4 * HITS as usize, None, None);
        // A consumer that takes events one by one as they come and gives
        // each back once done with it.
        let recycle = || {
            while let Some(e) = sub.pop() {
                sub.recycle(e);
            }
        };
        let n = allocations_per_hit(r, shape, &recycle, &recycle);
        assert_eq!(sub.dropped_total(), 0);
        n
    });
    let want: Vec<(Shape, f64)> = Shape::ALL.iter().map(|&s| (s, 0.0)).collect();
    assert_eq!(
        got, want,
        "allocations per delivered event, events given back"
    );
}
