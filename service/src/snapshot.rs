//! Snapshots through the API: the probe table saved beside the VMM's state
//! and put back on restore. The service does not know the VMM; the runner
//! gives it a [`SnapshotWriter`] through the [`crate::Guest`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use introspect::{EngineState, ProbeId};
use proto::v1;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::guest::SnapshotWriter;
use crate::state::Inner;

/// The probe table file of a snapshot (`probes.json`).
#[derive(Serialize, Deserialize)]
struct ProbeTableFile {
    /// Layout of this file; restore refuses a newer one.
    format: u32,
    engine: EngineState,
    /// Each probe's own event filter, by id (probes without one are absent).
    filters: BTreeMap<ProbeId, String>,
}

const PROBE_TABLE_FORMAT: u32 = 1;

impl Inner {
    pub(crate) fn create_snapshot(
        &self,
        dir: &Path,
        stop: bool,
    ) -> Result<v1::CreateSnapshotResponse, Status> {
        let writer: Arc<dyn SnapshotWriter> = self
            .guest
            .snapshot_writer()
            .ok_or_else(|| Status::failed_precondition("this hvprobe cannot snapshot its guest"))?;
        if self.guest.state() != v1::GuestState::Running {
            return Err(Status::unavailable(format!(
                "the guest is not running ({})",
                self.guest.state().as_str_name()
            )));
        }
        // No probe is created or deleted meanwhile: the filters read here
        // belong to the probes the engine saves.
        let _ops = self.lock_ops();
        let filters: BTreeMap<ProbeId, String> = {
            let t = self.probes.read().unwrap_or_else(|e| e.into_inner());
            t.live
                .values()
                .filter(|m| !m.filter_text.is_empty())
                .map(|m| (m.id, m.filter_text.clone()))
                .collect()
        };
        let (banner, _) = self.kernel_banner();
        let written = self
            .engine
            .freeze(|frozen| {
                let file = ProbeTableFile {
                    format: PROBE_TABLE_FORMAT,
                    engine: frozen.state.clone(),
                    filters,
                };
                let json = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
                let w = writer.write(dir, &frozen.originals, &banner, &json)?;
                Ok::<_, String>((
                    w,
                    frozen.state.probes.len(),
                    frozen.state.instances.len(),
                    frozen.originals.iter().map(|(_, b)| b.len()).sum::<usize>(),
                ))
            })
            .map_err(|e| Status::unavailable(format!("snapshot: {e}")))?
            .map_err(Status::failed_precondition)?;
        let (w, probes, instances, bytes) = written;
        if stop {
            writer.stop_guest();
        }
        let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Ok(v1::CreateSnapshotResponse {
            directory: dir.display().to_string(),
            memory_bytes: w.memory_bytes,
            written_bytes: w.written_bytes,
            capture_us: w.capture_us,
            write_us: w.write_us,
            probes: n(probes),
            kretprobe_instances: n(instances),
            restored_bytes: n(bytes),
        })
    }

    /// Puts a snapshot's probe table (`probes.json`) back (see
    /// `HvProbeService::restore_probes`).
    pub(crate) fn restore_probe_table(&self, json: &[u8]) -> Result<Vec<v1::ProbeInfo>, Status> {
        let file: ProbeTableFile = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("probe table of the snapshot: {e}")))?;
        if file.format > PROBE_TABLE_FORMAT {
            return Err(Status::invalid_argument(format!(
                "probe table of the snapshot: format {} is newer than this hvprobe reads ({PROBE_TABLE_FORMAT})",
                file.format
            )));
        }
        self.restore(&file.engine, &file.filters)
    }
}
