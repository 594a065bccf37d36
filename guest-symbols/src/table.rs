//! The symbol table every source (System.map, kallsyms text, ELF, decoded
//! kallsyms tables) is turned into, and the lookups on it.

use std::collections::HashMap;
use std::fmt;

/// One kernel symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub addr: u64,
    /// nm-style type letter (`T`, `t`, `D`, `W`, ...).
    pub kind: char,
    /// Size in bytes when the source knows it (ELF); `None` for System.map
    /// and kallsyms, where the size is taken from the next symbol.
    pub size: Option<u64>,
    /// Module name for `/proc/kallsyms` lines such as `... [ext4]`.
    pub module: Option<String>,
}

impl Symbol {
    /// A symbol of the kernel proper (no module).
    pub fn new(name: impl Into<String>, addr: u64, kind: char, size: Option<u64>) -> Self {
        Symbol {
            name: name.into(),
            addr,
            kind,
            size,
            module: None,
        }
    }

    /// Text (code) symbol: `T`/`t`, or weak `W`/`w` as nm prints functions.
    pub fn is_text(&self) -> bool {
        matches!(self.kind, 'T' | 't' | 'W' | 'w')
    }
}

/// Why a name did not resolve to exactly one address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("symbol `{0}` not found")]
    NotFound(String),
    /// Several symbols share the name (static functions in different files,
    /// or several compiler clones); the candidates are listed.
    #[error("symbol `{name}` is ambiguous: {}", fmt_candidates(.candidates))]
    Ambiguous {
        name: String,
        candidates: Vec<(String, u64)>,
    },
    /// The table came from a `/proc/kallsyms` read without privilege: every
    /// address is zero.
    #[error("symbol addresses are hidden (all zero, kallsyms read without CAP_SYSLOG)")]
    AddressesHidden,
}

fn fmt_candidates(c: &[(String, u64)]) -> String {
    c.iter()
        .map(|(n, a)| format!("{n}@{a:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How [`SymbolTable::lookup_with`] treats compiler-generated name suffixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VariantMatch {
    /// Only the exact name.
    #[default]
    Exact,
    /// The exact name, or if absent, its clones `name.isra.N`,
    /// `name.constprop.N`, `name.part.N`, `name.cold` (and combinations);
    /// several clones are reported as ambiguous.
    CompilerClones,
}

/// `sym+off` inside a known symbol, as `describe` reports an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymOff {
    pub name: String,
    pub offset: u64,
    /// Bytes from the symbol's start to its end (ELF size or next symbol).
    pub size: u64,
    pub module: Option<String>,
}

impl fmt::Display for SymOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}/{:#x}", self.name, self.offset, self.size)?;
        if let Some(m) = &self.module {
            write!(f, " [{m}]")?;
        }
        Ok(())
    }
}

/// A probe location as users write it: `sym`, `sym+0x5`, `sym+12`, or a raw
/// address `0xffffffff81000000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Symbol { name: String, offset: u64 },
    Address(u64),
}

/// Malformed location text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad location `{text}`: {reason}")]
pub struct LocationParseError {
    pub text: String,
    pub reason: &'static str,
}

/// Parse `sym`, `sym+off` (decimal or `0x` hex) or a bare hex address.
pub fn parse_location(text: &str) -> Result<Location, LocationParseError> {
    let err = |reason| LocationParseError {
        text: text.to_string(),
        reason,
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(err("empty"));
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16)
            .map(Location::Address)
            .map_err(|_| err("invalid hex address"));
    }
    let (name, offset) = match t.split_once('+') {
        Some((n, o)) => (n, parse_u64(o).ok_or_else(|| err("invalid offset"))?),
        None => (t, 0),
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$');
    if name.is_empty() || !name.chars().all(valid) || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(err("invalid symbol name"));
    }
    Ok(Location::Symbol {
        name: name.to_string(),
        offset,
    })
}

pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Symbols sorted by address with a name index.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    syms: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    hidden: bool,
}

impl SymbolTable {
    /// Build from any list of symbols (sorted here, stable for equal
    /// addresses so aliases keep source order).
    pub fn new(mut syms: Vec<Symbol>) -> Self {
        syms.sort_by_key(|s| s.addr);
        let hidden = !syms.is_empty() && syms.iter().all(|s| s.addr == 0);
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::with_capacity(syms.len());
        for (i, s) in syms.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        SymbolTable {
            syms,
            by_name,
            hidden,
        }
    }

    pub fn len(&self) -> usize {
        self.syms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// All symbols, by address.
    pub fn symbols(&self) -> &[Symbol] {
        &self.syms
    }

    /// True when every address is zero (unprivileged `/proc/kallsyms`).
    pub fn addresses_hidden(&self) -> bool {
        self.hidden
    }

    /// Every symbol with exactly this name.
    pub fn all_named(&self, name: &str) -> impl Iterator<Item = &Symbol> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &self.syms[i])
    }

    /// Address of `name`; errors when absent or when several distinct
    /// addresses carry the name.
    pub fn lookup(&self, name: &str) -> Result<u64, LookupError> {
        self.lookup_with(name, VariantMatch::Exact)
    }

    /// Like [`lookup`](Self::lookup), optionally falling back to compiler
    /// clones of the name.
    pub fn lookup_with(&self, name: &str, variants: VariantMatch) -> Result<u64, LookupError> {
        if self.hidden {
            return Err(LookupError::AddressesHidden);
        }
        let exact: Vec<&Symbol> = self.all_named(name).collect();
        if !exact.is_empty() {
            return unique(name, exact);
        }
        if variants == VariantMatch::CompilerClones {
            let prefix = format!("{name}.");
            let clones: Vec<&Symbol> = self
                .by_name
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix) && is_clone_suffix(&n[prefix.len()..]))
                .flat_map(|(_, idx)| idx.iter().map(|&i| &self.syms[i]))
                .collect();
            if !clones.is_empty() {
                return unique(name, clones);
            }
        }
        Err(LookupError::NotFound(name.to_string()))
    }

    /// Resolve a parsed [`Location`] to an address.
    pub fn resolve(&self, loc: &Location) -> Result<u64, LookupError> {
        match loc {
            Location::Address(a) => Ok(*a),
            Location::Symbol { name, offset } => Ok(self.lookup(name)?.wrapping_add(*offset)),
        }
    }

    /// The symbol containing `addr` and its extent. Among aliases at the
    /// highest address not above `addr`, one with an ELF size is preferred,
    /// then a text symbol, so `describe` names functions rather than labels.
    fn containing(&self, addr: u64) -> Option<(usize, u64)> {
        if self.hidden {
            return None;
        }
        let end = self.syms.partition_point(|s| s.addr <= addr);
        let base = self.syms.get(end.checked_sub(1)?)?.addr;
        let first = self.syms[..end].partition_point(|s| s.addr < base);
        let rank = |s: &Symbol| (s.size.is_some_and(|z| z > 0), s.is_text());
        let i = (first..end).max_by_key(|&i| rank(&self.syms[i]))?;
        let size = self.extent(i);
        (addr - base < size.max(1)).then_some((i, size))
    }

    /// Size of symbol `i`: its ELF size, else the distance to the next
    /// higher address (0 for the last one).
    fn extent(&self, i: usize) -> u64 {
        let s = &self.syms[i];
        if let Some(sz) = s.size.filter(|&z| z > 0) {
            return sz;
        }
        self.syms[i + 1..]
            .iter()
            .find(|n| n.addr > s.addr)
            .map_or(0, |n| n.addr - s.addr)
    }

    /// `sym+off/size` for an address inside a symbol.
    pub fn describe(&self, addr: u64) -> Option<SymOff> {
        let (i, size) = self.containing(addr)?;
        let s = &self.syms[i];
        Some(SymOff {
            name: s.name.clone(),
            offset: addr - s.addr,
            size,
            module: s.module.clone(),
        })
    }

    /// `[start, end)` of the text symbol containing `addr`, for checking
    /// that a probe address lies inside a known function.
    pub fn function_bounds(&self, addr: u64) -> Option<(u64, u64)> {
        let (i, size) = self.containing(addr)?;
        let s = &self.syms[i];
        (s.is_text() && size > 0).then(|| (s.addr, s.addr + size))
    }

    /// A copy with every address moved by `slide` (KASLR).
    pub fn slid(&self, slide: i64) -> SymbolTable {
        let syms = self
            .syms
            .iter()
            .map(|s| Symbol {
                addr: s.addr.wrapping_add_signed(slide),
                ..s.clone()
            })
            .collect();
        SymbolTable::new(syms)
    }
}

fn unique(name: &str, found: Vec<&Symbol>) -> Result<u64, LookupError> {
    let first = found[0].addr;
    if found.iter().all(|s| s.addr == first) {
        return Ok(first);
    }
    let mut candidates: Vec<(String, u64)> =
        found.iter().map(|s| (s.name.clone(), s.addr)).collect();
    candidates.sort_by_key(|c| c.1);
    candidates.dedup();
    Err(LookupError::Ambiguous {
        name: name.to_string(),
        candidates,
    })
}

/// `isra.0`, `constprop.3.isra.0`, `cold`, `part.5`, `cold.12` ...
fn is_clone_suffix(rest: &str) -> bool {
    let mut parts = rest.split('.').peekable();
    let mut any = false;
    while let Some(p) = parts.next() {
        match p {
            "isra" | "constprop" | "part" | "lto_priv" => {
                let n = parts.next();
                if !n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                    return false;
                }
            }
            "cold" => {
                if parts
                    .peek()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                {
                    parts.next();
                }
            }
            _ => return false,
        }
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SymbolTable {
        SymbolTable::new(vec![
            Symbol::new("b", 0x1010, 't', None),
            Symbol::new("a", 0x1000, 'T', None),
            Symbol::new("c", 0x1100, 'T', None),
            Symbol::new("dup", 0x2000, 't', None),
            Symbol::new("dup", 0x2100, 't', None),
            Symbol::new("f.isra.0", 0x3000, 't', None),
            Symbol::new("g.constprop.0", 0x3100, 't', None),
            Symbol::new("g.isra.1", 0x3200, 't', None),
            Symbol::new("end", 0x4000, 'T', None),
        ])
    }

    #[test]
    fn lookup_exact_ambiguous_and_clones() {
        let t = table();
        assert_eq!(t.lookup("a"), Ok(0x1000));
        assert_eq!(t.lookup("zz"), Err(LookupError::NotFound("zz".into())));
        match t.lookup("dup") {
            Err(LookupError::Ambiguous { candidates, .. }) => assert_eq!(candidates.len(), 2),
            r => panic!("{r:?}"),
        }
        assert!(matches!(t.lookup("f"), Err(LookupError::NotFound(_))));
        assert_eq!(t.lookup_with("f", VariantMatch::CompilerClones), Ok(0x3000));
        assert!(matches!(
            t.lookup_with("g", VariantMatch::CompilerClones),
            Err(LookupError::Ambiguous { .. })
        ));
    }

    #[test]
    fn describe_uses_next_symbol_as_size() {
        let t = table();
        let d = t.describe(0x1005).unwrap();
        assert_eq!((d.name.as_str(), d.offset, d.size), ("a", 5, 0x10));
        assert_eq!(d.to_string(), "a+0x5/0x10");
        assert_eq!(t.describe(0xfff), None);
        assert_eq!(t.function_bounds(0x1020), Some((0x1010, 0x1100)));
    }

    #[test]
    fn describe_respects_elf_size() {
        let t = SymbolTable::new(vec![
            Symbol::new("f", 0x100, 'T', Some(0x10)),
            Symbol::new("g", 0x200, 'T', Some(0x10)),
        ]);
        assert_eq!(t.describe(0x10f).unwrap().name, "f");
        assert_eq!(t.describe(0x110), None);
        assert_eq!(t.function_bounds(0x205), Some((0x200, 0x210)));
    }

    #[test]
    fn hidden_addresses_are_reported() {
        let t = SymbolTable::new(vec![
            Symbol::new("a", 0, 'T', None),
            Symbol::new("b", 0, 'T', None),
        ]);
        assert!(t.addresses_hidden());
        assert_eq!(t.lookup("a"), Err(LookupError::AddressesHidden));
        assert_eq!(t.describe(0), None);
    }

    #[test]
    fn clone_suffixes() {
        for ok in ["isra.0", "constprop.0.isra.0", "cold", "cold.3", "part.2"] {
            assert!(is_clone_suffix(ok), "{ok}");
        }
        for bad in ["", "isra", "isra.x", "foo", "cold.x"] {
            assert!(!is_clone_suffix(bad), "{bad}");
        }
    }

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("do_sys_openat2+0x5").unwrap(),
            Location::Symbol {
                name: "do_sys_openat2".into(),
                offset: 5
            }
        );
        assert_eq!(
            parse_location("vfs_read+12").unwrap(),
            Location::Symbol {
                name: "vfs_read".into(),
                offset: 12
            }
        );
        assert_eq!(
            parse_location("0xffffffff81000000").unwrap(),
            Location::Address(0xffff_ffff_8100_0000)
        );
        for bad in ["", "+5", "f+", "f+0xzz", "0xq", "a b", "1abc"] {
            assert!(parse_location(bad).is_err(), "{bad}");
        }
        let t = table();
        assert_eq!(t.resolve(&parse_location("c+0x10").unwrap()), Ok(0x1110));
    }
}
