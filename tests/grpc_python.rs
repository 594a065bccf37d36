//! An independent client (Python grpcio, service discovered by reflection
//! only) drives the server while the test guest runs.

mod grpc_harness;

use std::process::Command;

use grpc_harness::*;

fn python_grpc_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("HVPROBE_REQUIRE_PYTHON").as_deref() == Ok("1") {
            panic!("HVPROBE_REQUIRE_PYTHON=1 but python3 with grpcio, grpcio-reflection and protobuf is missing");
        }
        eprintln!("SKIPPED: python3 grpcio/grpcio-reflection/protobuf not installed (pip install grpcio grpcio-reflection protobuf)");
    }
    ok
}

#[test]
fn python_client_by_reflection_only() {
    if !kvm_available() || !python_grpc_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig::default());
    let expected = format!(
        r#"{{"open_paths": [{}], "at_fdcwd": {}, "fib": [{}]}}"#,
        test_guest::OPEN_PATHS
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        test_guest::AT_FDCWD,
        (0..16)
            .map(|n| test_guest::fib(n).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_client.py");
    let out = Command::new("python3")
        .args([script, &h.target(), &expected])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok: disabled"), "{stdout}");
    assert!(h.alive(), "the guest stopped");
    // Everything the client created is gone and the guest text is pristine.
    assert!(h.engine.list().is_empty());
    assert_eq!(
        h.engine.subscriber_count(),
        0,
        "cancelled stream left a queue"
    );
}
