//! `%hw` probes through the gRPC API on the running test guest: the
//! structured and kprobe_events forms, the listing's debug register, and a
//! probe beyond the free registers refused with RESOURCE_EXHAUSTED saying
//! who holds each (nothing of a refused batch left behind).

mod grpc_harness;

use std::time::{Duration, Instant};

use grpc_harness::*;
use guest_access::VmControl;
use proto::v1;
use tonic::Code;

fn line(l: &str) -> v1::ProbeDefinition {
    v1::ProbeDefinition {
        definition: Some(v1::probe_definition::Definition::KprobeEvents(l.into())),
        ..Default::default()
    }
}

fn spec(event: &str, symbol: &str) -> v1::ProbeDefinition {
    v1::ProbeDefinition {
        definition: Some(v1::probe_definition::Definition::Spec(v1::ProbeSpec {
            group: "hw".into(),
            event: event.into(),
            location: Some(v1::probe_spec::Location::Symbol(v1::SymbolLocation {
                symbol: symbol.into(),
                ..Default::default()
            })),
            hardware: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn hardware_probes_over_grpc_and_the_refusal_beyond_free_registers() {
    if !kvm_available() {
        return;
    }
    let h = Harness::start(service::ServiceConfig::default());
    let free = 4 - h.control.hw_slots().len();
    assert!(free >= 1);
    let funcs = ["hv_add", "hv_fib", "hv_checksum", "hv_many_args"];
    h.rt.block_on(async {
        let mut c = service::client::connect(&h.listen()).await.unwrap();
        let mut created = Vec::new();
        for (i, f) in funcs[..free].iter().enumerate() {
            let def = if i == 0 {
                spec(&format!("{f}_hw"), f)
            } else {
                line(&format!("p:hw/{f}_hw {f}%hw x=%di:u64"))
            };
            let p = c
                .create_probe(v1::CreateProbeRequest {
                    definition: Some(def),
                })
                .await
                .unwrap()
                .into_inner()
                .probe
                .unwrap();
            assert!(p.hardware && p.hw_slot.is_some(), "{p:?}");
            assert!(
                p.definition.contains(&format!("{f}%hw")),
                "{}",
                p.definition
            );
            created.push(p);
        }
        // A batch with one probe too many: refused as a whole.
        let s = c
            .create_probes(v1::CreateProbesRequest {
                definitions: vec![
                    line("p:hw/plain hv_work_item"),
                    line(&format!("p:hw/extra {}%hw", funcs[free])),
                ],
            })
            .await
            .expect_err("no register left");
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        let d = proto::definition_error_from_status(&s).expect("details");
        assert_eq!(d.code, "NO_HW_SLOT");
        assert_eq!(d.batch_index, Some(1));
        assert!(s.message().contains("all 4 are in use"), "{}", s.message());
        assert!(s.message().contains("hw/hv_add_hw"), "{}", s.message());
        let list = c
            .list_probes(v1::ListProbesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .probes;
        assert_eq!(list.len(), free, "the refused batch left nothing: {list:?}");
        // They hit while the guest runs.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = c
                .list_probes(v1::ListProbesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .probes;
            if list.iter().all(|p| p.hits > 0) {
                break;
            }
            assert!(Instant::now() < deadline, "no hits: {list:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Deleting all gives every register back.
        c.delete_probes(v1::DeleteProbesRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    assert_eq!(4 - h.control.hw_slots().len(), free);
    assert!(h.alive());
}
