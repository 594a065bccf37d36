//! Does this host's KVM complete a guest user-mode `syscall`?
//!
//! A throw-away VM (one vCPU, 2 MiB, identity-mapped with 4 KiB pages)
//! starts at CPL3 on a `syscall`. LSTAR points at supervisor code that writes
//! port [`PORT_LSTAR`]; every IDT vector points at code that writes its
//! vector to port [`PORT_EXCEPTION`]. Hardware KVM reaches LSTAR at CPL0; a
//! host that leaves the system call half done delivers #PF (error 0x15,
//! CR2 = LSTAR) to the guest instead. Run once per process and cached.

use std::path::Path;
use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::cpu::flat_long_mode_segment;

const MEM: usize = 2 << 20;
const GDT: usize = 0x1000;
const PML4: usize = 0x2000;
const PDPT: usize = 0x3000;
const PD: usize = 0x4000;
const PT: usize = 0x5000;
const IDT: usize = 0x6000;
const TSS: usize = 0x7000;
const KCODE: usize = 0x10000;
const K_PF: usize = KCODE + 0x100;
const K_OTHER: usize = KCODE + 0x200;
const UCODE: usize = 0x20000;
const USTACK_TOP: u64 = 0x22000;
const KSTACK_TOP: u64 = 0x30000;
const PORT_LSTAR: u16 = 0xe0;
const PORT_EXCEPTION: u16 = 0xe1;

/// What the probe VM showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyscallProbe {
    /// The `syscall` reached LSTAR at CPL0: nothing to do.
    Completes,
    /// The guest got a #PF at LSTAR instead (this host needs the bridge).
    LeavesHalfDone { error_code: u64 },
}

/// The cached result for this process (the first call runs the probe VM on
/// `kvm_device`).
pub fn host_needs_bridge(kvm_device: &Path) -> Result<bool, String> {
    static RESULT: OnceLock<Result<bool, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let r =
                probe_syscall(kvm_device).map(|p| matches!(p, SyscallProbe::LeavesHalfDone { .. }));
            tracing::debug!("system-call probe VM: {r:?}");
            r
        })
        .clone()
}

/// A port number as the immediate of `out imm8, al`.
fn imm8(port: u16) -> u8 {
    u8::try_from(port).expect("an `out imm8` port is below 0x100")
}

fn put(mem: &mut [u8], at: usize, bytes: &[u8]) {
    mem[at..at + bytes.len()].copy_from_slice(bytes);
}

fn put64(mem: &mut [u8], at: usize, v: u64) {
    put(mem, at, &v.to_le_bytes());
}

/// Run the probe VM (uncached).
pub fn probe_syscall(kvm_device: &Path) -> Result<SyscallProbe, String> {
    let path = std::ffi::CString::new(kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| "KVM device path contains a NUL byte".to_string())?;
    let kvm = Kvm::new_with_path(path.as_c_str()).map_err(|e| format!("opening KVM: {e}"))?;
    // SAFETY: mmap with a null hint, no fd (-1) and MAP_ANONYMOUS creates a
    // new mapping and cannot alias any existing Rust object; the result is
    // checked against MAP_FAILED before use.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err("mmap of the probe VM's memory failed".into());
    }
    struct Unmap(*mut libc::c_void);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: self.0 is the MEM-byte mapping made above and nothing
            // else unmaps it; the only borrow of it (`mem`) and every user of
            // it (the VM and its vCPU, declared after this guard) are gone,
            // because locals drop in reverse order.
            unsafe { libc::munmap(self.0, MEM) };
        }
    }
    let _unmap = Unmap(host);
    // Created after `_unmap`, so the VM (and below its vCPU) drop before the
    // memory is unmapped.
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // SAFETY: `host` is a successful MEM-byte PROT_READ|PROT_WRITE mapping,
    // page-aligned, that nothing else references yet (KVM gets it only
    // below, after the last use of `mem`), and it stays mapped until
    // `_unmap` drops, after `mem`'s last use.
    let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, MEM) };
    build_guest(mem);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is the MEM-byte mapping at `host`, which stays
    // mapped while KVM can use it: `vm` and the vCPU are declared after
    // `_unmap`, so they drop (closing the memslot) before the munmap. The
    // slot is the VM's only one, so it overlaps no other region.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut s = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    s.cs = flat_long_mode_segment(0x33, true, 3);
    s.ss = flat_long_mode_segment(0x2b, false, 3);
    s.ds = s.ss;
    s.es = s.ss;
    s.fs = s.ss;
    s.gs = s.ss;
    s.gdt.base = GDT as u64;
    s.gdt.limit = 10 * 8 - 1;
    s.idt.base = IDT as u64;
    s.idt.limit = 256 * 16 - 1;
    s.tr = kvm_segment {
        base: TSS as u64,
        limit: 0x67,
        selector: 0x40,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    s.cr3 = PML4 as u64;
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE OSFXSR OSXMMEXCPT
    s.cr0 = 0x8005_0033;
    s.efer = 0xd01; // SCE LME LMA NXE
    vcpu.set_sregs(&s)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        msr(0xc000_0081, (0x23u64 << 48) | (0x10u64 << 32)), // STAR
        msr(0xc000_0082, KCODE as u64),                      // LSTAR
        msr(0xc000_0084, 0x0025_7fd5),                       // SFMASK (Linux's)
    ])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
    if n != 3 {
        return Err(format!("KVM_SET_MSRS set {n} of 3"));
    }
    vcpu.set_regs(&kvm_regs {
        rip: UCODE as u64,
        rsp: USTACK_TOP - 0x100,
        rflags: 2,
        ..Default::default()
    })
    .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    for _ in 0..32 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_LSTAR, _)) => {
                let s = vcpu
                    .get_sregs()
                    .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
                return if s.cs.dpl == 0 {
                    Ok(SyscallProbe::Completes)
                } else {
                    Err(format!(
                        "LSTAR code ran with CS {:#x} DPL {}",
                        s.cs.selector, s.cs.dpl
                    ))
                };
            }
            Ok(VcpuExit::IoOut(PORT_EXCEPTION, data)) => {
                let vector = data.first().copied().unwrap_or(0xff);
                if vector != 14 {
                    return Err(format!("the probe's syscall raised vector {vector}"));
                }
                let r = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
                let s = vcpu
                    .get_sregs()
                    .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
                if s.cr2 != KCODE as u64 {
                    return Err(format!("#PF at CR2 {:#x}, not LSTAR", s.cr2));
                }
                let gpa = usize::try_from(r.rsp).unwrap_or(usize::MAX - 8);
                let err = mem
                    .get(gpa..gpa + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                return Ok(SyscallProbe::LeavesHalfDone { error_code: err });
            }
            Ok(VcpuExit::Intr) => continue,
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    Err("no answer after 32 exits".into())
}

fn build_guest(mem: &mut [u8]) {
    // Page tables: PML4/PDPT/PD user-accessible, the leaf PTEs decide.
    put64(mem, PML4, PDPT as u64 | 7);
    put64(mem, PDPT, PD as u64 | 7);
    put64(mem, PD, PT as u64 | 7);
    for i in 1..512usize {
        let a = (i as u64) << 12;
        let user = (UCODE as u64..USTACK_TOP).contains(&a);
        put64(mem, PT + 8 * i, a | 3 | if user { 4 } else { 0 });
    }
    // GDT, Linux layout; TSS at 0x40.
    let gdt = [
        0u64,
        0x00cf_9b00_0000_ffff, // 0x08 kernel32 cs
        0x00af_9b00_0000_ffff, // 0x10 kernel cs
        0x00cf_9300_0000_ffff, // 0x18 kernel ds
        0x00cf_fb00_0000_ffff, // 0x23 user32 cs
        0x00cf_f300_0000_ffff, // 0x2b user ds
        0x00af_fb00_0000_ffff, // 0x33 user cs
        0,
        0x67 | ((TSS as u64 & 0xff_ffff) << 16) | (0x89u64 << 40),
        0,
    ];
    for (i, d) in gdt.iter().enumerate() {
        put64(mem, GDT + 8 * i, *d);
    }
    put64(mem, TSS + 4, KSTACK_TOP); // RSP0
    put(mem, TSS + 0x66, &0x68u16.to_le_bytes());
    // LSTAR: mov al, 1; out 0xe0, al; hlt
    put(mem, KCODE, &[0xb0, 0x01, 0xe6, imm8(PORT_LSTAR), 0xf4]);
    // #PF: mov al, 14; out 0xe1, al; hlt.  Others: mov al, 0xff; out 0xe1, al; hlt
    put(mem, K_PF, &[0xb0, 14, 0xe6, imm8(PORT_EXCEPTION), 0xf4]);
    put(
        mem,
        K_OTHER,
        &[0xb0, 0xff, 0xe6, imm8(PORT_EXCEPTION), 0xf4],
    );
    for v in 0..256usize {
        let h = if v == 14 { K_PF } else { K_OTHER } as u64;
        let lo = (h & 0xffff) | (0x10 << 16) | (0x8eu64 << 40) | (((h >> 16) & 0xffff) << 48);
        put64(mem, IDT + 16 * v, lo);
        put64(mem, IDT + 16 * v + 8, h >> 32);
    }
    // User: syscall; ud2
    put(mem, UCODE, &[0x0f, 0x05, 0x0f, 0x0b]);
}

/// Whether a debug-register data breakpoint fires for guest CPL0 code on
/// this host (the debug-register mechanism of memory watches). Cached per
/// process; Err says why not (or what failed).
pub fn data_breakpoints_fire() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let r = match probe_data_breakpoint(Path::new("/dev/kvm")) {
                Ok(true) => Ok(()),
                Ok(false) => Err(NO_DATA_BREAKPOINTS.to_string()),
                Err(e) => Err(format!("cannot tell whether data breakpoints work: {e}")),
            };
            tracing::debug!("data-breakpoint probe VM: {r:?}");
            r
        })
        .clone()
}

/// The refusal when [`data_breakpoints_fire`] finds they do not.
pub const NO_DATA_BREAKPOINTS: &str = "this host's KVM does not deliver data breakpoints for guest kernel code; use the page mechanism";

/// A real-mode (CPL0) vCPU stores one byte under a 1-byte write
/// breakpoint (DR0, R/W=01), then writes a port: a #DB exit first means
/// data breakpoints fire; the port first means they do not (the emulating
/// KVM of the development hosts).
fn probe_data_breakpoint(kvm_device: &Path) -> Result<bool, String> {
    const CODE: usize = 0x4000;
    const DATA: u16 = 0x5000;
    const PORT_AFTER: u8 = 0x9d;
    const LEN: usize = 0x10000;
    let path = std::ffi::CString::new(kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|e| e.to_string())?;
    let kvm = Kvm::new_with_path(path.as_c_str()).map_err(|e| format!("open: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let mut mem = vec![0u8; LEN + 0x1000];
    // Page-align the guest memory inside the Vec.
    let off = (0x1000 - (mem.as_ptr() as usize & 0xfff)) & 0xfff;
    let host = &mut mem[off..off + LEN];
    let [lo, hi] = DATA.to_le_bytes();
    // mov al, 0x5a ; mov [DATA], al ; out PORT_AFTER, al ; hlt
    host[CODE..CODE + 8].copy_from_slice(&[0xb0, 0x5a, 0xa2, lo, hi, 0xe6, PORT_AFTER, 0xf4]);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: LEN as u64,
        userspace_addr: host.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `host` is LEN bytes of this function's own Vec, which
    // outlives the VM (dropped after `vm` and `vcpu` at the end of scope,
    // declared before them).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("memory slot: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("vCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    let regs = kvm_regs {
        rip: CODE as u64,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    let mut dbg = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = u64::from(DATA);
    // L0|G0, R/W0 = 01 (writes), LEN0 = 00 (1 byte).
    dbg.arch.debugreg[7] = 0x3 | (0b01 << 16);
    vcpu.set_guest_debug(&dbg)
        .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
    for _ in 0..16 {
        match vcpu.run() {
            Ok(VcpuExit::Debug(arch)) => return Ok(arch.exception == 1 && arch.dr6 & 1 != 0),
            Ok(VcpuExit::IoOut(port, _)) if port == u16::from(PORT_AFTER) => return Ok(false),
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    Err("no exit after 16 runs".into())
}

#[cfg(test)]
mod data_breakpoint_tests {
    /// Whatever the host does, the probe answers (no error) where KVM is.
    #[test]
    fn the_data_breakpoint_probe_answers() {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(
                std::env::var("HVPROBE_REQUIRE_KVM").as_deref() != Ok("1"),
                "HVPROBE_REQUIRE_KVM=1 and /dev/kvm is missing"
            );
            return;
        }
        let r = super::data_breakpoints_fire();
        eprintln!("data breakpoints on CPL0 code: {r:?}");
        if let Err(e) = &r {
            assert_eq!(e, super::NO_DATA_BREAKPOINTS);
        }
    }
}
