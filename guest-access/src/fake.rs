//! An in-memory VM for tests and benchmarks (cargo feature `fake`): guest
//! RAM, page tables, vCPUs whose registers the test sets, and a way to take
//! a breakpoint hit, with no KVM at all.
//!
//! Like vmi-rs's mock driver, it implements the same traits as the real VMM
//! ([`GuestMemory`], [`VmControl`], [`Vcpu`]), so the probe engine runs its
//! real code against it:
//!
//! - [`FakeMemory`]: guest RAM at given guest-physical addresses. Bytes are
//!   atomics, so the engine's writes and other threads' reads need no lock
//!   (as with real guest RAM). It can log every write (to show that an
//!   operation wrote nothing) and refuse writes to a range (to make an
//!   operation fail half way).
//! - [`PageTables`]: builds x86-64 4-level page tables (4 KiB pages) in a
//!   [`FakeMemory`], so kernel virtual addresses translate as they do in a
//!   booted guest; [`long_mode`] gives the system registers that use them.
//!   With paging off (the default [`SystemRegs`]) the engine reads kernel
//!   text at its link address instead, as before boot.
//! - [`FakeVm`]: a VM over any [`GuestMemory`] (a [`FakeMemory`] unless
//!   said otherwise). Nothing runs guest code by itself, so stopping the
//!   world is a no-op that is counted ([`FakeVm::stops`]) and
//!   [`VmControl::with_vcpu`] runs the task at once on the vCPU's stored
//!   state ([`FakeVm::set_system_regs`]).
//! - [`FakeVcpu`]: a vCPU stopped in an exit. A test sets its registers
//!   and calls [`FakeVcpu::hit`] to hand the `int3` at RIP to a
//!   [`BreakpointHandler`], exactly as the VMM's run loop does. It cannot
//!   execute: a single-step fails unless a test gives it
//!   [`FakeVcpu::on_single_step`].
//!
//! ```
//! use guest_access::fake::{long_mode, FakeMemory, FakeVm, PageTables, Perm};
//! use guest_access::GuestMemory;
//!
//! let mem = FakeMemory::new(0x10_0000);
//! mem.write_phys(0x5000, &[0x90, 0xc3]).unwrap();
//! let mut pt = PageTables::new(&mem, 0x1000..0x5000);
//! pt.map(0xffff_ffff_8000_5000, 0x5000, 0x1000, Perm::TEXT);
//! let cr3 = pt.cr3();
//! let vm = FakeVm::new(mem, 2);
//! vm.set_system_regs(long_mode(cr3));
//! let vcpu = vm.vcpu(1);
//! assert_eq!(vcpu.sregs.cr3, cr3);
//! ```

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{
    AccessError, BreakpointAction, BreakpointHandler, GuestMemory, Regs, StopGuard, SystemRegs,
    TrapKind, Vcpu, VcpuTask, VmControl,
};

/// One contiguous piece of guest RAM.
struct Region {
    base: u64,
    bytes: Box<[AtomicU8]>,
}

/// A write that [`FakeMemory`] saw while recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub gpa: u64,
    pub data: Vec<u8>,
}

/// Guest RAM made of regions at given guest-physical addresses; an access
/// must fall inside one region, as a KVM memory slot.
pub struct FakeMemory {
    regions: Vec<Region>,
    /// Set while writes are recorded or some are refused (keeps the lock
    /// off the path of plain writes).
    watched: AtomicBool,
    recording: AtomicBool,
    writes: Mutex<Vec<Write>>,
    refused: Mutex<Vec<Range<u64>>>,
}

impl FakeMemory {
    /// `size` bytes of zeroed RAM at guest-physical 0.
    pub fn new(size: usize) -> Self {
        Self::with_regions(&[(0, size)])
    }

    /// Zeroed RAM regions, each `(guest-physical base, size)`; the rest of
    /// the address space is a hole.
    pub fn with_regions(regions: &[(u64, usize)]) -> Self {
        FakeMemory {
            regions: regions
                .iter()
                .map(|&(base, size)| Region {
                    base,
                    bytes: (0..size).map(|_| AtomicU8::new(0)).collect(),
                })
                .collect(),
            watched: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            writes: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        }
    }

    /// The bytes of `[gpa, gpa + len)`.
    fn bytes(&self, gpa: u64, len: usize) -> Result<&[AtomicU8], AccessError> {
        let out = AccessError::OutOfRam { gpa, len };
        self.regions
            .iter()
            .find_map(|r| {
                let start = usize::try_from(gpa.checked_sub(r.base)?).ok()?;
                r.bytes.get(start..start.checked_add(len)?)
            })
            .ok_or(out)
    }

    /// `len` bytes at `gpa`. Panics outside RAM (for test assertions).
    pub fn read_vec(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_phys(gpa, &mut v)
            .unwrap_or_else(|e| panic!("fake RAM: {e}"));
        v
    }

    /// The little-endian `u64` at `gpa`. Panics outside RAM.
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.read_vec(gpa, 8));
        u64::from_le_bytes(b)
    }

    /// Store `v` little-endian at `gpa`. Panics outside RAM.
    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.write_phys(gpa, &v.to_le_bytes())
            .unwrap_or_else(|e| panic!("fake RAM: {e}"));
    }

    fn update_watched(&self, recording: bool, refused: &[Range<u64>]) {
        self.watched
            .store(recording || !refused.is_empty(), Ordering::SeqCst);
    }

    /// Log every write from now on (see [`Self::take_writes`]).
    pub fn record_writes(&self) {
        let refused = self.refused.lock().unwrap();
        self.recording.store(true, Ordering::SeqCst);
        self.update_watched(true, &refused);
    }

    /// The writes logged since the last call, oldest first.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.lock().unwrap())
    }

    /// Refuse every write that touches `range` from now on: it fails with
    /// [`AccessError::OutOfRam`] and changes nothing, as a write into a
    /// memory slot that went away.
    pub fn refuse_writes(&self, range: Range<u64>) {
        let mut refused = self.refused.lock().unwrap();
        refused.push(range);
        self.update_watched(self.recording.load(Ordering::SeqCst), &refused);
    }

    /// Accept writes everywhere again.
    pub fn accept_writes(&self) {
        let mut refused = self.refused.lock().unwrap();
        refused.clear();
        self.update_watched(self.recording.load(Ordering::SeqCst), &refused);
    }

    /// Whether the write of `len` bytes at `gpa` is refused.
    fn refuses(&self, gpa: u64, len: usize) -> bool {
        let end = gpa.saturating_add(len as u64);
        self.refused
            .lock()
            .unwrap()
            .iter()
            .any(|r| gpa < r.end && r.start < end)
    }
}

impl GuestMemory for FakeMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let bytes = self.bytes(gpa, buf.len())?;
        for (b, m) in buf.iter_mut().zip(bytes) {
            *b = m.load(Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        let bytes = self.bytes(gpa, data.len())?;
        if self.watched.load(Ordering::SeqCst) {
            if self.refuses(gpa, data.len()) {
                return Err(AccessError::OutOfRam {
                    gpa,
                    len: data.len(),
                });
            }
            if self.recording.load(Ordering::SeqCst) {
                self.writes.lock().unwrap().push(Write {
                    gpa,
                    data: data.to_vec(),
                });
            }
        }
        for (b, m) in data.iter().zip(bytes) {
            m.store(*b, Ordering::Relaxed);
        }
        Ok(())
    }

    fn ram_end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.base + r.bytes.len() as u64)
            .max()
            .unwrap_or(0)
    }
}

/// Page-table entry bits.
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PAGE: u64 = 0x1000;

/// What a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm {
    pub write: bool,
    pub execute: bool,
    pub user: bool,
}

impl Perm {
    /// Kernel text: read and execute.
    pub const TEXT: Perm = Perm {
        write: false,
        execute: true,
        user: false,
    };
    /// Kernel data (stacks, the direct map): read and write, no execute.
    pub const DATA: Perm = Perm {
        write: true,
        execute: false,
        user: false,
    };
}

/// Builds 4-level page tables (4 KiB pages) in a [`FakeMemory`], taking the
/// table pages from an area of it that the test sets aside.
pub struct PageTables<'a> {
    mem: &'a FakeMemory,
    root: u64,
    next: u64,
    end: u64,
}

impl<'a> PageTables<'a> {
    /// Tables in the page-aligned `area` of `mem`; the root (PML4) is its
    /// first page. The area is zeroed.
    pub fn new(mem: &'a FakeMemory, area: Range<u64>) -> Self {
        assert!(
            area.start.is_multiple_of(PAGE) && area.end >= area.start + PAGE,
            "page-table area {area:x?} must be page aligned and hold a page"
        );
        let len = usize::try_from(area.end - area.start).expect("page-table area size");
        mem.write_phys(area.start, &vec![0; len])
            .unwrap_or_else(|e| panic!("page-table area: {e}"));
        PageTables {
            mem,
            root: area.start,
            next: area.start + PAGE,
            end: area.end,
        }
    }

    /// The CR3 value that uses these tables.
    pub fn cr3(&self) -> u64 {
        self.root
    }

    /// Map `[gva, gva + len)` to `[gpa, gpa + len)` with 4 KiB pages
    /// (both page aligned; `len` rounded up to pages). A page mapped again
    /// takes the new mapping.
    pub fn map(&mut self, gva: u64, gpa: u64, len: u64, perm: Perm) {
        assert!(
            gva.is_multiple_of(PAGE) && gpa.is_multiple_of(PAGE),
            "map {gva:#x} -> {gpa:#x}: not page aligned"
        );
        let mut off = 0;
        while off < len {
            let leaf = (gpa + off)
                | PRESENT
                | if perm.write { WRITABLE } else { 0 }
                | if perm.user { USER } else { 0 }
                | if perm.execute { 0 } else { NX };
            let entry = self.leaf_entry(gva + off, perm.user);
            self.mem.write_u64(entry, leaf);
            off += PAGE;
        }
    }

    /// Remove the mapping of the page at `gva` (if any).
    pub fn unmap(&mut self, gva: u64) {
        let entry = self.leaf_entry(gva, false);
        self.mem.write_u64(entry, 0);
    }

    /// Guest-physical address of the page-table entry that maps `gva`,
    /// creating the tables above it. Upper levels allow everything (the
    /// leaf decides), and user access when some page below is a user page.
    fn leaf_entry(&mut self, gva: u64, user: bool) -> u64 {
        let mut table = self.root;
        for level in [39, 30, 21] {
            let entry = table + ((gva >> level) & 0x1ff) * 8;
            let mut e = self.mem.read_u64(entry);
            if e & PRESENT == 0 {
                assert!(
                    self.next < self.end,
                    "page-table area exhausted mapping {gva:#x}"
                );
                e = self.next | PRESENT | WRITABLE;
                self.next += PAGE;
            }
            if user {
                e |= USER;
            }
            self.mem.write_u64(entry, e);
            table = e & ADDR_MASK;
        }
        table + ((gva >> 12) & 0x1ff) * 8
    }
}

/// System registers of a vCPU in 64-bit kernel mode with 4-level paging
/// from `cr3` (write protection on, as in Linux).
pub fn long_mode(cr3: u64) -> SystemRegs {
    const CR0_PE: u64 = 1;
    const CR0_WP: u64 = 1 << 16;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    SystemRegs {
        cr0: SystemRegs::CR0_PG | CR0_WP | CR0_PE,
        cr3,
        cr4: SystemRegs::CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cpl: 0,
        long_mode: true,
        ..Default::default()
    }
}

/// A VM over guest memory `M` whose vCPUs only run when a test says so.
pub struct FakeVm<M: GuestMemory = FakeMemory> {
    mem: M,
    /// Each vCPU's registers between hits (what `with_vcpu` sees).
    vcpus: Mutex<Vec<(Regs, SystemRegs)>>,
    stops: AtomicUsize,
    stopped: AtomicUsize,
}

impl<M: GuestMemory> FakeVm<M> {
    /// `vcpus` vCPUs with paging off (as at boot) over `mem`.
    pub fn new(mem: M, vcpus: usize) -> Self {
        FakeVm {
            mem,
            vcpus: Mutex::new(vec![Default::default(); vcpus]),
            stops: AtomicUsize::new(0),
            stopped: AtomicUsize::new(0),
        }
    }

    /// The guest memory, with its own methods (a [`FakeMemory`]'s log).
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Give every vCPU these system registers (e.g. [`long_mode`]).
    pub fn set_system_regs(&self, sregs: SystemRegs) {
        for v in self.vcpus.lock().unwrap().iter_mut() {
            v.1 = sregs;
        }
    }

    /// vCPU `index` stopped in an exit, with its stored registers.
    pub fn vcpu(&self, index: usize) -> FakeVcpu {
        let (regs, sregs) = self.vcpus.lock().unwrap()[index];
        FakeVcpu {
            index,
            regs,
            sregs,
            steps: 0,
            step: None,
        }
    }

    /// How many times the world was stopped ([`VmControl::stop_others`]).
    pub fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }

    /// Whether a [`StopGuard`] from this VM is alive.
    pub fn world_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) > 0
    }
}

impl<M: GuestMemory> VmControl for FakeVm<M> {
    fn memory(&self) -> &dyn GuestMemory {
        &self.mem
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.lock().unwrap().len()
    }

    /// Nothing runs, so nothing to park: counts, and tracks the guard.
    fn stop_others(&self, _except: Option<usize>) -> StopGuard<'_> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.stopped.fetch_add(1, Ordering::SeqCst);
        StopGuard::new(|| {
            self.stopped.fetch_sub(1, Ordering::SeqCst);
        })
    }

    /// Runs `f` at once on the vCPU's stored registers and keeps what it sets.
    fn with_vcpu(&self, index: usize, f: VcpuTask) -> Result<(), AccessError> {
        if index >= self.vcpu_count() {
            return Err(AccessError::VcpuGone(index));
        }
        let mut v = self.vcpu(index);
        f(&mut v);
        self.vcpus.lock().unwrap()[index] = (v.regs, v.sregs);
        Ok(())
    }
}

/// What a [`FakeVcpu`] does for a single-step.
pub type StepFn = Box<dyn FnMut(&mut Regs) -> Result<(), AccessError> + Send>;

/// A vCPU stopped in a VM exit. Its registers are plain fields.
pub struct FakeVcpu {
    pub index: usize,
    pub regs: Regs,
    pub sregs: SystemRegs,
    /// Single-steps asked for.
    pub steps: usize,
    step: Option<StepFn>,
}

impl FakeVcpu {
    /// A vCPU with these registers and paging off.
    pub fn new(index: usize, regs: Regs) -> Self {
        FakeVcpu {
            index,
            regs,
            sregs: SystemRegs::default(),
            steps: 0,
            step: None,
        }
    }

    /// What a single-step does (e.g. check the byte at RIP and advance
    /// RIP); without it a step fails, as the fake cannot execute.
    pub fn on_single_step(
        mut self,
        f: impl FnMut(&mut Regs) -> Result<(), AccessError> + Send + 'static,
    ) -> Self {
        self.step = Some(Box::new(f));
        self
    }

    /// The `int3` at RIP traps: hand it to `handler` as the VMM's run loop
    /// does (an emulation-failure exit, as on this host's KVM).
    pub fn hit(&mut self, handler: &dyn BreakpointHandler, vm: &dyn VmControl) -> BreakpointAction {
        handler.on_breakpoint(self, vm, TrapKind::EmulationFailure)
    }
}

impl Vcpu for FakeVcpu {
    fn index(&self) -> usize {
        self.index
    }

    fn regs(&mut self) -> Result<Regs, AccessError> {
        Ok(self.regs)
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), AccessError> {
        self.regs = *regs;
        Ok(())
    }

    fn system_regs(&mut self) -> Result<SystemRegs, AccessError> {
        Ok(self.sregs)
    }

    fn single_step(&mut self) -> Result<(), AccessError> {
        self.steps += 1;
        match &mut self.step {
            Some(f) => f(&mut self.regs),
            None => Err(AccessError::StepFailed {
                vcpu: self.index,
                rip: self.regs.rip,
                why: "a fake vCPU cannot execute".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_holes() {
        let mem = FakeMemory::with_regions(&[(0, 0x1000), (0x10_0000, 0x1000)]);
        assert_eq!(mem.ram_end(), 0x10_1000);
        mem.write_phys(0x10_0ffe, &[1, 2]).unwrap();
        assert_eq!(mem.read_vec(0x10_0ffe, 2), [1, 2]);
        assert_eq!(
            mem.write_phys(0x10_0fff, &[1, 2]),
            Err(AccessError::OutOfRam {
                gpa: 0x10_0fff,
                len: 2
            })
        );
        assert!(mem.read_phys(0x2000, &mut [0]).is_err());
        assert!(mem.read_phys(u64::MAX, &mut [0]).is_err());
    }

    #[test]
    fn records_and_refuses_writes() {
        let mem = FakeMemory::new(0x1000);
        mem.write_phys(0x10, &[1]).unwrap();
        mem.record_writes();
        mem.write_phys(0x20, &[2, 3]).unwrap();
        mem.refuse_writes(0x30..0x31);
        assert!(mem.write_phys(0x2f, &[4, 4]).is_err());
        assert_eq!(mem.read_vec(0x2f, 2), [0, 0]);
        mem.accept_writes();
        mem.write_phys(0x30, &[5]).unwrap();
        assert_eq!(
            mem.take_writes(),
            [
                Write {
                    gpa: 0x20,
                    data: vec![2, 3]
                },
                Write {
                    gpa: 0x30,
                    data: vec![5]
                }
            ]
        );
        assert_eq!(mem.take_writes(), []);
    }

    /// A hand walk of what `PageTables` built (the engine's own walker is
    /// tested against it in `introspect`).
    #[test]
    fn builds_four_level_entries() {
        let mem = FakeMemory::new(0x10_0000);
        let mut pt = PageTables::new(&mem, 0x1000..0x8000);
        let gva = 0xffff_ffff_8000_5000;
        pt.map(gva, 0x5000, 0x2000, Perm::TEXT);
        pt.map(0x7000_0000, 0x9000, 1, Perm::DATA);
        let mut table = pt.cr3();
        for level in [39, 30, 21] {
            let e = mem.read_u64(table + ((gva >> level) & 0x1ff) * 8);
            assert_eq!(e & (PRESENT | WRITABLE | USER), PRESENT | WRITABLE);
            table = e & ADDR_MASK;
        }
        let pte = table + ((gva >> 12) & 0x1ff) * 8;
        assert_eq!(mem.read_u64(pte), 0x5000 | PRESENT);
        assert_eq!(mem.read_u64(pte + 8), 0x6000 | PRESENT);
        pt.unmap(gva);
        assert_eq!(mem.read_u64(pte), 0);
    }

    struct Count(AtomicUsize);
    impl BreakpointHandler for Count {
        fn on_breakpoint(
            &self,
            vcpu: &mut dyn Vcpu,
            vm: &dyn VmControl,
            _: TrapKind,
        ) -> BreakpointAction {
            let _world = vm.stop_others(Some(vcpu.index()));
            let mut r = vcpu.regs().unwrap();
            r.rip += 1;
            vcpu.set_regs(&r).unwrap();
            self.0.fetch_add(1, Ordering::SeqCst);
            BreakpointAction::Resume
        }
    }

    #[test]
    fn a_hit_reaches_the_handler_and_stops_are_counted() {
        let vm = FakeVm::new(FakeMemory::new(0x1000), 2);
        vm.set_system_regs(long_mode(0x1000));
        let mut v = vm.vcpu(1);
        v.regs.rip = 0x40;
        let h = Count(AtomicUsize::new(0));
        assert_eq!(v.hit(&h, &vm), BreakpointAction::Resume);
        assert_eq!((v.regs.rip, h.0.load(Ordering::SeqCst)), (0x41, 1));
        assert_eq!((vm.stops(), vm.world_stopped()), (1, false));
        assert_eq!(v.sregs.cr3, 0x1000);
        let (tx, rx) = std::sync::mpsc::channel();
        vm.with_vcpu(
            0,
            Box::new(move |v: &mut dyn Vcpu| tx.send(v.system_regs().unwrap()).unwrap()),
        )
        .unwrap();
        assert_eq!(rx.recv().unwrap().cr3, 0x1000);
        assert_eq!(
            vm.with_vcpu(2, Box::new(|_: &mut dyn Vcpu| {})),
            Err(AccessError::VcpuGone(2))
        );
    }

    #[test]
    fn single_step_fails_unless_told_how() {
        let mut v = FakeVcpu::new(0, Regs::default());
        assert!(v.single_step().is_err());
        let mut v = v.on_single_step(|r| {
            r.rip += 2;
            Ok(())
        });
        v.single_step().unwrap();
        assert_eq!((v.regs.rip, v.steps), (2, 2));
    }
}
