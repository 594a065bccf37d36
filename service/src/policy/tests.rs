//! Loads, diffs and rate limits against the real engine over a fake VM
//! that holds the test guest's image in flat RAM with paging off (as
//! before boot): registration plants and restores real `int3`s, and hits
//! are the engine's own breakpoint handler run on a fake vCPU at the probe.

use std::collections::BTreeMap;
use std::sync::Arc;

use guest_access::fake::{FakeMemory, FakeVcpu, FakeVm};
use guest_access::{BreakpointAction, GuestMemory, Regs};
use introspect::{Engine, EngineConfig, KERNEL_TEXT_MAP};
use object::{Object, ObjectSegment};
use proto::v1::{self, subscribe_response::Payload};
use tokio_stream::StreamExt;

use super::{doc, PolicyDef};
use crate::{Guest, HvProbeService, ServiceConfig, Symbols};

struct Rig {
    svc: HvProbeService,
    engine: Arc<Engine>,
    vm: Arc<FakeVm>,
    symbols: Arc<Symbols>,
}

fn rig() -> Rig {
    rig_with(ServiceConfig::default())
}

fn rig_with(config: ServiceConfig) -> Rig {
    let file = object::File::parse(test_guest::kernel_image()).unwrap();
    // Kernel text at its link address is physical address + KERNEL_TEXT_MAP
    // (the boot code is linked at its physical address).
    let gpa = |a: u64| a.checked_sub(KERNEL_TEXT_MAP).unwrap_or(a);
    let end = file
        .segments()
        .map(|s| gpa(s.address()) + s.size())
        .max()
        .unwrap();
    let mut ram = vec![0u8; usize::try_from(end).unwrap() + 4096];
    for s in file.segments() {
        let data = s.data().unwrap();
        let at = usize::try_from(gpa(s.address())).unwrap();
        ram[at..at + data.len()].copy_from_slice(data);
    }
    let mem = FakeMemory::new(ram.len());
    mem.write_phys(0, &ram).unwrap();
    let vm = Arc::new(FakeVm::new(mem, 1));
    let symbols = Arc::new(Symbols::from_vmlinux(test_guest::kernel_path()).unwrap());
    let engine = Engine::new(vm.clone(), symbols.clone(), EngineConfig::for_vcpus(1));
    let guest = Guest::new(vm.clone());
    guest.set_state(v1::GuestState::Running);
    let svc = HvProbeService::new(engine.clone(), symbols.clone(), guest, config);
    Rig {
        svc,
        engine,
        vm,
        symbols,
    }
}

impl Rig {
    /// `n` hits of the probe at `symbol`'s entry (its int3 is after the
    /// entry's ftrace nop).
    fn hit(&self, symbol: &str, n: usize) {
        let entry = self.symbols.lookup(symbol).unwrap();
        let addr = self
            .engine
            .list()
            .iter()
            .find(|p| p.address == entry)
            .map_or(entry, |p| p.site);
        for _ in 0..n {
            let mut vcpu = FakeVcpu::new(
                0,
                Regs {
                    rip: addr,
                    rdi: 5,
                    rsp: 0x8000,
                    rflags: 0x2,
                    ..Default::default()
                },
            );
            let a = vcpu.hit(&*self.engine, &*self.vm);
            assert_eq!(a, BreakpointAction::Resume);
            assert_ne!(vcpu.regs.rip, addr, "the displaced instruction ran");
        }
    }

    fn load(&self, text: &str) -> Result<super::LoadReport, tonic::Status> {
        let defs = doc::parse("t.yaml", text)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        self.svc.apply_policies(&defs, &[])
    }

    fn policies(&self) -> BTreeMap<String, v1::PolicyInfo> {
        self.svc
            .list_policies()
            .unwrap()
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect()
    }

    /// The byte where an entry probe on `symbol` has its int3: after the
    /// function's 5-byte ftrace nop (the test guest's C functions all start
    /// with one).
    fn byte_at(&self, symbol: &str) -> u8 {
        let addr = self.symbols.lookup(symbol).unwrap() + 5;
        self.vm.mem().read_vec(addr - KERNEL_TEXT_MAP, 1)[0]
    }
}

const V1: &str = "
policies:
  - name: a
    probes:
      - 'p:a/fib hv_fib n=%di:s32'
      - 'p:a/add hv_add'
  - name: b
    tags: {k: v}
    probes:
      - 'p:b/open hv_open_file'
";

#[test]
fn reload_applies_the_difference_and_keeps_counters() {
    let r = rig();
    let rep = r.load(V1).unwrap();
    assert_eq!((rep.added, rep.removed, rep.kept), (3, 0, 0));
    assert_eq!(r.byte_at("hv_fib"), 0xcc);
    r.hit("hv_fib", 7);
    r.hit("hv_add", 2);
    let p = r.policies();
    assert_eq!(p["a"].hits, 9);
    assert_eq!(p["a"].generation, 1);
    assert_eq!(p["b"].tags.get("k").map(String::as_str), Some("v"));
    let fib_id = p["a"].probes[0].id;
    // hv_add leaves a; a filter on fib makes it another probe; c is new;
    // b is not named, so it stays as it is.
    let rep = r
        .load(
            "
policies:
  - name: a
    probes:
      - 'p:a/fib hv_fib n=%di:s32'
      - 'p:a/fib2 hv_fib n=%di:s32'
  - name: c
    probes: ['p:c/add hv_add']
",
        )
        .unwrap();
    assert_eq!((rep.added, rep.removed, rep.kept), (2, 1, 1));
    let p = r.policies();
    assert_eq!(p["a"].probes[0].id, fib_id, "unchanged probe kept its id");
    assert_eq!(p["a"].probes[0].hits, 7, "and its counters");
    assert_eq!(p["a"].hits, 9, "the removed probe's hits stay the policy's");
    assert_eq!(p["a"].generation, 2);
    assert_eq!(p["a"].probes.len(), 2);
    assert!(p.contains_key("b") && p.contains_key("c"));
    // The same document again changes nothing.
    let rep = r
        .load("policies:\n  - name: c\n    probes: ['p:c/add hv_add']\n")
        .unwrap();
    assert_eq!((rep.added, rep.removed, rep.kept), (0, 0, 1));
    assert_eq!(r.policies()["c"].generation, 1);
    // Deleting a policy restores the guest's text where no probe is left.
    let open_byte = r.byte_at("hv_open_file");
    assert_eq!(open_byte, 0xcc);
    r.svc.apply_policies(&[], &["b".into()]).unwrap();
    assert_ne!(r.byte_at("hv_open_file"), 0xcc);
    assert!(!r.policies().contains_key("b"));
}

#[test]
fn a_failing_load_changes_nothing() {
    let r = rig();
    r.load(V1).unwrap();
    r.hit("hv_fib", 3);
    let before = r.policies();
    let probes_before = r.engine.list();
    // The second policy's second probe names no symbol: the error says
    // where, and a's changes are not applied either.
    let e = r
        .load(
            "
policies:
  - name: a
    probes: ['p:a/other hv_many_args']
  - name: d
    probes:
      - 'p:d/ok hv_add'
      - 'p:d/bad no_such_symbol'
",
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .starts_with("t.yaml:8:9: policy 'd' probes[1]: BAD_PROBE_ADDR"),
        "{}",
        e.message()
    );
    // A probe the engine refuses (not an instruction boundary) after it
    // parsed and resolved: the batch rolls back.
    let e = r
        .load("policies:\n  - name: a\n    probes: ['p:a/fib3 hv_fib+1', 'p:a/add hv_add']\n")
        .unwrap_err();
    assert!(
        e.message().contains("probes[0]: BAD_INSN_BNDRY"),
        "{}",
        e.message()
    );
    let after = r.policies();
    assert_eq!(before, after);
    assert_eq!(probes_before, r.engine.list());
    assert_eq!(after["a"].probes[0].hits, 3);
    assert_ne!(r.byte_at("hv_many_args"), 0xcc);
}

#[test]
fn a_refused_replacement_of_the_same_name_puts_the_old_probe_back() {
    let r = rig();
    r.load(V1).unwrap();
    // a/fib redefined at a point the engine refuses: the old a/fib had to
    // go first (names are unique), and comes back.
    let e = r
        .load("policies:\n  - name: a\n    probes: ['p:a/fib hv_fib+1', 'p:a/add hv_add']\n")
        .unwrap_err();
    assert!(
        e.message().contains("probes[0]: BAD_INSN_BNDRY"),
        "{}",
        e.message()
    );
    let p = r.policies();
    let defs: Vec<&str> = p["a"]
        .probes
        .iter()
        .map(|p| p.definition.as_str())
        .collect();
    assert_eq!(defs, ["p:a/fib hv_fib n=%di:s32", "p:a/add hv_add"]);
    assert_eq!(r.engine.list().len(), 3);
    assert_eq!(r.byte_at("hv_fib"), 0xcc);
    r.hit("hv_fib", 2);
    assert_eq!(r.policies()["a"].hits, 2);
}

#[test]
fn a_new_filter_keeps_the_probe_and_its_counters() {
    let r = rig();
    r.load(V1).unwrap();
    r.hit("hv_fib", 4);
    let id = r.policies()["a"].probes[0].id;
    let rep = r
        .load(
            "
policies:
  - name: a
    filter: 'cpu < 64'
    probes:
      - 'p:a/fib hv_fib n=%di:s32'
      - 'p:a/add hv_add'
",
        )
        .unwrap();
    assert_eq!(
        (rep.added, rep.removed, rep.kept, rep.refiltered),
        (0, 0, 2, 2)
    );
    let p = r.policies();
    assert_eq!(p["a"].probes[0].id, id);
    assert_eq!(p["a"].probes[0].hits, 4);
    assert_eq!(p["a"].probes[0].filter, "cpu < 64");
    assert_eq!(p["a"].filter, "cpu < 64");
    // A filter that names no field of the probe is refused, nothing changes.
    let e = r
        .load("policies:\n  - name: a\n    filter: 'nope == 1'\n    probes: ['p:a/fib hv_fib n=%di:s32']\n")
        .unwrap_err();
    assert!(
        e.message()
            .starts_with("t.yaml:4:14: policy 'a' probes[0]: FIELD_NOT_FOUND"),
        "{}",
        e.message()
    );
    assert_eq!(r.policies()["a"].probes.len(), 2);
    // Disabling the policy disables its probes in place.
    r.load("policies:\n  - name: a\n    enabled: false\n    filter: 'cpu < 64'\n    probes: ['p:a/fib hv_fib n=%di:s32', 'p:a/add hv_add']\n")
        .unwrap();
    let p = r.policies();
    assert!(!p["a"].enabled);
    assert_eq!(p["a"].probes[0].id, id);
    assert!(p["a"].probes.iter().all(|p| !p.enabled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn rate_limit_drops_are_counted_once_however_many_subscribers() {
    let r = Arc::new(rig());
    let sub = |r: &Rig| {
        r.svc
            .subscribe_stream(v1::SubscribeRequest {
                max_batch_delay_ms: 1,
                ..Default::default()
            })
            .unwrap()
    };
    let (s1, s2) = (sub(&r), sub(&r));
    r.load(
        "
policies:
  - name: lim
    tags: {team: t}
    rate_limit: {events: 4, per: 1h, scope: global}
    probes: ['p:lim/fib hv_fib n=%di:s32']
  - name: free
    probes: ['p:free/add hv_add']
",
    )
    .unwrap();
    let r2 = r.clone();
    tokio::task::spawn_blocking(move || {
        r2.hit("hv_fib", 10);
        r2.hit("hv_add", 3);
    })
    .await
    .unwrap();
    let p = r.policies();
    assert_eq!(
        (p["lim"].hits, p["lim"].events, p["lim"].rate_limited),
        (10, 4, 6)
    );
    assert_eq!(
        (p["free"].hits, p["free"].events, p["free"].rate_limited),
        (3, 3, 0)
    );
    // Each subscriber got the same 4 + 3 events, with policy and tags.
    for s in [s1, s2] {
        tokio::pin!(s);
        let mut got = Vec::new();
        while got.len() < 7 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
                .await
                .expect("events")
                .unwrap()
                .unwrap();
            if let Some(Payload::Events(b)) = m.payload {
                got.extend(b.events);
            }
        }
        assert_eq!(got.len(), 7);
        let lim: Vec<_> = got.iter().filter(|e| e.policy == "lim").collect();
        assert_eq!(lim.len(), 4);
        assert!(lim
            .iter()
            .all(|e| e.tags.get("team").map(String::as_str) == Some("t")));
        assert_eq!(got.iter().filter(|e| e.policy == "free").count(), 3);
    }
    // A load that keeps the limit keeps its window (4 already passed); one
    // that changes it starts afresh. (A stream must select the probe for
    // its hits to be fetched and decided.)
    let _s3 = sub(&r);
    let doc = |limit: u32, team: &str| {
        format!(
            "policies:\n  - name: lim\n    tags: {{team: {team}}}\n    rate_limit: {{events: {limit}, per: 1h, scope: global}}\n    probes: ['p:lim/fib hv_fib n=%di:s32']\n"
        )
    };
    r.load(&doc(4, "u")).unwrap();
    let r2 = r.clone();
    tokio::task::spawn_blocking(move || r2.hit("hv_fib", 3))
        .await
        .unwrap();
    let p = r.policies();
    assert_eq!((p["lim"].events, p["lim"].rate_limited), (4, 9));
    assert_eq!(p["lim"].tags["team"], "u");
    r.load(&doc(5, "u")).unwrap();
    let r2 = r.clone();
    tokio::task::spawn_blocking(move || r2.hit("hv_fib", 7))
        .await
        .unwrap();
    let p = r.policies();
    assert_eq!(
        (p["lim"].hits, p["lim"].events, p["lim"].rate_limited),
        (20, 9, 11)
    );
    // The metrics say the same.
    let text = r.svc.metrics().render(false);
    for line in [
        "hvprobe_policy_hits_total{policy=\"lim\"} 20",
        "hvprobe_policy_events_total{policy=\"lim\"} 9",
        "hvprobe_policy_rate_limited_total{policy=\"lim\"} 11",
        "hvprobe_policy_rate_limited_total{policy=\"free\"} 0",
        "hvprobe_policy_probes{policy=\"lim\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
}

/// Every probe of `text` parses, and its filter names only its fields
/// (what a load checks before it resolves symbols).
fn check_definitions(source: &str, text: &str) -> Vec<PolicyDef> {
    let defs = doc::parse(source, text).unwrap_or_else(|e| panic!("{e}"));
    for d in &defs {
        for (i, p) in d.probes.iter().enumerate() {
            let line = match &p.definition.definition {
                Some(v1::probe_definition::Definition::KprobeEvents(l)) => l.clone(),
                Some(v1::probe_definition::Definition::Spec(s)) => proto::spec_to_line(s).unwrap(),
                None => unreachable!(),
            };
            let pd = match probe_spec::parse_command(&line) {
                Ok(probe_spec::Command::Add(pd)) => pd,
                other => panic!("{}: {line}: {other:?}", d.probe_context(i)),
            };
            if p.definition.filter.is_empty() {
                continue;
            }
            let f = probe_spec::Filter::parse(&p.definition.filter)
                .unwrap_or_else(|e| panic!("{}: {e:?}", d.probe_context(i)));
            let args: Vec<(String, Option<probe_spec::FieldKind>)> = pd
                .args
                .iter()
                .map(|a| (a.name.clone(), crate::catalog::arg_field_kind(&a.ty)))
                .collect();
            let ret = pd.kind.is_return();
            f.check(&|name: &str| crate::catalog::probe_field_kind(&args, ret, name))
                .unwrap_or_else(|e| panic!("{}: {e:?}", d.probe_context(i)));
        }
    }
    defs
}

#[test]
fn the_deploy_example_is_a_valid_policy_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/policy-example.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let defs = check_definitions(path, &text);
    let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["etc-opens", "failed-opens", "execs"]);
    assert_eq!(
        defs[0].rate_limit.map(|r| r.scope),
        Some(super::Scope::Process)
    );
    assert_eq!(
        defs[1].rate_limit.map(|r| r.scope),
        Some(super::Scope::Global)
    );
    assert!(!defs[2].enabled);
}

#[test]
fn the_kubernetes_config_map_holds_the_deploy_example() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/");
    let k8s = std::fs::read_to_string(format!("{dir}kubernetes.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = k8s
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment"]);
    let text = docs[0]["data"]["policy.yaml"].as_str().unwrap();
    let in_map = check_definitions("policy.yaml", text);
    let example = std::fs::read_to_string(format!("{dir}policy-example.yaml")).unwrap();
    let example = doc::parse("policy.yaml", &example).unwrap();
    let strip = |v: Vec<PolicyDef>| -> Vec<PolicyDef> {
        v.into_iter()
            .map(|mut d| {
                d.pos = None;
                d.probes.iter_mut().for_each(|p| p.pos = None);
                d
            })
            .collect()
    };
    assert_eq!(strip(in_map), strip(example));
    // The Deployment passes the ConfigMap's file with --policy.
    let c = &docs[1]["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--policy=/etc/hvprobe/policy/policy.yaml"),
        "{args:?}"
    );
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"] == "/etc/hvprobe/policy"));
}

/// An `override` hit of `hv_may_fail` called with `n`, on a fake vCPU whose
/// stack holds `ret`: (RAX, RIP) after the hit.
fn override_hit(r: &Rig, n: u64) -> (u64, u64) {
    const RET: u64 = 0x1234_5678;
    const STACK: u64 = 0x8000;
    let entry = r.symbols.lookup(test_guest::OVERRIDE_FUNCTION).unwrap();
    let site = r
        .engine
        .list()
        .iter()
        .find(|p| p.address == entry)
        .map(|p| p.site)
        .expect("a probe at hv_may_fail");
    r.vm.mem().write_phys(STACK, &RET.to_le_bytes()).unwrap();
    let mut vcpu = FakeVcpu::new(
        0,
        Regs {
            rip: site,
            rdi: n,
            rax: 0xdead,
            rsp: STACK,
            rflags: 0x2,
            ..Default::default()
        },
    );
    assert_eq!(vcpu.hit(&*r.engine, &*r.vm), BreakpointAction::Resume);
    (vcpu.regs.rax, vcpu.regs.rip)
}

fn action_of(r: &Rig, policy: &str) -> Option<String> {
    r.policies()[policy].probes[0]
        .action
        .as_ref()
        .map(proto::format_action)
}

#[test]
fn policy_actions_need_allow_actions_and_are_part_of_a_probe_identity() {
    const OVERRIDE: &str = "
policies:
  - name: deny
    action: 'override:-13'
    probes:
      - kprobe_events: 'p:deny/mf hv_may_fail n=%di:s64'
        filter: 'n < 50'
";
    // Without --allow-actions the load is refused, and says where.
    let plain = rig();
    let e = plain.load(OVERRIDE).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .starts_with("t.yaml:6:9: policy 'deny' probes[0]")
            && e.message().contains("--allow-actions"),
        "{}",
        e.message()
    );
    assert!(plain.policies().is_empty());

    let r = rig_with(ServiceConfig {
        allow_actions: true,
        ..ServiceConfig::default()
    });
    r.load(OVERRIDE).unwrap();
    assert_eq!(action_of(&r, "deny").as_deref(), Some("override:-13"));
    let id = r.policies()["deny"].probes[0].id;
    // The filter gates the action: n = 7 returns at once with -13, n = 70
    // runs the function (RIP past the int3, RAX untouched).
    assert_eq!(override_hit(&r, 7), ((-13i64) as u64, 0x1234_5678));
    let (rax, rip) = override_hit(&r, 70);
    assert_eq!(rax, 0xdead);
    assert_ne!(rip, 0x1234_5678);
    assert_eq!(r.policies()["deny"].probes[0].actions, 1);

    // The same load again keeps the probe.
    let rep = r.load(OVERRIDE).unwrap();
    assert_eq!((rep.added, rep.removed, rep.kept), (0, 0, 1));
    assert_eq!(r.policies()["deny"].probes[0].id, id);

    // Another value is another probe (the engine holds the action).
    let rep = r.load(&OVERRIDE.replace("-13", "-9")).unwrap();
    assert_eq!((rep.added, rep.removed, rep.refiltered), (1, 1, 0));
    assert_ne!(r.policies()["deny"].probes[0].id, id);
    assert_eq!(override_hit(&r, 7), ((-9i64) as u64, 0x1234_5678));

    // A new filter on a probe with an action replaces it too: its gate
    // changes with it.
    let rep = r.load(&OVERRIDE.replace("n < 50", "n < 5")).unwrap();
    assert_eq!((rep.added, rep.removed, rep.refiltered), (1, 1, 0));
    assert_eq!(override_hit(&r, 7).0, 0xdead, "n = 7 no longer passes");
    assert_eq!(override_hit(&r, 3).0, (-13i64) as u64);

    // A probe's own `action: none` leaves the policy's: a plain probe.
    r.load(&OVERRIDE.replace(
        "        filter: 'n < 50'",
        "        filter: 'n < 50'\n        action: none",
    ))
    .unwrap();
    assert_eq!(action_of(&r, "deny"), None);
    assert_eq!(override_hit(&r, 7).0, 0xdead);

    // A refused action (override inside the function) changes nothing.
    let before = r.policies()["deny"].probes[0].id;
    let e = r
        .load("policies:\n  - name: deny\n    action: 'override:1'\n    probes: ['p:deny/mf hv_may_fail+1']\n")
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(r.policies()["deny"].probes[0].id, before);
    assert_eq!(action_of(&r, "deny"), None);
}

/// A probe the engine has armed but the service has not named yet (inside
/// CreateProbe, between registration and naming): its hits reach no stream,
/// and a stream that takes every probe counts them as lost, with their
/// reason; one that names groups cannot know it wants them.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn hits_of_a_probe_not_yet_named_are_counted_lost_by_streams_taking_all() {
    let r = Arc::new(rig());
    let all = r
        .svc
        .subscribe_stream(v1::SubscribeRequest {
            max_batch_delay_ms: 1,
            ..Default::default()
        })
        .unwrap();
    let by_group = r
        .svc
        .subscribe_stream(v1::SubscribeRequest {
            max_batch_delay_ms: 1,
            groups: vec!["early".into()],
            ..Default::default()
        })
        .unwrap();
    let def = v1::ProbeDefinition {
        definition: Some(v1::probe_definition::Definition::KprobeEvents(
            "p:early/fib hv_fib n=%di:s32".into(),
        )),
        ..Default::default()
    };
    let prepared = r.svc.inner.prepare(&def, None).unwrap();
    r.engine.register_batch(vec![prepared.request]).unwrap();
    let r2 = r.clone();
    tokio::task::spawn_blocking(move || r2.hit("hv_fib", 5))
        .await
        .unwrap();
    tokio::pin!(all);
    let mut lost = Vec::new();
    while lost.iter().map(|l: &v1::LostEvents| l.count).sum::<u64>() < 5 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), all.next())
            .await
            .expect("a lost record")
            .unwrap()
            .unwrap();
        match m.payload {
            Some(Payload::Lost(l)) => lost.push(l),
            Some(Payload::Events(b)) => panic!("events of an unnamed probe: {b:?}"),
            _ => {}
        }
    }
    assert!(lost
        .iter()
        .all(|l| l.reason == v1::LostReason::ProbeNotYetNamed as i32));
    assert_eq!(lost.iter().map(|l| l.count).sum::<u64>(), 5);
    tokio::pin!(by_group);
    while let Ok(m) =
        tokio::time::timeout(std::time::Duration::from_millis(200), by_group.next()).await
    {
        let p = m.unwrap().unwrap().payload;
        assert!(
            matches!(p, Some(Payload::Started(_))),
            "a group stream got {p:?}"
        );
    }
}
