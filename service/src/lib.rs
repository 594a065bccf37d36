//! hvprobe's gRPC server: the `hvprobe.v1.HvProbe` service over the probe
//! engine ([`HvProbeService`]), served on a Unix socket or TCP with server
//! reflection (v1 and v1alpha) and `grpc.health.v1` ([`listen::bind`]); the
//! JSON-lines export file ([`export`]), Prometheus metrics ([`metrics`]) and
//! policy files ([`policy`]).
//!
//! ```no_run
//! # async fn f(engine: std::sync::Arc<introspect::Engine>, vm: std::sync::Arc<dyn guest_access::VmControl>) {
//! use service::{Guest, HvProbeService, ServiceConfig, Symbols, listen};
//! let symbols = std::sync::Arc::new(Symbols::none());
//! let svc = HvProbeService::new(engine, symbols, Guest::new(vm), ServiceConfig::default());
//! let bound = listen::bind(&listen::Listen::default_unix(), &listen::TlsFiles::default()).await.unwrap();
//! bound.serve(svc, std::future::pending()).await.unwrap();
//! # }
//! ```
//!
//! # Map
//!
//! Layers, lowest first; a file imports only files of the layers below it
//! (no import circle: `catalog` is a leaf, encoders and subscriptions never
//! see the server):
//!
//! 1. Leaves. `config.rs` (limits), `errors.rs` (engine and parse errors as
//!    statuses), `symbols.rs` (the guest's symbols and DWARF), `time.rs`,
//!    `guest.rs` (what the runner says about the guest: state, VM, bridge,
//!    snapshot writer), `policy/` `mod.rs`, `doc.rs`, `limit.rs` (policy
//!    documents, rate limits, the run-time `PolicyRun` a probe points to).
//! 2. `catalog.rs`: probe metadata (`ProbeMeta`, `ProbeTable`) and the
//!    fields of events: kinds for filters, schemas for encoders, values for
//!    matching.
//! 3. `encode/`: `full.rs` (one `v1::Event` an event, with its trace line)
//!    and `packed.rs` (columns and per-probe schemas); `mod.rs` is the batch
//!    a stream fills.
//! 4. `subscribe.rs`: every event stream (`Streams`): admission and limits,
//!    the per-probe and per-subscriber filters run on vCPU threads, and the
//!    pump that batches, encodes and reports losses. It sees the engine only
//!    through `EventSource`.
//! 5. Stream consumers, each over `Streams`: `export/` (JSON-lines file:
//!    `config.rs`, `writer.rs`, `rotate.rs`, and `record.rs`, the record
//!    envelope and owed losses the sinks share) and `sink/` (webhook and
//!    OTLP: `config.rs`, `stats.rs`, `deliver.rs`, `webhook.rs`, `otlp.rs`).
//! 6. `state.rs` (`Inner`: the shared state and its lock order) and what
//!    it does, one file a concern: `probes.rs` (create, delete, restore,
//!    probe references), `kernel.rs` (KASLR slide, banner, ResolveSymbol,
//!    GetGuestInfo), `policy/apply.rs` (policy loads), `snapshot.rs`.
//! 7. `server.rs`: `HvProbeService` and the tonic `impl HvProbe`, checking
//!    requests and delegating to the layer below.
//! 8. `metrics.rs` (`/metrics` over the state and the consumers' counters),
//!    `listen.rs` (serving the service), `client.rs`.
//!
//! The path of an event: a vCPU thread runs the engine's probe handler,
//! which offers the event to each subscription (`subscribe.rs`: select by
//! probe, then filter by content with `catalog::EventFieldsView`, queued in
//! the engine's bounded queue) → the subscription's pump drains the queue
//! into an `encode::Batch` (`encode/full.rs` or `encode/packed.rs`) → a
//! `SubscribeResponse` frame to the gRPC stream (`server.rs`), or to the
//! export thread (`export/writer.rs`) or a sink's deliverer
//! (`sink/deliver.rs`).

mod actions;
mod catalog;
pub mod client;
mod config;
mod encode;
mod errors;
pub mod export;
mod guest;
mod kernel;
pub mod listen;
pub mod metrics;
pub mod policy;
mod probes;
mod server;
pub mod sink;
mod snapshot;
mod state;
mod subscribe;
mod symbols;
mod time;
mod watches;

pub use config::ServiceConfig;
pub use export::{ExportConfig, ExportStats, Exporter};
pub use guest::{BridgeInfoFn, Guest, SnapshotWriter, WrittenSnapshot};
pub use listen::{Listen, ListenError, TlsFiles};
pub use metrics::Metrics;
pub use policy::{DocError, LoadReport, PolicyDef};
pub use server::HvProbeService;
pub use sink::{Sink, SinkConfig, SinkKind, SinkStats};
pub use symbols::{DwarfNames, SymbolError, Symbols};
