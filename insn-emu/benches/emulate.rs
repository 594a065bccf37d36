//! Time per `Displaced::emulate` call for the forms common at probe sites.
//! Run with `cargo bench -p insn-emu`.

use std::hint::black_box;
use std::time::Instant;

use insn_emu::{gpr, prepare, GuestMemory, MemFault, Regs};

const IP: u64 = 0xffff_ffff_8100_0000;
const STACK: u64 = 0xffff_c900_0001_0000;

/// A flat guest stack, as cheap as memory access can be (the engine's page walk adds to this).
struct Stack {
    bytes: Vec<u8>,
}

impl Stack {
    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, MemFault> {
        let off = addr.wrapping_sub(STACK) as usize;
        if addr < STACK || off + len > self.bytes.len() {
            return Err(MemFault { addr });
        }
        Ok(off..off + len)
    }
}

impl GuestMemory for Stack {
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

fn main() {
    let iters: u32 = std::env::var("ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let mut mem = Stack {
        bytes: vec![0; 0x2000],
    };
    // ret pops this
    mem.bytes[0x1000..0x1008].copy_from_slice(&(IP + 0x40).to_le_bytes());
    let mut start = Regs {
        gpr: [0x1234; 16],
        rip: IP,
        rflags: 0x246,
    };
    start.gpr[gpr::RSP] = STACK + 0x1000;
    start.gpr[gpr::RDI] = STACK + 0x100;

    let forms: [(&str, &[u8]); 8] = [
        ("nop5 (ftrace)", &[0x0f, 0x1f, 0x44, 0x00, 0x00]),
        ("endbr64", &[0xf3, 0x0f, 0x1e, 0xfa]),
        ("push rbp", &[0x55]),
        ("mov rbp, rsp", &[0x48, 0x89, 0xe5]),
        ("sub rsp, 0x20", &[0x48, 0x83, 0xec, 0x20]),
        ("mov rax, [rdi+0x10]", &[0x48, 0x8b, 0x47, 0x10]),
        ("call rel32", &[0xe8, 0x00, 0x01, 0x00, 0x00]),
        ("ret", &[0xc3]),
    ];
    println!("{:<22} {:>12} {:>14}", "form", "emulate ns", "prepare ns");
    for (name, bytes) in forms {
        let t = Instant::now();
        let n_prep = 20_000;
        for _ in 0..n_prep {
            black_box(prepare(black_box(bytes), IP).unwrap());
        }
        let prep_ns = t.elapsed().as_nanos() as f64 / f64::from(n_prep);

        let d = prepare(bytes, IP).unwrap();
        assert!(d.is_emulated(), "{name}");
        let t = Instant::now();
        for _ in 0..iters {
            let mut regs = black_box(start);
            black_box(d.emulate(&mut regs, &mut mem).unwrap());
            black_box(regs);
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
        println!("{name:<22} {ns:>12.1} {prep_ns:>14.0}");
    }
}
