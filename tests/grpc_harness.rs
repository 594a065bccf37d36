//! A test guest running forever under the probe engine with the gRPC server
//! on a Unix socket in a temporary directory (shared by the grpc_* tests).
#![allow(dead_code)]

#[path = "common/mod.rs"]
pub mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use common::{guest_counter, kvm_available};
use introspect::{Engine, EngineConfig};
use service::{Guest, HvProbeService, Listen, ServiceConfig, Symbols, TlsFiles};

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub engine: Arc<Engine>,
    pub service: HvProbeService,
    pub control: Arc<vmm::Machine>,
    pub socket: PathBuf,
    pub guest: Arc<Guest>,
    /// The serial console's output so far.
    pub serial: Arc<std::sync::Mutex<Vec<u8>>>,
    /// The VM until [`Harness::boot`] starts it.
    vm: Option<vmm::Vm>,
    running: Option<vmm::RunningVm>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Boots the test guest (`hvtest.forever`, 2 vCPUs) and serves the API.
    pub fn start(config: ServiceConfig) -> Harness {
        let mut h = Self::prepare(config, &test_guest::cmdline(None, None, true));
        h.boot();
        h
    }

    /// Serves the API over the test guest (2 vCPUs, `cmdline`) that has not
    /// started yet: probes created now are early probes. [`Self::boot`] runs it.
    pub fn prepare(config: ServiceConfig, cmdline: &str) -> Harness {
        let symbols = Arc::new(Symbols::from_vmlinux(test_guest::kernel_path()).unwrap());
        let (vm_config, serial) = common::test_guest_config(2, cmdline);
        let vm = vmm::Vm::create(&vm_config).expect("create VM");
        let control = vm.control();
        let engine = Engine::new(control.clone(), symbols.clone(), EngineConfig::for_vcpus(2));
        engine
            .set_return_trap(symbols.return_trap_candidate().unwrap())
            .unwrap();
        let guest = Guest::new(control.clone());
        guest.set_snapshot_writer(hvprobe::snapshots::writer_for(&vm));
        let service = HvProbeService::new(engine.clone(), symbols, guest.clone(), config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hvprobe.sock");
        let bound = rt
            .block_on(service::listen::bind(
                &Listen::Unix(socket.clone()),
                &TlsFiles::default(),
            ))
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = service.clone();
        rt.spawn(async move {
            bound
                .serve(svc, async {
                    let _ = rx.await;
                })
                .await
        });
        Harness {
            rt,
            engine,
            service,
            control,
            socket,
            guest,
            serial,
            vm: Some(vm),
            running: None,
            stop: Some(tx),
            _dir: dir,
        }
    }

    /// Starts the guest [`Self::prepare`] made.
    pub fn boot(&mut self) {
        let vm = self.vm.take().expect("booted twice");
        let running = vm.start(self.engine.clone()).expect("start VM");
        self.guest.set_state(proto::v1::GuestState::Running);
        self.running = Some(running);
    }

    /// How the run ended, waiting at most `timeout` (None: still running).
    pub fn wait_end(&self, timeout: Duration) -> Option<vmm::RunOutcome> {
        self.running.as_ref().and_then(|r| r.wait_timeout(timeout))
    }

    /// The serial console's text so far.
    pub fn console(&self) -> String {
        common::text(&self.serial)
    }

    pub fn target(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    pub fn listen(&self) -> Listen {
        Listen::Unix(self.socket.clone())
    }

    /// The guest's own call counter of `func`.
    pub fn counter(&self, func: &str) -> u64 {
        guest_counter(self.control.ram(), func)
    }

    /// Calls per second of `func` over `window`, by the guest's own counter.
    pub fn rate(&self, func: &str, window: Duration) -> f64 {
        let a = self.counter(func);
        std::thread::sleep(window);
        (self.counter(func) - a) as f64 / window.as_secs_f64()
    }

    /// The run has not ended (no crash, no exit).
    pub fn alive(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.wait_timeout(Duration::ZERO).is_none())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(r) = self.running.take() {
            r.stop();
            r.wait();
        }
    }
}
