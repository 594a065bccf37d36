//! Probe actions through the command line against `hvprobe run` of the
//! test guest: refused without `--allow-actions`; with it, `probe add
//! --action freeze` freezes, `info` says so, `resume` thaws; a bad
//! `--action` is a one-line usage error.

#[path = "common/mod.rs"]
mod common;
#[path = "common/run.rs"]
mod run;

use std::time::{Duration, Instant};

use common::{hvprobe_cli, kvm_available};
use run::Run;

fn server(run: &Run) -> String {
    format!("unix:{}", run.sock.display())
}

#[test]
fn bad_action_spelling_is_a_usage_error() {
    let (code, _, err) = hvprobe_cli(&["probe", "add", "p:a/b hv_add", "--action", "kill"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown action 'kill'"), "{err}");
    let (code, _, err) = hvprobe_cli(&["probe", "add", "p:a/b hv_add", "--action", "override:x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("override value 'x'"), "{err}");
}

#[test]
fn freeze_and_resume_from_the_command_line() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let plain = Run::start(tmp.path(), &[]);
    let s = server(&plain);
    let (code, _, err) = hvprobe_cli(&[
        "probe",
        "--server",
        &s,
        "add",
        "p:a/ov hv_may_fail",
        "--action",
        "override:-1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--allow-actions"), "{err}");
    drop(plain);

    let tmp = tempfile::tempdir().unwrap();
    let run = Run::start(tmp.path(), &["--allow-actions"]);
    let s = server(&run);
    let (code, out, err) = hvprobe_cli(&[
        "probe",
        "--server",
        &s,
        "add",
        "p:a/frz hv_add",
        "--action",
        "freeze",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("a/frz"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = hvprobe_cli(&["info", "--server", &s]);
        if out.contains("frozen:   by probe 1") {
            break;
        }
        assert!(Instant::now() < deadline, "not frozen: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, out, _) = hvprobe_cli(&["probe", "--server", &s, "ls"]);
    assert!(out.contains("[ACTION: freeze, ran "), "{out}");
    assert_eq!(hvprobe_cli(&["probe", "--server", &s, "rm", "a/frz"]).0, 0);
    let (code, out, err) = hvprobe_cli(&["resume", "--server", &s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("resumed: the guest was frozen by probe 1"),
        "{out}"
    );
    let (code, _, err) = hvprobe_cli(&["resume", "--server", &s]);
    assert_ne!(code, 0);
    assert!(err.contains("not frozen"), "{err}");
}
