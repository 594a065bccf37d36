//! Snapshot and restore of a running test guest with probes armed
//! (/dev/kvm): the image holds no host byte, restored guests finish their
//! own checks, and probe counters carry across the restore exactly.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use guest_access::VmControl;
use introspect::Handling;
use vmm::{RunOutcome, Vm};

impl Probed {
    /// After a clean end of the guest: every probe's hits equal the guest's
    /// own call counter, and every kretprobe activation came back through
    /// the trap (none is lost across the restore).
    fn check_counters(&self, what: &str) {
        let mem = self.control.memory();
        let add = guest_counter(mem, "hv_add");
        let fib = guest_counter(mem, "hv_fib");
        assert!(add > 1000 && fib > 1000, "{what}: guest made progress");
        assert_eq!(self.probe("t/add").hits, add, "{what}: t/add");
        assert_eq!(self.probe("t/lock").hits, fib, "{what}: t/lock");
        let ret = self.probe("t/fib");
        assert_eq!(ret.hits, fib, "{what}: t/fib");
        let st = self.engine.stats();
        assert_eq!(st.live_instances, 0, "{what}: instances left");
        assert_eq!(
            st.return_traps,
            ret.hits - ret.missed - st.recycled_instances,
            "{what}: every kretprobe activation returned through the trap \
             ({} missed, {} recycled)",
            ret.missed,
            st.recycled_instances
        );
    }
}

const PROBES: &[&str] = &["p:t/add hv_add", "r:t/fib hv_fib"];

/// (name, FNV-1a hash) of every file in `dir`.
fn file_hash(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let h = fnv1a(&std::fs::read(&p).unwrap());
            (p.file_name().unwrap().to_string_lossy().into_owned(), h)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn snapshot_mid_run_then_two_restores_at_once_finish_with_exact_counters() {
    if !kvm_available() {
        return;
    }
    let cmdline = test_guest::cmdline(Some(6000), None, false);
    let (config, serial) = test_guest_config(2, &cmdline);
    let vm = Vm::create(&config).unwrap();
    let mut live = Probed::new(vm, serial);
    let text_gpas = text_range();
    let pristine = hash_range(live.control.memory(), text_gpas);
    let lock = first_locked_insn(live.control.memory(), "hv_fib");
    let mut lines: Vec<String> = PROBES.iter().map(|s| s.to_string()).collect();
    lines.push(format!("p:t/lock {lock:#x}"));
    live.svc.create_lines(&lines).unwrap();
    assert_eq!(live.probe("t/lock").handling, Handling::OutOfLine);
    assert_eq!(live.probe("t/add").handling, Handling::Emulated);
    let trap = live.engine.return_trap_address().unwrap();
    let running = live.start();
    std::thread::sleep(Duration::from_millis(500));

    // Snapshot mid-run, until one catches kretprobe instances live.
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mut resp = None;
    for _ in 0..40 {
        let r = live.svc.create_snapshot(&snap, false).expect("snapshot");
        if r.kretprobe_instances > 0 {
            resp = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = resp.expect("a snapshot with live kretprobe instances");
    eprintln!("snapshot: {resp:?}");
    assert_eq!(resp.probes, 3);
    assert!(resp.restored_bytes >= 3, "sites, slot and trap bytes saved");
    assert_eq!(
        running.wait_timeout(Duration::from_millis(1)),
        None,
        "the live guest runs on"
    );

    // The live guest finishes its own checks with the probes intact.
    let o = running.wait_timeout(Duration::from_secs(240));
    assert_eq!(
        o,
        Some(RunOutcome::GuestExit { status: 0 }),
        "live guest:\n{}",
        text(&live.serial)
    );
    drop(running);
    live.check_counters("live guest");

    // The image is the guest's own memory: pristine text (no int3, slot or
    // trap byte) and no stack slot pointing at the trap.
    let image = std::fs::read(snap.join("memory.raw")).unwrap();
    assert_eq!(
        fnv1a(&image[text_gpas.0 as usize..text_gpas.1 as usize]),
        pristine,
        "text in the image differs from the pristine kernel"
    );
    let trap_bytes = trap.to_le_bytes();
    let at_trap = image
        .windows(8)
        .step_by(8)
        .filter(|w| *w == trap_bytes)
        .count();
    assert_eq!(
        at_trap, 0,
        "stack slots in the image still point at the trap"
    );
    drop(image);

    let before = file_hash(&snap);
    let probes_json = std::fs::read(snap.join("probes.json")).unwrap();
    let t0 = Instant::now();
    let restores: Vec<_> = (0..2)
        .map(|i| {
            let snap = snap.clone();
            let probes_json = probes_json.clone();
            std::thread::spawn(move || {
                let (config, serial) = test_guest_config(2, "");
                let (vm, restored) = Vm::restore(&config, &snap).expect("restore");
                assert!(restored.probes.is_some());
                let mut g = Probed::new(vm, serial);
                g.svc.restore_probes(&probes_json).expect("restore probes");
                let running = g.start();
                let o = running.wait_timeout(Duration::from_secs(240));
                assert_eq!(
                    o,
                    Some(RunOutcome::GuestExit { status: 0 }),
                    "restored guest {i}:\n{}",
                    text(&g.serial)
                );
                drop(running);
                assert!(
                    text(&g.serial).contains("done ok"),
                    "restored guest {i}: {}",
                    text(&g.serial)
                );
                g.check_counters(&format!("restored guest {i}"));
                g.probe("t/fib").hits
            })
        })
        .collect();
    for r in restores {
        r.join().expect("restored guest");
    }
    eprintln!("two restores ran to the end in {:?}", t0.elapsed());
    assert_eq!(file_hash(&snap), before, "the snapshot files are unchanged");
}

/// `--no-probes`: the image alone is a clean guest (no trap address on its
/// stacks, no int3 in its text), so it runs to the end without hvprobe's
/// help; and a snapshot with probes disarmed restores disarmed.
#[test]
fn restore_without_probes_runs_clean() {
    if !kvm_available() {
        return;
    }
    let (config, serial) = test_guest_config(2, &test_guest::cmdline(Some(5000), None, false));
    let vm = Vm::create(&config).unwrap();
    let mut live = Probed::new(vm, serial);
    let lines: Vec<String> = PROBES.iter().map(|s| s.to_string()).collect();
    live.svc.create_lines(&lines).unwrap();
    let running = live.start();
    std::thread::sleep(Duration::from_millis(400));
    let dir = tempfile::tempdir().unwrap();
    let mut instances = 0;
    for _ in 0..40 {
        instances = live
            .svc
            .create_snapshot(dir.path(), false)
            .unwrap()
            .kretprobe_instances;
        if instances > 0 {
            break;
        }
    }
    assert!(instances > 0);
    live.engine.set_armed(false).unwrap();
    let disarmed = dir.path().join("disarmed");
    live.svc.create_snapshot(&disarmed, true).unwrap();
    let o = running.wait_timeout(Duration::from_secs(60));
    assert_eq!(o, Some(RunOutcome::Stopped), "--stop stops the guest");
    drop(running);

    // With no probe table, as `run --restore --no-probes` does.
    let (config, serial) = test_guest_config(2, "");
    let (vm, _) = Vm::restore(&config, dir.path()).unwrap();
    let running = vm.start(Arc::new(guest_access::NoProbes)).unwrap();
    let o = running.wait_timeout(Duration::from_secs(240));
    assert_eq!(
        o,
        Some(RunOutcome::GuestExit { status: 0 }),
        "{}",
        text(&serial)
    );
    drop(running);

    // Disarmed when saved: restored disarmed, no int3 planted.
    let (config, serial) = test_guest_config(2, "");
    let (vm, restored) = Vm::restore(&config, &disarmed).unwrap();
    let mut g = Probed::new(vm, serial);
    g.svc.restore_probes(&restored.probes.unwrap()).unwrap();
    assert!(!g.engine.armed());
    // Only the return trap, for the instances still live, is planted.
    let trap = phys(g.engine.return_trap_address().unwrap());
    assert!(g.engine.planted_bytes().iter().all(|(gpa, _)| *gpa == trap));
    let running = g.start();
    assert_eq!(
        running.wait_timeout(Duration::from_secs(240)),
        Some(RunOutcome::GuestExit { status: 0 }),
        "{}",
        text(&g.serial)
    );
    drop(running);
    assert_eq!(
        g.probe("t/add").hits,
        live.probe("t/add").hits,
        "no hits while disarmed"
    );
}

/// Hostile: snapshots taken back to back while another thread registers and
/// deletes probes of every handling (emulated, out of line, single-step,
/// kretprobe) on running vCPUs. Every image holds pristine text, the live
/// guest finishes its own checks, and its text is pristine at the end.
#[test]
fn snapshots_race_with_probe_churn() {
    if !kvm_available() {
        return;
    }
    let (config, serial) = test_guest_config(2, &test_guest::cmdline(Some(40000), None, false));
    let vm = Vm::create(&config).unwrap();
    let mut live = Probed::new(vm, serial);
    let text_gpas = text_range();
    let pristine = hash_range(live.control.memory(), text_gpas);
    let running = live.start();
    let engine = live.engine.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut ids = Vec::new();
            let mut ops = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if ids.len() < 6 || !rng.is_multiple_of(3) {
                    let f = test_guest::COUNTED_FUNCTIONS
                        [(rng >> 8) as usize % test_guest::COUNTED_FUNCTIONS.len()];
                    let name = format!("churn/p{ops}");
                    let mut req = if (rng >> 20).is_multiple_of(4) {
                        introspect::ProbeRequest::kretprobe(name, symbol(f), None)
                    } else {
                        introspect::ProbeRequest::kprobe(name, symbol(f))
                    };
                    req.force_single_step = (rng >> 30).is_multiple_of(3);
                    req.force_out_of_line = (rng >> 30) % 3 == 1;
                    if let Ok(id) = engine.register(req) {
                        ids.push(id);
                    }
                } else {
                    let id = ids.swap_remove((rng >> 40) as usize % ids.len());
                    engine.unregister(id).unwrap();
                }
                ops += 1;
            }
            engine.unregister_batch(&ids).unwrap();
            ops
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let mut taken = 0;
    let mut with_instances = 0;
    let t0 = Instant::now();
    // Ten snapshots, or as many as fit before the guest ends (a loaded
    // machine writes them slowly).
    while taken < 10 && running.wait_timeout(Duration::ZERO).is_none() {
        let snap = dir.path().join(format!("s{}", taken % 2));
        let r = live.svc.create_snapshot(&snap, false).expect("snapshot");
        let image = std::fs::read(snap.join("memory.raw")).unwrap();
        assert_eq!(
            fnv1a(&image[text_gpas.0 as usize..text_gpas.1 as usize]),
            pristine,
            "snapshot {taken} ({r:?}) holds patched text"
        );
        taken += 1;
        with_instances += usize::from(r.kretprobe_instances > 0);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let ops = churn.join().unwrap();
    let o = running.wait_timeout(Duration::from_secs(240));
    assert_eq!(
        o,
        Some(RunOutcome::GuestExit { status: 0 }),
        "{}",
        text(&live.serial)
    );
    drop(running);
    assert_eq!(hash_range(live.control.memory(), text_gpas), pristine);
    eprintln!("{taken} snapshots ({with_instances} with live kretprobe instances) during {ops} probe operations");
    eprintln!("in {:?}", t0.elapsed());
    assert!(
        taken >= 3 && ops >= 20,
        "{taken} snapshots, {ops} operations"
    );
}
