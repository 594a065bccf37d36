#![no_main]
//! DWARF sections straight from the input: `[u32 len][bytes]` for
//! .debug_info, .debug_abbrev, .debug_str, .debug_aranges, .debug_loclists,
//! then a query word.
use guest_symbols::DebugInfo;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

const NAMES: [&str; 5] = [
    ".debug_info",
    ".debug_abbrev",
    ".debug_str",
    ".debug_aranges",
    ".debug_loclists",
];

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut sections = HashMap::new();
    for name in NAMES {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
        sections.insert(name, tail[..len].to_vec());
        rest = &tail[len..];
    }
    let d = DebugInfo::from_sections(sections);
    let word = String::from_utf8_lossy(rest);
    let _ = d.member(&format!("{word}.a"));
    let _ = d.member("outer.in.pair.hi");
    let _ = d.member("task_struct.comm");
    let addr = rest
        .first_chunk::<8>()
        .map_or(0xffff_ffff_8100_0000, |b| u64::from_le_bytes(*b));
    let _ = d.function_at(addr);
    let _ = d.function_at(0xffff_ffff_8100_0000);
});
