//! The instruction behind a write exit, found after the fact, and how to
//! undo it when its read-modify-write raced another vCPU's write.
//!
//! KVM reports a write to a read-only slot with RIP already past the
//! writing instruction, so the instruction is found by decoding backwards:
//! every start RIP-15..RIP-1 whose one instruction ends exactly at RIP and
//! writes memory is a candidate; those whose computed address has the
//! exit's page offset are preferred (guest-virtual and guest-physical
//! addresses share the low 12 bits).

use guest_access::Regs;
use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};

/// RFLAGS.ZF (bit 6; iced's `RflagsBits` numbers flags its own way).
const RFLAGS_ZF: u64 = 1 << 6;

/// Longest x86 instruction.
pub(crate) const MAX_INSN: usize = 15;

/// One instruction that may have made the write.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    pub start: u64,
    pub insn: Instruction,
}

fn writes_memory(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// Whether the instruction reads and writes the same memory (a
/// read-modify-write: KVM reads the slot, then the write exits).
pub(crate) fn is_rmw(insn: &Instruction) -> bool {
    let mut f = InstructionInfoFactory::new();
    f.info(insn)
        .used_memory()
        .iter()
        .any(|m| matches!(m.access(), OpAccess::ReadWrite | OpAccess::ReadCondWrite))
}

/// The candidates for the instruction ending at `rip` (`code` holds the
/// bytes before `rip`, the last one at `rip - 1`), best first.
pub(crate) fn writers(code: &[u8], rip: u64, regs: &Regs, gpa: u64) -> Vec<Writer> {
    let mut info = InstructionInfoFactory::new();
    let gprs = regs.gprs();
    let mut all = Vec::new();
    let mut matching = Vec::new();
    for k in (1..=code.len().min(MAX_INSN)).rev() {
        let start = rip - k as u64;
        let bytes = &code[code.len() - k..];
        let mut d = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() || insn.len() != k {
            continue;
        }
        let used = info.info(&insn).used_memory().to_vec();
        let stores: Vec<_> = used.iter().filter(|m| writes_memory(m.access())).collect();
        if stores.is_empty() {
            continue;
        }
        let hits_offset = stores.iter().any(|m| {
            m.virtual_address(0, |r, _, _| reg_value(&gprs, r))
                .is_some_and(|va| va & 0xfff == gpa & 0xfff)
        });
        let w = Writer { start, insn };
        if hits_offset {
            matching.push(w.clone());
        }
        all.push(w);
    }
    if matching.is_empty() {
        all
    } else {
        matching
    }
}

fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    if full.is_gpr64() {
        Some(full as usize - Register::RAX as usize)
    } else {
        None
    }
}

fn is_high8(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn reg_value(gprs: &[u64; 16], r: Register) -> Option<u64> {
    match r {
        Register::None => Some(0),
        Register::RIP => None,
        _ => read_reg(gprs, r),
    }
}

fn read_reg(gprs: &[u64; 16], r: Register) -> Option<u64> {
    let v = gprs[gpr_index(r)?];
    Some(match r.size() {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        _ if is_high8(r) => (v >> 8) & 0xff,
        _ => v & 0xff,
    })
}

/// Write `value` into `r` as the CPU would: 32-bit zero-extends, 8/16-bit
/// keep the rest.
fn write_reg(gprs: &mut [u64; 16], r: Register, value: u64) -> Option<()> {
    let i = gpr_index(r)?;
    let old = gprs[i];
    gprs[i] = match r.size() {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (old & !0xffff) | (value & 0xffff),
        _ if is_high8(r) => (old & !0xff00) | ((value & 0xff) << 8),
        _ => (old & !0xff) | (value & 0xff),
    };
    Some(())
}

fn mask(bytes: u32) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

/// What to do with a write whose page another vCPU wrote after this vCPU
/// entered the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Conflict {
    /// A plain store: its value does not depend on what it read; complete.
    Complete,
    /// A failed compare-exchange writes back the value it read: skip that
    /// write (the instruction took effect, as a read, when KVM read).
    DropWrite,
    /// Do not write; run the instruction again from these registers.
    RollBack(Regs),
    /// A read-modify-write whose registers cannot be restored.
    Unknown(String),
}

/// How to undo `w` (KVM ran it with registers now `regs` and wants to
/// write `data`, little-endian) so the guest runs it again.
pub(crate) fn on_conflict(w: &Writer, regs: &Regs, data: u64) -> Conflict {
    let insn = &w.insn;
    if !is_rmw(insn) {
        return Conflict::Complete;
    }
    let mut back = *regs;
    back.rip = w.start;
    let zf = regs.rflags & RFLAGS_ZF != 0;
    let mut gprs = regs.gprs();
    match insn.mnemonic() {
        Mnemonic::Cmpxchg | Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => {
            // Success leaves the registers as they were; failure loaded
            // the accumulator with what KVM read.
            return if zf {
                Conflict::RollBack(back)
            } else {
                Conflict::DropWrite
            };
        }
        Mnemonic::Xchg | Mnemonic::Xadd => {
            let reg = (0..insn.op_count())
                .find(|&i| insn.op_kind(i) == OpKind::Register)
                .map(|i| insn.op_register(i));
            let Some(reg) = reg else {
                return Conflict::Unknown(format!("{insn}: no register operand"));
            };
            let size = reg.size() as u32;
            let now = read_reg(&gprs, reg).unwrap_or(0);
            // xchg: the register held what was written. xadd: it held
            // written - read, and now holds what was read.
            let orig = if insn.mnemonic() == Mnemonic::Xchg {
                data & mask(size)
            } else {
                data.wrapping_sub(now) & mask(size)
            };
            if write_reg(&mut gprs, reg, orig).is_none() {
                return Conflict::Unknown(format!("{insn}: register {reg:?}"));
            }
            back.set_gprs(gprs);
            back.rip = w.start;
        }
        _ => {}
    }
    Conflict::RollBack(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RIP: u64 = 0xffff_ffff_8100_0100;

    /// `code` placed to end at RIP, after filler that decodes as nothing useful.
    fn find(code: &[u8], regs: &Regs, gpa: u64) -> Vec<Writer> {
        let mut bytes = vec![0xcc; MAX_INSN - code.len().min(MAX_INSN)];
        bytes.extend_from_slice(code);
        writers(&bytes, RIP, regs, gpa)
    }

    #[test]
    fn finds_a_plain_store_and_prefers_the_matching_offset() {
        // mov [rdi+8], eax
        let regs = Regs {
            rdi: 0xffff_8880_0010_0ff0,
            ..Default::default()
        };
        let w = find(&[0x89, 0x47, 0x08], &regs, 0x10_0ff8);
        assert_eq!(w[0].start, RIP - 3);
        assert_eq!(w[0].insn.mnemonic(), Mnemonic::Mov);
        assert!(!is_rmw(&w[0].insn));
        assert_eq!(on_conflict(&w[0], &regs, 1), Conflict::Complete);
        // A wrong page offset leaves every decodable store, still this one.
        let any = find(&[0x89, 0x47, 0x08], &regs, 0x10_0000);
        assert!(any.iter().any(|c| c.start == RIP - 3));
    }

    #[test]
    fn successful_cmpxchg_rolls_back_with_registers_untouched() {
        // lock cmpxchg [rsi], ecx
        let regs = Regs {
            rsi: 0x2000,
            rax: 0,
            rcx: 7,
            rflags: 0x42, // ZF set: success
            rip: RIP,
            ..Default::default()
        };
        let w = find(&[0xf0, 0x0f, 0xb1, 0x0e], &regs, 0x2000);
        assert_eq!(w[0].start, RIP - 4);
        assert!(is_rmw(&w[0].insn));
        let Conflict::RollBack(back) = on_conflict(&w[0], &regs, 7) else {
            panic!("expected a rollback");
        };
        assert_eq!(back.rip, RIP - 4);
        assert_eq!((back.rax, back.rcx, back.rsi), (0, 7, 0x2000));
    }

    #[test]
    fn failed_cmpxchg_drops_its_write_back() {
        let regs = Regs {
            rsi: 0x2000,
            rax: 1,
            rflags: 0x2, // ZF clear: failure
            ..Default::default()
        };
        let w = find(&[0xf0, 0x0f, 0xb1, 0x0e], &regs, 0x2000);
        assert_eq!(on_conflict(&w[0], &regs, 1), Conflict::DropWrite);
    }

    #[test]
    fn xchg_gets_its_register_back() {
        // xchg [rdi], rax: rax held 5, memory held 9; KVM wrote 5, rax = 9.
        let regs = Regs {
            rdi: 0x3008,
            rax: 9,
            ..Default::default()
        };
        let w = find(&[0x48, 0x87, 0x07], &regs, 0x3008);
        let Conflict::RollBack(back) = on_conflict(&w[0], &regs, 5) else {
            panic!("expected a rollback");
        };
        assert_eq!((back.rax, back.rip), (5, RIP - 3));
    }

    #[test]
    fn xadd_gets_its_addend_back_at_every_size() {
        // lock xadd [rdi], rax: rax held 3, memory 10 -> wrote 13, rax = 10.
        let regs = Regs {
            rdi: 0x3000,
            rax: 10,
            ..Default::default()
        };
        let w = find(&[0xf0, 0x48, 0x0f, 0xc1, 0x07], &regs, 0x3000);
        let Conflict::RollBack(back) = on_conflict(&w[0], &regs, 13) else {
            panic!("expected a rollback");
        };
        assert_eq!((back.rax, back.rip), (3, RIP - 5));
        // lock xadd [rdi], ecx with a wrap: ecx held 0xffffffff (-1), memory 0.
        let regs = Regs {
            rdi: 0x3000,
            rcx: 0,
            ..Default::default()
        };
        let w = find(&[0xf0, 0x0f, 0xc1, 0x0f], &regs, 0x3000);
        let Conflict::RollBack(back) = on_conflict(&w[0], &regs, 0xffff_ffff) else {
            panic!("expected a rollback");
        };
        assert_eq!(back.rcx, 0xffff_ffff);
        // lock xadd [rdi], ah keeps the rest of rax.
        let regs = Regs {
            rdi: 0x3000,
            rax: 0x1234_0511,
            ..Default::default()
        };
        let w = find(&[0xf0, 0x0f, 0xc0, 0x27], &regs, 0x3000);
        let Conflict::RollBack(back) = on_conflict(&w[0], &regs, 0x07) else {
            panic!("expected a rollback");
        };
        assert_eq!(back.rax, 0x1234_0211);
    }

    #[test]
    fn locked_or_rolls_back_with_registers_as_they_are() {
        // lock or dword [rdi], 1
        let regs = Regs {
            rdi: 0x3000,
            rbx: 77,
            ..Default::default()
        };
        let w = find(&[0xf0, 0x83, 0x0f, 0x01], &regs, 0x3000);
        let Conflict::RollBack(back) = on_conflict(&w[0], &regs, 1) else {
            panic!("expected a rollback");
        };
        assert_eq!((back.rbx, back.rip), (77, RIP - 4));
    }
}
