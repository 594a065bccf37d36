//! Instructions an instruction-emulating KVM cannot emulate, completed by the
//! VMM when KVM reports the emulation failure (RIP at the instruction).
//!
//! Measured on this project's machines (DESIGN.md, and found booting Debian
//! 6.1 with hvprobe): `fwait`, `popcnt`, `ldmxcsr` in `kernel_fpu_begin`, and
//! with `noxsave` the FXSAVE/FXRSTOR pair the kernel uses to switch FPU state.
//! Each is small and architecturally simple; anything else stays a failure.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

/// Guest access needed to complete an instruction.
pub(crate) trait GapCpu {
    fn regs(&mut self) -> kvm_regs;
    fn sregs(&mut self) -> kvm_sregs;
    fn set_regs(&mut self, regs: &kvm_regs);
    fn fpu(&mut self) -> Result<kvm_fpu, String>;
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), String>;
    /// Read guest virtual memory (the vCPU's current paging).
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), String>;
}

/// What the filler did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gap {
    /// Completed; RIP is past the instruction.
    Completed(Mnemonic),
    /// Not an instruction the filler knows.
    Unknown,
}

fn gpr(r: &kvm_regs, reg: Register) -> Option<u64> {
    let full = reg.full_register();
    let v = match full {
        Register::RAX => r.rax,
        Register::RCX => r.rcx,
        Register::RDX => r.rdx,
        Register::RBX => r.rbx,
        Register::RSP => r.rsp,
        Register::RBP => r.rbp,
        Register::RSI => r.rsi,
        Register::RDI => r.rdi,
        Register::R8 => r.r8,
        Register::R9 => r.r9,
        Register::R10 => r.r10,
        Register::R11 => r.r11,
        Register::R12 => r.r12,
        Register::R13 => r.r13,
        Register::R14 => r.r14,
        Register::R15 => r.r15,
        Register::RIP => r.rip,
        _ => return None,
    };
    Some(match reg.size() {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        1 if reg.is_gpr8()
            && !matches!(
                reg,
                Register::AH | Register::CH | Register::DH | Register::BH
            ) =>
        {
            v & 0xff
        }
        _ => return None,
    })
}

fn set_gpr(r: &mut kvm_regs, reg: Register, value: u64) -> bool {
    let slot = match reg.full_register() {
        Register::RAX => &mut r.rax,
        Register::RCX => &mut r.rcx,
        Register::RDX => &mut r.rdx,
        Register::RBX => &mut r.rbx,
        Register::RSP => &mut r.rsp,
        Register::RBP => &mut r.rbp,
        Register::RSI => &mut r.rsi,
        Register::RDI => &mut r.rdi,
        Register::R8 => &mut r.r8,
        Register::R9 => &mut r.r9,
        Register::R10 => &mut r.r10,
        Register::R11 => &mut r.r11,
        Register::R12 => &mut r.r12,
        Register::R13 => &mut r.r13,
        Register::R14 => &mut r.r14,
        Register::R15 => &mut r.r15,
        _ => return false,
    };
    match reg.size() {
        8 => *slot = value,
        // 32-bit writes zero-extend; 16-bit writes merge.
        4 => *slot = value & 0xffff_ffff,
        2 => *slot = (*slot & !0xffff) | (value & 0xffff),
        _ => return false,
    }
    true
}

/// Effective address of the memory operand.
fn address(insn: &Instruction, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
    let base = match insn.memory_base() {
        Register::None => 0,
        // iced already folds the next-RIP into the displacement for RIP-relative.
        Register::RIP => return Some(insn.memory_displacement64()),
        b => gpr(regs, b)?,
    };
    let index = match insn.memory_index() {
        Register::None => 0,
        i => gpr(regs, i)? * u64::from(insn.memory_index_scale()),
    };
    let seg = match insn.memory_segment() {
        Register::FS => sregs.fs.base,
        Register::GS => sregs.gs.base,
        _ => 0,
    };
    Some(
        seg.wrapping_add(base)
            .wrapping_add(index)
            .wrapping_add(insn.memory_displacement64()),
    )
}

/// The 512-byte FXSAVE image of `fpu` (64-bit layout when `rex_w`).
fn fxsave_image(fpu: &kvm_fpu, rex_w: bool) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[4] = fpu.ftwx;
    b[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    if rex_w {
        b[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
        b[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    } else {
        // The 32-bit FXSAVE layout keeps the low halves of FIP and FDP.
        #[allow(clippy::cast_possible_truncation)]
        let (fip, fdp) = (fpu.last_ip as u32, fpu.last_dp as u32);
        b[8..12].copy_from_slice(&fip.to_le_bytes());
        b[16..20].copy_from_slice(&fdp.to_le_bytes());
    }
    b[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    // MXCSR_MASK: every bit KVM lets the guest set (incl. DAZ).
    b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        b[32 + 16 * i..32 + 16 * i + 16].copy_from_slice(st);
    }
    for (i, x) in fpu.xmm.iter().enumerate() {
        b[160 + 16 * i..160 + 16 * i + 16].copy_from_slice(x);
    }
    b
}

fn fxrstor_image(fpu: &mut kvm_fpu, b: &[u8; 512], rex_w: bool) {
    fpu.fcw = u16::from_le_bytes([b[0], b[1]]);
    fpu.fsw = u16::from_le_bytes([b[2], b[3]]);
    fpu.ftwx = b[4];
    fpu.last_opcode = u16::from_le_bytes([b[6], b[7]]);
    if rex_w {
        fpu.last_ip = u64::from_le_bytes(b[8..16].try_into().unwrap());
        fpu.last_dp = u64::from_le_bytes(b[16..24].try_into().unwrap());
    } else {
        fpu.last_ip = u64::from(u32::from_le_bytes(b[8..12].try_into().unwrap()));
        fpu.last_dp = u64::from(u32::from_le_bytes(b[16..20].try_into().unwrap()));
    }
    fpu.mxcsr = u32::from_le_bytes(b[24..28].try_into().unwrap());
    for (i, st) in fpu.fpr.iter_mut().enumerate() {
        st.copy_from_slice(&b[32 + 16 * i..32 + 16 * i + 16]);
    }
    for (i, x) in fpu.xmm.iter_mut().enumerate() {
        x.copy_from_slice(&b[160 + 16 * i..160 + 16 * i + 16]);
    }
}

/// What `lsl` finds for a selector.
enum SegLimit {
    /// ZF=1 and this (byte-granular) limit.
    Limit(u32),
    /// ZF=0: null, outside the GDT, a type without a limit, or not
    /// visible at this privilege.
    Invalid,
    /// An LDT selector: not emulated (Linux's kernel uses the GDT only).
    Unknown,
}

/// `lsl`'s check and result, from the GDT descriptor (Linux's paranoid
/// entry reads its CPU number this way: the CPUNODE segment's limit).
fn segment_limit(
    cpu: &mut dyn GapCpu,
    sregs: &kvm_sregs,
    selector: u64,
) -> Result<SegLimit, String> {
    if selector & 0x4 != 0 {
        return Ok(SegLimit::Unknown);
    }
    let index = selector >> 3;
    if index == 0 || index * 8 + 7 > u64::from(sregs.gdt.limit) {
        return Ok(SegLimit::Invalid);
    }
    let mut b = [0u8; 8];
    cpu.read_virt(sregs.gdt.base.wrapping_add(index * 8), &mut b)?;
    let d = u64::from_le_bytes(b);
    let system = d & (1 << 44) == 0;
    let ty = (d >> 40) & 0xf;
    let dpl = (d >> 45) & 3;
    let present = d & (1 << 47) != 0;
    let cpl = u64::from(sregs.ss.dpl);
    let rpl = selector & 3;
    let visible = if system {
        // 64-bit mode: LDT, available and busy TSS have limits.
        matches!(ty, 0x2 | 0x9 | 0xb) && dpl >= cpl.max(rpl)
    } else {
        let conforming_code = ty & 0xc == 0xc;
        conforming_code || dpl >= cpl.max(rpl)
    };
    if !present && system {
        return Ok(SegLimit::Invalid);
    }
    if !visible {
        return Ok(SegLimit::Invalid);
    }
    let raw = (d & 0xffff) | ((d >> 32) & 0xf_0000);
    let limit = if d & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    };
    Ok(SegLimit::Limit(u32::try_from(limit).unwrap_or(u32::MAX)))
}

/// Complete the instruction at RIP if it is one KVM's emulator lacks.
pub(crate) fn complete(cpu: &mut dyn GapCpu, code: &[u8]) -> Result<Gap, String> {
    let mut regs = cpu.regs();
    let sregs = cpu.sregs();
    let long = sregs.efer & 0x400 != 0 && sregs.cs.l != 0;
    let bits = if long {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    };
    let mut dec = Decoder::with_ip(bits, code, regs.rip, DecoderOptions::NONE);
    let insn = dec.decode();
    if insn.is_invalid() {
        return Ok(Gap::Unknown);
    }
    let mem = |insn: &Instruction| -> Result<u64, String> {
        address(insn, &regs, &sregs).ok_or_else(|| format!("cannot compute the address of {insn}"))
    };
    let rex_w = matches!(
        insn.code(),
        Code::Fxsave64_m512byte | Code::Fxrstor64_m512byte
    );
    match insn.mnemonic() {
        Mnemonic::Wait => {}
        Mnemonic::Fninit | Mnemonic::Finit => {
            let mut f = cpu.fpu()?;
            f.fcw = 0x37f;
            f.fsw = 0;
            f.ftwx = 0;
            f.last_opcode = 0;
            f.last_ip = 0;
            f.last_dp = 0;
            cpu.set_fpu(&f)?;
        }
        Mnemonic::Ldmxcsr => {
            let mut b = [0u8; 4];
            cpu.read_virt(mem(&insn)?, &mut b)?;
            let mut f = cpu.fpu()?;
            f.mxcsr = u32::from_le_bytes(b);
            cpu.set_fpu(&f)?;
        }
        Mnemonic::Stmxcsr => {
            let f = cpu.fpu()?;
            cpu.write_virt(mem(&insn)?, &f.mxcsr.to_le_bytes())?;
        }
        Mnemonic::Fxsave | Mnemonic::Fxsave64 => {
            let f = cpu.fpu()?;
            cpu.write_virt(mem(&insn)?, &fxsave_image(&f, rex_w))?;
        }
        Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
            let mut b = [0u8; 512];
            cpu.read_virt(mem(&insn)?, &mut b)?;
            let mut f = cpu.fpu()?;
            fxrstor_image(&mut f, &b, rex_w);
            cpu.set_fpu(&f)?;
        }
        Mnemonic::Popcnt => {
            let src = match insn.op1_kind() {
                OpKind::Register => gpr(&regs, insn.op1_register()).ok_or("bad popcnt source")?,
                OpKind::Memory => {
                    let size = insn.op0_register().size();
                    let mut b = [0u8; 8];
                    cpu.read_virt(mem(&insn)?, &mut b[..size])?;
                    u64::from_le_bytes(b)
                }
                _ => return Ok(Gap::Unknown),
            };
            let n = u64::from(src.count_ones());
            if !set_gpr(&mut regs, insn.op0_register(), n) {
                return Ok(Gap::Unknown);
            }
            // POPCNT: ZF = (src == 0); CF, OF, SF, AF, PF cleared.
            regs.rflags &= !(0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800);
            if src == 0 {
                regs.rflags |= 0x40;
            }
        }
        Mnemonic::Lsl => {
            let selector = match insn.op1_kind() {
                OpKind::Register => gpr(&regs, insn.op1_register()).ok_or("bad lsl source")?,
                OpKind::Memory => {
                    let mut b = [0u8; 2];
                    cpu.read_virt(mem(&insn)?, &mut b)?;
                    u64::from(u16::from_le_bytes(b))
                }
                _ => return Ok(Gap::Unknown),
            } & 0xffff;
            match segment_limit(cpu, &sregs, selector)? {
                SegLimit::Unknown => return Ok(Gap::Unknown),
                SegLimit::Invalid => regs.rflags &= !0x40,
                SegLimit::Limit(limit) => {
                    if !set_gpr(&mut regs, insn.op0_register(), u64::from(limit)) {
                        return Ok(Gap::Unknown);
                    }
                    regs.rflags |= 0x40;
                }
            }
        }
        _ => return Ok(Gap::Unknown),
    }
    regs.rip = insn.next_ip();
    cpu.set_regs(&regs);
    Ok(Gap::Completed(insn.mnemonic()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Linux's paranoid entry: `mov $__CPUNODE_SEG, %eax; lsl %rax, %rax`
    /// gives (node << 12) | cpu from the per-CPU GDT entry 15 (DPL 3).
    #[test]
    fn lsl_reads_the_cpunode_segment_limit() {
        let mut c = FakeCpu::new();
        c.sregs.gdt.base = 0x9000;
        c.sregs.gdt.limit = 16 * 8 - 1;
        // Data segment, present, DPL 3, limit (node 1 << 12) | cpu 1 = 0x1001.
        let desc: u64 = 0x1001 | (0x3 << 40) | (1 << 44) | (3 << 45) | (1 << 47);
        for (i, b) in desc.to_le_bytes().iter().enumerate() {
            c.mem.insert(0x9000 + 15 * 8 + i as u64, *b);
        }
        c.regs.rax = 15 * 8 + 3;
        let code = [0x48, 0x0f, 0x03, 0xc0];
        assert!(matches!(
            complete(&mut c, &code),
            Ok(Gap::Completed(Mnemonic::Lsl))
        ));
        assert_eq!(c.regs.rax, 0x1001);
        assert_ne!(c.regs.rflags & 0x40, 0, "ZF set");
        assert_eq!(c.regs.rip, 0x1004);
        // A selector past the GDT limit: ZF clear, destination unchanged.
        c.regs.rip = 0x1000;
        c.regs.rax = 40 * 8 + 3;
        assert!(matches!(
            complete(&mut c, &code),
            Ok(Gap::Completed(Mnemonic::Lsl))
        ));
        assert_eq!((c.regs.rax, c.regs.rflags & 0x40), (40 * 8 + 3, 0));
        // An LDT selector is left to KVM (reported, not guessed).
        c.regs.rip = 0x1000;
        c.regs.rax = 0x7;
        assert!(matches!(complete(&mut c, &code), Ok(Gap::Unknown)));
    }

    struct FakeCpu {
        regs: kvm_regs,
        sregs: kvm_sregs,
        fpu: kvm_fpu,
        mem: HashMap<u64, u8>,
    }

    impl FakeCpu {
        fn new() -> Self {
            let mut sregs = kvm_sregs {
                efer: 0x500,
                ..Default::default()
            };
            sregs.cs.l = 1;
            Self {
                regs: kvm_regs {
                    rip: 0x1000,
                    rsp: 0x8000,
                    rflags: 0x2,
                    ..Default::default()
                },
                sregs,
                fpu: kvm_fpu::default(),
                mem: HashMap::new(),
            }
        }
    }

    impl GapCpu for FakeCpu {
        fn regs(&mut self) -> kvm_regs {
            self.regs
        }
        fn sregs(&mut self) -> kvm_sregs {
            self.sregs
        }
        fn set_regs(&mut self, regs: &kvm_regs) {
            self.regs = *regs;
        }
        fn fpu(&mut self) -> Result<kvm_fpu, String> {
            Ok(self.fpu)
        }
        fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), String> {
            self.fpu = *fpu;
            Ok(())
        }
        fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), String> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *self.mem.get(&(gva + i as u64)).unwrap_or(&0);
            }
            Ok(())
        }
        fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), String> {
            for (i, b) in data.iter().enumerate() {
                self.mem.insert(gva + i as u64, *b);
            }
            Ok(())
        }
    }

    #[test]
    fn ldmxcsr_from_the_stack() {
        let mut c = FakeCpu::new();
        c.write_virt(0x8004, &0x1f80u32.to_le_bytes()).unwrap();
        // ldmxcsr [rsp+4], as in kernel_fpu_begin_mask
        let r = complete(&mut c, &[0x0f, 0xae, 0x54, 0x24, 0x04]).unwrap();
        assert_eq!(r, Gap::Completed(Mnemonic::Ldmxcsr));
        assert_eq!(c.fpu.mxcsr, 0x1f80);
        assert_eq!(c.regs.rip, 0x1005);
    }

    #[test]
    fn fxsave64_then_fxrstor64_round_trips() {
        let mut c = FakeCpu::new();
        c.fpu.fcw = 0x37f;
        c.fpu.mxcsr = 0x1fa0;
        c.fpu.xmm[3] = [7; 16];
        c.fpu.fpr[1] = [9; 16];
        c.regs.rdi = 0x9000;
        // fxsave64 [rdi]
        assert_eq!(
            complete(&mut c, &[0x48, 0x0f, 0xae, 0x07]).unwrap(),
            Gap::Completed(Mnemonic::Fxsave64)
        );
        let mut img = [0u8; 512];
        c.read_virt(0x9000, &mut img).unwrap();
        assert_eq!(&img[24..28], &0x1fa0u32.to_le_bytes());
        assert_eq!(&img[160 + 48..160 + 64], &[7; 16]);
        c.fpu = kvm_fpu::default();
        c.regs.rip = 0x1000;
        // fxrstor64 [rdi]
        assert_eq!(
            complete(&mut c, &[0x48, 0x0f, 0xae, 0x0f]).unwrap(),
            Gap::Completed(Mnemonic::Fxrstor64)
        );
        assert_eq!(c.fpu.fcw, 0x37f);
        assert_eq!(c.fpu.mxcsr, 0x1fa0);
        assert_eq!(c.fpu.xmm[3], [7; 16]);
        assert_eq!(c.fpu.fpr[1], [9; 16]);
    }

    #[test]
    fn popcnt_sets_result_and_flags() {
        let mut c = FakeCpu::new();
        c.regs.rdi = 0xf0f0;
        c.regs.rflags = 0x2 | 0x1 | 0x800;
        // popcnt rax, rdi (Debian's hweight64)
        complete(&mut c, &[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(c.regs.rax, 8);
        assert_eq!(c.regs.rflags, 0x2);
        c.regs.rdi = 0;
        c.regs.rip = 0x1000;
        complete(&mut c, &[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(c.regs.rax, 0);
        assert_eq!(c.regs.rflags, 0x2 | 0x40);
        // popcnt eax, edi zero-extends
        c.regs.rax = u64::MAX;
        c.regs.rdi = 0x3;
        c.regs.rip = 0x1000;
        complete(&mut c, &[0xf3, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(c.regs.rax, 2);
    }

    #[test]
    fn fwait_fninit_and_unknown() {
        let mut c = FakeCpu::new();
        assert_eq!(
            complete(&mut c, &[0x9b]).unwrap(),
            Gap::Completed(Mnemonic::Wait)
        );
        assert_eq!(c.regs.rip, 0x1001);
        c.fpu.fsw = 0x1234;
        assert_eq!(
            complete(&mut c, &[0xdb, 0xe3]).unwrap(),
            Gap::Completed(Mnemonic::Fninit)
        );
        assert_eq!((c.fpu.fcw, c.fpu.fsw), (0x37f, 0));
        // cpuid is not the filler's business
        assert_eq!(complete(&mut c, &[0x0f, 0xa2]).unwrap(), Gap::Unknown);
    }
}
