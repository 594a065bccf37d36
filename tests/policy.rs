//! Policy files against `hvprobe run` of the live test guest: `--policy`
//! loads before boot (early probes), `hvprobe policy load|list|delete` and
//! the RPCs, SIGHUP reloads that are all or nothing (a broken file or an
//! unknown symbol changes nothing and the log says where, with line and
//! column; a good file applies the difference and unchanged probes keep
//! their ids and counters), and rate limits whose drops are counted exactly
//! (hits = events + rate_limited, the stream got exactly the events, the
//! metrics say the same).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use std::time::{Duration, Instant};

use common::kvm_available;
use proto::v1::{self, subscribe_response::Payload};

#[path = "common/run.rs"]
mod run;
use run::Run;

impl Run {
    fn server_arg(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    fn probes(&self) -> BTreeMap<String, v1::ProbeInfo> {
        self.list()
            .into_iter()
            .map(|p| (format!("{}/{}", p.group, p.event), p))
            .collect()
    }

    fn policies(&self) -> BTreeMap<String, v1::PolicyInfo> {
        let mut c = self.client();
        self.rt
            .block_on(c.list_policies(v1::ListPoliciesRequest::default()))
            .unwrap()
            .into_inner()
            .policies
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect()
    }

    fn load(&self, text: &str) -> Result<v1::LoadPolicyResponse, tonic::Status> {
        let mut c = self.client();
        self.rt
            .block_on(c.load_policy(v1::LoadPolicyRequest {
                documents: vec![v1::PolicyDocument {
                    text: text.into(),
                    source: "rpc.yaml".into(),
                }],
            }))
            .map(tonic::Response::into_inner)
    }

    /// SIGHUP, then wait for the `n`th "hvprobe: reload:" line; returns it.
    fn hup(&self, n: usize) -> String {
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.starts_with("hvprobe: reload:"))
                .collect();
            if lines.len() >= n {
                return lines[n - 1].to_string();
            }
            assert!(Instant::now() < deadline, "no reload line {n}: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until `f` holds (at most 30 s).
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const FIRST: &str = "\
policies:
  - name: early
    tags: {team: secops}
    probes:
      - 'p:e/add hv_add'
      - 'p:e/open hv_open_file path=+0(%si):string'
  - name: gone
    probes: ['p:g/fib hv_fib n=%di:s32']
";

/// Line 3, column 13: the bracket is never closed.
const BROKEN_SYNTAX: &str = "\
policies:
  - name: early
    probes: [ 'p:e/add hv_add'
";

/// Line 6, column 9: probe 2 of `early` names no symbol of the guest.
const UNKNOWN_SYMBOL: &str = "\
policies:
  - name: early
    probes:
      - 'p:e/add hv_add'
      - 'p:e/fib hv_fib'
      - 'p:e/nope no_such_function'
";

/// e/add stays, e/open goes, e/fib comes; `gone` goes; `new` comes.
const SECOND: &str = "\
policies:
  - name: early
    tags: {team: secops, stage: two}
    probes:
      - 'p:e/add hv_add'
      - 'p:e/fib hv_fib'
  - name: new
    probes: ['p:n/open hv_open_file']
";

#[test]
fn policy_files_load_before_boot_and_reload_by_sighup_all_or_nothing() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("policy.yaml");
    std::fs::write(&file, FIRST).unwrap();
    let run = Run::start(tmp.path(), &["--policy", file.to_str().unwrap()]);
    let log = run.log();
    assert!(
        log.contains("hvprobe: policy early (2 probes, enabled) from"),
        "{log}"
    );
    // Early probes: in place before the first guest instruction.
    wait_for("early probes to fire", || {
        let p = run.probes();
        p["e/add"].hits > 0 && p["e/open"].hits > 0 && p["g/fib"].hits > 0
    });
    let pol = run.policies();
    assert_eq!(pol.keys().collect::<Vec<_>>(), ["early", "gone"]);
    assert_eq!(pol["early"].probes.len(), 2);
    assert_eq!(pol["early"].source, file.display().to_string());
    assert_eq!(pol["early"].tags["team"], "secops");
    assert!(pol["early"].probes.iter().all(|p| p.policy == "early"));

    // A policy loaded over the API (not from the files): SIGHUP leaves it.
    let r = run
        .load("policies:\n  - name: api\n    probes: ['p:a/add hv_add']\n")
        .unwrap();
    assert_eq!((r.probes_added, r.probes_removed, r.probes_kept), (1, 0, 0));
    // An RPC error names the document, line and column, policy and probe.
    let e = run
        .load("policies:\n  - name: api2\n    probes:\n      - 'p:a/x hv_add x=%nope'\n")
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("rpc.yaml:4:9: policy 'api2' probes[0]: BAD_REG_NAME"),
        "{}",
        e.message()
    );
    assert!(!run.policies().contains_key("api2"));

    let ids = |p: &BTreeMap<String, v1::ProbeInfo>| -> BTreeMap<String, (u64, String)> {
        p.iter()
            .map(|(k, v)| (k.clone(), (v.id, v.definition.clone())))
            .collect()
    };
    let before = run.probes();
    let pol_before: Vec<String> = run.policies().into_keys().collect();

    // A file that does not parse: nothing changes, the log says where.
    std::fs::write(&file, BROKEN_SYNTAX).unwrap();
    let line = run.hup(1);
    let want = format!("hvprobe: reload: {}:3:13: ", file.display());
    assert!(line.starts_with(&want), "{line}");
    assert!(
        line.ends_with("; the running policies are unchanged"),
        "{line}"
    );
    assert_eq!(ids(&run.probes()), ids(&before));
    assert_eq!(run.policies().into_keys().collect::<Vec<_>>(), pol_before);

    // One that parses but names an unknown symbol: the same.
    std::fs::write(&file, UNKNOWN_SYMBOL).unwrap();
    let line = run.hup(2);
    let want = format!(
        "hvprobe: reload: {}:6:9: policy 'early' probes[2]: BAD_PROBE_ADDR: symbol \
         'no_such_function' not found at position 9; the running policies are unchanged",
        file.display()
    );
    assert_eq!(line, want);
    assert_eq!(ids(&run.probes()), ids(&before));
    assert!(!run.probes().contains_key("e/fib"), "e/fib was not added");

    // A good file: the difference is applied.
    std::fs::write(&file, SECOND).unwrap();
    let line = run.hup(3);
    assert_eq!(
        line,
        "hvprobe: reload: 2 policies (1 deleted): 2 probes added, 2 removed, 1 unchanged"
    );
    let after = run.probes();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["a/add", "e/add", "e/fib", "n/open"]
    );
    // The unchanged probe kept its id and its counters.
    assert_eq!(after["e/add"].id, before["e/add"].id);
    assert!(after["e/add"].hits >= before["e/add"].hits);
    assert_eq!(after["a/add"].id, before["a/add"].id);
    let pol = run.policies();
    assert_eq!(pol.keys().collect::<Vec<_>>(), ["api", "early", "new"]);
    assert_eq!(pol["early"].tags["stage"], "two");
    assert_eq!(pol["early"].generation, 2);
    // Hits of e/open (removed) stay the policy's: what the policy counts
    // beyond its live probes is e/open's final count, the same in every
    // listing.
    let retired = |p: &v1::PolicyInfo| p.hits - p.probes.iter().map(|p| p.hits).sum::<u64>();
    assert!(retired(&pol["early"]) >= before["e/open"].hits);
    std::thread::sleep(Duration::from_millis(300));
    let later = run.policies();
    assert_eq!(retired(&later["early"]), retired(&pol["early"]));
    assert!(
        later["early"].hits > pol["early"].hits,
        "its live probes still count"
    );
    // The new probes are live.
    wait_for("e/fib and n/open to fire", || {
        let p = run.probes();
        p["e/fib"].hits > 0 && p["n/open"].hits > 0
    });

    // The CLI: list, a load error with its position, delete.
    let server = run.server_arg();
    let (code, out, err) = common::hvprobe_cli(&["policy", "--server", &server, "list"]);
    assert_eq!(code, 0, "{err}");
    for name in ["api", "early", "new"] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name}: {out}");
    }
    let (code, out, _) = common::hvprobe_cli(&["policy", "--server", &server, "list", "--json"]);
    assert_eq!(code, 0);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["name"], "api");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, BROKEN_SYNTAX).unwrap();
    let (code, _, err) =
        common::hvprobe_cli(&["policy", "--server", &server, "load", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("InvalidArgument: {}:3:13: ", bad.display())),
        "{err}"
    );
    let (code, out, err) = common::hvprobe_cli(&["policy", "--server", &server, "delete", "api"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("deleted api\t1 probes"), "{out}");
    assert!(!run.probes().contains_key("a/add"));
    let (code, out, err) = common::hvprobe_cli(&[
        "policy",
        "--server",
        &server,
        "load",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("probes: 0 added, 0 removed, 3 unchanged"),
        "{out}"
    );
    let mut run = run;
    run.terminate();
}

const LIMITED: &str = "\
policies:
  - name: per-task
    enabled: false
    rate_limit: {events: 20, per: 1s, scope: task}
    probes: ['p:lt/fib hv_fib']
  - name: per-process
    enabled: false
    rate_limit: {events: 20, per: 1s, scope: process}
    probes: ['p:lp/fib hv_fib']
  - name: global
    enabled: false
    tags: {limit: global}
    rate_limit: {events: 20, per: 1s, scope: global}
    probes: ['p:lg/fib hv_fib']
  - name: unlimited
    enabled: false
    probes: ['p:lu/add hv_add']
";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn rate_limits_count_every_drop_in_each_scope() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let run = Run::start(tmp.path(), &["--metrics", &format!("tcp:127.0.0.1:{port}")]);
    // A stream with room for everything, open before the probes exist: it
    // sees every event the policies let through.
    let mut c = run.client();
    let mut stream = run
        .rt
        .block_on(c.subscribe(v1::SubscribeRequest {
            queue_capacity: 1 << 20,
            max_batch_delay_ms: 5,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    // Created disabled, then enabled by a second load: no hit can land
    // between a probe's registration and its policy taking it.
    let r = run.load(LIMITED).unwrap();
    assert_eq!(r.probes_added, 4);
    let r = run
        .load(&LIMITED.replace("enabled: false", "enabled: true"))
        .unwrap();
    assert_eq!((r.probes_added, r.probes_removed, r.probes_kept), (0, 0, 4));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let mut c2 = run.client();
    run.rt.block_on(c2.disarm(v1::DisarmRequest {})).unwrap();
    let secs = started.elapsed().as_secs_f64();
    // Drain until the stream is quiet.
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost = 0;
    run.rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                Ok(Ok(Some(m))) => match m.payload {
                    Some(Payload::Events(b)) => {
                        for e in b.events {
                            if e.policy == "global" {
                                assert_eq!(e.tags.get("limit").map(String::as_str), Some("global"));
                            }
                            *got.entry(e.policy).or_default() += 1;
                        }
                    }
                    Some(Payload::Lost(l)) => lost += l.count,
                    _ => {}
                },
                Ok(other) => panic!("stream ended: {other:?}"),
                Err(_) => break,
            }
        }
    });
    assert_eq!(lost, 0);
    let pol = run.policies();
    let probes = run.probes();
    let metrics = scrape(port);
    // Windows of 1 s the run touched: at most 20 events in each.
    let windows = secs.ceil() + 1.0;
    for name in ["per-task", "per-process", "global", "unlimited"] {
        let p = &pol[name];
        assert_eq!(p.probes.len(), 1);
        assert_eq!(p.probes[0].dropped, 0, "{name}: no queue was full");
        assert!(p.hits > 0, "{name}");
        assert_eq!(
            p.hits,
            p.events + p.rate_limited,
            "{name}: every hit passed or was counted as rate-limited"
        );
        assert_eq!(
            got.get(name).copied().unwrap_or(0),
            p.events,
            "{name}: the stream got exactly the events the policy let through"
        );
        for (metric, want) in [
            ("hits", p.hits),
            ("events", p.events),
            ("rate_limited", p.rate_limited),
        ] {
            let key = format!("hvprobe_policy_{metric}_total{{policy=\"{name}\"}}");
            assert_eq!(metrics.get(&key).copied(), Some(want as f64), "{key}");
        }
        if name == "unlimited" {
            assert_eq!(p.rate_limited, 0);
            continue;
        }
        let limit = p.rate_limit.as_ref().unwrap();
        assert_eq!((limit.events, limit.window_ms), (20, 1000));
        assert!(p.rate_limited > 0, "{name}: {} hits in {secs:.1} s", p.hits);
        // The test guest's DWARF-less kernel gives no task: the task and
        // process scopes count all its events under one key, like global.
        assert!(
            (p.events as f64) <= 20.0 * windows && p.events >= 20,
            "{name}: {} events in {secs:.1} s",
            p.events
        );
    }
    assert_eq!(
        pol["per-task"].rate_limit.as_ref().unwrap().scope,
        v1::RateLimitScope::Task as i32
    );
    assert_eq!(
        pol["per-process"].rate_limit.as_ref().unwrap().scope,
        v1::RateLimitScope::Process as i32
    );
    assert!(probes.contains_key("lg/fib"));
    // Without --policy files SIGHUP (`systemctl reload`) only says so.
    assert_eq!(
        run.hup(1),
        "hvprobe: reload: no --policy files, nothing to reload"
    );
    let mut run = run;
    run.terminate();
}
