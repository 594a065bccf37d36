//! The one owner of a vCPU's guest-debug state.
//!
//! `KVM_SET_GUEST_DEBUG` replaces the whole setting each time, so callers
//! that want software breakpoints (`USE_SW_BP`), a single-step, or hardware
//! execute breakpoints (DR0..DR3, used by the system-call bridge) must not
//! issue it themselves: they change their part here and [`GuestDebug::control`]
//! composes all parts into one `kvm_guest_debug`.

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

    /// The slot whose armed address is `pc`, if any (and not suppressed).
    pub fn slot_at(&self, pc: u64) -> Option<usize> {
        if self.hw_suppressed {
            return None;
        }
        self.hw.iter().position(|s| *s == Some(pc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
