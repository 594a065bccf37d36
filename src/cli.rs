//! Client commands: talk to a running `hvprobe run` over its API.

use anyhow::{Context, Result};
use proto::v1::{self, hv_probe_client::HvProbeClient};
use serde_json::{json, Map, Value as Json};
use service::Listen;
use tonic::transport::Channel;

#[derive(clap::Args, Clone)]
pub struct ServerArg {
    /// Server address, `unix:PATH` or `tcp:HOST:PORT` [default: $HVPROBE_SERVER,
    /// else $XDG_RUNTIME_DIR/hvprobe.sock or /run/hvprobe/hvprobe.sock].
    #[arg(long, value_name = "ADDRESS", env = "HVPROBE_SERVER")]
    server: Option<Listen>,
}

#[derive(clap::Subcommand, Clone)]
pub enum ProbeAction {
    /// Create probes from kprobe_events lines (several: all or nothing).
    Add {
        /// e.g. `p:fs/open do_sys_openat2 path=+0(%si):string`.
        #[arg(required = true)]
        definitions: Vec<String>,
        /// Create them disabled.
        #[arg(long)]
        disabled: bool,
        /// tracefs filter evaluated at the probe, e.g. `path ~ "/etc/*"`.
        #[arg(long)]
        filter: Option<String>,
        /// What a hit the filter accepts does: `override:VALUE` (the
        /// function returns VALUE at once; entry of a non-void function),
        /// `freeze` (until `hvprobe resume`) or `snapshot:DIR`. Needs
        /// `hvprobe run --allow-actions`.
        #[arg(long, value_name = "ACTION", value_parser = crate::action_arg::parse)]
        action: Option<v1::ProbeAction>,
    },
    /// Delete probes by id or GROUP/EVENT.
    Rm {
        #[arg(required_unless_present = "all")]
        probes: Vec<String>,
        /// Delete every probe.
        #[arg(long, conflicts_with = "probes")]
        all: bool,
    },
    /// List probes with their counters.
    Ls {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Enable a probe.
    Enable { probe: String },
    /// Disable a probe.
    Disable { probe: String },
}

#[derive(clap::Subcommand, Clone)]
pub enum PolicyAction {
    /// Load policy files (YAML or JSON; several: one load, all or nothing).
    /// Policies of names already loaded are replaced by difference.
    Load {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<std::path::PathBuf>,
    },
    /// List policies with their counters.
    #[command(alias = "ls")]
    List {
        /// Print JSON lines (the API's PolicyInfo in its JSON mapping).
        #[arg(long)]
        json: bool,
    },
    /// Delete a policy and its probes.
    #[command(alias = "rm")]
    Delete { name: String },
}

#[derive(clap::Args, Clone)]
pub struct EventsArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Only these probe ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<u64>,
    /// Only probes of these groups (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// tracefs filter over the event fields, e.g. `path ~ "/etc/*"`.
    #[arg(long, default_value = "")]
    filter: String,
    /// Queue size in events (0: server default).
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Stop after this many events (0: follow forever).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stream encoding: `full` (one message per event) or `packed`
    /// (columns; less work for the server at high rates). The JSON printed
    /// is the same, except that packed return events name their caller by
    /// address in "text".
    #[arg(long, default_value = "full", value_parser = ["full", "packed"])]
    encoding: String,
    /// Also read each hit's executable path (`mm->exe_file`) into "exe".
    #[arg(long)]
    exe: bool,
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) async fn connect(s: &ServerArg) -> Result<HvProbeClient<Channel>> {
    let addr = s.server.clone().unwrap_or_else(Listen::default_unix);
    service::client::connect(&addr)
        .await
        .with_context(|| format!("cannot connect to the hvprobe server at {addr}"))
}

/// A status as an error: code, message, and the caret line of definition errors.
pub(crate) fn status(s: tonic::Status) -> anyhow::Error {
    let mut m = format!("{:?}: {}", s.code(), s.message());
    if let Some(d) = proto::definition_error_from_status(&s) {
        m.push('\n');
        m.push_str(&d.rendered);
    }
    anyhow::anyhow!(m)
}

fn probe_ref(text: &str) -> v1::ProbeRef {
    v1::ProbeRef {
        r#ref: Some(match text.parse::<u64>() {
            Ok(id) => v1::probe_ref::Ref::Id(id),
            Err(_) => v1::probe_ref::Ref::Name(text.to_string()),
        }),
    }
}

pub fn probe(server: &ServerArg, action: ProbeAction) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        match action {
            ProbeAction::Add {
                definitions,
                disabled,
                filter,
                action,
            } => {
                let definitions = definitions
                    .into_iter()
                    .map(|l| v1::ProbeDefinition {
                        definition: Some(v1::probe_definition::Definition::KprobeEvents(l)),
                        create_disabled: disabled,
                        filter: filter.clone().unwrap_or_default(),
                        action: action.clone(),
                    })
                    .collect();
                let r = c
                    .create_probes(v1::CreateProbesRequest { definitions })
                    .await
                    .map_err(status)?;
                for p in r.into_inner().probes {
                    println!("{}\t{}/{}\t{}", p.id, p.group, p.event, p.location);
                }
            }
            ProbeAction::Rm { probes, all } => {
                let r = c
                    .delete_probes(v1::DeleteProbesRequest {
                        probes: probes.iter().map(|p| probe_ref(p)).collect(),
                        all,
                    })
                    .await
                    .map_err(status)?;
                for p in r.into_inner().probes {
                    println!("deleted {}\t{}/{}\thits={}", p.id, p.group, p.event, p.hits);
                }
            }
            ProbeAction::Ls { json } => {
                let r = c
                    .list_probes(v1::ListProbesRequest::default())
                    .await
                    .map_err(status)?
                    .into_inner();
                if json {
                    for p in &r.probes {
                        println!("{}", probe_json(p));
                    }
                } else {
                    println!("armed: {}", r.armed);
                    println!(
                        "{:>4}  {:<24} {:<4} {:<28} {:<9} {:>10} {:>8} {:>8}  HANDLING",
                        "ID", "NAME", "KIND", "LOCATION", "STATE", "HITS", "MISSES", "DROPPED"
                    );
                    for p in &r.probes {
                        println!(
                            "{:>4}  {:<24} {:<4} {:<28} {:<9} {:>10} {:>8} {:>8}  {}{}",
                            p.id,
                            format!("{}/{}", p.group, p.event),
                            kind_name(p.kind),
                            p.location,
                            state(p),
                            p.hits,
                            p.misses,
                            p.dropped,
                            handling_name(p.handling),
                            hw_note(p),
                        );
                        if let Some(a) = &p.action {
                            println!(
                                "{:>4}  [ACTION: {}, ran {} times]",
                                "",
                                crate::action_arg::format(a),
                                p.actions
                            );
                        }
                        if p.site_address != p.address && p.site_address != 0 {
                            // The int3 is after the function's ftrace site.
                            println!(
                                "{:>4}  [FTRACE: planted at {:#x}, +{:#x}]",
                                "",
                                p.site_address,
                                p.site_address.wrapping_sub(p.address)
                            );
                        }
                        if !p.module_error.is_empty() {
                            // Not armed at its module's last load.
                            println!("{:>4}  [NOT ARMED: {}]", "", p.module_error);
                        }
                    }
                }
            }
            ProbeAction::Enable { probe } => {
                let p = c
                    .enable_probe(v1::EnableProbeRequest {
                        probe: Some(probe_ref(&probe)),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .probe
                    .unwrap_or_default();
                println!("{}	{}/{}	{}", p.id, p.group, p.event, state(&p));
            }
            ProbeAction::Disable { probe } => {
                let p = c
                    .disable_probe(v1::DisableProbeRequest {
                        probe: Some(probe_ref(&probe)),
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .probe
                    .unwrap_or_default();
                println!("{}	{}/{}	{}", p.id, p.group, p.event, state(&p));
            }
        }
        Ok(0)
    })
}

pub fn policy(server: &ServerArg, action: PolicyAction) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        match action {
            PolicyAction::Load { files } => {
                let mut documents = Vec::with_capacity(files.len());
                for f in &files {
                    let text = std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read {}", f.display()))?;
                    documents.push(v1::PolicyDocument {
                        text,
                        source: f.display().to_string(),
                    });
                }
                let r = c
                    .load_policy(v1::LoadPolicyRequest { documents })
                    .await
                    .map_err(status)?
                    .into_inner();
                for p in &r.policies {
                    println!(
                        "{}\t{}\t{} probes\tgeneration {}",
                        p.name,
                        if p.enabled { "enabled" } else { "disabled" },
                        p.probes.len(),
                        p.generation
                    );
                }
                println!(
                    "probes: {} added, {} removed, {} unchanged",
                    r.probes_added, r.probes_removed, r.probes_kept
                );
            }
            PolicyAction::List { json } => {
                let r = c
                    .list_policies(v1::ListPoliciesRequest::default())
                    .await
                    .map_err(status)?
                    .into_inner();
                if json {
                    for p in &r.policies {
                        println!("{}", serde_json::to_string(p)?);
                    }
                } else {
                    println!(
                        "{:<24} {:<8} {:>6} {:>10} {:>10} {:>12}  RATE LIMIT / SOURCE",
                        "NAME", "STATE", "PROBES", "HITS", "EVENTS", "RATE-LIMITED"
                    );
                    for p in &r.policies {
                        let limit = p.rate_limit.as_ref().map_or("-".to_string(), |l| {
                            let scope =
                                v1::RateLimitScope::try_from(l.scope).map_or("?".into(), |s| {
                                    s.as_str_name()
                                        .trim_start_matches("RATE_LIMIT_SCOPE_")
                                        .to_lowercase()
                                });
                            format!("{}/{}ms per {scope}", l.events, l.window_ms)
                        });
                        println!(
                            "{:<24} {:<8} {:>6} {:>10} {:>10} {:>12}  {limit} {}",
                            p.name,
                            if p.enabled { "enabled" } else { "disabled" },
                            p.probes.len(),
                            p.hits,
                            p.events,
                            p.rate_limited,
                            p.source
                        );
                    }
                }
            }
            PolicyAction::Delete { name } => {
                let p = c
                    .delete_policy(v1::DeletePolicyRequest { name })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .policy
                    .unwrap_or_default();
                println!(
                    "deleted {}\t{} probes\thits={} events={} rate_limited={}",
                    p.name,
                    p.probes.len(),
                    p.hits,
                    p.events,
                    p.rate_limited
                );
            }
        }
        Ok(0)
    })
}

fn kind_name(k: i32) -> &'static str {
    match v1::ProbeKind::try_from(k) {
        Ok(v1::ProbeKind::Kprobe) => "p",
        Ok(v1::ProbeKind::Kretprobe) => "r",
        _ => "?",
    }
}

fn handling_name(h: i32) -> &'static str {
    match v1::HandlingMode::try_from(h) {
        Ok(v1::HandlingMode::Emulate) => "emulate",
        Ok(v1::HandlingMode::SingleStep) => "single-step",
        Ok(v1::HandlingMode::OutOfLine) => "out-of-line",
        _ => "?",
    }
}

fn state(p: &v1::ProbeInfo) -> &'static str {
    if p.pending {
        "pending"
    } else if p.gone {
        "gone"
    } else if p.enabled {
        "enabled"
    } else {
        "disabled"
    }
}

/// " HW:DR2" for a `%hw` probe holding a debug register, " HW:unarmed"
/// for one that holds none now (disabled or disarmed); empty for an int3.
fn hw_note(p: &v1::ProbeInfo) -> String {
    match (p.hardware, p.hw_slot) {
        (true, Some(slot)) => format!(" HW:DR{slot}"),
        (true, None) => " HW:unarmed".into(),
        (false, _) => String::new(),
    }
}

fn probe_json(p: &v1::ProbeInfo) -> Json {
    json!({
        "id": p.id, "group": p.group, "event": p.event, "kind": kind_name(p.kind),
        "address": format!("{:#x}", p.address), "site": format!("{:#x}", p.site_address),
        "location": p.location,
        "state": state(p), "hits": p.hits, "misses": p.misses, "dropped": p.dropped,
        "handling": handling_name(p.handling), "maxactive": p.maxactive,
        "definition": p.definition, "filter": p.filter, "policy": p.policy,
        "hardware": p.hardware, "hw_slot": p.hw_slot,
        "module": p.module, "module_error": p.module_error,
    })
}

pub fn arm(server: &ServerArg, on: bool) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        let was = if on {
            c.arm(v1::ArmRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .was_armed
        } else {
            c.disarm(v1::DisarmRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .was_armed
        };
        println!("armed: {on} (was {was})");
        Ok(0)
    })
}

/// `hvprobe snapshot DIR`: snapshot the running guest (CreateSnapshot).
pub fn snapshot(server: &ServerArg, dir: &std::path::Path, stop: bool) -> Result<u8> {
    // The server writes the files: give it a path that means the same there.
    let dir = std::path::absolute(dir)
        .with_context(|| format!("cannot make {} absolute", dir.display()))?;
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        let r = c
            .create_snapshot(v1::CreateSnapshotRequest {
                directory: dir.display().to_string(),
                stop,
            })
            .await
            .map_err(status)?
            .into_inner();
        println!(
            "snapshot {}: {} MiB of RAM ({} MiB written), {} probes, {} kretprobe instances, \
             {} guest bytes saved as the guest's own; guest paused {:.1} ms (capture {:.1} ms, write {:.1} ms){}",
            r.directory,
            r.memory_bytes >> 20,
            r.written_bytes >> 20,
            r.probes,
            r.kretprobe_instances,
            r.restored_bytes,
            (r.capture_us + r.write_us) as f64 / 1000.0,
            r.capture_us as f64 / 1000.0,
            r.write_us as f64 / 1000.0,
            if stop { "; guest stopped" } else { "" }
        );
        Ok(0)
    })
}

/// `hvprobe resume`: thaw a guest a probe's freeze action holds.
pub fn resume(server: &ServerArg) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        let r = c
            .resume(v1::ResumeRequest {})
            .await
            .map_err(status)?
            .into_inner();
        if let Some(f) = r.was {
            println!(
                "resumed: the guest was frozen by probe {} on vCPU {}",
                f.probe_id, f.vcpu
            );
        }
        Ok(0)
    })
}

pub fn info(server: &ServerArg) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        let i = c
            .get_guest_info(v1::GetGuestInfoRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let st = v1::GuestState::try_from(i.state).map_or("?".into(), |s| {
            s.as_str_name()
                .trim_start_matches("GUEST_STATE_")
                .to_lowercase()
        });
        let src = v1::SymbolSource::try_from(i.symbol_source).map_or("?".into(), |s| {
            s.as_str_name()
                .trim_start_matches("SYMBOL_SOURCE_")
                .to_lowercase()
        });
        println!("state:    {st}");
        println!("vcpus:    {}", i.vcpus);
        println!("memory:   {} MiB", i.memory_bytes >> 20);
        println!("banner:   {}", i.kernel_banner);
        println!(
            "kaslr:    slide {:#x} ({})",
            i.kaslr_slide,
            if i.kaslr_verified {
                "verified"
            } else {
                "not verified"
            }
        );
        println!(
            "symbols:  {} from {src} {}",
            i.symbol_count, i.symbol_source_detail
        );
        println!("probes:   {} (armed: {})", i.probe_count, i.armed);
        if let Some(f) = &i.frozen {
            println!(
                "frozen:   by probe {} on vCPU {} since {} ns (hvprobe resume)",
                f.probe_id, f.vcpu, f.since_ns
            );
        }
        if let Some(b) = &i.syscall_bridge {
            // `detail` starts with "on" or "off" and says why.
            println!(
                "bridge:   syscall bridge {}: {} syscalls, {} int80, {} faults passed on, {} step fallbacks",
                b.detail, b.syscalls, b.int80, b.faults_passed, b.step_fallbacks
            );
        }
        Ok(0)
    })
}

/// `hvprobe ps`: the guest's processes, read from guest memory.
pub fn ps(server: &ServerArg, json_out: bool) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        let tasks = c
            .list_tasks(v1::ListTasksRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .tasks;
        if json_out {
            for t in &tasks {
                let mut o = json!({
                    "pid": t.pid, "tgid": t.tgid, "ppid": t.ppid, "comm": t.comm,
                    "state": t.state, "kernel_thread": t.kernel_thread,
                    "address": format!("{:#x}", t.address),
                });
                if let Some(exe) = &t.exe {
                    o["exe"] = json!(String::from_utf8_lossy(exe));
                }
                println!("{o}");
            }
            return Ok(0);
        }
        println!("{:>7} {:>7} S COMMAND          EXE", "PID", "PPID");
        for t in &tasks {
            let exe = match &t.exe {
                Some(e) => String::from_utf8_lossy(e).into_owned(),
                None if t.kernel_thread => "[kernel thread]".into(),
                None => "?".into(),
            };
            let comm = if t.kernel_thread {
                format!("[{}]", t.comm)
            } else {
                t.comm.clone()
            };
            println!("{:>7} {:>7} {} {:<16} {exe}", t.pid, t.ppid, t.state, comm);
        }
        Ok(0)
    })
}

pub fn events(a: EventsArgs) -> Result<u8> {
    use v1::subscribe_response::Payload;
    runtime()?.block_on(async {
        let mut c = connect(&a.server).await?;
        let mut stream = c
            .subscribe(v1::SubscribeRequest {
                probe_ids: a.ids.clone(),
                groups: a.groups.clone(),
                filter: a.filter.clone(),
                queue_capacity: a.queue,
                encoding: if a.encoding == "packed" {
                    v1::EventEncoding::Packed
                } else {
                    v1::EventEncoding::Full
                } as i32,
                with_exe: a.exe,
                ..Default::default()
            })
            .await
            .map_err(status)?
            .into_inner();
        let mut seen = 0u64;
        let mut reader = proto::packed::PackedReader::new();
        let mut print = |e: &v1::Event| {
            println!("{}", event_json(e));
            seen += 1;
            a.count != 0 && seen >= a.count
        };
        while let Some(msg) = stream.message().await.map_err(status)? {
            match msg.payload {
                Some(Payload::Events(b)) => {
                    for e in &b.events {
                        if print(e) {
                            return Ok(0);
                        }
                    }
                }
                Some(Payload::Schema(s)) => reader.add_schema(s),
                Some(Payload::Packed(b)) => {
                    let batch = reader.open(&b)?;
                    for e in batch.events() {
                        if print(&e.to_event()) {
                            return Ok(0);
                        }
                    }
                }
                Some(Payload::Lost(l)) => println!(
                    "{}",
                    json!({"lost": {"count": l.count, "since_ns": l.since_ns, "until_ns": l.until_ns,
                        "probe_ids": l.probe_ids,
                        "reason": v1::LostReason::try_from(l.reason).map_or("?", |r| r.as_str_name())}})
                ),
                Some(Payload::Started(s)) => eprintln!(
                    "hvprobe: subscribed (id {}, queue {}, batch {}, {} ms)",
                    s.subscription_id, s.queue_capacity, s.max_batch_events, s.max_batch_delay_ms
                ),
                None => {}
            }
        }
        eprintln!("hvprobe: the server ended the stream");
        Ok(0)
    })
}

fn value_json(v: Option<&v1::Value>) -> Json {
    use v1::value::Kind;
    match v.and_then(|v| v.kind.as_ref()) {
        Some(Kind::Unsigned(u)) => json!(u.value),
        Some(Kind::Signed(s)) => json!(s.value),
        Some(Kind::Hex(h)) => json!(format!("{:#x}", h.value)),
        Some(Kind::Char(c)) => json!(char::from_u32(*c).map(String::from).unwrap_or_default()),
        Some(Kind::String(s)) => json!(s.text),
        Some(Kind::Symbol(s)) if !s.symbol.is_empty() => json!(s.symbol),
        Some(Kind::Symbol(s)) => json!(format!("{:#x}", s.address)),
        Some(Kind::Array(a)) => {
            Json::Array(a.elements.iter().map(|e| value_json(Some(e))).collect())
        }
        Some(Kind::Fault(f)) => json!({"fault": format!("{:#x}", f.address)}),
        None => Json::Null,
    }
}

fn args_json(args: &[v1::FetchedArg]) -> Json {
    let mut m = Map::new();
    for a in args {
        m.insert(a.name.clone(), value_json(a.value.as_ref()));
    }
    Json::Object(m)
}

/// One event as a JSON object (values typed; hex types as "0x.." strings).
pub fn event_json(e: &v1::Event) -> Json {
    let mut o = json!({
        "probe_id": e.probe_id, "group": e.group, "event": e.event,
        "kind": kind_name(e.kind), "seq": e.seq, "cpu": e.vcpu,
        "timestamp_ns": e.timestamp_ns, "ip": format!("{:#x}", e.ip),
        "args": args_json(&e.args), "text": e.text,
    });
    if let Some(pid) = e.pid {
        o["pid"] = json!(pid);
    }
    if let Some(comm) = &e.comm {
        o["comm"] = json!(comm);
    }
    if let Some(tgid) = e.tgid {
        o["tgid"] = json!(tgid);
    }
    if let Some(ppid) = e.ppid {
        o["ppid"] = json!(ppid);
    }
    if let Some(exe) = &e.exe {
        o["exe"] = json!(String::from_utf8_lossy(exe));
    }
    if !e.policy.is_empty() {
        o["policy"] = json!(e.policy);
        o["tags"] = json!(e.tags);
    }
    if let Some(r) = &e.ret {
        o["ret"] = json!({
            "retval": r.retval, "return_address": format!("{:#x}", r.return_address),
            "duration_ns": r.duration_ns, "entry_args": args_json(&r.entry_args),
        });
    }
    o
}
