//! A fake guest for measuring and checking the engine's hit path: one text
//! page (`nop5; ret` and `push rbp; ...`), a stack page, a data page with a
//! 64-byte string, 4-level page tables, and a hit loop that needs no KVM.
//! Shared by the `hit_path` criterion bench and the allocation test.

#![allow(dead_code)]

use std::sync::Arc;

use guest_access::fake::{long_mode, FakeMemory, FakeVcpu, FakeVm, PageTables, Perm};
use guest_access::{BreakpointAction, BreakpointHandler, GuestMemory, Regs};
use introspect::{Engine, EngineConfig, KernelSymbols, ProbeRequest, KERNEL_TEXT_MAP};

const TEXT_GPA: u64 = 0x10_0000;
pub const TEXT: u64 = KERNEL_TEXT_MAP + TEXT_GPA;
const STACK_GPA: u64 = 0x8_0000;
pub const STACK: u64 = 0xffff_c900_0000_0000;
const DATA_GPA: u64 = 0x9_0000;
pub const DATA: u64 = 0xffff_c900_0001_0000;

/// `nop5; ret`: emulated.
pub const F_NOP5: u64 = TEXT;
/// `push rbp; mov rbp, rsp; pop rbp; ret`: emulated, a function entry.
pub const F_PUSH: u64 = TEXT + 0x10;
const PAD: (u64, u64) = (TEXT + 0x800, TEXT + 0x900);
pub const TRAP: u64 = TEXT + 0x900;
/// Where the kretprobe's frame keeps its return address.
pub const FRAME: u64 = STACK + 0x800;
/// The return address the kretprobe's frame holds.
pub const RETURN_TO: u64 = TEXT + 0x700;
/// A NUL-terminated string of 64 bytes (65 with the NUL).
pub const STRING: u64 = DATA + 0x100;
pub const STRING_LEN: usize = 64;

const INT3: u8 = 0xcc;
const RFLAGS_IF: u64 = 1 << 9;

/// No functions known; the padding is free for out-of-line slots.
struct Padding;

impl KernelSymbols for Padding {
    fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
        None
    }
    fn scratch_ranges(&self) -> Vec<(u64, u64)> {
        vec![PAD]
    }
}

pub struct Rig {
    pub vm: Arc<FakeVm>,
    pub engine: Arc<Engine>,
}

pub fn rig() -> Rig {
    let mem = FakeMemory::new(0x20_0000);
    let mut text = vec![INT3; 0x1000];
    text[..6].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]);
    text[0x10..0x16].copy_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3]);
    mem.write_phys(TEXT_GPA, &text).unwrap();
    let mut s = [b'a'; STRING_LEN + 1];
    s[STRING_LEN] = 0;
    mem.write_phys(DATA_GPA + 0x100, &s).unwrap();
    let mut pt = PageTables::new(&mem, 0x1000..0x10000);
    pt.map(TEXT, TEXT_GPA, 0x1000, Perm::TEXT);
    pt.map(STACK, STACK_GPA, 0x1000, Perm::DATA);
    pt.map(DATA, DATA_GPA, 0x1000, Perm::DATA);
    let cr3 = pt.cr3();
    let vm = Arc::new(FakeVm::new(mem, 2));
    vm.set_system_regs(long_mode(cr3));
    let engine = Engine::new(vm.clone(), Arc::new(Padding), EngineConfig::for_vcpus(2));
    engine.set_return_trap(TRAP).unwrap();
    Rig { vm, engine }
}

/// The shapes of probe the bench and the allocation test exercise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape {
    /// A kprobe with no arguments.
    NoArgs,
    /// A kprobe with three integer arguments.
    ThreeInts,
    /// A kprobe with `+0(%si):string` (64 bytes).
    String,
    /// Three arguments, one of them the 64-byte string.
    ThreeWithString,
    /// A kretprobe entry + return, two arguments at entry and the return value.
    Kretprobe,
    /// A kprobe on a site run out of line (two traps: the site, the slot's end).
    OutOfLine,
}

impl Shape {
    pub const ALL: [Shape; 6] = [
        Shape::NoArgs,
        Shape::ThreeInts,
        Shape::String,
        Shape::ThreeWithString,
        Shape::Kretprobe,
        Shape::OutOfLine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::NoArgs => "no_args",
            Shape::ThreeInts => "three_ints",
            Shape::String => "string64",
            Shape::ThreeWithString => "three_with_string64",
            Shape::Kretprobe => "kretprobe_pair",
            Shape::OutOfLine => "out_of_line",
        }
    }

    fn definition(self) -> &'static str {
        match self {
            Shape::NoArgs => "p:b/p f",
            Shape::ThreeInts => "p:b/p f a=%di:u64 b=%dx:s32 c=%cx:x64",
            Shape::String => "p:b/p f s=+0(%si):string",
            Shape::ThreeWithString => "p:b/p f a=%di:u64 b=%dx:s32 s=+0(%si):string",
            Shape::Kretprobe => "r:b/p f a=%di:u64 b=%dx:s32 ret=$retval:s64",
            Shape::OutOfLine => "p:b/p f a=%di:u64",
        }
    }

    /// Register this shape's probe on `r`.
    pub fn register(self, r: &Rig) {
        let def = probe_spec::parse_probe(self.definition()).unwrap();
        let mut req = match self {
            Shape::Kretprobe => ProbeRequest::kretprobe("b/p", F_PUSH, None),
            _ => ProbeRequest::kprobe("b/p", F_NOP5),
        };
        req.force_out_of_line = matches!(self, Shape::OutOfLine);
        req.fetch = Some(def);
        r.engine.register(req).unwrap();
    }
}

/// One vCPU of the rig, ready to hit the shape's probe again and again.
pub struct Hitter {
    vcpu: FakeVcpu,
    entry: Regs,
    shape: Shape,
}

impl Hitter {
    pub fn new(r: &Rig, shape: Shape) -> Self {
        let mut vcpu = r.vm.vcpu(0);
        let entry = Regs {
            rip: match shape {
                Shape::Kretprobe => F_PUSH,
                _ => F_NOP5,
            },
            rsp: FRAME,
            rbp: 0x1234,
            rdi: 0xdead_beef,
            rsi: STRING,
            rdx: 0xffff_fff0,
            rcx: 7,
            rflags: 0x2 | RFLAGS_IF,
            ..Default::default()
        };
        vcpu.regs = entry;
        r.vm.mem().write_u64(FRAME - STACK + STACK_GPA, RETURN_TO);
        Hitter { vcpu, entry, shape }
    }

    /// One probe hit as the guest sees it: the trap(s) and the resume.
    /// Panics if the engine did not move the vCPU where the guest expects.
    pub fn hit(&mut self, r: &Rig) {
        let h: &dyn BreakpointHandler = &*r.engine;
        self.vcpu.regs = self.entry;
        assert!(h.owns_address(self.vcpu.regs.rip));
        assert_eq!(self.vcpu.hit(h, &*r.vm), BreakpointAction::Resume);
        match self.shape {
            Shape::Kretprobe => {
                // push rbp emulated; the guest's `pop rbp; ret` would pop
                // the trap address: return into the trap.
                assert_eq!(self.vcpu.regs.rip, F_PUSH + 1);
                self.vcpu.regs.rip = TRAP;
                self.vcpu.regs.rsp = FRAME + 8;
                self.vcpu.regs.rax = 42;
                assert!(h.owns_address(TRAP));
                assert_eq!(self.vcpu.hit(h, &*r.vm), BreakpointAction::Resume);
                assert_eq!(self.vcpu.regs.rip, RETURN_TO);
            }
            Shape::OutOfLine => {
                // In the slot: the relocated nop5 "runs", then its int3.
                self.vcpu.regs.rip += 5;
                assert!(h.owns_address(self.vcpu.regs.rip));
                assert_eq!(self.vcpu.hit(h, &*r.vm), BreakpointAction::Resume);
                assert_eq!(self.vcpu.regs.rip, F_NOP5 + 5);
            }
            _ => assert_eq!(self.vcpu.regs.rip, F_NOP5 + 5),
        }
    }
}
