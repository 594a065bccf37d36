//! The VMM boots the test guest on /dev/kvm and routes int3 traps.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use guest_access::{BreakpointAction, BreakpointHandler, TrapKind, Vcpu, VmControl};
use vmm::{RunOutcome, Vm};

fn boot(vcpus: u8, cmdline: &str) -> (RunOutcome, String, Arc<vmm::Machine>) {
    let (config, serial) = test_guest_config(vcpus, cmdline);
    let vm = Vm::create(&config).expect("create VM");
    let control = vm.control();
    let running = vm.start(Arc::new(guest_access::NoProbes)).unwrap();
    let outcome = running
        .wait_timeout(Duration::from_secs(120))
        .expect("test guest did not finish within 120 s");
    drop(running);
    (outcome, text(&serial), control)
}

#[test]
fn boots_with_one_vcpu() {
    if !kvm_available() {
        return;
    }
    let (outcome, serial, _) = boot(1, "");
    assert_eq!(
        outcome,
        RunOutcome::GuestExit { status: 0 },
        "serial:\n{serial}"
    );
    assert!(serial.contains("hvtest: boot cpus=1"), "{serial}");
    assert!(serial.contains("hvtest: done ok cpus=1"), "{serial}");
}

#[test]
fn boots_with_two_and_four_vcpus() {
    if !kvm_available() {
        return;
    }
    for n in [2u8, 4] {
        let (outcome, serial, mem) = boot(n, "hvtest.iters=30");
        assert_eq!(
            outcome,
            RunOutcome::GuestExit { status: 0 },
            "serial:\n{serial}"
        );
        assert!(
            serial.contains(&format!("hvtest: done ok cpus={n}")),
            "{serial}"
        );
        // Every worker ran its loop: the callers' tally is a multiple of the
        // CPU count and the iterations, and the callees' counter matches it.
        let calls = guest_counter(mem.memory(), "hv_add");
        assert!(
            calls > 0 && calls.is_multiple_of(u64::from(n) * 30),
            "{calls}"
        );
        assert_eq!(calls, guest_expected(mem.memory(), "hv_add"));
    }
}

#[test]
fn guest_int3_goes_to_the_guest_handler() {
    if !kvm_available() {
        return;
    }
    let (outcome, serial, mem) = boot(2, "");
    assert_eq!(
        outcome,
        RunOutcome::GuestExit { status: 0 },
        "serial:\n{serial}"
    );
    assert!(serial.contains("hvtest: int3 ok"), "{serial}");
    let handled = read_u64(mem.memory(), phys(symbol(test_guest::BP_HANDLED_SYMBOL)));
    assert_eq!(handled, 1);
}

/// The simplest correct host breakpoint: stop the other vCPUs, restore the
/// original byte, single-step, re-plant. (The probe engine replaces this.)
struct StepOver {
    vaddr: u64,
    paddr: u64,
    original: u8,
    hits: AtomicU64,
    per_vcpu: Vec<AtomicU64>,
}

impl BreakpointHandler for StepOver {
    fn on_breakpoint(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        _: TrapKind,
    ) -> BreakpointAction {
        let rip = vcpu.regs().unwrap().rip;
        if rip != self.vaddr {
            return BreakpointAction::DeliverToGuest;
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        self.per_vcpu[vcpu.index()].fetch_add(1, Ordering::SeqCst);
        let _world = vm.stop_others(Some(vcpu.index()));
        vm.memory()
            .write_phys(self.paddr, &[self.original])
            .unwrap();
        vcpu.single_step().unwrap();
        assert_ne!(vcpu.regs().unwrap().rip, self.vaddr, "step did not advance");
        vm.memory().write_phys(self.paddr, &[0xcc]).unwrap();
        BreakpointAction::Resume
    }
}

#[test]
fn planted_int3_hits_equal_the_guest_call_counter() {
    if !kvm_available() {
        return;
    }
    for func in ["hv_add", "hv_fib"] {
        let (config, serial) = test_guest_config(2, "hvtest.iters=40");
        let vm = Vm::create(&config).unwrap();
        let control = vm.control();
        let vaddr = symbol(func);
        let paddr = phys(vaddr);
        let mut orig = [0u8; 1];
        control.memory().read_phys(paddr, &mut orig).unwrap();
        control.memory().write_phys(paddr, &[0xcc]).unwrap();
        let handler = Arc::new(StepOver {
            vaddr,
            paddr,
            original: orig[0],
            hits: AtomicU64::new(0),
            per_vcpu: (0..2).map(|_| AtomicU64::new(0)).collect(),
        });
        let running = vm.start(handler.clone()).unwrap();
        let outcome = running
            .wait_timeout(Duration::from_secs(180))
            .expect("guest finished");
        let stats = running.exit_stats();
        drop(running);
        let serial = text(&serial);
        assert_eq!(
            outcome,
            RunOutcome::GuestExit { status: 0 },
            "{func}: serial:\n{serial}"
        );
        let hits = handler.hits.load(Ordering::SeqCst);
        let calls = guest_counter(control.memory(), func);
        assert!(calls > 0);
        assert_eq!(hits, calls, "{func}: hits {hits} vs guest counter {calls}");
        // Both vCPUs ran through the probe.
        for (i, h) in handler.per_vcpu.iter().enumerate() {
            assert!(h.load(Ordering::SeqCst) > 0, "{func}: vCPU {i} never hit");
        }
        assert_eq!(stats.single_steps, hits);
        // The guest's own int3 still reached the guest.
        assert!(serial.contains("hvtest: int3 ok"), "{serial}");
        eprintln!("{func}: {hits} hits = guest counter; exits {stats:?}");
    }
}

#[test]
fn vmm_ports_match_the_test_guest_contract() {
    // The VMM defines its devices without knowing the test guest; the two
    // must still agree on the wire.
    assert_eq!(vmm::EXIT_PORT, test_guest::EXIT_PORT);
    assert_eq!(vmm::MARKER_PORT, test_guest::BENCH_MARKER_PORT);
}
