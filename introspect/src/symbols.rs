//! The engine's view of guest symbols: what it asks ([`KernelSymbols`]) and
//! an answer backed by the `guest-symbols` crate ([`SymbolIndex`]).

use guest_symbols::{Blacklist, SymbolTable};

use crate::task::TaskLayout;

/// Linux's (and the test guest's) kernel-text mapping: virtual
/// `0xffffffff80000000 + x` is physical `x` when the kernel is not relocated.
pub const KERNEL_TEXT_MAP: u64 = 0xffff_ffff_8000_0000;

/// What the engine needs to know about guest symbols.
pub trait KernelSymbols: Send + Sync {
    /// The function containing `addr`: (name, start, end).
    fn function_at(&self, addr: u64) -> Option<(String, u64, u64)>;
    /// Why `addr` must not be probed, if it must not.
    fn blacklisted(&self, _addr: u64) -> Option<String> {
        None
    }
    /// `sym+0x5/0x40` for `addr`.
    fn describe(&self, addr: u64) -> Option<String> {
        self.function_at(addr)
            .map(|(n, s, e)| format!("{n}+{:#x}/{:#x}", addr - s, e - s))
    }
    /// `[start, end)` kernel-text ranges the guest never executes (padding
    /// between functions): room for out-of-line instruction slots.
    fn scratch_ranges(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Where Linux keeps the current task and its name (for `$comm`).
    fn task_layout(&self) -> Option<TaskLayout> {
        None
    }
    /// Whether `addr` is inside kernel text the guest runs (a sized text
    /// symbol), like Linux's `kernel_text_address()`; None when there is no
    /// symbol information to say (raw addresses are then taken on trust,
    /// with the page-table checks only).
    fn is_kernel_text(&self, _addr: u64) -> Option<bool> {
        None
    }
    /// The kernel text the guest frees once it has booted, if it has any.
    fn init_text(&self) -> Option<InitText> {
        None
    }
}

/// Kernel text the guest frees when it has booted: Linux's `__init` code,
/// `[__init_begin, __init_end)`, which `free_initmem()` poisons with 0xcc and
/// gives to the page allocator. `kernel_init()` sets `system_state` to
/// SYSTEM_FREEING_INITMEM before it frees anything, and nothing runs init
/// code after that, so a probe there is gone from that moment: from then on
/// hvprobe writes nothing into the range (no restore, no plant, no
/// snapshot overlay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitText {
    pub start: u64,
    pub end: u64,
    /// Virtual address of the kernel's `system_state` (an `enum`, 4 bytes).
    pub system_state: u64,
}

impl InitText {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// Linux's `enum system_states`: SYSTEM_BOOTING, SYSTEM_SCHEDULING, then
/// SYSTEM_FREEING_INITMEM (2), SYSTEM_RUNNING, ...
pub const SYSTEM_FREEING_INITMEM: u32 = 2;

/// No symbols known: no boundary, entry or blacklist checks are possible.
pub struct NoSymbols;

impl KernelSymbols for NoSymbols {
    fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
        None
    }
}

/// Function bounds, `sym+off/size` and the kprobe blacklist from a symbol
/// table (vmlinux ELF, System.map, kallsyms).
pub struct SymbolIndex {
    pub table: SymbolTable,
    pub blacklist: Option<Blacklist>,
}

impl SymbolIndex {
    pub fn new(table: SymbolTable, blacklist: Option<Blacklist>) -> Self {
        Self { table, blacklist }
    }

    /// A kernel-text byte the guest never executes, for the kretprobe return
    /// trap: padding after a function whose size the ELF records, before the
    /// next symbol. None when sizes are unknown (System.map, kallsyms).
    pub fn return_trap_candidate(&self) -> Option<u64> {
        let syms = self.table.symbols();
        syms.windows(2).find_map(|w| {
            let size = w[0].size?;
            let end = w[0].addr + size;
            (w[0].is_text() && size > 0 && end < w[1].addr && w[1].addr - end < 64)
                .then_some(end)
                .filter(|a| !self.in_init(*a))
                .filter(|a| {
                    self.blacklist
                        .as_ref()
                        .is_none_or(|b| b.contains(*a).is_none())
                })
        })
    }

    /// Linux's init text, `[__init_begin, __init_end)`, which the guest
    /// frees once booted (link-time addresses).
    pub fn init_range(&self) -> Option<(u64, u64)> {
        let start = self.table.lookup("__init_begin").ok()?;
        let end = self.table.lookup("__init_end").ok()?;
        (start < end).then_some((start, end))
    }

    fn in_init(&self, addr: u64) -> bool {
        self.init_range()
            .is_some_and(|(s, e)| addr >= s && addr < e)
    }
}

impl KernelSymbols for SymbolIndex {
    fn function_at(&self, addr: u64) -> Option<(String, u64, u64)> {
        let (start, end) = self.table.function_bounds(addr)?;
        let name = self.table.describe(addr)?.name;
        Some((name, start, end))
    }

    fn blacklisted(&self, addr: u64) -> Option<String> {
        let e = self.blacklist.as_ref()?.contains(addr)?;
        Some(format!("inside {} (kprobe blacklist)", e.what))
    }

    fn describe(&self, addr: u64) -> Option<String> {
        self.table.describe(addr).map(|s| s.to_string())
    }

    fn is_kernel_text(&self, addr: u64) -> Option<bool> {
        if self.table.symbols().is_empty() {
            return None;
        }
        Some(self.table.function_bounds(addr).is_some())
    }

    fn scratch_ranges(&self) -> Vec<(u64, u64)> {
        // Padding between a sized function and the next symbol is never run.
        self.table
            .symbols()
            .windows(2)
            .filter_map(|w| {
                let end = w[0].addr + w[0].size?;
                (w[0].is_text() && end < w[1].addr && w[1].addr - end < 4096)
                    .then_some((end, w[1].addr))
            })
            .filter(|r| {
                self.blacklist
                    .as_ref()
                    .is_none_or(|b| b.contains(r.0).is_none())
            })
            // Never in text the guest frees.
            .filter(|r| !self.in_init(r.0) && !self.in_init(r.1 - 1))
            .collect()
    }

    fn init_text(&self) -> Option<InitText> {
        let (start, end) = self.init_range()?;
        Some(InitText {
            start,
            end,
            system_state: self.table.lookup("system_state").ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_symbols::Symbol;

    fn sym(name: &str, addr: u64, size: Option<u64>) -> Symbol {
        Symbol {
            name: name.into(),
            addr,
            kind: 'T',
            size,
            module: None,
        }
    }

    #[test]
    fn bounds_describe_and_trap() {
        let t = SymbolTable::new(vec![
            sym("a", 0x1000, Some(0x10)),
            sym("b", 0x1020, Some(0x20)),
            sym("c", 0x1040, Some(0x8)),
        ]);
        let s = SymbolIndex::new(t, None);
        assert_eq!(s.function_at(0x1025), Some(("b".into(), 0x1020, 0x1040)));
        assert_eq!(s.return_trap_candidate(), Some(0x1010));
        assert!(s.describe(0x1025).unwrap().starts_with("b+0x5"));
        assert_eq!(s.blacklisted(0x1025), None);
    }
}
