//! Guest RAM, shared by all threads.

use guest_access::AccessError;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

/// One guest RAM region and where it lives in a snapshot's memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Guest RAM backed by anonymous host mappings.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    end: u64,
}

impl GuestRam {
    /// Allocate `mem_bytes` of guest RAM laid out around the MMIO hole.
    pub fn new(mem_bytes: u64) -> Result<Self, String> {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_bytes)
            .into_iter()
            .map(|(s, l)| {
                Ok((
                    GuestAddress(s),
                    usize::try_from(l).map_err(|e| e.to_string())?,
                ))
            })
            .collect::<Result<_, String>>()?;
        let end = ranges
            .last()
            .map(|(s, l)| s.0 + *l as u64)
            .unwrap_or_default();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| e.to_string())?;
        Ok(Self { mem, end })
    }

    /// Guest RAM mapped copy-on-write from a snapshot's memory file
    /// (`MAP_PRIVATE`): pages are read on first touch, guest writes stay in
    /// this process, and the file is never modified.
    pub fn from_snapshot(path: &std::path::Path, regions: &[Region]) -> Result<Self, String> {
        use vm_memory::GuestRegionMmap;
        use vm_memory::{FileOffset, MmapRegion};
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut mapped = Vec::with_capacity(regions.len());
        for r in regions {
            let len = usize::try_from(r.len).map_err(|e| e.to_string())?;
            let f = file.try_clone().map_err(|e| e.to_string())?;
            let region = MmapRegion::build(
                Some(FileOffset::new(f, r.file_offset)),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| format!("mapping {}: {e}", path.display()))?;
            mapped.push(
                GuestRegionMmap::new(region, GuestAddress(r.gpa))
                    .ok_or_else(|| format!("region at {:#x} overflows", r.gpa))?,
            );
        }
        let end = regions.iter().map(|r| r.gpa + r.len).max().unwrap_or(0);
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| e.to_string())?;
        Ok(Self { mem, end })
    }

    /// The vm-memory object (for loaders).
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// (guest address, size, host address) of each region, for KVM memory slots.
    pub(crate) fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("region has a host mapping") as u64;
                (r.start_addr().0, r.len(), host)
            })
            .collect()
    }
}

impl guest_access::GuestMemory for GuestRam {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| AccessError::OutOfRam {
                gpa,
                len: buf.len(),
            })
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| AccessError::OutOfRam {
                gpa,
                len: data.len(),
            })
    }

    fn ram_end(&self) -> u64 {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_access::GuestMemory;

    #[test]
    fn read_write_and_bounds() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write_phys(0x1000, b"hvprobe").unwrap();
        let mut b = [0u8; 7];
        ram.read_phys(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"hvprobe");
        assert_eq!(ram.ram_end(), 4 << 20);
        let err = ram.read_phys((4 << 20) - 2, &mut b).unwrap_err();
        assert!(err.to_string().contains("outside guest RAM"), "{err}");
    }
}
