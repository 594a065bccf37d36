//! The engine's own cost per probe hit on the fake VM (no KVM, one thread,
//! no contention), per probe shape, with a subscriber that takes every
//! event (and gives it back once consumed, as the service's stream does),
//! with one whose filter drops them all, and with none. The events
//! are drained outside the timed part: this is the producer's cost. Time
//! is the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so other builds on a
//! shared machine do not count while they hold the CPU.
//!
//! `cargo bench -p introspect --bench hit_path -- --warm-up-time 1 --measurement-time 3`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use introspect::Event;

#[path = "../tests/common/hit_rig.rs"]
mod hit_rig;

use hit_rig::{rig, Hitter, Shape};

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Hits between two drains of the subscriber's queue.
const BATCH: u64 = 512;

#[derive(Clone, Copy)]
enum Consumer {
    None,
    All,
    FilterRejects,
}

fn bench_shape(c: &mut Criterion, shape: Shape, consumer: Consumer) {
    let r = rig();
    shape.register(&r);
    let sub = match consumer {
        Consumer::None => None,
        Consumer::All => Some(r.engine.subscribe(4 * BATCH as usize, None, None)),
        Consumer::FilterRejects => Some(r.engine.subscribe(
            4 * BATCH as usize,
            Some(Box::new(|e: &Event| e.probe_id == u64::MAX)),
            None,
        )),
    };
    let mut h = Hitter::new(&r, shape);
    let label = match consumer {
        Consumer::None => "no_subscriber",
        Consumer::All => "subscriber",
        Consumer::FilterRejects => "filter_rejects",
    };
    c.bench_function(&format!("{}/{label}", shape.name()), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let n = BATCH.min(iters - done);
                let start = thread_cpu_time();
                for _ in 0..n {
                    h.hit(&r);
                }
                spent += thread_cpu_time() - start;
                done += n;
                if let Some(s) = &sub {
                    // As the service's stream does: events given back.
                    for e in s.drain(usize::MAX) {
                        s.recycle(e);
                    }
                }
            }
            spent
        })
    });
    if let Some(s) = &sub {
        assert_eq!(s.dropped_total(), 0, "the bench lost events");
    }
}

fn hit_path(c: &mut Criterion) {
    for shape in Shape::ALL {
        for consumer in [Consumer::All, Consumer::FilterRejects, Consumer::None] {
            bench_shape(c, shape, consumer);
        }
    }
}

criterion_group!(benches, hit_path);
criterion_main!(benches);
