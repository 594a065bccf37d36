//! Every write of guest kernel text: planting and removing a site's `int3`,
//! the return trap's `int3`, writing and freeing out-of-line slots, and the
//! original byte put back for one single-step.
//!
//! No vCPU may run through a half-updated site, so every function here that
//! writes takes a [`World`]: proof that every other vCPU is parked. A
//! `World` exists only while the guard from [`VmControl::stop_others`] is
//! alive, and [`World::stop`] is the only way to make one, so the compiler
//! checks the rule. API operations stop the world from their own thread; a
//! handler stops it from the trapping vCPU's thread (`except` = itself),
//! which is then the only vCPU running.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use guest_access::{GuestMemory, StopGuard, SystemRegs, Vcpu, VmControl};
use insn_emu::Displaced;

use crate::error::ProbeError;
use crate::guest::Guest;
use crate::kretprobe::Kretprobes;
use crate::table::{Site, Table};
use crate::xol::{self, Scratch, Slots, XolSlot};

pub(crate) const INT3: u8 = 0xcc;

/// The world is stopped: every vCPU but (at most) the caller's own is
/// parked outside guest mode until this drops. Only [`World::stop`] makes
/// one.
pub(crate) struct World<'vm> {
    _guard: StopGuard<'vm>,
}

impl<'vm> World<'vm> {
    /// Park every vCPU except `except` (the caller's own, from a handler).
    /// Lock order: take the world before the probe table (a stopper may
    /// wait for a vCPU that waits for the table).
    pub fn stop(vm: &'vm dyn VmControl, except: Option<usize>) -> Self {
        World {
            _guard: vm.stop_others(except),
        }
    }
}

fn write_gpas(
    _world: &World<'_>,
    mem: &dyn GuestMemory,
    gpas: &[u64],
    data: &[u8],
) -> Result<(), ProbeError> {
    for (gpa, b) in gpas.iter().zip(data) {
        mem.write_phys(*gpa, &[*b])?;
    }
    Ok(())
}

/// Plant or remove the int3 at `addr` to match the probes' state (and the
/// global arm switch). Caller holds the table lock.
pub(crate) fn sync_site(
    world: &World<'_>,
    guest: &Guest,
    table: &Table,
    addr: u64,
    armed: bool,
) -> Result<(), ProbeError> {
    let Some(site) = table.sites.get(&addr) else {
        return Ok(());
    };
    if site.gone.load(Ordering::SeqCst) {
        return Ok(());
    }
    let want = site.wanted(armed);
    let have = site.planted.load(Ordering::SeqCst);
    if want && !have {
        let b = guest.read_byte(site.gpa)?;
        if b != site.original || !guest.holds(&site.tail) || guest.code_gone(site.addr) {
            // The code changed since registration, or the guest freed it.
            site.gone.store(true, Ordering::SeqCst);
            return Ok(());
        }
        write_gpas(world, guest.vm.memory(), &[site.gpa], &[INT3])?;
        site.planted.store(true, Ordering::SeqCst);
    } else if !want && have {
        restore_site(world, guest, site)?;
    }
    Ok(())
}

/// Put the original byte back, unless the guest replaced our int3 or the
/// instruction around it (then the memory is no longer that code).
fn restore_site(world: &World<'_>, guest: &Guest, site: &Site) -> Result<(), ProbeError> {
    let b = guest.read_byte(site.gpa)?;
    if b == INT3 && guest.holds(&site.tail) && !guest.code_gone(site.addr) {
        write_gpas(world, guest.vm.memory(), &[site.gpa], &[site.original])?;
    } else {
        site.gone.store(true, Ordering::SeqCst);
    }
    site.planted.store(false, Ordering::SeqCst);
    Ok(())
}

/// Take a site out of guest text for good (its probes are gone or its
/// module is about to be freed): the original byte goes back only where
/// the int3 is still ours and the code still there.
pub(crate) fn remove_site(world: &World<'_>, guest: &Guest, site: &Site) {
    if site.planted.load(Ordering::SeqCst) && !site.gone.load(Ordering::SeqCst) {
        if let Err(e) = restore_site(world, guest, site) {
            tracing::warn!("removing the site at {:#x}: {e}", site.addr);
        }
    }
    site.planted.store(false, Ordering::SeqCst);
}

/// Restore the displaced byte, single-step the trapping vCPU over it, plant
/// the int3 again. A failed step is logged: the vCPU resumes where it is.
pub(crate) fn step_in_place(
    world: &World<'_>,
    mem: &dyn GuestMemory,
    site: &Site,
    vcpu: &mut dyn Vcpu,
) {
    let planted = site.planted.load(Ordering::SeqCst);
    if planted && write_gpas(world, mem, &[site.gpa], &[site.original]).is_err() {
        return;
    }
    let stepped = vcpu.single_step();
    if planted {
        let _ = write_gpas(world, mem, &[site.gpa], &[INT3]);
    }
    if let Err(e) = stepped {
        tracing::warn!("single-step at {:#x} failed: {e}", site.addr);
    }
}

/// Plant the return trap's int3 if it is not yet.
pub(crate) fn plant_trap(
    world: &World<'_>,
    mem: &dyn GuestMemory,
    kret: &Kretprobes,
) -> Result<(), ProbeError> {
    let mut t = kret.trap.lock().unwrap();
    let Some(t) = t.as_mut() else {
        return Err(ProbeError::NoReturnTrap);
    };
    if !t.planted {
        write_gpas(world, mem, &[t.gpa], &[INT3])?;
        t.planted = true;
    }
    Ok(())
}

/// Remove the return trap when no kretprobe and no live instance needs it;
/// with instances still live, leave it to the last one to return.
pub(crate) fn retire_trap_if_unused(
    world: &World<'_>,
    mem: &dyn GuestMemory,
    table: &Table,
    kret: &Kretprobes,
) {
    if table.any_kretprobe() {
        kret.retire_pending.store(false, Ordering::SeqCst);
        return;
    }
    if !kret.instances.lock().unwrap().is_empty() {
        kret.retire_pending.store(true, Ordering::SeqCst);
        return;
    }
    kret.retire_pending.store(false, Ordering::SeqCst);
    let mut t = kret.trap.lock().unwrap();
    if let Some(t) = t.as_mut() {
        if t.planted {
            let mut b = [0u8; 1];
            if mem.read_phys(t.gpa, &mut b).is_ok() && b[0] == INT3 {
                let _ = write_gpas(world, mem, &[t.gpa], &[t.original]);
            }
            t.planted = false;
        }
    }
}

/// Relocate the instruction into free padding from `pool` and write the
/// slot. None when it cannot be relocated or no padding fits.
pub(crate) fn install_slot(
    world: &World<'_>,
    guest: &Guest,
    pool: &mut Scratch,
    table: &Table,
    d: &Displaced,
    sregs: Option<&SystemRegs>,
) -> Option<Arc<XolSlot>> {
    let need = d.len() as u64 + 1;
    let candidates: Vec<u64> = pool.candidates(need + 4).take(64).collect();
    for at in candidates {
        let mut code = xol::relocate(d.bytes(), d.ip(), at)?;
        code.push(INT3);
        let len = code.len() as u64;
        // Never over a probe site (one registered before the padding
        // rule, or by raw address without symbols).
        if table.sites.keys().any(|a| *a >= at && *a < at + len) {
            continue;
        }
        let Ok(gpas) = guest.text_gpas(at, code.len(), sregs) else {
            continue;
        };
        let mut saved = vec![0u8; code.len()];
        if guest.read_gpas(&gpas, &mut saved).is_err() || !pool.take(at, len) {
            continue;
        }
        if write_gpas(world, guest.vm.memory(), &gpas, &code).is_err() {
            pool.give_back(at, len);
            continue;
        }
        return Some(Arc::new(XolSlot {
            addr: at,
            code,
            saved,
            gpas,
            resume: d.next_ip(),
            in_flight: Default::default(),
        }));
    }
    None
}

/// Put a removed site's slot padding back, or retire the slot while a vCPU
/// is still inside it (the last one out frees it).
pub(crate) fn release_slot(
    world: &World<'_>,
    guest: &Guest,
    site: &Site,
    slots: &mut Slots,
    pool: &Mutex<Option<Scratch>>,
) {
    let Some(sl) = &site.slot else { return };
    if !slots.retire_if_busy(sl) {
        free_slot(world, guest, sl, slots, pool);
    }
}

/// Forget a slot and put its padding back, restoring only what is still ours.
pub(crate) fn free_slot(
    world: &World<'_>,
    guest: &Guest,
    sl: &XolSlot,
    slots: &mut Slots,
    pool: &Mutex<Option<Scratch>>,
) {
    slots.forget(sl);
    let mut now = vec![0u8; sl.code.len()];
    if guest.read_gpas(&sl.gpas, &mut now).is_ok() && now == sl.code {
        let _ = write_gpas(world, guest.vm.memory(), &sl.gpas, &sl.saved);
    }
    if let Some(sc) = pool.lock().unwrap().as_mut() {
        sc.give_back(sl.addr, sl.code.len() as u64);
    }
}
