//! A kernel ELF image (vmlinux, or the test guest): symbols and its loaded
//! bytes as a virtual-memory reader.

use crate::mem::{Backing, GuestMemory, Unmapped};
use crate::table::{Symbol, SymbolTable};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, SymbolSection};
use std::path::Path;

/// A kernel image that could not be opened or understood.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a usable 64-bit little-endian ELF: {0}")]
    Elf(String),
    #[error("ELF has no symbol table (.symtab); stripped image?")]
    NoSymbols,
}

/// One loadable segment: `[vaddr, vaddr+mem_size)` backed by
/// `file_size` bytes at `offset`, zero-filled beyond.
#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    mem_size: u64,
    offset: u64,
    file_size: u64,
}

/// A memory-mapped kernel ELF image.
pub struct KernelImage {
    data: Backing,
    segments: Vec<Segment>,
}

type Elf<'a> = object::read::elf::ElfFile64<'a, object::LittleEndian>;

impl KernelImage {
    /// Memory-map and validate the ELF headers; nothing else is read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let data = Backing::map(path).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_backing(data)
    }

    /// Use bytes already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, ImageError> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(data: Backing) -> Result<Self, ImageError> {
        let file = Elf::parse(&*data).map_err(|e| ImageError::Elf(e.to_string()))?;
        let len = data.len() as u64;
        let mut segments = Vec::new();
        for seg in file.segments() {
            let (offset, file_size) = seg.file_range();
            if offset.checked_add(file_size).is_none_or(|end| end > len) {
                return Err(ImageError::Elf(format!(
                    "segment at {:#x} points past the end of the file",
                    seg.address()
                )));
            }
            segments.push(Segment {
                vaddr: seg.address(),
                mem_size: seg.size().max(file_size),
                offset,
                file_size,
            });
        }
        Ok(KernelImage { data, segments })
    }

    fn elf(&self) -> Elf<'_> {
        // Validated in `from_backing`; the bytes never change.
        Elf::parse(&*self.data).expect("ELF validated at open")
    }

    /// All defined symbols of `.symtab`, with nm-style type letters and ELF
    /// sizes.
    pub fn symbols(&self) -> Result<SymbolTable, ImageError> {
        let elf = self.elf();
        if elf.symbol_table().is_none() {
            return Err(ImageError::NoSymbols);
        }
        let kinds: Vec<(SectionKind, bool)> = std::iter::once((SectionKind::Unknown, false))
            .chain(elf.sections().map(|s| (s.kind(), is_writable(&s))))
            .collect();
        let mut syms = Vec::new();
        for s in elf.symbols() {
            let Ok(name) = s.name() else { continue };
            if name.is_empty()
                || matches!(
                    s.kind(),
                    object::SymbolKind::File | object::SymbolKind::Section
                )
            {
                continue;
            }
            let kind = match s.section() {
                SymbolSection::Undefined | SymbolSection::Unknown | SymbolSection::None => continue,
                SymbolSection::Absolute => 'a',
                SymbolSection::Common => 'c',
                SymbolSection::Section(idx) => {
                    let (k, writable) = kinds
                        .get(idx.0)
                        .copied()
                        .unwrap_or((SectionKind::Unknown, false));
                    letter(k, writable, s.kind())
                }
                _ => '?',
            };
            let kind = if s.is_weak() {
                if s.kind() == object::SymbolKind::Data {
                    'V'
                } else {
                    'W'
                }
            } else if s.is_global() {
                kind.to_ascii_uppercase()
            } else {
                kind
            };
            syms.push(Symbol::new(
                name,
                s.address(),
                kind,
                (s.size() > 0).then_some(s.size()),
            ));
        }
        Ok(SymbolTable::new(syms))
    }

    /// Address of one symbol by a scan of `.symtab`, without building a
    /// table (the cheap path for a single cold lookup).
    pub fn symbol_address(&self, name: &str) -> Option<u64> {
        let elf = self.elf();
        elf.symbols()
            .find(|s| {
                s.name_bytes().ok() == Some(name.as_bytes())
                    && !matches!(s.section(), SymbolSection::Undefined)
            })
            .map(|s| s.address())
    }

    /// Raw contents of a section (e.g. `.debug_info`); empty for NOBITS.
    pub fn section_data(&self, name: &str) -> Option<&[u8]> {
        let elf = self.elf();
        let sec = elf.section_by_name(name)?;
        let (off, size) = sec.file_range()?;
        self.data
            .get(usize::try_from(off).ok()?..usize::try_from(off.checked_add(size)?).ok()?)
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// `[start, end)` virtual ranges of the loadable segments.
    pub fn loaded_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.segments
            .iter()
            .map(|s| (s.vaddr, s.vaddr.saturating_add(s.mem_size)))
    }
}

fn is_writable(s: &object::read::elf::ElfSection64<'_, '_, object::LittleEndian>) -> bool {
    match s.flags() {
        // SHF_WRITE is bit 0.
        object::SectionFlags::Elf { sh_flags, .. } => sh_flags.0 & 1 != 0,
        _ => false,
    }
}

/// nm's letter for a symbol in a section of this kind.
fn letter(k: SectionKind, writable: bool, sym: object::SymbolKind) -> char {
    match k {
        SectionKind::Text => 't',
        SectionKind::UninitializedData | SectionKind::UninitializedTls => 'b',
        SectionKind::Data | SectionKind::Tls => 'd',
        SectionKind::ReadOnlyData
        | SectionKind::ReadOnlyString
        | SectionKind::ReadOnlyDataWithRel => {
            if writable {
                'd'
            } else {
                'r'
            }
        }
        _ if sym == object::SymbolKind::Text => 't',
        _ => 'd',
    }
}

impl GuestMemory for KernelImage {
    type Error = Unmapped;

    /// Read the image as it is laid out in memory at its link addresses.
    fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unmapped> {
        let err = Unmapped {
            addr,
            len: buf.len(),
        };
        let mut done = 0usize;
        while done < buf.len() {
            let a = addr.checked_add(done as u64).ok_or(err)?;
            let seg = self
                .segments
                .iter()
                .find(|s| a >= s.vaddr && a - s.vaddr < s.mem_size)
                .ok_or(err)?;
            let rel = a - seg.vaddr;
            let n = ((seg.mem_size - rel) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            // File-backed prefix, then zeros (.bss) up to mem_size.
            let file_n = seg.file_size.saturating_sub(rel).min(n as u64) as usize;
            if file_n > 0 {
                let off = (seg.offset + rel) as usize;
                out[..file_n].copy_from_slice(&self.data[off..off + file_n]);
            }
            out[file_n..].fill(0);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncated_elf_are_errors() {
        assert!(matches!(
            KernelImage::from_bytes(b"not an elf at all".to_vec()),
            Err(ImageError::Elf(_))
        ));
        let mut hdr = vec![0x7f, b'E', b'L', b'F', 2, 1, 1];
        hdr.resize(40, 0);
        assert!(KernelImage::from_bytes(hdr).is_err());
        assert!(matches!(
            KernelImage::open("/nonexistent/vmlinux"),
            Err(ImageError::Io { .. })
        ));
    }

    /// Found by the `elf` fuzzer: a read wholly in the zero-filled (.bss)
    /// tail of a segment, where `offset + rel` lies past the end of the file.
    #[test]
    fn bss_read_at_end_of_file() {
        let img = KernelImage::open(test_guest::kernel_path()).unwrap();
        let (start, end) = img.loaded_ranges().last().unwrap();
        let mut b = [0xffu8; 16];
        img.read_virt(end - 16, &mut b).unwrap();
        assert_eq!(b, [0; 16]);
        assert!(img.read_virt(end - 8, &mut b).is_err());
        assert!(img.read_virt(start.wrapping_sub(1), &mut [0u8; 4]).is_err());
    }
}
