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
    /// Instructions the kernel rewrites at run time, sorted by start.
    patched: Vec<BlacklistEntry>,
}

/// A jump label (`struct jump_entry`, x86-64 with relative entries): `s32
/// code; s32 target; long key`, `code` relative to its own field.
const JUMP_ENTRY_SIZE: usize = 16;
/// A static call site (`struct static_call_site`): `s32 addr; s32 key`.
const STATIC_CALL_SITE_SIZE: usize = 8;

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
        Blacklist {
            functions,
            ranges,
            patched: Vec::new(),
        }
    }

    /// Also refuse the instructions the kernel rewrites while it runs, as
    /// Linux's `jump_label_text_reserved()` and `static_call_text_reserved()`
    /// do: every jump label (static key) site and static call site listed in
    /// the image's `__jump_table` and `.static_call_sites`. The kernel
    /// patches them with text_poke and checks their bytes first (a jump
    /// label that does not hold the jmp or nop it expects is a BUG), so an
    /// int3 there would crash the guest the next time the key flips. Tables
    /// the image lacks are skipped.
    pub fn with_patched_sites<M: GuestMemory>(mut self, image: &M, syms: &SymbolTable) -> Self {
        let table = |start: &str, stop: &str, size: usize| -> Vec<(u64, Vec<u8>)> {
            let (Ok(a), Ok(b)) = (syms.lookup(start), syms.lookup(stop)) else {
                return Vec::new();
            };
            let len = b.saturating_sub(a);
            if len == 0 || len % size as u64 != 0 || len > 1 << 24 {
                return Vec::new();
            }
            let mut raw = vec![0u8; len as usize];
            if image.read_virt(a, &mut raw).is_err() {
                return Vec::new();
            }
            raw.chunks_exact(size)
                .enumerate()
                .map(|(i, c)| (a + (i * size) as u64, c.to_vec()))
                .collect()
        };
        let site = |entry: u64, raw: &[u8]| {
            let rel = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            entry.wrapping_add(rel as i64 as u64)
        };
        let mut patched = Vec::new();
        for (entry, raw) in table(
            "__start___jump_table",
            "__stop___jump_table",
            JUMP_ENTRY_SIZE,
        ) {
            let code = site(entry, &raw);
            // A 2-byte jmp or nop (`eb xx`, `66 90`), else the 5-byte form.
            let mut op = [0u8; 1];
            let len = match image.read_virt(code, &mut op) {
                Ok(()) if op[0] == 0xeb || op[0] == 0x66 => 2,
                _ => 5,
            };
            patched.push(BlacklistEntry {
                start: code,
                end: code + len,
                what: "a jump label (static key) site the kernel patches at run time".into(),
            });
        }
        for (entry, raw) in table(
            "__start_static_call_sites",
            "__stop_static_call_sites",
            STATIC_CALL_SITE_SIZE,
        ) {
            let call = site(entry, &raw);
            patched.push(BlacklistEntry {
                start: call,
                end: call + 5,
                what: "a static call site the kernel patches at run time".into(),
            });
        }
        patched.sort_by_key(|e| e.start);
        patched.dedup_by_key(|e| e.start);
        self.patched = patched;
        self
    }

    /// How many run-time patched sites are refused.
    pub fn patched_sites(&self) -> usize {
        self.patched.len()
    }

    /// The entry refusing `addr`, if any.
    pub fn contains(&self, addr: u64) -> Option<&BlacklistEntry> {
        let i = self.functions.partition_point(|e| e.start <= addr);
        i.checked_sub(1)
            .map(|i| &self.functions[i])
            .filter(|e| addr < e.end)
            .or_else(|| self.ranges.iter().find(|r| r.start <= addr && addr < r.end))
            .or_else(|| {
                let i = self.patched.partition_point(|e| e.start <= addr);
                i.checked_sub(1)
                    .map(|i| &self.patched[i])
                    .filter(|e| addr < e.end)
            })
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
            patched: mv(&self.patched),
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

    #[test]
    fn jump_labels_and_static_calls_are_refused() {
        let syms = SymbolTable::new(vec![
            s("f", 0x1000, 'T', Some(0x40)),
            s("__start___jump_table", 0x9000, 'D', None),
            s("__stop___jump_table", 0x9020, 'D', None),
            s("__start_static_call_sites", 0x9020, 'D', None),
            s("__stop_static_call_sites", 0x9028, 'D', None),
        ]);
        // The image: text at 0x1000 (a nop5 jump label at 0x1010, a 2-byte
        // jmp label at 0x1020, a static call at 0x1030), tables at 0x9000.
        let mut image = vec![0x90u8; 0x9028 - 0x1000];
        image[0x10..0x15].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        image[0x20..0x22].copy_from_slice(&[0xeb, 0x05]);
        let entry = |at: u64, code: u64| (code as i64 - at as i64) as i32;
        let mut put = |off: u64, v: i32| {
            let o = (off - 0x1000) as usize;
            image[o..o + 4].copy_from_slice(&v.to_le_bytes());
        };
        put(0x9000, entry(0x9000, 0x1010));
        put(0x9010, entry(0x9010, 0x1020));
        put(0x9020, entry(0x9020, 0x1030));
        let mem = SliceMemory {
            base: 0x1000,
            bytes: &image,
        };
        let bl = Blacklist::from_entries(&syms, &[]).with_patched_sites(&mem, &syms);
        assert_eq!(bl.patched_sites(), 3);
        assert!(bl.contains(0x1010).unwrap().what.contains("jump label"));
        assert!(bl.contains(0x1014).is_some());
        assert!(bl.contains(0x1015).is_none());
        assert!(bl.contains(0x1021).is_some());
        assert!(bl.contains(0x1022).is_none(), "the 2-byte form is 2 bytes");
        assert!(bl.contains(0x1034).unwrap().what.contains("static call"));
        assert!(bl.contains(0x100f).is_none());
        assert!(bl.slid(0x1000).contains(0x2010).is_some());
    }
}
