//! Finding and verifying the KASLR slide of a running guest kernel.

use crate::elf::KernelImage;
use crate::kallsyms::{read_kallsyms, KallsymsError};
use crate::mem::GuestMemory;
use crate::table::SymbolTable;

/// x86-64 KASLR moves the kernel in CONFIG_PHYSICAL_ALIGN steps, which must
/// be a multiple of 2 MiB.
pub const KASLR_ALIGN: u64 = 0x20_0000;

/// A verified slide: runtime address = link-time address + `slide`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KaslrSlide {
    pub slide: i64,
    /// The `linux_banner` read from the guest at the slid address.
    pub banner: String,
}

/// Why no slide could be established.
#[derive(Debug, thiserror::Error)]
pub enum KaslrError {
    #[error("link-time symbol table has no `{0}`")]
    MissingSymbol(&'static str),
    #[error("slide {0:#x} is not a multiple of 2 MiB: the runtime address (MSR_LSTAR, or the #PF gate of the IDT) does not belong to this kernel's image")]
    Misaligned(i64),
    #[error("cannot read linux_banner at {addr:#x}: {reason}")]
    Unreadable { addr: u64, reason: String },
    #[error("linux_banner at {addr:#x} does not match the image (guest has `{found}`)")]
    BannerMismatch { addr: u64, found: String },
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
}

const BANNER_MAX: usize = 512;

/// Read a NUL-terminated string of at most `BANNER_MAX` bytes; bytes are
/// read in small steps so a string that ends just before unmapped memory
/// (the end of a segment) is still read. `None` if its start is unreadable.
fn read_c_string<M: GuestMemory>(mem: &M, addr: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while out.len() < BANNER_MAX {
        let a = addr.wrapping_add(out.len() as u64);
        let mut chunk = [0u8; 64];
        let n = match mem.read_virt(a, &mut chunk) {
            Ok(()) => 64,
            // Near the end of the mapping: byte by byte.
            Err(e) => {
                let mut n = 0;
                while n < 64 && mem.read_virt(a + n as u64, &mut chunk[n..n + 1]).is_ok() {
                    n += 1;
                }
                if n == 0 {
                    return Err(e.to_string());
                }
                n
            }
        };
        if let Some(z) = memchr::memchr(0, &chunk[..n]) {
            out.extend_from_slice(&chunk[..z]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk[..n]);
        if n < 64 {
            break;
        }
    }
    Ok(out)
}

/// Slide from `MSR_LSTAR` (which holds the runtime `entry_SYSCALL_64`),
/// checked against the `linux_banner` bytes: equal to the image's when an
/// image is given, else at least a plausible `Linux version ` banner.
pub fn find_kaslr_slide<M: GuestMemory>(
    mem: &M,
    msr_lstar: u64,
    link: &SymbolTable,
    image: Option<&KernelImage>,
) -> Result<KaslrSlide, KaslrError> {
    let entry = link
        .lookup("entry_SYSCALL_64")
        .map_err(|_| KaslrError::MissingSymbol("entry_SYSCALL_64"))?;
    let slide = msr_lstar.wrapping_sub(entry) as i64;
    verify_slide(mem, slide, link, image)
}

/// Slide from the guest's page-fault gate (IDT vector 14, which Linux points
/// at `asm_exc_page_fault`; `page_fault` before 5.8), read at `idt_base`
/// (IDTR: the CPU entry area's read-only IDT, a fixed address), then checked
/// like [`find_kaslr_slide`]. Needs no MSR: a vCPU's IDTR and guest memory do.
pub fn slide_from_idt<M: GuestMemory>(
    mem: &M,
    idt_base: u64,
    link: &SymbolTable,
    image: Option<&KernelImage>,
) -> Result<KaslrSlide, KaslrError> {
    let entry = link
        .lookup("asm_exc_page_fault")
        .or_else(|_| link.lookup("page_fault"))
        .map_err(|_| KaslrError::MissingSymbol("asm_exc_page_fault"))?;
    let addr = idt_base.wrapping_add(14 * 16);
    let mut g = [0u8; 16];
    mem.read_virt(addr, &mut g)
        .map_err(|e| KaslrError::Unreadable {
            addr,
            reason: format!("the #PF gate of the IDT: {e}"),
        })?;
    let handler = u64::from(u16::from_le_bytes([g[0], g[1]]))
        | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
        | u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32;
    let slide = handler.wrapping_sub(entry) as i64;
    verify_slide(mem, slide, link, image)
}

/// Check a candidate slide with the `linux_banner` bytes.
pub fn verify_slide<M: GuestMemory>(
    mem: &M,
    slide: i64,
    link: &SymbolTable,
    image: Option<&KernelImage>,
) -> Result<KaslrSlide, KaslrError> {
    if !slide.unsigned_abs().is_multiple_of(KASLR_ALIGN) {
        return Err(KaslrError::Misaligned(slide));
    }
    let banner_link = link
        .lookup("linux_banner")
        .map_err(|_| KaslrError::MissingSymbol("linux_banner"))?;
    let addr = banner_link.wrapping_add_signed(slide);
    let got = read_c_string(mem, addr).map_err(|reason| KaslrError::Unreadable { addr, reason })?;
    let found = String::from_utf8_lossy(&got).trim_end().to_string();
    let ok = match image {
        Some(img) => read_c_string(img, banner_link).is_ok_and(|want| want == got),
        None => got.starts_with(b"Linux version "),
    } && !got.is_empty();
    if !ok {
        return Err(KaslrError::BannerMismatch { addr, found });
    }
    Ok(KaslrSlide {
        slide,
        banner: found,
    })
}

/// Zero-config: decode the guest's own kallsyms tables, searching from the
/// 2 MiB boundary below `msr_lstar` (the tables sit in .rodata, above the
/// entry text) up to `max_scan` bytes. Addresses are runtime addresses.
pub fn read_guest_kallsyms<M: GuestMemory>(
    mem: &M,
    msr_lstar: u64,
    max_scan: u64,
) -> Result<SymbolTable, KallsymsError> {
    let start = msr_lstar & !(KASLR_ALIGN - 1);
    read_kallsyms(mem, start, start.saturating_add(max_scan))
}

/// Slide between a runtime table (e.g. decoded from the guest) and the
/// link-time one, from `_text`, else `entry_SYSCALL_64`.
pub fn slide_between(runtime: &SymbolTable, link: &SymbolTable) -> Option<i64> {
    ["_text", "entry_SYSCALL_64"]
        .iter()
        .find_map(|n| Some(runtime.lookup(n).ok()?.wrapping_sub(link.lookup(n).ok()?) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::SliceMemory;
    use crate::table::Symbol;

    fn link() -> SymbolTable {
        let s = |name: &str, addr| Symbol::new(name, addr, 'T', None);
        SymbolTable::new(vec![
            s("_text", 0xffff_ffff_8100_0000),
            s("entry_SYSCALL_64", 0xffff_ffff_8100_0100),
            s("linux_banner", 0xffff_ffff_8100_1000),
        ])
    }

    #[test]
    fn slide_from_lstar() {
        let slide = 0x3a0_0000u64;
        let mut mem = vec![0u8; 0x2000];
        mem[0x1000..0x1000 + 22].copy_from_slice(b"Linux version 6.1.0 x\n");
        let m = SliceMemory {
            base: 0xffff_ffff_8100_0000 + slide,
            bytes: &mem,
        };
        let got = find_kaslr_slide(&m, 0xffff_ffff_8100_0100 + slide, &link(), None).unwrap();
        assert_eq!(got.slide, slide as i64);
        assert_eq!(got.banner, "Linux version 6.1.0 x");
        let base = m.base;
        // Misaligned LSTAR, wrong banner, unreadable memory.
        assert!(matches!(
            find_kaslr_slide(&m, 0xffff_ffff_8100_0140 + slide, &link(), None),
            Err(KaslrError::Misaligned(_))
        ));
        mem[0x1000] = b'X';
        let m = SliceMemory { base, bytes: &mem };
        assert!(matches!(
            find_kaslr_slide(&m, 0xffff_ffff_8100_0100 + slide, &link(), None),
            Err(KaslrError::BannerMismatch { .. })
        ));
        assert!(matches!(
            find_kaslr_slide(&m, 0xffff_ffff_8100_0100, &link(), None),
            Err(KaslrError::Unreadable { .. })
        ));
        assert!(matches!(
            find_kaslr_slide(&m, 0, &SymbolTable::default(), None),
            Err(KaslrError::MissingSymbol("entry_SYSCALL_64"))
        ));
    }

    /// An IDT whose #PF gate points at the slid `asm_exc_page_fault`.
    #[test]
    fn slide_from_the_page_fault_gate() {
        let slide = 0x1e00_0000u64;
        let text = 0xffff_ffff_8100_0000 + slide;
        let mut mem = vec![0u8; 0x3000];
        mem[0x1000..0x1000 + 22].copy_from_slice(b"Linux version 6.1.0 x\n");
        // IDT at text + 0x2000 (any readable address); gate 14 at +0xe0.
        let handler = 0xffff_ffff_8100_0200 + slide;
        let g = &mut mem[0x20e0..0x20f0];
        g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        let m = SliceMemory {
            base: text,
            bytes: &mem,
        };
        let mut l = link().symbols().to_vec();
        l.push(Symbol::new(
            "asm_exc_page_fault",
            0xffff_ffff_8100_0200,
            'T',
            None,
        ));
        let l = SymbolTable::new(l);
        let got = slide_from_idt(&m, text + 0x2000, &l, None).unwrap();
        assert_eq!(got.slide, slide as i64);
        // A gate pointing elsewhere in the image gives a slide whose banner
        // does not read back, and an IDT that does not read is reported.
        mem[0x20e0] = 0x40;
        let m = SliceMemory {
            base: text,
            bytes: &mem,
        };
        assert!(slide_from_idt(&m, text + 0x2000, &l, None).is_err());
        assert!(matches!(
            slide_from_idt(&m, 0x1000, &l, None),
            Err(KaslrError::Unreadable { .. })
        ));
        assert!(matches!(
            slide_from_idt(&m, text + 0x2000, &link(), None),
            Err(KaslrError::MissingSymbol(_))
        ));
    }

    #[test]
    fn slide_between_tables() {
        let l = link();
        assert_eq!(slide_between(&l.slid(0x200000), &l), Some(0x200000));
        assert_eq!(slide_between(&l.slid(-0x200000), &l), Some(-0x200000));
    }
}
