//! Conversions between KVM's register structures and guest-access's.
//! A leaf: used by the vCPU runner and the snapshot state code.

use guest_access::{Regs, SystemRegs};
use kvm_bindings::kvm_regs;

const EFER_LMA: u64 = 0x400;

pub(crate) fn to_regs(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(crate) fn to_kvm_regs(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(crate) fn to_system_regs(s: &kvm_bindings::kvm_sregs) -> SystemRegs {
    SystemRegs {
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        cpl: s.ss.dpl,
        long_mode: s.efer & EFER_LMA != 0 && s.cs.l != 0,
        gs_base: s.gs.base,
        kernel_gs_base: 0,
        idt_base: s.idt.base,
    }
}
