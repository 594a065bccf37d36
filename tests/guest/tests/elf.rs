//! Checks the built guest ELF: the PVH entry note, the load layout, the
//! symbols the host relies on, the probe-site shapes, and System.map.

use object::elf::{PT_LOAD, PT_NOTE};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SymbolKind};
use std::collections::HashMap;
use test_guest::*;

const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

fn elf() -> ElfFile64<'static, Endianness> {
    ElfFile64::parse(kernel_image()).expect("guest kernel is a 64-bit ELF")
}

/// name -> (address, size) of every named symbol.
fn symbols() -> HashMap<String, (u64, u64)> {
    elf()
        .symbols()
        .filter_map(|s| Some((s.name().ok()?.to_string(), (s.address(), s.size()))))
        .collect()
}

fn sym(name: &str) -> (u64, u64) {
    *symbols()
        .get(name)
        .unwrap_or_else(|| panic!("symbol {name} missing"))
}

/// `len` bytes of the loaded image at virtual address `addr`.
fn bytes_at(addr: u64, len: u64) -> Vec<u8> {
    let file = elf();
    for section in file.sections() {
        if let Ok(Some(data)) = section.data_range(addr, len) {
            return data.to_vec();
        }
    }
    panic!("{addr:#x}+{len} is not in a section with data");
}

fn function_bytes(name: &str) -> (u64, Vec<u8>) {
    let (addr, size) = sym(name);
    assert!(size > 0, "{name} has no size");
    (addr, bytes_at(addr, size))
}

#[test]
fn exec_at_linux_addresses() {
    let file = elf();
    let endian = file.endian();
    let header = file.elf_header();
    assert_eq!(header.e_type(endian), object::elf::ET_EXEC);
    assert_eq!(file.architecture(), object::Architecture::X86_64);
    let loads: Vec<_> = file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(endian) == PT_LOAD)
        .collect();
    assert!(!loads.is_empty());
    assert_eq!(loads[0].p_vaddr(endian), 0xffff_ffff_8100_0000);
    assert_eq!(loads[0].p_paddr(endian), 0x100_0000);
    for p in loads {
        assert_eq!(p.p_vaddr(endian) - p.p_paddr(endian), START_KERNEL_MAP);
    }
    assert_eq!(sym("_text").0, 0xffff_ffff_8100_0000);
}

#[test]
fn pvh_note_points_at_the_32bit_entry() {
    let file = elf();
    let endian = file.endian();
    let data = kernel_image();
    let mut entries = Vec::new();
    for phdr in file.elf_program_headers() {
        if phdr.p_type(endian) != PT_NOTE {
            continue;
        }
        let mut notes = phdr
            .notes(endian, data)
            .unwrap()
            .expect("PT_NOTE has notes");
        while let Some(note) = notes.next().unwrap() {
            if note.name() == b"Xen" && note.n_type(endian) == object::elf::NoteType(18) {
                let desc: [u8; 4] = note.desc().try_into().expect("32-bit entry address");
                entries.push(u32::from_le_bytes(desc) as u64);
            }
        }
    }
    let entry_phys = sym(PVH_ENTRY_SYMBOL).0 - START_KERNEL_MAP;
    assert_eq!(
        entries,
        [entry_phys],
        "exactly one XEN_ELFNOTE_PHYS32_ENTRY"
    );
    assert_eq!(file.elf_header().e_entry(endian), entry_phys);
}

#[test]
fn contract_symbols_exist() {
    let file = elf();
    let syms = symbols();
    let mut functions: Vec<&str> = COUNTED_FUNCTIONS.to_vec();
    functions.extend([
        FIRST_C_FUNCTION,
        AP_C_FUNCTION,
        SYSCALL_ENTRY_SYMBOL,
        PVH_ENTRY_SYMBOL,
    ]);
    for f in functions {
        let s = file
            .symbols()
            .find(|s| s.name() == Ok(f))
            .unwrap_or_else(|| panic!("{f} missing"));
        assert_eq!(s.kind(), SymbolKind::Text, "{f}");
        assert!(s.is_global(), "{f} must be global");
    }
    let n = COUNTED_FUNCTIONS.len() as u64;
    assert_eq!(syms[COUNTER_SYMBOL].1, 8 * n);
    assert_eq!(syms[EXPECTED_COUNTER_SYMBOL].1, 8 * n);
    assert_eq!(syms[BP_HANDLED_SYMBOL].1, 8);

    let (banner, size) = syms[BANNER_SYMBOL];
    let mut want = LINUX_BANNER.as_bytes().to_vec();
    want.push(0);
    assert_eq!(bytes_at(banner, size), want);

    let (data, size) = syms["hv_checksum_data"];
    let want: Vec<u8> = (0..CHECKSUM_DATA_LEN).map(checksum_data_byte).collect();
    assert_eq!(bytes_at(data, size), want);
}

#[test]
fn functions_start_with_the_ftrace_nop() {
    let mut functions: Vec<&str> = COUNTED_FUNCTIONS.to_vec();
    functions.extend([FIRST_C_FUNCTION, AP_C_FUNCTION]);
    for f in functions {
        let (_, code) = function_bytes(f);
        if ENDBR_FUNCTIONS.contains(&f) {
            assert_eq!(code[..4], ENDBR64, "{f} must start with endbr64");
            assert_eq!(code[4..9], NOP5, "{f}: nop5 after endbr64");
        } else {
            assert_eq!(code[..5], NOP5, "{f} must start with the 5-byte nop");
        }
    }
}

/// The shapes README.md promises at `sym+5` (the first instruction after the nop).
#[test]
fn probe_site_shapes() {
    let (_, c) = function_bytes("hv_lea_first");
    assert_eq!(
        c[5..9],
        [0x48, 0x8d, 0x44, 0x77],
        "lea 0x11(%rdi,%rsi,2),%rax"
    );

    let (_, c) = function_bytes("hv_jcc_after_nop");
    assert_eq!(c[5], 0x7c, "jl rel8 right after the nop");

    let (addr, c) = function_bytes("hv_tail_jmp");
    let body = sym("hv_tail_jmp_body").0;
    let target = match c[5] {
        0xeb => addr + 7 + c[6] as i8 as i64 as u64,
        0xe9 => addr + 10 + i32::from_le_bytes(c[6..10].try_into().unwrap()) as i64 as u64,
        b => panic!("hv_tail_jmp+5 is {b:#x}, not a jmp"),
    };
    assert_eq!(target, body);

    let (_, c) = function_bytes("hv_stack_frame");
    assert_eq!(
        c[5..9],
        [0x55, 0x48, 0x89, 0xe5],
        "push %rbp; mov %rsp,%rbp"
    );
    assert!(
        c[9..12] == [0x48, 0x83, 0xec] || c[9..12] == [0x48, 0x81, 0xec],
        "sub $N,%rsp: {:x?}",
        &c[9..12]
    );

    for f in ["hv_add", "hv_open_file", "hv_fib", "hv_many_args"] {
        let (_, c) = function_bytes(f);
        assert_eq!(c[5], 0x55, "{f}: push %rbp after the nop");
    }

    // hv_sub_tail ends in a sibling call: jmp rel32 to hv_add.
    let (addr, c) = function_bytes("hv_sub_tail");
    let end = addr + c.len() as u64;
    let tail = &c[c.len() - 5..];
    assert_eq!(tail[0], 0xe9, "hv_sub_tail ends with jmp rel32");
    let rel = i32::from_le_bytes(tail[1..5].try_into().unwrap()) as i64 as u64;
    assert_eq!(end.wrapping_add(rel), sym("hv_add").0);
}

#[test]
fn bss_is_small() {
    // Zeroed with rep stosq at boot: every qword costs emulated time.
    let size = sym("__bss_stop").0 - sym("__bss_start").0;
    assert!(size <= 4096, ".bss is {size} bytes");
}

#[test]
fn dwarf_is_kept() {
    let file = elf();
    for name in [".debug_info", ".debug_abbrev", ".debug_line", ".debug_str"] {
        let s = file
            .section_by_name(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(s.size() > 0, "{name} empty");
    }
    // struct hv_work is described (its members are fetched by DWARF name).
    let info = file.section_by_name(".debug_str").unwrap();
    let strings = info.data().unwrap();
    for needle in [&b"hv_work"[..], b"next", b"flags"] {
        assert!(strings.windows(needle.len()).any(|w| w == needle));
    }
}

#[test]
fn system_map_agrees_with_elf() {
    let map = std::fs::read_to_string(system_map_path()).unwrap();
    let syms = symbols();
    let mut last = 0u64;
    let mut names = Vec::new();
    for line in map.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts.len(), 3, "bad line {line:?}");
        assert_eq!(parts[0].len(), 16, "address width in {line:?}");
        let addr = u64::from_str_radix(parts[0], 16).unwrap();
        assert!(addr >= last, "System.map not sorted at {line:?}");
        last = addr;
        assert_eq!(
            syms.get(parts[2]).map(|s| s.0),
            Some(addr),
            "{line:?} does not match the ELF"
        );
        names.push(parts[2]);
    }
    assert!(map.contains("ffffffff81000000 T _text\n"));
    for f in COUNTED_FUNCTIONS {
        assert!(names.contains(f), "{f} not in System.map");
    }
    assert!(map.contains(&format!(" T {SYSCALL_ENTRY_SYMBOL}\n")));
}
