//! The system-call bridge's exits, as methods of the vCPU runner: following
//! the guest IDT (`bridge_refresh`, before each KVM_RUN) and completing a
//! hit on one of its hardware breakpoints (`bridge_exit`). The bridge's
//! configuration, gate decoding and per-vCPU state are in [`crate::bridge`],
//! which does not depend on the runner.

use crate::cpu::flat_long_mode_segment;
use crate::gaps::GapCpu;
use guest_access::GuestMemory;
use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::SyncReg;
use std::sync::atomic::Ordering;

use super::VcpuRunner;
use crate::bridge::*;

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap())
}

/// The entry prologue's view of guest memory: the vCPU's page tables.
struct EntryMem<'a>(&'a mut VcpuRunner);

impl EntryMemory for EntryMem<'_> {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_virt(gva, buf)
    }
    fn write(&mut self, gva: u64, data: &[u8]) -> Result<(), String> {
        self.0.write_virt(gva, data)
    }
}

/// insn-emu's view of guest memory: the vCPU's current page tables.
struct EmuMem<'a>(&'a mut VcpuRunner);

impl insn_emu::GuestMemory for EmuMem<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), insn_emu::MemFault> {
        self.0
            .read_virt(addr, buf)
            .map_err(|_| insn_emu::MemFault { addr })
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), insn_emu::MemFault> {
        self.0
            .write_virt(addr, data)
            .map_err(|_| insn_emu::MemFault { addr })
    }
}

fn to_emu(r: &kvm_regs) -> insn_emu::Regs {
    insn_emu::Regs {
        gpr: [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn from_emu(e: &insn_emu::Regs, r: &mut kvm_regs) {
    let g = e.gpr;
    (r.rax, r.rcx, r.rdx, r.rbx) = (g[0], g[1], g[2], g[3]);
    (r.rsp, r.rbp, r.rsi, r.rdi) = (g[4], g[5], g[6], g[7]);
    (r.r8, r.r9, r.r10, r.r11) = (g[8], g[9], g[10], g[11]);
    (r.r12, r.r13, r.r14, r.r15) = (g[12], g[13], g[14], g[15]);
    r.rip = e.rip;
    r.rflags = e.rflags;
}

impl VcpuRunner {
    /// Follow the guest's live IDT: re-arm DR0/DR1 when the #PF or #UD gate
    /// changed. Runs before every KVM_RUN, the first included (KVM_GET_SREGS
    /// then, the sync-regs copy after); costs two 16-byte reads of guest RAM
    /// unless IDTR or CR3 changed.
    pub(crate) fn bridge_refresh(&mut self) {
        let sregs = match self.current_sregs() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("system-call bridge cannot read the IDT: {e}");
                return;
            }
        };
        // Only a 64-bit guest that enabled `syscall` (EFER.SCE; Linux does at
        // CPU init) gets the breakpoints: armed DR0..DR3 make every VM entry
        // and exit dearer on this host (measured: a bare exit ~2x).
        let (pf, ud) = if sregs.efer & EFER_LMA == 0 || sregs.efer & EFER_SCE == 0 {
            self.bridge.key = None;
            (None, None)
        } else {
            let key = (sregs.idt.base, sregs.idt.limit, sregs.cr3);
            if self.bridge.key != Some(key) {
                self.bridge.key = Some(key);
                self.bridge.pf_gpa = self.gate_gpa(sregs.idt.base, sregs.idt.limit, PF_VECTOR);
                self.bridge.ud_gpa = self.gate_gpa(sregs.idt.base, sregs.idt.limit, UD_VECTOR);
            }
            let read = |gpa: Option<u64>, me: &Self| {
                let gpa = gpa?;
                let mut b = [0u8; 16];
                me.shared.ram.read_phys(gpa, &mut b).ok()?;
                Some(b)
            };
            (
                read(self.bridge.pf_gpa, self),
                read(self.bridge.ud_gpa, self),
            )
        };
        if pf == self.bridge.pf_raw && ud == self.bridge.ud_raw && self.bridge.looked {
            return;
        }
        self.bridge.looked = true;
        self.bridge.pf_raw = pf;
        self.bridge.ud_raw = ud;
        let pf_gate = pf.as_ref().and_then(parse_gate);
        let ud_gate = ud.as_ref().and_then(parse_gate);
        self.bridge.no_pf_handler = pf_gate.is_none();
        let want = (pf_gate.map(|g| g.handler), ud_gate.map(|g| g.handler));
        if (self.debug.hw[PF_SLOT], self.debug.hw[UD_SLOT]) == want {
            return;
        }
        self.debug.hw[PF_SLOT] = want.0;
        self.debug.hw[UD_SLOT] = want.1;
        let stats = &self.shared.stats[self.index];
        stats.bridge_rearms.fetch_add(1, Ordering::Relaxed);
        if pf_gate.is_none() {
            stats.bridge_no_pf_handler.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            "vCPU {}: system-call bridge follows the IDT at {:#x}: #PF entry {:?}, #UD entry {:?}",
            self.index,
            sregs.idt.base,
            want.0.map(|a| format!("{a:#x}")),
            want.1.map(|a| format!("{a:#x}"))
        );
        if let Err(e) = self.apply_debug() {
            tracing::warn!(
                "vCPU {}: cannot arm the system-call bridge: {e}",
                self.index
            );
        }
    }

    fn gate_gpa(&mut self, base: u64, limit: u16, vector: u64) -> Option<u64> {
        if u64::from(limit) < vector * 16 + 15 {
            return None;
        }
        let gva = base.wrapping_add(vector * 16);
        // A gate never straddles a page in a 16-byte-aligned IDT; check anyway.
        if gva & 0xfff > 0xff0 {
            return None;
        }
        self.gva_to_gpa(gva).ok()
    }

    /// A VM exit at one of the bridge's breakpoints. `Err` stops the vCPU.
    pub(crate) fn bridge_exit(&mut self, slot: usize, pc: u64) -> Result<(), String> {
        match slot {
            PF_SLOT => self.bridge_page_fault(pc),
            UD_SLOT => self.bridge_invalid_opcode(pc),
            _ => Err(format!("hardware breakpoint slot {slot} has no owner")),
        }
    }

    /// STAR, LSTAR, SFMASK and KERNEL_GS_BASE, in one KVM_GET_MSRS.
    fn syscall_msrs(&self) -> Result<[u64; 4], String> {
        let entry = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut m = Msrs::from_entries(&[
            entry(MSR_STAR),
            entry(MSR_LSTAR),
            entry(MSR_SFMASK),
            entry(MSR_KERNEL_GS_BASE),
        ])
        .map_err(|e| format!("MSR list: {e:?}"))?;
        self.count_ioctl();
        let n = self
            .fd
            .get_msrs(&mut m)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        if n != 4 {
            return Err(format!("KVM_GET_MSRS returned {n} of 4"));
        }
        let e = m.as_slice();
        Ok([e[0].data, e[1].data, e[2].data, e[3].data])
    }

    fn set_kernel_gs_base(&self, value: u64) -> Result<(), String> {
        let m = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            data: value,
            ..Default::default()
        }])
        .map_err(|e| format!("MSR list: {e:?}"))?;
        self.count_ioctl();
        match self.fd.set_msrs(&m) {
            Ok(1) => Ok(()),
            Ok(n) => Err(format!("KVM_SET_MSRS(KERNEL_GS_BASE) set {n} of 1")),
            Err(e) => Err(format!("KVM_SET_MSRS(KERNEL_GS_BASE): {e}")),
        }
    }

    fn bridge_page_fault(&mut self, pc: u64) -> Result<(), String> {
        let mut regs = self.fd.sync_regs().regs;
        let mut sregs = self.fd.sync_regs().sregs;
        let mut frame = [0u8; 48];
        if self.read_virt(regs.rsp, &mut frame).is_ok() && sregs.efer & EFER_SCE != 0 {
            let (err, rip, cs, rflags, rsp) = (
                u64_at(&frame, 0),
                u64_at(&frame, 1),
                u64_at(&frame, 2),
                u64_at(&frame, 3),
                u64_at(&frame, 4),
            );
            if cs & 3 == 3 && is_user_fetch(err, sregs.efer, sregs.cr4) {
                let [star, lstar, sfmask, kernel_gs_base] = self.syscall_msrs()?;
                if rip == lstar && sregs.cr2 == lstar {
                    let kcs = ((star >> 32) & 0xffff) as u16;
                    regs.rflags = (rflags & !(sfmask | RFLAGS_RF)) | 2;
                    regs.r11 = (regs.r11 & USER_RFLAGS) | 2;
                    sregs.cs = flat_long_mode_segment(kcs, true, 0);
                    sregs.ss = flat_long_mode_segment(kcs.wrapping_add(8), false, 0);
                    // The entry up to its kernel stack runs here, never in
                    // the guest (see crate::bridge: an interrupt this host
                    // delivers there would land on the user stack).
                    let mut st = EntryState {
                        rip: lstar,
                        rsp,
                        gs_base: sregs.gs.base,
                        kernel_gs_base,
                    };
                    let done = run_entry_prologue(&mut EntryMem(self), &mut st);
                    if st.kernel_gs_base != kernel_gs_base {
                        self.set_kernel_gs_base(st.kernel_gs_base)?;
                    }
                    (regs.rip, regs.rsp, sregs.gs.base) = (st.rip, st.rsp, st.gs_base);
                    let stats = &self.shared.stats[self.index];
                    if done.on_kernel_stack {
                        stats.bridge_entries_on_host.fetch_add(1, Ordering::Relaxed);
                    }
                    self.fd.sync_regs_mut().regs = regs;
                    self.fd.sync_regs_mut().sregs = sregs;
                    self.fd.set_sync_dirty_reg(SyncReg::Register);
                    self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                    stats.bridge_syscalls.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        self.pass_on_counted(pc)
    }

    fn bridge_invalid_opcode(&mut self, pc: u64) -> Result<(), String> {
        let mut regs = self.fd.sync_regs().regs;
        let sregs = self.fd.sync_regs().sregs;
        let mut frame = [0u8; 40];
        if self.read_virt(regs.rsp, &mut frame).is_ok() {
            let (rip, cs, rflags) = (u64_at(&frame, 0), u64_at(&frame, 1), u64_at(&frame, 2));
            let mut insn = [0u8; 2];
            let is_int80 =
                cs & 3 == 3 && self.read_virt(rip, &mut insn).is_ok() && insn == [0xcd, 0x80];
            let gates = if is_int80 {
                let ud = self.bridge.ud_raw.as_ref().and_then(parse_gate);
                let int80 = self
                    .gate_gpa(sregs.idt.base, sregs.idt.limit, INT80_VECTOR)
                    .and_then(|gpa| {
                        let mut b = [0u8; 16];
                        self.shared.ram.read_phys(gpa, &mut b).ok()?;
                        parse_gate(&b)
                    });
                ud.zip(int80)
            } else {
                None
            };
            if let Some((ud, g)) = gates {
                if g.dpl == 3 && g.ist == 0 && ud.ist == 0 {
                    self.write_virt(regs.rsp, &(rip + 2).to_le_bytes())?;
                    regs.rip = g.handler;
                    // The #UD gate may have cleared IF where a trap gate would not.
                    if g.kind == 0xf {
                        regs.rflags |= rflags & RFLAGS_IF;
                    }
                    self.fd.sync_regs_mut().regs = regs;
                    self.fd.set_sync_dirty_reg(SyncReg::Register);
                    self.shared.stats[self.index]
                        .bridge_int80
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
        self.pass_on_counted(pc)
    }

    /// Not a system call: count it and let the guest's handler have it.
    fn pass_on_counted(&mut self, pc: u64) -> Result<(), String> {
        self.shared.stats[self.index]
            .bridge_faults_passed
            .fetch_add(1, Ordering::Relaxed);
        self.pass_on(pc)
    }

    /// Let the guest's own handler run: execute its first instruction on the
    /// host (RF does not suppress the breakpoint on this host), or single-step
    /// it with the hardware breakpoints left out when the emulator refuses.
    fn pass_on(&mut self, pc: u64) -> Result<(), String> {
        let mut code = [0u8; 16];
        let mut got = 0;
        // The entry may sit near the end of a page: take what is readable.
        for n in [16usize, 8, 4, 2, 1] {
            if self.read_virt(pc, &mut code[..n]).is_ok() {
                got = n;
                break;
            }
        }
        if got > 0 {
            if let Ok(d) = insn_emu::prepare(&code[..got], pc) {
                if d.is_emulated() {
                    let mut kregs = self.fd.sync_regs().regs;
                    let mut e = to_emu(&kregs);
                    if d.emulate(&mut e, &mut EmuMem(self)).is_ok() {
                        from_emu(&e, &mut kregs);
                        self.fd.sync_regs_mut().regs = kregs;
                        self.fd.set_sync_dirty_reg(SyncReg::Register);
                        return Ok(());
                    }
                }
            }
        }
        self.shared.stats[self.index]
            .bridge_step_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        self.step_without_hw_breakpoints(pc)
            .map_err(|e| format!("stepping over the handler entry at {pc:#x}: {e}"))
    }
}
