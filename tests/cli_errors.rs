//! Bad input to `hvprobe run`: a one-line error naming the problem, a
//! non-zero exit, and no panic.

use std::path::PathBuf;
use std::process::Command;

mod common;

use common::{assert_one_line_error, hvprobe_cli};

fn hvprobe(args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = hvprobe_cli(args);
    (code, stderr)
}

fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvprobe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    let (code, err) = hvprobe(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "cannot open kernel /nonexistent/vmlinux");
    assert_eq!(
        err.matches("os error 2").count(),
        1,
        "cause repeated: {err}"
    );
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    let p = scratch("notakernel", b"#!/bin/sh\necho this is a shell script\n");
    let (code, err) = hvprobe(&["run", "--kernel", p.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "is neither an ELF vmlinux nor a bzImage");
}

#[test]
fn memory_too_small_for_the_kernel() {
    // The test guest loads at 16 MiB, so 8 MiB cannot hold it.
    let k = test_guest::kernel_path();
    let (code, err) = hvprobe(&["run", "--kernel", k.to_str().unwrap(), "--memory", "8"]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "guest memory too small");
    assert!(err.contains("the guest has 8 MiB"), "{err}");
}

#[test]
fn missing_initrd_file() {
    let k = test_guest::kernel_path();
    let (code, err) = hvprobe(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd.gz",
    ]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "cannot open initrd /nonexistent/initrd.gz");
}

#[test]
fn no_kvm_device() {
    let k = test_guest::kernel_path();
    let (code, err) = hvprobe(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "cannot open /nonexistent/kvm: no such device");
}

#[test]
fn kvm_device_that_is_not_kvm() {
    let k = test_guest::kernel_path();
    let (code, err) = hvprobe(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--kvm-device",
        "/dev/null",
    ]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "cannot open /dev/null: not a KVM device");
}

#[test]
fn kvm_device_without_permission() {
    // Root opens anything, so permission is exercised as an unprivileged user
    // when one is available (nobody), else through the error mapping in vmm's
    // unit tests.
    let k = test_guest::kernel_path();
    if unsafe_geteuid() != 0 {
        eprintln!("SKIPPED: not root, cannot drop to another user");
        return;
    }
    let status = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_hvprobe"))
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--kvm-device",
            "/dev/kvm",
        ])
        .output();
    let Ok(out) = status else {
        eprintln!("SKIPPED: setpriv not available; permission path covered by unit tests only");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(0));
    // nobody may not even read the kernel in a private build dir; either error
    // is a clear one-liner.
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("permission denied") || lines[0].contains("Permission denied"),
        "{err}"
    );
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[test]
fn zero_vcpus() {
    let k = test_guest::kernel_path();
    let (code, err) = hvprobe(&["run", "--kernel", k.to_str().unwrap(), "--vcpus", "0"]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "vCPU count must be between 1 and");
}

/// Like [`hvprobe`], but fails the test instead of hanging when the process
/// does not exit within `secs` (open(2) on a FIFO blocks forever).
fn hvprobe_within(args: &[&str], secs: u64) -> (i32, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run hvprobe");
    let status = wait_within(&mut child, secs, &format!("hvprobe {args:?}"));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "hvprobe panicked: {stderr}");
    (status.code().unwrap_or(-1), stderr)
}

/// The child's exit status; kills it and fails the test when `what` has not
/// exited within `secs`.
fn wait_within(child: &mut std::process::Child, secs: u64, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn kernel_that_is_a_fifo_is_refused_without_opening_it() {
    let dir = std::env::temp_dir().join(format!("hvprobe-cli-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("kernel.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let (code, err) = hvprobe_within(&["run", "--kernel", fifo.to_str().unwrap()], 20);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "it is a FIFO, not a regular file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn devices_as_initrd_or_tls_files_are_refused() {
    let k = test_guest::kernel_path().to_str().unwrap().to_string();
    let (code, err) = hvprobe_within(&["run", "--kernel", &k, "--initrd", "/dev/null"], 20);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "cannot use /dev/null as the initrd: it is a device");
    let (code, err) = hvprobe_within(
        &[
            "run",
            "--kernel",
            &k,
            "--listen",
            "tcp:127.0.0.1:0",
            "--tls-cert",
            "/dev/null",
            "--tls-key",
            "/dev/null",
            "--tls-client-ca",
            "/dev/null",
        ],
        20,
    );
    assert_ne!(code, 0);
    assert_one_line_error(
        &err,
        "cannot use /dev/null as the TLS certificate: it is a device",
    );
}

/// Issue 14 item 6: SIGTERM stops the guest and the server cleanly (no death
/// by the signal, socket file removed), as SIGINT does.
#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    if !std::path::Path::new("/dev/kvm").exists() {
        assert_ne!(
            std::env::var("HVPROBE_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "HVPROBE_REQUIRE_KVM=1 but /dev/kvm is missing"
        );
        eprintln!("SKIPPED: /dev/kvm is not available");
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let dir = std::env::temp_dir().join(format!("hvprobe-cli-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.txt");
    let k = test_guest::kernel_path().to_str().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args([
            "run",
            "--kernel",
            &k,
            "--cmdline",
            &test_guest::cmdline(None, None, true),
            "--serial",
            serial.to_str().unwrap(),
            "--listen",
            &format!("unix:{}", sock.display()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_within(&mut child, 20, "hvprobe after SIGTERM");
    assert_eq!(status.signal(), None, "killed by the signal: {status:?}");
    assert!(!sock.exists(), "socket file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
