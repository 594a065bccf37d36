//! x86-64 register names accepted by kprobe fetch args: exactly the fields of
//! the kernel's `struct pt_regs` that `regs_query_register_offset()` knows.

use std::fmt;

/// A register of x86-64 `struct pt_regs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Reg {
    R15,
    R14,
    R13,
    R12,
    R11,
    R10,
    R9,
    R8,
    Bx,
    Cx,
    Dx,
    Si,
    Di,
    Bp,
    Ax,
    /// The syscall number / error code slot of pt_regs.
    OrigAx,
    Ip,
    Cs,
    Flags,
    Sp,
    Ss,
}

const NAMES: &[(&str, Reg)] = &[
    ("r15", Reg::R15),
    ("r14", Reg::R14),
    ("r13", Reg::R13),
    ("r12", Reg::R12),
    ("r11", Reg::R11),
    ("r10", Reg::R10),
    ("r9", Reg::R9),
    ("r8", Reg::R8),
    ("bx", Reg::Bx),
    ("cx", Reg::Cx),
    ("dx", Reg::Dx),
    ("si", Reg::Si),
    ("di", Reg::Di),
    ("bp", Reg::Bp),
    ("ax", Reg::Ax),
    ("orig_ax", Reg::OrigAx),
    ("ip", Reg::Ip),
    ("cs", Reg::Cs),
    ("flags", Reg::Flags),
    ("sp", Reg::Sp),
    ("ss", Reg::Ss),
];

impl Reg {
    /// All registers, in pt_regs order.
    pub fn all() -> impl Iterator<Item = Reg> {
        NAMES.iter().map(|(_, r)| *r)
    }

    /// Looks a name up exactly as the kernel does (no `%`, case-sensitive).
    pub fn from_name(name: &str) -> Option<Reg> {
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
    }

    /// The kernel's name (`"di"`, `"r8"`, `"flags"`).
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, r)| *r == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// For a name the kernel rejects but a user plausibly meant (`rdi`,
    /// `edi`, `rip`, `r8d`, `eflags`), the pt_regs register it belongs to.
    /// Used only to suggest the right spelling in errors.
    pub fn suggest(name: &str) -> Option<Reg> {
        let lower = name.to_ascii_lowercase();
        if let Some(r) = Reg::from_name(&lower) {
            return Some(r);
        }
        if lower == "eflags" || lower == "rflags" {
            return Some(Reg::Flags);
        }
        // r8d/r8w/r8b -> r8
        if lower.starts_with('r') && lower.len() > 2 {
            let trimmed = lower.trim_end_matches(['d', 'w', 'b']);
            if let Some(r) = Reg::from_name(trimmed) {
                return Some(r);
            }
        }
        // rax/eax -> ax, rdi/edi -> di
        if let Some(rest) = lower.strip_prefix('r').or_else(|| lower.strip_prefix('e')) {
            if let Some(r) = Reg::from_name(rest) {
                return Some(r);
            }
        }
        // al/ah -> ax, dil/sil -> di/si, bpl/spl -> bp/sp
        let byte = match lower.as_str() {
            "al" | "ah" => Some(Reg::Ax),
            "bl" | "bh" => Some(Reg::Bx),
            "cl" | "ch" => Some(Reg::Cx),
            "dl" | "dh" => Some(Reg::Dx),
            "sil" => Some(Reg::Si),
            "dil" => Some(Reg::Di),
            "bpl" => Some(Reg::Bp),
            "spl" => Some(Reg::Sp),
            _ => None,
        };
        byte
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in Reg::all() {
            assert_eq!(Reg::from_name(r.name()), Some(r));
        }
        assert_eq!(Reg::all().count(), 21);
    }

    #[test]
    fn kernel_rejects_sub_registers_but_we_suggest() {
        for bad in [
            "rdi", "edi", "eax", "al", "r8d", "rip", "RAX", "eflags", "dil",
        ] {
            assert_eq!(Reg::from_name(bad), None, "{bad}");
            assert!(Reg::suggest(bad).is_some(), "{bad}");
        }
        assert_eq!(Reg::suggest("rdi"), Some(Reg::Di));
        assert_eq!(Reg::suggest("r8d"), Some(Reg::R8));
        assert_eq!(Reg::suggest("xmm0"), None);
    }
}
