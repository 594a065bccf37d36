//! The `hvprobe` CLI against a live server: `probe add`, `events` in both
//! stream encodings (the JSON must not depend on the encoding), `probe rm`.

mod grpc_harness;

use std::process::Command;

use grpc_harness::*;
use serde_json::Value as Json;

fn cli(h: &Harness, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(args)
        .env("HVPROBE_SERVER", h.target())
        .output()
        .expect("run hvprobe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `hvprobe events --count N` in `encoding`, as parsed JSON lines.
fn events(h: &Harness, encoding: &str, n: usize) -> Vec<Json> {
    let count = n.to_string();
    let (ok, out, err) = cli(
        h,
        &[
            "events",
            "--group",
            "cli",
            "--count",
            &count,
            "--encoding",
            encoding,
        ],
    );
    assert!(ok, "hvprobe events --encoding {encoding}: {err}");
    let lines: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), n, "{out}");
    lines
}

#[test]
fn cli_events_are_the_same_in_both_encodings() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig::default());
    let (ok, out, err) = cli(
        &h,
        &[
            "probe",
            "add",
            "p:cli/open hv_open_file dfd=%di:s32 path=+0(%si):string flags=%dx:x32",
        ],
    );
    assert!(ok, "probe add: {out}{err}");
    let full = events(&h, "full", 30);
    let packed = events(&h, "packed", 30);
    let keys = |e: &Json| e.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    for e in full.iter().chain(&packed) {
        assert_eq!(keys(e), keys(&full[0]), "{e}");
        assert_eq!(e["event"], "open", "{e}");
        assert_eq!(e["group"], "cli", "{e}");
        assert_eq!(e["kind"], full[0]["kind"], "{e}");
        assert_eq!(e["args"]["dfd"], test_guest::AT_FDCWD, "{e}");
        let path = e["args"]["path"].as_str().unwrap();
        let pi = test_guest::OPEN_PATHS
            .iter()
            .position(|p| *p == path)
            .unwrap_or_else(|| panic!("unexpected path in {e}"));
        // The guest passes OPEN_PATHS[(cpu + it) % 8] with flags
        // O_CLOEXEC | (it & 3): flags follow from the vCPU and the path.
        let cpu = e["cpu"].as_u64().unwrap() as usize;
        let flags = format!("{:#x}", 0x80000 | ((pi + 8 - cpu) % 4));
        assert_eq!(e["args"]["flags"], flags.as_str(), "{e}");
        let text = e["text"].as_str().unwrap();
        let want = format!("dfd={} path=\"{path}\" flags={flags}", test_guest::AT_FDCWD);
        assert!(
            text.starts_with("open: (hv_open_file+0x0/0x") && text.ends_with(&want),
            "{text}"
        );
    }
    let (ok, _, err) = cli(&h, &["probe", "rm", "cli/open"]);
    assert!(ok, "{err}");
    assert!(h.engine.list().is_empty());
}
