//! Reading guest (or image) memory by virtual address.

use std::ops::Deref;
use std::path::Path;

/// The one thing this crate needs from a guest: read bytes at a kernel
/// virtual address. The probe engine implements it over a page walk; a
/// [`crate::KernelImage`] implements it over its loadable segments.
pub trait GuestMemory {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Fill `buf` from `addr`; fail if any byte is unmapped.
    fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

impl<T: GuestMemory + ?Sized> GuestMemory for &T {
    type Error = T::Error;
    fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read_virt(addr, buf)
    }
}

/// A read outside the bytes a [`SliceMemory`] or image covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at {addr:#x} are not mapped")]
pub struct Unmapped {
    pub addr: u64,
    pub len: usize,
}

/// A byte slice mapped at a virtual base address (tests, fuzzing, dumps).
#[derive(Debug, Clone, Copy)]
pub struct SliceMemory<'a> {
    pub base: u64,
    pub bytes: &'a [u8],
}

impl GuestMemory for SliceMemory<'_> {
    type Error = Unmapped;
    fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unmapped> {
        let err = Unmapped {
            addr,
            len: buf.len(),
        };
        let start = addr.checked_sub(self.base).ok_or(err)?;
        let start = usize::try_from(start).map_err(|_| err)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get(start..end))
            .ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// File bytes, memory-mapped when they come from disk so a 600 MB vmlinux
/// costs nothing until pages are touched.
pub(crate) enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    pub(crate) fn map(path: &Path) -> std::io::Result<Backing> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is read-only; a concurrent truncation of the file
        // by another process is outside what this library can guard against
        // (the same contract as every mmap-based ELF reader).
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Backing::Mapped(map))
    }
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// Read a little-endian integer from a byte slice at `off`.
pub(crate) fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_memory_bounds() {
        let m = SliceMemory {
            base: 0x1000,
            bytes: &[1, 2, 3, 4],
        };
        let mut b = [0u8; 2];
        m.read_virt(0x1002, &mut b).unwrap();
        assert_eq!(b, [3, 4]);
        assert!(m.read_virt(0x1003, &mut b).is_err());
        assert!(m.read_virt(0xfff, &mut b).is_err());
        assert!(m.read_virt(u64::MAX, &mut b).is_err());
    }
}
