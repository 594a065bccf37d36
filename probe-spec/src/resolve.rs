//! Resolution of the DWARF-named forms (`path`, `file->f_path.dentry`,
//! `$arg1->name`) into plain fetch expressions, through a small trait the
//! symbols crate implements, and of `@SYM` addresses.
//!
//! The model follows the kernel's BTF args: a parameter is fetched as `$argN`
//! (so return probes save it at entry), `->m` loads the pointer and adds the
//! member offset, `.m` adds the offset to the current address, and the last
//! step is a memory read of the member's type.

use crate::ast::*;
use crate::error::{ErrorCode as E, ParseError};

/// What the resolver needs to know about a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// Opaque handle for the [`DebugInfo`] implementation (e.g. a DWARF offset).
    pub id: u64,
    /// C spelling for messages, e.g. `"struct file *"`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Shape of the type (typedefs and qualifiers already stripped).
    pub kind: TypeKind,
}

/// Shape of a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// Integer, enum or bool.
    Int {
        /// Signed.
        signed: bool,
    },
    /// `char` (or `signed/unsigned char`): strings are made of these.
    Char,
    /// Pointer; `pointee` is `None` for `void *`.
    Pointer {
        /// Pointed-to type.
        pointee: Option<Box<TypeInfo>>,
    },
    /// `struct` or `union`.
    Struct,
    /// Array; `elem` is the element type.
    Array {
        /// Element type.
        elem: Box<TypeInfo>,
    },
    /// Anything else (function pointers are `Pointer`; floats, void...).
    Other,
}

/// A function parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Position, 0-based (the ABI maps it to a register or stack slot).
    pub index: u32,
    /// Its type.
    pub ty: TypeInfo,
}

/// A struct/union member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Byte offset from the start of the containing struct.
    pub offset: u64,
    /// Its type.
    pub ty: TypeInfo,
    /// For bitfield members: `(bit offset within the storage unit at
    /// `offset`, bit width)`, with `ty.size` the storage unit's size.
    pub bitfield: Option<(u32, u32)>,
}

/// Debug information for the probed kernel (DWARF or BTF).
pub trait DebugInfo {
    /// Parameter `name` of function `func`.
    fn param(&self, func: &str, name: &str) -> Option<ParamInfo>;
    /// Parameter of `func` by 0-based position (for `$argN->member`).
    fn param_at(&self, func: &str, index: u32) -> Option<ParamInfo>;
    /// Return type of `func`; `None` if unknown or `void`.
    fn return_type(&self, func: &str) -> Option<TypeInfo>;
    /// Member `name` of the struct or union `ty`.
    fn member(&self, ty: &TypeInfo, name: &str) -> Option<MemberInfo>;
}

/// Where the current value of a named expression lives during resolution.
enum Cur {
    /// A value computed by the expression (e.g. a register or `$argN`).
    Value(FetchExpr, TypeInfo),
    /// Memory at `base + offset`, of the given type.
    Place(FetchExpr, i64, TypeInfo, Option<(u32, u32)>),
}

/// Resolves every DWARF-named argument of `def`, in place. `line` is the
/// original definition text, for error positions (pass `def.to_string()` if
/// there is none). Arguments without names are left alone.
pub fn resolve_names(
    def: &mut ProbeDef,
    line: &str,
    dbg: &dyn DebugInfo,
) -> Result<(), ParseError> {
    let ProbeTarget::Symbol { symbol, .. } = &def.target else {
        if def.has_unresolved_names() {
            return Err(ParseError::new(E::NOSUP_BTFARG, line, 0)
                .detail("named arguments need a probe on a symbol"));
        }
        return Ok(());
    };
    let func = symbol.clone();
    let starts = arg_positions(line);
    for (i, arg) in def.args.iter_mut().enumerate() {
        let FetchExpr::Named(named) = &arg.expr else {
            continue;
        };
        // Byte position of this argument's word in `line` (best effort).
        let wpos = starts.get(i + 2).copied().unwrap_or(0);
        let err = |code: E, at: usize| ParseError::new(code, line, at).word(i + 2);
        let body_off = wpos
            + if arg.name_generated {
                0
            } else {
                arg.name.len() + 1
            };

        let mut cur = match &named.base {
            NamedBase::Param(p) => {
                let pi = dbg.param(&func, p).ok_or_else(|| {
                    err(E::NO_BTFARG, body_off).detail(format!("no parameter '{p}' in {func}"))
                })?;
                Cur::Value(FetchExpr::Arg(pi.index + 1), pi.ty)
            }
            NamedBase::Arg(n) => {
                let pi = dbg.param_at(&func, n - 1).ok_or_else(|| {
                    err(E::NO_BTFARG, body_off).detail(format!("{func} has no argument {n}"))
                })?;
                Cur::Value(FetchExpr::Arg(*n), pi.ty)
            }
            NamedBase::Retval => {
                let t = dbg
                    .return_type(&func)
                    .ok_or_else(|| err(E::NO_RETVAL, body_off))?;
                Cur::Value(FetchExpr::Retval, t)
            }
        };
        for step in &named.path {
            let at = step.pos.min(line.len());
            let (container, base_expr, base_off) = if step.arrow {
                // Load the pointer, then address the member inside its target.
                let (ptr_expr, ptr_ty) = match cur {
                    Cur::Value(e, t) => (e, t),
                    Cur::Place(b, o, t, _) => (deref(b, o), t),
                };
                let pointee = match ptr_ty.kind {
                    TypeKind::Pointer { pointee: Some(p) } if p.kind == TypeKind::Struct => *p,
                    _ => {
                        return Err(err(E::NO_PTR_STRCT, at).detail(format!(
                            "'{}' is not a pointer to a struct/union",
                            ptr_ty.name
                        )))
                    }
                };
                (pointee, ptr_expr, 0)
            } else {
                match cur {
                    Cur::Place(b, o, t, _) if t.kind == TypeKind::Struct => (t, b, o),
                    Cur::Place(_, _, t, _) | Cur::Value(_, t)
                        if matches!(t.kind, TypeKind::Pointer { .. }) =>
                    {
                        return Err(err(E::NO_PTR_STRCT, at).detail(format!(
                            "'{}' is a pointer: use '->' instead of '.'",
                            t.name
                        )))
                    }
                    Cur::Value(_, t) if t.kind == TypeKind::Struct => {
                        return Err(err(E::NOSUP_DAT_ARG, at)
                            .detail(format!("'{}' is passed by value", t.name)))
                    }
                    Cur::Place(_, _, t, _) | Cur::Value(_, t) => {
                        return Err(err(E::NO_PTR_STRCT, at)
                            .detail(format!("'{}' is not a struct/union", t.name)))
                    }
                }
            };
            let m = dbg.member(&container, &step.name).ok_or_else(|| {
                err(E::NO_BTF_FIELD, at)
                    .detail(format!("no member '{}' in '{}'", step.name, container.name))
            })?;
            let off = i64::try_from(m.offset)
                .ok()
                .and_then(|o| o.checked_add(base_off))
                .ok_or_else(|| err(E::BAD_DEREF_OFFS, at))?;
            cur = Cur::Place(base_expr, off, m.ty, m.bitfield);
        }

        let type_at = body_off + named.to_string().len() + 1;
        let (expr, ty) = finish(cur, arg.ty, |c| err(c, type_at))?;
        arg.expr = expr;
        arg.ty = ty;
        // The rewritten expression no longer implies the name: keep it explicit.
        arg.name_generated = false;
    }
    Ok(())
}

fn deref(base: FetchExpr, offset: i64) -> FetchExpr {
    FetchExpr::Deref {
        offset,
        user: false,
        inner: Box::new(base),
    }
}

/// Turns the final location into an expression and picks the type.
fn finish(
    cur: Cur,
    given: FetchType,
    err: impl Fn(E) -> ParseError,
) -> Result<(FetchExpr, FetchType), ParseError> {
    let (expr, ti, bitfield, is_place) = match cur {
        Cur::Value(e, t) => (e, t, None, false),
        Cur::Place(b, o, t, bf) => (deref(b, o), t, bf, true),
    };
    if given.explicit {
        if given.base.is_string() && given.base != BaseType::SymStr {
            // `x:string` on a `char *` reads the pointed-to string; on a char
            // array (a place) it reads the array's bytes.
            return match (&ti.kind, is_place) {
                (TypeKind::Pointer { .. }, _) => Ok((deref(expr, 0), given)),
                (TypeKind::Array { .. }, true) => Ok((expr, given)),
                _ => Err(err(E::BAD_TYPE4STR)
                    .detail(format!("'{}' cannot be read as a string", ti.name))),
            };
        }
        if !is_place && given.array.is_some() {
            return Err(err(E::BAD_STRING));
        }
        return Ok((expr, given));
    }
    let base = match &ti.kind {
        TypeKind::Int { signed } => int_type(*signed, ti.size),
        TypeKind::Char => Some(BaseType::Char),
        TypeKind::Pointer { pointee } => {
            if pointee.as_ref().is_some_and(|p| p.kind == TypeKind::Char) {
                return Ok((
                    deref(expr, 0),
                    FetchType {
                        base: BaseType::String,
                        array: None,
                        bitfield: None,
                        explicit: false,
                    },
                ));
            }
            Some(BaseType::X64)
        }
        TypeKind::Array { elem } if elem.kind == TypeKind::Char && is_place => {
            return Ok((
                expr,
                FetchType {
                    base: BaseType::String,
                    array: None,
                    bitfield: None,
                    explicit: false,
                },
            ))
        }
        TypeKind::Struct => {
            return Err(err(E::NOSUP_DAT_ARG)
                .detail(format!("'{}' is a struct/union: name a member", ti.name)))
        }
        _ => None,
    };
    let Some(base) = base else {
        return Err(err(E::BAD_TYPE).detail(format!("no default fetch type for '{}'", ti.name)));
    };
    let bitfield = match bitfield {
        Some((off, width)) => {
            let container = ti
                .size
                .checked_mul(8)
                .and_then(|b| u32::try_from(b).ok())
                .unwrap_or(0);
            if BaseType::unsigned_of_bits(container).is_none()
                || off.saturating_add(width) > container
            {
                return Err(err(E::BAD_BITFIELD));
            }
            Some(Bitfield {
                width,
                offset: off,
                container,
            })
        }
        None => None,
    };
    let base = match bitfield {
        Some(b) => BaseType::unsigned_of_bits(b.container).unwrap_or(base),
        None => base,
    };
    Ok((
        expr,
        FetchType {
            base,
            array: None,
            bitfield,
            explicit: false,
        },
    ))
}

fn int_type(signed: bool, size: u64) -> Option<BaseType> {
    use BaseType::*;
    Some(match (signed, size) {
        (false, 1) => U8,
        (false, 2) => U16,
        (false, 4) => U32,
        (false, 8) => U64,
        (true, 1) => S8,
        (true, 2) => S16,
        (true, 4) => S32,
        (true, 8) => S64,
        _ => return None,
    })
}

/// Byte positions of the whitespace-separated words of `line`.
fn arg_positions(line: &str) -> Vec<usize> {
    let mut v = Vec::new();
    let mut prev_space = true;
    for (i, b) in line.bytes().enumerate() {
        let space = b.is_ascii_whitespace();
        if prev_space && !space {
            v.push(i);
        }
        prev_space = space;
    }
    v
}

/// Resolves `@SYM[+|-offs]` addresses with `lookup` (symbol name, possibly
/// `MOD:SYM`, to address). Fails with `NO_SYMBOL` on the first unknown one.
pub fn resolve_symbols(
    def: &mut ProbeDef,
    line: &str,
    lookup: &dyn Fn(&str) -> Option<u64>,
) -> Result<(), ParseError> {
    for (i, arg) in def.args.iter_mut().enumerate() {
        let mut missing = None;
        arg.expr.visit_mut(&mut |e| {
            if let FetchExpr::SymMem {
                symbol,
                offset,
                resolved,
            } = e
            {
                match lookup(symbol) {
                    Some(a) => *resolved = Some(a.wrapping_add(*offset as u64)),
                    None => missing = Some(symbol.clone()),
                }
            }
        });
        if let Some(sym) = missing {
            let at = line.find(&format!("@{sym}")).unwrap_or(0);
            return Err(ParseError::new(E::NO_SYMBOL, line, at)
                .word(i + 2)
                .detail(format!("unknown symbol '{sym}'")));
        }
    }
    Ok(())
}
