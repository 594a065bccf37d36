//! How to undo a write exit's read-modify-write that raced another vCPU's
//! write to the same protected page (the instruction itself is found by
//! `insn_emu::writer`, decoding backwards from RIP).

use guest_access::Regs;
use iced_x86::{Mnemonic, OpKind};
pub(crate) use insn_emu::writer::{
    code_before, is_rmw, rep_string_store_at, trusted_writer, writers, Writer, MAX_INSN,
};
use insn_emu::writer::{mask, read_reg, write_reg};

/// RFLAGS.ZF (bit 6; iced's `RflagsBits` numbers flags its own way).
const RFLAGS_ZF: u64 = 1 << 6;

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
            let size = u32::try_from(reg.size()).unwrap_or(8);
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
        let len = 8;
        let mut bytes = vec![0xcc; MAX_INSN - code.len().min(MAX_INSN)];
        bytes.extend_from_slice(code);
        writers(&bytes, RIP, &regs.gprs(), gpa, len)
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
