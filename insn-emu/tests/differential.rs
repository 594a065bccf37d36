//! Differential test: every form the emulator accepts is run natively on this
//! CPU and through `Displaced::emulate` from the same registers, flags and
//! memory, over many random states; every GPR, RIP, the status flags and every
//! byte of the test memory must agree.
//!
//! The harness lives in one RWX mapping: a stub assembled with iced-x86's
//! `code_asm` loads all 16 GPRs and RFLAGS from a state block, jumps to the
//! instruction under test and, at the fall-through and at the branch target,
//! "capture" stubs store the GPRs and RFLAGS back and return to Rust. Which
//! capture ran tells the resulting RIP. Memory operands and RSP point into a
//! data area of the same mapping; the emulator sees a copy of that area.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use iced_x86::code_asm::{
    byte_ptr, qword_ptr, r10, r11, r12, r13, r14, r15, r8, r9, rax, rbp, rbx, rcx, rdi, rdx, rsi,
    rsp, CodeAssembler, CodeLabel,
};
use iced_x86::{
    BlockEncoderOptions, Code, Encoder, Instruction, MemoryOperand, Mnemonic,
    OpCodeOperandKind as K, Register,
};
use insn_emu::{emulated_codes, gpr, prepare, rflags, Effect, GuestMemory, MemFault, Regs};

const CODE_SIZE: u64 = 0x10000;
const DATA_SIZE: u64 = 0x10000;
/// Offset of the instruction under test in the code area; branch targets go either side.
const INSN_OFF: u64 = 0x8000;
/// The harness stub and its state block live below this offset.
const STUB_SIZE: u64 = 0x1000;
/// Preferred mapping addresses below 2 GiB, so absolute `[disp32]` operands can reach the data.
static NEXT_HINT: AtomicUsize = AtomicUsize::new(0x4000_0000);

type Entry = extern "sysv64" fn();

struct Harness {
    code: u64,
    data: u64,
    /// The mapping is below 2 GiB: forms without a base register can address it.
    low: bool,
    entry: Entry,
    in_gpr: [u64; 16],
    in_flags: u64,
    out_gpr: [u64; 16],
    out_flags: u64,
    landed: u64,
    fall: u64,
    taken: u64,
}

/// What the native run ended with.
struct Native {
    gpr: [u64; 16],
    rflags: u64,
    /// 1: the fall-through capture ran, 2: the branch-target capture ran.
    landed: u64,
}

impl Harness {
    fn new() -> Harness {
        let len = (CODE_SIZE + DATA_SIZE) as usize;
        let hint = NEXT_HINT.fetch_add(0x10_0000, Ordering::Relaxed);
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing one.
        let mut p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len,
                prot,
                flags | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // SAFETY: as above, anywhere.
            p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        }
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap RWX: {}",
            std::io::Error::last_os_error()
        );
        let code = p as u64;
        // int3 everywhere, so a stray jump stops loudly instead of running garbage.
        // SAFETY: the code area is ours.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0xcc, CODE_SIZE as usize) };
        let mut h = Harness {
            code,
            data: code + CODE_SIZE,
            low: code + CODE_SIZE + DATA_SIZE < 0x8000_0000,
            entry: dummy_entry,
            in_gpr: [0; 16],
            in_flags: 0,
            out_gpr: [0; 16],
            out_flags: 0,
            landed: 0,
            fall: 0,
            taken: 0,
        };
        h.assemble_stub().expect("assemble the harness stub");
        let mut fill = fastrand::Rng::with_seed(7);
        for i in 0..DATA_SIZE {
            h.poke(h.data + i, &[fill.u8(..)]);
        }
        h
    }

    fn assemble_stub(&mut self) -> Result<(), iced_x86::IcedError> {
        let regs = [
            rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
        ];
        let mut a = CodeAssembler::new(64)?;
        let mut in_gpr: Vec<CodeLabel> = (0..16).map(|_| a.create_label()).collect();
        let mut out_gpr: Vec<CodeLabel> = (0..16).map(|_| a.create_label()).collect();
        let mut in_flags = a.create_label();
        let mut out_flags = a.create_label();
        let mut host_rsp = a.create_label();
        let mut landed = a.create_label();
        let mut entry = a.create_label();
        let mut fall = a.create_label();
        let mut taken = a.create_label();
        let mut capture = a.create_label();

        a.set_label(&mut entry)?;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.mov(qword_ptr(host_rsp), rsp)?;
        a.push(qword_ptr(in_flags))?;
        a.popfq()?;
        for (i, r) in regs.iter().enumerate() {
            if i != gpr::RSP {
                a.mov(*r, qword_ptr(in_gpr[i]))?;
            }
        }
        a.mov(rsp, qword_ptr(in_gpr[gpr::RSP]))?;
        a.jmp(self.code + INSN_OFF)?;

        // mov and jmp leave the flags alone, so the captures see the instruction's result.
        a.set_label(&mut fall)?;
        a.mov(byte_ptr(landed), 1)?;
        a.jmp(capture)?;
        a.set_label(&mut taken)?;
        a.mov(byte_ptr(landed), 2)?;
        a.jmp(capture)?;

        a.set_label(&mut capture)?;
        for (i, r) in regs.iter().enumerate() {
            a.mov(qword_ptr(out_gpr[i]), *r)?;
        }
        a.mov(rsp, qword_ptr(host_rsp))?;
        a.pushfq()?;
        a.pop(rax)?;
        a.mov(qword_ptr(out_flags), rax)?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()?;

        for l in in_gpr.iter_mut().chain(out_gpr.iter_mut()) {
            a.set_label(l)?;
            a.dq(&[0])?;
        }
        for l in [&mut in_flags, &mut out_flags, &mut host_rsp, &mut landed] {
            a.set_label(l)?;
            a.dq(&[0])?;
        }
        let res = a.assemble_options(
            self.code,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let bytes = &res.inner.code_buffer;
        assert!((bytes.len() as u64) < STUB_SIZE);
        self.poke(self.code, bytes);
        for i in 0..16 {
            self.in_gpr[i] = res.label_ip(&in_gpr[i])?;
            self.out_gpr[i] = res.label_ip(&out_gpr[i])?;
        }
        self.in_flags = res.label_ip(&in_flags)?;
        self.out_flags = res.label_ip(&out_flags)?;
        self.landed = res.label_ip(&landed)?;
        self.fall = res.label_ip(&fall)?;
        self.taken = res.label_ip(&taken)?;
        // SAFETY: `entry` is the address of the stub just written into executable memory; it
        // follows the sysv64 ABI (callee-saved registers, RSP and DF restored).
        self.entry = unsafe { std::mem::transmute::<usize, Entry>(res.label_ip(&entry)? as usize) };
        Ok(())
    }

    fn poke(&self, addr: u64, bytes: &[u8]) {
        assert!(addr >= self.code && addr + bytes.len() as u64 <= self.data + DATA_SIZE);
        // SAFETY: inside our mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) }
    }

    fn peek_u64(&self, addr: u64) -> u64 {
        // SAFETY: only called with the state block's slot addresses.
        unsafe { std::ptr::read_unaligned(addr as *const u64) }
    }

    fn set_u64(&self, addr: u64, v: u64) {
        // SAFETY: only called with the state block's slot addresses.
        unsafe { std::ptr::write_unaligned(addr as *mut u64, v) }
    }

    fn data_bytes(&self) -> &[u8] {
        // SAFETY: the data area is part of our live mapping.
        unsafe { std::slice::from_raw_parts(self.data as *const u8, DATA_SIZE as usize) }
    }

    fn insn_ip(&self) -> u64 {
        self.code + INSN_OFF
    }

    /// Put `jmp rel32 to` at `at`.
    fn place_jmp(&self, at: u64, to: u64) {
        let ins = Instruction::with_branch(Code::Jmp_rel32_64, to).unwrap();
        let mut enc = Encoder::new(64);
        enc.encode(&ins, at).unwrap();
        self.poke(at, &enc.take_buffer());
    }

    /// Run the instruction placed at `insn_ip()` natively from `regs`.
    fn run_native(&self, regs: &Regs) -> Native {
        for i in 0..16 {
            self.set_u64(self.in_gpr[i], regs.gpr[i]);
        }
        self.set_u64(self.in_flags, regs.rflags);
        self.set_u64(self.landed, 0);
        (self.entry)();
        let mut gpr = [0; 16];
        for (i, g) in gpr.iter_mut().enumerate() {
            *g = self.peek_u64(self.out_gpr[i]);
        }
        Native {
            gpr,
            rflags: self.peek_u64(self.out_flags),
            landed: self.peek_u64(self.landed),
        }
    }
}

extern "sysv64" fn dummy_entry() {}

/// The emulator's view of the data area: a copy kept in step with the real one.
struct Model {
    base: u64,
    bytes: Vec<u8>,
}

impl Model {
    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, MemFault> {
        let off = addr.wrapping_sub(self.base);
        if addr < self.base || off + len as u64 > self.bytes.len() as u64 {
            return Err(MemFault { addr });
        }
        Ok(off as usize..off as usize + len)
    }
}

impl GuestMemory for Model {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemFault> {
        let r = self.range(addr, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// Values that exercise carries, sign changes and partial-register edges.
fn edge_u64(rng: &mut fastrand::Rng) -> u64 {
    match rng.u8(0..20) {
        0 => 0,
        1 => u64::MAX,
        2 => 1,
        3 => 0x7f,
        4 => 0x80,
        5 => 0xff,
        6 => 0x7fff,
        7 => 0x8000,
        8 => 0xffff,
        9 => 0x7fff_ffff,
        10 => 0x8000_0000,
        11 => 0xffff_ffff,
        12 => 1 << 63,
        13 => i64::MAX as u64,
        14 => rng.u64(..) & 0xff,
        15 => (rng.i64(-300..300)) as u64,
        _ => rng.u64(..),
    }
}

fn random_flags(rng: &mut fastrand::Rng) -> u64 {
    // Bit 1 is always set, IF stays set in user mode; TF, DF, AC stay clear.
    (rng.u64(..) & rflags::STATUS) | 0x2 | 0x200
}

fn nth_reg(first: Register, k: usize) -> Register {
    Register::values().nth(first as usize + k).unwrap()
}

fn gpr_index(r: Register) -> usize {
    r as usize - Register::RAX as usize
}

#[derive(Clone, Copy)]
enum Opnd {
    Reg(Register),
    Mem(MemoryOperand),
    I32(i32),
    U32(u32),
    U64(u64),
    Branch,
}

/// The shape of a memory operand, counted so the test can insist each was tried.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Shape {
    Base,
    BaseIndex,
    BaseIsRsp,
    IndexOnly,
    Absolute,
    RipRelative,
}

/// One random instance of a form: its operands plus register values that the
/// memory operand needs (applied after the random fill).
struct Gen<'a> {
    rng: &'a mut fastrand::Rng,
    h: &'a Harness,
    fixups: Vec<(usize, u64)>,
    shape: Option<Shape>,
}

impl Gen<'_> {
    fn reg(&mut self, bytes: usize) -> Register {
        match bytes {
            1 => nth_reg(Register::AL, self.rng.usize(0..20)),
            2 => nth_reg(Register::AX, self.rng.usize(0..16)),
            4 => nth_reg(Register::EAX, self.rng.usize(0..16)),
            _ => nth_reg(Register::RAX, self.rng.usize(0..16)),
        }
    }

    fn disp(&mut self) -> i64 {
        if self.rng.bool() {
            self.rng.i64(-128..128)
        } else {
            self.rng.i64(-0x1000..0x1000)
        }
    }

    /// A memory operand; if `accessed`, its address lies inside the data area.
    fn mem(&mut self, accessed: bool) -> MemoryOperand {
        let h = self.h;
        let target = h.data + self.rng.u64(0x1000..DATA_SIZE - 0x1000);
        let scale = [1u32, 2, 4, 8][self.rng.usize(0..4)];
        let mut pick = self.rng.u8(0..10);
        if !h.low && pick >= 8 {
            pick = self.rng.u8(0..8);
        }
        let m = |base, index, scale, disp: i64| {
            let size = if disp == 0 {
                0
            } else if (-128..128).contains(&disp) {
                1
            } else {
                4
            };
            MemoryOperand::new(base, index, scale, disp, size, false, Register::None)
        };
        match pick {
            0 => {
                self.shape = Some(Shape::RipRelative);
                MemoryOperand::new(
                    Register::RIP,
                    Register::None,
                    1,
                    target as i64,
                    8,
                    false,
                    Register::None,
                )
            }
            1..=7 => {
                let base = nth_reg(Register::RAX, self.rng.usize(0..16));
                // RSP cannot be an index.
                let index = if pick <= 3 {
                    Register::None
                } else {
                    loop {
                        let r = nth_reg(Register::RAX, self.rng.usize(0..16));
                        if r != Register::RSP {
                            break r;
                        }
                    }
                };
                let disp = self.disp();
                let scale = if index == Register::None { 1 } else { scale };
                self.shape = Some(if base == Register::RSP {
                    Shape::BaseIsRsp
                } else if index == Register::None {
                    Shape::Base
                } else {
                    Shape::BaseIndex
                });
                if accessed {
                    let iv = self.rng.i64(-0x100..0x100) as u64;
                    if base == Register::RSP {
                        if index != Register::None {
                            self.fixups.push((gpr_index(index), iv));
                        }
                    } else if base == index {
                        let v = (target.wrapping_sub(disp as u64)) / (1 + u64::from(scale));
                        self.fixups.push((gpr_index(base), v));
                    } else {
                        let mut b = target.wrapping_sub(disp as u64);
                        if index != Register::None {
                            self.fixups.push((gpr_index(index), iv));
                            b = b.wrapping_sub(iv.wrapping_mul(u64::from(scale)));
                        }
                        self.fixups.push((gpr_index(base), b));
                    }
                }
                m(base, index, scale, disp)
            }
            8 => {
                self.shape = Some(Shape::IndexOnly);
                let index = loop {
                    let r = nth_reg(Register::RAX, self.rng.usize(0..16));
                    if r != Register::RSP {
                        break r;
                    }
                };
                let iv = self.rng.u64(0..0x100);
                if accessed {
                    self.fixups.push((gpr_index(index), iv));
                }
                let disp = target.wrapping_sub(iv * u64::from(scale)) as i64;
                // displ_size 8 asks for 64-bit addressing (4 would add a 67 prefix).
                MemoryOperand::new(Register::None, index, scale, disp, 8, false, Register::None)
            }
            _ => {
                self.shape = Some(Shape::Absolute);
                MemoryOperand::new(
                    Register::None,
                    Register::None,
                    1,
                    target as i64,
                    8,
                    false,
                    Register::None,
                )
            }
        }
    }

    fn operand(&mut self, kind: K, accessed: bool) -> Option<Opnd> {
        let rm = |g: &mut Self, bytes| {
            if g.rng.bool() {
                Opnd::Reg(g.reg(bytes))
            } else {
                Opnd::Mem(g.mem(accessed))
            }
        };
        Some(match kind {
            K::r8_or_mem => rm(self, 1),
            K::r16_or_mem => rm(self, 2),
            K::r32_or_mem => rm(self, 4),
            K::r64_or_mem => rm(self, 8),
            K::r8_reg | K::r8_opcode => Opnd::Reg(self.reg(1)),
            K::r16_reg | K::r16_opcode => Opnd::Reg(self.reg(2)),
            K::r32_reg | K::r32_opcode => Opnd::Reg(self.reg(4)),
            K::r64_reg | K::r64_opcode => Opnd::Reg(self.reg(8)),
            K::mem => Opnd::Mem(self.mem(accessed)),
            K::al => Opnd::Reg(Register::AL),
            K::ax => Opnd::Reg(Register::AX),
            K::eax => Opnd::Reg(Register::EAX),
            K::rax => Opnd::Reg(Register::RAX),
            K::imm8 => Opnd::U32(edge_u64(self.rng) as u8 as u32),
            K::imm16 => Opnd::U32(edge_u64(self.rng) as u16 as u32),
            K::imm32 => Opnd::U32(edge_u64(self.rng) as u32),
            K::imm64 => Opnd::U64(edge_u64(self.rng)),
            K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
                Opnd::I32(i32::from(edge_u64(self.rng) as u8 as i8))
            }
            K::imm32sex64 => Opnd::I32(edge_u64(self.rng) as u32 as i32),
            K::br64_1 | K::br64_4 => Opnd::Branch,
            _ => return None,
        })
    }
}

fn build(code: Code, ops: &[Opnd], target: u64) -> Option<Instruction> {
    use Opnd::*;
    let r = match *ops {
        [] => Ok(Instruction::with(code)),
        [Branch] => Instruction::with_branch(code, target),
        [Reg(a)] => Instruction::with1(code, a),
        [Mem(a)] => Instruction::with1(code, a),
        [I32(a)] => Instruction::with1(code, a),
        [U32(a)] => Instruction::with1(code, a),
        [Reg(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Mem(b)] => Instruction::with2(code, a, b),
        [Mem(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), I32(b)] => Instruction::with2(code, a, b),
        [Reg(a), U32(b)] => Instruction::with2(code, a, b),
        [Reg(a), U64(b)] => Instruction::with2(code, a, b),
        [Mem(a), I32(b)] => Instruction::with2(code, a, b),
        [Mem(a), U32(b)] => Instruction::with2(code, a, b),
        _ => panic!("{code:?}: no constructor for these operands"),
    };
    r.ok()
}

/// One test case: bytes at `insn_ip()`, the starting registers, and where a branch goes.
struct Case {
    bytes: Vec<u8>,
    regs: Regs,
    target: Option<u64>,
    mem: bool,
    shape: Option<Shape>,
}

fn branch_target(rng: &mut fastrand::Rng, h: &Harness, near: bool) -> u64 {
    let ip = h.insn_ip();
    match (near, rng.bool()) {
        // rel8 reaches at most 127 bytes past the end of the instruction (<= 6 bytes long).
        (true, true) => ip + 0x20 + rng.u64(0..90),
        (true, false) => ip - 5 - rng.u64(0..100),
        (false, true) => ip + 0x40 + rng.u64(0..0x7000 - 0x40),
        (false, false) => ip - 0x40 - rng.u64(0..0x7000 - 0x1000 - 0x40),
    }
}

fn random_regs(rng: &mut fastrand::Rng, h: &Harness) -> Regs {
    let mut regs = Regs {
        gpr: [0; 16],
        rip: h.insn_ip(),
        rflags: random_flags(rng),
    };
    for g in regs.gpr.iter_mut() {
        *g = edge_u64(rng);
    }
    // The stack is always in the data area (not always 8-aligned), with room below it.
    regs.gpr[gpr::RSP] = h.data + 0x6000 + rng.u64(0..0x4000);
    regs
}

fn generate(rng: &mut fastrand::Rng, h: &Harness, code: Code) -> Case {
    let info = code.op_code();
    let accessed = !matches!(code.mnemonic(), Mnemonic::Nop | Mnemonic::Lea);
    for _ in 0..100 {
        let mut regs = random_regs(rng, h);
        let mut g = Gen {
            rng,
            h,
            fixups: Vec::new(),
            shape: None,
        };
        let ops: Option<Vec<Opnd>> = (0..info.op_count())
            .map(|i| g.operand(info.op_kind(i), accessed))
            .collect();
        let ops = ops.unwrap_or_else(|| panic!("{code:?}: operand kinds {:?}", info.op_kinds()));
        let (fixups, shape) = (g.fixups, g.shape);
        let branchy =
            ops.iter().any(|o| matches!(o, Opnd::Branch)) || code.mnemonic() == Mnemonic::Ret;
        let near = info.op_count() == 1 && info.op_kind(0) == K::br64_1;
        let target = branchy.then(|| branch_target(rng, h, near));
        let Some(ins) = build(code, &ops, target.unwrap_or(0)) else {
            continue;
        };
        let mut enc = Encoder::new(64);
        // AH..BH with a REX-requiring register cannot be encoded: draw again.
        if enc.encode(&ins, h.insn_ip()).is_err() {
            continue;
        }
        for (i, v) in fixups {
            regs.gpr[i] = v;
        }
        return Case {
            bytes: enc.take_buffer(),
            regs,
            target,
            mem: ops.iter().any(|o| matches!(o, Opnd::Mem(_))),
            shape,
        };
    }
    panic!("{code:?}: no encodable random instance");
}

#[derive(Default, Debug)]
struct Coverage {
    runs: u32,
    reg: u32,
    mem: u32,
    taken: u32,
    not_taken: u32,
}

struct Differ {
    h: Harness,
    model: Model,
    failures: Vec<String>,
    /// Self-test knob: corrupt the emulated RAX to prove the comparison notices.
    tamper_rax: bool,
}

impl Differ {
    fn new() -> Differ {
        let h = Harness::new();
        let model = Model {
            base: h.data,
            bytes: h.data_bytes().to_vec(),
        };
        Differ {
            h,
            model,
            failures: Vec::new(),
            tamper_rax: false,
        }
    }

    /// Run `case` both ways; returns the emulator's effect, or None after recording a mismatch.
    fn check(&mut self, case: &Case) -> Option<Effect> {
        let h = &self.h;
        let ip = h.insn_ip();
        let d = prepare(&case.bytes, ip).expect("decodes");
        assert!(d.is_emulated(), "{}: {:?}", d.disassembly(), d.refusal());
        let fall_at = ip + d.len() as u64;
        h.poke(ip, &case.bytes);
        h.place_jmp(fall_at, h.fall);
        if let Some(t) = case.target {
            h.place_jmp(t, h.taken);
            if d.code() == Code::Retnq || d.code() == Code::Retnq_imm16 {
                let slot = case.regs.gpr[gpr::RSP];
                h.poke(slot, &t.to_le_bytes());
                self.model.write(slot, &t.to_le_bytes()).unwrap();
            }
        }

        let native = h.run_native(&case.regs);
        let mut emu = case.regs;
        let result = d.emulate(&mut emu, &mut self.model);
        if self.tamper_rax {
            emu.gpr[gpr::RAX] ^= 1;
        }

        // Clean up before judging, so the next case starts from int3 padding.
        h.poke(ip, &vec![0xcc; d.len() + 5]);
        if let Some(t) = case.target {
            h.poke(t, &[0xcc; 5]);
        }

        let native_rip = match native.landed {
            1 => fall_at,
            2 => case.target.expect("taken without a target"),
            other => panic!("{}: capture marker {other}", d.disassembly()),
        };
        let mut diffs = Vec::new();
        match &result {
            Err(e) => diffs.push(format!("emulator error: {e}")),
            Ok(_) => {
                for i in 0..16 {
                    if native.gpr[i] != emu.gpr[i] {
                        diffs.push(format!(
                            "gpr[{i}]: cpu {:#x} emu {:#x}",
                            native.gpr[i], emu.gpr[i]
                        ));
                    }
                }
                if native_rip != emu.rip {
                    diffs.push(format!("rip: cpu {native_rip:#x} emu {:#x}", emu.rip));
                }
                let s = rflags::STATUS;
                if native.rflags & s != emu.rflags & s {
                    diffs.push(format!(
                        "status flags: cpu {:#x} emu {:#x}",
                        native.rflags & s,
                        emu.rflags & s
                    ));
                }
                if emu.rflags & !s != case.regs.rflags & !s & !rflags::RF {
                    diffs.push(format!(
                        "emulator changed non-status flags: {:#x}",
                        emu.rflags
                    ));
                }
            }
        }
        let real = h.data_bytes();
        if real != self.model.bytes.as_slice() {
            let first = real
                .iter()
                .zip(&self.model.bytes)
                .position(|(a, b)| a != b)
                .unwrap();
            diffs.push(format!(
                "memory differs first at {:#x}: cpu {:#04x} emu {:#04x}",
                h.data + first as u64,
                real[first],
                self.model.bytes[first]
            ));
            self.model.bytes.copy_from_slice(real);
        }
        if diffs.is_empty() {
            return result.ok();
        }
        self.failures.push(format!(
            "{} [{}] from {:x?} flags {:#x}: {}",
            d.disassembly(),
            hex(&case.bytes),
            case.regs.gpr,
            case.regs.rflags,
            diffs.join("; ")
        ));
        None
    }

    fn finish(self) {
        if !self.failures.is_empty() {
            let n = self.failures.len();
            let shown: Vec<&String> = self.failures.iter().take(30).collect();
            panic!("{n} mismatch(es) between CPU and emulator:\n{shown:#?}");
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rounds() -> usize {
    std::env::var("INSN_EMU_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

#[test]
fn every_accepted_form_matches_the_cpu() {
    let seed = std::env::var("INSN_EMU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed} (set INSN_EMU_SEED to repeat)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut d = Differ::new();
    let low = d.h.low;
    let mut cov: HashMap<Code, Coverage> = HashMap::new();
    let mut shapes: HashMap<Shape, u32> = HashMap::new();
    let mut cases = 0u32;
    for &code in emulated_codes() {
        for _ in 0..rounds() {
            let case = generate(&mut rng, &d.h, code);
            let decoded = prepare(&case.bytes, d.h.insn_ip()).unwrap().code();
            assert_eq!(decoded, code, "{:x?} encodes another form", case.bytes);
            cases += 1;
            let effect = d.check(&case);
            let c = cov.entry(code).or_default();
            c.runs += 1;
            if case.mem {
                c.mem += 1;
                *shapes.entry(case.shape.unwrap()).or_default() += 1;
            } else {
                c.reg += 1;
            }
            match effect {
                Some(Effect::Jump { taken: true, .. }) => c.taken += 1,
                Some(Effect::Jump { taken: false, .. }) => c.not_taken += 1,
                _ => {}
            }
        }
    }
    eprintln!(
        "{cases} cases over {} forms, memory shapes {shapes:?}",
        emulated_codes().len()
    );
    d.finish();

    // Coverage: every accepted form ran; r/m forms with both a register and a
    // memory operand; conditional jumps both ways; every addressing shape.
    for &code in emulated_codes() {
        let c = &cov[&code];
        let info = code.op_code();
        let rm = (0..info.op_count()).any(|i| {
            matches!(
                info.op_kind(i),
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem
            )
        });
        assert!(c.runs > 0, "{code:?} never ran");
        if rm {
            assert!(c.reg > 0 && c.mem > 0, "{code:?}: {c:?}");
        }
        if code.mnemonic() != Mnemonic::Jmp
            && (info.op_kind(0) == K::br64_1 || info.op_kind(0) == K::br64_4)
            && code.mnemonic() != Mnemonic::Call
        {
            assert!(c.taken > 0 && c.not_taken > 0, "{code:?}: {c:?}");
        }
    }
    let mut want = vec![
        Shape::Base,
        Shape::BaseIndex,
        Shape::BaseIsRsp,
        Shape::RipRelative,
    ];
    if low {
        want.extend([Shape::IndexOnly, Shape::Absolute]);
    }
    for s in want {
        assert!(
            shapes.get(&s).copied().unwrap_or(0) > 0,
            "shape {s:?} never tried"
        );
    }
}

/// Byte sequences as they appear in kernel text: the ftrace and padding nops,
/// endbr64, and common prologue instructions.
#[test]
fn kernel_byte_sequences_match_the_cpu() {
    let seqs: &[&[u8]] = &[
        &[0x90],
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x00],
        &[0x0f, 0x1f, 0x40, 0x00],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
        &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[
            0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00,
        ],
        &[0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x67, 0x0f, 0x1f, 0x00],
        &[0xf3, 0x0f, 0x1e, 0xfa],
        &[0x55],
        &[0x41, 0x57],
        &[0x48, 0x89, 0xe5],
        &[0x48, 0x83, 0xec, 0x28],
        &[0x48, 0x81, 0xec, 0x00, 0x01, 0x00, 0x00],
        &[0x31, 0xc0],
        &[0x85, 0xff],
        &[0x48, 0x85, 0xf6],
        &[0x88, 0xe0], // mov al, ah
        &[0x00, 0xfc], // add ah, bh
    ];
    let mut rng = fastrand::Rng::new();
    let mut d = Differ::new();
    for bytes in seqs {
        let dis = prepare(bytes, d.h.insn_ip()).unwrap();
        assert!(
            dis.is_emulated(),
            "{}: {:?}",
            dis.disassembly(),
            dis.refusal()
        );
        assert_eq!(dis.len(), bytes.len());
        for _ in 0..rounds() {
            let regs = random_regs(&mut rng, &d.h);
            d.check(&Case {
                bytes: bytes.to_vec(),
                regs,
                target: None,
                mem: false,
                shape: None,
            });
        }
    }
    d.finish();
}

/// The harness itself: it really executes the instruction and reports what
/// the CPU did, so a wrong emulation shows up as a mismatch.
#[test]
fn harness_sees_the_cpu_and_catches_differences() {
    let mut rng = fastrand::Rng::with_seed(1);
    let mut d = Differ::new();
    let mut regs = random_regs(&mut rng, &d.h);
    regs.gpr[gpr::RAX] = 41;
    regs.rflags = 0x202;
    // add rax, 1 natively
    d.h.poke(d.h.insn_ip(), &[0x48, 0x83, 0xc0, 0x01]);
    d.h.place_jmp(d.h.insn_ip() + 4, d.h.fall);
    let native = d.h.run_native(&regs);
    assert_eq!(native.gpr[gpr::RAX], 42);
    assert_eq!(native.landed, 1);
    assert_eq!(native.rflags & rflags::STATUS, 0);
    // stc natively
    d.h.poke(d.h.insn_ip(), &[0xf9]);
    d.h.place_jmp(d.h.insn_ip() + 1, d.h.fall);
    assert_eq!(d.h.run_native(&regs).rflags & rflags::CF, rflags::CF);
    d.h.poke(d.h.insn_ip(), &[0xcc; 6]);

    // A matching case passes; a wrong register or memory byte is reported.
    let case = Case {
        bytes: vec![0x48, 0x83, 0xc0, 0x01],
        regs,
        target: None,
        mem: false,
        shape: None,
    };
    assert!(d.check(&case).is_some());
    assert!(d.failures.is_empty());
    d.tamper_rax = true;
    assert!(d.check(&case).is_none());
    d.tamper_rax = false;
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    assert!(d.failures[0].contains("gpr[0]"), "{}", d.failures[0]);
    d.model.bytes[100] ^= 0xff;
    assert!(d.check(&case).is_none());
    assert_eq!(d.failures.len(), 2, "{:?}", d.failures);
    assert!(
        d.failures[1].contains("memory differs"),
        "{}",
        d.failures[1]
    );
}
