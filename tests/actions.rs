//! Probe actions on the test guest through the gRPC API: `override` makes
//! the callers of `hv_may_fail` see the value (`hvtest.override`: the guest
//! counts the overridden calls and the function's own runs) and nothing
//! else changes; `freeze` holds both vCPUs until Resume while the API and
//! the event stream go on; `snapshot` writes one snapshot per rate-limit
//! window, at a hit, that restores. Refusals: no `--allow-actions`, a void
//! function, a non-entry offset, a return probe, a second override.

mod grpc_harness;

use std::time::{Duration, Instant};

use grpc_harness::common::{hash_range, text_range};
use grpc_harness::*;
use proto::v1::{self, action_taken::Taken, probe_action::Action, subscribe_response::Payload};
use service::ServiceConfig;
use tonic::Code;

type Client = v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>;

fn allowed() -> ServiceConfig {
    ServiceConfig {
        allow_actions: true,
        ..Default::default()
    }
}

fn def(line: &str, filter: &str, action: Option<Action>) -> v1::ProbeDefinition {
    v1::ProbeDefinition {
        definition: Some(v1::probe_definition::Definition::KprobeEvents(line.into())),
        filter: filter.into(),
        action: action.map(|a| v1::ProbeAction { action: Some(a) }),
        ..Default::default()
    }
}

fn create(
    h: &Harness,
    c: &mut Client,
    line: &str,
    filter: &str,
    action: Option<Action>,
) -> Result<v1::ProbeInfo, tonic::Status> {
    h.rt.block_on(c.create_probe(v1::CreateProbeRequest {
        definition: Some(def(line, filter, action)),
    }))
    .map(|r| r.into_inner().probe.unwrap())
}

fn client(h: &Harness) -> Client {
    h.rt.block_on(service::client::connect(&h.listen()))
        .unwrap()
}

fn guest_info(h: &Harness, c: &mut Client) -> v1::GetGuestInfoResponse {
    h.rt.block_on(c.get_guest_info(v1::GetGuestInfoRequest {}))
        .unwrap()
        .into_inner()
}

fn probe(h: &Harness, c: &mut Client, id: u64) -> v1::ProbeInfo {
    h.rt.block_on(c.list_probes(v1::ListProbesRequest {
        ids: vec![id],
        ..Default::default()
    }))
    .unwrap()
    .into_inner()
    .probes
    .pop()
    .unwrap()
}

/// A stream of the events of `ids` (every probe's when empty).
fn collect(h: &Harness, c: &mut Client, ids: Vec<u64>) -> tonic::Streaming<v1::SubscribeResponse> {
    h.rt.block_on(c.subscribe(v1::SubscribeRequest {
        probe_ids: ids,
        ..Default::default()
    }))
    .unwrap()
    .into_inner()
}

fn next_events(
    h: &Harness,
    s: &mut tonic::Streaming<v1::SubscribeResponse>,
    want: usize,
    timeout: Duration,
) -> Vec<v1::Event> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match h
            .rt
            .block_on(async { tokio::time::timeout(left, s.message()).await })
        {
            Ok(Ok(Some(m))) => match m.payload {
                Some(Payload::Events(b)) => out.extend(b.events),
                Some(Payload::Lost(l)) => panic!("lost events: {l:?}"),
                _ => {}
            },
            _ => break,
        }
    }
    out
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn actions_need_allow_actions() {
    if !kvm_available() {
        return;
    }
    let h = Harness::prepare(ServiceConfig::default(), "console=ttyS0 hvtest.forever");
    let mut c = client(&h);
    let s = create(
        &h,
        &mut c,
        "p:act/fail hv_may_fail",
        "",
        Some(Action::OverrideReturn(-1)),
    )
    .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("--allow-actions"), "{}", s.message());
    // Nothing was created.
    assert!(h.engine.list().is_empty());
}

#[test]
fn override_is_refused_where_it_cannot_be_right() {
    if !kvm_available() {
        return;
    }
    let h = Harness::prepare(allowed(), "console=ttyS0 hvtest.forever");
    let mut c = client(&h);
    let ov = || Some(Action::OverrideReturn(-2));
    let refused = |c: &mut Client, line: &str, code: Code, needle: &str| {
        let s = create(&h, c, line, "", ov()).unwrap_err();
        assert_eq!(s.code(), code, "{line}: {s:?}");
        assert!(s.message().contains(needle), "{line}: {}", s.message());
    };
    refused(
        &mut c,
        "p:act/v hv_note",
        Code::InvalidArgument,
        "'hv_note' returns void",
    );
    refused(
        &mut c,
        "p:act/mid hv_may_fail+5",
        Code::InvalidArgument,
        "override only at a function's entry",
    );
    refused(
        &mut c,
        "r:act/r hv_may_fail",
        Code::InvalidArgument,
        "actions belong on kprobes",
    );
    let addr = grpc_harness::common::symbol("hv_may_fail") + 5;
    refused(
        &mut c,
        &format!("p:act/raw 0x{addr:x}"),
        Code::InvalidArgument,
        "override only at a function's entry",
    );
    // An empty action and a snapshot directory that does not exist.
    let s =
        h.rt.block_on(c.create_probe(v1::CreateProbeRequest {
            definition: Some(v1::ProbeDefinition {
                action: Some(v1::ProbeAction { action: None }),
                ..def("p:act/e hv_may_fail", "", None)
            }),
        }))
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = create(
        &h,
        &mut c,
        "p:act/s hv_may_fail",
        "",
        Some(Action::Snapshot(v1::SnapshotAction {
            dir: "/nonexistent/hvprobe".into(),
        })),
    )
    .unwrap_err();
    assert!(
        s.message()
            .contains("action.snapshot.dir: '/nonexistent/hvprobe'"),
        "{}",
        s.message()
    );
    // One override per function, in separate calls and in one batch.
    create(&h, &mut c, "p:act/one hv_may_fail", "", ov()).unwrap();
    let s = create(&h, &mut c, "p:act/two hv_may_fail n=%di", "", ov()).unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("BAD_ACTION"), "{}", s.message());
    assert!(s.message().contains("already overrides"), "{}", s.message());
    let s =
        h.rt.block_on(c.create_probes(v1::CreateProbesRequest {
            definitions: vec![
                def("p:act/b1 hv_add", "", Some(Action::OverrideReturn(1))),
                def("p:act/b2 hv_add a=%di", "", Some(Action::OverrideReturn(2))),
            ],
        }))
        .unwrap_err();
    assert!(s.message().contains("definition 1"), "{}", s.message());
    // A plain probe beside the override is fine; nothing of the failed
    // batch remains.
    create(&h, &mut c, "p:act/plain hv_may_fail", "", None).unwrap();
    let names: Vec<String> = h.engine.list().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["act/one", "act/plain"]);
}

/// `hvtest.override`: both CPUs call hv_may_fail(0..N); the override (for
/// n < 50 only) must be what the callers see, the function's body must not
/// run for those calls, and every other check of the guest must still pass.
/// A kretprobe on the overridden function reports the overridden value.
#[test]
fn override_makes_callers_see_the_value_and_nothing_else_changes() {
    if !kvm_available() {
        return;
    }
    const N: u64 = 300;
    let mut h = Harness::prepare(
        allowed(),
        &format!("console=ttyS0 hvtest.iters=40 hvtest.override={N}"),
    );
    let text_before = hash_range(h.control.ram(), text_range());
    let mut c = client(&h);
    let ov = create(
        &h,
        &mut c,
        "p:act/fail hv_may_fail n=%di:s64",
        "n < 50",
        Some(Action::OverrideReturn(-7)),
    )
    .unwrap();
    let ret = create(
        &h,
        &mut c,
        "r:act/ret hv_may_fail n=%di:s64 ret=$retval:s64",
        "",
        None,
    )
    .unwrap();
    assert_eq!(
        ov.action.as_ref().and_then(|a| a.action.clone()),
        Some(Action::OverrideReturn(-7))
    );
    let mut s = collect(&h, &mut c, vec![ov.id, ret.id]);
    h.boot();
    let end = h.wait_end(Duration::from_secs(120));
    let console = h.console();
    assert!(
        matches!(end, Some(vmm::RunOutcome::GuestExit { status: 0 })),
        "{end:?}\n{console}"
    );
    assert!(console.contains("done ok cpus=2 iters=40"), "{console}");
    let want = format!(
        "override calls={} overridden=100 body={} value=-7",
        2 * N,
        2 * N - 100
    );
    assert!(console.contains(&want), "want {want}\n{console}");
    // The events: 100 entries (the filter's), each saying what it did; a
    // return for every call, -7 exactly for n < 50.
    let events = next_events(&h, &mut s, 100 + 2 * N as usize, Duration::from_secs(30));
    let (entries, returns): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.probe_id == ov.id);
    assert_eq!(entries.len(), 100);
    for e in &entries {
        let taken = e.action.as_ref().and_then(|a| a.taken.clone());
        assert_eq!(taken, Some(Taken::OverrideReturn(-7)), "{e:?}");
    }
    assert_eq!(returns.len(), 2 * N as usize);
    for e in &returns {
        assert!(e.action.is_none());
        let r = e.ret.as_ref().unwrap();
        let n = match r.entry_args[0]
            .value
            .as_ref()
            .unwrap()
            .kind
            .as_ref()
            .unwrap()
        {
            v1::value::Kind::Signed(v) => v.value,
            other => panic!("{other:?}"),
        };
        let want = if n < 50 { -7 } else { n + 1 };
        assert_eq!(r.retval as i64, want, "n={n}");
    }
    let p = probe(&h, &mut c, ov.id);
    assert_eq!((p.hits, p.actions), (2 * N, 100));
    // Gone again: the text is the guest's own.
    h.rt.block_on(c.delete_probes(v1::DeleteProbesRequest {
        all: true,
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(hash_range(h.control.ram(), text_range()), text_before);
}

/// Both CPUs call the overridden function at once, with no stream open
/// (actions run whether or not anyone reads the event): every call is
/// overridden, the body never runs.
#[test]
fn override_runs_without_subscribers_on_every_vcpu() {
    if !kvm_available() {
        return;
    }
    const N: u64 = 2000;
    let mut h = Harness::prepare(
        allowed(),
        &format!("console=ttyS0 hvtest.iters=5 hvtest.override={N}"),
    );
    let mut c = client(&h);
    let ov = create(
        &h,
        &mut c,
        "p:act/all hv_may_fail",
        "",
        Some(Action::OverrideReturn(0x1234)),
    )
    .unwrap();
    h.boot();
    let end = h.wait_end(Duration::from_secs(180));
    let console = h.console();
    assert!(
        matches!(end, Some(vmm::RunOutcome::GuestExit { status: 0 })),
        "{end:?}\n{console}"
    );
    let want = format!(
        "override calls={} overridden={} body=0 value=4660",
        2 * N,
        2 * N
    );
    assert!(console.contains(&want), "want {want}\n{console}");
    let p = probe(&h, &mut c, ov.id);
    assert_eq!((p.hits, p.actions), (2 * N, 2 * N));
}

/// A freeze on hv_add (both CPUs call it all the time) holds the guest:
/// the guest's own counters stand still, while the API (list, create,
/// delete, guest info, a snapshot) and the event stream go on; a client
/// that goes away leaves it frozen; Resume lets it run again; a second
/// Resume is refused; stopping a frozen guest ends it.
#[test]
fn freeze_holds_every_vcpu_until_resume() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(allowed());
    let mut c = client(&h);
    let fib = create(&h, &mut c, "p:act/fib hv_fib", "", None).unwrap();
    // Created disabled, so the stream (of its events only) is open first.
    let frz =
        h.rt.block_on(c.create_probe(v1::CreateProbeRequest {
            definition: Some(v1::ProbeDefinition {
                create_disabled: true,
                ..def(
                    "p:act/frz hv_add a=%di:s64",
                    "",
                    Some(Action::Freeze(v1::FreezeAction {})),
                )
            }),
        }))
        .unwrap()
        .into_inner()
        .probe
        .unwrap();
    let mut s = collect(&h, &mut c, vec![frz.id]);
    h.rt.block_on(c.enable_probe(v1::EnableProbeRequest {
        probe: Some(v1::ProbeRef {
            r#ref: Some(v1::probe_ref::Ref::Id(frz.id)),
        }),
    }))
    .unwrap();
    wait_for("the freeze", Duration::from_secs(20), || {
        guest_info(&h, &mut c).frozen.is_some()
    });
    let info = guest_info(&h, &mut c);
    let f = info.frozen.unwrap();
    assert_eq!(f.probe_id, frz.id);
    assert!(f.vcpu < 2);
    // The stream carries the freeze (and at most one more hit of it: the
    // other vCPU may have been in hv_add at that moment).
    let events = next_events(&h, &mut s, 3, Duration::from_secs(2));
    let froze: Vec<_> = events
        .iter()
        .filter(|e| e.probe_id == frz.id)
        .map(|e| e.action.as_ref().and_then(|a| a.taken.clone()))
        .collect();
    assert_eq!(froze[0], Some(Taken::Freeze(true)), "{froze:?}");
    assert!(froze.len() <= 2, "{froze:?}");
    if froze.len() == 2 {
        assert_eq!(froze[1], Some(Taken::AlreadyFrozen(true)));
    }
    // Standing still: the guest's counters and the probe's hits.
    let (fib_calls, fib_hits) = (h.counter("hv_fib"), probe(&h, &mut c, fib.id).hits);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(h.counter("hv_fib"), fib_calls);
    assert_eq!(probe(&h, &mut c, fib.id).hits, fib_hits);
    assert!(next_events(&h, &mut s, 1, Duration::from_millis(200)).is_empty());
    // The API works: create and delete stop the world, which the held
    // vCPUs count in; a snapshot of the frozen guest.
    let t = Instant::now();
    let extra = create(&h, &mut c, "p:act/extra hv_lea_first", "", None).unwrap();
    h.rt.block_on(c.delete_probe(v1::DeleteProbeRequest {
        probe: Some(v1::ProbeRef {
            r#ref: Some(v1::probe_ref::Ref::Id(extra.id)),
        }),
    }))
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let snap =
        h.rt.block_on(c.create_snapshot(v1::CreateSnapshotRequest {
            directory: dir.path().join("frozen").display().to_string(),
            stop: false,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(snap.probes, 2);
    assert!(
        guest_info(&h, &mut c).frozen.is_some(),
        "a snapshot thaws nothing"
    );
    // The client goes away: still frozen.
    drop(s);
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let mut c = client(&h);
    assert!(guest_info(&h, &mut c).frozen.is_some());
    assert_eq!(h.counter("hv_fib"), fib_calls);
    // Without the freeze probe, Resume lets it run for good.
    h.rt.block_on(c.delete_probe(v1::DeleteProbeRequest {
        probe: Some(v1::ProbeRef {
            r#ref: Some(v1::probe_ref::Ref::Id(frz.id)),
        }),
    }))
    .unwrap();
    let was =
        h.rt.block_on(c.resume(v1::ResumeRequest {}))
            .unwrap()
            .into_inner()
            .was
            .unwrap();
    assert_eq!(was.probe_id, frz.id);
    wait_for("hv_fib to run again", Duration::from_secs(20), || {
        h.counter("hv_fib") > fib_calls + 10
    });
    assert!(guest_info(&h, &mut c).frozen.is_none());
    let s = h.rt.block_on(c.resume(v1::ResumeRequest {})).unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("not frozen"), "{}", s.message());
    assert_eq!(h.engine.stats().freezes, 1);
    // Frozen again, then the harness stops the guest: it must end.
    create(
        &h,
        &mut c,
        "p:act/frz2 hv_add",
        "",
        Some(Action::Freeze(v1::FreezeAction {})),
    )
    .unwrap();
    wait_for("the second freeze", Duration::from_secs(20), || {
        guest_info(&h, &mut c).frozen.is_some()
    });
    assert!(h.alive());
}

/// A snapshot action on a hot function (hv_fib, thousands of calls a
/// second) writes one snapshot per 5 s window, from a hit, that restores
/// and runs; the other hits say they were rate-limited.
#[test]
fn snapshot_action_is_rate_limited_and_restores() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(allowed());
    let mut c = client(&h);
    let dir = tempfile::tempdir().unwrap();
    let mut s = collect(&h, &mut c, vec![]);
    let snap = create(
        &h,
        &mut c,
        "p:act/snap hv_fib n=%di:s32",
        "n == 5",
        Some(Action::Snapshot(v1::SnapshotAction {
            dir: dir.path().display().to_string(),
        })),
    )
    .unwrap();
    let started = Instant::now();
    let events = next_events(&h, &mut s, 200, Duration::from_secs(20));
    let mut paths = Vec::new();
    let mut limited = 0;
    for e in events.iter().filter(|e| e.probe_id == snap.id) {
        match e.action.as_ref().and_then(|a| a.taken.clone()) {
            Some(Taken::Snapshot(p)) => paths.push(p),
            Some(Taken::Skipped(why)) => {
                assert!(
                    why.contains("rate limit") || why.contains("being written"),
                    "{why}"
                );
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // At most one snapshot per 5 s window in the time the events spanned.
    let windows = 1 + started.elapsed().as_secs() / 5;
    assert!(
        !paths.is_empty() && paths.len() as u64 <= windows,
        "{paths:?} in {windows} windows; {} events, {limited} limited: {:?}",
        events.len(),
        events.first()
    );
    assert!(limited > 0);
    let first = std::path::PathBuf::from(&paths[0]);
    assert!(first.starts_with(dir.path()), "{first:?}");
    wait_for("the snapshot's manifest", Duration::from_secs(30), || {
        first.join("manifest.json").exists()
    });
    // Held while it was written, running again after.
    wait_for("the guest to run on", Duration::from_secs(20), || {
        let a = h.counter("hv_fib");
        std::thread::sleep(Duration::from_millis(100));
        h.counter("hv_fib") > a
    });
    assert!(guest_info(&h, &mut c).frozen.is_none());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        paths.len(),
        "one directory per snapshot taken"
    );
    drop(h);
    // The snapshot restores with no probes and runs on (the test guest's
    // workers keep calling hv_fib).
    let (config, _serial) = grpc_harness::common::test_guest_config(2, "");
    let (vm, _restored) = vmm::Vm::restore(&config, &first).expect("restore");
    let control = vm.control();
    let before = guest_counter(control.ram(), "hv_fib");
    let running = vm
        .start(std::sync::Arc::new(guest_access::NoProbes))
        .unwrap();
    wait_for("the restored guest to run", Duration::from_secs(20), || {
        guest_counter(control.ram(), "hv_fib") > before + 100
    });
    assert!(running.wait_timeout(Duration::ZERO).is_none());
    running.stop();
    running.wait();
}
