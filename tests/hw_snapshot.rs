//! `%hw` probes across a snapshot: the image holds pristine text, the
//! restored VM takes its debug registers again (the saved definition says
//! `%hw`), and the hits carry across the restore exactly.

mod common;

use std::time::Duration;

use common::*;
use guest_access::VmControl;
use vmm::{RunOutcome, Vm};

impl Probed {
    /// Run to a clean end; hits equal the guest's own counters.
    fn finish(&self, running: vmm::RunningVm, what: &str) {
        let o = running.wait_timeout(Duration::from_secs(240));
        assert_eq!(
            o,
            Some(RunOutcome::GuestExit { status: 0 }),
            "{what}:\n{}",
            text(&self.serial)
        );
        drop(running);
        let mem = self.control.memory();
        let add = guest_counter(mem, "hv_add");
        let fib = guest_counter(mem, "hv_fib");
        assert!(add > 0 && fib > 0, "{what}");
        assert_eq!(self.probe("t/add").hits, add, "{what}: t/add");
        let r = self.probe("t/fib");
        assert_eq!(r.hits, fib, "{what}: t/fib");
        assert_eq!(self.engine.stats().live_instances, 0, "{what}");
        for p in self.engine.list() {
            assert!(p.hardware && p.hw_slot.is_some(), "{what}: {p}");
        }
    }
}

#[test]
fn hardware_probes_survive_a_snapshot_and_restore() {
    if !kvm_available() {
        return;
    }
    let (config, serial) = test_guest_config(2, &test_guest::cmdline(Some(3000), None, false));
    let vm = Vm::create(&config).unwrap();
    let mut live = Probed::new(vm, serial);
    let text_gpas = text_range();
    let pristine = hash_range(live.control.memory(), text_gpas);
    let lines = vec![
        "p:t/add hv_add%hw".to_string(),
        "r:t/fib hv_fib%hw".to_string(),
    ];
    live.svc.create_lines(&lines).unwrap();
    let running = live.start();
    std::thread::sleep(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let resp = live.svc.create_snapshot(&snap, false).expect("snapshot");
    assert_eq!(resp.probes, 2);
    live.finish(running, "live guest");
    let image = std::fs::read(snap.join("memory.raw")).unwrap();
    assert_eq!(
        fnv1a(&image[text_gpas.0 as usize..text_gpas.1 as usize]),
        pristine,
        "text in the image differs from the pristine kernel"
    );
    drop(image);
    let probes_json = std::fs::read(snap.join("probes.json")).unwrap();
    let (config, serial) = test_guest_config(2, "");
    let (vm, _) = Vm::restore(&config, &snap).expect("restore");
    let mut g = Probed::new(vm, serial);
    g.svc.restore_probes(&probes_json).expect("restore probes");
    let add = g.probe("t/add");
    assert!(add.hardware && add.hw_slot.is_some(), "{add}");
    let running = g.start();
    g.finish(running, "restored guest");
}
