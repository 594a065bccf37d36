//! The push sinks of `hvprobe run` against the live test guest and a
//! receiver in this test (a small HTTP/1.1 server on 127.0.0.1 whose
//! behaviour the test switches: up, down, slow, hung, failing with 500s,
//! refusing with 400s):
//! - `--webhook-url`: every event is delivered once or counted dropped by
//!   reason (the metrics, the in-band `lost` records), and the guest keeps
//!   its pace while the receiver misbehaves;
//! - `--otlp-endpoint`: the bodies decode with the official OTLP protobuf
//!   types into one LogRecord per hit, with the probe's attributes, while a
//!   webhook to a dead port beside it drops everything.

mod grpc_harness;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grpc_harness::{common, kvm_available};
use prost::Message;
use proto::otlp::collector::logs::v1::ExportLogsServiceRequest;
use proto::otlp::common::v1::any_value::Value as Any;
use proto::v1::{self, export_record::Record};

#[path = "common/run.rs"]
mod run;
use run::Run;

impl Run {
    fn hits(&self) -> u64 {
        self.list().iter().map(|p| p.hits).sum()
    }

    /// Probe hits per second over `window`: the guest's calls of the
    /// probed function per second.
    fn pace(&self, window: Duration) -> f64 {
        let a = self.hits();
        let t = Instant::now();
        std::thread::sleep(window);
        (self.hits() - a) as f64 / t.elapsed().as_secs_f64()
    }

    fn disarm(&self) {
        let mut c = self.client();
        self.rt.block_on(c.disarm(v1::DisarmRequest {})).unwrap();
    }
}

/// The tests that run receivers take turns: a receiver that goes down
/// gives its port back, and a port the other test picked meanwhile (its
/// receiver, or its dead webhook) could be that one (seen once: AddrInUse
/// when the receiver came back up, and 0 OTLP records).
static RECEIVERS: Mutex<()> = Mutex::new(());

fn receivers_turn() -> std::sync::MutexGuard<'static, ()> {
    RECEIVERS.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// 200 at once.
    Up = 0,
    /// No listener: connections are refused.
    Down,
    /// 200 after 300 ms.
    Slow,
    /// No answer for 3 s (beyond the sink's timeout), then the connection
    /// is closed; the body is not taken.
    Hung,
    /// 500 at once; the body is not taken.
    Fail,
    /// 400 at once; the body is not taken.
    Reject,
}

const MODES: [Mode; 6] = [
    Mode::Up,
    Mode::Down,
    Mode::Slow,
    Mode::Hung,
    Mode::Fail,
    Mode::Reject,
];

/// A request the receiver took (answered 200).
struct Taken {
    path: String,
    ctype: String,
    body: Vec<u8>,
}

/// The receiver: a thread accepting on `port` while not down, a thread a
/// connection (HTTP/1.1 keep-alive).
struct Receiver {
    port: u16,
    mode: Arc<AtomicU8>,
    taken: Arc<Mutex<Vec<Taken>>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let port = free_port();
        let mode = Arc::new(AtomicU8::new(Mode::Up as u8));
        let taken = Arc::new(Mutex::new(Vec::new()));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, t, c, s) = (mode.clone(), taken.clone(), conns.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut listener: Option<TcpListener> = None;
            while !s.load(Ordering::SeqCst) {
                let down = m.load(Ordering::SeqCst) == Mode::Down as u8;
                if down {
                    if listener.take().is_some() {
                        for conn in c.lock().unwrap().drain(..) {
                            let _ = conn.shutdown(Shutdown::Both);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let l = listener.get_or_insert_with(|| {
                    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
                    l.set_nonblocking(true).unwrap();
                    l
                });
                match l.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        c.lock().unwrap().push(conn.try_clone().unwrap());
                        let (m, t) = (m.clone(), t.clone());
                        std::thread::spawn(move || serve(conn, &m, &t));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Receiver {
            port,
            mode,
            taken,
            conns,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one connection until it closes.
fn serve(conn: TcpStream, mode: &AtomicU8, taken: &Mutex<Vec<Taken>>) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_string();
        let (mut len, mut ctype) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap(),
                "content-type" => ctype = v.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let m = MODES[usize::from(mode.load(Ordering::SeqCst))];
        let status = match m {
            Mode::Up | Mode::Down => "200 OK",
            Mode::Slow => {
                std::thread::sleep(Duration::from_millis(300));
                "200 OK"
            }
            Mode::Hung => {
                std::thread::sleep(Duration::from_secs(3));
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            Mode::Fail => "500 Internal Server Error",
            Mode::Reject => "400 Bad Request",
        };
        if status.starts_with("200") {
            taken.lock().unwrap().push(Taken { path, ctype, body });
        }
        let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// GET /metrics: `name{labels}` → value.
fn metrics(port: u16) -> BTreeMap<String, f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("hvprobe_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(m: &BTreeMap<String, f64>, key: &str) -> u64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {m:?}")) as u64
}

const REASONS: [&str; 4] = ["queue_full", "retries_exhausted", "rejected", "shutdown"];

/// What the webhook receiver got: event seqs, and lost counts by reason.
fn webhook_taken(r: &Receiver) -> (Vec<u64>, BTreeMap<String, u64>) {
    let mut seqs = Vec::new();
    let mut lost = BTreeMap::new();
    for t in r.taken.lock().unwrap().iter() {
        assert_eq!(t.path, "/hook");
        assert_eq!(t.ctype, "application/json");
        let recs: Vec<v1::ExportRecord> = serde_json::from_slice(&t.body).unwrap();
        for rec in recs {
            assert_eq!(rec.version, 1);
            match rec.record.unwrap() {
                Record::Event(e) => {
                    assert_eq!((e.group.as_str(), e.event.as_str()), ("w", "open"));
                    seqs.push(e.seq);
                }
                Record::Lost(l) => {
                    let reason = v1::LostReason::try_from(l.reason).unwrap();
                    *lost.entry(reason.as_str_name().to_string()).or_default() += l.count;
                }
            }
        }
    }
    (seqs, lost)
}

#[test]
fn webhook_delivers_or_counts_every_event_through_a_bad_receiver_at_the_guests_pace() {
    if !kvm_available() {
        return;
    }
    let _turn = receivers_turn();
    let tmp = tempfile::tempdir().unwrap();
    let recv = Receiver::start();
    let mport = free_port();
    let url = recv.url("/hook");
    let metrics_addr = format!("tcp:127.0.0.1:{mport}");
    let mut run = Run::start(
        tmp.path(),
        &[
            "--probe",
            "p:w/open hv_open_file path=+0(%si):string",
            "--webhook-url",
            &url,
            "--webhook-batch",
            "64",
            "--webhook-queue",
            "512",
            "--webhook-timeout",
            "1s",
            "--webhook-attempts",
            "3",
            "--webhook-backoff",
            "50ms",
            "--metrics",
            &metrics_addr,
        ],
    );
    // Interleaved with a good receiver, so that the machine's drift hits
    // both alike.
    let window = Duration::from_millis(1500);
    let (mut good, mut bad) = (0.0, 0.0);
    let mut rounds = Vec::new();
    for m in [Mode::Down, Mode::Slow, Mode::Hung, Mode::Fail, Mode::Reject] {
        recv.set(Mode::Up);
        std::thread::sleep(Duration::from_millis(300));
        let g = run.pace(window);
        recv.set(m);
        std::thread::sleep(Duration::from_millis(300));
        let b = run.pace(window);
        rounds.push(format!("{m:?} {g:.0}/{b:.0}"));
        good += g;
        bad += b;
    }
    recv.set(Mode::Up);
    std::thread::sleep(Duration::from_millis(500));
    run.disarm();
    // Hits are final once disarmed; wait for the sink to deliver the rest
    // and the lost records it owes.
    let hits = run.hits();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (seqs, lost, m) = loop {
        let (seqs, lost) = webhook_taken(&recv);
        let m = metrics(mport);
        let dropped: u64 = REASONS
            .iter()
            .map(|r| {
                sample(
                    &m,
                    &format!("hvprobe_sink_dropped_total{{sink=\"webhook\",reason=\"{r}\"}}"),
                )
            })
            .sum();
        let in_band: u64 = lost.values().sum();
        if seqs.len() as u64 + dropped == hits && in_band == dropped {
            break (seqs, lost, m);
        }
        assert!(
            Instant::now() < deadline,
            "{hits} hits, {} delivered, {dropped} dropped, {in_band} in band: {lost:?}\n{}",
            seqs.len(),
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let d = |r: &str| {
        sample(
            &m,
            &format!("hvprobe_sink_dropped_total{{sink=\"webhook\",reason=\"{r}\"}}"),
        )
    };
    println!(
        "{hits} hits: {} delivered, dropped: queue_full {}, retries_exhausted {}, rejected {}, shutdown {}; {} retries; in band {lost:?}",
        seqs.len(),
        d("queue_full"),
        d("retries_exhausted"),
        d("rejected"),
        d("shutdown"),
        sample(&m, "hvprobe_sink_retries_total{sink=\"webhook\"}")
    );
    println!(
        "hv_open_file calls/s, receiver good/bad: {}",
        rounds.join(", ")
    );
    // Delivered once each: no sequence number twice.
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "an event delivered twice");
    assert!(sorted.last().is_some_and(|&s| s < hits));
    assert_eq!(
        sample(&m, "hvprobe_sink_delivered_total{sink=\"webhook\"}"),
        seqs.len() as u64
    );
    // Every reason was exercised and is in band under its own name.
    for (r, name) in [
        ("queue_full", "LOST_REASON_SUBSCRIBER_QUEUE_FULL"),
        ("retries_exhausted", "LOST_REASON_SINK_RETRIES_EXHAUSTED"),
        ("rejected", "LOST_REASON_SINK_REJECTED"),
    ] {
        assert!(d(r) > 0, "nothing dropped for {r}");
        assert_eq!(lost.get(name).copied(), Some(d(r)), "{lost:?}");
    }
    assert_eq!(d("shutdown"), 0);
    assert!(sample(&m, "hvprobe_sink_retries_total{sink=\"webhook\"}") > 0);
    assert_eq!(sample(&m, "hvprobe_sink_queue_depth{sink=\"webhook\"}"), 0);
    assert!(
        sample(
            &m,
            "hvprobe_sink_last_success_timestamp_seconds{sink=\"webhook\"}"
        ) > 0
    );
    // The receiver's trouble costs the guest nothing: 0.6 leaves room for
    // the noise of a shared 2-core machine (single windows vary by ±30%).
    assert!(
        bad >= 0.6 * good,
        "the guest slowed down with a bad receiver: {bad:.0} against {good:.0} calls/s"
    );
    let err = run.terminate();
    assert!(
        err.contains(&format!(
            "hvprobe: webhook: {} events delivered, {} dropped",
            seqs.len(),
            hits - seqs.len() as u64
        )),
        "{err}"
    );
}

fn attr<'a>(r: &'a proto::otlp::logs::v1::LogRecord, key: &str) -> Option<&'a Any> {
    r.attributes
        .iter()
        .find(|k| k.key == key)
        .and_then(|k| k.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

#[test]
fn otlp_log_records_match_the_hits_while_a_dead_webhook_drops_beside_it() {
    if !kvm_available() {
        return;
    }
    let _turn = receivers_turn();
    let tmp = tempfile::tempdir().unwrap();
    let recv = Receiver::start();
    let dead = format!("http://127.0.0.1:{}/dead", free_port());
    let endpoint = recv.url("");
    let mut run = Run::start(
        tmp.path(),
        &[
            "--probe",
            "p:o/open hv_open_file path=+0(%si):string",
            "--otlp-endpoint",
            &endpoint,
            "--webhook-url",
            &dead,
            "--webhook-queue",
            "256",
            "--webhook-attempts",
            "2",
            "--webhook-backoff",
            "20ms",
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    run.disarm();
    let probes = run.list();
    let hits = probes[0].hits;
    assert!(hits > 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let mut records = Vec::new();
        for t in recv.taken.lock().unwrap().iter() {
            assert_eq!(t.path, "/v1/logs");
            assert_eq!(t.ctype, "application/x-protobuf");
            let req = ExportLogsServiceRequest::decode(&t.body[..]).unwrap();
            for rl in req.resource_logs {
                let res = rl.resource.unwrap();
                let name = res.attributes.iter().find(|k| k.key == "service.name");
                assert_eq!(
                    name.and_then(|k| k.value.clone()).and_then(|v| v.value),
                    Some(Any::StringValue("hvprobe".into()))
                );
                for sl in rl.scope_logs {
                    assert_eq!(sl.scope.unwrap().name, "hvprobe");
                    records.extend(sl.log_records);
                }
            }
        }
        if records.len() as u64 >= hits {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "{} log records for {hits} hits",
            records.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut seqs = Vec::new();
    for r in &records {
        assert_eq!(r.event_name, "hvprobe.event", "{r:?}");
        assert_eq!(
            attr(r, "hvprobe.probe"),
            Some(&Any::StringValue("o/open".into()))
        );
        assert_eq!(
            attr(r, "hvprobe.probe.id"),
            Some(&Any::IntValue(i64::try_from(probes[0].id).unwrap()))
        );
        assert_eq!(
            attr(r, "hvprobe.probe.kind"),
            Some(&Any::StringValue("kprobe".into()))
        );
        let Some(Any::StringValue(path)) = attr(r, "hvprobe.arg.path") else {
            panic!("{r:?}")
        };
        assert!(test_guest::OPEN_PATHS.contains(&path.as_str()), "{r:?}");
        let Some(Any::StringValue(body)) = r.body.as_ref().and_then(|b| b.value.as_ref()) else {
            panic!("{r:?}")
        };
        assert!(body.starts_with("open: (hv_open_file+0x0/"), "{body}");
        assert!(r.time_unix_nano > 0);
        let Some(Any::IntValue(seq)) = attr(r, "hvprobe.seq") else {
            panic!("{r:?}")
        };
        seqs.push(u64::try_from(*seq).unwrap());
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), records.len(), "a record delivered twice");
    assert_eq!(
        (
            seqs.len() as u64,
            seqs.first().copied(),
            seqs.last().copied()
        ),
        (hits, Some(0), Some(hits - 1)),
        "not one record per hit"
    );
    let err = run.terminate();
    println!("{hits} hits, {} OTLP log records\n{err}", records.len());
    assert!(
        err.contains(&format!(
            "hvprobe: otlp: {hits} events delivered, 0 dropped"
        )),
        "{err}"
    );
    // The dead webhook beside it delivered nothing and counted everything.
    assert!(
        err.contains(&format!(
            "hvprobe: webhook: 0 events delivered, {hits} dropped"
        )),
        "{err}"
    );
}

#[test]
fn unusable_sink_urls_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| common::hvprobe_run_test_guest(tmp.path(), extra);
    for (args, want) in [
        (
            ["--webhook-url", "https://127.0.0.1:9/x"],
            "https is not supported yet",
        ),
        (
            ["--webhook-url", "http://192.0.2.1:9/x"],
            "192.0.2.1 is not a loopback address",
        ),
        (
            ["--otlp-endpoint", "grpc://127.0.0.1:4317"],
            "--otlp-endpoint grpc://127.0.0.1:4317: only http://",
        ),
        (
            ["--webhook-url", "not a url"],
            "--webhook-url not a url: not a URL",
        ),
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        common::assert_one_line_error(&err, want);
    }
    let (code, _, err) = run(&["--webhook-batch", "10"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--webhook-url"), "{err}");
}
