//! `hvprobe run` of the test guest as a child process (forever, 2 vCPUs)
//! with its API on a Unix socket in a test's directory; killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::v1;

pub type Client = v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>;

pub struct Run {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub rt: tokio::runtime::Runtime,
    pub stderr: PathBuf,
}

impl Run {
    /// Start it with `args` after the test guest's own, and wait for its socket.
    pub fn start(dir: &Path, args: &[&str]) -> Run {
        let sock = dir.join("hvprobe.sock");
        let stderr = dir.join("stderr");
        let k = test_guest::kernel_path().to_str().unwrap().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
            .args(["run", "--kernel", &k, "--cmdline"])
            .arg(test_guest::cmdline(None, None, true))
            .args(["--serial", dir.join("serial").to_str().unwrap()])
            .args(["--listen", &format!("unix:{}", sock.display())])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Run {
            child: Some(child),
            sock,
            rt,
            stderr,
        }
    }

    /// ListProbes: every probe of the running server.
    pub fn list(&self) -> Vec<v1::ProbeInfo> {
        let mut c = self.client();
        self.rt
            .block_on(c.list_probes(v1::ListProbesRequest::default()))
            .unwrap()
            .into_inner()
            .probes
    }

    pub fn client(&self) -> Client {
        self.rt
            .block_on(service::client::connect(&service::Listen::Unix(
                self.sock.clone(),
            )))
            .unwrap()
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Send `signal` to it.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = i32::try_from(self.child.as_ref().unwrap().id()).unwrap();
        // SAFETY: kill(2) on the pid of a child this test spawned and has
        // not reaped yet (`child` is Some until `terminate` waits for it).
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// SIGTERM, as systemd stops it; its stderr after it exited with 0.
    pub fn terminate(&mut self) -> String {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                let err = self.log();
                assert!(s.success(), "hvprobe run exited {s}: {err}");
                assert!(!err.contains("panicked"), "{err}");
                return err;
            }
            assert!(Instant::now() < deadline, "hvprobe run did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
