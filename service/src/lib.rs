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

pub use config::ServiceConfig;
pub use export::{ExportConfig, ExportStats, Exporter};
pub use guest::{BridgeInfoFn, Guest, SnapshotWriter, WrittenSnapshot};
pub use listen::{Listen, ListenError, TlsFiles};
pub use metrics::Metrics;
pub use policy::{DocError, LoadReport, PolicyDef};
pub use server::HvProbeService;
pub use sink::{Sink, SinkConfig, SinkKind, SinkStats};
pub use symbols::{DwarfNames, SymbolError, Symbols};
