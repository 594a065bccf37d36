//! Hardware-breakpoint sites: a debug register (DR0..DR3, through the VMM's
//! slot allocator) traps the instruction instead of an `int3`, so guest
//! text is never written for them. Arming claims a slot on every vCPU,
//! disarming gives it back; both with the world stopped, like planting.
//!
//! A debug register fires whatever the memory holds, so before a hit runs
//! the displaced instruction the site checks that the guest did not rewrite
//! or free the code ([`intact`]); an `int3` site gets that for free (the
//! guest overwrote the int3).

use std::sync::atomic::Ordering;

use crate::error::ProbeError;
use crate::guest::Guest;
use crate::table::{Site, NO_HW_SLOT};
use crate::text::World;

/// Whether the site's instruction is still in guest memory as registered.
pub(crate) fn intact(guest: &Guest, site: &Site) -> bool {
    guest.read_byte(site.gpa).is_ok_and(|b| b == site.original)
        && guest.holds(&site.tail)
        && !guest.in_freed_init(site.addr)
}

/// Claim or release the site's debug register to match its probes' state
/// (and the global arm switch). A gone site gives its register back.
pub(crate) fn sync_hw_site(
    _world: &World<'_>,
    guest: &Guest,
    site: &Site,
    armed: bool,
) -> Result<(), ProbeError> {
    let gone = site.gone.load(Ordering::SeqCst);
    let want = site.wanted(armed) && !gone;
    let have = site.armed_hw_slot();
    match (want, have) {
        (true, None) => {
            if !intact(guest, site) {
                site.gone.store(true, Ordering::SeqCst);
                return Ok(());
            }
            let owner = owner_name(site);
            let slot = guest
                .vm
                .claim_hw_breakpoint(site.addr, &owner)
                .map_err(|source| ProbeError::NoHwSlot {
                    name: owner,
                    source,
                })?;
            site.hw_slot.store(slot, Ordering::SeqCst);
        }
        (false, Some(slot)) => {
            guest.vm.release_hw_breakpoint(slot);
            site.hw_slot.store(NO_HW_SLOT, Ordering::SeqCst);
        }
        _ => {}
    }
    Ok(())
}

/// "probe t/a" (or "probes t/a, t/b"): who holds the slot, for listings and
/// refusals.
fn owner_name(site: &Site) -> String {
    let names: Vec<String> = site
        .probes
        .snapshot()
        .iter()
        .map(|p| p.name.clone())
        .collect();
    match names.len() {
        1 => format!("probe {}", names[0]),
        _ => format!("probes {}", names.join(", ")),
    }
}
