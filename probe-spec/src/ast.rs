//! The parsed form of a `kprobe_events` line. `Display` prints the canonical
//! line back, and parsing that line gives the same value.

use std::fmt;

use crate::reg::Reg;

/// A parsed `kprobe_events` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `p ...` or `r ...`: define a probe.
    Add(ProbeDef),
    /// `-:[GRP/]EVENT [ARGS]`: delete a probe.
    Remove(RemoveDef),
}

/// `-:[GRP/]EVENT [ARGS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveDef {
    /// Group, or `None` for "any group" (the kernel matches any then).
    pub group: Option<String>,
    /// Event name.
    pub event: String,
    /// Optional trailing words: the probe is deleted only if its definition
    /// starts with these (kernel: `trace_probe_match_command_args`).
    pub match_args: Vec<String>,
}

/// Kind of probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum ProbeKind {
    /// `p`: kprobe.
    Kprobe,
    /// `r[MAXACTIVE]`: kretprobe.
    Kretprobe {
        /// Explicit `MAXACTIVE`, if given.
        maxactive: Option<u32>,
    },
}

impl ProbeKind {
    /// True for return probes.
    pub fn is_return(self) -> bool {
        matches!(self, ProbeKind::Kretprobe { .. })
    }
}

/// Where a probe is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum ProbeTarget {
    /// `[MOD:]SYM[+offs]`.
    Symbol {
        /// Module, `None` for vmlinux.
        module: Option<String>,
        /// Symbol name.
        symbol: String,
        /// Offset from the symbol.
        offset: u64,
    },
    /// `MEMADDR`.
    Address(u64),
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeTarget::Symbol {
                module,
                symbol,
                offset,
            } => {
                if let Some(m) = module {
                    write!(f, "{m}:")?;
                }
                write!(f, "{symbol}")?;
                if *offset != 0 {
                    write!(f, "+{offset}")?;
                }
                Ok(())
            }
            ProbeTarget::Address(a) => write!(f, "0x{a:x}"),
        }
    }
}

/// A probe definition (`p` or `r` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeDef {
    /// kprobe or kretprobe.
    pub kind: ProbeKind,
    /// Group (`kprobes` by default).
    pub group: String,
    /// Event name (generated `p_SYM_OFFS`/`r_SYM_OFFS` if not given).
    pub event: String,
    /// The event name was generated.
    pub event_generated: bool,
    /// Probe point.
    pub target: ProbeTarget,
    /// `%hw` on the probe point: a debug-register breakpoint instead of an
    /// `int3` (hvprobe's own suffix; guest text is never written).
    pub hardware: bool,
    /// Fetch arguments.
    pub args: Vec<FetchArg>,
}

impl ProbeDef {
    /// `GROUP/EVENT`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.group, self.event)
    }

    /// Whether the probe is at a function entry as far as the grammar can
    /// tell (a symbol with offset 0). The kernel asks kallsyms; an engine that
    /// knows better may still accept `$argN` elsewhere.
    pub fn is_function_entry(&self) -> bool {
        matches!(self.target, ProbeTarget::Symbol { offset: 0, .. })
    }

    /// 0-based indices of the function arguments (`$argN`, resolved named
    /// parameters) that a return probe must save at function entry.
    pub fn entry_arg_indices(&self) -> Vec<u32> {
        let mut v = Vec::new();
        for a in &self.args {
            a.expr.visit(&mut |e| {
                if let FetchExpr::Arg(n) = e {
                    v.push(n - 1);
                }
            });
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// True if any argument still has an unresolved DWARF name.
    pub fn has_unresolved_names(&self) -> bool {
        self.args.iter().any(|a| {
            let mut found = false;
            a.expr
                .visit(&mut |e| found |= matches!(e, FetchExpr::Named(_)));
            found
        })
    }
}

impl fmt::Display for ProbeDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ProbeKind::Kprobe => f.write_str("p")?,
            ProbeKind::Kretprobe { maxactive } => {
                f.write_str("r")?;
                if let Some(m) = maxactive {
                    write!(f, "{m}")?;
                }
            }
        }
        write!(f, ":{}/{} {}", self.group, self.event, self.target)?;
        if self.hardware {
            f.write_str("%hw")?;
        }
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// One fetch argument: `NAME=FETCHARG[:TYPE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchArg {
    /// Field name (given, derived from a plain DWARF name, or `argN`).
    pub name: String,
    /// The name was generated (`argN`) or derived, not written by the user.
    pub name_generated: bool,
    /// What to fetch.
    pub expr: FetchExpr,
    /// How to store and print it.
    pub ty: FetchType,
}

impl FetchArg {
    /// Reads the return value (`$retval`, `$retval->x`): a return probe
    /// fetches it at return; every other argument is fetched at entry.
    pub fn uses_retval(&self) -> bool {
        let mut r = false;
        self.expr.visit(&mut |e| {
            r |= matches!(e, FetchExpr::Retval)
                || matches!(e, FetchExpr::Named(n) if matches!(n.base, NamedBase::Retval));
        });
        r
    }
}

impl fmt::Display for FetchArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A generated name is generated again from the same text and index.
        if !self.name_generated {
            write!(f, "{}=", self.name)?;
        }
        write!(f, "{}", self.expr)?;
        if self.ty.explicit {
            write!(f, ":{}", self.ty)?;
        }
        Ok(())
    }
}

/// A fetch expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchExpr {
    /// `%REG`.
    Reg(Reg),
    /// `@ADDR`: memory at an absolute address.
    Mem(u64),
    /// `@SYM[+|-offs]`: memory at a symbol's address plus offset.
    SymMem {
        /// Symbol (may carry `MOD:`).
        symbol: String,
        /// Signed offset.
        offset: i64,
        /// Address of symbol plus offset, once resolved.
        resolved: Option<u64>,
    },
    /// `$stackN`: the N-th entry of the kernel stack.
    Stack(u32),
    /// `$stack`: the stack pointer.
    StackPtr,
    /// `$argN` (N from 1): the N-th function argument.
    Arg(u32),
    /// `$retval`.
    Retval,
    /// `$comm`.
    Comm,
    /// `\IMM`.
    Imm(u64),
    /// `\"STRING"`.
    ImmStr(String),
    /// `[+|-][u]OFFS(EXPR)`: memory at EXPR + OFFS (`u`: user memory).
    Deref {
        /// Signed offset.
        offset: i64,
        /// User-space dereference.
        user: bool,
        /// Address expression.
        inner: Box<FetchExpr>,
    },
    /// A DWARF-named form, not yet resolved (see [`crate::resolve_names`]).
    Named(NamedExpr),
}

impl FetchExpr {
    /// Calls `f` on this expression and every nested one.
    pub fn visit(&self, f: &mut dyn FnMut(&FetchExpr)) {
        f(self);
        if let FetchExpr::Deref { inner, .. } = self {
            inner.visit(f);
        }
    }

    /// Mutable variant of [`visit`](Self::visit).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&mut FetchExpr)) {
        f(self);
        if let FetchExpr::Deref { inner, .. } = self {
            inner.visit_mut(f);
        }
    }

    /// True when the outermost operation reads memory (what the kernel calls
    /// a DEREF op): only those can be stored as strings or arrays.
    pub fn is_memory(&self) -> bool {
        matches!(
            self,
            FetchExpr::Mem(_) | FetchExpr::SymMem { .. } | FetchExpr::Deref { .. }
        )
    }
}

impl fmt::Display for FetchExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchExpr::Reg(r) => write!(f, "%{r}"),
            FetchExpr::Mem(a) => write!(f, "@0x{a:x}"),
            FetchExpr::SymMem { symbol, offset, .. } => {
                write!(f, "@{symbol}")?;
                match *offset {
                    0 => Ok(()),
                    o if o < 0 => write!(f, "-{}", o.unsigned_abs()),
                    o => write!(f, "+{o}"),
                }
            }
            FetchExpr::Stack(n) => write!(f, "$stack{n}"),
            FetchExpr::StackPtr => f.write_str("$stack"),
            FetchExpr::Arg(n) => write!(f, "$arg{n}"),
            FetchExpr::Retval => f.write_str("$retval"),
            FetchExpr::Comm => f.write_str("$comm"),
            FetchExpr::Imm(v) => write!(f, "\\0x{v:x}"),
            FetchExpr::ImmStr(s) => write!(f, "\\\"{s}\""),
            FetchExpr::Deref {
                offset,
                user,
                inner,
            } => {
                let sign = if *offset < 0 { "-" } else { "+" };
                let u = if *user { "u" } else { "" };
                write!(f, "{sign}{u}{}({inner})", offset.unsigned_abs())
            }
            FetchExpr::Named(n) => write!(f, "{n}"),
        }
    }
}

/// Start of a DWARF-named form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedBase {
    /// A parameter of the probed function, by name (`path`).
    Param(String),
    /// `$argN` used with member access (`$arg1->f_path`), N from 1.
    Arg(u32),
    /// `$retval` used with member access.
    Retval,
}

/// One `->member` or `.member` step.
#[derive(Debug, Clone, Eq)]
pub struct MemberStep {
    /// `->` (through a pointer) rather than `.`.
    pub arrow: bool,
    /// Member name.
    pub name: String,
    /// Byte position of the step's operator within the argument body, for errors.
    pub pos: usize,
}

impl PartialEq for MemberStep {
    /// Positions are only for error messages: two steps are equal when they
    /// access the same member the same way.
    fn eq(&self, other: &Self) -> bool {
        self.arrow == other.arrow && self.name == other.name
    }
}

/// A DWARF-named fetch form: `file->f_path.dentry`, `$arg2->name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedExpr {
    /// What it starts from.
    pub base: NamedBase,
    /// Member accesses, in order.
    pub path: Vec<MemberStep>,
}

impl fmt::Display for NamedExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.base {
            NamedBase::Param(p) => f.write_str(p)?,
            NamedBase::Arg(n) => write!(f, "$arg{n}")?,
            NamedBase::Retval => f.write_str("$retval")?,
        }
        for s in &self.path {
            write!(f, "{}{}", if s.arrow { "->" } else { "." }, s.name)?;
        }
        Ok(())
    }
}

/// Base storage type of a fetch argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum BaseType {
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    X8,
    X16,
    X32,
    X64,
    /// `char`: one byte printed as a character.
    Char,
    /// `string`: NUL-terminated kernel string.
    String,
    /// `ustring`: NUL-terminated user-space string.
    UString,
    /// `symbol`: an address printed as `sym+off/size`.
    Symbol,
    /// `symstr`: an address stored as the symbol's text.
    SymStr,
}

const TYPE_NAMES: &[(&str, BaseType)] = &[
    ("u8", BaseType::U8),
    ("u16", BaseType::U16),
    ("u32", BaseType::U32),
    ("u64", BaseType::U64),
    ("s8", BaseType::S8),
    ("s16", BaseType::S16),
    ("s32", BaseType::S32),
    ("s64", BaseType::S64),
    ("x8", BaseType::X8),
    ("x16", BaseType::X16),
    ("x32", BaseType::X32),
    ("x64", BaseType::X64),
    ("char", BaseType::Char),
    ("string", BaseType::String),
    ("ustring", BaseType::UString),
    ("symbol", BaseType::Symbol),
    ("symstr", BaseType::SymStr),
];

impl BaseType {
    /// Looks up a type name as written in definitions.
    pub fn from_name(name: &str) -> Option<BaseType> {
        TYPE_NAMES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// The name as written in definitions.
    pub fn name(self) -> &'static str {
        TYPE_NAMES
            .iter()
            .find(|(_, t)| *t == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// Size in bytes of the stored value (for strings: of the pointer read
    /// when they form arrays).
    pub fn size(self) -> usize {
        use BaseType::*;
        match self {
            U8 | S8 | X8 | Char => 1,
            U16 | S16 | X16 => 2,
            U32 | S32 | X32 => 4,
            U64 | S64 | X64 | Symbol | String | UString | SymStr => 8,
        }
    }

    /// `string`, `ustring` or `symstr`.
    pub fn is_string(self) -> bool {
        matches!(
            self,
            BaseType::String | BaseType::UString | BaseType::SymStr
        )
    }

    /// Unsigned type of a given byte size (for bitfield containers).
    pub(crate) fn unsigned_of_bits(bits: u32) -> Option<BaseType> {
        match bits {
            8 => Some(BaseType::U8),
            16 => Some(BaseType::U16),
            32 => Some(BaseType::U32),
            64 => Some(BaseType::U64),
            _ => None,
        }
    }
}

/// `b<width>@<offset>/<container-bits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Bitfield {
    /// Width in bits (1..).
    pub width: u32,
    /// Offset of the lowest bit in the container.
    pub offset: u32,
    /// Container size in bits: 8, 16, 32 or 64.
    pub container: u32,
}

/// The full type of a fetch argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchType {
    /// Storage type (for bitfields: the unsigned container type).
    pub base: BaseType,
    /// `TYPE[N]`: number of elements.
    pub array: Option<u32>,
    /// Bitfield extraction, if `b...` was given.
    pub bitfield: Option<Bitfield>,
    /// The type was written in the definition (not defaulted).
    pub explicit: bool,
}

impl FetchType {
    /// The default type (`x64` on x86-64, as the kernel's `DEFAULT_FETCH_TYPE`).
    pub fn default_type() -> Self {
        FetchType {
            base: BaseType::X64,
            array: None,
            bitfield: None,
            explicit: false,
        }
    }
}

impl fmt::Display for FetchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bitfield {
            Some(b) => write!(f, "b{}@{}/{}", b.width, b.offset, b.container)?,
            None => f.write_str(self.base.name())?,
        }
        if let Some(n) = self.array {
            write!(f, "[{n}]")?;
        }
        Ok(())
    }
}
