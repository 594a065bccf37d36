//! Evaluation of fetch arguments against a stopped vCPU, through
//! [`FetchContext`], and formatting like the kernel's trace output.
//!
//! A guest fault never fails the whole event: the argument becomes
//! [`Value::Fault`] and the other arguments are still fetched.

use std::fmt;

use crate::ast::*;
use crate::reg::Reg;

/// A guest memory read that faulted (page not present, no translation...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Fault {
    /// Guest virtual address that could not be read.
    pub addr: u64,
}

/// Why a value could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum FetchError {
    /// Guest memory fault.
    Fault(Fault),
    /// The context cannot provide it (e.g. `$comm` unknown, unresolved symbol).
    Unavailable(String),
}

impl From<Fault> for FetchError {
    fn from(f: Fault) -> Self {
        FetchError::Fault(f)
    }
}

/// What the evaluator needs from the probed vCPU. Implemented by the probe
/// engine over the VM, and by tests over plain data.
pub trait FetchContext {
    /// Value of a `pt_regs` register at the probe hit.
    fn reg(&self, r: Reg) -> u64;

    /// Reads kernel virtual memory (through the guest's page tables).
    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault>;

    /// Reads user virtual memory of the current task (`+u..()`, `ustring`).
    fn read_user(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.read_kernel(addr, buf)
    }

    /// The current task's name (`$comm`), if known.
    fn comm(&self) -> Option<String> {
        None
    }

    /// `%pS` text for an address (`"vfs_read+0x4/0x1a0"`), if a symbol covers it.
    fn symbolize(&self, _addr: u64) -> Option<String> {
        None
    }

    /// The stack pointer (`$stack`).
    fn stack_pointer(&self) -> u64 {
        self.reg(Reg::Sp)
    }

    /// The return value (`$retval`).
    fn retval(&self) -> u64 {
        self.reg(Reg::Ax)
    }

    /// Function argument `n` (0-based) per the x86-64 kernel ABI, valid at
    /// function entry (`regs_get_kernel_argument`). Return probes answer from
    /// the values saved at entry (see [`EntryArgs`]).
    fn arg(&self, n: u32) -> Result<u64, FetchError> {
        const REGS: [Reg; 6] = [Reg::Di, Reg::Si, Reg::Dx, Reg::Cx, Reg::R8, Reg::R9];
        match REGS.get(n as usize) {
            Some(r) => Ok(self.reg(*r)),
            // The return address is at sp; stack arguments follow it.
            None => read_u64(
                self,
                false,
                self.stack_pointer().wrapping_add(8 * u64::from(n - 5)),
            ),
        }
    }
}

fn read_u64<C: FetchContext + ?Sized>(ctx: &C, user: bool, addr: u64) -> Result<u64, FetchError> {
    let mut b = [0u8; 8];
    read(ctx, user, addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read<C: FetchContext + ?Sized>(
    ctx: &C,
    user: bool,
    addr: u64,
    buf: &mut [u8],
) -> Result<(), Fault> {
    if user {
        ctx.read_user(addr, buf)
    } else {
        ctx.read_kernel(addr, buf)
    }
}

/// Evaluation limits.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Longest string fetched, in bytes, without the NUL (kernel: PATH_MAX - 1).
    pub max_string_len: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_string_len: 4095,
        }
    }
}

/// A fetched, typed value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", rename_all = "snake_case"))]
pub enum Value {
    /// `u8`..`u64` and bitfields.
    Unsigned {
        /// Width in bits.
        bits: u8,
        /// Zero-extended value.
        value: u64,
    },
    /// `s8`..`s64`.
    Signed {
        /// Width in bits.
        bits: u8,
        /// Sign-extended value.
        value: i64,
    },
    /// `x8`..`x64`.
    Hex {
        /// Width in bits.
        bits: u8,
        /// Zero-extended value.
        value: u64,
    },
    /// `char`.
    Char {
        /// The byte.
        value: u8,
    },
    /// `string`, `ustring`, `symstr`, `$comm`, immediate strings.
    Str {
        /// Bytes read, without the NUL.
        #[cfg_attr(feature = "serde", serde(with = "str_bytes"))]
        bytes: Vec<u8>,
        /// Stopped at the length limit before a NUL.
        truncated: bool,
    },
    /// `symbol`.
    Symbol {
        /// The address.
        addr: u64,
        /// `%pS` text, if a symbol covers it.
        name: Option<String>,
    },
    /// `TYPE[N]`.
    Array {
        /// Elements; a faulting element is a `Fault`.
        elements: Vec<Value>,
    },
    /// The guest faulted reading `addr`.
    Fault {
        /// Faulting address.
        addr: u64,
    },
    /// The value cannot be fetched here (reason given).
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// String bytes as a JSON string when they are UTF-8 (readable), else as
/// an array of bytes, so that a value read back is the value written (kept
/// kretprobe instances in snapshots carry their entry values).
#[cfg(feature = "serde")]
mod str_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_seq(b),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(match Either::deserialize(d)? {
            Either::Text(t) => t.into_bytes(),
            Either::Bytes(b) => b,
        })
    }
}

impl Value {
    fn from_error(e: FetchError) -> Value {
        match e {
            FetchError::Fault(f) => Value::Fault { addr: f.addr },
            FetchError::Unavailable(reason) => Value::Unavailable { reason },
        }
    }

    /// True if this value or any array element faulted.
    pub fn is_fault(&self) -> bool {
        match self {
            Value::Fault { .. } => true,
            Value::Array { elements } => elements.iter().any(Value::is_fault),
            _ => false,
        }
    }
}

/// Writes bytes like the kernel's `"%s"`, but escapes control characters and
/// invalid UTF-8 as `\xNN` so a trace line stays one printable line.
fn write_escaped(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        // Printable runs go out whole (one write, not one per character).
        let mut rest = chunk.valid();
        while let Some(at) = rest.find(char::is_control) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                write!(f, "\\x{b:02x}")?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)?;
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Value {
    /// Kernel trace-output format: `%u`, `%d`, `0x%x`, `'%c'`, `"%s"`, `%pS`,
    /// `{a,b}` for arrays, `(fault)` for faults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Unsigned { value, .. } => write!(f, "{value}"),
            Value::Signed { value, .. } => write!(f, "{value}"),
            Value::Hex { value, .. } => write!(f, "0x{value:x}"),
            Value::Char { value } => {
                f.write_str("'")?;
                write_escaped(f, &[*value])?;
                f.write_str("'")
            }
            Value::Str { bytes, .. } => {
                f.write_str("\"")?;
                write_escaped(f, bytes)?;
                f.write_str("\"")
            }
            Value::Symbol { addr, name } => match name {
                Some(n) => f.write_str(n),
                None => write!(f, "0x{addr:x}"),
            },
            Value::Array { elements } => {
                f.write_str("{")?;
                for (i, e) in elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_str("}")
            }
            Value::Fault { .. } => f.write_str("(fault)"),
            Value::Unavailable { .. } => f.write_str("(unavailable)"),
        }
    }
}

/// One evaluated argument.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ArgValue {
    /// Field name.
    pub name: String,
    /// Type as written (`u32`, `string`, `x8[4]`, `b3@4/32`).
    #[cfg_attr(feature = "serde", serde(rename = "type"))]
    pub ty: String,
    /// The value.
    pub value: Value,
}

impl fmt::Display for ArgValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// A trace line like the kernel's: `EVENT: (IP_TEXT) a=1 b="x"`. For return
/// probes pass `"caller+0x1c/0x80 <- func"` as `ip_text`, as the kernel prints.
pub fn format_event_line(event: &str, ip_text: &str, args: &[ArgValue]) -> String {
    let mut s = format!("{event}: ({ip_text})");
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string());
    }
    s
}

/// Evaluates every argument of `def`.
pub fn evaluate<C: FetchContext + ?Sized>(
    def: &ProbeDef,
    ctx: &C,
    opts: &EvalOptions,
) -> Vec<ArgValue> {
    def.args
        .iter()
        .map(|a| evaluate_arg(a, ctx, opts))
        .collect()
}

/// Evaluates one argument.
pub fn evaluate_arg<C: FetchContext + ?Sized>(
    arg: &FetchArg,
    ctx: &C,
    opts: &EvalOptions,
) -> ArgValue {
    ArgValue {
        name: arg.name.clone(),
        ty: arg.ty.to_string(),
        value: evaluate_value(arg, ctx, opts),
    }
}

/// Evaluates one argument's value alone: what a probe hit needs (names and
/// types are the definition's, the same for every hit).
pub fn evaluate_value<C: FetchContext + ?Sized>(
    arg: &FetchArg,
    ctx: &C,
    opts: &EvalOptions,
) -> Value {
    eval_value(&arg.expr, &arg.ty, ctx, opts, Vec::new())
}

/// [`evaluate_value`] that may reuse `old`, a value of an earlier hit that
/// nobody needs any more: a string read into its buffer allocates nothing
/// once the buffer is large enough (a probe hit's steady state).
pub fn evaluate_value_reusing<C: FetchContext + ?Sized>(
    arg: &FetchArg,
    ctx: &C,
    opts: &EvalOptions,
    old: Value,
) -> Value {
    let buf = match old {
        Value::Str { bytes, .. } => bytes,
        _ => Vec::new(),
    };
    eval_value(&arg.expr, &arg.ty, ctx, opts, buf)
}

/// Memory address a memory-reading expression reads from, and whether it is
/// a user-space read.
fn address<C: FetchContext + ?Sized>(
    e: &FetchExpr,
    ctx: &C,
) -> Result<Option<(u64, bool)>, FetchError> {
    Ok(match e {
        FetchExpr::Mem(a) => Some((*a, false)),
        FetchExpr::SymMem {
            resolved, symbol, ..
        } => match resolved {
            Some(a) => Some((*a, false)),
            None => {
                return Err(FetchError::Unavailable(format!(
                    "symbol '{symbol}' not resolved"
                )))
            }
        },
        FetchExpr::Deref {
            offset,
            user,
            inner,
        } => Some((scalar(inner, ctx)?.wrapping_add(*offset as u64), *user)),
        _ => None,
    })
}

/// The 64-bit value of an expression (for memory forms: the u64 at the address).
fn scalar<C: FetchContext + ?Sized>(e: &FetchExpr, ctx: &C) -> Result<u64, FetchError> {
    if let Some((addr, user)) = address(e, ctx)? {
        return read_u64(ctx, user, addr);
    }
    match e {
        FetchExpr::Reg(r) => Ok(ctx.reg(*r)),
        FetchExpr::Stack(n) => read_u64(
            ctx,
            false,
            ctx.stack_pointer().wrapping_add(8 * u64::from(*n)),
        ),
        FetchExpr::StackPtr => Ok(ctx.stack_pointer()),
        FetchExpr::Arg(n) => ctx.arg(n.saturating_sub(1)),
        FetchExpr::Retval => Ok(ctx.retval()),
        FetchExpr::Imm(v) => Ok(*v),
        FetchExpr::Named(n) => Err(FetchError::Unavailable(format!("'{n}' not resolved"))),
        FetchExpr::Comm | FetchExpr::ImmStr(_) => {
            Err(FetchError::Unavailable("not a number".into()))
        }
        FetchExpr::Mem(_) | FetchExpr::SymMem { .. } | FetchExpr::Deref { .. } => {
            Err(FetchError::Unavailable("unreachable memory form".into()))
        }
    }
}

/// `buf`: where a string may be read (its capacity reused).
fn eval_value<C: FetchContext + ?Sized>(
    e: &FetchExpr,
    ty: &FetchType,
    ctx: &C,
    opts: &EvalOptions,
    buf: Vec<u8>,
) -> Value {
    let r = match (ty.base, ty.array) {
        (BaseType::String | BaseType::UString, None) => fetch_string(e, ty.base, ctx, opts, buf),
        (BaseType::String | BaseType::UString, Some(n)) => string_array(e, ty.base, n, ctx, opts),
        (BaseType::SymStr, _) => scalar(e, ctx).map(|v| Value::Str {
            bytes: ctx
                .symbolize(v)
                .unwrap_or_else(|| format!("0x{v:x}"))
                .into_bytes(),
            truncated: false,
        }),
        (_, None) => fetch_sized(e, ty, ctx),
        (_, Some(n)) => scalar_array(e, ty, n, ctx),
    };
    r.unwrap_or_else(Value::from_error)
}

fn fetch_sized<C: FetchContext + ?Sized>(
    e: &FetchExpr,
    ty: &FetchType,
    ctx: &C,
) -> Result<Value, FetchError> {
    let size = ty.base.size();
    let raw = match address(e, ctx)? {
        Some((addr, user)) => {
            let mut b = [0u8; 8];
            read(ctx, user, addr, &mut b[..size])?;
            u64::from_le_bytes(b)
        }
        None => scalar(e, ctx)?,
    };
    Ok(typed(ty, raw, ctx))
}

fn scalar_array<C: FetchContext + ?Sized>(
    e: &FetchExpr,
    ty: &FetchType,
    n: u32,
    ctx: &C,
) -> Result<Value, FetchError> {
    let Some((addr, user)) = address(e, ctx)? else {
        return Err(FetchError::Unavailable(
            "arrays need a memory argument".into(),
        ));
    };
    let size = ty.base.size();
    let elements = (0..u64::from(n))
        .map(|i| {
            let a = addr.wrapping_add(i * size as u64);
            let mut b = [0u8; 8];
            match read(ctx, user, a, &mut b[..size]) {
                Ok(()) => typed(ty, u64::from_le_bytes(b), ctx),
                Err(f) => Value::Fault { addr: f.addr },
            }
        })
        .collect();
    Ok(Value::Array { elements })
}

/// Applies the bitfield and the type to a raw value.
fn typed<C: FetchContext + ?Sized>(ty: &FetchType, raw: u64, ctx: &C) -> Value {
    let bits = (ty.base.size() * 8) as u8;
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut v = raw & mask;
    if let Some(bf) = ty.bitfield {
        // The parser keeps offset + width within the container; an AST built
        // by hand may not, so never shift by 64 or more.
        v = v.checked_shr(bf.offset).unwrap_or(0);
        if bf.width < 64 {
            v &= (1u64 << bf.width) - 1;
        }
    }
    use BaseType::*;
    match ty.base {
        U8 | U16 | U32 | U64 => Value::Unsigned { bits, value: v },
        S8 | S16 | S32 | S64 => {
            let shift = 64 - u32::from(bits);
            Value::Signed {
                bits,
                value: ((v << shift) as i64) >> shift,
            }
        }
        X8 | X16 | X32 | X64 => Value::Hex { bits, value: v },
        Char => Value::Char { value: v as u8 },
        Symbol => Value::Symbol {
            addr: v,
            name: ctx.symbolize(v),
        },
        String | UString | SymStr => Value::Unavailable {
            reason: "string type in scalar context".into(),
        },
    }
}

fn fetch_string<C: FetchContext + ?Sized>(
    e: &FetchExpr,
    base: BaseType,
    ctx: &C,
    opts: &EvalOptions,
    buf: Vec<u8>,
) -> Result<Value, FetchError> {
    let user_type = base == BaseType::UString;
    match e {
        FetchExpr::Comm => {
            let c = ctx
                .comm()
                .ok_or_else(|| FetchError::Unavailable("task name unknown".into()))?;
            Ok(Value::Str {
                bytes: c.into_bytes(),
                truncated: false,
            })
        }
        FetchExpr::ImmStr(s) => Ok(Value::Str {
            bytes: s.clone().into_bytes(),
            truncated: false,
        }),
        _ => {
            // Memory forms read the string at their address; \IMM at its value.
            let (addr, user) = match address(e, ctx)? {
                Some(a) => a,
                None => (scalar(e, ctx)?, false),
            };
            read_string(ctx, user || user_type, addr, opts.max_string_len, buf)
        }
    }
}

fn string_array<C: FetchContext + ?Sized>(
    e: &FetchExpr,
    base: BaseType,
    n: u32,
    ctx: &C,
    opts: &EvalOptions,
) -> Result<Value, FetchError> {
    // An array of string pointers starting at the address.
    let Some((addr, user)) = address(e, ctx)? else {
        return Err(FetchError::Unavailable(
            "arrays need a memory argument".into(),
        ));
    };
    let user = user || base == BaseType::UString;
    let elements = (0..u64::from(n))
        .map(|i| {
            read_u64(ctx, user, addr.wrapping_add(8 * i))
                .and_then(|p| read_string(ctx, user, p, opts.max_string_len, Vec::new()))
                .unwrap_or_else(Value::from_error)
        })
        .collect();
    Ok(Value::Array { elements })
}

/// Bytes of a string's first read: most strings the kernel passes (paths,
/// names) end within it, so one read (one translation) fetches them.
const FIRST_STRING_READ: usize = 128;
/// Bytes of each later read.
const NEXT_STRING_READ: usize = 512;

/// Reads a NUL-terminated string into `out` (cleared first, its capacity
/// reused), page by page so a string that ends just before an unmapped page
/// is still read.
fn read_string<C: FetchContext + ?Sized>(
    ctx: &C,
    user: bool,
    addr: u64,
    max: usize,
    mut out: Vec<u8>,
) -> Result<Value, FetchError> {
    const PAGE: u64 = 4096;
    out.clear();
    let mut chunk = FIRST_STRING_READ;
    let mut a = addr;
    while out.len() < max {
        // Reads never cross a page, so a string ending just before an
        // unmapped page does not fault.
        let to_page_end = (PAGE - (a % PAGE)) as usize;
        let n = to_page_end.min(max - out.len()).min(chunk);
        let start = out.len();
        out.resize(start + n, 0);
        read(ctx, user, a, &mut out[start..])?;
        // The word-at-a-time search of the standard library.
        if let Ok(s) = std::ffi::CStr::from_bytes_until_nul(&out[start..]) {
            let z = s.to_bytes().len();
            out.truncate(start + z);
            return Ok(Value::Str {
                bytes: out,
                truncated: false,
            });
        }
        a = a.wrapping_add(n as u64);
        chunk = NEXT_STRING_READ;
    }
    Ok(Value::Str {
        bytes: out,
        truncated: true,
    })
}

/// Function arguments saved at function entry for a return probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct EntryArgs {
    values: Vec<(u32, Result<u64, FetchError>)>,
}

impl EntryArgs {
    /// Saves the arguments `def` needs (`$argN`, named parameters). Call at
    /// function entry, with the entry registers.
    pub fn capture<C: FetchContext + ?Sized>(def: &ProbeDef, ctx: &C) -> EntryArgs {
        EntryArgs {
            values: def
                .entry_arg_indices()
                .into_iter()
                .map(|n| (n, ctx.arg(n)))
                .collect(),
        }
    }

    /// [`Self::capture`] into these (reused) buffers: no allocation when
    /// they are large enough.
    pub fn recapture<C: FetchContext + ?Sized>(&mut self, def: &ProbeDef, ctx: &C) {
        self.values.clear();
        for a in &def.args {
            a.expr.visit(&mut |e| {
                if let FetchExpr::Arg(n) = e {
                    let n = n - 1;
                    if !self.values.iter().any(|(m, _)| *m == n) {
                        self.values.push((n, ctx.arg(n)));
                    }
                }
            });
        }
        self.values.sort_unstable_by_key(|(n, _)| *n);
    }
}

/// A context at function return whose `arg()` answers from [`EntryArgs`].
pub struct AtReturn<'a, C: ?Sized> {
    /// The context at return.
    pub inner: &'a C,
    /// Arguments saved at entry.
    pub entry: &'a EntryArgs,
}

impl<C: FetchContext + ?Sized> FetchContext for AtReturn<'_, C> {
    fn reg(&self, r: Reg) -> u64 {
        self.inner.reg(r)
    }
    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.inner.read_kernel(addr, buf)
    }
    fn read_user(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.inner.read_user(addr, buf)
    }
    fn comm(&self) -> Option<String> {
        self.inner.comm()
    }
    fn symbolize(&self, addr: u64) -> Option<String> {
        self.inner.symbolize(addr)
    }
    fn stack_pointer(&self) -> u64 {
        self.inner.stack_pointer()
    }
    fn retval(&self) -> u64 {
        self.inner.retval()
    }
    fn arg(&self, n: u32) -> Result<u64, FetchError> {
        self.entry
            .values
            .iter()
            .find(|(i, _)| *i == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| {
                Err(FetchError::Unavailable(format!(
                    "$arg{} not saved at entry",
                    n + 1
                )))
            })
    }
}
