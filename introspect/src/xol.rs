//! Out-of-line execution: the displaced instruction relocated into host-owned
//! padding in guest kernel text, followed by an `int3`. The vCPU runs it there
//! and traps once more; the host resumes it after the original instruction.
//! Two exits, and no other vCPU has to stop, because the probe's own `int3`
//! never leaves guest text.
//!
//! This file relocates and keeps the books: which padding is free
//! ([`Scratch`]), what each slot holds ([`XolSlot`]), which are retired.
//! Writing a slot into guest text, and putting the padding back, is
//! `text.rs`'s (with the world stopped).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, Mnemonic, OpKind, Register, RflagsBits,
};

/// Whether `insn` may run out of line. It runs at another address with
/// interrupts masked, so it must not transfer control, must not read or write
/// IF, must not be privileged (those may fault with an exception-table fixup
/// that is keyed by the instruction's own address), and a memory operand may
/// only be one that cannot fault on user memory: RIP-relative, the stack
/// (rsp/rbp) or per-CPU (gs/fs) data. Everything else is single-stepped in place.
fn runs_out_of_line(insn: &Instruction) -> bool {
    if insn.is_invalid() || insn.flow_control() != FlowControl::Next || insn.is_privileged() {
        return false;
    }
    if (insn.rflags_read() | insn.rflags_modified()) & RflagsBits::IF != 0 {
        return false;
    }
    // nop and lea name memory without touching it.
    let touches_memory = !matches!(insn.mnemonic(), Mnemonic::Nop | Mnemonic::Lea);
    for i in 0..insn.op_count() {
        match insn.op_kind(i) {
            OpKind::Memory if touches_memory => {
                let seg = insn.memory_segment();
                let base = insn.memory_base();
                let ok = matches!(seg, Register::GS | Register::FS)
                    || insn.is_ip_rel_memory_operand()
                    || (matches!(base, Register::RSP | Register::RBP)
                        && insn.memory_index() == Register::None);
                if !ok {
                    return false;
                }
            }
            // String instructions address memory through rsi/rdi.
            OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI => return false,
            _ => {}
        }
    }
    true
}

/// The instruction `bytes` (at `ip`) re-encoded to run at `slot_ip`, with
/// RIP-relative operands fixed up. None when it may not run out of line (see
/// [`runs_out_of_line`]) or cannot be re-encoded there (target out of reach).
pub fn relocate(bytes: &[u8], ip: u64, slot_ip: u64) -> Option<Vec<u8>> {
    let mut dec = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let insn = dec.decode();
    if !runs_out_of_line(&insn) {
        return None;
    }
    let block = InstructionBlock::new(std::slice::from_ref(&insn), slot_ip);
    let out = BlockEncoder::encode(64, block, BlockEncoderOptions::NONE).ok()?;
    Some(out.code_buffer)
}

/// A relocated copy of a displaced instruction plus an int3, in guest padding.
pub(crate) struct XolSlot {
    pub addr: u64,
    /// Relocated instruction followed by 0xcc.
    pub code: Vec<u8>,
    /// The padding bytes the slot replaced.
    pub saved: Vec<u8>,
    /// Guest-physical address of each slot byte, translated once when the
    /// slot was written (so freeing it touches the same bytes).
    pub gpas: Vec<u64>,
    /// Where execution continues after the slot.
    pub resume: u64,
    /// vCPUs between entering the slot and its trailing int3.
    pub in_flight: AtomicU32,
}

impl XolSlot {
    /// The address of the trailing int3.
    pub fn end(&self) -> u64 {
        self.addr + self.code.len() as u64 - 1
    }

    /// Whether `addr` is one of the slot's bytes.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr <= self.end()
    }

    /// Whether a vCPU is between entering the slot and leaving it.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }
}

/// Every live slot, by the address of its trailing int3, and the slots of
/// removed sites that a vCPU may still be inside (retired: freed by the last
/// vCPU to leave). Kept under the probe table's lock.
#[derive(Default)]
pub(crate) struct Slots {
    pub by_end: crate::addr_map::AddrMap<Arc<XolSlot>>,
    pub retired: Vec<Arc<XolSlot>>,
}

impl Slots {
    /// Live and retired slots.
    pub fn all(&self) -> impl Iterator<Item = &Arc<XolSlot>> {
        self.by_end.values().chain(self.retired.iter())
    }

    pub fn is_retired(&self, slot: &Arc<XolSlot>) -> bool {
        self.retired.iter().any(|s| Arc::ptr_eq(s, slot))
    }

    /// Retire `slot` if a vCPU is inside it (true), else leave it to be freed.
    pub fn retire_if_busy(&mut self, slot: &Arc<XolSlot>) -> bool {
        if slot.busy() {
            self.retired.push(slot.clone());
            return true;
        }
        false
    }

    /// Forget a slot that is being freed.
    pub fn forget(&mut self, slot: &XolSlot) {
        self.by_end.remove(&slot.end());
        self.retired.retain(|s| !std::ptr::eq(&**s, slot));
    }
}

/// Free host-owned byte ranges in guest text (function padding).
#[derive(Debug, Default)]
pub struct Scratch {
    /// `[start, end)` ranges still free.
    free: Vec<(u64, u64)>,
}

impl Scratch {
    pub fn new(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|r| r.1 > r.0);
        ranges.sort_unstable();
        Self { free: ranges }
    }

    /// The pool for out-of-line slots: the padding `ranges`, minus any in
    /// `init` text (which the guest frees) and minus the return trap's byte.
    pub fn for_padding(ranges: Vec<(u64, u64)>, init: Option<(u64, u64)>, trap: u64) -> Self {
        let mut pool = Vec::new();
        for (s, e) in ranges {
            // Never in text the guest frees.
            if init.is_some_and(|(is, ie)| s < ie && e > is) {
                continue;
            }
            // Keep the return trap byte out of the pool.
            if trap >= s && trap < e {
                pool.push((s, trap));
                pool.push((trap + 1, e));
            } else {
                pool.push((s, e));
            }
        }
        Self::new(pool)
    }

    /// Candidate start addresses with at least `len` free bytes.
    pub fn candidates(&self, len: u64) -> impl Iterator<Item = u64> + '_ {
        self.free
            .iter()
            .filter(move |r| r.1 - r.0 >= len)
            .map(|r| r.0)
    }

    /// Take `[addr, addr+len)`, which must lie in one free range.
    pub fn take(&mut self, addr: u64, len: u64) -> bool {
        let Some(i) = self
            .free
            .iter()
            .position(|r| r.0 <= addr && addr + len <= r.1)
        else {
            return false;
        };
        let (s, e) = self.free.remove(i);
        if addr > s {
            self.free.push((s, addr));
        }
        if addr + len < e {
            self.free.push((addr + len, e));
        }
        self.free.sort_unstable();
        true
    }

    /// Give `[addr, addr+len)` back (merged with neighbours).
    pub fn give_back(&mut self, addr: u64, len: u64) {
        self.free.push((addr, addr + len));
        self.free.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.free.len());
        for r in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.1 == r.0 => last.1 = r.1,
                _ => merged.push(r),
            }
        }
        self.free = merged;
    }

    #[cfg(test)]
    fn free_bytes(&self) -> u64 {
        self.free.iter().map(|r| r.1 - r.0).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rip_relative_is_fixed_up() {
        // mov rax, [rip+0x100] at 0x1000 reads 0x1107.
        let code = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00];
        let moved = relocate(&code, 0x1000, 0x2000).unwrap();
        assert_eq!(moved.len(), 7);
        let disp = i32::from_le_bytes(moved[3..7].try_into().unwrap());
        assert_eq!(0x2000 + 7 + i64::from(disp), 0x1107);
    }

    #[test]
    fn control_flow_is_not_relocated() {
        assert!(relocate(&[0xc3], 0x1000, 0x2000).is_none()); // ret
        assert!(relocate(&[0xff, 0xd0], 0x1000, 0x2000).is_none()); // call rax
        assert!(relocate(&[0x0f, 0x05], 0x1000, 0x2000).is_none()); // syscall
                                                                    // Plain instructions move unchanged.
        assert_eq!(
            relocate(&[0x0f, 0xaf, 0xc1], 0x1000, 0x2000).unwrap(),
            vec![0x0f, 0xaf, 0xc1]
        ); // imul eax, ecx
           // Stack and per-CPU memory may run out of line; a pointer in a register may not.
        assert!(relocate(&[0x48, 0x0f, 0xaf, 0x45, 0xf8], 0x1000, 0x2000).is_some()); // imul rax, [rbp-8]
        assert!(relocate(&[0x65, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0], 0x1000, 0x2000).is_some()); // mov rax, gs:[0]
        assert!(relocate(&[0x48, 0x0f, 0xaf, 0x07], 0x1000, 0x2000).is_none()); // imul rax, [rdi]
        assert!(relocate(&[0xf3, 0xa4], 0x1000, 0x2000).is_none()); // rep movsb
        assert!(relocate(&[0x9c], 0x1000, 0x2000).is_none()); // pushf reads IF
        assert!(relocate(&[0xfb], 0x1000, 0x2000).is_none()); // sti
        assert!(relocate(&[0x0f, 0x30], 0x1000, 0x2000).is_none()); // wrmsr (privileged)
        assert!(relocate(&[0x0f, 0xa2], 0x1000, 0x2000).is_some()); // cpuid
        assert!(relocate(&[0x0f, 0x1f, 0x44, 0, 0], 0x1000, 0x2000).is_some()); // ftrace nop
    }

    #[test]
    fn scratch_allocation_splits_and_merges() {
        let mut s = Scratch::new(vec![(0x100, 0x110), (0x200, 0x204)]);
        assert_eq!(s.candidates(8).collect::<Vec<_>>(), vec![0x100]);
        assert!(s.take(0x104, 8));
        assert_eq!(s.free_bytes(), 8 + 4);
        assert!(!s.take(0x104, 1));
        s.give_back(0x104, 8);
        assert_eq!(s.candidates(16).collect::<Vec<_>>(), vec![0x100]);
    }
}
