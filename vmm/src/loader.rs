//! Loading a Linux kernel into guest RAM: an ELF `vmlinux` through its PVH
//! entry, or a bzImage through the 64-bit boot protocol; initrd; command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use guest_access::GuestMemory;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestRam;

/// How the boot CPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `%rsi` = zero page.
    Linux64 { entry: u64, zero_page: u64 },
}

/// What was loaded, for messages and for the probe engine.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    pub format: KernelFormat,
    /// First and one-past-last guest-physical byte of the kernel image.
    pub phys_start: u64,
    pub phys_end: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    ElfPvh,
    BzImage,
}

/// A kernel/initrd/command-line problem, naming the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The I/O error is part of the message, not a `source`, so that error
    // chains print it once.
    #[error("cannot open {what} {path}: {cause}")]
    Open {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is neither an ELF vmlinux nor a bzImage (first bytes {magic})")]
    UnknownFormat { path: PathBuf, magic: String },
    #[error("{path} is an ELF file without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); boot its bzImage instead")]
    NoPvhEntry { path: PathBuf },
    #[error("guest memory too small: {what} needs {need_mib} MiB of RAM below 3 GiB, the guest has {have_mib} MiB (use --memory)")]
    MemoryTooSmall {
        what: String,
        need_mib: u64,
        have_mib: u64,
    },
    #[error("cannot load kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("kernel command line is {len} bytes; at most {max} are allowed")]
    CmdlineTooLong { len: usize, max: usize },
}

fn open(what: &'static str, path: &Path) -> Result<File, LoadError> {
    let f = File::open(path).map_err(|cause| LoadError::Open {
        what,
        path: path.to_owned(),
        cause,
    })?;
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(LoadError::Open {
            what,
            path: path.to_owned(),
            cause: std::io::Error::other("is a directory"),
        });
    }
    Ok(f)
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Highest guest-physical end of RAM below the MMIO hole.
fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.ram_end().min(layout::MMIO_HOLE_START)
}

/// The physical end of an ELF64 image's PT_LOAD segments, read from its
/// headers, so that a too-small guest is reported before anything is copied.
fn elf_phys_end(file: &mut File) -> Option<(u64, u64)> {
    let mut eh = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut eh).ok()?;
    if eh[4] != 2 {
        return None; // not ELF64; the loader reports it
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().ok()?);
    let phentsize = u16::from_le_bytes(eh[54..56].try_into().ok()?) as u64;
    let phnum = u16::from_le_bytes(eh[56..58].try_into().ok()?) as u64;
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for i in 0..phnum.min(256) {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize)).ok()?;
        file.read_exact(&mut ph).ok()?;
        if u32::from_le_bytes(ph[0..4].try_into().ok()?) != 1 {
            continue; // PT_LOAD only
        }
        let paddr = u64::from_le_bytes(ph[24..32].try_into().ok()?);
        let memsz = u64::from_le_bytes(ph[40..48].try_into().ok()?);
        lo = lo.min(paddr);
        hi = hi.max(paddr.saturating_add(memsz));
    }
    (hi > 0).then_some((lo, hi))
}

/// The format of the kernel file at `path` (its first bytes), without
/// loading it.
pub fn sniff_format(path: &Path) -> Result<KernelFormat, LoadError> {
    let mut file = open("kernel", path)?;
    let (head, n) = read_head(&mut file, path)?;
    format_of(path, &head[..n])
}

/// The first bytes of the kernel file: enough for the ELF magic and the
/// bzImage setup header; the length read (a short file gives fewer).
fn read_head(file: &mut File, path: &Path) -> Result<([u8; 0x270], usize), LoadError> {
    let mut head = [0u8; 0x270];
    let n = read_up_to(file, &mut head).map_err(|cause| LoadError::Read {
        what: "kernel",
        path: path.to_owned(),
        cause,
    })?;
    Ok((head, n))
}

fn format_of(path: &Path, magic: &[u8]) -> Result<KernelFormat, LoadError> {
    if magic.starts_with(b"\x7fELF") {
        Ok(KernelFormat::ElfPvh)
    } else if magic.len() >= 0x206 && &magic[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        let shown: Vec<String> = magic.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(LoadError::UnknownFormat {
            path: path.to_owned(),
            magic: if shown.is_empty() {
                "none: the file is empty".into()
            } else {
                shown.join(" ")
            },
        })
    }
}

/// Load kernel, initrd and command line; write the boot structures.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<LoadedKernel, LoadError> {
    let mut file = open("kernel", kernel)?;
    let (head, n) = read_head(&mut file, kernel)?;
    let magic = &head[..n];
    let format = format_of(kernel, magic)?;
    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX - 1,
        });
    }
    let have_mib = low_ram_end(ram) >> 20;
    let kernel_err = |reason: String| LoadError::Kernel {
        path: kernel.to_owned(),
        reason,
    };

    let (phys_start, phys_end, entry_addr, setup_header) = match format {
        KernelFormat::ElfPvh => {
            if let Some((_, end)) = elf_phys_end(&mut file) {
                if end > low_ram_end(ram) {
                    return Err(LoadError::MemoryTooSmall {
                        what: format!("kernel {} (loads up to {end:#x})", kernel.display()),
                        need_mib: mib_up(end) + 16,
                        have_mib,
                    });
                }
            }
            file.seek(SeekFrom::Start(0))
                .map_err(|e| kernel_err(e.to_string()))?;
            let r = Elf::load(
                ram.mmap(),
                None,
                &mut file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(|e| kernel_err(e.to_string()))?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => a.0,
                _ => {
                    return Err(LoadError::NoPvhEntry {
                        path: kernel.to_owned(),
                    })
                }
            };
            (r.kernel_load.0, r.kernel_end, entry, None)
        }
        KernelFormat::BzImage => {
            if magic.len() < 0x268 {
                return Err(kernel_err(format!(
                    "bzImage setup header is truncated ({} bytes)",
                    magic.len()
                )));
            }
            // The decompressor moves the kernel to pref_address and needs
            // init_size bytes there.
            let init_size = u32::from_le_bytes(magic[0x260..0x264].try_into().unwrap()) as u64;
            let pref = u64::from_le_bytes(magic[0x258..0x260].try_into().unwrap());
            let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let need =
                (pref.max(layout::HIMEM_START) + init_size).max(layout::HIMEM_START + file_len);
            if need > low_ram_end(ram) {
                return Err(LoadError::MemoryTooSmall {
                    what: format!("bzImage {} (init_size {init_size:#x})", kernel.display()),
                    need_mib: mib_up(need) + 16,
                    have_mib,
                });
            }
            file.seek(SeekFrom::Start(0))
                .map_err(|e| kernel_err(e.to_string()))?;
            let r = BzImage::load(
                ram.mmap(),
                None,
                &mut file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(|e| kernel_err(e.to_string()))?;
            // 64-bit entry point is 0x200 past the protected-mode kernel start.
            (
                r.kernel_load.0,
                need,
                r.kernel_load.0 + 0x200,
                r.setup_header,
            )
        }
    };

    // Command line.
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.write_phys(layout::CMDLINE_ADDR, &bytes)
        .map_err(|e| kernel_err(e.to_string()))?;

    // Initrd at the top of low RAM, page aligned.
    let initrd_range = match initrd {
        None => None,
        Some(path) => {
            let mut f = open("initrd", path)?;
            let mut data = Vec::new();
            f.read_to_end(&mut data).map_err(|cause| LoadError::Read {
                what: "initrd",
                path: path.to_owned(),
                cause,
            })?;
            let top = low_ram_end(ram).min(0x8000_0000);
            let addr = top.saturating_sub(data.len() as u64) & !0xfff;
            if addr < phys_end.max(layout::HIMEM_START) + (1 << 20) {
                return Err(LoadError::MemoryTooSmall {
                    what: format!(
                        "kernel ({} MiB) plus initrd {} ({} MiB)",
                        mib_up(phys_end),
                        path.display(),
                        mib_up(data.len() as u64)
                    ),
                    need_mib: mib_up(phys_end) + mib_up(data.len() as u64) + 16,
                    have_mib,
                });
            }
            ram.write_phys(addr, &data)
                .map_err(|e| kernel_err(e.to_string()))?;
            Some((addr, data.len() as u64))
        }
    };

    let map = layout::memory_map(ram.ram_end());
    let entry = match format {
        KernelFormat::ElfPvh => {
            write_pvh_start_info(ram, &map, initrd_range, rsdp).map_err(kernel_err)?;
            BootEntry::Pvh {
                entry: entry_addr,
                start_info: layout::START_INFO_ADDR,
            }
        }
        KernelFormat::BzImage => {
            let mut params = boot_params {
                hdr: setup_header.expect("bzImage loader returns a setup header"),
                ..Default::default()
            };
            params.hdr.type_of_loader = 0xff;
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
                                             // The boot protocol's fields are 32-bit: refuse what they cannot hold.
            let u32_field = |what: &str, v: u64| {
                u32::try_from(v).map_err(|_| kernel_err(format!("{what} {v:#x} beyond 4 GiB")))
            };
            params.hdr.cmd_line_ptr = u32_field("command line address", layout::CMDLINE_ADDR)?;
            params.hdr.cmdline_size = u32_field("command line length", cmdline.len() as u64)?;
            params.hdr.kernel_alignment = 0x100_0000;
            if let Some((addr, len)) = initrd_range {
                params.hdr.ramdisk_image = u32_field("initrd address", addr)?;
                params.hdr.ramdisk_size = u32_field("initrd size", len)?;
            }
            params.acpi_rsdp_addr = rsdp;
            for (i, (start, size, ty)) in map.iter().enumerate() {
                params.e820_table[i].addr = *start;
                params.e820_table[i].size = *size;
                params.e820_table[i].r#type = *ty;
            }
            params.e820_entries = u8::try_from(map.len())
                .map_err(|_| kernel_err(format!("{} e820 entries", map.len())))?;
            ram.mmap()
                .write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
                .map_err(|e| kernel_err(e.to_string()))?;
            BootEntry::Linux64 {
                entry: entry_addr,
                zero_page: layout::ZERO_PAGE_ADDR,
            }
        }
    };
    Ok(LoadedKernel {
        entry,
        format,
        phys_start,
        phys_end,
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Write `hvm_start_info`, its memory map and module list (the PVH ABI, all
/// little-endian C structs).
fn write_pvh_start_info(
    ram: &GuestRam,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), String> {
    let mut memmap = Vec::new();
    for (start, size, ty) in map {
        memmap.extend_from_slice(&start.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&ty.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    ram.write_phys(layout::MEMMAP_ADDR, &memmap)
        .map_err(|e| e.to_string())?;
    let mut nr_modules = 0u32;
    if let Some((addr, len)) = initrd {
        let mut m = Vec::new();
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes()); // cmdline_paddr
        m.extend_from_slice(&0u64.to_le_bytes()); // reserved
        ram.write_phys(layout::MODLIST_ADDR, &m)
            .map_err(|e| e.to_string())?;
        nr_modules = 1;
    }
    let mut si = Vec::new();
    si.extend_from_slice(&0x336e_c578u32.to_le_bytes()); // XEN_HVM_START_MAGIC_VALUE
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&nr_modules.to_le_bytes());
    si.extend_from_slice(&layout::MODLIST_ADDR.to_le_bytes());
    si.extend_from_slice(&layout::CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&rsdp.to_le_bytes());
    si.extend_from_slice(&layout::MEMMAP_ADDR.to_le_bytes());
    let entries = u32::try_from(map.len()).map_err(|_| "memory map too long".to_string())?;
    si.extend_from_slice(&entries.to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    ram.write_phys(layout::START_INFO_ADDR, &si)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, data: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("hvprobe-loader-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(data).unwrap();
        p
    }

    #[test]
    fn missing_kernel_is_named() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let e = load(&ram, Path::new("/nonexistent/vmlinux"), None, "", 0).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("cannot open kernel /nonexistent/vmlinux"), "{s}");
    }

    #[test]
    fn garbage_is_neither_elf_nor_bzimage() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let p = tmp("garbage", b"this is not a kernel at all");
        let s = load(&ram, &p, None, "", 0).unwrap_err().to_string();
        assert!(s.contains("neither an ELF vmlinux nor a bzImage"), "{s}");
        assert!(s.contains("74 68 69 73"), "{s}");
        let p = tmp("empty", b"");
        let s = load(&ram, &p, None, "", 0).unwrap_err().to_string();
        assert!(s.contains("empty"), "{s}");
    }

    #[test]
    fn long_cmdline_is_refused() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let p = tmp("bz", &img);
        let s = load(&ram, &p, None, &"x".repeat(5000), 0)
            .unwrap_err()
            .to_string();
        assert!(s.contains("command line is 5000 bytes"), "{s}");
    }

    #[test]
    fn truncated_bzimage_header() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut img = vec![0u8; 0x210];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let p = tmp("bzshort", &img);
        let s = load(&ram, &p, None, "", 0).unwrap_err().to_string();
        assert!(s.contains("truncated"), "{s}");
    }

    #[test]
    fn bzimage_too_big_for_memory() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
        let p = tmp("bzbig", &img);
        let s = load(&ram, &p, None, "", 0).unwrap_err().to_string();
        assert!(s.contains("guest memory too small"), "{s}");
        assert!(s.contains("the guest has 8 MiB"), "{s}");
    }
}
