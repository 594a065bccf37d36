//! `hvprobe bench`: what a probe hit costs, measured against a bare VM exit
//! on the same guest in the same run.
//!
//! The test guest's `hvtest.bench=N` mode runs three timed phases on the boot
//! CPU, announced on the marker port: N bare exits (`outb` to a port no device
//! answers), N empty loop iterations, N calls of `hv_add`. A bare exit costs
//! (exits − loop) / N. A probe hit costs the extra time of the call phase
//! with the probe over the call phase without it, / N. Ratios are taken per
//! round against that round's own bare-exit cost, and the median reported.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use guest_access::GuestMemory;
use introspect::{Engine, EngineConfig, ProbeRequest, SymbolIndex, KERNEL_TEXT_MAP};
use vmm::{RunOutcome, Vm, VmConfig};

#[path = "bench_events.rs"]
mod events;
#[path = "bench_snapshot.rs"]
mod snapshot;

#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Another benchmark instead of probe costs.
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// Iterations of each guest phase.
    #[arg(long, default_value_t = 20_000)]
    pub iters: u64,
    /// vCPUs (the other vCPUs idle; the single-step fallback must stop them).
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Rounds per configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// How many never-hit probes to arm for the exit-count check.
    #[arg(long, default_value_t = 100)]
    pub unhit: usize,
    /// The VMM's system-call bridge in every run (as for `hvprobe run`).
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub syscall_bridge: vmm::BridgeMode,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchWhat {
    /// Events/s delivered through the gRPC stream to a loopback client
    /// (synthetic load on the engine's hit path) and the test guest's hit
    /// rate in the same run.
    Events(events::EventsArgs),
    /// Snapshot pause and restore time (to the first guest instruction and
    /// the first probe event) of the test guest, against a fresh boot; and
    /// of another snapshot (`--restore DIR`, e.g. the cached Debian one).
    Snapshot(snapshot::SnapshotArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    NoProbe,
    Kprobe,
    KprobeSingleStep,
    KprobeOutOfLine,
    /// A `%hw` kprobe: a debug register, no int3.
    KprobeHardware,
    Kretprobe,
    Unhit,
    /// No probe; the guest also runs N minimal user system calls.
    Syscalls,
    /// No probe; a write watch on the test guest's watched variable, then N
    /// watched writes and N unwatched writes on its page.
    Watch,
}

/// One guest run.
struct Sample {
    /// Seconds per iteration of each phase.
    exit_s: f64,
    loop_s: f64,
    call_s: f64,
    vm_exits: u64,
    probes_armed: usize,
    hits: u64,
    /// Seconds per user system call round trip (only [`Setup::Syscalls`]).
    syscall_s: Option<f64>,
    /// System calls the VMM's bridge completed in this run.
    bridged: u64,
    bridge_active: bool,
    /// The host's share of the run's breakpoint exits.
    hit_cost: vmm::HitCost,
    /// Seconds per watched write and per unwatched write on the watched
    /// page, the watch's hits, and the VMM's protected-page counters
    /// (only [`Setup::Watch`]).
    watch: Option<(f64, f64, u64, vmm::WatchStats)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Instruction boundaries in test-guest functions that bench mode never runs.
fn never_run_boundaries(mem: &dyn GuestMemory, symbols: &SymbolIndex, want: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for f in test_guest::COUNTED_FUNCTIONS {
        if *f == test_guest::BENCH_FUNCTION {
            continue;
        }
        let Ok(start) = symbols.table.lookup(f) else {
            continue;
        };
        let Some((_, end)) = symbols.table.function_bounds(start) else {
            continue;
        };
        let mut code = vec![0u8; (end - start) as usize + 15];
        if mem.read_phys(start - KERNEL_TEXT_MAP, &mut code).is_err() {
            continue;
        }
        let mut off = 0usize;
        while start + (off as u64) < end && out.len() < want {
            let ip = start + off as u64;
            let Ok(d) = insn_emu::prepare(&code[off..], ip) else {
                break;
            };
            out.push(ip);
            off += d.len();
        }
    }
    out
}

fn run_once(args: &BenchArgs, setup: Setup) -> Result<Sample> {
    let kernel = test_guest::kernel_path();
    let mut config = VmConfig::new(kernel);
    config.vcpus = args.vcpus;
    config.memory_mib = 64;
    config.cmdline = format!("hvtest.bench={}", args.iters);
    if setup == Setup::Syscalls {
        config.cmdline.push_str(" hvtest.user=1");
    }
    if setup == Setup::Watch {
        config.cmdline.push_str(" hvtest.watch=1");
    }
    config.serial = vmm::SerialOutput::Discard;
    config.syscall_bridge = args.syscall_bridge;
    let vm = Vm::create(&config)?;
    let control = vm.control();
    let image = guest_symbols::KernelImage::open(kernel)?;
    let symbols = Arc::new(SymbolIndex::new(image.symbols()?, None));
    let engine = Engine::new(
        control.clone(),
        symbols.clone(),
        EngineConfig::for_vcpus(args.vcpus as usize),
    );
    let trap = symbols
        .return_trap_candidate()
        .ok_or_else(|| anyhow!("no return-trap padding in the test guest"))?;
    engine.set_return_trap(trap)?;
    let target = symbols.table.lookup(test_guest::BENCH_FUNCTION)?;
    let mut probes_armed = 0;
    match setup {
        Setup::NoProbe | Setup::Syscalls | Setup::Watch => {}
        Setup::Kprobe => {
            engine.register(ProbeRequest::kprobe("bench/k", target))?;
            probes_armed = 1;
        }
        Setup::KprobeSingleStep => {
            let mut r = ProbeRequest::kprobe("bench/ss", target);
            r.force_single_step = true;
            engine.register(r)?;
            probes_armed = 1;
        }
        Setup::KprobeOutOfLine => {
            let mut r = ProbeRequest::kprobe("bench/xol", target);
            r.force_out_of_line = true;
            engine.register(r)?;
            probes_armed = 1;
        }
        Setup::KprobeHardware => {
            let mut r = ProbeRequest::kprobe("bench/hw", target);
            r.hardware = true;
            engine.register(r)?;
            probes_armed = 1;
        }
        Setup::Kretprobe => {
            engine.register(ProbeRequest::kretprobe("bench/r", target, None))?;
            probes_armed = 1;
        }
        Setup::Unhit => {
            let points = never_run_boundaries(control.ram(), &symbols, args.unhit);
            let reqs = points
                .iter()
                .enumerate()
                .map(|(i, a)| ProbeRequest::kprobe(format!("bench/unhit{i}"), *a))
                .collect();
            engine.register_batch(reqs)?;
            probes_armed = points.len();
        }
    }
    let running = vm.start(engine.clone())?;
    let mut watch_id = None;
    if setup == Setup::Watch {
        watch_id = Some(add_watch_when_asked(&running, &control, &engine, &symbols)?);
    }
    let outcome = running.wait();
    if outcome != (RunOutcome::GuestExit { status: 0 }) {
        bail!("bench guest ({setup:?}) ended badly: {outcome}");
    }
    let marks = control.markers();
    let at = |tag: u32| -> Result<Instant> {
        marks
            .iter()
            .find(|m| m.0 == tag)
            .map(|m| m.1)
            .ok_or_else(|| anyhow!("guest marker {tag} missing"))
    };
    let n = args.iters as f64;
    let per =
        |a: u32, b: u32| -> Result<f64> { Ok(at(b)?.duration_since(at(a)?).as_secs_f64() / n) };
    let hits = engine.list().iter().map(|p| p.hits).sum();
    Ok(Sample {
        exit_s: per(test_guest::BENCH_PHASE_EXITS, test_guest::BENCH_PHASE_LOOP)?,
        loop_s: per(test_guest::BENCH_PHASE_LOOP, test_guest::BENCH_PHASE_CALLS)?,
        call_s: per(test_guest::BENCH_PHASE_CALLS, test_guest::BENCH_PHASE_END)?,
        vm_exits: control.exit_stats().exits,
        probes_armed,
        hits,
        syscall_s: if setup == Setup::Syscalls {
            Some(per(
                test_guest::BENCH_PHASE_SYSCALLS,
                test_guest::BENCH_PHASE_SYSCALLS_END,
            )?)
        } else {
            None
        },
        watch: match watch_id {
            Some(id) => Some((
                per(
                    test_guest::BENCH_PHASE_WATCHED,
                    test_guest::BENCH_PHASE_PAGE_WRITES,
                )?,
                per(
                    test_guest::BENCH_PHASE_PAGE_WRITES,
                    test_guest::BENCH_PHASE_WATCH_END,
                )?,
                engine
                    .watches()
                    .iter()
                    .find(|w| w.id == id)
                    .map_or(0, |w| w.hits),
                control.exit_stats().watch,
            )),
            None => None,
        },
        bridged: control.exit_stats().bridge.syscalls,
        hit_cost: control.exit_stats().hit_cost,
        bridge_active: control.bridge_status().active,
    })
}

/// Wait until the bench guest asks for its watch, add it, let the guest go.
fn add_watch_when_asked(
    running: &vmm::RunningVm,
    control: &vmm::Machine,
    engine: &Engine,
    symbols: &SymbolIndex,
) -> Result<introspect::WatchId> {
    use guest_access::VmControl;
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    while !control
        .markers()
        .iter()
        .any(|m| m.0 == test_guest::BENCH_PHASE_WATCH_WAIT)
    {
        if let Some(o) = running.wait_timeout(std::time::Duration::from_millis(2)) {
            bail!("bench guest ended before its watch phases: {o}");
        }
        if Instant::now() > deadline {
            bail!("bench guest never reached its watch phases");
        }
    }
    let page = symbols.table.lookup(test_guest::WATCH_PAGE_SYMBOL)?;
    let id = engine.watch(introspect::WatchRequest {
        name: test_guest::WATCH_PAGE_SYMBOL.into(),
        addr: page,
        len: 8,
        access: introspect::WatchAccess::Write,
        mechanism: None,
    })?;
    let go = symbols.table.lookup(test_guest::WATCH_GO_SYMBOL)?;
    control
        .memory()
        .write_phys(go - introspect::KERNEL_TEXT_MAP, &1u64.to_le_bytes())?;
    Ok(id)
}

/// One line of the host's share of a probe hit: time, traps, ioctls per hit,
/// and for the stop-the-world fallback where the time went.
fn print_host_share(label: &str, runs: &[Sample], iters: u64) {
    let n = iters as f64;
    let per = |f: &dyn Fn(&vmm::HitCost) -> u64| {
        median(runs.iter().map(|s| f(&s.hit_cost) as f64 / n).collect())
    };
    let host_us = per(&|h| h.host_ns) / 1e3;
    let traps = per(&|h| h.hits);
    let ioctls = per(&|h| h.ioctls);
    print!("    {label:<16} {host_us:6.2} us host, {traps:4.2} traps, {ioctls:4.2} ioctls per hit");
    let steps = per(&|h| h.step_runs);
    if steps > 0.0 {
        print!(
            "; of which stopping the world {:.2} us; plus {steps:.2} single-step KVM_RUN of {:.2} us",
            per(&|h| h.world_stop_ns) / 1e3,
            per(&|h| h.step_run_ns) / 1e3
        );
    }
    println!();
}

/// Run the benchmark and print the figures.
pub fn run(args: BenchArgs) -> Result<u8> {
    match args.what {
        Some(BenchWhat::Events(a)) => return events::run(a),
        Some(BenchWhat::Snapshot(a)) => return snapshot::run(a),
        None => {}
    }
    if args.iters == 0 || args.rounds == 0 {
        bail!("--iters and --rounds must be at least 1");
    }
    let mut setups = vec![
        Setup::NoProbe,
        Setup::Kprobe,
        Setup::KprobeSingleStep,
        Setup::Kretprobe,
        Setup::Unhit,
        Setup::KprobeOutOfLine,
        Setup::KprobeHardware,
    ];
    // With the bridge off, user system calls fail on hosts that need it.
    if args.syscall_bridge != vmm::BridgeMode::Off {
        setups.push(Setup::Syscalls);
    }
    setups.push(Setup::Watch);
    // Interleave the configurations round by round, so drift on a noisy
    // machine hits all of them alike.
    let mut samples: Vec<Vec<Sample>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        for (i, s) in setups.iter().enumerate() {
            let sample = run_once(&args, *s).with_context(|| format!("round {round}, {s:?}"))?;
            samples[i].push(sample);
        }
    }
    let us = |s: f64| s * 1e6;
    // Every run measures bare exits the same way: pool them all.
    let bare = median(
        samples
            .iter()
            .flatten()
            .map(|s| s.exit_s - s.loop_s)
            .collect(),
    );
    let call_bare = median(samples[0].iter().map(|s| s.call_s).collect());
    println!(
        "hvprobe bench: test guest, {} vCPUs, {} iterations per phase, median of {} rounds",
        args.vcpus, args.iters, args.rounds
    );
    println!(
        "  bare VM exit (outb to an unused port):       {:8.2} us",
        us(bare)
    );
    println!(
        "  hv_add call without probe (emulated guest):  {:8.2} us",
        us(call_bare)
    );
    let report = |label: &str, idx: usize, target: f64| {
        let extra = median(samples[idx].iter().map(|s| s.call_s).collect()) - call_bare;
        let hits_ok = samples[idx].iter().all(|s| s.hits == args.iters);
        let r = extra / bare;
        println!(
            "  {label:<44} {:8.2} us  = {r:5.2} bare exits (target <= {target}){}{}",
            us(extra),
            if r <= target { "" } else { "  ABOVE TARGET" },
            if hits_ok {
                ""
            } else {
                "  (hit count != iterations!)"
            }
        );
    };
    report("kprobe hit, emulated (extra per call):", 1, 1.2);
    report("kprobe hit, single-step fallback:", 2, 2.5);
    report("kprobe hit, out of line (2 exits, no stop):", 5, 2.1);
    report("kretprobe entry + return:", 3, 2.1);
    report("kprobe hit, debug register (%hw), emulated:", 6, 1.2);
    println!("  host share per probe hit (trap exit to next KVM_RUN, outside the kernel; median):");
    for (label, idx) in [
        ("emulated", 1),
        ("single-step", 2),
        ("out of line", 5),
        ("kretprobe pair", 3),
        ("debug register (%hw)", 6),
    ] {
        print_host_share(label, &samples[idx], args.iters);
    }
    if let Some(sys) = samples.get(7) {
        let rt = median(sys.iter().filter_map(|s| s.syscall_s).collect());
        let active = sys[0].bridge_active;
        // N timed calls, two markers, the exit.
        let counted = sys.iter().all(|s| !active || s.bridged == args.iters + 3);
        let label = format!(
            "user syscall round trip ({}):",
            if active { "bridged" } else { "native" }
        );
        println!(
            "  {label:<44} {:8.2} us  = {:5.2} bare exits{}",
            us(rt),
            rt / bare,
            if counted {
                ""
            } else {
                "  (bridged count != calls!)"
            }
        );
    }
    if let Some(i) = setups.iter().position(|s| *s == Setup::Watch) {
        print_watch_costs(&samples[i], args.iters, bare);
    }
    let unhit = &samples[4];
    let base_exits: Vec<u64> = samples[0].iter().map(|s| s.vm_exits).collect();
    let unhit_exits: Vec<u64> = unhit.iter().map(|s| s.vm_exits).collect();
    let equal = base_exits == unhit_exits;
    println!(
        "  VM exits per run, {} armed never-hit probes: {:?}; without probes: {:?} ({})",
        unhit[0].probes_armed,
        unhit_exits,
        base_exits,
        if equal { "equal" } else { "DIFFERENT" }
    );
    let probes_armed: usize = samples.iter().map(|v| v[0].probes_armed).sum();
    tracing::debug!("probes armed across setups: {probes_armed}");
    Ok(if equal { 0 } else { 1 })
}

/// The cost of writes to a watched page against a bare exit, and the VMM's
/// and engine's host share per such write.
fn print_watch_costs(runs: &[Sample], iters: u64, bare: f64) {
    let w: Vec<_> = runs.iter().filter_map(|s| s.watch).collect();
    if w.is_empty() {
        return;
    }
    let watched = median(w.iter().map(|x| x.0).collect());
    let other = median(w.iter().map(|x| x.1).collect());
    let host_us = median(
        w.iter()
            .map(|x| x.3.host_ns as f64 / x.3.writes.max(1) as f64 / 1e3)
            .collect(),
    );
    let exact = w.iter().all(|x| x.2 == iters);
    println!(
        "  watched write (hv_watch_set, with event):    {:8.2} us  = {:5.2} bare exits{}",
        watched * 1e6,
        watched / bare,
        if exact {
            ""
        } else {
            "  (hit count != writes!)"
        }
    );
    println!(
        "  unwatched write on a watched page:           {:8.2} us  = {:5.2} bare exits",
        other * 1e6,
        other / bare
    );
    println!("    host share per watched-page write (exit to next KVM_RUN, both kinds): {host_us:6.2} us");
}
