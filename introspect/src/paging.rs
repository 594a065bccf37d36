//! Guest virtual memory: x86-64 page walks (4 and 5 levels, 2 MiB and 1 GiB
//! pages) from a vCPU's CR3, and reads/writes that cross page boundaries.

use std::cell::Cell;

use guest_access::{GuestMemory, SystemRegs};
use smallvec::SmallVec;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const LARGE: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_WP: u64 = 1 << 16;
const CR4_SMAP: u64 = 1 << 21;
const RFLAGS_AC: u64 = 1 << 18;

/// Why a guest virtual address could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageFault {
    #[error("{gva:#x} is not mapped (level {level} entry not present)")]
    NotPresent { gva: u64, level: u8 },
    #[error("{gva:#x} is mapped read-only")]
    ReadOnly { gva: u64 },
    #[error("{gva:#x} is a user page (SMAP)")]
    UserPage { gva: u64 },
    #[error("{gva:#x} is not canonical")]
    NonCanonical { gva: u64 },
    #[error("page table at {gpa:#x} (for {gva:#x}) is outside guest RAM")]
    BadTable { gva: u64, gpa: u64 },
    #[error("paging mode not supported (CR0.PG set without long mode) at {gva:#x}")]
    Unsupported { gva: u64 },
}

impl PageFault {
    pub fn gva(&self) -> u64 {
        match *self {
            PageFault::NotPresent { gva, .. }
            | PageFault::ReadOnly { gva }
            | PageFault::UserPage { gva }
            | PageFault::NonCanonical { gva }
            | PageFault::BadTable { gva, .. }
            | PageFault::Unsupported { gva } => gva,
        }
    }
}

/// A translated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// Bytes left in this page from `gpa`.
    pub page_left: u64,
    pub writable: bool,
    pub executable: bool,
    pub user: bool,
    /// Physical address of the leaf entry (to set A/D bits).
    pub leaf_entry: Option<u64>,
}

/// What an access needs from the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read on behalf of the host (fetch args): no permission checks.
    Inspect,
    /// A read the guest kernel would do (emulated instruction).
    KernelRead,
    /// A write the guest kernel would do (emulated instruction).
    KernelWrite,
}

/// Paging state of one vCPU plus guest RAM.
pub struct GuestVirt<'a> {
    pub mem: &'a dyn GuestMemory,
    pub sregs: SystemRegs,
    /// RFLAGS of the vCPU (for SMAP's AC override).
    pub rflags: u64,
    /// The last leaf this walker found: the fetches of one hit mostly read
    /// the same page or two, and a walk costs four or five reads of guest
    /// RAM. Lives as long as the walker, which is built per hit (or per
    /// operation): like the stopped vCPU's TLB, never reused across hits,
    /// where the guest may have changed its page tables without an exit.
    last_leaf: Cell<Option<Leaf>>,
}

/// A cached leaf: the page `[va, va + size)` and its translation at `va`.
#[derive(Clone, Copy)]
struct Leaf {
    va: u64,
    size: u64,
    at_va: Translation,
}

/// The pieces of one access, each inside one page: two for every access of
/// up to a page, without a heap allocation.
type Pieces = SmallVec<[(u64, usize, Translation); 2]>;

fn read_entry(mem: &dyn GuestMemory, gva: u64, gpa: u64) -> Result<u64, PageFault> {
    let mut b = [0u8; 8];
    mem.read_phys(gpa, &mut b)
        .map_err(|_| PageFault::BadTable { gva, gpa })?;
    Ok(u64::from_le_bytes(b))
}

impl<'a> GuestVirt<'a> {
    pub fn new(mem: &'a dyn GuestMemory, sregs: SystemRegs, rflags: u64) -> Self {
        Self {
            mem,
            sregs,
            rflags,
            last_leaf: Cell::new(None),
        }
    }

    /// The cached leaf's translation of `gva`, if `gva` is in its page.
    fn cached(&self, gva: u64) -> Option<Translation> {
        let leaf = self.last_leaf.get()?;
        let off = gva.wrapping_sub(leaf.va);
        (off < leaf.size).then_some(Translation {
            gpa: leaf.at_va.gpa + off,
            page_left: leaf.size - off,
            ..leaf.at_va
        })
    }

    /// Translate `gva` for `access`.
    pub fn translate(&self, gva: u64, access: Access) -> Result<Translation, PageFault> {
        if !self.sregs.paging() {
            return Ok(Translation {
                gpa: gva,
                page_left: 0x1000 - (gva & 0xfff),
                writable: true,
                executable: true,
                user: false,
                leaf_entry: None,
            });
        }
        if self.sregs.efer & (1 << 10) == 0 {
            return Err(PageFault::Unsupported { gva });
        }
        if let Some(t) = self.cached(gva) {
            self.check(gva, access, &t)?;
            return Ok(t);
        }
        let levels: u8 = if self.sregs.la57() { 5 } else { 4 };
        let top_bit = 12 + 9 * u32::from(levels) - 1;
        // Canonical: bits above the top translated bit equal that bit.
        let ext = (gva as i64) >> top_bit;
        if ext != 0 && ext != -1 {
            return Err(PageFault::NonCanonical { gva });
        }
        let mut table = self.sregs.cr3 & ADDR_MASK;
        let (mut writable, mut user, mut executable) = (true, true, true);
        let mut level = levels;
        loop {
            let shift = 12 + 9 * u32::from(level - 1);
            let index = (gva >> shift) & 0x1ff;
            let entry_gpa = table + index * 8;
            let entry = read_entry(self.mem, gva, entry_gpa)?;
            if entry & PRESENT == 0 {
                return Err(PageFault::NotPresent { gva, level });
            }
            writable &= entry & WRITABLE != 0;
            user &= entry & USER != 0;
            executable &= entry & NX == 0;
            let leaf = level == 1 || ((level == 2 || level == 3) && entry & LARGE != 0);
            if leaf {
                let page_size = 1u64 << shift;
                let base = entry & ADDR_MASK & !(page_size - 1);
                let off = gva & (page_size - 1);
                let t = Translation {
                    gpa: base + off,
                    page_left: page_size - off,
                    writable,
                    executable,
                    user,
                    leaf_entry: Some(entry_gpa),
                };
                self.last_leaf.set(Some(Leaf {
                    va: gva - off,
                    size: page_size,
                    at_va: Translation {
                        gpa: base,
                        page_left: page_size,
                        ..t
                    },
                }));
                self.check(gva, access, &t)?;
                return Ok(t);
            }
            table = entry & ADDR_MASK;
            level -= 1;
        }
    }

    fn check(&self, gva: u64, access: Access, t: &Translation) -> Result<(), PageFault> {
        if access == Access::Inspect {
            return Ok(());
        }
        if t.user && self.sregs.cr4 & CR4_SMAP != 0 && self.rflags & RFLAGS_AC == 0 {
            return Err(PageFault::UserPage { gva });
        }
        if access == Access::KernelWrite && !t.writable && self.sregs.cr0 & CR0_WP != 0 {
            return Err(PageFault::ReadOnly { gva });
        }
        Ok(())
    }

    /// Translate every page of `[gva, gva+len)` first, so an access is all or nothing.
    fn pieces(&self, gva: u64, len: usize, access: Access) -> Result<Pieces, PageFault> {
        let mut out = Pieces::new();
        let mut done = 0usize;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let t = self.translate(va, access)?;
            let n = (len - done).min(t.page_left as usize);
            out.push((t.gpa, n, t));
            done += n;
        }
        Ok(out)
    }

    pub fn read(&self, gva: u64, buf: &mut [u8], access: Access) -> Result<(), PageFault> {
        let pieces = self.pieces(gva, buf.len(), access)?;
        let mut off = 0;
        for (gpa, n, _) in &pieces {
            self.mem
                .read_phys(*gpa, &mut buf[off..off + n])
                .map_err(|_| PageFault::BadTable { gva, gpa: *gpa })?;
            off += n;
        }
        if access != Access::Inspect {
            self.mark(gva, &pieces, false);
        }
        Ok(())
    }

    pub fn write(&self, gva: u64, data: &[u8]) -> Result<(), PageFault> {
        let pieces = self.pieces(gva, data.len(), Access::KernelWrite)?;
        let mut off = 0;
        for (gpa, n, _) in &pieces {
            self.mem
                .write_phys(*gpa, &data[off..off + n])
                .map_err(|_| PageFault::BadTable { gva, gpa: *gpa })?;
            off += n;
        }
        self.mark(gva, &pieces, true);
        Ok(())
    }

    /// Set the Accessed (and Dirty) bits the CPU would have set in the leaf.
    fn mark(&self, gva: u64, pieces: &[(u64, usize, Translation)], dirty: bool) {
        for (_, _, t) in pieces {
            if let Some(e) = t.leaf_entry {
                if let Ok(v) = read_entry(self.mem, gva, e) {
                    let want = v | ACCESSED | if dirty { DIRTY } else { 0 };
                    if want != v {
                        let _ = self.mem.write_phys(e, &want.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// insn-emu's memory interface over a page walk.
impl insn_emu::GuestMemory for GuestVirt<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), insn_emu::MemFault> {
        GuestVirt::read(self, addr, buf, Access::KernelRead)
            .map_err(|_| insn_emu::MemFault { addr })
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), insn_emu::MemFault> {
        GuestVirt::write(self, addr, data).map_err(|_| insn_emu::MemFault { addr })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use guest_access::fake::{self, FakeMemory};

    pub fn long_mode(cr3: u64, la57: bool) -> SystemRegs {
        let mut s = fake::long_mode(cr3);
        if la57 {
            s.cr4 |= SystemRegs::CR4_LA57;
        }
        s
    }

    /// Tables: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
    fn four_level() -> FakeMemory {
        let ram = FakeMemory::new(64 << 20);
        // 0xffffffff81000000: PML4[511] -> PDPT[510] -> PD[8] 2 MiB page at 16 MiB (read-only)
        ram.write_u64(0x1000 + 511 * 8, 0x2000 | PRESENT | WRITABLE);
        ram.write_u64(0x2000 + 510 * 8, 0x3000 | PRESENT | WRITABLE);
        ram.write_u64(0x3000 + 8 * 8, 0x100_0000 | PRESENT | LARGE);
        // 0xffffffff81200000: a 4 KiB page table, page 0 -> 0x50000 writable, page 1 -> 0x7000
        ram.write_u64(0x3000 + 9 * 8, 0x4000 | PRESENT | WRITABLE);
        ram.write_u64(0x4000, 0x50000 | PRESENT | WRITABLE);
        ram.write_u64(0x4000 + 8, 0x7000 | PRESENT | WRITABLE);
        // 0xffff888000000000: PML4[273] -> PDPT[0] 1 GiB page at 0
        ram.write_u64(0x1000 + 273 * 8, 0x5000 | PRESENT | WRITABLE);
        ram.write_u64(0x5000, PRESENT | WRITABLE | LARGE | NX);
        ram
    }

    #[test]
    fn walks_2m_4k_and_1g_pages() {
        let ram = four_level();
        let v = GuestVirt::new(&ram, long_mode(0x1000, false), 0);
        let t = v.translate(0xffff_ffff_8100_1234, Access::Inspect).unwrap();
        assert_eq!(t.gpa, 0x100_1234);
        assert!(!t.writable && t.executable);
        let t = v.translate(0xffff_ffff_8120_0010, Access::Inspect).unwrap();
        assert_eq!(t.gpa, 0x50010);
        assert_eq!(t.page_left, 0x1000 - 0x10);
        let t = v.translate(0xffff_8880_0123_4567, Access::Inspect).unwrap();
        assert_eq!(t.gpa, 0x123_4567);
        assert!(!t.executable);
    }

    #[test]
    fn unmapped_noncanonical_and_readonly() {
        let ram = four_level();
        let v = GuestVirt::new(&ram, long_mode(0x1000, false), 0);
        assert_eq!(
            v.translate(0xffff_ffff_c000_0000, Access::Inspect),
            Err(PageFault::NotPresent {
                gva: 0xffff_ffff_c000_0000,
                level: 3
            })
        );
        assert!(matches!(
            v.translate(0x0000_8000_0000_0000, Access::Inspect),
            Err(PageFault::NonCanonical { .. })
        ));
        assert!(matches!(
            v.write(0xffff_ffff_8100_0000, &[1]),
            Err(PageFault::ReadOnly { .. })
        ));
        let msg = v
            .translate(0x1000, Access::Inspect)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not mapped"), "{msg}");
    }

    #[test]
    fn access_crossing_a_page_boundary() {
        let ram = four_level();
        let v = GuestVirt::new(&ram, long_mode(0x1000, false), 0);
        let gva = 0xffff_ffff_8120_0ffc;
        v.write(gva, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 4];
        ram.read_phys(0x50ffc, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        ram.read_phys(0x7000, &mut b).unwrap();
        assert_eq!(b, [5, 6, 7, 8]);
        let mut r = [0u8; 8];
        v.read(gva, &mut r, Access::KernelRead).unwrap();
        assert_eq!(r, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Dirty and accessed bits were set on both leaves.
        assert_ne!(ram.read_u64(0x4000) & DIRTY, 0);
        assert_ne!(ram.read_u64(0x4008) & ACCESSED, 0);
    }

    #[test]
    fn write_is_all_or_nothing_across_pages() {
        let ram = four_level();
        ram.write_u64(0x4000 + 8, 0); // second page unmapped
        let v = GuestVirt::new(&ram, long_mode(0x1000, false), 0);
        assert!(v.write(0xffff_ffff_8120_0ffe, &[9, 9, 9, 9]).is_err());
        let mut b = [0u8; 2];
        ram.read_phys(0x50ffe, &mut b).unwrap();
        assert_eq!(b, [0, 0], "first page must be untouched");
    }

    #[test]
    fn one_walker_reuses_its_leaf_and_a_new_one_walks_again() {
        let ram = four_level();
        let gva = 0xffff_ffff_8120_0010; // the 4 KiB page at 0x50000
        let v = GuestVirt::new(&ram, long_mode(0x1000, false), 0);
        let first = v.translate(gva, Access::Inspect).unwrap();
        // The guest remaps the page: this walker (one hit) keeps its leaf,
        // like the stopped vCPU's TLB...
        ram.write_u64(0x4000, 0x60000 | PRESENT);
        assert_eq!(
            v.translate(gva + 8, Access::Inspect).unwrap().gpa,
            first.gpa + 8
        );
        // The next hit's walker sees the new mapping.
        let next = GuestVirt::new(&ram, long_mode(0x1000, false), 0);
        assert_eq!(next.translate(gva, Access::Inspect).unwrap().gpa, 0x60010);
        // A miss walks and caches the other page; large pages are cached whole.
        let big = 0xffff_ffff_8100_1234;
        assert_eq!(
            next.translate(big, Access::Inspect).unwrap().gpa,
            0x100_1234
        );
        let t = next.translate(big + 0x10_0000, Access::Inspect).unwrap();
        assert_eq!((t.gpa, t.page_left), (0x110_1234, 0x10_0000 - 0x1234));
        // A cached leaf still checks each access against its permissions.
        assert!(matches!(
            next.write(big, &[1]),
            Err(PageFault::ReadOnly { .. })
        ));
    }

    #[test]
    fn five_level_walk() {
        let ram = FakeMemory::new(1 << 20);
        // PML5 0x1000 [511] -> PML4 0x2000 [511] -> PDPT 0x3000 [510] -> PD 0x4000 [8] 2M at 0x200000
        ram.write_u64(0x1000 + 511 * 8, 0x2000 | PRESENT);
        ram.write_u64(0x2000 + 511 * 8, 0x3000 | PRESENT);
        ram.write_u64(0x3000 + 510 * 8, 0x4000 | PRESENT);
        ram.write_u64(0x4000 + 8 * 8, 0x20_0000 | PRESENT | LARGE);
        let v = GuestVirt::new(&ram, long_mode(0x1000, true), 0);
        let t = v.translate(0xffff_ffff_8100_0042, Access::Inspect).unwrap();
        assert_eq!(t.gpa, 0x20_0042);
        // A 4-level-canonical but 5-level-translated address still checks bit 56.
        assert!(matches!(
            v.translate(0xff00_0000_0000_0000 ^ (1 << 56), Access::Inspect),
            Err(PageFault::NonCanonical { .. })
        ));
    }

    #[test]
    fn smap_blocks_user_pages_unless_ac() {
        let ram = FakeMemory::new(1 << 20);
        ram.write_u64(0x1000, 0x2000 | PRESENT | USER | WRITABLE);
        ram.write_u64(0x2000, 0x3000 | PRESENT | USER | WRITABLE);
        ram.write_u64(0x3000, 0x4000 | PRESENT | USER | WRITABLE);
        ram.write_u64(0x4000, 0x8000 | PRESENT | USER | WRITABLE);
        let mut s = long_mode(0x1000, false);
        s.cr4 |= CR4_SMAP;
        let v = GuestVirt::new(&ram, s, 0);
        assert!(matches!(
            v.translate(0x10, Access::KernelRead),
            Err(PageFault::UserPage { .. })
        ));
        assert!(v.translate(0x10, Access::Inspect).is_ok());
        let v = GuestVirt::new(&ram, s, RFLAGS_AC);
        assert_eq!(v.translate(0x10, Access::KernelRead).unwrap().gpa, 0x8010);
    }

    #[test]
    fn walks_the_fake_vms_page_tables() {
        let ram = FakeMemory::new(1 << 20);
        let mut pt = fake::PageTables::new(&ram, 0x1000..0x8000);
        pt.map(0xffff_ffff_8100_0000, 0x2_0000, 0x2000, fake::Perm::TEXT);
        pt.map(0xffff_c900_0000_0000, 0x3_0000, 0x1000, fake::Perm::DATA);
        let v = GuestVirt::new(&ram, fake::long_mode(pt.cr3()), 0);
        let t = v.translate(0xffff_ffff_8100_1234, Access::Inspect).unwrap();
        assert_eq!((t.gpa, t.writable, t.executable), (0x2_1234, false, true));
        let t = v.translate(0xffff_c900_0000_0010, Access::Inspect).unwrap();
        assert_eq!((t.gpa, t.writable, t.executable), (0x3_0010, true, false));
        assert!(matches!(
            v.translate(0xffff_ffff_8100_2000, Access::Inspect),
            Err(PageFault::NotPresent { level: 1, .. })
        ));
        pt.unmap(0xffff_ffff_8100_1000);
        assert!(v.translate(0xffff_ffff_8100_1234, Access::Inspect).is_err());
    }

    #[test]
    fn paging_off_is_identity() {
        let ram = FakeMemory::new(1 << 20);
        let v = GuestVirt::new(&ram, SystemRegs::default(), 0);
        assert_eq!(
            v.translate(0x1234, Access::KernelWrite).unwrap().gpa,
            0x1234
        );
    }
}
