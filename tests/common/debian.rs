//! A restored Debian guest (the snapshot tests/debian/snapshot.sh caches:
//! 2 vCPUs, /init reading commands from the console) with the probe engine
//! and the API service attached, for tests that run real processes.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_access::VmControl;
use introspect::{Engine, ProbeId};
use proto::v1::{self, hv_probe_server::HvProbe};
use service::{HvProbeService, ServiceConfig, Symbols};

/// The cached snapshot, or None (the test is skipped) when there is none;
/// under HVPROBE_REQUIRE_DEBIAN=1 a missing snapshot fails the test.
pub fn snapshot_dir() -> Option<PathBuf> {
    snapshot_dir_from("HVPROBE_DEBIAN_SNAPSHOT")
}

/// The snapshot named by environment variable `var` (see [`snapshot_dir`]).
pub fn snapshot_dir_from(var: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => {
            assert_ne!(
                std::env::var("HVPROBE_REQUIRE_DEBIAN").as_deref(),
                Ok("1"),
                "HVPROBE_REQUIRE_DEBIAN=1 but {var} is not set \
                 (tests/run.sh sets it from tests/debian/snapshot.sh)"
            );
            eprintln!("SKIPPED: no Debian snapshot (run tests/debian/snapshot.sh)");
            None
        }
    }
}

/// The records in one console line: the line itself, and each kernel-log
/// copy in it, which starts after a "[   12.345678] " timestamp. The tty and
/// the kernel log share the serial port, so a kernel-log line can land in
/// the middle of a tty line (seen: "HVPROBE-CMD-DONE[  608.041542]
/// HVPROBE-CMD-DONE rc=0"). A typed command's echo carries no timestamp,
/// so a marker inside it is never taken for the marker itself.
fn console_records(line: &str) -> impl Iterator<Item = &str> {
    let mut starts = vec![0];
    let mut from = 0;
    while let Some(open) = line[from..].find('[').map(|i| from + i) {
        let Some(close) = line[open..].find("] ").map(|i| open + i) else {
            break;
        };
        let stamp = line[open + 1..close].trim_start();
        let is_time = stamp.split_once('.').is_some_and(|(s, us)| {
            !s.is_empty()
                && !us.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && us.bytes().all(|b| b.is_ascii_digit())
        });
        if is_time {
            if open == 0 {
                starts[0] = close + 2;
            } else {
                starts.push(close + 2);
            }
        }
        from = open + 1;
    }
    starts.into_iter().map(move |i| &line[i..])
}

#[test]
fn console_records_split_interleaved_kernel_log_lines() {
    let r: Vec<_> =
        console_records("HVPROBE-CMD-DONE[  608.041542] HVPROBE-CMD-DONE rc=0").collect();
    assert_eq!(
        r,
        [
            "HVPROBE-CMD-DONE[  608.041542] HVPROBE-CMD-DONE rc=0",
            "HVPROBE-CMD-DONE rc=0"
        ]
    );
    let r: Vec<_> = console_records("[   12.345678] HVPROBE-X a=1").collect();
    assert_eq!(r, ["HVPROBE-X a=1"]);
    let r: Vec<_> = console_records("cat x; echo \"HVPROBE-RC-1 $?\" [not a time] y").collect();
    assert_eq!(r.len(), 1);
}

pub struct DebianGuest {
    pub engine: Arc<Engine>,
    pub service: HvProbeService,
    pub vcpus: usize,
    serial: Arc<Mutex<Vec<u8>>>,
    control: Arc<vmm::Machine>,
    running: Option<vmm::RunningVm>,
    rt: tokio::runtime::Runtime,
    /// Console bytes already consumed by [`DebianGuest::wait_console`].
    seen: usize,
    /// Commands [`DebianGuest::run`] has typed (each gets its own tag).
    commands: u64,
}

impl DebianGuest {
    /// Restore the cached snapshot with no probes and start its vCPUs.
    pub fn start() -> Option<DebianGuest> {
        Some(Self::restore(&snapshot_dir()?))
    }

    /// Restore the snapshot in `dir` (symbols from the `vmlinux` beside it:
    /// the kernel it booted may be a bzImage) and start its vCPUs.
    pub fn restore(dir: &std::path::Path) -> DebianGuest {
        Self::restore_with(dir, ServiceConfig::default())
    }

    /// [`Self::restore`] with the service configured by `config`.
    pub fn restore_with(dir: &std::path::Path, service_config: ServiceConfig) -> DebianGuest {
        let dir = dir.to_path_buf();
        let manifest = vmm::snapshot::Manifest::load(&dir).expect("cached snapshot");
        let serial = Arc::new(Mutex::new(Vec::new()));
        let mut config = vmm::VmConfig::new(&manifest.kernel);
        config.vcpus = manifest.vcpus;
        config.memory_mib = manifest.memory_bytes >> 20;
        config.serial = vmm::SerialOutput::Capture(serial.clone());
        let (vm, _) = vmm::Vm::restore(&config, &dir).expect("restore");
        let vmlinux = dir.parent().unwrap().join("vmlinux");
        let symbols = Arc::new(Symbols::from_vmlinux(&vmlinux).unwrap());
        let control = vm.control();
        let hvprobe::Attached {
            engine, service, ..
        } = hvprobe::attach(&vm, symbols, service_config).unwrap();
        let running = vm.start(engine.clone()).unwrap();
        DebianGuest {
            engine,
            service,
            vcpus: usize::from(manifest.vcpus),
            serial,
            control,
            running: Some(running),
            rt: tokio::runtime::Runtime::new().unwrap(),
            seen: 0,
            commands: 0,
        }
    }

    /// The VM's exit counters (the system-call bridge's among them).
    pub fn exit_stats(&self) -> vmm::ExitStats {
        self.control.exit_stats()
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.serial.lock().unwrap()).into_owned()
    }

    /// Type `line` (a newline is added) on the guest's console.
    pub fn type_line(&self, line: &str) {
        let bytes = format!("{line}\n");
        assert_eq!(
            self.control
                .console_input_all(bytes.as_bytes(), Duration::from_secs(60)),
            bytes.len(),
            "the guest's console did not take {line:?}; console:\n{}",
            self.console()
        );
    }

    /// Wait for a console line (after what earlier waits consumed) that
    /// starts with `prefix` and return it; panics with the console after
    /// `secs` or when the guest ends.
    pub fn wait_console(&mut self, prefix: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let console = self.console();
            let rest = &console[self.seen.min(console.len())..];
            // Only whole lines: the tail may still be arriving.
            let mut at = 0;
            for line in rest.split_inclusive('\n') {
                if !line.ends_with('\n') {
                    break;
                }
                at += line.len();
                let l = line.trim_end_matches(['\r', '\n']);
                if let Some(found) = console_records(l).find(|r| r.starts_with(prefix)) {
                    self.seen += at;
                    return found.to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no console line starting {prefix:?} within {secs} s; console:\n{console}"
            );
            if let Some(o) = self
                .running
                .as_ref()
                .unwrap()
                .wait_timeout(Duration::from_millis(20))
            {
                panic!("the restored guest ended: {o}; console:\n{console}");
            }
        }
    }

    /// Run one shell command on the console loop and wait for its end;
    /// returns its exit status. Each command prints its own tag with the
    /// status: the loop's `HVPROBE-CMD-DONE` lines reach the console twice
    /// (tty and kernel log), so one of an earlier command could be taken
    /// for this one's.
    pub fn run(&mut self, cmd: &str, secs: u64) -> i32 {
        self.commands += 1;
        let tag = format!("HVPROBE-RC-{} ", self.commands);
        self.type_line(&format!("{cmd}; echo \"{tag}$?\""));
        let done = self.wait_console(&tag, secs);
        done[tag.len()..].trim().parse().unwrap()
    }

    /// Create probes from full definitions through the API (all or nothing).
    pub fn create_defs(
        &self,
        definitions: Vec<v1::ProbeDefinition>,
    ) -> Result<Vec<v1::ProbeInfo>, tonic::Status> {
        self.rt
            .block_on(
                self.service
                    .create_probes(tonic::Request::new(v1::CreateProbesRequest { definitions })),
            )
            .map(|r| r.into_inner().probes)
    }

    /// Create probes through the API (all or nothing), each with a filter.
    pub fn create(&self, defs: &[(&str, &str)]) -> Vec<ProbeId> {
        let req = v1::CreateProbesRequest {
            definitions: defs
                .iter()
                .map(|(line, filter)| v1::ProbeDefinition {
                    definition: Some(v1::probe_definition::Definition::KprobeEvents(
                        line.to_string(),
                    )),
                    filter: filter.to_string(),
                    ..Default::default()
                })
                .collect(),
        };
        let resp = self
            .rt
            .block_on(self.service.create_probes(tonic::Request::new(req)))
            .unwrap_or_else(|s| panic!("creating {defs:?}: {s:?}"));
        resp.into_inner().probes.iter().map(|p| p.id).collect()
    }

    /// Create one probe through the API and expect a refusal: its status.
    pub fn create_refused(&self, line: &str) -> tonic::Status {
        let req = v1::CreateProbeRequest {
            definition: Some(v1::ProbeDefinition {
                definition: Some(v1::probe_definition::Definition::KprobeEvents(line.into())),
                ..Default::default()
            }),
        };
        self.rt
            .block_on(self.service.create_probe(tonic::Request::new(req)))
            .map(|r| panic!("{line} was accepted: {:?}", r.into_inner()))
            .unwrap_err()
    }

    /// ListProbes through the API.
    pub fn list(&self) -> Vec<v1::ProbeInfo> {
        self.rt
            .block_on(
                self.service
                    .list_probes(tonic::Request::new(v1::ListProbesRequest::default())),
            )
            .unwrap_or_else(|s| panic!("ListProbes: {s:?}"))
            .into_inner()
            .probes
    }

    /// GetGuestInfo through the API.
    pub fn info(&self) -> v1::GetGuestInfoResponse {
        self.rt
            .block_on(
                self.service
                    .get_guest_info(tonic::Request::new(v1::GetGuestInfoRequest {})),
            )
            .unwrap()
            .into_inner()
    }

    /// ResolveSymbol through the API: the runtime address of `name`.
    pub fn resolve(&self, name: &str) -> u64 {
        let req = v1::ResolveSymbolRequest {
            query: Some(v1::resolve_symbol_request::Query::Symbol(name.into())),
        };
        self.rt
            .block_on(self.service.resolve_symbol(tonic::Request::new(req)))
            .unwrap_or_else(|s| panic!("resolving {name}: {s:?}"))
            .into_inner()
            .address
    }

    /// Kernel memory at virtual `addr`, read through the guest's page tables.
    pub fn read_kernel(&self, addr: u64, len: usize) -> Vec<u8> {
        let sregs = self
            .engine
            .kernel_system_regs()
            .expect("the guest's kernel paging");
        let virt = introspect::paging::GuestVirt::new(self.control.memory(), sregs, 0);
        let mut buf = vec![0u8; len];
        virt.read(addr, &mut buf, introspect::paging::Access::Inspect)
            .unwrap_or_else(|e| panic!("reading {len} bytes at {addr:#x}: {e}"));
        buf
    }

    /// Guest-physical memory (what a snapshot holds), `len` bytes at `gpa`.
    pub fn read_phys(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.control.memory().read_phys(gpa, &mut buf).unwrap();
        buf
    }

    /// Delete probes through the API.
    pub fn delete(&self, ids: &[ProbeId]) {
        let req = v1::DeleteProbesRequest {
            probes: ids
                .iter()
                .map(|id| v1::ProbeRef {
                    r#ref: Some(v1::probe_ref::Ref::Id(*id)),
                })
                .collect(),
            all: false,
        };
        self.rt
            .block_on(self.service.delete_probes(tonic::Request::new(req)))
            .unwrap_or_else(|s| panic!("deleting {ids:?}: {s:?}"));
    }

    /// The guest's processes through the API (`ListTasks`).
    pub fn list_tasks(&self) -> Vec<v1::GuestTaskInfo> {
        self.rt
            .block_on(
                self.service
                    .list_tasks(tonic::Request::new(v1::ListTasksRequest {})),
            )
            .unwrap_or_else(|s| panic!("ListTasks: {s:?}"))
            .into_inner()
            .tasks
    }

    /// Subscribe through the API (where probe filters apply, as for any
    /// gRPC client) and collect the events on a channel.
    pub fn subscribe(&self, req: v1::SubscribeRequest) -> EventStream {
        use tokio_stream::StreamExt;
        let _rt = self.rt.enter();
        let mut stream = Box::pin(self.service.subscribe_stream(req).expect("subscribe"));
        let (tx, rx) = std::sync::mpsc::channel();
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lost2 = lost.clone();
        self.rt.spawn(async move {
            while let Some(Ok(r)) = stream.next().await {
                match r.payload {
                    Some(v1::subscribe_response::Payload::Events(b)) => {
                        for e in b.events {
                            if tx.send(e).is_err() {
                                return;
                            }
                        }
                    }
                    Some(v1::subscribe_response::Payload::Lost(l)) => {
                        lost2.fetch_add(l.count, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
        // The stream is live once its first message went out; give it a moment.
        std::thread::sleep(Duration::from_millis(100));
        EventStream { rx, lost }
    }
}

/// Events of one API subscription.
pub struct EventStream {
    rx: std::sync::mpsc::Receiver<v1::Event>,
    lost: Arc<std::sync::atomic::AtomicU64>,
}

impl EventStream {
    /// Everything delivered so far, after `settle` for batches in flight
    /// (hits are published at the hit, before the console line that follows).
    pub fn drain(&self, settle: Duration) -> Vec<v1::Event> {
        std::thread::sleep(settle);
        self.rx.try_iter().collect()
    }

    pub fn lost(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A fetched argument by name: signed value, or string bytes.
pub fn arg_i64(e: &v1::Event, name: &str) -> i64 {
    let a = e.args.iter().find(|a| a.name == name);
    match a
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.kind.as_ref())
    {
        Some(v1::value::Kind::Signed(s)) => s.value,
        other => panic!("arg {name}: {other:?} in {e:?}"),
    }
}

pub fn arg_bytes(e: &v1::Event, name: &str) -> Vec<u8> {
    let a = e.args.iter().find(|a| a.name == name);
    match a
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.kind.as_ref())
    {
        Some(v1::value::Kind::String(s)) => s.raw.to_vec(),
        other => panic!("arg {name}: {other:?} in {e:?}"),
    }
}

impl Drop for DebianGuest {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

/// `key=value` out of a console line such as `HVPROBE-SLEEP pid=87 i=0 ms=300`.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> T {
    let want = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(want.as_str()))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("bad {key}= in {line:?}"))
}
