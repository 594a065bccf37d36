//! DWARF-named arguments resolved through a fake `DebugInfo` shaped like
//! the kernel's `struct file` / `struct path` / `struct dentry`.

use probe_spec::*;

fn int(size: u64, signed: bool) -> TypeInfo {
    TypeInfo {
        id: 0,
        name: format!("{}{}", if signed { "s" } else { "u" }, size * 8),
        size,
        kind: TypeKind::Int { signed },
    }
}
fn strct(id: u64, name: &str, size: u64) -> TypeInfo {
    TypeInfo {
        id,
        name: format!("struct {name}"),
        size,
        kind: TypeKind::Struct,
    }
}
fn ptr(to: TypeInfo) -> TypeInfo {
    TypeInfo {
        id: 0,
        name: format!("{} *", to.name),
        size: 8,
        kind: TypeKind::Pointer {
            pointee: Some(Box::new(to)),
        },
    }
}
fn chr() -> TypeInfo {
    TypeInfo {
        id: 0,
        name: "char".into(),
        size: 1,
        kind: TypeKind::Char,
    }
}

const FILE: u64 = 1;
const PATH: u64 = 2;
const DENTRY: u64 = 3;
const QSTR: u64 = 4;

struct FakeDwarf;

impl DebugInfo for FakeDwarf {
    fn param(&self, func: &str, name: &str) -> Option<ParamInfo> {
        match (func, name) {
            ("vfs_open", "path") => Some(ParamInfo {
                index: 0,
                ty: ptr(strct(PATH, "path", 16)),
            }),
            ("vfs_open", "file") => Some(ParamInfo {
                index: 1,
                ty: ptr(strct(FILE, "file", 256)),
            }),
            ("do_sys_openat2", "dfd") => Some(ParamInfo {
                index: 0,
                ty: int(4, true),
            }),
            ("do_sys_openat2", "filename") => Some(ParamInfo {
                index: 1,
                ty: ptr(chr()),
            }),
            ("by_value", "p") => Some(ParamInfo {
                index: 0,
                ty: strct(PATH, "path", 16),
            }),
            _ => None,
        }
    }
    fn param_at(&self, func: &str, index: u32) -> Option<ParamInfo> {
        ["path", "file", "dfd", "filename"]
            .iter()
            .filter_map(|n| self.param(func, n))
            .find(|p| p.index == index)
    }
    fn return_type(&self, func: &str) -> Option<TypeInfo> {
        (func == "d_alloc").then(|| ptr(strct(DENTRY, "dentry", 192)))
    }
    fn member(&self, ty: &TypeInfo, name: &str) -> Option<MemberInfo> {
        let m = |offset, ty| {
            Some(MemberInfo {
                offset,
                ty,
                bitfield: None,
            })
        };
        match (ty.id, name) {
            (FILE, "f_path") => m(16, strct(PATH, "path", 16)),
            (FILE, "f_flags") => m(60, int(4, false)),
            (FILE, "f_mode") => Some(MemberInfo {
                offset: 64,
                ty: int(4, false),
                bitfield: Some((3, 2)),
            }),
            (PATH, "mnt") => m(0, ptr(strct(99, "vfsmount", 32))),
            (PATH, "dentry") => m(8, ptr(strct(DENTRY, "dentry", 192))),
            (DENTRY, "d_name") => m(32, strct(QSTR, "qstr", 16)),
            (DENTRY, "d_iname") => m(
                56,
                TypeInfo {
                    id: 0,
                    name: "char[32]".into(),
                    size: 32,
                    kind: TypeKind::Array {
                        elem: Box::new(chr()),
                    },
                },
            ),
            (QSTR, "name") => m(8, ptr(chr())),
            _ => None,
        }
    }
}

fn resolved(line: &str) -> ProbeDef {
    let mut d = parse_probe(line).unwrap_or_else(|e| panic!("{e}"));
    resolve_names(&mut d, line, &FakeDwarf).unwrap_or_else(|e| panic!("{e}"));
    assert!(!d.has_unresolved_names());
    d
}

fn resolve_err(line: &str) -> ParseError {
    let mut d = parse_probe(line).unwrap_or_else(|e| panic!("{e}"));
    resolve_names(&mut d, line, &FakeDwarf).expect_err(line)
}

#[test]
fn params_become_args_with_dwarf_types() {
    let d = resolved("p do_sys_openat2 dfd filename");
    assert_eq!(d.args[0].name, "dfd");
    assert_eq!(d.args[0].expr, FetchExpr::Arg(1));
    assert_eq!(d.args[0].ty.base, BaseType::S32);
    // char * defaults to the string it points to.
    assert_eq!(d.args[1].expr.to_string(), "+0($arg2)");
    assert_eq!(d.args[1].ty.base, BaseType::String);
    assert_eq!(
        d.to_string(),
        "p:kprobes/p_do_sys_openat2_0 do_sys_openat2 dfd=$arg1 filename=+0($arg2)"
    );
}

#[test]
fn member_chains() {
    let d = resolved(
        "p vfs_open d=file->f_path.dentry fl=file->f_flags:x32 n=file->f_path.dentry->d_name.name",
    );
    // file is $arg2; f_path at 16, dentry at 8 inside it: load at file+24.
    assert_eq!(d.args[0].expr.to_string(), "+24($arg2)");
    assert_eq!(d.args[0].ty.base, BaseType::X64);
    assert_eq!(d.args[1].expr.to_string(), "+60($arg2)");
    assert_eq!(d.args[1].ty.to_string(), "x32");
    // dentry pointer, then d_name (32) . name (8) = 40, then the string.
    assert_eq!(d.args[2].expr.to_string(), "+0(+40(+24($arg2)))");
    assert_eq!(d.args[2].ty.base, BaseType::String);

    let d = resolved("p vfs_open i=path->dentry->d_iname m=$arg2->f_mode");
    assert_eq!(d.args[0].expr.to_string(), "+56(+8($arg1))");
    assert_eq!(d.args[0].ty.base, BaseType::String);
    assert_eq!(d.args[1].expr.to_string(), "+64($arg2)");
    assert_eq!(d.args[1].ty.to_string(), "b2@3/32");

    let d = resolved("r d_alloc n=$retval->d_name.name");
    assert_eq!(d.args[0].expr.to_string(), "+0(+40($retval))");
    // Return probes fetch named params through $argN, saved at entry.
    let d = resolved("r vfs_open file->f_flags:u32");
    assert_eq!(d.entry_arg_indices(), [1]);
}

#[test]
fn resolution_errors_have_codes_and_positions() {
    let line = "p vfs_open x=nosuch";
    let e = resolve_err(line);
    assert_eq!(
        (e.code, e.pos),
        (ErrorCode::NO_BTFARG, line.find("nosuch").unwrap())
    );
    let line = "p vfs_open x=file->f_nope";
    let e = resolve_err(line);
    assert_eq!(
        (e.code, e.pos),
        (ErrorCode::NO_BTF_FIELD, line.find("->").unwrap())
    );
    assert_eq!(e.fetch_arg_index(), Some(0));
    let line = "p vfs_open x=file.f_path";
    let e = resolve_err(line);
    assert_eq!(
        (e.code, e.pos),
        (ErrorCode::NO_PTR_STRCT, line.find(".f").unwrap())
    );
    let e = resolve_err("p vfs_open x=file->f_flags->x");
    assert_eq!(e.code, ErrorCode::NO_PTR_STRCT);
    let e = resolve_err("p vfs_open x=file->f_path");
    assert_eq!(e.code, ErrorCode::NOSUP_DAT_ARG);
    let e = resolve_err("p by_value x=p.dentry");
    assert_eq!(e.code, ErrorCode::NOSUP_DAT_ARG);
    let e = resolve_err("r vfs_open x=$retval->f_flags");
    assert_eq!(e.code, ErrorCode::NO_RETVAL);
    let e = resolve_err("p vfs_open x=$arg5->f_flags");
    assert_eq!(e.code, ErrorCode::NO_BTFARG);
    let e = resolve_err("p do_sys_openat2 x=dfd:string");
    assert_eq!(e.code, ErrorCode::BAD_TYPE4STR);
}

#[test]
fn plain_args_are_untouched() {
    let line = "p vfs_open a=%di b=+0(%si):string";
    let before = parse_probe(line).unwrap();
    let mut after = before.clone();
    resolve_names(&mut after, line, &FakeDwarf).unwrap();
    assert_eq!(before, after);
}
