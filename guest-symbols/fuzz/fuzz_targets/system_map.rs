#![no_main]
//! System.map / kallsyms text: any bytes parse or fail, never panic; a
//! parsed table answers lookups without panicking.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = guest_symbols::parse_system_map(&text) {
        let first = t.symbols()[0].clone();
        let _ = t.lookup(&first.name);
        let _ = t.lookup_with(&first.name, guest_symbols::VariantMatch::CompilerClones);
        let _ = t.describe(first.addr.wrapping_add(3));
        let _ = t.function_bounds(first.addr);
    }
    if let Ok(loc) = guest_symbols::parse_location(&text) {
        let _ = guest_symbols::SymbolTable::default().resolve(&loc);
    }
});
