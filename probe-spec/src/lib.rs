//! probe-spec: the `kprobe_events` grammar of Linux
//! (Documentation/trace/kprobetrace.rst) for x86-64, evaluation of fetch
//! arguments over a small trait, and tracefs event filters.
//!
//! ```
//! use probe_spec::{parse_probe, FetchExpr, Reg};
//! let def = parse_probe("p:fs/open do_sys_openat2 dfd=%di:s32 path=+0(%si):string").unwrap();
//! assert_eq!(def.full_name(), "fs/open");
//! assert_eq!(def.args[0].expr, FetchExpr::Reg(Reg::Di));
//! assert_eq!(def.args[1].ty.to_string(), "string");
//! // Errors carry the kernel's code and the position in the line.
//! let e = parse_probe("p do_sys_openat2 %rdi").unwrap_err();
//! assert_eq!(e.code.as_str(), "BAD_REG_NAME");
//! assert_eq!(e.pos, 17);
//! ```
//!
//! Beyond Linux's kprobes, arguments may name DWARF parameters and members
//! (`path`, `file->f_path.dentry`, `$arg1->f_flags`), kept as
//! [`FetchExpr::Named`] until [`resolve_names`] rewrites them with a
//! [`DebugInfo`].
//!
//! Where this parser knowingly differs from the kernel:
//! - positions count characters of the original line (the kernel counts in
//!   the words re-joined by single spaces: the same for single-spaced lines);
//! - text after the last `)` of a dereference and junk after `p`/`r` (`px`)
//!   are refused (the kernel ignores them); symbol names are checked for
//!   plausible characters (the kernel leaves that to kallsyms);
//! - `$argN` and DWARF names need a probe at `SYM+0` or a return probe (the
//!   kernel asks kallsyms whether the address is a function entry);
//! - address probes are named `p_0xADDR` (the kernel prints a hashed `%p`);
//! - the `$arg*` meta-argument is not expanded (`BAD_VAR`);
//! - strings are printed with control bytes and invalid UTF-8 as `\xNN`.

mod ast;
mod error;
mod eval;
mod filter;
mod num;
mod parse;
mod reg;
mod resolve;

pub use ast::{
    BaseType, Bitfield, Command, FetchArg, FetchExpr, FetchType, MemberStep, NamedBase, NamedExpr,
    ProbeDef, ProbeKind, ProbeTarget, RemoveDef,
};
pub use error::{ErrorCode, Excerpt, ParseError, EXCERPT_RADIUS};
pub use eval::{
    evaluate, evaluate_arg, evaluate_value, evaluate_value_reusing, format_event_line, ArgValue,
    AtReturn, EntryArgs, EvalOptions, Fault, FetchContext, FetchError, Value,
};
pub use filter::{
    glob_match, EventFields, FieldKind, FieldValue, Fields, Filter, FilterExpr, FilterOp, Operand,
    Predicate,
};
pub use parse::{limits, parse_command, parse_probe, parse_script, trim_line, DEFAULT_GROUP};
pub use reg::Reg;
pub use resolve::{
    resolve_names, resolve_symbols, DebugInfo, MemberInfo, ParamInfo, TypeInfo, TypeKind,
};
