#![no_main]
//! vmlinux ELF: headers, symbols, segment reads, blacklist, DWARF on top.
use guest_symbols::{Blacklist, DebugInfo, GuestMemory, KernelImage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = KernelImage::from_bytes(data.to_vec()) else {
        return;
    };
    let ranges: Vec<(u64, u64)> = img.loaded_ranges().collect();
    for (s, e) in ranges {
        let mut b = [0u8; 16];
        let _ = img.read_virt(s, &mut b);
        let _ = img.read_virt(e.wrapping_sub(8), &mut b);
    }
    let _ = img.symbol_address("linux_banner");
    if let Ok(syms) = img.symbols() {
        let _ = Blacklist::from_image(&img, &syms);
        if let Some(s) = syms.symbols().first() {
            let _ = syms.describe(s.addr);
        }
    }
    if let Ok(d) = DebugInfo::from_image(img) {
        let _ = d.member("task_struct.comm");
        let _ = d.function_params("do_sys_openat2");
    }
});
