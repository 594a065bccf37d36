//! `hvprobe bench events`: events/s delivered through the gRPC stream to a
//! client on loopback, and the test guest's hit rate in the same run.
//!
//! The test guest alone produces a few thousand hits/s here (its kernel code
//! is emulated), far too few to load the delivery path. So N producer
//! threads drive the engine's real hit path against an in-process fake vCPU:
//! each call of `Engine::on_breakpoint` finds the planted site, evaluates the
//! probe's fetch arguments from fake guest memory, emulates the displaced
//! `nop5` and publishes the event into the subscriber queues, exactly as for
//! a guest hit. A real server (`HvProbeService` behind `listen::bind`)
//! streams them to a real tonic client, which counts events and lost
//! records. The real test guest runs at the same time with a probe on
//! `hv_add`, served and subscribed the same way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use guest_access::fake::{FakeMemory, FakeVcpu, FakeVm};
use guest_access::{BreakpointAction, GuestMemory, Regs, VmControl};
use introspect::{Engine, EngineConfig, KERNEL_TEXT_MAP};
use proto::v1::{self, subscribe_response::Payload};
use service::{Guest, HvProbeService, Listen, ServiceConfig, Symbols, TlsFiles};

#[derive(clap::Args, Debug, Clone)]
pub struct EventsArgs {
    /// Length of the measured window.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Threads calling the engine's breakpoint handler in a loop.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Events per stream message (the subscription's max_batch_events).
    #[arg(long, default_value_t = 4096)]
    pub batch: u32,
    /// Engine-side queue of the subscription, in events.
    #[arg(long, default_value_t = 65536)]
    pub queue: u32,
    /// Stream encoding: `packed` (columns, for pipelines) or `full` (one
    /// Event message each, with trace text).
    #[arg(long, default_value = "packed", value_parser = ["packed", "full"])]
    pub encoding: String,
    /// Where the servers listen: `tcp` (127.0.0.1, any port) or `unix`.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "unix"])]
    pub transport: String,
    /// Skip the real test guest (synthetic load only).
    #[arg(long)]
    pub no_guest: bool,
    /// First measure the engine's cost of hits that only find a stalled
    /// subscriber (engine-level subscriptions, before the gRPC one).
    #[arg(long)]
    pub stalled_costs: bool,
}

/// Guest-physical layout of the fake: the probed `nop5` (+ `ret`) and the
/// string the probe fetches.
const TEXT_GPA: u64 = 0x1000;
const STRING_GPA: u64 = 0x2000;
const FAKE_RAM: usize = 0x10000;
const PATH: &[u8] = b"/etc/hvprobe/bench.conf";
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The synthetic guest: flat RAM holding the probed `nop5` + `ret` and the
/// fetched string, paging off (kernel text at its link address). Nothing
/// runs guest code on its own: the producer threads are its vCPUs.
fn fake_vm(vcpus: usize) -> Result<Arc<FakeVm>> {
    let mem = FakeMemory::new(FAKE_RAM);
    mem.write_phys(TEXT_GPA, &NOP5)?;
    mem.write_phys(TEXT_GPA + 5, &[0xc3])?;
    mem.write_phys(STRING_GPA, PATH)?;
    Ok(Arc::new(FakeVm::new(mem, vcpus)))
}

/// What a client saw on one stream.
#[derive(Default)]
struct Counts {
    events: AtomicU64,
    lost: AtomicU64,
    messages: AtomicU64,
    /// Events whose content did not match what the probe must produce.
    bad: AtomicU64,
    /// The stream ended or failed.
    ended: AtomicBool,
}

impl Counts {
    fn snapshot(&self) -> (u64, u64) {
        (
            self.events.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }
}

/// One server: an engine, the gRPC service over it, and where it listens.
struct Server {
    engine: Arc<Engine>,
    listen: Listen,
    stop: tokio::sync::oneshot::Sender<()>,
}

fn serve(
    rt: &tokio::runtime::Runtime,
    engine: Arc<Engine>,
    symbols: Arc<Symbols>,
    vm: Arc<dyn VmControl>,
    transport: &str,
    name: &str,
) -> Result<Server> {
    let guest = Guest::new(vm);
    guest.set_state(v1::GuestState::Running);
    let svc = HvProbeService::new(engine.clone(), symbols, guest, ServiceConfig::default());
    let want = match transport {
        "unix" => Listen::Unix(
            std::env::temp_dir().join(format!("hvprobe-bench-{}-{name}.sock", std::process::id())),
        ),
        _ => Listen::Tcp(([127, 0, 0, 1], 0).into()),
    };
    let bound = rt
        .block_on(service::listen::bind(&want, &TlsFiles::default()))
        .with_context(|| format!("listening on {want}"))?;
    let listen = bound.local();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(async move {
        if let Err(e) = bound
            .serve(svc, async {
                let _ = rx.await;
            })
            .await
        {
            eprintln!("hvprobe bench: server error: {e}");
        }
    });
    Ok(Server {
        engine,
        listen,
        stop,
    })
}

type Client = proto::v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>;

async fn connect(listen: &Listen) -> Result<Client> {
    // Large HTTP/2 windows: the default 64 KiB stream window would cap
    // the stream at one window per round trip.
    service::client::connect_with(listen, |e| {
        e.initial_stream_window_size(8 << 20)
            .initial_connection_window_size(16 << 20)
    })
    .await
    .with_context(|| format!("connecting to {listen}"))
}

/// Creates a probe through the API; returns its id.
async fn create_probe(client: &mut Client, definition: &str) -> Result<u64> {
    let probe = client
        .create_probe(v1::CreateProbeRequest {
            definition: Some(v1::ProbeDefinition {
                definition: Some(v1::probe_definition::Definition::KprobeEvents(
                    definition.into(),
                )),
                ..Default::default()
            }),
        })
        .await
        .map_err(|s| anyhow!("creating probe '{definition}': {}", s.message()))?
        .into_inner()
        .probe
        .ok_or_else(|| anyhow!("creating probe '{definition}': no probe in the answer"))?;
    Ok(probe.id)
}

/// Subscribes to a probe's events and waits for the stream to start.
async fn subscribe(
    client: &mut Client,
    probe: u64,
    args: &EventsArgs,
) -> Result<tonic::Streaming<v1::SubscribeResponse>> {
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            probe_ids: vec![probe],
            max_batch_events: args.batch,
            queue_capacity: args.queue,
            encoding: if args.encoding == "full" {
                v1::EventEncoding::Full
            } else {
                v1::EventEncoding::Packed
            } as i32,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("subscribing: {}", s.message()))?
        .into_inner();
    match stream.message().await {
        Ok(Some(v1::SubscribeResponse {
            payload: Some(Payload::Started(_)),
        })) => Ok(stream),
        other => bail!("subscription did not start: {other:?}"),
    }
}

/// What a client checks of the first event of each batch: the value of
/// arguments (by name) in the kernel's trace format.
type Check = Vec<(&'static str, String)>;

fn check_full(e: &v1::Event, check: &Check) -> bool {
    check
        .iter()
        .all(|(name, want)| e.args.iter().any(|a| a.name == *name && a.text == *want))
}

fn check_packed(e: &proto::packed::PackedEvent<'_>, check: &Check) -> bool {
    use proto::packed::SlotValue;
    check.iter().all(|(name, want)| {
        let Some(v) = e.field_index(name).and_then(|f| e.value(f, 0)) else {
            return false;
        };
        let text = match v {
            SlotValue::Unsigned(n) => n.to_string(),
            SlotValue::Signed(n) => n.to_string(),
            SlotValue::Hex(n) => format!("0x{n:x}"),
            SlotValue::Str { bytes, .. } => format!("\"{}\"", String::from_utf8_lossy(bytes)),
            _ => return false,
        };
        text == *want
    })
}

/// Counts a stream's events and lost records, checking the first event of
/// every batch (all of them would make the client the bottleneck; one per
/// batch still catches garbage).
async fn count(
    mut stream: tonic::Streaming<v1::SubscribeResponse>,
    counts: Arc<Counts>,
    check: Check,
) {
    let mut reader = proto::packed::PackedReader::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                counts.messages.fetch_add(1, Ordering::Relaxed);
                match m.payload {
                    Some(Payload::Events(b)) => {
                        if b.events.first().is_some_and(|e| !check_full(e, &check)) {
                            counts.bad.fetch_add(1, Ordering::Relaxed);
                        }
                        counts
                            .events
                            .fetch_add(b.events.len() as u64, Ordering::Relaxed);
                    }
                    Some(Payload::Schema(s)) => reader.add_schema(s),
                    Some(Payload::Packed(b)) => match reader.open(&b) {
                        Ok(batch) => {
                            if batch
                                .events()
                                .next()
                                .is_some_and(|e| !check_packed(&e, &check))
                            {
                                counts.bad.fetch_add(1, Ordering::Relaxed);
                            }
                            counts
                                .events
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("hvprobe bench: {e}");
                            counts.bad.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Some(Payload::Lost(l)) => {
                        counts.lost.fetch_add(l.count, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(s) => {
                // (Also how every stream ends when the servers shut down.)
                tracing::debug!("stream ended: {s}");
                break;
            }
        }
    }
    counts.ended.store(true, Ordering::SeqCst);
}

/// The producers' loop: hit the probe until told to stop.
fn produce(
    engine: Arc<Engine>,
    vm: Arc<FakeVm>,
    index: usize,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
) -> Result<()> {
    let addr = KERNEL_TEXT_MAP + TEXT_GPA;
    let at_probe = Regs {
        rip: addr,
        rdi: 3,
        rsi: STRING_GPA,
        rdx: 0x8000 + index as u64,
        rsp: 0x8000,
        rflags: 0x2,
        ..Default::default()
    };
    let mut vcpu = FakeVcpu::new(index, at_probe);
    let mut local = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            vcpu.regs = at_probe;
            let action = vcpu.hit(&*engine, &*vm);
            if action != BreakpointAction::Resume || vcpu.regs.rip != addr + NOP5.len() as u64 {
                bail!(
                    "producer {index}: the hit was not handled as an emulated nop5 ({action:?}, RIP {:#x})",
                    vcpu.regs.rip
                );
            }
        }
        local += 256;
        hits.fetch_add(256, Ordering::Relaxed);
    }
    tracing::debug!("producer {index}: {local} hits");
    Ok(())
}

/// Producer threads hitting the synthetic probe until [`Producers::finish`].
struct Producers {
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Producers {
    fn start(engine: &Arc<Engine>, vm: &Arc<FakeVm>, n: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|i| {
                let (e, vm, s, h) = (engine.clone(), vm.clone(), stop.clone(), hits.clone());
                std::thread::Builder::new()
                    .name(format!("producer{i}"))
                    .spawn(move || produce(e, vm, i, s, h))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Producers {
            stop,
            hits,
            threads,
        })
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join()
                .map_err(|_| anyhow!("a producer thread panicked"))??;
        }
        Ok(())
    }
}

/// Hits/s of the producers over `d` (after a short warm-up).
fn hit_rate(engine: &Arc<Engine>, vm: &Arc<FakeVm>, n: usize, d: Duration) -> Result<f64> {
    let p = Producers::start(engine, vm, n)?;
    std::thread::sleep(Duration::from_millis(100));
    let (t, h) = (Instant::now(), p.hits());
    std::thread::sleep(d);
    let r = rate(p.hits() - h, t.elapsed());
    p.finish()?;
    Ok(r)
}

/// The engine's cost of a hit nobody can take: no subscriber, a stalled
/// subscriber that selects the probe (the hit is counted lost unfetched),
/// and a stalled filter-only subscriber (every hit is fetched, then dropped).
fn stalled_costs(engine: &Arc<Engine>, vm: &Arc<FakeVm>, n: usize) -> Result<()> {
    let d = Duration::from_millis(1000);
    let none = hit_rate(engine, vm, n, d)?;
    let mut rates = Vec::new();
    for selector in [true, false] {
        let mut opts = introspect::events::SubscribeOptions::new(1);
        if selector {
            opts.select = Some(Box::new(|_| true));
        } else {
            opts.filter = Some(Box::new(|_: &introspect::Event| true));
        }
        let mut sub = engine.subscribe_with(opts);
        let r = hit_rate(engine, vm, n, d)?;
        if sub.take_dropped() == 0 || sub.len() != 1 {
            bail!("the stalled engine-level subscriber did not fill up and drop");
        }
        rates.push(r);
    }
    let ns = |r: f64| 1e9 / r * n as f64;
    println!(
        "  engine hit cost, nobody reading ({n} thread(s)): no subscriber {:.0} hits/s ({:.0} ns/hit); \
         stalled subscriber with probe selector {:.0} hits/s ({:.0} ns/hit, not fetched); \
         stalled filter-only subscriber {:.0} hits/s ({:.0} ns/hit, fetched)",
        none,
        ns(none),
        rates[0],
        ns(rates[0]),
        rates[1],
        ns(rates[1])
    );
    Ok(())
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Run the benchmark and print the figures.
pub fn run(args: EventsArgs) -> Result<u8> {
    // (Also refuses a NaN duration.)
    if args.producers == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 || args.batch == 0 {
        bail!("--producers, --seconds and --batch must be above 0");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    // Synthetic load: an engine over the fake VM.
    let fake = fake_vm(args.producers)?;
    let fake_symbols = Arc::new(Symbols::none());
    let fake_engine = Engine::new(
        fake.clone(),
        fake_symbols.clone(),
        EngineConfig::for_vcpus(args.producers),
    );
    let synth = serve(
        &rt,
        fake_engine.clone(),
        fake_symbols,
        fake.clone(),
        &args.transport,
        "synthetic",
    )?;

    // The real test guest, with its own engine and server.
    let mut guest = None;
    if !args.no_guest {
        let symbols = Arc::new(
            Symbols::from_vmlinux(test_guest::kernel_path()).context("test guest symbols")?,
        );
        let mut config = vmm::VmConfig::new(test_guest::kernel_path());
        config.vcpus = 2;
        config.memory_mib = 128;
        config.cmdline = test_guest::cmdline(None, None, true);
        config.serial = vmm::SerialOutput::Discard;
        let vm = vmm::Vm::create(&config)?;
        let control = vm.control();
        let engine = Engine::new(control.clone(), symbols.clone(), EngineConfig::for_vcpus(2));
        let server = serve(&rt, engine, symbols, control, &args.transport, "guest")?;
        guest = Some((vm, server));
    }

    let synth_counts = Arc::new(Counts::default());
    let guest_counts = Arc::new(Counts::default());
    let probe_line = format!(
        "p:bench/open {:#x} dfd=%di:s32 path=+0(%si):string flags=%dx:x32",
        KERNEL_TEXT_MAP + TEXT_GPA
    );
    let (mut client, synth_probe) = rt.block_on(async {
        let mut c = connect(&synth.listen).await?;
        let id = create_probe(&mut c, &probe_line).await?;
        anyhow::Ok((c, id))
    })?;
    if args.stalled_costs {
        stalled_costs(&fake_engine, &fake, args.producers)?;
    }
    let guest_probe = rt.block_on(async {
        let stream = subscribe(&mut client, synth_probe, &args).await?;
        let want_path = format!("\"{}\"", String::from_utf8_lossy(PATH));
        tokio::spawn(count(
            stream,
            synth_counts.clone(),
            vec![("path", want_path), ("dfd", "3".into())],
        ));
        let mut guest_probe = None;
        if let Some((_, server)) = &guest {
            let mut g = connect(&server.listen).await?;
            let gid = create_probe(&mut g, "p:bench/add hv_add a=%di b=%si").await?;
            let gstream = subscribe(&mut g, gid, &args).await?;
            // hv_add(a, b) is called with a in 0..7 in the workload.
            tokio::spawn(count(gstream, guest_counts.clone(), Vec::new()));
            guest_probe = Some(gid);
        }
        anyhow::Ok(guest_probe)
    })?;

    // Start the guest now that its probe is planted and subscribed.
    let mut running = None;
    let mut guest_server = None;
    if let Some((vm, server)) = guest {
        running = Some(vm.start(server.engine.clone())?);
        guest_server = Some(server);
        // Let the guest boot and reach its loop.
        std::thread::sleep(Duration::from_millis(500));
    }

    // Hits before this point (--stalled-costs) had no gRPC subscriber.
    let before = fake_engine.stats();
    let producers = Producers::start(&fake_engine, &fake, args.producers)?;

    // Warm up, then measure over the window.
    std::thread::sleep(Duration::from_millis(300));
    let guest_hits = |g: &Option<Server>| -> u64 {
        g.as_ref()
            .map_or(0, |s| s.engine.list().iter().map(|p| p.hits).sum())
    };
    let t0 = Instant::now();
    let (p0, s0, g0, gh0) = (
        producers.hits(),
        synth_counts.snapshot(),
        guest_counts.snapshot(),
        guest_hits(&guest_server),
    );
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let window = t0.elapsed();
    let (p1, s1, g1, gh1) = (
        producers.hits(),
        synth_counts.snapshot(),
        guest_counts.snapshot(),
        guest_hits(&guest_server),
    );
    producers.finish()?;

    // Everything published must arrive or be counted lost.
    let published = fake_engine.stats().hits - before.hits;
    let t = Instant::now();
    loop {
        let (e, l) = synth_counts.snapshot();
        if e + l >= published || t.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (synth_events, synth_lost) = synth_counts.snapshot();
    let engine_dropped = fake_engine.stats().events_dropped - before.events_dropped;

    let synth_rate = rate(s1.0 - s0.0, window);
    let guest_rate = rate(g1.0 - g0.0, window);
    println!(
        "hvprobe bench events: {} producer thread(s), batch {}, queue {}, {} encoding, {} transport, {:.1} s window",
        args.producers,
        args.batch,
        args.queue,
        args.encoding,
        args.transport,
        window.as_secs_f64()
    );
    println!(
        "  producer hit rate (engine hit path, fake vCPU): {:>12.0} hits/s",
        rate(p1 - p0, window)
    );
    println!(
        "  events received by the client, synthetic:      {:>12.0} events/s ({} lost in the window)",
        synth_rate,
        s1.1 - s0.1
    );
    if let Some(gp) = guest_probe {
        println!(
            "  guest hit rate (hv_add, 2 vCPUs):               {:>12.0} hits/s",
            rate(gh1 - gh0, window)
        );
        println!(
            "  events received by the client, guest:          {:>12.0} events/s ({} lost in the window; probe {gp})",
            guest_rate,
            g1.1 - g0.1
        );
    }
    println!(
        "  total received:                                 {:>12.0} events/s (target >= 1000000{})",
        synth_rate + guest_rate,
        if synth_rate + guest_rate >= 1e6 {
            ""
        } else {
            ": NOT REACHED"
        }
    );
    let accounted = synth_events + synth_lost == published && synth_lost == engine_dropped;
    println!(
        "  synthetic totals: {published} published, {synth_events} received + {synth_lost} lost ({}); engine dropped {engine_dropped}; {} stream messages",
        if accounted { "all accounted for" } else { "MISMATCH" },
        synth_counts.messages.load(Ordering::Relaxed)
    );
    let bad = synth_counts.bad.load(Ordering::Relaxed) + guest_counts.bad.load(Ordering::Relaxed);
    let guest_ok = guest_probe.is_none() || g1.0 > g0.0;
    if bad > 0 {
        println!("  {bad} batch(es) carried events with wrong content");
    }
    if !guest_ok {
        println!("  no guest events arrived in the window");
    }
    if let Some(r) = running {
        r.stop();
        let _ = r.wait();
    }
    let _ = synth.stop.send(());
    if let Some(s) = guest_server {
        let _ = s.stop.send(());
        if let Listen::Unix(p) = &s.listen {
            let _ = std::fs::remove_file(p);
        }
    }
    if let Listen::Unix(p) = &synth.listen {
        let _ = std::fs::remove_file(p);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::debug!("synthetic probe {synth_probe}");
    Ok(if accounted && bad == 0 && guest_ok {
        0
    } else {
        1
    })
}
