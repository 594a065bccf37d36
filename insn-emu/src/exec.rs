//! Applying a prepared instruction to registers and guest memory.

use crate::decode::{AluOp, Cond, Displaced, MemRef, Op, Refusal, RegRef, Rm, Src};
use crate::rflags::{AF, CF, OF, PF, RF, SF, STATUS, TF, ZF};
use crate::{gpr, GuestMemory, MemFault, Regs};

/// What the engine may need to know about an emulated instruction beyond the
/// new register state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Execution continues at the next instruction.
    Next,
    /// `jmp`/`jcc`: whether the branch was taken (`jmp` always is).
    Jump { taken: bool, target: u64 },
    /// `call rel32`: `return_address` was pushed at guest address `slot` (the new RSP).
    Call {
        target: u64,
        return_address: u64,
        slot: u64,
    },
    /// `ret`: `return_address` was popped from guest address `slot` (the old RSP).
    Return { return_address: u64, slot: u64 },
}

/// Why an instruction was not emulated. Registers and memory are unchanged;
/// the caller should fall back to single-stepping the original instruction
/// (which raises any fault in the guest, as the real CPU would).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmuError {
    #[error("instruction at {ip:#x} is not emulated: {reason}")]
    NotEmulated { ip: u64, reason: Refusal },
    #[error("instruction was prepared at {prepared:#x} but RIP is {rip:#x}")]
    RipMismatch { prepared: u64, rip: u64 },
    /// The guest single-steps (RFLAGS.TF): the #DB after the instruction is the CPU's to deliver.
    #[error("guest trap flag is set at {ip:#x}")]
    TrapFlag { ip: u64 },
    /// The real CPU would raise #GP/#SS; only 48-bit canonical addresses are emulated.
    #[error("instruction at {ip:#x} uses non-canonical address {addr:#x}")]
    NonCanonical { ip: u64, addr: u64 },
    #[error("instruction at {ip:#x} could not read {len} byte(s) at {addr:#x}: {source}")]
    ReadFault {
        ip: u64,
        addr: u64,
        len: usize,
        source: MemFault,
    },
    #[error("instruction at {ip:#x} could not write {len} byte(s) at {addr:#x}: {source}")]
    WriteFault {
        ip: u64,
        addr: u64,
        len: usize,
        source: MemFault,
    },
}

/// AF after and/or/xor/test, which the SDM leaves undefined: this host (AMD
/// EPYC) clears it, as the differential test checks.
const LOGIC_AF: u64 = 0;

fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(size) * 8)) - 1
    }
}

fn sign_extend(v: u64, size: u8) -> u64 {
    let shift = 64 - u32::from(size) * 8;
    (((v << shift) as i64) >> shift) as u64
}

/// 48-bit canonical: refusing 57-bit-only addresses is safe, accepting them is not
/// (the engine's page walk may be 4-level and ignore the upper bits).
fn canonical(addr: u64) -> bool {
    ((addr << 16) as i64 >> 16) as u64 == addr
}

fn read_reg(regs: &Regs, r: RegRef) -> u64 {
    let v = regs.gpr[usize::from(r.idx)];
    if r.high {
        (v >> 8) & 0xff
    } else {
        v & mask(r.size)
    }
}

/// x86-64 partial-register writes: 32-bit zero-extends, 8/16-bit merge.
fn write_reg(regs: &mut Regs, r: RegRef, v: u64) {
    let slot = &mut regs.gpr[usize::from(r.idx)];
    *slot = match (r.size, r.high) {
        (8, _) => v,
        (4, _) => v & 0xffff_ffff,
        (1, true) => (*slot & !0xff00) | ((v & 0xff) << 8),
        (size, _) => (*slot & !mask(size)) | (v & mask(size)),
    };
}

fn status_flags(res: u64, size: u8) -> u64 {
    let res = res & mask(size);
    let mut f = 0;
    if res == 0 {
        f |= ZF;
    }
    if (res >> (u32::from(size) * 8 - 1)) & 1 != 0 {
        f |= SF;
    }
    if (res as u8).count_ones() & 1 == 0 {
        f |= PF;
    }
    f
}

/// Result and new status flags of an ALU operation on `size`-byte operands.
fn alu(op: AluOp, a: u64, b: u64, size: u8) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let top = u32::from(size) * 8 - 1;
    match op {
        AluOp::Add => {
            let res = a.wrapping_add(b) & m;
            let mut f = status_flags(res, size);
            if res < a {
                f |= CF;
            }
            if ((a ^ res) & (b ^ res)) >> top & 1 != 0 {
                f |= OF;
            }
            if (a ^ b ^ res) & 0x10 != 0 {
                f |= AF;
            }
            (res, f)
        }
        AluOp::Sub | AluOp::Cmp => {
            let res = a.wrapping_sub(b) & m;
            let mut f = status_flags(res, size);
            if a < b {
                f |= CF;
            }
            if ((a ^ b) & (a ^ res)) >> top & 1 != 0 {
                f |= OF;
            }
            if (a ^ b ^ res) & 0x10 != 0 {
                f |= AF;
            }
            (res, f)
        }
        AluOp::And | AluOp::Test => {
            let res = a & b;
            (res, status_flags(res, size) | LOGIC_AF)
        }
        AluOp::Or => {
            let res = a | b;
            (res, status_flags(res, size) | LOGIC_AF)
        }
        AluOp::Xor => {
            let res = a ^ b;
            (res, status_flags(res, size) | LOGIC_AF)
        }
    }
}

fn condition(c: Cond, fl: u64) -> bool {
    let cf = fl & CF != 0;
    let zf = fl & ZF != 0;
    let sf = fl & SF != 0;
    let of = fl & OF != 0;
    let pf = fl & PF != 0;
    match c {
        Cond::O => of,
        Cond::No => !of,
        Cond::B => cf,
        Cond::Ae => !cf,
        Cond::E => zf,
        Cond::Ne => !zf,
        Cond::Be => cf || zf,
        Cond::A => !cf && !zf,
        Cond::S => sf,
        Cond::Ns => !sf,
        Cond::P => pf,
        Cond::Np => !pf,
        Cond::L => sf != of,
        Cond::Ge => sf == of,
        Cond::Le => zf || sf != of,
        Cond::G => !zf && sf == of,
    }
}

/// One instruction's execution: reads go straight to guest memory, the
/// (single) write is held until everything else has succeeded.
struct Exec<'a> {
    ip: u64,
    regs: Regs,
    mem: &'a mut dyn GuestMemory,
    write: Option<(u64, [u8; 8], usize)>,
}

impl Exec<'_> {
    fn check(&self, addr: u64, len: usize) -> Result<(), EmuError> {
        let last = addr.wrapping_add(len as u64 - 1);
        for a in [addr, last] {
            if !canonical(a) {
                return Err(EmuError::NonCanonical {
                    ip: self.ip,
                    addr: a,
                });
            }
        }
        if last < addr {
            return Err(EmuError::NonCanonical {
                ip: self.ip,
                addr: last,
            });
        }
        Ok(())
    }

    fn read(&mut self, addr: u64, size: u8) -> Result<u64, EmuError> {
        let len = usize::from(size);
        self.check(addr, len)?;
        let mut buf = [0u8; 8];
        self.mem
            .read(addr, &mut buf[..len])
            .map_err(|source| EmuError::ReadFault {
                ip: self.ip,
                addr,
                len,
                source,
            })?;
        Ok(u64::from_le_bytes(buf))
    }

    fn defer_write(&mut self, addr: u64, size: u8, v: u64) -> Result<(), EmuError> {
        let len = usize::from(size);
        self.check(addr, len)?;
        debug_assert!(self.write.is_none(), "one write per instruction");
        self.write = Some((addr, v.to_le_bytes(), len));
        Ok(())
    }

    fn addr(&self, m: MemRef) -> u64 {
        let mut a = m.disp;
        if let Some(b) = m.base {
            a = a.wrapping_add(self.regs.gpr[usize::from(b)]);
        }
        if let Some(i) = m.index {
            a = a.wrapping_add(self.regs.gpr[usize::from(i)].wrapping_mul(u64::from(m.scale)));
        }
        a
    }

    fn get(&mut self, rm: Rm, size: u8) -> Result<u64, EmuError> {
        match rm {
            Rm::Reg(r) => Ok(read_reg(&self.regs, r)),
            Rm::Mem(m) => self.read(self.addr(m), size),
        }
    }

    fn get_src(&mut self, src: Src, size: u8) -> Result<u64, EmuError> {
        match src {
            Src::Rm(rm) => self.get(rm, size),
            Src::Imm(v) => Ok(v & mask(size)),
        }
    }

    fn put(&mut self, rm: Rm, size: u8, v: u64) -> Result<(), EmuError> {
        match rm {
            Rm::Reg(r) => {
                write_reg(&mut self.regs, r, v);
                Ok(())
            }
            Rm::Mem(m) => self.defer_write(self.addr(m), size, v),
        }
    }

    fn push(&mut self, v: u64) -> Result<u64, EmuError> {
        let rsp = self.regs.gpr[gpr::RSP].wrapping_sub(8);
        self.defer_write(rsp, 8, v)?;
        self.regs.gpr[gpr::RSP] = rsp;
        Ok(rsp)
    }

    fn jump(&mut self, target: u64) -> Result<(), EmuError> {
        if !canonical(target) {
            return Err(EmuError::NonCanonical {
                ip: self.ip,
                addr: target,
            });
        }
        self.regs.rip = target;
        Ok(())
    }

    fn run(&mut self, op: Op, next: u64) -> Result<Effect, EmuError> {
        self.regs.rip = next;
        match op {
            Op::Nop => {}
            Op::Push(src) => {
                // `push rsp` pushes the value before the decrement.
                let v = self.get_src(src, 8)?;
                self.push(v)?;
            }
            Op::Pop(r) => {
                let rsp = self.regs.gpr[gpr::RSP];
                let v = self.read(rsp, 8)?;
                // The increment comes first, so `pop rsp` ends with the loaded value.
                self.regs.gpr[gpr::RSP] = rsp.wrapping_add(8);
                self.regs.gpr[usize::from(r)] = v;
            }
            Op::Mov { dst, src, size } => {
                let v = self.get_src(src, size)?;
                self.put(dst, size, v)?;
            }
            Op::Extend {
                dst,
                src,
                src_size,
                signed,
            } => {
                let v = self.get(src, src_size)?;
                let v = if signed { sign_extend(v, src_size) } else { v };
                write_reg(&mut self.regs, dst, v);
            }
            Op::Lea { dst, mem } => {
                let a = self.addr(mem);
                write_reg(&mut self.regs, dst, a);
            }
            Op::Alu { op, dst, src, size } => {
                let a = self.get(dst, size)?;
                let b = self.get_src(src, size)?;
                let (res, f) = alu(op, a, b, size);
                if !matches!(op, AluOp::Cmp | AluOp::Test) {
                    self.put(dst, size, res)?;
                }
                self.regs.rflags = (self.regs.rflags & !STATUS) | f;
            }
            Op::Jmp(target) => {
                self.jump(target)?;
                return Ok(Effect::Jump {
                    taken: true,
                    target,
                });
            }
            Op::Jcc(c, target) => {
                let taken = condition(c, self.regs.rflags);
                if taken {
                    self.jump(target)?;
                }
                return Ok(Effect::Jump { taken, target });
            }
            Op::Call(target) => {
                let slot = self.push(next)?;
                self.jump(target)?;
                return Ok(Effect::Call {
                    target,
                    return_address: next,
                    slot,
                });
            }
            Op::Ret(extra) => {
                let slot = self.regs.gpr[gpr::RSP];
                let ra = self.read(slot, 8)?;
                self.regs.gpr[gpr::RSP] = slot.wrapping_add(8).wrapping_add(u64::from(extra));
                self.jump(ra)?;
                return Ok(Effect::Return {
                    return_address: ra,
                    slot,
                });
            }
        }
        Ok(Effect::Next)
    }
}

impl Displaced {
    /// Execute the instruction's effect on `regs` and `mem`, leaving RIP at
    /// the next instruction (or the branch target).
    ///
    /// `regs.rip` must equal [`Displaced::ip`]. On error nothing was changed.
    pub fn emulate(&self, regs: &mut Regs, mem: &mut dyn GuestMemory) -> Result<Effect, EmuError> {
        let op = match &self.op {
            Ok(op) => *op,
            Err(reason) => {
                return Err(EmuError::NotEmulated {
                    ip: self.ip,
                    reason: reason.clone(),
                })
            }
        };
        if regs.rip != self.ip {
            return Err(EmuError::RipMismatch {
                prepared: self.ip,
                rip: regs.rip,
            });
        }
        if regs.rflags & TF != 0 {
            return Err(EmuError::TrapFlag { ip: self.ip });
        }
        let mut exec = Exec {
            ip: self.ip,
            regs: *regs,
            mem,
            write: None,
        };
        let effect = exec.run(op, self.next_ip())?;
        if let Some((addr, bytes, len)) = exec.write {
            exec.mem
                .write(addr, &bytes[..len])
                .map_err(|source| EmuError::WriteFault {
                    ip: self.ip,
                    addr,
                    len,
                    source,
                })?;
        }
        // The CPU clears RF after every instruction that completes.
        exec.regs.rflags &= !RF;
        *regs = exec.regs;
        Ok(effect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare;

    /// Flat memory at `base` that records every write and can refuse reads or writes.
    struct Mem {
        base: u64,
        bytes: Vec<u8>,
        fail_reads: bool,
        fail_writes: bool,
        writes: usize,
    }

    impl Mem {
        fn new(base: u64, len: usize) -> Self {
            Mem {
                base,
                bytes: (0..len).map(|i| (i * 7 + 3) as u8).collect(),
                fail_reads: false,
                fail_writes: false,
                writes: 0,
            }
        }
        fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, MemFault> {
            let off = addr.wrapping_sub(self.base) as usize;
            if addr < self.base || off + len > self.bytes.len() {
                return Err(MemFault { addr });
            }
            Ok(off..off + len)
        }
    }

    impl GuestMemory for Mem {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemFault> {
            if self.fail_reads {
                return Err(MemFault { addr });
            }
            let r = self.range(addr, buf.len())?;
            buf.copy_from_slice(&self.bytes[r]);
            Ok(())
        }
        fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemFault> {
            if self.fail_writes {
                return Err(MemFault { addr });
            }
            let r = self.range(addr, data.len())?;
            self.bytes[r].copy_from_slice(data);
            self.writes += 1;
            Ok(())
        }
    }

    const IP: u64 = 0xffff_ffff_8100_1000;
    const STACK: u64 = 0xffff_c900_0000_0000;

    fn regs() -> Regs {
        let mut r = Regs {
            gpr: [0; 16],
            rip: IP,
            rflags: 0x2 | (1 << 9),
        };
        for (i, g) in r.gpr.iter_mut().enumerate() {
            *g = 0x1111_1111_1111_1111u64.wrapping_mul(i as u64 + 1);
        }
        r.gpr[gpr::RSP] = STACK + 0x800;
        r.gpr[gpr::RDI] = STACK + 0x100;
        r
    }

    fn run(bytes: &[u8], regs: &mut Regs, mem: &mut Mem) -> Result<Effect, EmuError> {
        prepare(bytes, IP).unwrap().emulate(regs, mem)
    }

    #[test]
    fn push_call_ret_effects() {
        let mut mem = Mem::new(STACK, 0x1000);
        let mut r = regs();
        assert_eq!(run(&[0x55], &mut r, &mut mem), Ok(Effect::Next));
        assert_eq!(r.gpr[gpr::RSP], STACK + 0x7f8);
        assert_eq!(mem.bytes[0x7f8..0x800], regs().gpr[gpr::RBP].to_le_bytes());
        assert_eq!(r.rip, IP + 1);

        let mut r = regs();
        let e = run(&[0xe8, 0x00, 0x10, 0x00, 0x00], &mut r, &mut mem).unwrap();
        assert_eq!(
            e,
            Effect::Call {
                target: IP + 5 + 0x1000,
                return_address: IP + 5,
                slot: STACK + 0x7f8
            }
        );
        assert_eq!(r.rip, IP + 0x1005);

        let mut r = regs();
        r.gpr[gpr::RSP] = STACK + 0x7f8;
        let e = run(&[0xc2, 0x10, 0x00], &mut r, &mut mem).unwrap();
        assert_eq!(
            e,
            Effect::Return {
                return_address: IP + 5,
                slot: STACK + 0x7f8
            }
        );
        assert_eq!(r.rip, IP + 5);
        assert_eq!(r.gpr[gpr::RSP], STACK + 0x800 + 0x10);
    }

    #[test]
    fn faults_change_nothing() {
        // push rbp, call, mov [rdi+8], rax, add [rdi], eax: reads/writes that fail
        let writers: [&[u8]; 4] = [
            &[0x55],
            &[0xe8, 0, 0, 0, 0],
            &[0x48, 0x89, 0x47, 0x08],
            &[0x01, 0x07],
        ];
        let readers: [&[u8]; 4] = [&[0x5d], &[0xc3], &[0x48, 0x8b, 0x47, 0x10], &[0x01, 0x07]];
        for (bytes, reads) in writers
            .iter()
            .map(|b| (*b, false))
            .chain(readers.iter().map(|b| (*b, true)))
        {
            let mut mem = Mem::new(STACK, 0x1000);
            mem.fail_reads = reads;
            mem.fail_writes = !reads;
            let before = mem.bytes.clone();
            let mut r = regs();
            let err = run(bytes, &mut r, &mut mem).unwrap_err();
            if reads {
                assert!(
                    matches!(err, EmuError::ReadFault { .. }),
                    "{bytes:x?}: {err}"
                );
            } else {
                assert!(
                    matches!(err, EmuError::WriteFault { .. }),
                    "{bytes:x?}: {err}"
                );
            }
            assert_eq!(r, regs(), "{bytes:x?}");
            assert_eq!(mem.bytes, before, "{bytes:x?}");
        }
    }

    #[test]
    fn read_fault_prevents_the_write() {
        // add [rdi], eax with rdi outside memory: the read fails, no write is attempted
        let mut mem = Mem::new(STACK, 0x1000);
        let mut r = regs();
        r.gpr[gpr::RDI] = STACK + 0x2000;
        let before = r;
        let err = run(&[0x01, 0x07], &mut r, &mut mem).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "instruction at {IP:#x} could not read 4 byte(s) at {:#x}: guest memory not accessible at {:#x}",
                STACK + 0x2000,
                STACK + 0x2000
            )
        );
        assert_eq!(mem.writes, 0);
        assert_eq!(r, before);
    }

    #[test]
    fn refusals_and_state_checks() {
        let mut mem = Mem::new(STACK, 0x1000);
        let mut r = regs();
        let err = run(&[0x0f, 0xa2], &mut r, &mut mem).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("instruction at {IP:#x} is not emulated: not in the emulated set: cpuid")
        );
        r.rip = IP + 1;
        assert!(matches!(
            run(&[0x90], &mut r, &mut mem),
            Err(EmuError::RipMismatch { .. })
        ));
        let mut r = regs();
        r.rflags |= TF;
        assert!(matches!(
            run(&[0x90], &mut r, &mut mem),
            Err(EmuError::TrapFlag { .. })
        ));
        // mov rax, [rdi] with a non-canonical rdi
        let mut r = regs();
        r.gpr[gpr::RDI] = 0x0000_8000_0000_0000;
        assert!(matches!(
            run(&[0x48, 0x8b, 0x07], &mut r, &mut mem),
            Err(EmuError::NonCanonical {
                addr: 0x0000_8000_0000_0000,
                ..
            })
        ));
        assert_eq!(r.gpr[gpr::RAX], regs().gpr[gpr::RAX]);
        // ret to a non-canonical address
        let mut r = regs();
        mem.bytes[0x800..0x808].copy_from_slice(&0x1234_0000_0000_0000u64.to_le_bytes());
        assert!(matches!(
            run(&[0xc3], &mut r, &mut mem),
            Err(EmuError::NonCanonical { .. })
        ));
        assert_eq!(r, regs());
    }

    #[test]
    fn partial_register_writes() {
        let mut mem = Mem::new(STACK, 0x1000);
        let cases: [(&[u8], u64); 5] = [
            (&[0xb8, 0x78, 0x56, 0x34, 0x12], 0x1234_5678), // mov eax, imm32
            (&[0x66, 0xb8, 0x34, 0x12], 0x1111_1111_1111_1234), // mov ax, imm16
            (&[0xb0, 0x99], 0x1111_1111_1111_1199),         // mov al, imm8
            (&[0xb4, 0x99], 0x1111_1111_1111_9911),         // mov ah, imm8
            (&[0x31, 0xc0], 0),                             // xor eax, eax
        ];
        for (bytes, rax) in cases {
            let mut r = regs();
            run(bytes, &mut r, &mut mem).unwrap();
            assert_eq!(r.gpr[gpr::RAX], rax, "{bytes:x?}");
        }
    }

    #[test]
    fn clears_resume_flag() {
        let mut mem = Mem::new(STACK, 0x1000);
        let mut r = regs();
        r.rflags |= RF;
        run(&[0x90], &mut r, &mut mem).unwrap();
        assert_eq!(r.rflags & RF, 0);
    }

    #[test]
    fn alu_flags_known_values() {
        // 0x7f + 1 in 8 bits: OF, SF, AF set
        let (res, f) = alu(AluOp::Add, 0x7f, 1, 1);
        assert_eq!((res, f), (0x80, OF | SF | AF));
        // 0 - 1 in 64 bits: CF, SF, PF, AF
        let (res, f) = alu(AluOp::Sub, 0, 1, 8);
        assert_eq!((res, f), (u64::MAX, CF | SF | PF | AF));
        // 0xffffffff + 1 in 32 bits: CF, ZF, PF, AF
        let (res, f) = alu(AluOp::Add, 0xffff_ffff, 1, 4);
        assert_eq!((res, f), (0, CF | ZF | PF | AF));
    }
}
