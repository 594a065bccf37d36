//! KVM state of a VM for snapshots: per-vCPU and VM-wide, each KVM structure
//! kept as its raw bytes (hex in JSON), since they are plain `repr(C)` data.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Raw bytes of a plain-data KVM structure, hex-encoded in JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl Serialize for Raw {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut h = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            h.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&h)
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let h = String::deserialize(d)?;
        if h.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex"));
        }
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map(Raw)
            .map_err(serde::de::Error::custom)
    }
}

/// Plain `repr(C)` KVM structures without pointers, safe to copy as bytes.
/// # Safety
/// Implementors must be `repr(C)`, contain no pointers or references, and be
/// valid for every bit pattern.
pub unsafe trait Pod: Copy {}
// Each impl below is for a bindgen copy of a kernel UAPI structure. The
// kernel lays these out with explicit pad/reserved fields precisely so that
// there is no implicit padding (the ABI is the same on every compiler), and
// their fields are integers, integer arrays or unions of those, so every bit
// pattern is a valid value and every byte is initialised.
// SAFETY: 18 u64 registers: no padding, any bits valid.
unsafe impl Pod for kvm_regs {}
// SAFETY: a plain integer array (the legacy xsave region).
unsafe impl Pod for [u32; 1024] {}
// SAFETY: kvm_segment/kvm_dtable carry explicit `padding` fields, the rest
// are u64s and a u64 bitmap: no implicit padding, any bits valid.
unsafe impl Pod for kvm_sregs {}
// SAFETY: u8/u16/u32/u64 fields with explicit pad1/pad2 keeping the u64s
// aligned: no implicit padding, any bits valid.
unsafe impl Pod for kvm_fpu {}
// SAFETY: u32 counters, an array of {u32, u32 reserved, u64} and u64 padding.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: a 1 KiB byte array (the APIC register page).
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: u8/u32 groups sized to 4-byte multiples, explicit `pad` and
// `reserved` bytes before the final u64: no implicit padding, any bits valid.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: u64 debug registers, flags and reserved words only.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: a single u32.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: u32 chip id, u32 pad, then a union whose largest member is a
// 512-byte array (so the union has no padding); its other members are
// integer structs. Values come zeroed (Default) and filled by KVM, so all
// 520 bytes are initialised.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: three 24-byte channel states (u32, u16, ten u8s, i64: aligned
// without padding), u32 flags and u32 reserved words.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: u64 clock/realtime/host_tsc, u32 flags with explicit pad0/pad[].
unsafe impl Pod for kvm_clock_data {}

impl Raw {
    pub fn of<T: Pod>(t: &T) -> Raw {
        // SAFETY: `t` is a live reference, so the pointer is valid and
        // aligned for size_of::<T>() bytes for the borrow's lifetime; T: Pod
        // promises no padding-dependent or pointer contents, so every byte
        // is initialised and may be read as u8. The slice is copied out
        // before the borrow ends.
        let b = unsafe {
            std::slice::from_raw_parts((t as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        Raw(b.to_vec())
    }

    pub fn get<T: Pod>(&self, what: &str) -> Result<T, String> {
        if self.0.len() != std::mem::size_of::<T>() {
            return Err(format!(
                "{what}: {} bytes saved, this build's structure has {}",
                self.0.len(),
                std::mem::size_of::<T>()
            ));
        }
        // SAFETY: T: Pod is valid for every bit pattern, all zeroes included.
        let mut t: T = unsafe { std::mem::zeroed() };
        // SAFETY: the length check above makes `self.0` exactly
        // size_of::<T>() bytes, so the copy stays inside both the Vec and
        // `t`; a Vec<u8> and a local cannot overlap; and any bytes written
        // form a valid T because T: Pod is valid for every bit pattern.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.as_ptr(),
                (&mut t as *mut T).cast::<u8>(),
                self.0.len(),
            )
        };
        Ok(t)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: Raw,
    pub sregs: Raw,
    pub fpu: Raw,
    pub xsave: Raw,
    pub xcrs: Raw,
    pub lapic: Raw,
    pub events: Raw,
    pub debugregs: Raw,
    pub mp_state: Raw,
    /// (index, value) of every MSR in KVM_GET_MSR_INDEX_LIST that reads back.
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// The saved instruction pointer.
    pub fn rip(&self) -> Result<u64, String> {
        Ok(self.regs.get::<kvm_regs>("regs")?.rip)
    }

    /// The saved paging state, as the probe engine reads it.
    pub fn system_regs(&self) -> Result<guest_access::SystemRegs, String> {
        Ok(crate::regs::to_system_regs(
            &self.sregs.get::<kvm_sregs>("sregs")?,
        ))
    }
}

/// VM-wide KVM state: PIC master/slave, IOAPIC, PIT, KVM clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: Raw,
    pub pic_slave: Raw,
    pub ioapic: Raw,
    pub pit2: Raw,
    pub clock: Raw,
}

fn e(op: &str, err: kvm_ioctls::Error) -> String {
    format!("{op} failed: {err}")
}

/// The MSR indices to save (KVM_GET_MSR_INDEX_LIST).
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, String> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(|x| e("KVM_GET_MSR_INDEX_LIST", x))?
        .as_slice()
        .to_vec())
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    // KVM_GET_MSRS stops at the first MSR it cannot read; read one by one so
    // an unreadable one is skipped rather than truncating the list.
    let mut out = Vec::with_capacity(indices.len());
    for &index in indices {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|x| format!("MSR list: {x:?}"))?;
        if fd.get_msrs(&mut m).map_err(|x| e("KVM_GET_MSRS", x))? == 1 {
            out.push((index, m.as_slice()[0].data));
        }
    }
    Ok(out)
}

/// Capture a vCPU's state. Must run on a parked vCPU (outside KVM_RUN).
pub fn capture_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, String> {
    Ok(VcpuState {
        mp_state: Raw::of(&fd.get_mp_state().map_err(|x| e("KVM_GET_MP_STATE", x))?),
        regs: Raw::of(&fd.get_regs().map_err(|x| e("KVM_GET_REGS", x))?),
        sregs: Raw::of(&fd.get_sregs().map_err(|x| e("KVM_GET_SREGS", x))?),
        fpu: Raw::of(&fd.get_fpu().map_err(|x| e("KVM_GET_FPU", x))?),
        xsave: Raw::of(&fd.get_xsave().map_err(|x| e("KVM_GET_XSAVE", x))?.region),
        xcrs: Raw::of(&fd.get_xcrs().map_err(|x| e("KVM_GET_XCRS", x))?),
        lapic: Raw::of(&fd.get_lapic().map_err(|x| e("KVM_GET_LAPIC", x))?),
        events: Raw::of(
            &fd.get_vcpu_events()
                .map_err(|x| e("KVM_GET_VCPU_EVENTS", x))?,
        ),
        debugregs: Raw::of(&fd.get_debug_regs().map_err(|x| e("KVM_GET_DEBUGREGS", x))?),
        msrs: read_msrs(fd, msr_indices)?,
    })
}

/// Set a vCPU's state back (CPUID must already be set).
pub fn apply_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    fd.set_sregs(&s.sregs.get("sregs")?)
        .map_err(|x| e("KVM_SET_SREGS", x))?;
    fd.set_regs(&s.regs.get("regs")?)
        .map_err(|x| e("KVM_SET_REGS", x))?;
    fd.set_fpu(&s.fpu.get("fpu")?)
        .map_err(|x| e("KVM_SET_FPU", x))?;
    let xsave = kvm_xsave {
        region: s.xsave.get("xsave")?,
        ..Default::default()
    };
    // SAFETY: set_xsave is unsafe because KVM_SET_XSAVE2-sized buffers may
    // be larger than `kvm_xsave`; this is the legacy ioctl on a plain
    // `kvm_xsave` (no flexible array, no KVM_CAP_XSAVE2 enabled on this fd),
    // so KVM reads exactly the 4 KiB `region` it was given.
    unsafe { fd.set_xsave(&xsave) }.map_err(|x| e("KVM_SET_XSAVE", x))?;
    fd.set_xcrs(&s.xcrs.get("xcrs")?)
        .map_err(|x| e("KVM_SET_XCRS", x))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    for chunk in entries.chunks(200) {
        let m = Msrs::from_entries(chunk).map_err(|x| format!("MSR list: {x:?}"))?;
        let n = fd.set_msrs(&m).map_err(|x| e("KVM_SET_MSRS", x))?;
        if n != chunk.len() {
            return Err(format!("KVM_SET_MSRS refused MSR {:#x}", chunk[n].index));
        }
    }
    fd.set_lapic(&s.lapic.get("lapic")?)
        .map_err(|x| e("KVM_SET_LAPIC", x))?;
    fd.set_debug_regs(&s.debugregs.get("debugregs")?)
        .map_err(|x| e("KVM_SET_DEBUGREGS", x))?;
    fd.set_vcpu_events(&s.events.get("events")?)
        .map_err(|x| e("KVM_SET_VCPU_EVENTS", x))?;
    fd.set_mp_state(s.mp_state.get("mp_state")?)
        .map_err(|x| e("KVM_SET_MP_STATE", x))?;
    Ok(())
}

thread_local! {
    static THREAD_VCPU_FD: std::cell::Cell<*const VcpuFd> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Called by a vCPU thread on entry: its fd, for snapshot requests it serves.
pub(crate) fn set_thread_vcpu_fd(fd: &VcpuFd) {
    THREAD_VCPU_FD.with(|c| c.set(fd as *const _));
}

pub(crate) fn clear_thread_vcpu_fd() {
    THREAD_VCPU_FD.with(|c| c.set(std::ptr::null()));
}

/// Capture the state of the vCPU whose thread runs this (a request served at
/// a checkpoint). Registers come from the runner (`Vcpu::regs`), which may
/// hold changes not yet flushed to KVM.
pub(crate) fn capture_current(
    v: &mut dyn guest_access::Vcpu,
    msr_indices: &[u32],
) -> Result<VcpuState, String> {
    let p = THREAD_VCPU_FD.with(|c| c.get());
    if p.is_null() {
        return Err("snapshot capture not on a vCPU thread".into());
    }
    // SAFETY: the pointer is thread-local and non-null only between
    // `set_thread_vcpu_fd` and `clear_thread_vcpu_fd`, which the vCPU loop
    // calls on entry and before it drops its runner (and the fd) on exit;
    // capture_current runs as a request inside that loop on the same thread,
    // so the VcpuFd is alive, and only shared access is taken.
    let fd = unsafe { &*p };
    let mut s = capture_vcpu(fd, msr_indices)?;
    let r = v.regs().map_err(|e| e.to_string())?;
    let k = crate::regs::to_kvm_regs(&r);
    s.regs = Raw::of(&k);
    Ok(s)
}

fn chip(vm: &VmFd, id: u32) -> Result<Raw, String> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|x| e("KVM_GET_IRQCHIP", x))?;
    Ok(Raw::of(&c))
}

/// Capture the in-kernel irqchip, PIT and clock.
pub fn capture_vm(vm: &VmFd) -> Result<VmState, String> {
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit2: Raw::of(&vm.get_pit2().map_err(|x| e("KVM_GET_PIT2", x))?),
        clock: Raw::of(&vm.get_clock().map_err(|x| e("KVM_GET_CLOCK", x))?),
    })
}

/// Set the VM-wide state back.
pub fn apply_vm(vm: &VmFd, s: &VmState) -> Result<(), String> {
    for (raw, what) in [
        (&s.pic_master, "pic_master"),
        (&s.pic_slave, "pic_slave"),
        (&s.ioapic, "ioapic"),
    ] {
        vm.set_irqchip(&raw.get::<kvm_irqchip>(what)?)
            .map_err(|x| e("KVM_SET_IRQCHIP", x))?;
    }
    vm.set_pit2(&s.pit2.get("pit2")?)
        .map_err(|x| e("KVM_SET_PIT2", x))?;
    let mut clock: kvm_clock_data = s.clock.get("clock")?;
    // Only the clock value is settable; flags from GET are not valid for SET.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(|x| e("KVM_SET_CLOCK", x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_pit_config;

    #[test]
    fn raw_round_trips_through_json() {
        let r = kvm_regs {
            rip: 0x1234,
            rflags: 2,
            ..Default::default()
        };
        let raw = Raw::of(&r);
        let j = serde_json::to_string(&raw).unwrap();
        let back: Raw = serde_json::from_str(&j).unwrap();
        assert_eq!(back.get::<kvm_regs>("regs").unwrap(), r);
        let e = Raw(vec![0; 3]).get::<kvm_regs>("regs").unwrap_err();
        assert!(e.contains("3 bytes saved"), "{e}");
    }

    /// On /dev/kvm: capture a vCPU and the VM, change them, set the capture
    /// back and read it again. Fails (not skips) with HVPROBE_REQUIRE_KVM=1.
    #[test]
    fn kvm_state_round_trip() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(err) => {
                assert!(
                    std::env::var("HVPROBE_REQUIRE_KVM").as_deref() != Ok("1"),
                    "HVPROBE_REQUIRE_KVM=1 but /dev/kvm: {err}"
                );
                eprintln!("skipped: no /dev/kvm ({err})");
                return;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let idx = msr_indices(&kvm).unwrap();
        let mut r = vcpu.get_regs().unwrap();
        r.rip = 0xabcd;
        r.rbx = 0x5555;
        vcpu.set_regs(&r).unwrap();
        let s = capture_vcpu(&vcpu, &idx).unwrap();
        let v = capture_vm(&vm).unwrap();
        let json = serde_json::to_string(&(&s, &v)).unwrap();
        let (s2, v2): (VcpuState, VmState) = serde_json::from_str(&json).unwrap();
        assert_eq!((&s2, &v2), (&s, &v));
        assert!(!s.msrs.is_empty(), "no MSR read back of {}", idx.len());

        r.rip = 0;
        r.rbx = 0;
        vcpu.set_regs(&r).unwrap();
        apply_vcpu(&vcpu, &s2).unwrap();
        apply_vm(&vm, &v2).unwrap();
        let again = vcpu.get_regs().unwrap();
        assert_eq!((again.rip, again.rbx), (0xabcd, 0x5555));
        let s3 = capture_vcpu(&vcpu, &idx).unwrap();
        assert_eq!(s3.regs, s.regs);
        assert_eq!(s3.sregs, s.sregs);
        assert_eq!(s3.lapic, s.lapic);
        assert_eq!(s3.mp_state, s.mp_state);
        eprintln!(
            "MSR index list {} entries, {} read back; state JSON {} bytes",
            idx.len(),
            s.msrs.len(),
            json.len()
        );
    }
}
