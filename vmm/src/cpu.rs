//! Initial vCPU state: CPUID, MSRs, LAPIC, FPU, and the boot CPU's registers
//! for the PVH or 64-bit entry.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::layout;
use crate::loader::BootEntry;
use guest_access::GuestMemory;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// CPUID for vCPU `id`: what KVM supports, with the APIC id and the
/// hypervisor bit set. (This machine's emulating KVM does not honour it, but
/// hardware KVM does.)
pub fn cpuid_for(base: &CpuId, id: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// What KVM supports, minus the paravirtual features whose guest side is a
/// hypercall when `hide_hypercalls` (a host whose KVM emulates guest kernel
/// code). KVM's emulator "fixes" every `vmcall`/`vmmcall` it emulates by
/// rewriting the instruction in place; kernel text is read-only, so the
/// write faults (#PF at the hypercall) and the guest oopses. Linux then
/// falls back to native IPIs, spinlocks and yields, which work.
pub fn supported_cpuid(kvm: &Kvm, hide_hypercalls: bool) -> Result<CpuId, String> {
    let mut c = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    if hide_hypercalls {
        for e in c.as_mut_slice() {
            if e.function == KVM_CPUID_FEATURES {
                e.eax &= !HYPERCALL_FEATURES;
            }
        }
    }
    Ok(c)
}

/// CPUID leaf of KVM's paravirtual feature bits (eax).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_UNHALT (spinlock kick, KVM_HC_KICK_CPU),
/// KVM_FEATURE_PV_SEND_IPI (KVM_HC_SEND_IPI) and KVM_FEATURE_PV_SCHED_YIELD
/// (KVM_HC_SCHED_YIELD): the features a 6.1 guest drives with hypercalls.
const HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// State common to every vCPU.
pub fn setup_common(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), String> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    vcpu.set_msrs(&msrs)
        .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| format!("KVM_GET_LAPIC: {e}"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[off + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *x as std::os::raw::c_char;
    }
}

/// A flat long-mode segment: 64-bit code (type 11) or data (type 3) at `dpl`,
/// as Linux's GDT has them (the system-call bridge and the detection VM).
pub(crate) fn flat_long_mode_segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        dpl,
        ..segment(selector, if code { 11 } else { 3 }, code, 1)
    }
}

fn segment(selector: u16, type_: u8, long: bool, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long && s == 1),
        s,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Registers of the boot CPU for `entry`; writes the GDT (and page tables for
/// the 64-bit entry) into guest memory.
pub fn setup_boot_cpu(
    vcpu: &VcpuFd,
    mem: &dyn GuestMemory,
    entry: BootEntry,
) -> Result<(), String> {
    let long = matches!(entry, BootEntry::Linux64 { .. });
    let code: u64 = if long {
        0x00af_9b00_0000_ffff
    } else {
        0x00cf_9b00_0000_ffff
    };
    let gdt: [u64; 4] = [0, code, 0x00cf_9300_0000_ffff, 0x008b_0000_0000_0067];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_phys(layout::GDT_ADDR, &bytes)
        .map_err(|e| e.to_string())?;

    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = u16::try_from(bytes.len() - 1).expect("the boot GDT fits a 16-bit limit");
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(0x08, 0xb, long, 1);
    let data = segment(0x10, 0x3, false, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut tr = segment(0x18, 0xb, false, 0);
    tr.limit = 0x67;
    tr.g = 0;
    tr.db = 0;
    sregs.tr = tr;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            // Identity map of the first 1 GiB with 2 MiB pages.
            mem.write_phys(layout::PML4_ADDR, &(layout::PDPT_ADDR | 0x3).to_le_bytes())
                .map_err(|e| e.to_string())?;
            mem.write_phys(layout::PDPT_ADDR, &(layout::PD_ADDR | 0x3).to_le_bytes())
                .map_err(|e| e.to_string())?;
            let pd: Vec<u8> = (0..512u64)
                .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
                .collect();
            mem.write_phys(layout::PD_ADDR, &pd)
                .map_err(|e| e.to_string())?;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10u8 as std::os::raw::c_char; // vector bits
        regs[APIC_LVT0 + 2] = 1; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let v = u32::from_le_bytes([
            regs[APIC_LVT0] as u8,
            regs[APIC_LVT0 + 1] as u8,
            regs[APIC_LVT0 + 2] as u8,
            regs[APIC_LVT0 + 3] as u8,
        ]);
        assert_eq!(v, 0x10 | (7 << 8) | (1 << 16));
    }
}
