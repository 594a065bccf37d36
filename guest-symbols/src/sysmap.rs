//! System.map and `/proc/kallsyms` text: `ADDR TYPE NAME [MODULE]` per line.

use crate::table::{Symbol, SymbolTable};
use std::path::Path;

/// A System.map / kallsyms text that could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum MapParseError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: {reason}: `{text}`")]
    BadLine {
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("no symbols in input")]
    Empty,
}

/// Read a System.map or a saved `/proc/kallsyms` from a file.
pub fn load_system_map(path: impl AsRef<Path>) -> Result<SymbolTable, MapParseError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| MapParseError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_system_map(&String::from_utf8_lossy(&bytes))
}

/// Parse System.map or `/proc/kallsyms` text. Module symbols keep their
/// module name; an unprivileged dump (all addresses zero) parses, and its
/// table reports [`SymbolTable::addresses_hidden`].
pub fn parse_system_map(text: &str) -> Result<SymbolTable, MapParseError> {
    let mut syms = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason| MapParseError::BadLine {
            line: n + 1,
            reason,
            text: line.chars().take(120).collect(),
        };
        let mut f = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            return Err(bad("expected `ADDRESS TYPE NAME`"));
        };
        let module = match f.next() {
            None => None,
            Some(m) => {
                let inner = m
                    .strip_prefix('[')
                    .and_then(|m| m.strip_suffix(']'))
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| bad("trailing text is not a `[module]`"))?;
                Some(inner.to_string())
            }
        };
        if f.next().is_some() {
            return Err(bad("too many fields"));
        }
        if addr.len() > 16 {
            return Err(bad("address longer than 64 bits"));
        }
        let addr = u64::from_str_radix(addr, 16).map_err(|_| bad("address is not hex"))?;
        let mut kc = kind.chars();
        let kind = match (kc.next(), kc.next()) {
            (Some(c), None) if c.is_ascii_alphabetic() || c == '?' => c,
            _ => return Err(bad("type is not a single letter")),
        };
        syms.push(Symbol {
            name: name.to_string(),
            addr,
            kind,
            size: None,
            module,
        });
    }
    if syms.is_empty() {
        return Err(MapParseError::Empty);
    }
    Ok(SymbolTable::new(syms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_lines() {
        let t = parse_system_map(
            "ffffffff81000000 T _text\nffffffff81000000 T startup_64\n\
             ffffffff81001000 t helper\n0000000000000000 A fixed_percpu_data\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.lookup("helper"), Ok(0xffff_ffff_8100_1000));
        assert_eq!(t.describe(0xffff_ffff_8100_0010).unwrap().offset, 0x10);
    }

    #[test]
    fn kallsyms_with_modules() {
        let t = parse_system_map(
            "ffffffff81000000 T _text\nffffffffc0a01000 t ext4_foo\t[ext4]\n\
             ffffffffc0a02000 T ext4_bar\t[ext4]\n",
        )
        .unwrap();
        let s = t.all_named("ext4_foo").next().unwrap();
        assert_eq!(s.module.as_deref(), Some("ext4"));
        assert_eq!(
            t.describe(0xffff_ffff_c0a0_1004).unwrap().to_string(),
            "ext4_foo+0x4/0x1000 [ext4]"
        );
    }

    #[test]
    fn hidden_kallsyms() {
        let t = parse_system_map("0000000000000000 T _text\n0000000000000000 t foo [m]\n").unwrap();
        assert!(t.addresses_hidden());
    }

    #[test]
    fn garbage_is_an_error_with_line() {
        for (text, line) in [
            ("ffffffff81000000 T a\nzzzz T b\n", 2),
            ("ffffffff81000000 TT a\n", 1),
            ("ffffffff81000000\n", 1),
            (
                "ffffffffffffffff B The real System.map is in the dbg package\n",
                1,
            ),
            ("ffffffff81000000 T a [\n", 1),
            ("1ffffffff81000000 T a\n", 1),
        ] {
            match parse_system_map(text) {
                Err(MapParseError::BadLine { line: l, .. }) => assert_eq!(l, line, "{text}"),
                r => panic!("{text}: {r:?}"),
            }
        }
        assert!(matches!(
            parse_system_map("\n\n"),
            Err(MapParseError::Empty)
        ));
    }

    #[test]
    fn truncated_last_line() {
        assert!(parse_system_map("ffffffff81000000 T _text\nffffffff8100").is_err());
    }
}
