//! `CreateSnapshot`'s VMM half: the service freezes the probe engine, this
//! writes the VM's state and memory (vmm::snapshot) while it is frozen.

use std::path::Path;
use std::sync::Arc;

use service::{SnapshotWriter, WrittenSnapshot};

/// Writes the VMM's part of a snapshot for the service.
pub struct VmSnapshotWriter {
    snapshotter: vmm::snapshot::Snapshotter,
    control: Arc<vmm::Machine>,
}

/// The writer for `vm`, to give `service::Guest::set_snapshot_writer`.
pub fn writer_for(vm: &vmm::Vm) -> Arc<dyn SnapshotWriter> {
    Arc::new(VmSnapshotWriter {
        snapshotter: vm.snapshotter(),
        control: vm.control(),
    })
}

impl SnapshotWriter for VmSnapshotWriter {
    fn write(
        &self,
        dir: &Path,
        originals: &[(u64, Vec<u8>)],
        guest_banner: &str,
        probes: &[u8],
    ) -> Result<WrittenSnapshot, String> {
        let r = self
            .snapshotter
            .write_stopped(dir, originals, guest_banner, Some(probes))
            .map_err(|e| e.to_string())?;
        Ok(WrittenSnapshot {
            memory_bytes: r.memory_bytes,
            written_bytes: r.written_bytes,
            capture_us: r.capture.as_micros() as u64,
            write_us: r.write.as_micros() as u64,
        })
    }

    fn stop_guest(&self) {
        self.control.stop();
    }
}
