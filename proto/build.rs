//! Compiles `proto/hvprobe/v1/hvprobe.proto` without a system `protoc`:
//! protox parses it into a FileDescriptorSet, which is both written out for
//! server reflection and handed to tonic's prost code generator, and to
//! pbjson-build for the messages' serde (proto3 JSON mapping).

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/hvprobe/v1/hvprobe.proto";
const INCLUDE: &str = "proto";
/// The official OTLP logs definitions (vendored, see proto/opentelemetry).
const OTLP_LOGS: &str = "opentelemetry/proto/collector/logs/v1/logs_service.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed={INCLUDE}/opentelemetry");

    // Source info keeps the .proto comments, which become rustdoc and are
    // served by reflection; imports are included so the set is self-contained.
    let fds = protox::Compiler::new([INCLUDE])?
        .include_source_info(true)
        .include_imports(true)
        .open_file(PROTO)?
        .file_descriptor_set();

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("hvprobe_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Packed strings decode as slices of the received buffer: no
        // allocation per string for a client reading millions per second.
        .bytes(".hvprobe.v1.PackedEventBatch.strings")
        // Tags in key order: the same event gives the same JSON line.
        .btree_map(".hvprobe.v1")
        .compile_fds(fds.clone())?;

    // serde for every message in the proto3 JSON mapping, generated from the
    // same descriptors: the export file's schema is the API's.
    pbjson_build::Builder::new()
        .register_descriptors(&fds.encode_to_vec())?
        .emit_fields()
        .btree_map([".hvprobe.v1"])
        .build(&[".hvprobe.v1"])?;

    // OTLP logs: messages only (the sink speaks OTLP/HTTP with protobuf
    // bodies), written as opentelemetry.proto.*.v1.rs.
    let otlp = protox::Compiler::new([INCLUDE])?
        .include_imports(true)
        .open_file(OTLP_LOGS)?
        .file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(otlp)?;
    Ok(())
}
