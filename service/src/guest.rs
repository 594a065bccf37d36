//! The guest as the runner describes it to the service: its lifecycle
//! state, the VM for reads, and what the service cannot do itself because
//! it does not know the VMM (the system-call bridge's state, writing a
//! snapshot). A leaf: the runner fills it in, the service reads it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use guest_access::VmControl;
use proto::v1;

/// The guest's lifecycle as the runner reports it, plus the VM for reads.
pub struct Guest {
    state: AtomicI32,
    pub(crate) vm: Arc<dyn VmControl>,
    bridge: std::sync::OnceLock<BridgeInfoFn>,
    snapshot: std::sync::OnceLock<Arc<dyn SnapshotWriter>>,
    kaslr_possible: AtomicBool,
}

/// Reports the VMM's system-call bridge (the service does not know the VMM).
pub type BridgeInfoFn = Box<dyn Fn() -> v1::SyscallBridgeInfo + Send + Sync>;

impl Guest {
    pub fn new(vm: Arc<dyn VmControl>) -> Arc<Self> {
        Arc::new(Guest {
            state: AtomicI32::new(v1::GuestState::Created as i32),
            vm,
            bridge: std::sync::OnceLock::new(),
            snapshot: std::sync::OnceLock::new(),
            kaslr_possible: AtomicBool::new(false),
        })
    }

    /// Whether the guest kernel may run at a randomized base (the VMM knows:
    /// a bzImage without `nokaslr`). Then no probe is placed before the
    /// slide is found in guest memory.
    pub fn set_kaslr_possible(&self, possible: bool) {
        self.kaslr_possible.store(possible, Ordering::SeqCst);
    }

    pub fn kaslr_possible(&self) -> bool {
        self.kaslr_possible.load(Ordering::SeqCst)
    }

    /// Who writes the VMM's part of a snapshot (set once; without it
    /// `CreateSnapshot` is refused).
    pub fn set_snapshot_writer(&self, w: Arc<dyn SnapshotWriter>) {
        let _ = self.snapshot.set(w);
    }

    pub(crate) fn snapshot_writer(&self) -> Option<Arc<dyn SnapshotWriter>> {
        self.snapshot.get().cloned()
    }

    /// Where GetGuestInfo gets the system-call bridge's state (set once).
    pub fn set_bridge_info(&self, f: BridgeInfoFn) {
        let _ = self.bridge.set(f);
    }

    pub(crate) fn bridge_info(&self) -> Option<v1::SyscallBridgeInfo> {
        self.bridge.get().map(|f| f())
    }

    /// vCPUs of the guest.
    pub fn vcpu_count(&self) -> usize {
        self.vm.vcpu_count()
    }

    pub fn set_state(&self, s: v1::GuestState) {
        self.state.store(s as i32, Ordering::SeqCst);
    }

    pub fn state(&self) -> v1::GuestState {
        v1::GuestState::try_from(self.state.load(Ordering::SeqCst))
            .unwrap_or(v1::GuestState::Unspecified)
    }
}

/// What a written snapshot took (see `vmm::snapshot::SnapshotReport`).
#[derive(Clone, Debug, Default)]
pub struct WrittenSnapshot {
    pub memory_bytes: u64,
    pub written_bytes: u64,
    pub capture_us: u64,
    pub write_us: u64,
}

/// Writes the VMM's part of a snapshot; implemented by the runner over the VMM.
pub trait SnapshotWriter: Send + Sync {
    /// Called with every vCPU parked at a clean point: write the VM's state
    /// and memory into `dir`, with `originals` (guest-physical address,
    /// the guest's own bytes) overlaid in the image, and `probes` stored
    /// beside it. Errors are one line.
    fn write(
        &self,
        dir: &Path,
        originals: &[(u64, Vec<u8>)],
        guest_banner: &str,
        probes: &[u8],
    ) -> Result<WrittenSnapshot, String>;

    /// Stop the guest (`CreateSnapshot` with `stop`).
    fn stop_guest(&self);
}
