//! Guest-physical memory layout chosen by the VMM.
//!
//! Low memory keeps the PC conventions a Linux guest expects: RAM below the
//! EBDA, the BIOS area (ACPI tables) reserved, the kernel above 1 MiB, and an
//! MMIO hole below 4 GiB for the IOAPIC and LAPIC.

/// GDT used for the initial segment state (PVH and 64-bit boot).
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const START_INFO_ADDR: u64 = 0x6000;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const MEMMAP_ADDR: u64 = 0x6100;
/// PVH module list (the initrd).
pub const MODLIST_ADDR: u64 = 0x6800;
/// Linux zero page (`boot_params`) for bzImage boot.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity page tables for the 64-bit bzImage entry (PML4, PDPT, PD).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line (NUL terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (Linux x86 COMMAND_LINE_SIZE is 2048).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the reserved area below 1 MiB (EBDA, option ROMs, BIOS).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP sits where Linux scans for it without a hint.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// First address above the legacy area: where kernels load.
pub const HIMEM_START: u64 = 0x100000;
/// The MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (VMX only).
pub const TSS_ADDR: usize = 0xfffb_d000;
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Guest RAM ranges for `mem_bytes` of memory, leaving the MMIO hole free.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// The e820/PVH memory map: (start, size, type) with type 1 = RAM, 2 = reserved.
pub fn memory_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, 1),
        (EBDA_START, HIMEM_START - EBDA_START, 2),
    ];
    for (start, size) in ram_ranges(mem_bytes) {
        let start = start.max(HIMEM_START);
        let end = if start >= MMIO_HOLE_END {
            start + size
        } else {
            size.min(MMIO_HOLE_START)
        };
        if end > start {
            map.push((start, end - start, 1));
        }
    }
    map
}

/// The 16550 console's I/O ports (COM1) and interrupt line, described to the
/// guest in ACPI and served by the port bus.
pub const SERIAL_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        let map = memory_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, 1));
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, 1));
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let mem = 4u64 << 30;
        let r = ram_ranges(mem);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]);
        let map = memory_map(mem);
        assert_eq!(map.last().unwrap(), &(MMIO_HOLE_END, 1 << 30, 1));
        let ram: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }
}
