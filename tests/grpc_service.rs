//! The server over the test guest through a Rust tonic client: error
//! mapping (codes, kernel-style codes, positions, batch rollback, limits)
//! and a slow subscriber that must never slow the guest down.

mod grpc_harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpc_harness::*;
use proto::v1::{self, subscribe_response::Payload};
use tonic::Code;

fn line(l: &str) -> v1::ProbeDefinition {
    v1::ProbeDefinition {
        definition: Some(v1::probe_definition::Definition::KprobeEvents(l.into())),
        ..Default::default()
    }
}

fn create(l: &str) -> v1::CreateProbeRequest {
    v1::CreateProbeRequest {
        definition: Some(line(l)),
    }
}

#[test]
fn errors_map_to_codes_with_positions() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig {
        max_probes: 3,
        max_subscribers: 1,
        ..Default::default()
    });
    h.rt.block_on(async {
        let mut c = service::client::connect(&h.listen()).await.unwrap();
        let err = |r: Result<tonic::Response<v1::CreateProbeResponse>, tonic::Status>| {
            r.expect_err("must fail")
        };

        let s = err(c.create_probe(create("p:t/bad hv_open_file x=%rsi")).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        let d = proto::definition_error_from_status(&s).expect("details");
        assert_eq!(
            (d.code.as_str(), d.position, d.arg_index),
            ("BAD_REG_NAME", 23, Some(0))
        );
        assert!(
            s.message().contains("at arg 1, position 23"),
            "{}",
            s.message()
        );

        let s = err(c.create_probe(create("p:t/nosym hv_nope")).await);
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        assert!(
            s.message().contains("'hv_nope' not found at position 10"),
            "{}",
            s.message()
        );

        // The test guest has no modules (no `modules` list, no struct
        // module in its DWARF): a module probe says so, naming the point.
        let s = err(c.create_probe(create("p:t/mod ext4:ext4_sync_fs")).await);
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains("NO_MODULES")
                && s.message().contains("'ext4:ext4_sync_fs'")
                && s.message().contains("module"),
            "{}",
            s.message()
        );

        let s = err(c.create_probe(create("p:t/rv hv_fib r=$retval")).await);
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert_eq!(
            proto::definition_error_from_status(&s).unwrap().code,
            "RETVAL_ON_PROBE"
        );

        // hv_fib starts with a 5-byte nop: +1 is inside it.
        let s = err(c.create_probe(create("p:t/mid hv_fib+1")).await);
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        let d = proto::definition_error_from_status(&s).unwrap();
        assert_eq!((d.code.as_str(), d.position), ("BAD_INSN_BNDRY", 8));

        let s = err(c.create_probe(create("r:t/ret hv_fib+5")).await);
        assert!(
            matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument),
            "{s:?}"
        );

        let mut bad_filter = line("p:t/f hv_open_file dfd=%di:s32");
        bad_filter.filter = "dfd == ".into();
        let s = c
            .create_probe(v1::CreateProbeRequest {
                definition: Some(bad_filter),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        let d = proto::definition_error_from_status(&s).unwrap();
        // Quoted as parsed: without the trailing space.
        assert_eq!(d.text, "dfd ==");

        let spec = v1::ProbeDefinition {
            definition: Some(v1::probe_definition::Definition::Spec(
                v1::ProbeSpec::default(),
            )),
            ..Default::default()
        };
        let s = c
            .create_probe(v1::CreateProbeRequest {
                definition: Some(spec),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("spec.location"), "{}", s.message());

        // Batch: the second definition fails, the first is rolled back.
        for (defs, code, idx) in [
            (
                ["p:t/a hv_add", "p:t/b hv_add x=%bogus"],
                Code::InvalidArgument,
                1,
            ),
            (
                ["p:t/a hv_add", "p:t/b hv_fib+2"],
                Code::FailedPrecondition,
                1,
            ),
            (["p:t/a hv_add", "p:t/a hv_fib"], Code::AlreadyExists, 1),
        ] {
            let s = c
                .create_probes(v1::CreateProbesRequest {
                    definitions: defs.iter().map(|l| line(l)).collect(),
                })
                .await
                .unwrap_err();
            assert_eq!(s.code(), code, "{defs:?}: {s:?}");
            let d = proto::definition_error_from_status(&s).expect("batch details");
            assert_eq!(d.batch_index, Some(idx), "{defs:?}");
            assert!(h.engine.list().is_empty(), "{defs:?} left probes behind");
        }

        c.create_probe(create("p:t/one hv_add")).await.unwrap();
        let s = err(c.create_probe(create("p:t/one hv_fib")).await);
        assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
        c.create_probe(create("p:t/two hv_fib")).await.unwrap();
        c.create_probe(create("p:t/three hv_recurse"))
            .await
            .unwrap();
        let s = err(c.create_probe(create("p:t/four hv_many_args")).await);
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

        let s = c
            .delete_probe(v1::DeleteProbeRequest {
                probe: Some(v1::ProbeRef {
                    r#ref: Some(v1::probe_ref::Ref::Id(999)),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound);
        let s = c
            .enable_probe(v1::EnableProbeRequest {
                probe: Some(v1::ProbeRef {
                    r#ref: Some(v1::probe_ref::Ref::Name("t/nope".into())),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound);

        // Subscriber filter naming a field no selected probe has.
        let s = c
            .subscribe(v1::SubscribeRequest {
                groups: vec!["t".into()],
                filter: "path ~ \"/etc/*\"".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            proto::definition_error_from_status(&s).unwrap().code,
            "FIELD_NOT_FOUND"
        );

        // An encoding this server does not know: refused, no queue left.
        let s = c
            .subscribe(v1::SubscribeRequest {
                encoding: 7,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("encoding: unknown value 7"), "{s:?}");
        assert_eq!(h.engine.subscriber_count(), 0);

        let first = c.subscribe(v1::SubscribeRequest::default()).await.unwrap();
        let s = c
            .subscribe(v1::SubscribeRequest::default())
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        drop(first);

        let r = c
            .resolve_symbol(v1::ResolveSymbolRequest {
                query: Some(v1::resolve_symbol_request::Query::Symbol("hv_nope".into())),
            })
            .await
            .unwrap_err();
        assert_eq!(r.code(), Code::NotFound);
    });
}

/// What the test's reader task has seen on the stream.
#[derive(Default)]
struct Seen {
    events: AtomicU64,
    lost: AtomicU64,
    lost_records: AtomicU64,
    /// Lost records that came after some events (losses are reported in order).
    lost_after_events: AtomicU64,
    /// Unix-epoch ms of the last message.
    last_ms: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Reads `stream` while `reading` is set; otherwise stops polling it, so
/// HTTP/2 flow control backs up to the server like a stalled client.
async fn read_while(
    mut stream: tonic::Streaming<v1::SubscribeResponse>,
    reading: Arc<AtomicBool>,
    seen: Arc<Seen>,
) {
    loop {
        if !reading.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let m = match tokio::time::timeout(Duration::from_millis(50), stream.message()).await {
            Err(_) => continue,
            Ok(Ok(None)) => return,
            Ok(Err(s)) => panic!("stream failed: {s:?}"),
            Ok(Ok(Some(m))) => m,
        };
        seen.last_ms.store(now_ms(), Ordering::SeqCst);
        match m.payload {
            Some(Payload::Events(b)) => {
                seen.events
                    .fetch_add(b.events.len() as u64, Ordering::SeqCst);
            }
            Some(Payload::Lost(l)) => {
                assert_eq!(l.reason, v1::LostReason::SubscriberQueueFull as i32);
                seen.lost.fetch_add(l.count, Ordering::SeqCst);
                seen.lost_records.fetch_add(1, Ordering::SeqCst);
                if seen.events.load(Ordering::SeqCst) > 0 {
                    seen.lost_after_events.fetch_add(1, Ordering::SeqCst);
                }
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
}

#[test]
fn slow_subscriber_loses_counted_events_and_guest_keeps_pace() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig::default());
    // Small HTTP/2 windows, so a stalled reader backs up to the server
    // within a few hundred events instead of megabytes.
    let mut c =
        h.rt.block_on(service::client::connect_with(&h.listen(), |e| {
            e.initial_stream_window_size(16 * 1024)
                .initial_connection_window_size(16 * 1024)
        }))
        .unwrap();
    let probe =
        h.rt.block_on(c.create_probe(create("p:slow/add hv_add a=%di b=%si")))
            .unwrap()
            .into_inner()
            .probe
            .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let unsubscribed = h.rate("hv_add", Duration::from_secs(1));

    let mut stream =
        h.rt.block_on(c.subscribe(v1::SubscribeRequest {
            probe_ids: vec![probe.id],
            queue_capacity: 64,
            max_batch_events: 16,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let first = h.rt.block_on(stream.message()).unwrap().unwrap();
    assert!(
        matches!(first.payload, Some(Payload::Started(_))),
        "{first:?}"
    );
    let reading = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Seen::default());
    let reader =
        h.rt.spawn(read_while(stream, reading.clone(), seen.clone()));

    // The same subscriber reading and stalled, interleaved so that the
    // machine's drift hits both alike. Stalled, HTTP/2 flow control, the
    // server's channel and the 64-event queue fill up within a few hundred
    // events; from then on the engine must drop, not wait.
    let (mut read_sum, mut stall_sum) = (0.0, 0.0);
    let mut rounds = Vec::new();
    for _ in 0..3 {
        reading.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        let r = h.rate("hv_add", Duration::from_millis(1500));
        reading.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        let s = h.rate("hv_add", Duration::from_millis(1500));
        read_sum += r;
        stall_sum += s;
        rounds.push(format!("{r:.0}/{s:.0}"));
    }
    println!(
        "hv_add calls/s: {unsubscribed:.0} without subscriber; reading/stalled per round: {}",
        rounds.join(", ")
    );
    assert!(read_sum > 0.0 && h.alive());
    // An engine that waited for the consumer would stop the guest within
    // a few hundred events of a stall (a rate near 0 for 1.5 s). Losing
    // events instead costs the guest nothing measurable, but on a loaded
    // 2-core machine single rounds swing 3x (seen: 4586/1777 with
    // load 11), so the bound is a quarter of the reading rate: far from
    // noise, far from a stall.
    assert!(
        stall_sum >= 0.25 * read_sum,
        "the guest slowed down with a stalled subscriber: {stall_sum:.0} against {read_sum:.0} calls/s (sums of 3 rounds)"
    );

    // Read again (the stalled stream holds the connection's whole HTTP/2
    // window, which the disarm answer needs too), stop the events, and read
    // everything that is left.
    seen.last_ms.store(now_ms(), Ordering::SeqCst);
    reading.store(true, Ordering::SeqCst);
    h.rt.block_on(c.disarm(v1::DisarmRequest {})).unwrap();
    // Until the stream has been idle for a second.
    let t = Instant::now();
    while now_ms() - seen.last_ms.load(Ordering::SeqCst) < 1000
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = seen.events.load(Ordering::SeqCst);
    let lost = seen.lost.load(Ordering::SeqCst);
    let stats = h.engine.stats();
    let listed = h.engine.list();
    println!(
        "received {events} events, {lost} lost in {} records; engine dropped {}",
        seen.lost_records.load(Ordering::SeqCst),
        stats.events_dropped
    );
    assert!(lost > 0, "a stalled 64-event queue lost nothing");
    assert!(events > 0 && seen.lost_after_events.load(Ordering::SeqCst) > 0);
    // The only subscriber: its drops are all the engine's drops.
    assert_eq!(lost, stats.events_dropped);
    assert_eq!(lost, listed[0].dropped);
    // Every hit since the subscription was either delivered or counted lost.
    assert!(events + lost <= listed[0].hits);

    assert_eq!(h.engine.subscriber_count(), 1);
    reader.abort();
    let _ = h.rt.block_on(reader);
    drop(c);
    let t = Instant::now();
    while h.engine.subscriber_count() != 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        h.engine.subscriber_count(),
        0,
        "disconnected subscriber kept its queue"
    );
}

/// Issue 14 item 4: the subscriber limit is checked and taken in one step
/// (concurrent subscribes could pass it together), and the queues together
/// have a budget.
#[test]
fn subscriber_limits_hold_under_concurrent_subscribes() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig {
        max_subscribers: 4,
        max_queued_events_total: 1 << 21,
        ..Default::default()
    });
    h.rt.block_on(async {
        let target = h.listen();
        for round in 0..10 {
            let mut tasks = Vec::new();
            for _ in 0..24 {
                let target = target.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = service::client::connect(&target).await.unwrap();
                    let r = c
                        .subscribe(v1::SubscribeRequest {
                            queue_capacity: 1024,
                            ..Default::default()
                        })
                        .await;
                    // Keep the stream open until the round is counted.
                    r.map(|s| (c, s.into_inner()))
                }));
            }
            let mut open = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(s) => open.push(s),
                    Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
                }
            }
            // Never above the limit; all of it when nothing else is open
            // (later rounds may still see a stream of the last one closing).
            assert!(
                open.len() <= 4,
                "round {round}: {} streams admitted at once",
                open.len()
            );
            if round == 0 {
                assert_eq!(open.len(), 4, "round 0: streams admitted");
            }
            drop(open);
            // The server gives the admissions back when the streams end.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut c = service::client::connect(&target).await.unwrap();
                let probes: Vec<_> = futures_probe(&mut c, 4).await;
                if probes.len() == 4 || Instant::now() > deadline {
                    assert_eq!(probes.len(), 4, "round {round}: admissions not given back");
                    break;
                }
                drop(probes);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The queue budget: two queues of 1 Mi events fill 2 Mi.
        let mut c = service::client::connect(&target).await.unwrap();
        let big = |c: &mut proto::v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>| {
            let mut c = c.clone();
            async move {
                c.subscribe(v1::SubscribeRequest {
                    queue_capacity: 1 << 20,
                    ..Default::default()
                })
                .await
            }
        };
        let a = big(&mut c).await.unwrap();
        let b = big(&mut c).await.unwrap();
        let s = big(&mut c).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("queues together"), "{}", s.message());
        drop((a, b));
    });
}

/// Opens up to `n` small subscriptions one after another; returns the open ones.
async fn futures_probe(
    c: &mut proto::v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>,
    n: usize,
) -> Vec<tonic::Streaming<v1::SubscribeResponse>> {
    let mut v = Vec::new();
    for _ in 0..n {
        match c
            .subscribe(v1::SubscribeRequest {
                queue_capacity: 1024,
                ..Default::default()
            })
            .await
        {
            Ok(s) => v.push(s.into_inner()),
            Err(_) => break,
        }
    }
    v
}

// Issue 14, item 3: every input is bounded and errors quote only a window
// around the error position, so a hostile definition gets its own error
// (not `RESOURCE_EXHAUSTED: metadata size exceeds hard limit`) and nothing
// stored grows with the padding a client sends.

/// The error is short: a message and details far under HTTP/2's header limits.
fn assert_short(s: &tonic::Status) {
    assert!(
        s.message().len() <= 300,
        "{} bytes: {}",
        s.message().len(),
        s.message()
    );
    assert!(
        s.details().len() <= 1000,
        "{} bytes of details",
        s.details().len()
    );
}

/// Runs `f` with a client of a fresh server over the test guest.
fn with_client<F>(
    f: impl FnOnce(proto::v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>, Harness) -> F,
) where
    F: std::future::Future<Output = Harness>,
{
    if !kvm_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(async {
        let c = service::client::connect(&h.listen()).await.unwrap();
        f(c, h).await
    });
    assert!(h.alive());
}

#[test]
fn a_6000_character_bad_definition_gets_its_own_short_error() {
    with_client(|mut c, h| async move {
        // A 6,000-character bad definition: over the kernel's line limit.
        let args: Vec<String> = (0..700).map(|i| format!("a{i}=%di")).collect();
        let six_k = format!("p:t/long hv_open_file x=%rsi {}", args.join(" "));
        let six_k = &six_k[..six_k[..6000].rfind(' ').unwrap()];
        assert!(six_k.len() > 5900);
        let s = c.create_probe(create(six_k)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_short(&s);
        assert!(s.message().contains("TOO_LONG"), "{}", s.message());
        assert!(s.message().contains("the limit is 4095"), "{}", s.message());
        let d = proto::definition_error_from_status(&s).expect("details");
        assert_eq!(d.code, "TOO_LONG");
        assert_eq!(d.text_offset + d.position, 4095);
        assert!(d.text.chars().count() <= 2 * probe_spec::EXCERPT_RADIUS);

        // Within the limit, an error deep in a long line quotes its window.
        // (105 arguments with 32-character names: under MAX_TRACE_ARGS.)
        let long_args: Vec<String> = (0..105).map(|i| format!("a{i:031}=%di")).collect();
        let bad = format!("p:t/long hv_open_file {} bad=%rsi", long_args.join(" "));
        let at_bad = bad.find("%rsi").unwrap();
        assert!(at_bad > 3800 && bad.len() < 4095, "{}", bad.len());
        let s = c.create_probe(create(&bad)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_short(&s);
        let d = proto::definition_error_from_status(&s).expect("details");
        assert_eq!(d.code, "BAD_REG_NAME");
        assert_eq!((d.text_offset + d.position) as usize, at_bad);
        assert!(d.text[d.position as usize..].starts_with("%rsi"), "{d:?}");
        assert!(d.rendered.starts_with("  …"), "{}", d.rendered);

        h
    });
}

#[test]
fn a_1_mb_unknown_symbol_gets_a_short_error() {
    with_client(|mut c, h| async move {
        // A 1 MB unknown symbol, in a definition and to ResolveSymbol.
        let huge = "s".repeat(1 << 20);
        let s = c
            .create_probe(create(&format!("p:t/huge {huge}")))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_short(&s);
        let s = c
            .resolve_symbol(v1::ResolveSymbolRequest {
                query: Some(v1::resolve_symbol_request::Query::Symbol(huge.clone())),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_short(&s);
        assert!(s.message().contains("limit"), "{}", s.message());
        // ... and by name to the probe calls.
        let s = c
            .delete_probe(v1::DeleteProbeRequest {
                probe: Some(v1::ProbeRef {
                    r#ref: Some(v1::probe_ref::Ref::Name(huge.clone())),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_short(&s);
        // The longest symbol the kernel allows is looked up, and quoted short.
        let s = c
            .create_probe(create(&format!("p:t/nosym {}", &huge[..511])))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        assert_short(&s);
        let s = c
            .create_probe(create(&format!("p:t/nosym {}", &huge[..512])))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("KSYM_NAME_LEN"), "{}", s.message());

        h
    });
}

#[test]
fn long_filters_and_batches_are_refused() {
    with_client(|mut c, h| async move {
        // A filter over the kernel's limit.
        let mut f = line("p:t/f hv_open_file dfd=%di:s32");
        f.filter = format!("dfd == 1 || {}", "dfd == 2 || ".repeat(1 << 16));
        let s = c
            .create_probe(v1::CreateProbeRequest {
                definition: Some(f),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_short(&s);
        assert_eq!(
            proto::definition_error_from_status(&s).unwrap().code,
            "TOO_LONG"
        );

        // A batch larger than the probe limit is refused before parsing.
        let many = (0..4097)
            .map(|i| line(&format!("p:t/m{i} hv_add")))
            .collect();
        let s = c
            .create_probes(v1::CreateProbesRequest { definitions: many })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("limit of 4096"), "{}", s.message());
        assert!(h.engine.list().is_empty());
        let s = c
            .delete_probes(v1::DeleteProbesRequest {
                probes: (0..4097)
                    .map(|i| v1::ProbeRef {
                        r#ref: Some(v1::probe_ref::Ref::Id(i)),
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with("probes: 4097"), "{}", s.message());
        let s = c
            .list_probes(v1::ListProbesRequest {
                ids: (0..4097).collect(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        let s = c
            .subscribe(v1::SubscribeRequest {
                groups: (0..4097).map(|i| format!("g{i}")).collect(),
                ..Default::default()
            })
            .await
            .expect_err("too many groups");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with("groups: 4097"), "{}", s.message());

        h
    });
}

#[test]
fn valid_lines_with_1_mb_of_trailing_spaces_are_stored_trimmed() {
    with_client(|mut c, h| async move {
        // Valid lines with 1 MB of trailing spaces are stored trimmed.
        for i in 0..8 {
            let padded = format!("p:t/pad{i} hv_add{}", " ".repeat(1 << 20));
            let p = c.create_probe(create(&padded)).await.unwrap().into_inner();
            let stored = p.probe.unwrap().definition;
            assert!(
                stored == format!("p:t/pad{i} hv_add"),
                "stored {} bytes: {:?}…",
                stored.len(),
                &stored[..stored.len().min(40)]
            );
        }
        let list = c
            .list_probes(v1::ListProbesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.probes.len(), 8);
        let size = prost::Message::encoded_len(&list);
        assert!(size < 16 * 1024, "ListProbes is {size} bytes");
        h
    });
}
