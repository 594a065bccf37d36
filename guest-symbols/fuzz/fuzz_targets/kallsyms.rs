#![no_main]
//! kallsyms tables: the input is guest memory at a kernel address.
use guest_symbols::{read_kallsyms, SliceMemory};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = 0xffff_ffff_8200_0000u64;
    let mem = SliceMemory { base, bytes: data };
    if let Ok(t) = read_kallsyms(&mem, base, base + data.len() as u64) {
        for s in t.symbols().iter().take(4) {
            let _ = t.describe(s.addr);
        }
    }
});
