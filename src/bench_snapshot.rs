//! `hvprobe bench snapshot`: how long a snapshot pauses the guest, and how
//! long a restore takes to the first guest instruction (first VM exit) and
//! to the first probe event, against a fresh boot of the same guest to its
//! first probe event, all in one run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use introspect::Engine;
use service::{Guest, HvProbeService, ServiceConfig, Symbols};
use vmm::{Vm, VmConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Rounds of snapshot and restore; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// A snapshot directory to restore as well (e.g. the cached Debian one
    /// that tests/debian/snapshot.sh makes), with `--probe` on it.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// Probe for `--restore` (kprobe_events syntax).
    #[arg(
        long,
        default_value = "p:bench/open do_sys_openat2 path=+0(%si):string"
    )]
    pub probe: String,
    /// Console input for `--restore` once it runs (e.g. a command for a
    /// guest shell reading its console), so the probe has something to see.
    #[arg(long, default_value = "cat /etc/hostname\n")]
    pub console: String,
}

const PROBES: &[&str] = &["p:bench/add hv_add", "r:bench/fib hv_fib"];

/// A VM with the engine and the service over it, not started yet.
struct Probed {
    vm: Vm,
    engine: Arc<Engine>,
    svc: HvProbeService,
    guest: Arc<Guest>,
}

fn probed(vm: Vm, kernel: &Path) -> Result<Probed> {
    let symbols = Arc::new(Symbols::from_vmlinux(kernel)?);
    let a = hvprobe::attach(&vm, symbols, ServiceConfig::default())?;
    Ok(Probed {
        vm,
        engine: a.engine,
        svc: a.service,
        guest: a.guest,
    })
}

/// Times of one started guest: to its first VM exit and first probe event.
struct Started {
    running: vmm::RunningVm,
    first_exit: Duration,
    first_event: Duration,
}

/// Start `p` (its clock started at `t0`) and wait for the first exit and
/// the first event of any probe; `poke` runs once the guest runs.
fn start_and_time(p: Probed, t0: Instant, poke: impl FnOnce(&vmm::Machine)) -> Result<Started> {
    let sub = p.engine.subscribe(1024, None, None);
    let control = p.vm.control();
    let running = p.vm.start(p.engine.clone())?;
    p.guest.set_state(proto::v1::GuestState::Running);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first_exit = None;
    while first_exit.is_none() {
        if control.exit_stats().exits > 0 {
            first_exit = Some(t0.elapsed());
        } else if Instant::now() > deadline {
            bail!("the guest made no VM exit within 600 s");
        } else {
            std::hint::spin_loop();
        }
    }
    poke(&control);
    loop {
        if sub.pop().is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("no probe event within 600 s");
        }
        if let Some(o) = running.wait_timeout(Duration::from_micros(200)) {
            bail!("the guest ended before any probe event: {o}");
        }
    }
    Ok(Started {
        running,
        first_exit: first_exit.unwrap(),
        first_event: t0.elapsed(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn test_guest_config() -> VmConfig {
    let mut c = VmConfig::new(test_guest::kernel_path());
    c.vcpus = 2;
    c.memory_mib = 128;
    c.cmdline = test_guest::cmdline(None, None, true);
    c.serial = vmm::SerialOutput::Discard;
    c
}

/// Restore `dir` with its own probes (or `extra` instead when given) and time it.
fn restore_once(
    dir: &Path,
    config: &VmConfig,
    extra: Option<&str>,
    console: &[u8],
) -> Result<Started> {
    let t0 = Instant::now();
    let (vm, restored) = Vm::restore(config, dir)?;
    let kernel = PathBuf::from(&restored.manifest.kernel);
    let p = probed(vm, &kernel)?;
    match extra {
        Some(line) => {
            p.svc
                .create_lines(&[line.to_string()])
                .map_err(|s| anyhow!("--probe: {}", s.message()))?;
        }
        None => {
            let json = restored
                .probes
                .as_deref()
                .context("the snapshot has no probe table")?;
            p.svc
                .restore_probes(json)
                .map_err(|s| anyhow!("restoring probes: {}", s.message()))?;
        }
    }
    start_and_time(p, t0, |c| {
        if !console.is_empty() {
            c.console_input_all(console, Duration::from_secs(30));
        }
    })
}

pub fn run(args: SnapshotArgs) -> Result<u8> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let tmp = std::env::temp_dir().join(format!("hvprobe-bench-snapshot-{}", std::process::id()));
    let _cleanup = Cleanup(tmp.clone());
    let snap = tmp.join("snap");

    // A fresh boot to its first probe event, for scale.
    let mut boots = Vec::new();
    let config = test_guest_config();
    let mut live = None;
    for _ in 0..args.rounds {
        let t0 = Instant::now();
        let p = probed(Vm::create(&config)?, test_guest::kernel_path())?;
        p.svc
            .create_lines(&PROBES.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .map_err(|s| anyhow!("probes: {}", s.message()))?;
        let svc = p.svc.clone();
        let s = start_and_time(p, t0, |_| {})?;
        boots.push(ms(s.first_event));
        live = Some((s.running, svc));
    }
    let (running, svc) = live.unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (mut pause, mut capture, mut write, mut written) = (vec![], vec![], vec![], 0);
    for _ in 0..args.rounds {
        let t0 = Instant::now();
        let r = svc
            .create_snapshot(&snap, false)
            .map_err(|s| anyhow!("snapshot: {}", s.message()))?;
        pause.push(ms(t0.elapsed()));
        capture.push(r.capture_us as f64 / 1e3);
        write.push(r.write_us as f64 / 1e3);
        written = r.written_bytes;
        std::thread::sleep(Duration::from_millis(50));
    }
    running.stop();
    drop(running);
    let (mut to_exit, mut to_event) = (vec![], vec![]);
    for _ in 0..args.rounds {
        let s = restore_once(&snap, &test_guest_config(), None, b"")?;
        to_exit.push(ms(s.first_exit));
        to_event.push(ms(s.first_event));
        s.running.stop();
    }
    let boot = median(boots);
    let restore_event = median(to_event.clone());
    println!(
        "test guest (128 MiB, 2 vCPUs, {} probes, hvtest.forever), medians of {} rounds:",
        PROBES.len(),
        args.rounds
    );
    println!(
        "  snapshot: guest paused {:.1} ms (capture KVM state {:.1} ms, write files {:.1} ms), {} KiB written",
        median(pause),
        median(capture),
        median(write),
        written >> 10
    );
    println!(
        "  restore:  to first guest instruction (first VM exit) {:.1} ms, to first probe event {:.1} ms",
        median(to_exit),
        restore_event
    );
    println!(
        "  boot:     fresh boot to first probe event {boot:.1} ms; restore / boot = {:.2}",
        restore_event / boot
    );
    if let Some(dir) = &args.restore {
        let m = vmm::snapshot::Manifest::load(dir)?;
        let mut c = VmConfig::new(&m.kernel);
        c.vcpus = m.vcpus;
        c.memory_mib = m.memory_bytes >> 20;
        c.serial = vmm::SerialOutput::Discard;
        let s = restore_once(dir, &c, Some(&args.probe), args.console.as_bytes())?;
        s.running.stop();
        println!(
            "{} ({} MiB, {} vCPUs), `{}` on the console: to first guest instruction {:.1} ms, to first `{}` event {:.1} ms",
            dir.display(),
            m.memory_bytes >> 20,
            m.vcpus,
            args.console.trim(),
            ms(s.first_exit),
            args.probe,
            ms(s.first_event)
        );
    }
    Ok(0)
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
