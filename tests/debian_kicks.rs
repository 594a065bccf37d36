//! Hostile: the host interrupts a busy Debian guest as often as it can, the
//! way API calls do (a stop of the world parks every vCPU; asking a vCPU for
//! its registers kicks it out of KVM_RUN), while the guest forks and makes
//! system calls that the VMM's bridge completes. The guest must finish its
//! loop, with every process's output intact.

#[path = "common/debian.rs"]
mod debian;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debian::DebianGuest;

#[test]
#[ignore = "open bug: at a 5 ms pace the guest double-faults within seconds (3 of 3 runs, with stops alone 2 of 2, with register reads alone 2 of 2; at 1000 ms 2 of 2 pass): a #PF taken at CPL0 on a user stack at system-call entry; the same crash hits the other Debian tests about once in ten restores"]
fn busy_guest_survives_the_host_stopping_and_kicking_it_every_few_ms() {
    let Some(mut g) = DebianGuest::start() else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (stops, kicks) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let pace = Duration::from_millis(
        std::env::var("HVPROBE_TEST_KICK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    // HVPROBE_TEST_KICK_KIND=stop or regs: only that kind (to tell them apart).
    let kind = std::env::var("HVPROBE_TEST_KICK_KIND").unwrap_or_default();
    let threads: Vec<_> = [true, false]
        .into_iter()
        .filter(|world| kind.is_empty() || (kind == "stop") == *world)
        .map(|world| {
            let (engine, stop) = (g.engine.clone(), stop.clone());
            let n = if world { stops.clone() } else { kicks.clone() };
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if world {
                        engine.set_armed(true).unwrap();
                    } else {
                        let _ = engine.kernel_system_regs();
                    }
                    n.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(pace);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let rc = g.run(
        "i=0; while [ $i -lt 40 ]; do cat /etc/hostname >/dev/null || exit 9; i=$((i+1)); done; \
         hvopen 200 /etc/hostname >/dev/null",
        600,
    );
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    eprintln!(
        "loop rc {rc} after {:.1} s: {} stops of the world, {} register reads, pace {pace:?}",
        t0.elapsed().as_secs_f64(),
        stops.load(Ordering::Relaxed),
        kicks.load(Ordering::Relaxed)
    );
    assert_eq!(rc, 0, "console:\n{}", g.console());
}
