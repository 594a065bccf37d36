//! `--syscall-bridge` on the command line, and the bridge in `hvprobe info`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{hvprobe_cli as hvprobe, kvm_available};

fn host_needs_bridge() -> bool {
    vmm::detect::host_needs_bridge(std::path::Path::new("/dev/kvm")).expect("detection")
}

#[test]
fn unknown_bridge_mode_is_refused() {
    let k = test_guest::kernel_path().to_str().unwrap();
    let (code, _, err) = hvprobe(&["run", "--kernel", k, "--syscall-bridge", "maybe"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown system-call bridge mode \"maybe\""),
        "{err}"
    );
}

#[test]
fn demo_user_mode_with_the_bridge_auto_and_off() {
    if !kvm_available() {
        return;
    }
    let base = [
        "demo",
        "--vcpus",
        "1",
        "--cmdline",
        "hvtest.iters=1 hvtest.user=5",
    ];
    let (code, out, err) = hvprobe(&[&base[..], &["--syscall-bridge", "auto"]].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("hvtest: user ok cpus=1 syscalls=6"), "{out}");
    if host_needs_bridge() {
        assert!(
            err.contains("system-call bridge: 6 syscalls, 5 int80"),
            "{err}"
        );
    }
    let (code, out, err) = hvprobe(&[&base[..], &["--syscall-bridge", "off"]].concat());
    if host_needs_bridge() {
        assert_eq!(code, test_guest::EXIT_USER_SYSCALL as i32, "{out}{err}");
        assert!(out.contains("syscall did not reach the kernel"), "{out}");
        assert!(
            err.contains("system-call bridge off (as requested)"),
            "{err}"
        );
    } else {
        assert_eq!(code, 0, "{out}{err}");
    }
}

#[test]
fn info_reports_the_bridge_while_user_mode_runs() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}", dir.path().join("s.sock").display());
    let serial = dir.path().join("serial.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args([
            "run",
            "--kernel",
            test_guest::kernel_path().to_str().unwrap(),
            "--cmdline",
            "hvtest.iters=0 hvtest.user=400000",
            "--vcpus",
            "1",
            "--memory",
            "128",
            "--serial",
            serial.to_str().unwrap(),
            "--listen",
            &sock,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let seen = loop {
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(300));
        let (code, out, _) = hvprobe(&["info", "--server", &sock]);
        if code != 0 {
            continue;
        }
        last = out;
        let Some(line) = last
            .lines()
            .find(|l| l.starts_with("bridge:   syscall bridge "))
        else {
            break false;
        };
        if !host_needs_bridge() {
            break line.starts_with("bridge:   syscall bridge off");
        }
        let n: u64 = line
            .split("): ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if line.starts_with("bridge:   syscall bridge on (detected") && n > 0 {
            break true;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen,
        "hvprobe info never showed the bridge at work:\n{last}"
    );
}
