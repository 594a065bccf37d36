//! Hardware-breakpoint (`%hw`) probes on /dev/kvm with the test guest: a
//! debug register instead of an int3, exact hit counts on 2 vCPUs, guest
//! text never written, refusal beyond the free registers, kretprobes whose
//! entry is a debug register.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use guest_access::VmControl;
use introspect::{EventKind, ProbeError, ProbeRequest};
use vmm::RunOutcome;

impl Setup {
    /// Run the guest to its end, calling `watch` every few milliseconds
    /// while it runs.
    fn run_watching(&mut self, mut watch: impl FnMut(&Setup)) -> RunOutcome {
        let running = self.vm.take().unwrap().start(self.engine.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            watch(self);
            if let Some(o) = running.wait_timeout(Duration::from_millis(5)) {
                return o;
            }
            assert!(Instant::now() < deadline, "guest did not finish in time");
        }
    }

    fn assert_ok(&self, o: &RunOutcome) {
        assert_eq!(
            *o,
            RunOutcome::GuestExit { status: 0 },
            "serial:\n{}",
            text(&self.serial)
        );
    }

    /// Debug registers no one holds yet (the system-call bridge of an
    /// emulating host keeps two).
    fn free_slots(&self) -> usize {
        4 - self.control.hw_slots().len()
    }
}

fn hw_kprobe(name: &str, func: &str) -> ProbeRequest {
    let mut r = ProbeRequest::kprobe(name, symbol(func));
    r.hardware = true;
    r
}

#[test]
fn hardware_probes_hit_exactly_on_two_vcpus_and_never_write_text() {
    if !kvm_available() {
        return;
    }
    let mut s = setup(2, "hvtest.iters=40");
    let free = s.free_slots();
    assert!(
        free >= 1,
        "no debug register free: {:?}",
        s.control.hw_slots()
    );
    let text = text_range();
    let before = hash_range(s.control.memory(), text);
    // One probe per free register, on functions every worker calls.
    let funcs = ["hv_add", "hv_fib", "hv_checksum", "hv_many_args"];
    let mut ids = Vec::new();
    for (i, f) in funcs[..free].iter().enumerate() {
        let mut req = hw_kprobe(&format!("t/{f}_hw"), f);
        // The second steps in place instead of being emulated.
        req.force_single_step = i == 1;
        req.fetch = Some(probe_spec::parse_probe(&format!("p:t/{f}_hw {f}%hw a=%di:u64")).unwrap());
        ids.push((*f, s.engine.register(req).unwrap()));
    }
    // One more is refused, saying who holds every register, and leaves no trace.
    let err = s
        .engine
        .register(hw_kprobe("t/one_too_many", funcs[free]))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ProbeError::NoHwSlot { .. }), "{err:?}");
    assert!(msg.contains("all 4 are in use"), "{msg}");
    for (f, _) in &ids {
        assert!(msg.contains(&format!("t/{f}_hw")), "{msg}");
    }
    if s.control.bridge_status().active {
        assert!(msg.contains("DR0: system-call bridge"), "{msg}");
    }
    assert_eq!(
        s.engine.list().len(),
        ids.len(),
        "the refused probe is gone"
    );
    // The listing names each register, and they differ.
    let list = s.engine.list();
    let slots: BTreeSet<usize> = list.iter().map(|p| p.hw_slot.unwrap()).collect();
    assert_eq!(slots.len(), ids.len());
    for p in &list {
        assert!(p.hardware, "{p}");
        assert!(p.to_string().contains("[HW: DR"), "{p}");
    }
    assert_eq!(
        before,
        hash_range(s.control.memory(), text),
        "registering wrote text"
    );
    let sub = s.engine.subscribe(1_000_000, None, None);
    let mut checks = 0u64;
    let o = s.run_watching(|s| {
        assert_eq!(
            before,
            hash_range(s.control.memory(), text),
            "guest text changed while hardware probes were armed"
        );
        checks += 1;
    });
    s.assert_ok(&o);
    assert!(checks > 1, "text checked {checks} times only");
    let mem = s.control.memory();
    let list = s.engine.list();
    let events = sub.drain(usize::MAX);
    let mut total = 0;
    for (f, id) in &ids {
        let calls = guest_counter(mem, f);
        let p = list.iter().find(|p| p.id == *id).unwrap();
        assert!(calls > 0, "{f} never called");
        assert_eq!(p.hits, calls, "{f}: hits {} != guest calls {calls}", p.hits);
        let mine: Vec<_> = events.iter().filter(|e| e.probe_id == *id).collect();
        assert_eq!(mine.len() as u64, calls, "{f}: events");
        let vcpus: BTreeSet<u32> = mine.iter().map(|e| e.vcpu).collect();
        assert_eq!(vcpus.len(), 2, "{f} hit on vCPUs {vcpus:?}");
        assert!(mine.iter().all(|e| e.ip == symbol(f)));
        total += calls;
    }
    let st = s.engine.stats();
    eprintln!("{st:?}");
    assert_eq!(st.hardware_hits, total);
    assert_eq!(st.stale_traps, 0);
    assert!(st.emulated > 0);
    if free > 1 {
        assert_eq!(st.single_stepped, guest_counter(mem, funcs[1]));
    }
    assert_eq!(before, hash_range(mem, text));
    // Deleting gives the registers back: as many probes fit again.
    for (_, id) in &ids {
        s.engine.unregister(*id).unwrap();
    }
    assert_eq!(s.free_slots(), free);
}

#[test]
fn kretprobe_with_a_hardware_entry_reports_every_return() {
    if !kvm_available() {
        return;
    }
    let mut s = setup(2, "hvtest.iters=30");
    let text = text_range();
    let trap = s.engine.return_trap_address().unwrap();
    let masked = |s: &Setup| {
        let mut b = read_range(s.control.memory(), text);
        b[(phys(trap) - text.0) as usize] = 0;
        fnv1a(&b)
    };
    let before = masked(&s);
    let mut req = ProbeRequest::kretprobe("t/recurse_hw", symbol("hv_recurse"), Some(64));
    req.hardware = true;
    req.fetch = Some(
        probe_spec::parse_probe("r:t/recurse_hw hv_recurse%hw depth=%di:s32 ret=$retval:s64")
            .unwrap(),
    );
    let id = s.engine.register(req).unwrap();
    let row = s.engine.list().into_iter().find(|p| p.id == id).unwrap();
    assert!(row.hardware && row.hw_slot.is_some(), "{row}");
    let sub = s.engine.subscribe(1_000_000, None, None);
    let o = s.run_watching(|s| assert_eq!(before, masked(s), "text beyond the return trap"));
    s.assert_ok(&o);
    let calls = guest_counter(s.control.memory(), "hv_recurse");
    let p = s.engine.list().into_iter().find(|p| p.id == id).unwrap();
    let events = sub.drain(usize::MAX);
    assert!(calls > 0);
    assert_eq!(p.hits, calls);
    assert_eq!(events.len() as u64 + p.missed, calls);
    assert!(!events.is_empty());
    for e in &events {
        let EventKind::Return {
            retval, entry_args, ..
        } = &e.kind
        else {
            panic!("expected a return event: {e:?}");
        };
        let probe_spec::Value::Signed { value: d, .. } = entry_args[0] else {
            panic!("depth: {:?}", entry_args[0]);
        };
        assert_eq!(*retval as i64, d * (d + 1) / 2, "hv_recurse({d})");
    }
    assert_eq!(s.engine.stats().live_instances, 0);
}

#[test]
fn mixing_an_int3_and_a_hardware_breakpoint_at_one_address_is_refused() {
    if !kvm_available() {
        return;
    }
    let s = setup(1, "hvtest.iters=1");
    let a = s
        .engine
        .register(ProbeRequest::kprobe("t/int3", symbol("hv_add")))
        .unwrap();
    let err = s
        .engine
        .register(hw_kprobe("t/hw", "hv_add"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already there trap with an int3"), "{err}");
    s.engine.unregister(a).unwrap();
    let h = s.engine.register(hw_kprobe("t/hw", "hv_add")).unwrap();
    let err = s
        .engine
        .register(ProbeRequest::kprobe("t/int3", symbol("hv_add")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("hardware breakpoint (%hw)"), "{err}");
    // Out of line would write a slot: refused for a hardware probe.
    let mut xol = hw_kprobe("t/xol", "hv_fib");
    xol.force_out_of_line = true;
    let err = s.engine.register(xol).unwrap_err().to_string();
    assert!(err.contains("cannot run out of line"), "{err}");
    // In one batch too, and the batch leaves nothing behind.
    let before = s.free_slots();
    let err = s
        .engine
        .register_batch(vec![
            hw_kprobe("t/b1", "hv_fib"),
            ProbeRequest::kprobe("t/b2", symbol("hv_fib")),
        ])
        .unwrap_err();
    assert_eq!(err.index, 1, "{err}");
    assert_eq!(s.free_slots(), before);
    assert_eq!(s.engine.list().len(), 1);
    // A batch that needs one register more than are free: the registers
    // its first probes took are given back.
    let funcs = ["hv_fib", "hv_checksum", "hv_many_args", "hv_work_item"];
    let batch = funcs[..=before]
        .iter()
        .map(|f| hw_kprobe(&format!("t/{f}_b"), f))
        .collect();
    let err = s.engine.register_batch(batch).unwrap_err();
    assert_eq!(err.index, before, "{err}");
    assert!(matches!(err.error, ProbeError::NoHwSlot { .. }), "{err}");
    assert_eq!(s.free_slots(), before);
    assert_eq!(s.engine.list().len(), 1);
    // Disabling gives the register back; enabling takes it again.
    s.engine.set_enabled(h, false).unwrap();
    assert_eq!(s.free_slots(), before + 1);
    assert_eq!(s.engine.list()[0].hw_slot, None);
    s.engine.set_enabled(h, true).unwrap();
    assert_eq!(s.free_slots(), before);
}

/// Hostile: hardware probes registered, enabled, disabled, disarmed and
/// deleted in a loop (with more asked for than there are registers) while
/// two vCPUs run through the probed functions. The guest's own checks must
/// pass, text must never change, hits may not outnumber calls, and every
/// register must come back.
#[test]
fn hardware_probe_churn_while_two_vcpus_run() {
    if !kvm_available() {
        return;
    }
    let mut s = setup(2, "hvtest.iters=400");
    let free = s.free_slots();
    let text = text_range();
    let before = hash_range(s.control.memory(), text);
    let funcs = [
        "hv_add",
        "hv_fib",
        "hv_checksum",
        "hv_many_args",
        "hv_work_item",
    ];
    let engine = s.engine.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let churn = std::thread::spawn(move || {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut ops, mut refused, mut n) = (0u64, 0u64, 0u64);
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let mut ids = Vec::new();
            // One more than the free registers: the last one is refused.
            for i in 0..=free {
                n += 1;
                let f = funcs[(next() as usize + i) % funcs.len()];
                let mut r = hw_kprobe(&format!("c/{f}_{n}"), f);
                r.force_single_step = next() % 3 == 0;
                match engine.register(r) {
                    Ok(id) => ids.push(id),
                    Err(ProbeError::NoHwSlot { .. }) => refused += 1,
                    // Two probes at one address in a round: a second site
                    // is no new register, so nothing to refuse there.
                    Err(e) => panic!("unexpected refusal: {e}"),
                }
            }
            for id in &ids {
                match next() % 3 {
                    0 => engine.set_enabled(*id, false).unwrap(),
                    1 => engine.set_armed(false).and(engine.set_armed(true)).unwrap(),
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(next() % 4));
            engine.unregister_batch(&ids).unwrap();
            ops += 1;
        }
        (ops, refused)
    });
    let o = s.run_watching(|s| {
        assert_eq!(before, hash_range(s.control.memory(), text), "text changed");
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ops, refused) = churn.join().unwrap();
    s.assert_ok(&o);
    let st = s.engine.stats();
    eprintln!("{ops} rounds, {refused} refused; {st:?}");
    assert!(ops > 3, "only {ops} churn rounds");
    assert!(refused > 0, "never asked for more than the free registers");
    assert!(st.hardware_hits > 0);
    // A site hit counts once, whatever number of probes it carries.
    let calls: u64 = funcs
        .iter()
        .map(|f| guest_counter(s.control.memory(), f))
        .sum();
    assert!(
        st.hardware_hits <= calls,
        "{} hits > {calls} calls",
        st.hardware_hits
    );
    assert_eq!(s.free_slots(), free, "every register came back");
    assert!(s.engine.list().is_empty());
    assert_eq!(before, hash_range(s.control.memory(), text));
}
