//! Hostile: the host interrupts a busy Debian guest as often as it can, the
//! way API calls do (a stop of the world parks every vCPU; asking a vCPU for
//! its registers kicks it out of KVM_RUN), while the guest forks and makes
//! system calls that the VMM's bridge completes. The guest must finish its
//! loop, with every process's output intact.
//!
//! This found a guest-corrupting bug: with the vCPUs stopped every 5 ms, the
//! guest double-faulted within seconds (3 of 3 runs; stops alone 2 of 2,
//! register reads alone 2 of 2; about one Debian test in ten restores hit
//! it too). The host delivered a timer or IPI interrupt that was already on
//! its way when a user `syscall` faulted, with IF clear, to the first
//! instruction at LSTAR after the bridge completed the system call: on the
//! user stack, before `swapgs`. The bridge now runs the entry up to the
//! kernel stack itself (vmm::bridge::run_entry_prologue).

#[path = "common/debian.rs"]
mod debian;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debian::DebianGuest;

#[test]
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
    // Every bridged system call entered the kernel stack on the host.
    let b = g.exit_stats().bridge;
    eprintln!("bridge: {b:?}");
    assert!(b.syscalls > 1000, "{b:?}");
    assert_eq!(b.entries_on_host, b.syscalls, "{b:?}");
}
