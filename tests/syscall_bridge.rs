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
    control: Arc<vmm::Machine>,
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
        // Each entry ran on the host up to the kernel stack (the guest's
        // entry is Linux-shaped), so no interrupt can find the user stack.
        assert_eq!(b.entries_on_host, made, "{b:?}");
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

#[test]
fn bridge_off_makes_user_syscalls_fail_where_the_host_needs_it() {
    if !kvm_available() {
        return;
    }
    let r = boot(1, "hvtest.iters=1 hvtest.user=20", BridgeMode::Off);
    let status = r.control.bridge_status().clone();
    assert!(!status.active, "{status:?}");
    assert_eq!(r.stats.bridge, vmm::BridgeStats::default());
    if host_needs_bridge() {
        // The guest sees its first system call arrive as a #PF at LSTAR and says so.
        assert_eq!(
            r.outcome,
            RunOutcome::GuestExit {
                status: test_guest::EXIT_USER_SYSCALL
            },
            "serial:\n{}",
            r.serial
        );
        assert!(
            r.serial
                .contains("FAIL user cpu=0 syscall did not reach the kernel (#PF at entry_SYSCALL_64 err=0x15)"),
            "{}",
            r.serial
        );
        let mem = r.control.memory();
        assert_eq!(sym_u64(mem, test_guest::USER_SYSCALLS_SYMBOL), 0);
    } else {
        assert_eq!(
            r.outcome,
            RunOutcome::GuestExit { status: 0 },
            "{}",
            r.serial
        );
    }
}

#[test]
fn bridge_on_where_not_needed_is_refused() {
    if !kvm_available() {
        return;
    }
    let (mut config, _) = test_guest_config(1, "hvtest.iters=1 hvtest.user=5");
    config.syscall_bridge = BridgeMode::On;
    match Vm::create(&config) {
        Ok(vm) => {
            assert!(
                host_needs_bridge(),
                "on was accepted on a host that does not need it"
            );
            assert!(vm.control().bridge_status().active);
        }
        Err(e) => {
            assert!(!host_needs_bridge(), "on refused where needed: {e}");
            assert!(e.to_string().contains("not needed"), "{e}");
        }
    }
}

#[test]
fn idt_without_page_fault_gate_does_not_crash_the_vmm() {
    if !kvm_available() {
        return;
    }
    let r = boot(
        1,
        "hvtest.iters=1 hvtest.idt_gap hvtest.user=30",
        BridgeMode::Auto,
    );
    assert_eq!(
        r.outcome,
        RunOutcome::GuestExit { status: 0 },
        "serial:\n{}",
        r.serial
    );
    assert!(
        r.serial.contains("hvtest: idt without #PF gate"),
        "{}",
        r.serial
    );
    let b = r.stats.bridge;
    if host_needs_bridge() {
        // Seen without a #PF gate (DR0 left out), then armed on the restored
        // gate; every system call still went through.
        assert!(b.no_pf_handler >= 1, "{b:?}");
        assert!(b.rearms >= 2, "{b:?}");
        assert_eq!(b.syscalls, 31, "{b:?}");
    }
}

#[test]
fn probes_on_functions_reached_from_system_calls() {
    if !kvm_available() {
        return;
    }
    use introspect::{Handling, ProbeRequest};
    let (vcpus, n) = (2u8, 60u64);
    // No kernel-mode loop: hv_open_file runs only from openat, hv_add only
    // from int $0x80.
    let (config, serial) = test_guest_config(vcpus, &format!("hvtest.iters=0 hvtest.user={n}"));
    let vm = Vm::create(&config).unwrap();
    let control = vm.control();
    let engine = test_engine(control.clone(), vcpus.into());
    let mut open = ProbeRequest::kprobe("u/open", symbol("hv_open_file"));
    open.fetch = Some(
        probe_spec::parse_probe("p:u/open hv_open_file dfd=%di:s32 path=+0(%si):string").unwrap(),
    );
    let open = engine.register(open).unwrap();
    let mut add = ProbeRequest::kprobe("u/add_xol", symbol("hv_add"));
    add.force_out_of_line = true;
    let add = engine.register(add).unwrap();
    let ret = engine
        .register(ProbeRequest::kretprobe(
            "u/open_ret",
            symbol("hv_open_file"),
            None,
        ))
        .unwrap();
    // Single-stepped (stop the world): the step must keep the bridge's DR0/DR1.
    let mut sys = ProbeRequest::kprobe("u/syscall_ss", symbol("hv_syscall"));
    sys.force_single_step = true;
    let sys = engine.register(sys).unwrap();
    let sub = engine.subscribe(100_000, None, None);
    let running = vm.start(engine.clone()).unwrap();
    let outcome = running
        .wait_timeout(Duration::from_secs(240))
        .expect("guest finished");
    let stats = running.exit_stats();
    drop(running);
    let serial = text(&serial);
    assert_eq!(
        outcome,
        RunOutcome::GuestExit { status: 0 },
        "serial:\n{serial}"
    );
    let list = engine.list();
    let p = |id| list.iter().find(|p| p.id == id).unwrap().clone();
    assert_eq!(p(open).handling, Handling::Emulated);
    assert_eq!(p(add).handling, Handling::OutOfLine);
    let mem = control.memory();
    let want = u64::from(vcpus) * n;
    assert_eq!(guest_counter(mem, "hv_open_file"), want);
    assert_eq!(guest_counter(mem, "hv_add"), want);
    assert_eq!(p(open).hits, want);
    assert_eq!(p(ret).hits, want);
    assert_eq!(p(add).hits, want);
    assert_eq!(p(sys).handling, Handling::SingleStep);
    assert_eq!(p(sys).hits, sym_u64(mem, test_guest::USER_SYSCALLS_SYMBOL));
    assert_eq!(p(sys).hits, want + u64::from(vcpus));
    let events = sub.drain(usize::MAX);
    let opens: Vec<_> = events.iter().filter(|e| e.probe_id == open).collect();
    assert_eq!(opens.len() as u64, want);
    for e in opens {
        let probe_spec::Value::Str { bytes, .. } = &e.args[1] else {
            panic!("path: {:?}", e.args[1]);
        };
        let path = String::from_utf8_lossy(bytes);
        assert!(test_guest::OPEN_PATHS.contains(&&*path), "{path}");
    }
    if host_needs_bridge() {
        assert_eq!(stats.bridge.syscalls, want + u64::from(vcpus));
        assert_eq!(stats.bridge.int80, want);
    }
    eprintln!("probes from syscalls: {:?}", stats.bridge);
}

#[test]
fn page_fault_entry_the_emulator_refuses_is_single_stepped() {
    if !kvm_available() {
        return;
    }
    let n = 40;
    let r = boot(
        2,
        &format!("hvtest.iters=1 hvtest.pf_entry_cld hvtest.user={n}"),
        BridgeMode::Auto,
    );
    assert_eq!(
        r.outcome,
        RunOutcome::GuestExit { status: 0 },
        "serial:\n{}",
        r.serial
    );
    let faults = sym_u64(r.control.memory(), test_guest::USER_FAULTS_SYMBOL);
    assert_eq!(faults, 2 * test_guest::USER_DEMAND_PAGES);
    let b = r.stats.bridge;
    if host_needs_bridge() {
        // Every genuine fault stepped over `cld`; syscalls still converted.
        assert_eq!(b.faults_passed, faults, "{b:?}");
        assert_eq!(b.step_fallbacks, faults, "{b:?}");
        assert_eq!(b.syscalls, 2 * (n + 1), "{b:?}");
        assert_eq!(
            r.stats.single_steps, 0,
            "the engine did not step: {:?}",
            r.stats
        );
    }
}
