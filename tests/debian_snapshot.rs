//! Debian's 6.1 cloud kernel restored from the snapshot that
//! tests/debian/snapshot.sh caches (its /init waits for commands on the
//! console): a command typed on the console is run by the restored guest,
//! and a probe on `do_sys_openat2` streams the path it opens.
//!
//! tests/run.sh builds the cache when it is missing and passes its directory
//! in HVPROBE_DEBIAN_SNAPSHOT; without it this test is skipped, or fails
//! under HVPROBE_REQUIRE_DEBIAN=1.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use introspect::EventKind;
use probe_spec::Value;
use service::{ServiceConfig, Symbols};

fn snapshot_dir() -> Option<PathBuf> {
    match std::env::var("HVPROBE_DEBIAN_SNAPSHOT") {
        Ok(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => {
            assert_ne!(
                std::env::var("HVPROBE_REQUIRE_DEBIAN").as_deref(),
                Ok("1"),
                "HVPROBE_REQUIRE_DEBIAN=1 but HVPROBE_DEBIAN_SNAPSHOT is not set \
                 (tests/run.sh sets it from tests/debian/snapshot.sh)"
            );
            eprintln!("SKIPPED: no Debian snapshot (run tests/debian/snapshot.sh)");
            None
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn restored_debian_runs_a_console_command_and_its_open_is_streamed() {
    let Some(dir) = snapshot_dir() else {
        return;
    };
    let t0 = Instant::now();
    let manifest = vmm::snapshot::Manifest::load(&dir).expect("cached snapshot");
    let serial = Arc::new(Mutex::new(Vec::new()));
    let mut config = vmm::VmConfig::new(&manifest.kernel);
    config.vcpus = manifest.vcpus;
    config.memory_mib = manifest.memory_bytes >> 20;
    config.serial = vmm::SerialOutput::Capture(serial.clone());
    let (vm, _) = vmm::Vm::restore(&config, &dir).expect("restore");
    let vm_ready = t0.elapsed();
    let symbols = Arc::new(Symbols::from_vmlinux(std::path::Path::new(&manifest.kernel)).unwrap());
    let symbols_ready = t0.elapsed();
    let control = vm.control();
    let hvprobe::Attached {
        engine,
        service: svc,
        ..
    } = hvprobe::attach(&vm, symbols, ServiceConfig::default()).unwrap();
    svc.create_lines(&["p:fs/open do_sys_openat2 path=+0(%si):string".to_string()])
        .expect("probe on do_sys_openat2");
    let sub = engine.subscribe(1 << 16, None, None);
    let running = vm.start(engine.clone()).unwrap();
    let started = t0.elapsed();
    assert_eq!(
        control.console_input_all(b"cat /etc/hostname\n", Duration::from_secs(60)),
        18,
        "the guest's console took the command"
    );
    let typed = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = Vec::new();
    let event_at = loop {
        if let Some(ev) = sub.pop() {
            if let (EventKind::Entry, Some(Value::Str { bytes, .. })) = (&ev.kind, ev.args.first())
            {
                seen.push(String::from_utf8_lossy(bytes).into_owned());
                if bytes == b"/etc/hostname" {
                    break t0.elapsed();
                }
            }
            continue;
        }
        let console = String::from_utf8_lossy(&serial.lock().unwrap()).into_owned();
        assert!(
            Instant::now() < deadline,
            "no open of /etc/hostname within 300 s; opens seen: {seen:?}; console:\n{console}"
        );
        if let Some(o) = running.wait_timeout(Duration::from_millis(1)) {
            panic!("the restored guest ended: {o}; console:\n{console}");
        }
    };
    // The command ran to its end in the guest: its output and the loop's
    // marker reach the console (written by the kernel log at least).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let console = String::from_utf8_lossy(&serial.lock().unwrap()).into_owned();
        if console.contains("HVPROBE-CMD-DONE rc=0") {
            assert!(console.contains("hvprobe-guest"), "{console}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no HVPROBE-CMD-DONE on the console:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = t0.elapsed();
    running.stop();
    drop(running);
    eprintln!(
        "debian restore ({} MiB, {} vCPU): VM restored {:.1} ms, symbols (DWARF vmlinux) {:.1} ms, \
         started {:.1} ms, command typed {:.1} ms, do_sys_openat2(\"/etc/hostname\") event {:.1} ms, \
         command done {:.1} ms after the restore began",
        manifest.memory_bytes >> 20,
        manifest.vcpus,
        ms(vm_ready),
        ms(symbols_ready),
        ms(started),
        ms(typed),
        ms(event_at),
        ms(done)
    );
}
