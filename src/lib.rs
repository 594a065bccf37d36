//! Glue between hvprobe's crates that the binary, the benchmarks and the
//! integration tests share.

pub mod snapshots;
