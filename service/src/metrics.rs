//! `hvprobe run --metrics tcp:127.0.0.1:PORT`: Prometheus metrics at
//! `/metrics` (OpenMetrics 1.0 text when the scraper asks for it, as
//! Prometheus does, else the Prometheus text format 0.0.4) and `/healthz`,
//! encoded with the prometheus-client crate and served by a small hyper
//! server (hyper is in the tree through tonic).
//!
//! The values are read at each scrape from the counters the API reports
//! (the engine's probe table, the streams, the exporter, the VMM), so a
//! scrape and a `ListProbes` agree. Labels are bounded: a probe's id and
//! `GROUP/EVENT` (at most `max_probes` of them), a policy's name (at most
//! 256 policies), a fixed set of kinds and reasons; never a pid, comm or
//! value.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::v1;

use crate::export::ExportStats;
use crate::server::HvProbeService;
use crate::sink::{DropReason, SinkKind, SinkStats};
use crate::state::Inner;

/// VM exits by kind, from the VMM (the service does not know it).
pub type ExitsFn = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

type Labels = Vec<(&'static str, String)>;

/// What `/metrics` reports.
pub struct Metrics {
    inner: Arc<Inner>,
    exits: OnceLock<ExitsFn>,
    export: OnceLock<Arc<ExportStats>>,
    sinks: std::sync::Mutex<Vec<(SinkKind, Arc<SinkStats>)>>,
}

impl HvProbeService {
    /// The metrics of this service; add the VMM's exits and the exporter's
    /// counters with [`Metrics::set_exits`] and [`Metrics::set_export`].
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::new(Metrics {
            inner: self.inner.clone(),
            exits: OnceLock::new(),
            export: OnceLock::new(),
            sinks: std::sync::Mutex::new(Vec::new()),
        })
    }
}

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn counter(
    reg: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) {
    let fam = Family::<Labels, Counter>::default();
    for (labels, v) in rows {
        fam.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, fam);
}

fn counter1(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn gauge1(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge<i64, AtomicI64> = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn state_name(s: v1::GuestState) -> &'static str {
    match s {
        v1::GuestState::Unspecified => "unspecified",
        v1::GuestState::Created => "created",
        v1::GuestState::Running => "running",
        v1::GuestState::Paused => "paused",
        v1::GuestState::Stopped => "stopped",
        v1::GuestState::Failed => "failed",
    }
}

fn clamp(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Report the VMM's exits by kind (set once).
    pub fn set_exits(&self, f: ExitsFn) {
        let _ = self.exits.set(f);
    }

    /// Report the exporter's counters (set once).
    pub fn set_export(&self, s: Arc<ExportStats>) {
        let _ = self.export.set(s);
    }

    /// Report a push sink's counters (one per kind: the `sink` label).
    pub fn add_sink(&self, kind: SinkKind, s: Arc<SinkStats>) {
        let mut v = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|(k, _)| *k != kind);
        v.push((kind, s));
    }

    /// The push sinks' families, labelled by `sink` (webhook, otlp).
    fn register_sinks(&self, reg: &mut Registry) {
        let sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if sinks.is_empty() {
            return;
        }
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let by_sink = |f: &dyn Fn(&SinkStats) -> u64| {
            sinks
                .iter()
                .map(|(k, s)| (vec![("sink", k.name().to_string())], f(s)))
                .collect::<Vec<_>>()
        };
        counter(
            reg,
            "sink_delivered",
            "Events each push sink's receiver acknowledged",
            by_sink(&|s| l(&s.delivered)),
        );
        counter(
            reg,
            "sink_lost_records",
            "In-band lost records each push sink's receiver acknowledged",
            by_sink(&|s| l(&s.lost_records)),
        );
        counter(
            reg,
            "sink_requests",
            "Requests (batches) each push sink's receiver acknowledged",
            by_sink(&|s| l(&s.batches)),
        );
        counter(
            reg,
            "sink_dropped",
            "Events each push sink dropped, by reason (queue_full: its queue was full; retries_exhausted: not delivered within its attempts; rejected: the receiver refused them; shutdown: not delivered when hvprobe stopped)",
            sinks.iter().flat_map(|(k, s)| {
                DropReason::ALL.iter().map(move |r| {
                    (
                        vec![
                            ("sink", k.name().to_string()),
                            ("reason", r.name().to_string()),
                        ],
                        s.dropped(*r),
                    )
                })
            }),
        );
        counter(
            reg,
            "sink_retries",
            "Attempts each push sink made after a batch's first",
            by_sink(&|s| l(&s.retries)),
        );
        let fam = Family::<Labels, Gauge>::default();
        for (k, s) in &sinks {
            fam.get_or_create(&vec![("sink", k.name().to_string())])
                .set(i64::try_from(s.queue_depth()).unwrap_or(i64::MAX));
        }
        reg.register(
            "sink_queue_depth",
            "Events in each push sink's queue or in flight (neither delivered nor dropped yet)",
            fam,
        );
        let fam = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (k, s) in &sinks {
            #[allow(clippy::cast_precision_loss)] // seconds with ns resolution
            fam.get_or_create(&vec![("sink", k.name().to_string())])
                .set(l(&s.last_success_ns) as f64 / 1e9);
        }
        reg.register(
            "sink_last_success_timestamp_seconds",
            "When each push sink's receiver last acknowledged a request (Unix time), 0: never",
            fam,
        );
    }

    /// The registry with the values of now.
    fn registry(&self) -> Registry {
        let mut reg = Registry::with_prefix("hvprobe");
        let inner = &self.inner;
        let rows = inner.engine.list();
        let names = {
            let t = inner.probes.read().unwrap_or_else(|e| e.into_inner());
            rows.iter()
                .map(|r| {
                    t.get(r.id)
                        .map_or_else(|| r.name.clone(), |m| format!("{}/{}", m.group, m.event))
                })
                .collect::<Vec<_>>()
        };
        let per_probe = |f: &dyn Fn(&introspect::ProbeInfo) -> u64| {
            rows.iter()
                .zip(&names)
                .map(|(r, n)| {
                    (
                        vec![("probe_id", r.id.to_string()), ("probe", n.clone())],
                        f(r),
                    )
                })
                .collect::<Vec<_>>()
        };
        counter(
            &mut reg,
            "probe_hits",
            "Times each probe fired (return probes: returns caught), as ListProbes hits",
            per_probe(&|r| r.hits),
        );
        counter(
            &mut reg,
            "probe_misses",
            "Hits each probe could not run (kretprobes: no free instance, the kernel's nmissed), as ListProbes misses",
            per_probe(&|r| r.missed),
        );
        counter(
            &mut reg,
            "probe_dropped",
            "Events of each probe dropped at full subscriber queues, summed over subscribers, as ListProbes dropped",
            per_probe(&|r| r.dropped),
        );
        gauge1(&mut reg, "probes", "Probes defined", clamp(rows.len()));
        gauge1(
            &mut reg,
            "armed",
            "1 while probes are globally armed",
            i64::from(inner.engine.armed()),
        );
        let st = inner.engine.stats();
        counter1(&mut reg, "engine_hits", "Probe hits of all probes", st.hits);
        counter(
            &mut reg,
            "engine_handled",
            "Displaced instructions run, by how",
            [
                (vec![("mode", "emulated".to_string())], st.emulated),
                (vec![("mode", "single_step".to_string())], st.single_stepped),
                (vec![("mode", "out_of_line".to_string())], st.out_of_line),
            ],
        );
        counter1(
            &mut reg,
            "engine_events_dropped",
            "Events dropped at full subscriber queues (all subscribers, all probes)",
            st.events_dropped,
        );
        let s = &inner.streams.totals;
        counter1(
            &mut reg,
            "stream_events",
            "Events taken from the subscriber queues into streams (the export file's included)",
            s.events.load(Ordering::Relaxed),
        );
        counter1(
            &mut reg,
            "stream_lost",
            "Events reported in the streams' lost records (their queues were full), all subscribers",
            s.lost.load(Ordering::Relaxed),
        );
        counter1(
            &mut reg,
            "streams_started",
            "Event streams started",
            s.started.load(Ordering::Relaxed),
        );
        let open = inner.streams.open();
        gauge1(&mut reg, "streams", "Event streams open", clamp(open));
        if let Some(e) = self.export.get() {
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            counter1(
                &mut reg,
                "export_events",
                "Event records written to the export file",
                l(&e.events),
            );
            counter1(
                &mut reg,
                "export_lost_records",
                "Lost records written to the export file",
                l(&e.lost_records),
            );
            counter(
                &mut reg,
                "export_lost",
                "Events the exporter lost, by reason (queue_full: its queue was full; write_failed: the write failed)",
                [
                    (vec![("reason", "queue_full".to_string())], l(&e.lost_queue_full)),
                    (vec![("reason", "write_failed".to_string())], l(&e.lost_write_failed)),
                ],
            );
            counter1(
                &mut reg,
                "export_bytes",
                "Bytes written to the export file",
                l(&e.bytes),
            );
            counter1(
                &mut reg,
                "export_rotations",
                "Export file rotations",
                l(&e.rotations),
            );
            counter(
                &mut reg,
                "export_errors",
                "Failed export operations, by operation",
                [
                    (vec![("op", "write".to_string())], l(&e.write_errors)),
                    (vec![("op", "rotate".to_string())], l(&e.rotate_errors)),
                    (vec![("op", "gzip".to_string())], l(&e.gzip_errors)),
                ],
            );
            let g: Gauge<f64, AtomicU64> = Gauge::default();
            #[allow(clippy::cast_precision_loss)] // seconds with ns resolution
            g.set(l(&e.last_write_ns) as f64 / 1e9);
            reg.register(
                "export_last_write_timestamp_seconds",
                "When the export file was last written (Unix time), 0: never",
                g,
            );
        }
        self.register_sinks(&mut reg);
        let pol = inner.policy_counters();
        let per_policy = |f: &dyn Fn(&crate::policy::PolicyCounters) -> u64| {
            pol.iter()
                .map(|p| (vec![("policy", p.name.clone())], f(p)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut reg,
            "policy_hits",
            "Hits of each policy's probes (those a reload removed included), as ListPolicies hits",
            per_policy(&|p| p.hits),
        );
        counter(
            &mut reg,
            "policy_events",
            "Events of each policy that passed its filter and rate limit, as ListPolicies events",
            per_policy(&|p| p.events),
        );
        counter(
            &mut reg,
            "policy_rate_limited",
            "Events each policy's rate limit dropped, as ListPolicies rate_limited",
            per_policy(&|p| p.rate_limited),
        );
        let fam = Family::<Labels, Gauge>::default();
        for p in &pol {
            fam.get_or_create(&vec![("policy", p.name.clone())])
                .set(clamp(p.probes));
        }
        reg.register("policy_probes", "Probes of each policy", fam);
        let fam = Family::<Labels, Gauge>::default();
        for p in &pol {
            fam.get_or_create(&vec![("policy", p.name.clone())])
                .set(i64::from(p.enabled));
        }
        reg.register("policy_enabled", "1 while a policy is enabled", fam);
        gauge1(&mut reg, "policies", "Policies loaded", clamp(pol.len()));
        if let Some(f) = self.exits.get() {
            counter(
                &mut reg,
                "vm_exits",
                "VM exits by kind (all: every return from KVM_RUN)",
                f().into_iter()
                    .map(|(k, v)| (vec![("kind", k.to_string())], v)),
            );
        }
        let now = inner.guest.state();
        let fam = Family::<Labels, Gauge>::default();
        for s in [
            v1::GuestState::Created,
            v1::GuestState::Running,
            v1::GuestState::Paused,
            v1::GuestState::Stopped,
            v1::GuestState::Failed,
        ] {
            fam.get_or_create(&vec![("state", state_name(s).to_string())])
                .set(i64::from(s == now));
        }
        reg.register("guest_state", "1 for the guest's current state", fam);
        gauge1(
            &mut reg,
            "guest_vcpus",
            "vCPUs of the guest",
            clamp(inner.guest.vcpu_count()),
        );
        reg
    }

    /// The metrics as text: OpenMetrics (ends with `# EOF`) or the
    /// Prometheus text format.
    pub fn render(&self, openmetrics: bool) -> String {
        let reg = self.registry();
        let mut out = String::new();
        let r = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &reg)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)
        };
        if r.is_err() {
            out.clear();
        }
        out
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, ctype: &str, body: String| {
            Response::builder()
                .status(code)
                .header(header::CONTENT_TYPE, ctype)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => {
                let om = req.headers().get_all(header::ACCEPT).iter().any(|v| {
                    v.to_str()
                        .is_ok_and(|s| s.contains("application/openmetrics-text"))
                });
                let ctype = if om {
                    OPENMETRICS
                } else {
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE
                };
                reply(StatusCode::OK, ctype, self.render(om))
            }
            "/healthz" => {
                let s = self.inner.guest.state();
                let ok = matches!(
                    s,
                    v1::GuestState::Created | v1::GuestState::Running | v1::GuestState::Paused
                );
                let code = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(code, "text/plain", format!("guest {}\n", state_name(s)))
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: /metrics or /healthz\n".into(),
            ),
        }
    }
}

/// Parses `tcp:HOST:PORT` (or `HOST:PORT`; `localhost` is 127.0.0.1).
/// Anything but a loopback address is refused unless `public`: the
/// metrics name the probes.
pub fn parse_addr(s: &str, public: bool) -> Result<SocketAddr, String> {
    let rest = s.strip_prefix("tcp:").unwrap_or(s);
    let addr: SocketAddr = match rest.rsplit_once(':') {
        Some(("localhost", port)) => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("--metrics {s}: bad port {port:?}"))?;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        }
        _ => rest
            .parse()
            .map_err(|_| format!("--metrics {s}: expected tcp:HOST:PORT with a numeric address, e.g. tcp:127.0.0.1:9464"))?,
    };
    if !addr.ip().is_loopback() && !public {
        return Err(format!(
            "--metrics {s}: not a loopback address; pass --metrics-public to serve metrics beyond this host"
        ));
    }
    Ok(addr)
}

/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// Longest a connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = m.respond(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_unless_public() {
        assert_eq!(
            parse_addr("tcp:127.0.0.1:9464", false).unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("localhost:1", false).unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert_eq!(
            parse_addr("tcp:[::1]:9464", false).unwrap(),
            "[::1]:9464".parse().unwrap()
        );
        let e = parse_addr("tcp:0.0.0.0:9464", false).unwrap_err();
        assert!(e.contains("--metrics-public"), "{e}");
        assert!(parse_addr("tcp:0.0.0.0:9464", true).is_ok());
        assert!(parse_addr("tcp:127.0.0.1", false).is_err());
        assert!(parse_addr("tcp:host.example:80", false).is_err());
    }
}
