//! `hvprobe snapshot` and `hvprobe run --restore` from the command line,
//! and their refusals: a one-line error, a non-zero exit, no panic, and a
//! failed snapshot leaves the guest running with its probes intact.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{assert_one_line_error, hvprobe_cli as hvprobe, kvm_available};

/// `hvprobe run` serving on a socket in `dir`; killed on drop.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Server {
        let sock = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.serial"));
        let child = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
            .arg("run")
            .args(args)
            .args([
                "--serial",
                serial.to_str().unwrap(),
                "--listen",
                &format!("unix:{}", sock.display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no socket for {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, sock }
    }

    /// A client command against this server (`--server` right after the
    /// first word, where every subcommand takes it).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let server = format!("unix:{}", self.sock.display());
        let mut all = args.to_vec();
        all.splice(1..1, ["--server", server.as_str()]);
        hvprobe(&all)
    }

    fn hits(&self) -> u64 {
        let (code, out, err) = self.cli(&["probe", "ls", "--json"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["hits"].as_u64().unwrap_or(0)
            })
            .sum()
    }

    fn wait(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn edit_manifest(src: &Path, dst: &Path, edit: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["state.json", "probes.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    // The memory file is sparse: a hard link costs nothing.
    let _ = std::fs::remove_file(dst.join("memory.raw"));
    std::fs::hard_link(src.join("memory.raw"), dst.join("memory.raw")).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("manifest.json")).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(dst.join("manifest.json"), m.to_string()).unwrap();
}

#[test]
fn snapshot_restore_and_every_refusal_from_the_cli() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = test_guest::kernel_path().to_str().unwrap().to_string();
    let forever = test_guest::cmdline(None, None, true);
    let probe = "p:t/open hv_open_file path=+0(%si):string";
    let live = Server::start(
        dir,
        "live",
        &["--kernel", &k, "--cmdline", &forever, "--probe", probe],
    );
    // A second probe, disabled and with a filter of its own: both survive.
    let (code, _, err) = live.cli(&[
        "probe",
        "add",
        "--disabled",
        "--filter",
        "path ~ \"/etc/*\"",
        "p:t/etc hv_open_file path=+0(%si):string",
    ]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    let snap = dir.join("snap");
    let (code, out, err) = live.cli(&["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 probes"), "{out}");
    assert!(snap.join("manifest.json").exists());

    // Failed snapshots: no permission (a path under /proc), a file where a
    // directory should be, no space left (a 64 KiB tmpfs: the test guest writes ~120 KiB, when mountable).
    let hits = live.hits();
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let mut refusals = vec![
        (
            "/proc/hvprobe-snapshot".to_string(),
            "cannot write snapshot",
        ),
        (
            file.join("sub").to_str().unwrap().to_string(),
            "Not a directory",
        ),
    ];
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            small.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    // Unmounted even when an assertion below fails.
    struct Unmount(Option<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = Command::new("umount").arg(p).status();
            }
        }
    }
    let mut unmount = Unmount(mounted.then(|| small.clone()));
    if mounted {
        refusals.push((
            small.join("snap").to_str().unwrap().to_string(),
            "No space left on device",
        ));
    } else {
        eprintln!("NOTE: cannot mount a tmpfs here; the no-space case is not exercised");
    }
    for (target, needle) in &refusals {
        let (code, _, err) = live.cli(&["snapshot", target]);
        assert_ne!(code, 0, "snapshot into {target} succeeded");
        assert_one_line_error(&err, needle);
    }
    if mounted {
        assert!(
            !small.join("snap/manifest.json").exists(),
            "a failed snapshot left a manifest"
        );
        drop(unmount.0.take().map(|p| Unmount(Some(p))));
    }
    let (code, out, _) = live.cli(&["info"]);
    assert_eq!(code, 0);
    assert!(out.contains("state:    running"), "{out}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        live.hits() > hits,
        "probes still fire after failed snapshots"
    );
    drop(live);

    // Restore: the probe comes back with its counter and keeps counting.
    let saved_hits = {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(snap.join("probes.json")).unwrap()).unwrap();
        v["engine"]["probes"][0]["hits"].as_u64().unwrap()
    };
    let restored = Server::start(dir, "restored", &["--restore", snap.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    let (code, out, err) = restored.cli(&["probe", "ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(
        (rows[0]["id"].as_u64(), rows[0]["event"].as_str()),
        (Some(1), Some("open"))
    );
    assert_eq!(rows[1]["event"], "etc");
    assert_eq!(rows[1]["state"], "disabled", "{out}");
    assert_eq!(rows[1]["filter"], "path ~ \"/etc/*\"", "{out}");
    assert_eq!(rows[1]["hits"], 0, "a disabled probe counts nothing");
    assert!(restored.hits() > saved_hits, "restored probe counts on");
    // A snapshot of the restored guest with --stop ends it.
    let mut restored = restored;
    let again = dir.join("again");
    let (code, _, err) = restored.cli(&["snapshot", again.to_str().unwrap(), "--stop"]);
    assert_eq!(code, 0, "{err}");
    let status = restored.wait(30).expect("--stop ends hvprobe run");
    assert!(status.success(), "{status:?}");

    // --no-probes: the guest runs with an empty probe table.
    let bare = Server::start(
        dir,
        "bare",
        &["--restore", snap.to_str().unwrap(), "--no-probes"],
    );
    let (code, out, _) = bare.cli(&["probe", "ls", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "", "no probes: {out}");
    drop(bare);

    // Refused restores.
    let not_snap = dir.join("not-a-snapshot");
    std::fs::create_dir_all(&not_snap).unwrap();
    let (code, _, err) = hvprobe(&["run", "--restore", not_snap.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "is not an hvprobe snapshot");

    let future = dir.join("future");
    edit_manifest(&snap, &future, |m| m["format_version"] = 99.into());
    let (code, _, err) = hvprobe(&["run", "--restore", future.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "snapshot format 99 is newer");

    let cpu = dir.join("other-cpu");
    edit_manifest(&snap, &cpu, |m| {
        let leaves = m["cpuid"].as_array_mut().unwrap();
        let l = leaves.iter_mut().find(|l| l["function"] == 1).unwrap();
        let ecx = l["ecx"].as_u64().unwrap();
        l["ecx"] = (ecx ^ (1 << 19)).into();
    });
    let (code, _, err) = hvprobe(&["run", "--restore", cpu.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "other CPU features: CPUID leaf 0x1.0 differs");

    let (code, _, err) = hvprobe(&["run", "--restore", snap.to_str().unwrap(), "--vcpus", "1"]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "snapshot has 2 vCPUs, this run asks for 1");

    let (code, _, err) = hvprobe(&["run", "--restore", snap.to_str().unwrap(), "--memory", "64"]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "this run asks for 64 MiB");

    let truncated = dir.join("truncated");
    edit_manifest(&snap, &truncated, |_| {});
    std::fs::remove_file(truncated.join("memory.raw")).unwrap();
    let len = std::fs::metadata(snap.join("memory.raw")).unwrap().len();
    let f = std::fs::File::create(truncated.join("memory.raw")).unwrap();
    f.set_len(len - 4096).unwrap();
    let (code, _, err) = hvprobe(&["run", "--restore", truncated.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "memory file truncated");

    let broken = dir.join("broken-state");
    edit_manifest(&snap, &broken, |_| {});
    std::fs::write(broken.join("state.json"), b"{\"vcpus\": [").unwrap();
    let (code, _, err) = hvprobe(&["run", "--restore", broken.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_one_line_error(&err, "state.json");
}
