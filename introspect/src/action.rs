//! Actions a probe takes on a hit, beyond reporting it: `override` (the
//! probed function returns a value at once, like Linux's
//! `bpf_override_return` / fail_function), `freeze` (every vCPU held until
//! [`crate::Engine::thaw`]) and `snapshot` (the service is asked for a
//! snapshot of the guest as it is at the hit).
//!
//! An action runs only for hits its probe's gate accepts (the service's
//! probe filter, evaluated on the hit's event on the vCPU thread), whether
//! or not any stream wants the event; the event it ran for carries it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use guest_access::Regs;

use crate::events::{Event, ProbeId};
use crate::paging::{Access, GuestVirt};

/// What a probe does on a hit its gate accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Return `value` (RAX) from the probed function at once: the function's
    /// entry only; no instruction of it runs.
    Override { value: u64 },
    /// Hold every vCPU until the API thaws the guest.
    Freeze,
    /// Ask the action sink for a snapshot; the hitting vCPU's state is the
    /// hit's (the guest is held until the snapshot is written).
    Snapshot,
}

/// What a hit's action did, on its event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionTaken {
    /// The function returned `value` without running.
    Override { value: u64 },
    /// This hit froze the guest.
    Freeze,
    /// The guest was already frozen (another hit got there first).
    AlreadyFrozen,
    /// A snapshot was asked for; the sink names where it goes.
    Snapshot { path: String },
    /// The action did not run, and why (a snapshot within the rate limit,
    /// a VM that cannot hold its vCPUs, an unreadable stack for override).
    Skipped { why: String },
}

/// Decides on the vCPU thread whether a hit's action runs (the probe's filter).
pub type ActionGate = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

/// Where snapshot actions go (the service). `begin` is called on the vCPU
/// thread with the guest held: it returns the directory the snapshot will
/// be written to and must later call [`crate::Engine::release_hold`], or
/// returns why not (the guest is released at once then).
pub trait ActionSink: Send + Sync {
    fn begin_snapshot(&self, probe: ProbeId, seq: u64) -> Result<String, String>;
}

/// Who froze the guest, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezeInfo {
    pub probe: ProbeId,
    pub vcpu: u32,
    /// Nanoseconds since the Unix epoch.
    pub since_ns: u64,
}

/// Freeze state and the holds the engine has on the vCPUs. A hold is one
/// of: the user-visible freeze, or a snapshot action in progress; the vCPUs
/// run again when none is left.
#[derive(Default)]
pub(crate) struct Holds {
    pub state: Mutex<HoldState>,
}

#[derive(Default)]
pub(crate) struct HoldState {
    pub frozen: Option<FreezeInfo>,
    pub snapshots: u32,
    /// Last snapshot action per probe (its rate limit).
    pub last_snapshot: std::collections::HashMap<ProbeId, Instant>,
}

impl HoldState {
    pub fn any(&self) -> bool {
        self.frozen.is_some() || self.snapshots > 0
    }
}

/// Emulates `ret` with `value` in RAX at a function's first instruction:
/// RIP = [RSP], RSP += 8. The return address is read through the guest's
/// page tables; None if it cannot be (the hit then runs normally).
pub(crate) fn override_return(regs: &Regs, virt: &GuestVirt<'_>, value: u64) -> Option<Regs> {
    let mut ret = [0u8; 8];
    virt.read(regs.rsp, &mut ret, Access::KernelRead).ok()?;
    let mut out = *regs;
    out.rax = value;
    out.rip = u64::from_le_bytes(ret);
    out.rsp = regs.rsp.wrapping_add(8);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_access::fake::FakeMemory;
    use guest_access::{GuestMemory, SystemRegs};

    #[test]
    fn override_pops_the_return_address_and_sets_rax() {
        let ram = FakeMemory::new(1 << 16);
        ram.write_phys(0x2000, &0xffff_ffff_8100_1234u64.to_le_bytes())
            .unwrap();
        let virt = GuestVirt::new(&ram, SystemRegs::default(), 0);
        let regs = Regs {
            rip: 0xffff_ffff_8100_0005,
            rsp: 0x2000,
            rax: 7,
            rbx: 9,
            ..Default::default()
        };
        let out = override_return(&regs, &virt, (-2i64) as u64).unwrap();
        assert_eq!(out.rip, 0xffff_ffff_8100_1234);
        assert_eq!(out.rsp, 0x2008);
        assert_eq!(out.rax as i64, -2);
        // Nothing else changes.
        assert_eq!(out.rbx, 9);
        assert_eq!(out.rflags, regs.rflags);
        // An unreadable stack: no override.
        let regs = Regs {
            rsp: 0x10_0000,
            ..regs
        };
        assert!(override_return(&regs, &virt, 1).is_none());
    }
}
