//! The instruction that made a write, found from the address after it.
//!
//! KVM reports a write to a read-only memory slot with RIP already past the
//! writing instruction, so the instruction is found by decoding backwards:
//! every start RIP-15..RIP-1 whose one instruction ends exactly at RIP and
//! writes memory is a candidate; those whose computed address has the
//! write's page offset are preferred (guest-virtual and guest-physical
//! addresses share the low 12 bits). Used by the VMM (to undo a racing
//! read-modify-write) and the engine (to name a watch's writer).

use iced_x86::{
    Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, Register,
};

/// Longest x86 instruction.
pub const MAX_INSN: usize = 15;

/// One instruction that may have made the write.
#[derive(Clone, Debug)]
pub struct Writer {
    pub start: u64,
    pub insn: Instruction,
    /// Its store has the write's page offset and size: only such a writer
    /// is trusted enough to be undone (rolling back the wrong instruction
    /// would corrupt the guest).
    pub exact: bool,
}

fn writes_memory(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// Whether the instruction reads and writes the same memory (a
/// read-modify-write: KVM reads the slot, then the write exits).
pub fn is_rmw(insn: &Instruction) -> bool {
    let mut f = InstructionInfoFactory::new();
    f.info(insn)
        .used_memory()
        .iter()
        .any(|m| matches!(m.access(), OpAccess::ReadWrite | OpAccess::ReadCondWrite))
}

/// The candidates for the instruction ending at `rip` (`code` holds the
/// bytes before `rip`, the last one at `rip - 1`) that wrote `len` bytes at
/// guest-physical `gpa`, best first: those whose store has `gpa`'s page
/// offset (computed from `gprs`, the registers after the instruction) and
/// `len`'s size, else those with the offset, else every store.
pub fn writers(code: &[u8], rip: u64, gprs: &[u64; 16], gpa: u64, len: usize) -> Vec<Writer> {
    let mut info = InstructionInfoFactory::new();
    let mut scored: Vec<(u8, Writer)> = Vec::new();
    for k in (1..=code.len().min(MAX_INSN)).rev() {
        let start = rip - k as u64;
        let bytes = &code[code.len() - k..];
        let mut d = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let insn = d.decode();
        if insn.is_invalid() || insn.len() != k {
            continue;
        }
        let score = info
            .info(&insn)
            .used_memory()
            .iter()
            .filter(|m| writes_memory(m.access()))
            .map(|m| {
                let offset = m
                    .virtual_address(0, |r, _, _| reg_value(gprs, r))
                    .is_some_and(|va| va & 0xfff == gpa & 0xfff);
                let size = m.memory_size().size() == len;
                1 + 2 * u8::from(offset) + u8::from(offset && size)
            })
            .max();
        if let Some(score) = score {
            scored.push((
                score,
                Writer {
                    start,
                    insn,
                    exact: score == 4,
                },
            ));
        }
    }
    let best = scored.iter().map(|(s, _)| *s).max().unwrap_or(0);
    scored
        .into_iter()
        .filter(|(s, _)| *s == best)
        .map(|(_, w)| w)
        .collect()
}

/// Up to [`MAX_INSN`] code bytes ending just before `rip`, read with `read`
/// (address, buffer; false when unreadable); fewer when the page before
/// `rip`'s is unmapped, none when nothing is readable.
pub fn code_before(rip: u64, mut read: impl FnMut(u64, &mut [u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_INSN];
    if read(rip.wrapping_sub(MAX_INSN as u64), &mut buf) {
        return buf;
    }
    let n = usize::try_from(rip & 0xfff).unwrap_or(0).min(MAX_INSN);
    buf.truncate(n);
    if read(rip - n as u64, &mut buf) {
        buf
    } else {
        Vec::new()
    }
}

/// A repeated string store (`rep stos`, `rep movs`) starting at `rip`
/// (`code` holds the bytes from `rip` on): KVM leaves RIP on such an
/// instruction until its last iteration, so the writes of the others exit
/// with RIP at the writer, not after it.
pub fn rep_string_store_at(code: &[u8], rip: u64) -> Option<Writer> {
    let mut d = Decoder::with_ip(64, code, rip, DecoderOptions::NONE);
    let insn = d.decode();
    let string_store = matches!(
        insn.mnemonic(),
        Mnemonic::Stosb
            | Mnemonic::Stosw
            | Mnemonic::Stosd
            | Mnemonic::Stosq
            | Mnemonic::Movsb
            | Mnemonic::Movsw
            | Mnemonic::Movsd
            | Mnemonic::Movsq
    );
    (!insn.is_invalid() && string_store && (insn.has_rep_prefix() || insn.has_repne_prefix()))
        .then_some(Writer {
            start: rip,
            insn,
            exact: true,
        })
}

/// The one writer a conflicting write may be undone by: the repeated
/// string store at RIP, or the exact candidate before it (`code` as given to
/// [`writers`]). Exact candidates that differ only by a leading LOCK or an
/// ignored segment override (CS/DS/ES/SS in 64-bit mode) are one
/// instruction, and the longest is taken: running it again from there does
/// the same, atomically. None when the candidates are ambiguous otherwise
/// (a REX, FS/GS or size prefix changes what is written where) or none
/// matches the write.
pub fn trusted_writer(
    code: &[u8],
    rip: u64,
    before: &[Writer],
    at_rip: Option<&Writer>,
) -> Option<Writer> {
    if let Some(w) = at_rip {
        return Some(w.clone());
    }
    let mut exact: Vec<&Writer> = before.iter().filter(|w| w.exact).collect();
    exact.sort_by_key(|w| w.start);
    let longest = *exact.first()?;
    let byte_at = |a: u64| {
        let back = usize::try_from(rip.checked_sub(a)?).ok()?;
        code.len().checked_sub(back).map(|i| code[i])
    };
    let same = exact[1..].iter().all(|w| {
        w.insn.mnemonic() == longest.insn.mnemonic()
            && (longest.start..w.start)
                .all(|a| matches!(byte_at(a), Some(0xf0 | 0x2e | 0x3e | 0x26 | 0x36)))
    });
    same.then(|| longest.clone())
}

pub fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    if full.is_gpr64() {
        Some(full as usize - Register::RAX as usize)
    } else {
        None
    }
}

pub fn is_high8(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn reg_value(gprs: &[u64; 16], r: Register) -> Option<u64> {
    match r {
        Register::None => Some(0),
        // iced gives a RIP-relative operand's absolute address as its displacement.
        Register::RIP | Register::EIP => Some(0),
        // Segment bases: 0 in 64-bit mode but FS/GS, whose bases (per-CPU
        // areas) are page-aligned, so the page offset still holds.
        _ if r.is_segment_register() => Some(0),
        _ => read_reg(gprs, r),
    }
}

pub fn read_reg(gprs: &[u64; 16], r: Register) -> Option<u64> {
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
pub fn write_reg(gprs: &mut [u64; 16], r: Register, value: u64) -> Option<()> {
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

pub fn mask(bytes: u32) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hv_watch_set: `push rbp; mov [rip+0xe4f3], rdi` ending at ...b0d,
    /// storing to ...10000 (8 bytes). `mov [rip+d], edi` (4 bytes) and
    /// `add [rax], al` also end there; size and offset pick the first.
    #[test]
    fn rip_relative_store_wins_over_shorter_tails() {
        let code = [
            0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55, 0x48, 0x89, 0x3d,
            0xf3, 0xe4, 0x00, 0x00,
        ];
        let code = &code[code.len() - MAX_INSN..];
        let mut gprs = [0u64; 16];
        gprs[0] = 0x1000; // rax: the same page offset as the store
        let w = writers(code, 0xffff_ffff_8100_1b0d, &gprs, 0x101_0000, 8);
        let starts: Vec<u64> = w.iter().map(|w| w.start).collect();
        assert_eq!(starts, vec![0xffff_ffff_8100_1b06]);
        // A 4-byte write at the same place is the edi form.
        let w = writers(code, 0xffff_ffff_8100_1b0d, &gprs, 0x101_0000, 4);
        assert_eq!(w[0].start, 0xffff_ffff_8100_1b07);
        assert_eq!(
            trusted_writer(code, 0xffff_ffff_8100_1b0d, &w, None).map(|w| w.start),
            Some(0xffff_ffff_8100_1b07)
        );
    }

    #[test]
    fn only_an_exact_writer_is_trusted_and_lock_prefixes_are_one_instruction() {
        // `lock xadd [rsi], eax` ends at RIP (so does `xadd [rsi], eax`
        // without the lock), but the write's offset is not where rsi
        // points: candidates to name, never ones to undo.
        let code = [0xf0, 0x0f, 0xc1, 0x06];
        let mut gprs = [0u64; 16];
        gprs[6] = 0x2000; // rsi
        let w = writers(&code, 0x1004, &gprs, 0x5008, 4);
        assert!(w.iter().any(|w| w.start == 0x1000), "{w:?}");
        assert!(w.iter().all(|w| !w.exact));
        assert!(trusted_writer(&code, 0x1004, &w, None).is_none());
        // At the right offset both forms are exact: the locked one is taken.
        let w = writers(&code, 0x1004, &gprs, 0x7000, 4);
        assert_eq!(
            trusted_writer(&code, 0x1004, &w, None).map(|w| w.start),
            Some(0x1000)
        );
        // A GS override in front changes the address: ambiguous, none.
        let code = [0x65, 0x0f, 0xc1, 0x06];
        let w = writers(&code, 0x1004, &gprs, 0x7000, 4);
        assert!(w.iter().filter(|w| w.exact).count() >= 2, "{w:?}");
        assert!(trusted_writer(&code, 0x1004, &w, None).is_none());
    }

    #[test]
    fn a_repeated_string_store_at_rip_is_the_writer() {
        // rep stosb; rep movsq; plain stosb; mov [rdi], al
        assert!(rep_string_store_at(&[0xf3, 0xaa], 0x10).is_some());
        assert!(rep_string_store_at(&[0xf3, 0x48, 0xa5], 0x10).is_some());
        assert!(rep_string_store_at(&[0xaa], 0x10).is_none());
        assert!(rep_string_store_at(&[0x88, 0x07], 0x10).is_none());
        let rep = rep_string_store_at(&[0xf3, 0xaa], 0x10).unwrap();
        assert_eq!(
            trusted_writer(&[], 0x10, &[], Some(&rep)).map(|w| w.start),
            Some(0x10)
        );
    }
}
