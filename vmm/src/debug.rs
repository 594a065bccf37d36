//! The one owner of a vCPU's guest-debug state.
//!
//! `KVM_SET_GUEST_DEBUG` replaces the whole setting each time, so callers
//! that want software breakpoints (`USE_SW_BP`), a single-step, or hardware
//! execute breakpoints (DR0..DR3, used by the system-call bridge) must not
//! issue it themselves: they change their part here and [`GuestDebug::control`]
//! composes all parts into one `kvm_guest_debug`.
//!
//! The four debug-register slots are few and shared by the whole VM:
//! [`HwSlots`] allocates them explicitly. The system-call bridge reserves
//! its two (DR0, DR1) when the VM is created and keeps them; the probe
//! engine claims the others for hardware-breakpoint probes, and a claim
//! beyond what is free is refused with who holds what. Each vCPU copies the
//! engine's slots into its own [`GuestDebug`] before its next KVM_RUN
//! ([`GuestDebug::take_engine_slots`]), so the guest-debug ioctl is still
//! issued by that vCPU's thread alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use guest_access::{HwSlotError, HwSlotUse};
use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};

/// Number of hardware breakpoint slots (DR0..DR3).
pub(crate) const HW_SLOTS: usize = 4;

/// What each user of the guest-debug state asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GuestDebug {
    /// Route `int3` to the VMM (`KVM_GUESTDBG_USE_SW_BP`).
    pub sw_bp: bool,
    /// Single-step the next instruction.
    pub step: bool,
    /// `KVM_GUESTDBG_BLOCKIRQ` when the host supports it (0 otherwise),
    /// added to a single-step.
    pub blockirq_flag: u32,
    /// Execute breakpoints, by slot (DR0..DR3).
    pub hw: [Option<u64>; HW_SLOTS],
    /// Which slots hold the probe engine's breakpoints (the rest are the
    /// bridge's): a #DB there goes to the breakpoint handler.
    pub engine: [bool; HW_SLOTS],
    /// The [`HwSlots`] generation last copied in.
    pub engine_generation: u64,
    /// Leave the hardware breakpoints out for now (stepping over the
    /// instruction one of them sits on), without forgetting them.
    pub hw_suppressed: bool,
}

impl GuestDebug {
    /// The composed `KVM_SET_GUEST_DEBUG` argument.
    pub fn control(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let mut control = KVM_GUESTDBG_ENABLE;
        if self.sw_bp {
            control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if self.step {
            control |= KVM_GUESTDBG_SINGLESTEP | self.blockirq_flag;
        }
        let mut dr7 = 0u64;
        if !self.hw_suppressed {
            for (i, slot) in self.hw.iter().enumerate() {
                if let Some(addr) = slot {
                    dbg.arch.debugreg[i] = *addr;
                    // L_i | G_i; R/W = 00 (execute) and LEN = 00 (1 byte).
                    dr7 |= 0x3 << (2 * i);
                }
            }
        }
        if dr7 != 0 {
            control |= KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[7] = dr7;
        }
        dbg.control = control;
        dbg
    }

    /// Copy the engine's slots from the VM-wide table (`slots[i]` is the
    /// engine's address in slot i, None where the engine has none). True
    /// when anything changed: the caller pushes the state to KVM.
    pub fn take_engine_slots(&mut self, slots: [Option<u64>; HW_SLOTS], generation: u64) -> bool {
        let mut changed = false;
        for (i, want) in slots.iter().enumerate() {
            if want.is_some() || self.engine[i] {
                changed |= self.hw[i] != *want;
                self.hw[i] = *want;
                self.engine[i] = want.is_some();
            }
        }
        self.engine_generation = generation;
        changed
    }

    /// The slot whose armed address is `pc`, if any (and not suppressed).
    pub fn slot_at(&self, pc: u64) -> Option<usize> {
        if self.hw_suppressed {
            return None;
        }
        self.hw.iter().position(|s| *s == Some(pc))
    }
}

/// Who holds a debug-register slot of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Holder {
    /// The system-call bridge (it follows the guest IDT per vCPU).
    Bridge,
    /// A hardware breakpoint of the probe engine, at `addr`.
    Engine { owner: String, addr: u64 },
}

/// The VM-wide allocation of DR0..DR3. Lock: its own mutex, taken alone.
#[derive(Debug)]
pub(crate) struct HwSlots {
    held: Mutex<[Option<Holder>; HW_SLOTS]>,
    /// Bumped on every engine change; vCPUs compare it before KVM_RUN.
    generation: AtomicU64,
}

impl HwSlots {
    /// Slots `bridge` reserved for the system-call bridge, the rest free.
    pub fn new(bridge: &[usize]) -> Self {
        let mut held: [Option<Holder>; HW_SLOTS] = Default::default();
        for &i in bridge {
            held[i] = Some(Holder::Bridge);
        }
        Self {
            held: Mutex::new(held),
            generation: AtomicU64::new(0),
        }
    }

    /// Take a free slot for an execute breakpoint at `addr`.
    pub fn claim(&self, addr: u64, owner: &str) -> Result<usize, HwSlotError> {
        let mut held = self.held.lock().unwrap();
        let Some(i) = held.iter().position(Option::is_none) else {
            return Err(HwSlotError::NoneFree {
                addr,
                total: HW_SLOTS,
                holders: describe(&held),
            });
        };
        held[i] = Some(Holder::Engine {
            owner: owner.to_string(),
            addr,
        });
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(i)
    }

    /// Give an engine slot back (a bridge slot or a free one is left alone).
    pub fn release(&self, slot: usize) {
        let mut held = self.held.lock().unwrap();
        if let Some(Some(Holder::Engine { .. })) = held.get(slot) {
            held[slot] = None;
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The engine's address in each slot (None: free or the bridge's), and
    /// the generation they belong to.
    pub fn engine_slots(&self) -> ([Option<u64>; HW_SLOTS], u64) {
        let held = self.held.lock().unwrap();
        let slots = std::array::from_fn(|i| match &held[i] {
            Some(Holder::Engine { addr, .. }) => Some(*addr),
            _ => None,
        });
        (slots, self.generation())
    }

    /// Every held slot, for listings.
    pub fn uses(&self) -> Vec<HwSlotUse> {
        let held = self.held.lock().unwrap();
        held.iter()
            .enumerate()
            .filter_map(|(slot, h)| {
                h.as_ref().map(|h| match h {
                    Holder::Bridge => HwSlotUse {
                        slot,
                        owner: "system-call bridge".into(),
                        addr: None,
                    },
                    Holder::Engine { owner, addr } => HwSlotUse {
                        slot,
                        owner: owner.clone(),
                        addr: Some(*addr),
                    },
                })
            })
            .collect()
    }
}

/// "DR0: system-call bridge, DR2: probe t/x at 0x..." for a refusal.
fn describe(held: &[Option<Holder>; HW_SLOTS]) -> String {
    let parts: Vec<String> = held
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            h.as_ref().map(|h| match h {
                Holder::Bridge => format!("DR{i}: system-call bridge"),
                Holder::Engine { owner, addr } => format!("DR{i}: {owner} at {addr:#x}"),
            })
        })
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_keeps_its_slots_and_a_fifth_claim_is_refused() {
        let slots = HwSlots::new(&[0, 1]);
        assert_eq!(slots.claim(0x1000, "probe a/b").unwrap(), 2);
        assert_eq!(slots.claim(0x2000, "probe a/c").unwrap(), 3);
        let err = slots.claim(0x3000, "probe a/d").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("all 4"), "{msg}");
        assert!(msg.contains("DR0: system-call bridge"), "{msg}");
        assert!(msg.contains("DR3: probe a/c at 0x2000"), "{msg}");
        assert!(msg.contains("0x3000"), "{msg}");
        // A bridge slot is never given away by a release.
        slots.release(0);
        assert!(slots.claim(0x3000, "probe a/d").is_err());
        slots.release(2);
        assert_eq!(slots.claim(0x3000, "probe a/d").unwrap(), 2);
        let (engine, _) = slots.engine_slots();
        assert_eq!(engine, [None, None, Some(0x3000), Some(0x2000)]);
        assert_eq!(slots.uses().len(), 4);
    }

    #[test]
    fn engine_slots_are_copied_without_touching_the_bridge_slots() {
        let slots = HwSlots::new(&[0, 1]);
        let mut d = GuestDebug::default();
        d.hw[0] = Some(0xaaaa);
        let g0 = slots.generation();
        let i = slots.claim(0x5000, "probe p").unwrap();
        assert_ne!(slots.generation(), g0);
        let (engine, g) = slots.engine_slots();
        assert!(d.take_engine_slots(engine, g));
        assert_eq!(d.hw[0], Some(0xaaaa));
        assert_eq!(d.hw[i], Some(0x5000));
        assert!(d.engine[i] && !d.engine[0]);
        assert!(!d.take_engine_slots(engine, g), "nothing changed");
        slots.release(i);
        let (engine, g) = slots.engine_slots();
        assert!(d.take_engine_slots(engine, g));
        assert_eq!(d.hw[i], None);
        assert!(!d.engine[i]);
        assert_eq!(d.hw[0], Some(0xaaaa));
    }

    #[test]
    fn sw_bp_alone() {
        let d = GuestDebug {
            sw_bp: true,
            ..Default::default()
        };
        let c = d.control();
        assert_eq!(c.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP);
        assert_eq!(c.arch.debugreg, [0; 8]);
    }

    #[test]
    fn step_keeps_the_hardware_breakpoints() {
        let mut d = GuestDebug {
            sw_bp: true,
            blockirq_flag: 0x100,
            ..Default::default()
        };
        d.hw[0] = Some(0xffff_ffff_8100_1000);
        d.hw[1] = Some(0xffff_ffff_8100_2000);
        d.step = true;
        let c = d.control();
        assert_eq!(
            c.control,
            KVM_GUESTDBG_ENABLE
                | KVM_GUESTDBG_USE_SW_BP
                | KVM_GUESTDBG_SINGLESTEP
                | 0x100
                | KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(c.arch.debugreg[0], 0xffff_ffff_8100_1000);
        assert_eq!(c.arch.debugreg[1], 0xffff_ffff_8100_2000);
        assert_eq!(c.arch.debugreg[7], 0xf);
        assert_eq!(d.slot_at(0xffff_ffff_8100_2000), Some(1));
        assert_eq!(d.slot_at(0x1234), None);
    }

    #[test]
    fn suppressed_slots_are_left_out_but_kept() {
        let mut d = GuestDebug::default();
        d.hw[3] = Some(0x5000);
        assert_eq!(d.control().arch.debugreg[7], 0xc0);
        d.hw_suppressed = true;
        d.step = true;
        let c = d.control();
        assert_eq!(c.control & KVM_GUESTDBG_USE_HW_BP, 0);
        assert_eq!(c.arch.debugreg[7], 0);
        assert_eq!(d.slot_at(0x5000), None);
        d.hw_suppressed = false;
        assert_eq!(d.slot_at(0x5000), Some(3));
    }
}
