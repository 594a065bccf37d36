//! Booting a guest with the probe engine and the gRPC server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proto::v1;
use service::{Listen, ServiceConfig, Symbols, TlsFiles};
use tokio_stream::StreamExt;

/// How to run: probes to plant before boot, where to serve.
pub struct RunOptions {
    /// kprobe_events lines registered before the first guest instruction.
    pub probes: Vec<String>,
    /// Serve the API here (`None`: no server).
    pub listen: Option<Listen>,
    pub tls: TlsFiles,
    /// Symbols from this System.map instead of the kernel's ELF symbols.
    pub system_map: Option<PathBuf>,
    /// Print events to stdout as trace lines (the demo).
    pub print_events: bool,
    /// Continue a snapshot instead of booting.
    pub restore: Option<RestoreOptions>,
    /// Write every event to a JSON-lines file.
    pub export: Option<service::ExportConfig>,
    /// Push sinks (webhook, OTLP).
    pub sinks: Vec<service::SinkConfig>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<std::net::SocketAddr>,
    /// Policy files loaded before the guest starts and again on SIGHUP.
    pub policies: Vec<PathBuf>,
    /// Probes may have actions (`--allow-actions`).
    pub allow_actions: bool,
}

/// `run --restore DIR`.
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Leave the snapshot's probes out.
    pub no_probes: bool,
    /// What the user asked for; the snapshot's own when None.
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
}

/// Create the VM: boot `config`, or restore a snapshot with `config`'s
/// devices. Returns the VM, the kernel whose symbols apply, and the
/// snapshot's probe table.
fn create_vm(
    mut config: vmm::VmConfig,
    restore: Option<&RestoreOptions>,
) -> Result<(vmm::Vm, PathBuf, Option<Vec<u8>>)> {
    let Some(r) = restore else {
        let kernel = config.kernel.clone();
        return Ok((vmm::Vm::create(&config)?, kernel, None));
    };
    let manifest = vmm::snapshot::Manifest::load(&r.dir)?;
    config.vcpus = r.vcpus.unwrap_or(manifest.vcpus);
    let memory_mib = r.memory_mib.unwrap_or(manifest.memory_bytes >> 20);
    if memory_mib << 20 != manifest.memory_bytes {
        anyhow::bail!(
            "snapshot {} has {} MiB of guest memory, this run asks for {memory_mib} MiB",
            r.dir.display(),
            manifest.memory_bytes >> 20
        );
    }
    config.memory_mib = memory_mib;
    // Symbols: the kernel given, else the one the snapshot booted.
    let kernel = if config.kernel.as_os_str().is_empty() {
        let k = PathBuf::from(&manifest.kernel);
        match std::fs::metadata(&k) {
            Ok(m) if m.len() == manifest.kernel_len => k,
            Ok(m) => anyhow::bail!(
                "the snapshot's kernel {} changed since ({} bytes, {} then): pass --kernel with the one it booted",
                k.display(),
                m.len(),
                manifest.kernel_len
            ),
            Err(e) => anyhow::bail!(
                "the snapshot's kernel {}: {e}: pass --kernel with the one it booted",
                k.display()
            ),
        }
    } else {
        config.kernel.clone()
    };
    require_regular_file("the kernel", &kernel)?;
    let (vm, restored) = vmm::Vm::restore(&config, &r.dir)?;
    let probes = if r.no_probes { None } else { restored.probes };
    Ok((vm, kernel, probes))
}

/// Refuse anything but a regular file before it is opened: open(2) on a
/// FIFO blocks until a writer appears, and a device can hang or mislead.
fn require_regular_file(what: &str, path: &Path) -> Result<()> {
    // A missing file is reported by whoever opens it, with its own words.
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.is_file() {
        return Ok(());
    }
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "something else"
    };
    anyhow::bail!(
        "cannot use {} as {what}: it is {kind}, not a regular file",
        path.display()
    )
}

fn load_symbols(kernel: &Path, system_map: Option<&Path>) -> Result<Symbols> {
    if let Some(map) = system_map {
        return Ok(Symbols::from_system_map(map)?);
    }
    match Symbols::from_vmlinux(kernel) {
        Ok(s) => Ok(s),
        Err(e) => {
            // A bzImage has no symbols: only absolute addresses can be probed.
            eprintln!("hvprobe: warning: no symbols ({e}); pass --system-map to probe by name");
            Ok(Symbols::none())
        }
    }
}

/// Boot the guest described by `config`, serve the API while it runs, and
/// return the process exit code that reflects the guest's fate.
pub fn boot(config: vmm::VmConfig, opts: RunOptions) -> Result<u8> {
    let started = Instant::now();
    if opts.restore.is_none() {
        require_regular_file("the kernel", &config.kernel)?;
    }
    if let Some(p) = &config.initrd {
        require_regular_file("the initrd", p)?;
    }
    if let Some(p) = &opts.system_map {
        require_regular_file("the System.map", p)?;
    }
    // Rotation renames the path: never a device (/dev/null) or a FIFO.
    if let Some(e) = &opts.export {
        require_regular_file("the export file", &e.path)?;
    }
    for (what, p) in [
        ("the TLS certificate", &opts.tls.cert),
        ("the TLS key", &opts.tls.key),
        ("the TLS client CA", &opts.tls.client_ca),
    ] {
        if let Some(p) = p {
            require_regular_file(what, p)?;
        }
    }
    // Unusable TLS files stop the start before there is a VM (bind checks
    // again).
    if let Some(l) = &opts.listen {
        service::listen::check(l, &opts.tls)?;
    }
    // So do an export file that cannot be written and a metrics address
    // that cannot be bound.
    if let Some(e) = &opts.export {
        service::export::check(e).map_err(|e| anyhow::anyhow!("--export-file {e}"))?;
    }
    let metrics_listener = match opts.metrics {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("--metrics: cannot listen on {addr}"))?;
            Some(l)
        }
        None => None,
    };
    // Policy files that do not parse stop the start here too.
    let policies = service::policy::doc::parse_files(&opts.policies)
        .map_err(|e| anyhow::anyhow!("--policy {e}"))?;
    // Create the VM first: a bad kernel, memory size or KVM device is the
    // one error the user sees, not a symbol warning before it.
    let (vm, kernel, saved_probes) = create_vm(config, opts.restore.as_ref())?;
    let symbols = Arc::new(load_symbols(&kernel, opts.system_map.as_deref())?);
    let control = vm.control();
    let hvprobe::Attached {
        engine,
        guest,
        service: svc,
    } = hvprobe::attach(
        &vm,
        symbols,
        ServiceConfig {
            allow_actions: opts.allow_actions,
            ..ServiceConfig::default()
        },
    )?;
    {
        let vm = control.clone();
        guest.set_bridge_info(Box::new(move || {
            let st = vm.bridge_status();
            let b = vm.exit_stats().bridge;
            v1::SyscallBridgeInfo {
                mode: st.requested.to_string(),
                active: st.active,
                detail: st.detail.clone(),
                syscalls: b.syscalls,
                int80: b.int80,
                faults_passed: b.faults_passed,
                step_fallbacks: b.step_fallbacks,
            }
        }));
    }
    let bridge = control.bridge_status();
    if bridge.active || bridge.requested != vmm::BridgeMode::Auto {
        eprintln!("hvprobe: system-call bridge {}", bridge.detail);
    }
    if let Some(json) = &saved_probes {
        let restored = svc
            .restore_probes(json)
            .map_err(|s| anyhow::anyhow!("restoring the snapshot's probes: {}", s.message()))?;
        eprintln!(
            "hvprobe: restored {} probes from the snapshot",
            restored.len()
        );
    }
    if !opts.probes.is_empty() {
        let created = svc.create_lines(&opts.probes).map_err(|s| {
            let detail = proto::definition_error_from_status(&s)
                .map(|d| format!("\n{}", d.rendered))
                .unwrap_or_default();
            anyhow::anyhow!("--probe: {}{detail}", s.message())
        })?;
        for p in &created {
            eprintln!(
                "hvprobe: probe {} {}/{} at {}",
                p.id, p.group, p.event, p.location
            );
        }
    }
    let loaded = Arc::new(std::sync::Mutex::new(PolicySet::default()));
    if !opts.policies.is_empty() {
        let report = svc.apply_policies(&policies, &[]).map_err(|s| {
            let detail = proto::definition_error_from_status(&s)
                .map(|d| format!("\n{}", d.rendered))
                .unwrap_or_default();
            anyhow::anyhow!("--policy {}{detail}", s.message())
        })?;
        for p in &policies {
            eprintln!(
                "hvprobe: policy {} ({} probes, {}) from {}",
                p.name,
                p.probes.len(),
                if p.enabled { "enabled" } else { "disabled" },
                p.source
            );
        }
        loaded.lock().unwrap_or_else(|e| e.into_inner()).names = report.policies;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = match &opts.listen {
        Some(l) => {
            let bound = rt.block_on(service::listen::bind(l, &opts.tls))?;
            eprintln!("hvprobe: serving hvprobe.v1 on {}", bound.local());
            let svc = svc.clone();
            Some(rt.spawn(async move {
                bound
                    .serve(svc, async {
                        let _ = stop_rx.await;
                    })
                    .await
            }))
        }
        None => None,
    };
    let exporter = match opts.export {
        Some(cfg) => {
            let path = cfg.path.clone();
            let e = svc
                .start_export(cfg, rt.handle())
                .map_err(|e| anyhow::anyhow!("--export-file {e}"))?;
            eprintln!("hvprobe: exporting events to {}", path.display());
            Some(e)
        }
        None => None,
    };
    let mut sinks = Vec::new();
    for cfg in opts.sinks {
        let what = format!("{} {}", cfg.kind.name(), cfg.uri);
        let s = svc
            .start_sink(cfg, rt.handle())
            .map_err(|e| anyhow::anyhow!(e))?;
        eprintln!("hvprobe: sending events to {what}");
        sinks.push(s);
    }
    let (metrics_stop, metrics_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match metrics_listener {
        Some(listener) => {
            let m = svc.metrics();
            let vm = control.clone();
            m.set_exits(Box::new(move || exit_kinds(&vm.exit_stats())));
            if let Some(e) = &exporter {
                m.set_export(e.stats());
            }
            for s in &sinks {
                m.add_sink(s.kind(), s.stats());
            }
            let listener = {
                let _enter = rt.enter();
                tokio::net::TcpListener::from_std(listener).context("--metrics")?
            };
            if let Ok(local) = listener.local_addr() {
                eprintln!("hvprobe: metrics on http://{local}/metrics");
            }
            Some(rt.spawn(service::metrics::serve(listener, m, async {
                let _ = metrics_rx.await;
            })))
        }
        None => None,
    };
    let printer = if opts.print_events {
        let stream = rt
            .block_on(async { svc.subscribe_stream(v1::SubscribeRequest::default()) })
            .map_err(|s| anyhow::anyhow!("subscribing: {}", s.message()))?;
        Some(rt.spawn(print_events(stream)))
    } else {
        None
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // SIGTERM (systemd, kill, Kubernetes) is handled like SIGINT: stop
        // the guest, end the streams, remove the socket, exit normally.
        let mut term = rt
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            })
            .context("installing the SIGTERM handler")?;
        rt.spawn(async move {
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_err() { return },
                _ = term.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        });
    }
    {
        // SIGHUP reloads the --policy files, all or nothing (without any it
        // only says so: `systemctl reload` must never end the guest).
        let mut hup = rt
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            })
            .context("installing the SIGHUP handler")?;
        let (svc, paths, loaded) = (svc.clone(), opts.policies.clone(), loaded.clone());
        rt.spawn(async move {
            while hup.recv().await.is_some() {
                let (svc, paths, loaded) = (svc.clone(), paths.clone(), loaded.clone());
                let _ = tokio::task::spawn_blocking(move || reload_policies(&svc, &paths, &loaded))
                    .await;
            }
        });
    }
    let running = vm.start(engine.clone())?;
    guest.set_state(v1::GuestState::Running);
    let outcome = loop {
        if let Some(o) = running.wait_timeout(Duration::from_millis(200)) {
            break o;
        }
        if interrupted.load(Ordering::SeqCst) {
            eprintln!("hvprobe: interrupted, stopping the guest");
            running.stop();
        }
    };
    let outcome2 = running.wait();
    debug_assert_eq!(outcome, outcome2);
    guest.set_state(match outcome {
        vmm::RunOutcome::TripleFault { .. } | vmm::RunOutcome::Crashed { .. } => {
            v1::GuestState::Failed
        }
        _ => v1::GuestState::Stopped,
    });
    if let Some(p) = printer {
        // Let the last batch out: the stream batches for a few milliseconds.
        std::thread::sleep(Duration::from_millis(200));
        p.abort();
        let _ = rt.block_on(p);
        for p in engine.list() {
            eprintln!(
                "hvprobe: {} hits={} missed={} dropped={}",
                p.name, p.hits, p.missed, p.dropped
            );
        }
    }
    if let Some(e) = exporter {
        // The stream flushes within its batch delay; the exporter reads
        // until it has been idle, then stops.
        let stats = e.stats();
        e.finish();
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        eprintln!(
            "hvprobe: export: {} events, {} lost (queue full {}, write failed {}), {} bytes, {} rotations",
            l(&stats.events),
            l(&stats.lost_queue_full) + l(&stats.lost_write_failed),
            l(&stats.lost_queue_full),
            l(&stats.lost_write_failed),
            l(&stats.bytes),
            l(&stats.rotations)
        );
    }
    // The sinks deliver what is left, each within its drain time, side by
    // side.
    let finishing: Vec<_> = sinks
        .into_iter()
        .map(|s| std::thread::spawn(move || s.finish()))
        .collect();
    for f in finishing {
        if let Ok(line) = f.join() {
            eprintln!("{line}");
        }
    }
    let _ = metrics_stop.send(());
    if let Some(m) = metrics_server {
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), m).await });
    }
    let _ = stop_tx.send(());
    if let Some(s) = server {
        match rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), s).await }) {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("hvprobe: server error: {e}"),
            Ok(Err(e)) => eprintln!("hvprobe: server task failed: {e}"),
            Err(_) => eprintln!("hvprobe: server did not stop within 5 s"),
        }
    }
    // The server removes its socket when it ends; it may have been cut short.
    if let Some(service::Listen::Unix(path)) = &opts.listen {
        let _ = std::fs::remove_file(path);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    let b = control.exit_stats().bridge;
    if control.bridge_status().active {
        eprintln!(
            "hvprobe: system-call bridge: {} syscalls, {} int80, {} faults passed on, {} step fallbacks",
            b.syscalls, b.int80, b.faults_passed, b.step_fallbacks
        );
    }
    eprintln!(
        "hvprobe: {outcome} after {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(outcome.exit_code() as u8)
}

/// The policies the `--policy` files loaded last.
#[derive(Default)]
struct PolicySet {
    names: Vec<String>,
}

/// SIGHUP: read and parse the `--policy` files again and apply them as one
/// load (policies that left the files are deleted). Anything wrong leaves
/// the running policies as they are, and says what and where.
fn reload_policies(
    svc: &service::HvProbeService,
    paths: &[PathBuf],
    loaded: &std::sync::Mutex<PolicySet>,
) {
    let mut set = loaded.lock().unwrap_or_else(|e| e.into_inner());
    if paths.is_empty() {
        eprintln!("hvprobe: reload: no --policy files, nothing to reload");
        return;
    }
    let defs = match service::policy::doc::parse_files(paths) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hvprobe: reload: {e}; the running policies are unchanged");
            return;
        }
    };
    let gone: Vec<String> = set
        .names
        .iter()
        .filter(|n| !defs.iter().any(|d| &d.name == *n))
        .cloned()
        .collect();
    // One that was deleted by DeletePolicy meanwhile is not deleted again.
    let live: Vec<String> = svc
        .list_policies()
        .map(|v| v.into_iter().map(|p| p.name).collect())
        .unwrap_or_default();
    let gone: Vec<String> = gone.into_iter().filter(|n| live.contains(n)).collect();
    match svc.apply_policies(&defs, &gone) {
        Ok(r) => {
            eprintln!(
                "hvprobe: reload: {} policies ({} deleted): {} probes added, {} removed, {} unchanged",
                r.policies.len(),
                r.deleted_policies.len(),
                r.added,
                r.removed,
                r.kept
            );
            set.names = r.policies;
        }
        Err(s) => eprintln!(
            "hvprobe: reload: {}; the running policies are unchanged",
            s.message()
        ),
    }
}

/// VM exits by kind, for `/metrics`.
fn exit_kinds(s: &vmm::ExitStats) -> Vec<(&'static str, u64)> {
    vec![
        ("all", s.exits),
        ("io", s.io),
        ("mmio", s.mmio),
        ("breakpoint", s.breakpoints),
        ("single_step", s.single_steps),
        ("kick", s.kicks),
        ("emulation_gap", s.gap_instructions),
        ("bridged_syscall", s.bridge.syscalls),
        ("bridged_int80", s.bridge.int80),
        ("bridged_fault", s.bridge.faults_passed),
    ]
}

async fn print_events(
    stream: impl tokio_stream::Stream<Item = Result<v1::SubscribeResponse, tonic::Status>>,
) {
    use v1::subscribe_response::Payload;
    tokio::pin!(stream);
    while let Some(Ok(msg)) = stream.next().await {
        match msg.payload {
            Some(Payload::Events(b)) => {
                for e in b.events {
                    println!("cpu{} {}", e.vcpu, e.text);
                }
            }
            Some(Payload::Lost(l)) => println!("LOST {} events", l.count),
            _ => {}
        }
    }
}
