//! Where and how to export.

use std::path::PathBuf;

use proto::v1;

/// Where and how to export.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The file written; rotated ones are `PATH.1` (newest) .. `PATH.K`,
    /// with `.gz` when compressed.
    pub path: PathBuf,
    /// Rotate before a write would make the file larger than this (a
    /// record longer than the limit gets a file of its own).
    pub max_bytes: u64,
    /// Rotated files kept (0: the file is started anew at the limit).
    pub backups: u32,
    /// Compress rotated files with gzip.
    pub gzip: bool,
    /// The exporter's queue in events (0: the service default).
    pub queue_capacity: u32,
    /// Identity written into every record.
    pub vm: v1::VmIdentity,
}

impl ExportConfig {
    /// Defaults: 100 MiB files, 5 backups, no compression.
    pub fn new(path: PathBuf, vm: v1::VmIdentity) -> Self {
        ExportConfig {
            path,
            max_bytes: 100 << 20,
            backups: 5,
            gzip: false,
            queue_capacity: 0,
            vm,
        }
    }
}
