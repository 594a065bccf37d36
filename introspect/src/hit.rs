//! The breakpoint handler: every `int3` exit of the guest lands here, on the
//! trapping vCPU's thread (`arch/x86/kernel/kprobes/core.c`'s
//! `kprobe_int3_handler` and its resume paths). In order:
//!
//! 1. the return trap: a kretprobe's function returned ([`crate::kretprobe`]);
//! 2. the trailing `int3` of an out-of-line slot: continue after the
//!    original instruction ([`Engine::leave_slot`]);
//! 3. one of our sites: report each enabled probe ([`crate::fetch`]), then
//!    run the displaced instruction: emulated on the host (one exit), out
//!    of line in a slot (two exits), or in place with the world stopped
//!    and a single-step ([`crate::text::step_in_place`]);
//! 4. not ours: the guest's own `int3` (delivered back as #BP) or a stale
//!    trap at an `int3` removed meanwhile (resumed: the original runs).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use guest_access::{BreakpointAction, BreakpointHandler, Regs, TrapKind, Vcpu, VmControl};
use smallvec::SmallVec;

use crate::action::{self, Action, ActionTaken};
use crate::fetch::{HitContext, Reporter};
use crate::hwbp;
use crate::kprobes::Engine;
use crate::paging::{Access, GuestVirt};
use crate::table::{Handling, Probe, ProbeType, Site};
use crate::text::{self, World, INT3};
use crate::xol::XolSlot;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;

impl BreakpointHandler for Engine {
    fn on_protected_write(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        w: &guest_access::ProtectedWrite,
    ) {
        self.on_watched_write(vcpu, vm, w);
    }

    fn owns_address(&self, rip: u64) -> bool {
        let trap = self.kret.trap_addr.load(Ordering::Relaxed);
        if trap != 0 && rip == trap {
            return true;
        }
        let table = self.table.read().unwrap();
        table.slots.by_end.contains_key(&rip)
            || table
                .sites
                .get(&rip)
                .is_some_and(|s| s.planted.load(Ordering::Relaxed))
    }

    fn on_breakpoint(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        kind: TrapKind,
    ) -> BreakpointAction {
        self.in_handler.fetch_add(1, Ordering::SeqCst);
        let action = self.handle_breakpoint(vcpu, vm, kind);
        self.in_handler.fetch_sub(1, Ordering::SeqCst);
        action
    }
}

fn emu_regs(r: &Regs) -> insn_emu::Regs {
    insn_emu::Regs {
        gpr: r.gprs(),
        rip: r.rip,
        rflags: r.rflags,
    }
}

impl Engine {
    /// Dispatch one trap (see the module comment).
    fn handle_breakpoint(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        kind: TrapKind,
    ) -> BreakpointAction {
        let Ok(regs) = vcpu.regs() else {
            return BreakpointAction::DeliverToGuest;
        };
        if kind == TrapKind::HardwareBreakpoint {
            return self.hardware_hit(vcpu, vm, regs);
        }
        let rip = regs.rip;
        let trap = self.kret.trap_addr.load(Ordering::Relaxed);
        if trap != 0 && rip == trap {
            return self.return_trap(vcpu, vm, regs);
        }
        let (site, resume) = {
            let t = self.table.read().unwrap();
            (
                t.sites.get(&rip).cloned(),
                t.slots.by_end.get(&rip).cloned(),
            )
        };
        if let Some(slot) = resume {
            return self.leave_slot(vcpu, vm, regs, &slot);
        }
        let Some(site) = site else {
            return self.not_ours(vcpu, vm, rip);
        };
        if !site.planted.load(Ordering::SeqCst) {
            self.counters.stale_traps.fetch_add(1, Ordering::Relaxed);
            return BreakpointAction::Resume;
        }
        if site.hook.is_none() || !site.probes.is_empty() {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
        }
        let sregs = vcpu.system_regs().unwrap_or_default();
        // One walker for the fetches and the emulation: its leaf cache
        // serves both (the stack page, typically).
        let virt = GuestVirt::new(vm.memory(), sregs, regs.rflags);
        let overridden = self.report_hit(&site, vcpu.index() as u32, &virt, &regs, trap);
        let virt = match site.hook {
            // A module loads or goes: arm or disarm its probes before the
            // vCPU runs on (the argument is the `struct module *`). That
            // stops the world, so the walker starts afresh.
            Some(hook) => {
                self.on_module_hook(hook, regs.rdi, vcpu, vm);
                GuestVirt::new(vm.memory(), sregs, regs.rflags)
            }
            None => virt,
        };
        // Read [RSP] now: a kretprobe at this entry has just pointed it at
        // the return trap, and then reports the value returned here.
        if overridden.is_some_and(|v| returned_at_once(vcpu, &regs, &virt, v)) {
            return BreakpointAction::Resume;
        }
        if site.handling == Handling::Emulated && self.emulate(&site, vcpu, virt, &regs) {
            return BreakpointAction::Resume;
        }
        if let (Handling::OutOfLine, Some(sl)) = (site.handling, &site.slot) {
            if self.enter_slot(vcpu, regs, sl) {
                return BreakpointAction::Resume;
            }
        }
        self.step_over(&site, vcpu, vm)
    }

    /// A debug-register breakpoint fired: RIP at the site, its instruction
    /// not yet run (a fault-style #DB). Report, then run the instruction:
    /// emulated, or single-stepped in place with the debug registers left
    /// out (no text to restore, so no other vCPU stops). Resuming at RIP
    /// unchanged would trap again, so every path moves the vCPU on.
    fn hardware_hit(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        regs: Regs,
    ) -> BreakpointAction {
        let site = self.table.read().unwrap().sites.get(&regs.rip).cloned();
        let live = site.filter(|s| s.hardware && s.armed_hw_slot().is_some());
        let Some(site) = live.filter(|s| !s.gone.load(Ordering::SeqCst)) else {
            // Released after this vCPU trapped (it drops the register
            // before it next enters the guest): run the instruction as is.
            self.counters.stale_traps.fetch_add(1, Ordering::Relaxed);
            return self.step_hardware_site(vcpu, regs.rip);
        };
        if !hwbp::intact(&self.guest, &site) {
            // The guest rewrote or freed the code: never emulate what is no
            // longer there. The register goes back at the next sync.
            site.gone.store(true, Ordering::SeqCst);
            return self.step_hardware_site(vcpu, regs.rip);
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.counters.hardware_hits.fetch_add(1, Ordering::Relaxed);
        let trap = self.kret.trap_addr.load(Ordering::Relaxed);
        let sregs = vcpu.system_regs().unwrap_or_default();
        let virt = GuestVirt::new(vm.memory(), sregs, regs.rflags);
        let overridden = self.report_hit(&site, vcpu.index() as u32, &virt, &regs, trap);
        if overridden.is_some_and(|v| returned_at_once(vcpu, &regs, &virt, v)) {
            return BreakpointAction::Resume;
        }
        if site.handling == Handling::Emulated && self.emulate(&site, vcpu, virt, &regs) {
            return BreakpointAction::Resume;
        }
        self.counters.single_stepped.fetch_add(1, Ordering::Relaxed);
        self.step_hardware_site(vcpu, regs.rip)
    }

    /// Single-step the instruction under a debug register (the VMM leaves
    /// the registers out for the step).
    fn step_hardware_site(&self, vcpu: &mut dyn Vcpu, rip: u64) -> BreakpointAction {
        if let Err(e) = vcpu.single_step() {
            tracing::warn!("single-step at the hardware breakpoint {rip:#x} failed: {e}");
        }
        BreakpointAction::Resume
    }

    /// Report a hit to every enabled probe at the site: kprobe events (and
    /// their actions), and an instance for each kretprobe. Returns the value
    /// to return at once when an `override` ran.
    fn report_hit(
        &self,
        site: &Site,
        vcpu: u32,
        virt: &GuestVirt<'_>,
        regs: &Regs,
        trap: u64,
    ) -> Option<u64> {
        let ctx = HitContext::new(regs, virt, &*self.guest.symbols).with_exe(self.exe_for_hit());
        let reporter = self.reporter();
        let probes = site.probes.snapshot();
        let armed = self.armed();
        // On the stack for any usual number of kretprobes at one address.
        let mut returns: SmallVec<[&Arc<Probe>; 4]> = SmallVec::new();
        let mut overridden = None;
        for p in probes.iter() {
            if !armed || !p.enabled.load(Ordering::Relaxed) {
                continue;
            }
            p.hits.fetch_add(1, Ordering::Relaxed);
            match (p.kind, &p.action) {
                (ProbeType::Kprobe, None) => reporter.kprobe_hit(p, &ctx, vcpu),
                (ProbeType::Kprobe, Some(_)) => {
                    if let Some(v) = self.kprobe_action(p, &ctx, vcpu, &reporter) {
                        overridden = Some(v);
                    }
                }
                (ProbeType::Kretprobe { .. }, _) => returns.push(p),
            }
        }
        if !returns.is_empty() && trap != 0 {
            self.kret.entry(&returns, &ctx, trap, &reporter);
        }
        overridden
    }

    /// A hit of a probe with an action: its event is built whether or not a
    /// stream wants it (the gate decides on it), the action runs if the gate
    /// accepts, and the event says what it did. Returns an override's value.
    fn kprobe_action(
        &self,
        p: &Probe,
        ctx: &HitContext<'_>,
        vcpu: u32,
        reporter: &Reporter<'_>,
    ) -> Option<u64> {
        let mut ev = reporter.entry_event(p, ctx, vcpu);
        let accepted = p.action_gate.as_ref().is_none_or(|g| (g.0)(&ev));
        let mut value = None;
        if accepted {
            let taken = match p.action.as_ref()? {
                Action::Override { value: v } => {
                    match action::override_return(ctx.regs, ctx.virt, *v) {
                        Some(_) => {
                            value = Some(*v);
                            ActionTaken::Override { value: *v }
                        }
                        None => ActionTaken::Skipped {
                            why: format!("the return address at {:#x} is unreadable", ctx.regs.rsp),
                        },
                    }
                }
                Action::Freeze => self.freeze_action(p.id, vcpu),
                Action::Snapshot => self.snapshot_action(p.id, ev.seq),
            };
            if !matches!(taken, ActionTaken::Skipped { .. }) {
                p.actions.fetch_add(1, Ordering::Relaxed);
            }
            ev.action = Some(taken);
        }
        reporter.publish(p, ev);
        value
    }

    /// Emulate the displaced instruction on the host; false when the
    /// emulator declines (counted as a fallback: the caller steps instead).
    fn emulate(
        &self,
        site: &Site,
        vcpu: &mut dyn Vcpu,
        mut virt: GuestVirt<'_>,
        regs: &Regs,
    ) -> bool {
        let mut er = emu_regs(regs);
        match site.displaced.emulate(&mut er, &mut virt) {
            Ok(_) => {
                let mut out = *regs;
                out.set_gprs(er.gpr);
                out.rip = er.rip;
                out.rflags = er.rflags;
                if vcpu.set_regs(&out).is_ok() {
                    self.counters.emulated.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            }
            Err(e) => tracing::debug!("emulation declined at {:#x}: {e}", regs.rip),
        }
        self.counters
            .emulation_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Send the vCPU into the site's out-of-line slot; false when it must
    /// step instead (TF set: the guest's own #DB must see the real RIP).
    fn enter_slot(&self, vcpu: &mut dyn Vcpu, regs: Regs, sl: &XolSlot) -> bool {
        if regs.rflags & RFLAGS_TF != 0 {
            return false;
        }
        // Interrupts stay masked in the slot, so no interrupt frame can ever
        // point into it (it may be freed later).
        let mut r = regs;
        r.rip = sl.addr;
        r.rflags &= !RFLAGS_IF;
        self.xol_if[vcpu.index()].store(regs.rflags & RFLAGS_IF != 0, Ordering::SeqCst);
        sl.in_flight.fetch_add(1, Ordering::SeqCst);
        if vcpu.set_regs(&r).is_ok() {
            self.counters.out_of_line.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        sl.in_flight.fetch_sub(1, Ordering::SeqCst);
        false
    }

    /// Back from an out-of-line slot: restore IF and continue after the
    /// original instruction; free the slot if it was retired meanwhile.
    fn leave_slot(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        regs: Regs,
        slot: &Arc<XolSlot>,
    ) -> BreakpointAction {
        let mut r = regs;
        r.rip = slot.resume;
        if self.xol_if[vcpu.index()].load(Ordering::SeqCst) {
            r.rflags |= RFLAGS_IF;
        }
        let left = slot.in_flight.fetch_sub(1, Ordering::SeqCst) == 1;
        if vcpu.set_regs(&r).is_err() {
            return BreakpointAction::DeliverToGuest;
        }
        if left && self.table.read().unwrap().slots.is_retired(slot) {
            let world = World::stop(vm, Some(vcpu.index()));
            let mut table = self.table.write().unwrap();
            if !slot.busy() {
                text::free_slot(&world, &self.guest, slot, &mut table.slots, &self.pool);
            }
        }
        BreakpointAction::Resume
    }

    /// The guest returned into the trap: report and continue at the real
    /// return address. The guest's `ret` already ran, so no emulation is needed.
    fn return_trap(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        mut regs: Regs,
    ) -> BreakpointAction {
        self.counters.return_traps.fetch_add(1, Ordering::Relaxed);
        let sregs = vcpu.system_regs().unwrap_or_default();
        let virt = GuestVirt::new(vm.memory(), sregs, regs.rflags);
        let returned = {
            let ctx =
                HitContext::new(&regs, &virt, &*self.guest.symbols).with_exe(self.exe_for_hit());
            self.kret
                .returned(&ctx, vcpu.index() as u32, &self.reporter())
        };
        let Some(return_to) = returned else {
            // Nothing to return to: let the guest see the int3 (it will oops
            // with a clear backtrace rather than run off somewhere).
            return BreakpointAction::DeliverToGuest;
        };
        regs.rip = return_to;
        if vcpu.set_regs(&regs).is_err() {
            return BreakpointAction::DeliverToGuest;
        }
        if self.kret.retire_due() {
            // The last orphaned instance came home: give the byte back.
            let world = World::stop(vm, Some(vcpu.index()));
            let table = self.table.read().unwrap();
            text::retire_trap_if_unused(&world, vm.memory(), &table, &self.kret);
        }
        BreakpointAction::Resume
    }

    /// The trap was not at one of our sites.
    fn not_ours(&self, vcpu: &mut dyn Vcpu, vm: &dyn VmControl, rip: u64) -> BreakpointAction {
        let sregs = vcpu.system_regs().unwrap_or_default();
        let virt = GuestVirt::new(vm.memory(), sregs, 0);
        let mut b = [0u8; 1];
        match virt.read(rip, &mut b, Access::Inspect) {
            Ok(()) if b[0] == INT3 => {
                self.counters.guest_int3.fetch_add(1, Ordering::Relaxed);
                BreakpointAction::DeliverToGuest
            }
            _ => {
                // Our int3 was removed after the vCPU trapped: run the original.
                self.counters.stale_traps.fetch_add(1, Ordering::Relaxed);
                BreakpointAction::Resume
            }
        }
    }

    /// Stop the world, restore, step, re-plant.
    fn step_over(&self, site: &Site, vcpu: &mut dyn Vcpu, vm: &dyn VmControl) -> BreakpointAction {
        self.counters.single_stepped.fetch_add(1, Ordering::Relaxed);
        let world = World::stop(vm, Some(vcpu.index()));
        // While this vCPU waited to stop the world (it counts as parked
        // then), an API call may have removed the site or rebuilt it as a
        // new object. Act on what the table holds now, never on the stale
        // copy: re-planting from a removed site would leave an int3 nobody
        // owns, which the guest would then receive as its own #BP and
        // resume one byte into the instruction.
        let current = self.table.read().unwrap().sites.get(&site.addr).cloned();
        let Some(current) = current else {
            // Gone: the original byte is back; run it natively.
            return BreakpointAction::Resume;
        };
        text::step_in_place(&world, vm.memory(), &current, vcpu);
        BreakpointAction::Resume
    }
}

/// An `override` action: the function returns `value` at once (RAX set,
/// the return emulated); false if the return address could not be read or
/// the registers not set, and the function then runs as usual.
fn returned_at_once(vcpu: &mut dyn Vcpu, regs: &Regs, virt: &GuestVirt<'_>, value: u64) -> bool {
    action::override_return(regs, virt, value).is_some_and(|out| vcpu.set_regs(&out).is_ok())
}
