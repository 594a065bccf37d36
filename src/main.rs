//! `hvprobe`: hypervisor-side kprobes for KVM guests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod action_arg;
mod bench;
mod cli;
mod cli_watch;
mod runner;

// Events are allocated on vCPU threads and freed on the stream's thread;
// glibc's per-arena locks made that handoff a futex round trip under load
// (`hvprobe bench events`), mimalloc frees across threads without one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hvprobe",
    version,
    about = "Hypervisor-side kprobes and kretprobes for KVM guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct GuestArgs {
    /// Guest RAM in MiB [default: 256; with --restore, the snapshot's].
    #[arg(long)]
    memory: Option<u64>,
    /// Number of vCPUs [default: 2; with --restore, the snapshot's].
    #[arg(long)]
    vcpus: Option<u8>,
    /// Where the serial console goes: `stdout` or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
    /// Complete guest user system calls in the VMM on hosts whose KVM leaves
    /// them half done: `auto` (detect), `on` (refused where not needed), `off`.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    syscall_bridge: vmm::BridgeMode,
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Plant this probe before the guest starts (kprobe_events syntax, e.g.
    /// `p:grp/ev hv_open_file path=+0(%si):string`); repeatable.
    #[arg(long = "probe", value_name = "DEFINITION")]
    probes: Vec<String>,
    /// Load the policies of this YAML or JSON file before the guest starts
    /// (repeatable; all files as one load). SIGHUP reloads them, all or
    /// nothing: a file that does not parse or load leaves the running
    /// policies unchanged.
    #[arg(long = "policy", value_name = "FILE")]
    policies: Vec<PathBuf>,
    /// Serve the API on `unix:PATH` or `tcp:HOST:PORT` [default:
    /// $XDG_RUNTIME_DIR/hvprobe.sock or /run/hvprobe/hvprobe.sock].
    #[arg(long, value_name = "ADDRESS")]
    listen: Option<service::Listen>,
    /// TLS server certificate (PEM); with --tls-key and --tls-client-ca.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// TLS server key (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM).
    #[arg(long, value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// Write every event as a JSON line (an `hvprobe.v1.ExportRecord` in
    /// the proto3 JSON mapping) to this file, mode 0600; lost events are
    /// records of their own.
    #[arg(long, value_name = "PATH")]
    export_file: Option<PathBuf>,
    /// Rotate the export file before it grows beyond this many bytes
    /// (suffixes K, M, G: KiB, MiB, GiB).
    #[arg(long, value_name = "BYTES", default_value = "100M", value_parser = parse_size, requires = "export_file")]
    export_max_bytes: u64,
    /// Rotated export files to keep (PATH.1 newest .. PATH.K).
    #[arg(long, value_name = "K", default_value_t = 5, requires = "export_file")]
    export_backups: u32,
    /// Compress rotated export files with gzip (PATH.1.gz ..).
    #[arg(long, requires = "export_file")]
    export_gzip: bool,
    /// The exporter's queue in events: what a slow disk may fall behind
    /// before events are dropped (and counted) [default: the stream default].
    #[arg(
        long,
        value_name = "EVENTS",
        default_value_t = 0,
        requires = "export_file"
    )]
    export_queue: u32,
    /// Name of this VM in exported records [default: the kernel's file name].
    #[arg(long, value_name = "NAME")]
    vm_name: Option<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (and /healthz):
    /// `tcp:127.0.0.1:PORT`; loopback only unless --metrics-public.
    #[arg(long, value_name = "tcp:HOST:PORT")]
    metrics: Option<String>,
    /// Allow --metrics on a non-loopback address.
    #[arg(long, requires = "metrics")]
    metrics_public: bool,
    /// Allow probe actions (override, freeze, snapshot), which change what
    /// the guest does; without it a probe with an action is refused
    /// (FAILED_PRECONDITION).
    #[arg(long)]
    allow_actions: bool,
    /// POST every event to this URL in batches: `http://HOST:PORT/PATH`
    /// to a loopback address (no TLS yet). The body is a JSON array of
    /// `hvprobe.v1.ExportRecord` (the export file's records); lost events
    /// are records of their own.
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
    /// The webhook's body: `json` (one JSON array a batch) or `ndjson`
    /// (one record a line).
    #[arg(long, value_name = "FORMAT", default_value = "json", value_parser = ["json", "ndjson"], requires = "webhook_url")]
    webhook_format: String,
    /// Events at most in one webhook request.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=16384), requires = "webhook_url")]
    webhook_batch: u32,
    /// The webhook's queue in events: what a slow or dead receiver may
    /// fall behind before events are dropped (and counted).
    #[arg(long, value_name = "EVENTS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1048576), requires = "webhook_url")]
    webhook_queue: u32,
    /// Bound of one webhook attempt (connect, send, answer): 5s, 500ms.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, requires = "webhook_url")]
    webhook_timeout: Duration,
    /// Attempts at most for one webhook batch (1: no retry).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100), requires = "webhook_url")]
    webhook_attempts: u32,
    /// Pause before the first retry of a webhook batch, doubled each time
    /// up to 5s (or the receiver's Retry-After within that).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration, requires = "webhook_url")]
    webhook_backoff: Duration,
    /// Send every event as an OTLP log record to this OTLP/HTTP endpoint
    /// (protobuf, POST ENDPOINT/v1/logs): `http://127.0.0.1:4318`,
    /// loopback only (no TLS yet).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Log records at most in one OTLP request.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=16384), requires = "otlp_endpoint")]
    otlp_batch: u32,
    /// The OTLP sink's queue in events.
    #[arg(long, value_name = "EVENTS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1048576), requires = "otlp_endpoint")]
    otlp_queue: u32,
    /// Bound of one OTLP attempt.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, requires = "otlp_endpoint")]
    otlp_timeout: Duration,
    /// Attempts at most for one OTLP batch (1: no retry).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100), requires = "otlp_endpoint")]
    otlp_attempts: u32,
    /// Pause before the first retry of an OTLP batch, doubled up to 5s.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration, requires = "otlp_endpoint")]
    otlp_backoff: Duration,
}

/// `5s`, `250ms`, `2m`, or a number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration, e.g. 5s or 500ms"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{s:?}: expected a duration, e.g. 5s or 500ms")),
    };
    if d.is_zero() {
        return Err("must be above 0".into());
    }
    Ok(d)
}

/// `123`, `64K`, `10M`, `1G` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes, e.g. 1048576 or 10M"))?;
    match n.checked_mul(mul) {
        Some(0) => Err("must be above 0".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?}: too large")),
    }
}

impl ServeArgs {
    fn vm_identity(&self, kernel: &std::path::Path) -> proto::v1::VmIdentity {
        let name = self.vm_name.clone().unwrap_or_else(|| {
            kernel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        service::export::vm_identity(&name)
    }

    /// The push sinks asked for (their URLs checked).
    fn sinks(&self, vm: &proto::v1::VmIdentity) -> Result<Vec<service::SinkConfig>, String> {
        use service::sink::{SinkConfig, SinkKind, WebhookFormat};
        let mut out = Vec::new();
        if let Some(url) = &self.webhook_url {
            let mut c = SinkConfig::new(SinkKind::Webhook, url, vm.clone())?;
            c.format = if self.webhook_format == "ndjson" {
                WebhookFormat::JsonLines
            } else {
                WebhookFormat::JsonArray
            };
            c.batch_events = self.webhook_batch;
            c.queue_capacity = self.webhook_queue;
            c.timeout = self.webhook_timeout;
            c.max_attempts = self.webhook_attempts;
            c.backoff = self.webhook_backoff;
            out.push(c);
        }
        if let Some(url) = &self.otlp_endpoint {
            let mut c = SinkConfig::new(SinkKind::Otlp, url, vm.clone())?;
            c.batch_events = self.otlp_batch;
            c.queue_capacity = self.otlp_queue;
            c.timeout = self.otlp_timeout;
            c.max_attempts = self.otlp_attempts;
            c.backoff = self.otlp_backoff;
            out.push(c);
        }
        Ok(out)
    }

    fn export(&self, kernel: &std::path::Path) -> Option<service::ExportConfig> {
        let path = self.export_file.clone()?;
        let mut c = service::ExportConfig::new(path, self.vm_identity(kernel));
        c.max_bytes = self.export_max_bytes;
        c.backups = self.export_backups;
        c.gzip = self.export_gzip;
        c.queue_capacity = self.export_queue;
        Some(c)
    }

    fn metrics(&self) -> Result<Option<std::net::SocketAddr>, String> {
        self.metrics
            .as_deref()
            .map(|m| service::metrics::parse_addr(m, self.metrics_public))
            .transpose()
    }

    fn tls(&self) -> service::TlsFiles {
        service::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel (ELF vmlinux with a PVH note, or bzImage) and
    /// serve the hvprobe.v1 API while it runs.
    Run {
        /// Kernel image (with --restore: for symbols only; default: the
        /// kernel the snapshot recorded).
        #[arg(long, required_unless_present = "restore")]
        kernel: Option<PathBuf>,
        /// Continue a snapshot (`hvprobe snapshot DIR`) instead of booting:
        /// memory is mapped copy-on-write from it, the snapshot is never
        /// modified, and its probes are planted again before the guest runs.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["initrd", "cmdline"])]
        restore: Option<PathBuf>,
        /// With --restore: leave the snapshot's probes out.
        #[arg(long, requires = "restore")]
        no_probes: bool,
        /// Initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line [default: console=ttyS0].
        #[arg(long)]
        cmdline: Option<String>,
        /// Symbols from this System.map (e.g. for a bzImage).
        #[arg(long)]
        system_map: Option<PathBuf>,
        #[command(flatten)]
        serve: Box<ServeArgs>,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Measure probe costs against a bare VM exit (test guest).
    Bench(bench::BenchArgs),
    /// Boot the bundled test guest with example probes and print their
    /// events until it exits (exit code = the guest's status).
    Demo {
        /// Test-guest command line (e.g. `hvtest.iters=500`).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Probes instead of the examples (repeatable).
        #[arg(long = "probe", value_name = "DEFINITION")]
        probes: Vec<String>,
        /// Also serve the API here (`unix:PATH` or `tcp:127.0.0.1:PORT`).
        #[arg(long, value_name = "ADDRESS")]
        listen: Option<service::Listen>,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Manage policies of a running `hvprobe run`.
    Policy {
        #[command(subcommand)]
        action: cli::PolicyAction,
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Watch guest data in a running `hvprobe run` (writes to a variable,
    /// with the writer, task and old/new value).
    Watch {
        #[command(subcommand)]
        action: cli_watch::WatchAction,
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Manage probes of a running `hvprobe run`.
    Probe {
        #[command(subcommand)]
        action: cli::ProbeAction,
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Arm all enabled probes (kprobes/enabled = 1).
    Arm {
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Disarm all probes without deleting them (kprobes/enabled = 0).
    Disarm {
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Follow the event stream as JSON lines (lost events as `{"lost":...}`).
    Events(cli::EventsArgs),
    /// Snapshot the running guest into DIR (on the server's host): vCPUs,
    /// devices, memory with the guest's own bytes at every probe site, and
    /// the probe table. `hvprobe run --restore DIR` continues from it.
    Snapshot {
        /// Directory to write (created if missing; a snapshot there is replaced).
        dir: PathBuf,
        /// Stop the guest after the snapshot instead of resuming it.
        #[arg(long)]
        stop: bool,
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Let a guest that a probe's `freeze` action froze run again.
    Resume {
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// Describe the guest (state, vCPUs, banner, symbols).
    Info {
        #[command(flatten)]
        server: cli::ServerArg,
    },
    /// List the guest's processes from its task list (needs vmlinux DWARF):
    /// pid, ppid, state, name, executable; kernel threads in brackets.
    Ps {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: cli::ServerArg,
    },
}

/// Example probes of `hvprobe demo`: the open path, and fib's argument
/// (saved at entry) with its return value.
const DEMO_PROBES: &[&str] = &[
    "p:demo/open hv_open_file dfd=%di:s32 path=+0(%si):string flags=%dx:x32",
    "r32:demo/fib hv_fib n=$arg1:s32 ret=$retval:s64",
];

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HVPROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if cli.command.is_client() {
        // `hvprobe probe ls | head`: end quietly when the reader goes away,
        // like other command-line tools, instead of panicking in println!.
        // (Not for run/demo/bench: a closed API socket must not kill them.)
        // SAFETY: setting a signal disposition to the default has no
        // preconditions; no other thread runs yet.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run {
            kernel,
            restore,
            no_probes,
            initrd,
            cmdline,
            system_map,
            serve,
            guest,
        } => {
            let kernel = kernel.unwrap_or_default();
            let metrics = match serve.metrics() {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("hvprobe: error: {e}");
                    return ExitCode::from(1);
                }
            };
            let named = if kernel.as_os_str().is_empty() {
                restore.as_deref().unwrap_or(&kernel)
            } else {
                &kernel
            };
            let export = serve.export(named);
            let sinks = match serve.sinks(&serve.vm_identity(named)) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("hvprobe: error: {e}");
                    return ExitCode::from(1);
                }
            };
            let opts = runner::RunOptions {
                export,
                sinks,
                metrics,
                tls: serve.tls(),
                probes: serve.probes,
                policies: serve.policies,
                allow_actions: serve.allow_actions,
                listen: Some(serve.listen.unwrap_or_else(service::Listen::default_unix)),
                system_map,
                print_events: false,
                restore: restore.map(|dir| runner::RestoreOptions {
                    dir,
                    no_probes,
                    vcpus: guest.vcpus,
                    memory_mib: guest.memory,
                }),
            };
            let cmdline = cmdline.unwrap_or_else(|| "console=ttyS0".into());
            runner::boot(guest.config(kernel, initrd, cmdline), opts)
        }
        Command::Bench(args) => bench::run(args),
        Command::Demo {
            cmdline,
            probes,
            listen,
            guest,
        } => {
            let probes = if probes.is_empty() {
                DEMO_PROBES.iter().map(|s| s.to_string()).collect()
            } else {
                probes
            };
            runner::boot(
                guest.config(test_guest::kernel_path().to_owned(), None, cmdline),
                runner::RunOptions {
                    probes,
                    listen,
                    tls: service::TlsFiles::default(),
                    system_map: None,
                    print_events: true,
                    restore: None,
                    export: None,
                    sinks: Vec::new(),
                    metrics: None,
                    policies: Vec::new(),
                    allow_actions: false,
                },
            )
        }
        Command::Probe { action, server } => cli::probe(&server, action),
        Command::Watch { action, server } => cli_watch::watch(&server, action),
        Command::Policy { action, server } => cli::policy(&server, action),
        Command::Arm { server } => cli::arm(&server, true),
        Command::Disarm { server } => cli::arm(&server, false),
        Command::Events(args) => cli::events(args),
        Command::Snapshot { dir, stop, server } => cli::snapshot(&server, &dir, stop),
        Command::Info { server } => cli::info(&server),
        Command::Resume { server } => cli::resume(&server),
        Command::Ps { json, server } => cli::ps(&server, json),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hvprobe: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

impl Command {
    /// Commands that only talk to a running server.
    fn is_client(&self) -> bool {
        !matches!(
            self,
            Command::Run { .. } | Command::Bench(_) | Command::Demo { .. }
        )
    }
}

impl GuestArgs {
    fn config(&self, kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String) -> vmm::VmConfig {
        let mut c = vmm::VmConfig::new(kernel);
        c.initrd = initrd;
        c.cmdline = cmdline;
        c.vcpus = self.vcpus.unwrap_or(2);
        c.memory_mib = self.memory.unwrap_or(256);
        c.kvm_device = self.kvm_device.clone();
        c.syscall_bridge = self.syscall_bridge;
        c.serial = if self.serial == "stdout" {
            vmm::SerialOutput::Stdout
        } else {
            vmm::SerialOutput::File(PathBuf::from(&self.serial))
        };
        c
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
