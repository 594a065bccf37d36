//! Snapshot state capture on a running guest (/dev/kvm).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmm::snapshot_state::VcpuState;
use vmm::{RunOutcome, Vm};

fn rip(s: &VcpuState) -> u64 {
    s.rip().unwrap()
}

/// 2 vCPUs in `hvtest.forever`: capture all vCPU and VM state three times
/// while the guest runs; the guest keeps running between captures and the
/// captured state is complete and changes (the guest made progress).
#[test]
fn capture_state_of_a_running_two_vcpu_guest() {
    if !kvm_available() {
        return;
    }
    let (config, serial) = test_guest_config(2, "hvtest.forever");
    let vm = Vm::create(&config).expect("create VM");
    let running = vm.start(Arc::new(guest_access::NoProbes)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut rips = Vec::new();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let (vcpus, vmstate) = running.capture_state().expect("capture");
        eprintln!("capture took {:?}", t.elapsed());
        assert_eq!(vcpus.len(), 2);
        for s in &vcpus {
            assert!(!s.msrs.is_empty());
            assert_eq!(s.xsave.0.len(), 4096);
            assert!(rip(s) != 0);
        }
        assert!(!vmstate.ioapic.0.is_empty());
        rips.push(vcpus.iter().map(rip).collect::<Vec<_>>());
        assert_eq!(
            running.wait_timeout(Duration::from_millis(300)),
            None,
            "guest still runs"
        );
    }
    assert!(
        rips.windows(2).any(|w| w[0] != w[1]),
        "no progress: {rips:?}"
    );
    running.stop();
    assert_eq!(
        running.wait_timeout(Duration::from_secs(10)),
        Some(RunOutcome::Stopped),
        "serial:\n{}",
        text(&serial)
    );
}
