//! Where kprobes must not go: the kernel's `_kprobe_blacklist` entries
//! (NOKPROBE_SYMBOL) and the text ranges it refuses as a whole.

use crate::mem::GuestMemory;
use crate::table::SymbolTable;

/// Text ranges Linux (x86, 6.x) refuses outright: `.kprobes.text`, the
/// entry text and `noinstr` text.
const RANGES: &[(&str, &str, &str)] = &[
    (
        "__kprobes_text_start",
        "__kprobes_text_end",
        ".kprobes.text",
    ),
    ("__entry_text_start", "__entry_text_end", "entry text"),
    ("__noinstr_text_start", "__noinstr_text_end", "noinstr text"),
];

/// Why the blacklist could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BlacklistError {
    #[error("symbol table has no `{0}`")]
    MissingSymbol(&'static str),
    #[error("_kprobe_blacklist bounds are inverted or absurd: {start:#x}..{stop:#x}")]
    BadBounds { start: u64, stop: u64 },
    #[error("cannot read _kprobe_blacklist at {addr:#x}: {reason}")]
    Unreadable { addr: u64, reason: String },
}

/// One refused region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlacklistEntry {
    pub start: u64,
    pub end: u64,
    /// Function name, or the range's name (`entry text`, ...).
    pub what: String,
}

/// The kprobe blacklist of one kernel, at link-time addresses unless
/// [`Blacklist::slid`].
#[derive(Debug, Clone, Default)]
pub struct Blacklist {
    functions: Vec<BlacklistEntry>,
    ranges: Vec<BlacklistEntry>,
}

impl Blacklist {
    /// Read `__start_kprobe_blacklist..__stop_kprobe_blacklist` from the
    /// kernel image (the section is init data, freed after boot, so it is
    /// read from the image, not the running guest) and resolve each entry to
    /// its function's bounds with `syms` (ELF symbols give exact sizes).
    pub fn from_image<M: GuestMemory>(
        image: &M,
        syms: &SymbolTable,
    ) -> Result<Self, BlacklistError> {
        let get = |n: &'static str| syms.lookup(n).map_err(|_| BlacklistError::MissingSymbol(n));
        let (start, stop) = (
            get("__start_kprobe_blacklist")?,
            get("__stop_kprobe_blacklist")?,
        );
        let len = stop
            .checked_sub(start)
            .filter(|l| l % 8 == 0 && *l <= 1 << 24);
        let len = len.ok_or(BlacklistError::BadBounds { start, stop })?;
        let mut raw = vec![0u8; len as usize];
        image
            .read_virt(start, &mut raw)
            .map_err(|e| BlacklistError::Unreadable {
                addr: start,
                reason: e.to_string(),
            })?;
        let entries: Vec<u64> = raw
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .collect();
        Ok(Self::from_entries(syms, &entries))
    }

    /// Build from already-read blacklist entry addresses.
    pub fn from_entries(syms: &SymbolTable, entries: &[u64]) -> Self {
        let mut functions: Vec<BlacklistEntry> = entries
            .iter()
            .filter_map(|&a| {
                let (start, end) = syms.function_bounds(a).or_else(|| {
                    // Data or a label without extent: refuse that address only.
                    syms.describe(a).map(|_| (a, a + 1))
                })?;
                let what = syms
                    .describe(start)
                    .map_or_else(|| format!("{a:#x}"), |d| d.name);
                Some(BlacklistEntry { start, end, what })
            })
            .collect();
        functions.sort_by_key(|e| e.start);
        functions.dedup_by_key(|e| e.start);
        let ranges = RANGES
            .iter()
            .filter_map(|&(s, e, what)| {
                let (start, end) = (syms.lookup(s).ok()?, syms.lookup(e).ok()?);
                (end > start).then(|| BlacklistEntry {
                    start,
                    end,
                    what: what.to_string(),
                })
            })
            .collect();
        Blacklist { functions, ranges }
    }

    /// The entry refusing `addr`, if any.
    pub fn contains(&self, addr: u64) -> Option<&BlacklistEntry> {
        let i = self.functions.partition_point(|e| e.start <= addr);
        i.checked_sub(1)
            .map(|i| &self.functions[i])
            .filter(|e| addr < e.end)
            .or_else(|| self.ranges.iter().find(|r| r.start <= addr && addr < r.end))
    }

    pub fn functions(&self) -> &[BlacklistEntry] {
        &self.functions
    }

    pub fn ranges(&self) -> &[BlacklistEntry] {
        &self.ranges
    }

    /// The same list moved by a KASLR slide.
    pub fn slid(&self, slide: i64) -> Blacklist {
        let mv = |v: &[BlacklistEntry]| {
            v.iter()
                .map(|e| BlacklistEntry {
                    start: e.start.wrapping_add_signed(slide),
                    end: e.end.wrapping_add_signed(slide),
                    what: e.what.clone(),
                })
                .collect()
        };
        Blacklist {
            functions: mv(&self.functions),
            ranges: mv(&self.ranges),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::SliceMemory;
    use crate::table::Symbol;

    fn s(name: &str, addr: u64, kind: char, size: Option<u64>) -> Symbol {
        Symbol::new(name, addr, kind, size)
    }

    #[test]
    fn entries_and_ranges() {
        let syms = SymbolTable::new(vec![
            s("f", 0x1000, 'T', Some(0x40)),
            s("g", 0x1100, 't', Some(0x20)),
            s("__entry_text_start", 0x2000, 'T', None),
            s("__entry_text_end", 0x2100, 'T', None),
            s("h", 0x3000, 'T', Some(0x10)),
            s("__start_kprobe_blacklist", 0x9000, 'D', None),
            s("__stop_kprobe_blacklist", 0x9010, 'D', None),
        ]);
        let mut data = Vec::new();
        data.extend_from_slice(&0x1100u64.to_le_bytes());
        data.extend_from_slice(&0x3000u64.to_le_bytes());
        let mem = SliceMemory {
            base: 0x9000,
            bytes: &data,
        };
        let bl = Blacklist::from_image(&mem, &syms).unwrap();
        assert_eq!(bl.contains(0x1105).unwrap().what, "g");
        assert_eq!(bl.contains(0x300f).unwrap().what, "h");
        assert_eq!(bl.contains(0x2050).unwrap().what, "entry text");
        assert!(bl.contains(0x1000).is_none());
        assert!(bl.contains(0x1120).is_none());
        assert!(bl.slid(0x100).contains(0x1205).is_some());
        // Truncated section contents are an error, not a panic.
        let short = SliceMemory {
            base: 0x9000,
            bytes: &data[..12],
        };
        assert!(matches!(
            Blacklist::from_image(&short, &syms),
            Err(BlacklistError::Unreadable { .. })
        ));
    }
}
