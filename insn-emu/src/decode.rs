//! Decoding and classification: done once per probe, so emulation only
//! interprets a small pre-digested [`Op`].

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, Formatter, Instruction, IntelFormatter,
    MemorySize, Mnemonic, OpKind, Register,
};

/// Why [`prepare`] could not decode the bytes at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("instruction at {ip:#x} is cut short: only {have} byte(s) given")]
    Truncated { ip: u64, have: usize },
    #[error("invalid instruction at {ip:#x}: {bytes}")]
    Invalid { ip: u64, bytes: String },
}

/// Why a decoded instruction is not emulated (the caller single-steps it instead).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("lock prefix")]
    LockPrefix,
    #[error("rep/repne prefix")]
    RepPrefix,
    #[error("segment override")]
    SegmentOverride,
    #[error("address-size override")]
    AddressSizeOverride,
    /// `66` on a near branch is a 16-bit branch on AMD but ignored on Intel.
    #[error("operand-size prefix on a branch (vendor-dependent)")]
    BranchOperandSize,
    #[error("not in the emulated set: {0}")]
    NotInSet(String),
}

/// Register operand: index into `Regs::gpr`, width in bytes, and whether it is AH/CH/DH/BH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegRef {
    pub idx: u8,
    pub size: u8,
    pub high: bool,
}

/// `[base + index*scale + disp]`; a RIP-relative operand has neither base nor
/// index and its absolute address in `disp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemRef {
    pub base: Option<u8>,
    pub index: Option<u8>,
    pub scale: u8,
    pub disp: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rm {
    Reg(RegRef),
    Mem(MemRef),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    Rm(Rm),
    Imm(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AluOp {
    Add,
    Sub,
    And,
    Or,
    Xor,
    Cmp,
    Test,
}

/// Jcc conditions in encoding order (low nibble of the opcode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cond {
    O,
    No,
    B,
    Ae,
    E,
    Ne,
    Be,
    A,
    S,
    Ns,
    P,
    Np,
    L,
    Ge,
    Le,
    G,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Nop,
    Push(Src),
    Pop(u8),
    Mov {
        dst: Rm,
        src: Src,
        size: u8,
    },
    Extend {
        dst: RegRef,
        src: Rm,
        src_size: u8,
        signed: bool,
    },
    Lea {
        dst: RegRef,
        mem: MemRef,
    },
    Alu {
        op: AluOp,
        dst: Rm,
        src: Src,
        size: u8,
    },
    Jmp(u64),
    Jcc(Cond, u64),
    Call(u64),
    Ret(u16),
}

/// A decoded displaced instruction, ready to be emulated (or refused).
#[derive(Clone, Debug)]
pub struct Displaced {
    pub(crate) ip: u64,
    len: u8,
    bytes: [u8; 15],
    text: String,
    code: Code,
    pub(crate) op: Result<Op, Refusal>,
}

#[allow(clippy::len_without_is_empty)] // an instruction is never empty
impl Displaced {
    /// Address the instruction was decoded at.
    pub fn ip(&self) -> u64 {
        self.ip
    }
    /// Length in bytes (1..=15).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// Address of the following instruction.
    pub fn next_ip(&self) -> u64 {
        self.ip.wrapping_add(u64::from(self.len))
    }
    /// The instruction's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len()]
    }
    /// Intel-syntax disassembly, e.g. `mov rax, [rdi+0x10]`.
    pub fn disassembly(&self) -> &str {
        &self.text
    }
    /// The iced-x86 form the bytes decoded to.
    pub fn code(&self) -> Code {
        self.code
    }
    pub fn is_emulated(&self) -> bool {
        self.op.is_ok()
    }
    /// Why the instruction is not emulated, if it is not.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.op.as_ref().err()
    }
}

/// Decode the instruction at the start of `bytes` (extra trailing bytes are
/// ignored, so passing 15 bytes is fine), as 64-bit code located at `ip`.
pub fn prepare(bytes: &[u8], ip: u64) -> Result<Displaced, DecodeError> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => DecodeError::Truncated {
                ip,
                have: bytes.len(),
            },
            _ => DecodeError::Invalid {
                ip,
                bytes: hex(&bytes[..bytes.len().min(15)]),
            },
        });
    }
    let len = instr.len();
    let mut stored = [0u8; 15];
    stored[..len].copy_from_slice(&bytes[..len]);
    let mut text = String::new();
    let mut fmt = IntelFormatter::new();
    fmt.options_mut().set_hex_prefix("0x");
    fmt.options_mut().set_hex_suffix("");
    fmt.options_mut().set_space_after_operand_separator(true);
    fmt.options_mut().set_uppercase_hex(false);
    // Show every prefix the bytes carry: the disassembly explains refusals.
    fmt.options_mut().set_show_useless_prefixes(true);
    fmt.format(&instr, &mut text);
    Ok(Displaced {
        ip,
        len: len as u8,
        bytes: stored,
        text,
        code: instr.code(),
        op: classify(&instr, &stored[..len]),
    })
}

fn hex(bytes: &[u8]) -> String {
    let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(" ")
}

/// Legacy prefixes present in the raw bytes, which iced-x86 does not all
/// report (e.g. `66` on a branch, CS/DS/ES/SS that are no-ops in 64-bit mode).
#[derive(Default)]
struct Prefixes {
    segment: Option<u8>,
    operand_size: bool,
    address_size: bool,
}

fn scan_prefixes(bytes: &[u8]) -> Prefixes {
    let mut p = Prefixes::default();
    for &b in bytes {
        match b {
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => p.segment = Some(b),
            0x66 => p.operand_size = true,
            0x67 => p.address_size = true,
            0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f => {}
            _ => break,
        }
    }
    p
}

/// Every iced-x86 form that [`prepare`] may accept (subject to the prefix
/// checks). The differential test runs each of them against the real CPU.
pub fn emulated_codes() -> &'static [Code] {
    EMULATED
}

#[rustfmt::skip]
static EMULATED: &[Code] = {
    use Code::*;
    &[
        // nops: 90 with 66/REX.W, the 0f 1f /0 multi-byte forms, endbr64
        Nopw, Nopd, Nopq, Nop_rm16, Nop_rm32, Nop_rm64, Endbr64,
        Push_r64, Pushq_imm8, Pushq_imm32, Pop_r64,
        Mov_rm8_r8, Mov_rm16_r16, Mov_rm32_r32, Mov_rm64_r64,
        Mov_r8_rm8, Mov_r16_rm16, Mov_r32_rm32, Mov_r64_rm64,
        Mov_r8_imm8, Mov_r16_imm16, Mov_r32_imm32, Mov_r64_imm64,
        Mov_rm8_imm8, Mov_rm16_imm16, Mov_rm32_imm32, Mov_rm64_imm32,
        Movzx_r16_rm8, Movzx_r32_rm8, Movzx_r64_rm8, Movzx_r16_rm16, Movzx_r32_rm16, Movzx_r64_rm16,
        Movsx_r16_rm8, Movsx_r32_rm8, Movsx_r64_rm8, Movsx_r16_rm16, Movsx_r32_rm16, Movsx_r64_rm16,
        Movsxd_r64_rm32,
        Lea_r16_m, Lea_r32_m, Lea_r64_m,
        // add/or/and/sub/xor/cmp: every 64-bit-mode encoding with register, memory or immediate operands
        Add_rm8_r8, Add_rm16_r16, Add_rm32_r32, Add_rm64_r64, Add_r8_rm8, Add_r16_rm16, Add_r32_rm32, Add_r64_rm64, Add_AL_imm8, Add_AX_imm16, Add_EAX_imm32, Add_RAX_imm32, Add_rm8_imm8, Add_rm16_imm16, Add_rm32_imm32, Add_rm64_imm32, Add_rm16_imm8, Add_rm32_imm8, Add_rm64_imm8,
        Or_rm8_r8, Or_rm16_r16, Or_rm32_r32, Or_rm64_r64, Or_r8_rm8, Or_r16_rm16, Or_r32_rm32, Or_r64_rm64, Or_AL_imm8, Or_AX_imm16, Or_EAX_imm32, Or_RAX_imm32, Or_rm8_imm8, Or_rm16_imm16, Or_rm32_imm32, Or_rm64_imm32, Or_rm16_imm8, Or_rm32_imm8, Or_rm64_imm8,
        And_rm8_r8, And_rm16_r16, And_rm32_r32, And_rm64_r64, And_r8_rm8, And_r16_rm16, And_r32_rm32, And_r64_rm64, And_AL_imm8, And_AX_imm16, And_EAX_imm32, And_RAX_imm32, And_rm8_imm8, And_rm16_imm16, And_rm32_imm32, And_rm64_imm32, And_rm16_imm8, And_rm32_imm8, And_rm64_imm8,
        Sub_rm8_r8, Sub_rm16_r16, Sub_rm32_r32, Sub_rm64_r64, Sub_r8_rm8, Sub_r16_rm16, Sub_r32_rm32, Sub_r64_rm64, Sub_AL_imm8, Sub_AX_imm16, Sub_EAX_imm32, Sub_RAX_imm32, Sub_rm8_imm8, Sub_rm16_imm16, Sub_rm32_imm32, Sub_rm64_imm32, Sub_rm16_imm8, Sub_rm32_imm8, Sub_rm64_imm8,
        Xor_rm8_r8, Xor_rm16_r16, Xor_rm32_r32, Xor_rm64_r64, Xor_r8_rm8, Xor_r16_rm16, Xor_r32_rm32, Xor_r64_rm64, Xor_AL_imm8, Xor_AX_imm16, Xor_EAX_imm32, Xor_RAX_imm32, Xor_rm8_imm8, Xor_rm16_imm16, Xor_rm32_imm32, Xor_rm64_imm32, Xor_rm16_imm8, Xor_rm32_imm8, Xor_rm64_imm8,
        Cmp_rm8_r8, Cmp_rm16_r16, Cmp_rm32_r32, Cmp_rm64_r64, Cmp_r8_rm8, Cmp_r16_rm16, Cmp_r32_rm32, Cmp_r64_rm64, Cmp_AL_imm8, Cmp_AX_imm16, Cmp_EAX_imm32, Cmp_RAX_imm32, Cmp_rm8_imm8, Cmp_rm16_imm16, Cmp_rm32_imm32, Cmp_rm64_imm32, Cmp_rm16_imm8, Cmp_rm32_imm8, Cmp_rm64_imm8,
        Test_rm8_r8, Test_rm16_r16, Test_rm32_r32, Test_rm64_r64, Test_AL_imm8, Test_AX_imm16, Test_EAX_imm32, Test_RAX_imm32,
        Test_rm8_imm8, Test_rm16_imm16, Test_rm32_imm32, Test_rm64_imm32,
        Jmp_rel8_64, Jmp_rel32_64, Call_rel32_64, Retnq, Retnq_imm16,
        Jo_rel8_64, Jno_rel8_64, Jb_rel8_64, Jae_rel8_64, Je_rel8_64, Jne_rel8_64, Jbe_rel8_64, Ja_rel8_64, Js_rel8_64, Jns_rel8_64, Jp_rel8_64, Jnp_rel8_64, Jl_rel8_64, Jge_rel8_64, Jle_rel8_64, Jg_rel8_64,
        Jo_rel32_64, Jno_rel32_64, Jb_rel32_64, Jae_rel32_64, Je_rel32_64, Jne_rel32_64, Jbe_rel32_64, Ja_rel32_64, Js_rel32_64, Jns_rel32_64, Jp_rel32_64, Jnp_rel32_64, Jl_rel32_64, Jge_rel32_64, Jle_rel32_64, Jg_rel32_64,
    ]
};

fn mnemonic_name(m: Mnemonic) -> String {
    format!("{m:?}").to_lowercase()
}

fn classify(instr: &Instruction, bytes: &[u8]) -> Result<Op, Refusal> {
    let code = instr.code();
    if !EMULATED.contains(&code) {
        let name = mnemonic_name(instr.mnemonic());
        // Say which form when other forms of the same mnemonic are emulated.
        let family = EMULATED.iter().any(|c| c.mnemonic() == instr.mnemonic());
        return Err(Refusal::NotInSet(if family {
            format!("{name} (form {code:?})")
        } else {
            name
        }));
    }
    if instr.has_lock_prefix() {
        return Err(Refusal::LockPrefix);
    }
    // endbr64's f3 is part of its opcode; iced-x86 does not report it as rep.
    if instr.has_rep_prefix() || instr.has_repne_prefix() {
        return Err(Refusal::RepPrefix);
    }
    let prefixes = scan_prefixes(bytes);
    let mnemonic = instr.mnemonic();
    let is_nop = mnemonic == Mnemonic::Nop || mnemonic == Mnemonic::Endbr64;
    if let Some(seg) = prefixes.segment {
        // CS/DS/ES/SS are no-ops in 64-bit mode; padding nops use them
        // (`66 2e 0f 1f 84 00 ..`). Anything that addresses memory is refused.
        let null_segment = matches!(seg, 0x26 | 0x2e | 0x36 | 0x3e);
        if !(is_nop && null_segment) {
            return Err(Refusal::SegmentOverride);
        }
    }
    if prefixes.address_size && !is_nop {
        return Err(Refusal::AddressSizeOverride);
    }
    let branch = matches!(mnemonic, Mnemonic::Jmp | Mnemonic::Call | Mnemonic::Ret)
        || cond(mnemonic).is_ok();
    if branch && prefixes.operand_size {
        return Err(Refusal::BranchOperandSize);
    }

    Ok(match mnemonic {
        Mnemonic::Nop | Mnemonic::Endbr64 => Op::Nop,
        Mnemonic::Push => Op::Push(operand(instr, 0)?),
        Mnemonic::Pop => Op::Pop(reg(instr.op0_register())?.idx),
        Mnemonic::Mov => {
            let dst = rm(instr, 0)?;
            let src = operand(instr, 1)?;
            Op::Mov {
                dst,
                src,
                size: op_size(instr, dst, src)?,
            }
        }
        Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => {
            let dst = reg(instr.op0_register())?;
            let src = rm(instr, 1)?;
            let src_size = match src {
                Rm::Reg(r) => r.size,
                Rm::Mem(_) => mem_size(instr)?,
            };
            Op::Extend {
                dst,
                src,
                src_size,
                signed: mnemonic != Mnemonic::Movzx,
            }
        }
        Mnemonic::Lea => Op::Lea {
            dst: reg(instr.op0_register())?,
            mem: mem(instr)?,
        },
        Mnemonic::Add
        | Mnemonic::Sub
        | Mnemonic::And
        | Mnemonic::Or
        | Mnemonic::Xor
        | Mnemonic::Cmp
        | Mnemonic::Test => {
            let op = match mnemonic {
                Mnemonic::Add => AluOp::Add,
                Mnemonic::Sub => AluOp::Sub,
                Mnemonic::And => AluOp::And,
                Mnemonic::Or => AluOp::Or,
                Mnemonic::Xor => AluOp::Xor,
                Mnemonic::Cmp => AluOp::Cmp,
                _ => AluOp::Test,
            };
            let dst = rm(instr, 0)?;
            let src = operand(instr, 1)?;
            Op::Alu {
                op,
                dst,
                src,
                size: op_size(instr, dst, src)?,
            }
        }
        Mnemonic::Jmp => Op::Jmp(instr.near_branch_target()),
        Mnemonic::Call => Op::Call(instr.near_branch_target()),
        Mnemonic::Ret => Op::Ret(if code == Code::Retnq_imm16 {
            instr.immediate16()
        } else {
            0
        }),
        m => Op::Jcc(cond(m)?, instr.near_branch_target()),
    })
}

fn cond(m: Mnemonic) -> Result<Cond, Refusal> {
    Ok(match m {
        Mnemonic::Jo => Cond::O,
        Mnemonic::Jno => Cond::No,
        Mnemonic::Jb => Cond::B,
        Mnemonic::Jae => Cond::Ae,
        Mnemonic::Je => Cond::E,
        Mnemonic::Jne => Cond::Ne,
        Mnemonic::Jbe => Cond::Be,
        Mnemonic::Ja => Cond::A,
        Mnemonic::Js => Cond::S,
        Mnemonic::Jns => Cond::Ns,
        Mnemonic::Jp => Cond::P,
        Mnemonic::Jnp => Cond::Np,
        Mnemonic::Jl => Cond::L,
        Mnemonic::Jge => Cond::Ge,
        Mnemonic::Jle => Cond::Le,
        Mnemonic::Jg => Cond::G,
        other => return Err(Refusal::NotInSet(mnemonic_name(other))),
    })
}

/// Operand width of a mov/ALU form: that of its register operand, else of its memory operand.
fn op_size(instr: &Instruction, dst: Rm, src: Src) -> Result<u8, Refusal> {
    match (dst, src) {
        (Rm::Reg(r), _) | (_, Src::Rm(Rm::Reg(r))) => Ok(r.size),
        _ => mem_size(instr),
    }
}

fn mem_size(instr: &Instruction) -> Result<u8, Refusal> {
    Ok(match instr.memory_size() {
        MemorySize::UInt8 | MemorySize::Int8 => 1,
        MemorySize::UInt16 | MemorySize::Int16 => 2,
        MemorySize::UInt32 | MemorySize::Int32 => 4,
        MemorySize::UInt64 | MemorySize::Int64 => 8,
        _ => return Err(unexpected_operand(instr)),
    })
}

fn rm(instr: &Instruction, i: u32) -> Result<Rm, Refusal> {
    match operand(instr, i)? {
        Src::Rm(rm) => Ok(rm),
        Src::Imm(_) => Err(unexpected_operand(instr)),
    }
}

fn operand(instr: &Instruction, i: u32) -> Result<Src, Refusal> {
    Ok(match instr.op_kind(i) {
        OpKind::Register => Src::Rm(Rm::Reg(reg(instr.op_register(i))?)),
        OpKind::Memory => Src::Rm(Rm::Mem(mem(instr)?)),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Src::Imm(instr.immediate(i)),
        _ => return Err(unexpected_operand(instr)),
    })
}

fn unexpected_operand(instr: &Instruction) -> Refusal {
    Refusal::NotInSet(format!(
        "{} (operand kinds of {:?})",
        mnemonic_name(instr.mnemonic()),
        instr.code()
    ))
}

fn reg(r: Register) -> Result<RegRef, Refusal> {
    let n = r as u32;
    // iced-x86 numbers each GPR width as one run of 16 (20 for 8-bit).
    let in_run = |first: Register, last: Register| (first as u32..=last as u32).contains(&n);
    let (base, size) = if in_run(Register::AL, Register::R15L) {
        (Register::AL, 1)
    } else if in_run(Register::AX, Register::R15W) {
        (Register::AX, 2)
    } else if in_run(Register::EAX, Register::R15D) {
        (Register::EAX, 4)
    } else if in_run(Register::RAX, Register::R15) {
        (Register::RAX, 8)
    } else {
        return Err(Refusal::NotInSet(format!("operand register {r:?}")));
    };
    let mut idx = n - base as u32;
    let mut high = false;
    if size == 1 {
        // iced order: AL CL DL BL AH CH DH BH SPL BPL SIL DIL R8L..R15L
        match idx {
            4..=7 => {
                high = true;
                idx -= 4;
            }
            8..=19 => idx -= 4,
            _ => {}
        }
    }
    Ok(RegRef {
        idx: idx as u8,
        size,
        high,
    })
}

fn mem(instr: &Instruction) -> Result<MemRef, Refusal> {
    let base = instr.memory_base();
    let index = instr.memory_index();
    if base == Register::RIP {
        // iced-x86 already resolved the displacement to the absolute target.
        return Ok(MemRef {
            base: None,
            index: None,
            scale: 1,
            disp: instr.memory_displacement64(),
        });
    }
    let gpr64 = |r: Register| -> Result<Option<u8>, Refusal> {
        match r {
            Register::None => Ok(None),
            r if (Register::RAX as u32..=Register::R15 as u32).contains(&(r as u32)) => {
                Ok(Some((r as u32 - Register::RAX as u32) as u8))
            }
            _ => Err(Refusal::AddressSizeOverride),
        }
    };
    Ok(MemRef {
        base: gpr64(base)?,
        index: gpr64(index)?,
        scale: instr.memory_index_scale() as u8,
        disp: instr.memory_displacement64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(bytes: &[u8]) -> Refusal {
        let d = prepare(bytes, 0xffff_ffff_8100_0000).expect("decodes");
        assert!(!d.is_emulated(), "{} was accepted", d.disassembly());
        d.refusal().cloned().expect("refusal")
    }

    #[test]
    fn refuses_with_reasons() {
        assert_eq!(refusal(&[0x0f, 0xa2]), Refusal::NotInSet("cpuid".into()));
        // lock add [rax], ecx
        assert_eq!(refusal(&[0xf0, 0x01, 0x08]), Refusal::LockPrefix);
        // rep movsb
        assert_eq!(
            refusal(&[0xf3, 0xa4]).to_string(),
            "not in the emulated set: movsb"
        );
        // mov rax, gs:[0x28]
        assert_eq!(
            refusal(&[0x65, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0]),
            Refusal::SegmentOverride
        );
        // mov eax, ds:[rdi] (null segment, but it addresses memory)
        assert_eq!(refusal(&[0x3e, 0x8b, 0x07]), Refusal::SegmentOverride);
        // mov eax, [edi]
        assert_eq!(refusal(&[0x67, 0x8b, 0x07]), Refusal::AddressSizeOverride);
        // f3 on a mov is a rep prefix
        assert_eq!(refusal(&[0xf3, 0x89, 0xc8]), Refusal::RepPrefix);
        // bnd jmp
        assert_eq!(refusal(&[0xf2, 0xeb, 0x00]), Refusal::RepPrefix);
        // 66 e9: jmp rel16 on AMD, jmp rel32 on Intel
        assert_eq!(
            refusal(&[0x66, 0xe9, 0, 0, 0, 0]),
            Refusal::BranchOperandSize
        );
        // jcc with a branch hint prefix
        assert_eq!(refusal(&[0x3e, 0x74, 0x00]), Refusal::SegmentOverride);
        // mov rax, cr3: same mnemonic as an emulated form, so the form is named
        let r = refusal(&[0x0f, 0x20, 0xd8]);
        assert_eq!(
            r.to_string(),
            "not in the emulated set: mov (form Mov_r64_cr)"
        );
        // xchg r8, rax (49 90) is not a nop
        assert!(matches!(refusal(&[0x49, 0x90]), Refusal::NotInSet(_)));
        // pause, 16-bit push, indirect call, leave, syscall
        for b in [
            &[0xf3, 0x90][..],
            &[0x66, 0x50],
            &[0xff, 0xd0],
            &[0xc9],
            &[0x0f, 0x05],
        ] {
            assert!(matches!(refusal(b), Refusal::NotInSet(_)), "{b:x?}");
        }
    }

    #[test]
    fn accepts_probe_site_forms() {
        let ip = 0xffff_ffff_8100_0000;
        for (bytes, text) in [
            (&[0x0f, 0x1f, 0x44, 0x00, 0x00][..], "nop [rax+rax]"),
            (&[0xf3, 0x0f, 0x1e, 0xfa], "endbr64"),
            (&[0x66, 0x90], "xchg ax, ax"),
            (
                &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0],
                "nop cs:[rax+rax]",
            ),
            (&[0x55], "push rbp"),
            (&[0x41, 0x57], "push r15"),
            (&[0x48, 0x89, 0xe5], "mov rbp, rsp"),
            (&[0x48, 0x8b, 0x47, 0x10], "mov rax, [rdi+0x10]"),
            (&[0x48, 0x83, 0xec, 0x20], "sub rsp, 0x20"),
            (&[0xc3], "ret"),
        ] {
            let d = prepare(bytes, ip).unwrap();
            assert!(d.is_emulated(), "{text}: {:?}", d.refusal());
            assert_eq!(d.len(), bytes.len());
            assert_eq!(d.bytes(), bytes);
            assert_eq!(d.disassembly(), text);
        }
        let call = prepare(&[0xe8, 0x10, 0, 0, 0, 0xcc], ip).unwrap();
        assert_eq!(call.len(), 5);
        assert_eq!(call.op, Ok(Op::Call(ip + 5 + 0x10)));
    }

    #[test]
    fn high_byte_registers() {
        // mov ah, bh
        let d = prepare(&[0x88, 0xfc], 0).unwrap();
        let r = |idx, high| RegRef { idx, size: 1, high };
        assert_eq!(
            d.op,
            Ok(Op::Mov {
                dst: Rm::Reg(r(0, true)),
                src: Src::Rm(Rm::Reg(r(3, true))),
                size: 1
            })
        );
        // mov spl, dil
        let d = prepare(&[0x40, 0x88, 0xfc], 0).unwrap();
        assert_eq!(
            d.op,
            Ok(Op::Mov {
                dst: Rm::Reg(r(4, false)),
                src: Src::Rm(Rm::Reg(r(7, false))),
                size: 1
            })
        );
        // mov r15b, r8b
        let d = prepare(&[0x45, 0x88, 0xc7], 0).unwrap();
        assert_eq!(
            d.op,
            Ok(Op::Mov {
                dst: Rm::Reg(r(15, false)),
                src: Src::Rm(Rm::Reg(r(8, false))),
                size: 1
            })
        );
    }

    #[test]
    fn decode_errors() {
        assert!(matches!(
            prepare(&[], 0x1000),
            Err(DecodeError::Truncated {
                ip: 0x1000,
                have: 0
            })
        ));
        assert!(matches!(
            prepare(&[0xe8, 0x00], 0),
            Err(DecodeError::Truncated { .. })
        ));
        // 0x06 (push es) is invalid in 64-bit mode
        let e = prepare(&[0x06, 0x90, 0x90], 0x1234).unwrap_err();
        assert_eq!(e.to_string(), "invalid instruction at 0x1234: 06 90 90");
    }

    #[test]
    fn emulated_list_has_no_duplicates() {
        let mut v: Vec<u32> = emulated_codes().iter().map(|&c| c as u32).collect();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), emulated_codes().len());
    }
}
