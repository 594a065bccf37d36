//! Watches through the gRPC API and the CLI on the test guest
//! (`hvtest.watch=N`, 2 vCPUs): WatchMemory by symbol, refusals with their
//! codes, TakeWatchHits with every write's writer and values, ListWatches,
//! UnwatchMemory; `hvprobe watch add|ls|hits|rm`.

mod grpc_harness;

use std::time::{Duration, Instant};

use grpc_harness::common::{hvprobe_cli, phys, symbol};
use grpc_harness::*;
use guest_access::VmControl;
use proto::v1;
use test_guest::{WATCH_GO_SYMBOL, WATCH_PARAM, WATCH_SETTER};
use tonic::Code;

const N: u64 = 40;

async fn watches(
    c: &mut v1::hv_probe_client::HvProbeClient<tonic::transport::Channel>,
) -> Vec<v1::WatchInfo> {
    c.list_watches(v1::ListWatchesRequest {})
        .await
        .unwrap()
        .into_inner()
        .watches
}

fn wait_ready(h: &Harness) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !h.console().contains("watch ready") {
        assert!(
            h.wait_end(Duration::from_millis(10)).is_none(),
            "{}",
            h.console()
        );
        assert!(Instant::now() < deadline, "no `watch ready`");
    }
}

#[test]
fn watches_over_grpc_and_the_cli() {
    if !kvm_available() {
        return;
    }
    let mut h = Harness::prepare(
        service::ServiceConfig::default(),
        &format!("{WATCH_PARAM}{N}"),
    );
    h.boot();
    wait_ready(&h);
    let target = h.target();
    let cli = |args: &[&str]| {
        let mut a = vec!["watch", "--server", &target];
        a.extend_from_slice(args);
        hvprobe_cli(&a)
    };
    // The CLI: add by symbol, list, refusals in one line.
    let (code, out, err) = cli(&["add", "hv_watch_page", "8"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("hv_watch_page") && out.contains("page"),
        "{out}"
    );
    let id: u64 = out.split('\t').next().unwrap().parse().unwrap();
    let (code, _, err) = cli(&["add", "no_such_variable", "8"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("NotFound") && err.contains("no_such_variable"),
        "{err}"
    );
    let (code, _, err) = cli(&["add", "hv_watch_page", "8", "--mechanism", "dr"]);
    assert_ne!(code, 0);
    assert!(err.contains("FailedPrecondition"), "{err}");

    h.rt.block_on(async {
        let mut c = service::client::connect(&h.listen()).await.unwrap();
        let bad = |location: &str, length: u64| v1::WatchMemoryRequest {
            location: location.into(),
            length,
            ..Default::default()
        };
        let e = c.watch_memory(bad("hv_watch_page", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("length 0"), "{}", e.message());
        let e = c.watch_memory(bad("hv_watch_page+", 8)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c.watch_memory(bad("0xdead00000000", 8)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("not mapped"), "{}", e.message());
        let mut rw = bad("hv_watch_page", 8);
        rw.access = v1::WatchAccess::WatchReadWrite as i32;
        let e = c.watch_memory(rw).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .unwatch_memory(v1::UnwatchMemoryRequest { id: 777 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let listed = watches(&mut c).await;
        assert_eq!(listed.len(), 1, "refusals leave nothing: {listed:?}");
        assert_eq!(listed[0].mechanism, v1::WatchMechanism::WatchPage as i32);
        assert_eq!(listed[0].address, symbol("hv_watch_page"));
    });
    h.control
        .memory()
        .write_phys(phys(symbol(WATCH_GO_SYMBOL)), &1u64.to_le_bytes())
        .unwrap();
    let o = h.wait_end(Duration::from_secs(300));
    assert_eq!(
        o,
        Some(vmm::RunOutcome::GuestExit { status: 0 }),
        "{}",
        h.console()
    );
    h.rt.block_on(async {
        let mut c = service::client::connect(&h.listen()).await.unwrap();
        let r = c
            .take_watch_hits(v1::TakeWatchHitsRequest { wait_ms: 100 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.dropped, 0);
        assert_eq!(r.hits.len() as u64, N);
        for (i, hit) in r.hits.iter().enumerate() {
            assert_eq!(hit.watch_id, id);
            assert!(
                hit.writer.starts_with(&format!("{WATCH_SETTER}+")),
                "{hit:?}"
            );
            assert_ne!(hit.writer_ip, 0);
            let new = u64::from_le_bytes(hit.new_value[..8].try_into().unwrap());
            assert_eq!(new, 3 * i as u64 + 1);
        }
        let listed = watches(&mut c).await;
        assert_eq!(listed[0].hits, N);
    });
    let (code, out, err) = cli(&["ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("hits {N}")), "{out}");
    let (code, out, err) = cli(&["rm", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("{id}\t")), "{out}");
    assert!(h.control.protected_pages().is_empty());
    let (code, out, _) = cli(&["ls"]);
    assert_eq!((code, out.as_str()), (0, ""));
}
