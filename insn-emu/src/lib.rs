//! Host-side emulation of the x86-64 instruction displaced by a probe's `int3`.
//!
//! When a vCPU hits a host-planted breakpoint the original instruction must run
//! without taking the breakpoint out (another vCPU could pass the address
//! unobserved). This crate decodes that instruction once, at probe
//! registration ([`prepare`]), and later applies its effect to the vCPU's
//! registers and guest memory ([`Displaced::emulate`]), so a hit costs one VM
//! exit and no single-step.
//!
//! Only a small, common set is emulated (see the crate README); everything
//! else is refused with a reason, and the caller falls back to single-stepping
//! the original bytes. Any [`EmuError`] leaves registers and memory untouched,
//! so falling back after an error is always correct: the single-step then
//! raises whatever fault the real CPU raises.

mod decode;
mod exec;
pub mod writer;

pub use decode::{emulated_codes, prepare, DecodeError, Displaced, Refusal};
pub use exec::{Effect, EmuError};

/// Indices into [`Regs::gpr`], in the hardware (and iced-x86) encoding order.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
    pub const R12: usize = 12;
    pub const R13: usize = 13;
    pub const R14: usize = 14;
    pub const R15: usize = 15;
}

/// RFLAGS bits the emulator reads or writes.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const OF: u64 = 1 << 11;
    pub const RF: u64 = 1 << 16;
    /// The six status flags written by the arithmetic instructions.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// The vCPU state an emulated instruction can change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// General-purpose registers, indexed by [`gpr`] (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

/// A guest virtual address that could not be read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest memory not accessible at {addr:#x}")]
pub struct MemFault {
    pub addr: u64,
}

/// Guest memory by virtual address (the engine implements it with a page walk).
///
/// An instruction makes at most one `write` call, after all its reads
/// succeeded. For the instruction to stay all-or-nothing, `write` must either
/// write every byte or none (check all pages an access spans before writing).
///
/// The accesses are the guest kernel's own (CPL0), so the walk should fail
/// where the CPU would fault: not present, a write to a read-only page when
/// CR0.WP is set, a user page under SMAP with RFLAGS.AC clear. It should also
/// set the Accessed/Dirty bits the CPU would set. A fault is never delivered
/// by this crate: the caller falls back to single-stepping, which lets the
/// CPU raise it.
pub trait GuestMemory {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemFault>;
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemFault>;
}
