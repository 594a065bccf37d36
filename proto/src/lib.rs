//! hvprobe's gRPC API (`hvprobe.v1`), generated from
//! `proto/hvprobe/v1/hvprobe.proto` at build time without a system `protoc`.
//!
//! The server registers [`FILE_DESCRIPTOR_SET`] with tonic-reflection (v1 and
//! v1alpha) so `grpcurl` works without the `.proto` at hand.

/// Generated messages, client (`hv_probe_client`) and server (`hv_probe_server`).
pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("hvprobe.v1");
}

mod convert;
pub mod packed;
pub use convert::{
    definition_error, definition_error_from_status, excerpt_fields, invalid_definition,
    spec_to_line, DEFINITION_ERROR_TYPE_URL,
};

/// Encoded `google.protobuf.FileDescriptorSet` of the API, with source info
/// (comments) and imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hvprobe_descriptor.bin"));

/// Full name of the service, as used in reflection and health checks.
pub const SERVICE_NAME: &str = "hvprobe.v1.HvProbe";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_types::FileDescriptorSet;

    #[test]
    fn descriptor_set_has_service_and_methods() {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "hvprobe.v1")
            .expect("hvprobe.v1 file present");
        assert_eq!(file.name(), "hvprobe/v1/hvprobe.proto");
        let svc = file
            .service
            .iter()
            .find(|s| s.name() == "HvProbe")
            .expect("HvProbe service present");
        assert_eq!(format!("{}.{}", file.package(), svc.name()), SERVICE_NAME);
        let methods: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
        for m in [
            "CreateProbe",
            "CreateProbes",
            "DeleteProbe",
            "DeleteProbes",
            "EnableProbe",
            "DisableProbe",
            "Arm",
            "Disarm",
            "ListProbes",
            "GetProbe",
            "ResolveSymbol",
            "GetGuestInfo",
            "Subscribe",
        ] {
            assert!(methods.contains(&m), "method {m} missing from {methods:?}");
        }
        let subscribe = svc.method.iter().find(|m| m.name() == "Subscribe").unwrap();
        assert!(
            subscribe.server_streaming(),
            "Subscribe must be server-streaming"
        );
        assert!(!subscribe.client_streaming());
        // Comments survive, so reflection clients can show documentation.
        assert!(file
            .source_code_info
            .as_ref()
            .is_some_and(|i| !i.location.is_empty()));
    }

    #[test]
    fn every_field_is_documented() {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "hvprobe.v1")
            .unwrap();
        let info = file.source_code_info.as_ref().unwrap();
        let documented = |path: &[i32]| {
            info.location.iter().any(|l| {
                l.path == path
                    && (!l.leading_comments().trim().is_empty()
                        || !l.trailing_comments().trim().is_empty())
            })
        };
        let mut missing = Vec::new();
        // 4 = FileDescriptorProto.message_type, 2 = DescriptorProto.field.
        for (mi, m) in file.message_type.iter().enumerate() {
            for (fi, f) in m.field.iter().enumerate() {
                if !documented(&[4, mi as i32, 2, fi as i32]) {
                    missing.push(format!("{}.{}", m.name(), f.name()));
                }
            }
        }
        // 6 = service, 2 = method.
        for (si, s) in file.service.iter().enumerate() {
            for (mi, m) in s.method.iter().enumerate() {
                if !documented(&[6, si as i32, 2, mi as i32]) {
                    missing.push(format!("{}.{}", s.name(), m.name()));
                }
            }
        }
        assert!(missing.is_empty(), "undocumented: {missing:?}");
    }

    #[test]
    fn generated_types_round_trip() {
        use v1::*;
        let ev = Event {
            probe_id: 7,
            group: "kprobes".into(),
            event: "open".into(),
            kind: ProbeKind::Kretprobe as i32,
            pid: Some(42),
            args: vec![FetchedArg {
                name: "path".into(),
                r#type: "string".into(),
                value: Some(Value {
                    kind: Some(value::Kind::Fault(FaultValue { address: 0x10 })),
                }),
                text: "(fault)".into(),
            }],
            ret: Some(ReturnInfo {
                retval: 3,
                duration_ns: 1000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let msg = SubscribeResponse {
            payload: Some(subscribe_response::Payload::Events(EventBatch {
                events: vec![ev.clone()],
            })),
        };
        let back = SubscribeResponse::decode(msg.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, msg);
        assert_eq!(
            back.payload,
            Some(subscribe_response::Payload::Events(EventBatch {
                events: vec![ev]
            }))
        );
    }
}
