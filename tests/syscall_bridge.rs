//! The system-call bridge: the test guest's user mode (`hvtest.user=N`) on
//! /dev/kvm, with counters reconciled between user code, the guest kernel
//! and the VMM.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use guest_access::VmControl;
use vmm::{BridgeMode, ExitStats, RunOutcome, Vm};

struct Run {
    outcome: RunOutcome,
    serial: String,
    stats: ExitStats,
    control: Arc<vmm::Shared>,
}

fn boot(vcpus: u8, cmdline: &str, mode: BridgeMode) -> Run {
    let (mut config, serial) = test_guest_config(vcpus, cmdline);
    config.syscall_bridge = mode;
    let vm = Vm::create(&config).expect("create VM");
    let control = vm.control();
    let running = vm.start(Arc::new(guest_access::NoProbes)).unwrap();
    let outcome = running
        .wait_timeout(Duration::from_secs(180))
        .expect("test guest did not finish within 180 s");
    let stats = running.exit_stats();
    drop(running);
    Run {
        outcome,
        serial: text(&serial),
        stats,
        control,
    }
}

fn sym_u64(mem: &dyn guest_access::GuestMemory, name: &str) -> u64 {
    read_u64(mem, phys(symbol(name)))
}

/// Whether this host needs the bridge (what `auto` decides).
fn host_needs_bridge() -> bool {
    vmm::detect::host_needs_bridge(std::path::Path::new("/dev/kvm")).expect("detection")
}

fn check_user_run(vcpus: u8, n: u64) {
    let r = boot(
        vcpus,
        &format!("hvtest.iters=2 hvtest.user={n}"),
        BridgeMode::Auto,
    );
    assert_eq!(
        r.outcome,
        RunOutcome::GuestExit { status: 0 },
        "serial:\n{}",
        r.serial
    );
    let mem = r.control.memory();
    let cpus = u64::from(vcpus);
    let made = sym_u64(mem, test_guest::USER_MADE_SYMBOL);
    let handled = sym_u64(mem, test_guest::USER_SYSCALLS_SYMBOL);
    let int80 = sym_u64(mem, test_guest::USER_INT80_SYMBOL);
    let faults = sym_u64(mem, test_guest::USER_FAULTS_SYMBOL);
    // N openat + one exit per CPU, made by user code, handled by the kernel.
    assert_eq!(made, cpus * (n + 1), "{}", r.serial);
    assert_eq!(handled, made);
    assert_eq!(int80, cpus * n);
    assert_eq!(faults, cpus * n.min(test_guest::USER_DEMAND_PAGES));
    assert!(
        r.serial.contains(&format!(
            "hvtest: user ok cpus={vcpus} syscalls={handled} int80={int80} faults={faults}"
        )),
        "{}",
        r.serial
    );
    let b = r.stats.bridge;
    let status = r.control.bridge_status().clone();
    if host_needs_bridge() {
        assert!(status.active, "{status:?}");
        // Exactly the system calls user code made went through the VMM.
        assert_eq!(b.syscalls, made, "{b:?}");
        assert_eq!(b.int80, int80, "{b:?}");
        // The genuine faults: the demand-zero pages (the guest kernel takes no other).
        assert_eq!(b.faults_passed, faults, "{b:?}");
        assert_eq!(b.step_fallbacks, 0, "{b:?}");
    } else {
        assert!(!status.active, "{status:?}");
        assert_eq!(b, vmm::BridgeStats::default());
    }
    eprintln!(
        "{vcpus} vCPU(s), {n} per CPU: {b:?}, exits {}",
        r.stats.exits
    );
}

#[test]
fn user_mode_reconciles_on_one_vcpu() {
    if !kvm_available() {
        return;
    }
    check_user_run(1, 200);
}

#[test]
fn user_mode_reconciles_on_two_vcpus() {
    if !kvm_available() {
        return;
    }
    check_user_run(2, 150);
}
