//! Every element of the kprobe_events grammar, and every error with its code,
//! word and character position.

use probe_spec::*;

fn ok(line: &str) -> ProbeDef {
    match parse_probe(line) {
        Ok(d) => d,
        Err(e) => panic!("{line:?} failed:\n{e}"),
    }
}

fn arg(line: &str) -> FetchArg {
    let d = ok(line);
    assert_eq!(d.args.len(), 1, "{line}");
    d.args.into_iter().next().unwrap()
}

/// Asserts `line` fails with `code` at the char position where `at` starts
/// (the `n`-th occurrence, 0-based, or `at_end` = end of line).
#[track_caller]
fn err_at(line: &str, code: &str, at: Option<&str>, word: Option<usize>) -> ParseError {
    let e = match parse_command(line) {
        Ok(c) => panic!("{line:?} parsed as {c:?}, expected {code}"),
        Err(e) => e,
    };
    assert_eq!(e.code.as_str(), code, "{line:?}: {e}");
    let want = match at {
        Some(needle) => line
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} not in {line}")),
        None => line.len(),
    };
    assert_eq!(e.pos, want, "{line:?}: {e}");
    if word.is_some() {
        assert_eq!(e.word, word, "{line:?}: {e}");
    }
    e
}

fn reg(r: Reg) -> FetchExpr {
    FetchExpr::Reg(r)
}

fn deref(offset: i64, inner: FetchExpr) -> FetchExpr {
    FetchExpr::Deref {
        offset,
        user: false,
        inner: Box::new(inner),
    }
}

// ------------------------------------------------------------ headers

#[test]
fn kprobe_defaults() {
    let d = ok("p do_sys_openat2");
    assert_eq!(d.kind, ProbeKind::Kprobe);
    assert_eq!(d.group, "kprobes");
    assert_eq!(d.event, "p_do_sys_openat2_0");
    assert!(d.event_generated);
    assert_eq!(
        d.target,
        ProbeTarget::Symbol {
            module: None,
            symbol: "do_sys_openat2".into(),
            offset: 0
        }
    );
    assert!(d.args.is_empty());
    assert!(d.is_function_entry());
}

#[test]
fn names_groups_offsets_modules_addresses() {
    let d = ok("p:myprobe vfs_read+0x10");
    assert_eq!((d.group.as_str(), d.event.as_str()), ("kprobes", "myprobe"));
    assert!(!d.event_generated);
    assert!(matches!(d.target, ProbeTarget::Symbol { offset: 16, .. }));
    assert!(!d.is_function_entry());

    let d = ok("p:grp/ev ext4:ext4_sync_fs+8");
    assert_eq!(d.full_name(), "grp/ev");
    assert_eq!(
        d.target,
        ProbeTarget::Symbol {
            module: Some("ext4".into()),
            symbol: "ext4_sync_fs".into(),
            offset: 8
        }
    );

    // GRP/ with no event: the name is generated in that group.
    let d = ok("p:grp/ ext4:ext4_sync_fs+8");
    assert_eq!(d.full_name(), "grp/p_ext4_ext4_sync_fs_8");

    // GRP.EVENT is accepted like GRP/EVENT.
    assert_eq!(ok("p:grp.ev foo").full_name(), "grp/ev");

    let d = ok("p 0xffffffff81000000");
    assert_eq!(d.target, ProbeTarget::Address(0xffff_ffff_8100_0000));
    assert_eq!(d.event, "p_0xffffffff81000000");

    // Tabs and repeated spaces separate words like the kernel's argv_split.
    assert_eq!(ok("p:a\t  foo \t %di").args.len(), 1);
}

#[test]
fn kretprobes() {
    let d = ok("r vfs_read");
    assert_eq!(d.kind, ProbeKind::Kretprobe { maxactive: None });
    assert_eq!(d.event, "r_vfs_read_0");
    let d = ok("r100:grp/ev vfs_read+0 ret=$retval");
    assert_eq!(
        d.kind,
        ProbeKind::Kretprobe {
            maxactive: Some(100)
        }
    );
    assert_eq!(d.args[0].expr, FetchExpr::Retval);
    // SYM%return makes a return probe too.
    let d = ok("p:ev vfs_read%return $retval");
    assert!(d.kind.is_return());
    assert_eq!(
        ok("r4096 f").kind,
        ProbeKind::Kretprobe {
            maxactive: Some(4096)
        }
    );
    assert_eq!(
        ok("r0x10 f").kind,
        ProbeKind::Kretprobe {
            maxactive: Some(16)
        }
    );
}

#[test]
fn remove_commands() {
    let c = parse_command("-:grp/ev").unwrap();
    assert_eq!(
        c,
        Command::Remove(RemoveDef {
            group: Some("grp".into()),
            event: "ev".into(),
            match_args: vec![]
        })
    );
    let Command::Remove(r) = parse_command("-:ev a=%di").unwrap() else {
        panic!()
    };
    assert_eq!(
        (r.group, r.event.as_str(), r.match_args),
        (None, "ev", vec!["a=%di".to_string()])
    );
    err_at("-:", "NO_EVENT_NAME", None, Some(0));
    err_at("-:grp/", "NO_EVENT_NAME", None, Some(0));
    err_at("-:/ev", "NO_GROUP_NAME", Some("/"), Some(0));
    err_at("-x", "BAD_COMMAND", Some("x"), Some(0));
    // parse_probe refuses removals.
    assert_eq!(
        parse_probe("-:ev").unwrap_err().code,
        ErrorCode::BAD_COMMAND
    );
}

#[test]
fn header_errors() {
    err_at("p10 foo", "BAD_MAXACT_TYPE", Some("10"), Some(0));
    err_at("r0 foo", "BAD_MAXACT", Some("0"), Some(0));
    err_at("r1x:ev foo", "BAD_MAXACT", Some("1x"), Some(0));
    err_at("r4097 foo", "MAXACT_TOO_BIG", Some("4097"), Some(0));
    err_at("rx foo", "BAD_COMMAND", Some("x"), Some(0));
    err_at("q foo", "BAD_COMMAND", Some("q"), Some(0));
    err_at("", "BAD_COMMAND", Some(""), None);
    err_at("p", "BAD_PROBE_ADDR", None, Some(1));
    err_at("p:ev", "BAD_PROBE_ADDR", None, Some(1));
    err_at("p foo+bar", "BAD_PROBE_ADDR", Some("foo"), Some(1));
    err_at("p foo-8", "BAD_PROBE_ADDR", Some("foo"), Some(1));
    err_at("p 9foo", "BAD_PROBE_ADDR", Some("9foo"), Some(1));
    err_at("p foo+0x100000000", "BAD_PROBE_ADDR", Some("foo"), Some(1));
    err_at("p foo%ret", "BAD_ADDR_SUFFIX", Some("%ret"), Some(1));
    err_at("r foo+4", "BAD_RETPROBE", Some("foo"), Some(1));
    err_at("p foo+4%return", "BAD_RETPROBE", Some("foo"), Some(1));
    err_at("p: foo", "NO_EVENT_NAME", Some(" foo"), Some(0));
    err_at("p:/ev foo", "NO_GROUP_NAME", Some("/ev"), Some(0));
    err_at("p:1grp/ev foo", "BAD_GROUP_NAME", Some("1grp"), Some(0));
    err_at("p:grp/e-v foo", "BAD_EVENT_NAME", Some("e-v"), Some(0));
    err_at("p:9ev foo", "BAD_EVENT_NAME", Some("9ev"), Some(0));
    let long = "e".repeat(64);
    err_at(
        &format!("p:{long} foo"),
        "EVENT_TOO_LONG",
        Some("eee"),
        Some(0),
    );
    assert!(parse_probe(&format!("p:{} foo", "e".repeat(63))).is_ok());
    let g = "g".repeat(64);
    err_at(
        &format!("p:{g}/ev foo"),
        "GROUP_TOO_LONG",
        Some("ggg"),
        Some(0),
    );
}

// ------------------------------------------------------------ fetch args

#[test]
fn registers() {
    for r in Reg::all() {
        let a = arg(&format!("p f %{}", r.name()));
        assert_eq!(a.expr, reg(r));
        assert_eq!(a.name, "arg1");
        assert!(a.name_generated);
        assert_eq!(a.ty, FetchType::default_type());
    }
    let e = err_at("p f x=%rdi", "BAD_REG_NAME", Some("%rdi"), Some(2));
    assert_eq!(e.fetch_arg_index(), Some(0));
    assert!(e.detail.as_deref().unwrap().contains("%di"), "{e}");
    err_at("p f %di %eax", "BAD_REG_NAME", Some("%eax"), Some(3));
    err_at("p f %", "BAD_REG_NAME", Some("%"), Some(2));
}

#[test]
fn memory_and_symbols() {
    assert_eq!(arg("p f @0x1000").expr, FetchExpr::Mem(0x1000));
    assert_eq!(arg("p f @4096:u32").expr, FetchExpr::Mem(4096));
    assert_eq!(
        arg("p f @jiffies").expr,
        FetchExpr::SymMem {
            symbol: "jiffies".into(),
            offset: 0,
            resolved: None
        }
    );
    assert_eq!(
        arg("p f @init_task+0x10").expr,
        FetchExpr::SymMem {
            symbol: "init_task".into(),
            offset: 16,
            resolved: None
        }
    );
    assert!(matches!(
        arg("p f @x-8").expr,
        FetchExpr::SymMem { offset: -8, .. }
    ));
    err_at("p f @0x1g", "BAD_MEM_ADDR", Some("@"), Some(2));
    err_at("p f @+10", "FILE_ON_KPROBE", Some("@"), Some(2));
    err_at("p f @sym+zz", "BAD_MEM_ADDR", Some("@"), Some(2));
    err_at("p f @", "BAD_MEM_ADDR", Some("@"), Some(2));
}

#[test]
fn variables() {
    assert_eq!(arg("p f $stack").expr, FetchExpr::StackPtr);
    assert_eq!(arg("p f $stack0").expr, FetchExpr::Stack(0));
    assert_eq!(arg("p f $stack2048").expr, FetchExpr::Stack(2048));
    assert_eq!(arg("p f $arg1").expr, FetchExpr::Arg(1));
    assert_eq!(arg("p f $arg7").expr, FetchExpr::Arg(7));
    assert_eq!(arg("r f $arg2").expr, FetchExpr::Arg(2));
    assert_eq!(arg("r f $retval").expr, FetchExpr::Retval);
    let c = arg("p f $comm");
    assert_eq!(c.expr, FetchExpr::Comm);
    assert_eq!(c.ty.base, BaseType::String);
    assert_eq!(arg("p f $COMM:string").expr, FetchExpr::Comm);

    err_at("p f x=$retval", "RETVAL_ON_PROBE", Some("$retval"), Some(2));
    err_at("p f $stack2049", "BAD_STACK_NUM", Some("$"), Some(2));
    err_at("p f $stackx", "BAD_VAR", Some("$"), Some(2));
    err_at("p f $stack1x", "BAD_VAR", Some("$"), Some(2));
    err_at("p f $arg0", "BAD_ARG_NUM", Some("$"), Some(2));
    err_at("p f $arg2049", "BAD_ARG_NUM", Some("$"), Some(2));
    err_at("p f $argx", "BAD_VAR", Some("$"), Some(2));
    err_at("p f+4 $arg1", "NOFENTRY_ARGS", Some("$"), Some(2));
    err_at("p 0x1000 $arg1", "NOFENTRY_ARGS", Some("$"), Some(2));
    err_at("p f $foo", "BAD_VAR", Some("$"), Some(2));
    err_at("p f $comm:u32", "NEED_STRING_TYPE", Some("u32"), Some(2));
    err_at(
        "p f $comm:string[2]",
        "NEED_STRING_TYPE",
        Some("string["),
        Some(2),
    );
}

#[test]
fn immediates() {
    assert_eq!(arg("p f \\123").expr, FetchExpr::Imm(123));
    assert_eq!(arg("p f \\0x10").expr, FetchExpr::Imm(16));
    assert_eq!(arg("p f \\-1").expr, FetchExpr::Imm(u64::MAX));
    assert_eq!(arg("p f \\+5").expr, FetchExpr::Imm(5));
    let s = arg("p f x=\\\"hello\"");
    assert_eq!(s.expr, FetchExpr::ImmStr("hello".into()));
    assert_eq!(s.ty.base, BaseType::String);
    assert_eq!(arg("p f \\\"\"").expr, FetchExpr::ImmStr(String::new()));
    err_at("p f \\abc", "BAD_IMM", Some("abc"), Some(2));
    err_at("p f \\", "BAD_IMM", None, Some(2));
    err_at("p f \\\"abc", "IMMSTR_NO_CLOSE", None, Some(2));
    err_at("p f \\\"abc:u8", "NEED_STRING_TYPE", Some("u8"), Some(2));
}

#[test]
fn dereferences() {
    assert_eq!(arg("p f +0(%di)").expr, deref(0, reg(Reg::Di)));
    assert_eq!(arg("p f -8(%bp)").expr, deref(-8, reg(Reg::Bp)));
    // The kernel needs the sign: a bare offset is not a dereference.
    err_at("p f 0x10(%si)", "BAD_FETCH_ARG", Some("0x10"), Some(2));
    assert_eq!(
        arg("p f +u8(%si)").expr,
        FetchExpr::Deref {
            offset: 8,
            user: true,
            inner: Box::new(reg(Reg::Si))
        }
    );
    assert_eq!(
        arg("p f -u0x8(%si)").expr,
        FetchExpr::Deref {
            offset: -8,
            user: true,
            inner: Box::new(reg(Reg::Si))
        }
    );
    assert_eq!(
        arg("p f +8(+0x10(+0($stack)))").expr,
        deref(8, deref(16, deref(0, FetchExpr::StackPtr)))
    );
    assert_eq!(arg("p f +0(@jiffies)").expr.to_string(), "+0(@jiffies)");
    assert_eq!(arg("r f +0($retval)").expr, deref(0, FetchExpr::Retval));

    err_at("p f +8%di", "DEREF_NEED_BRACE", Some("+"), Some(2));
    err_at("p f +x(%di)", "BAD_DEREF_OFFS", Some("+"), Some(2));
    err_at("p f +-8(%di)", "BAD_DEREF_OFFS", Some("+"), Some(2));
    err_at("p f +8(%di", "DEREF_OPEN_BRACE", None, Some(2));
    // As in the kernel, the outer deref takes the last ")", so the inner one is unclosed.
    err_at("p f +8(+0(%di)", "DEREF_OPEN_BRACE", Some(")"), Some(2));
    // Errors inside report the inner position.
    err_at("p f +8(%zz)", "BAD_REG_NAME", Some("%zz"), Some(2));
    err_at("p f +8(+0(%zz))", "BAD_REG_NAME", Some("%zz"), Some(2));
    err_at("p f +0($comm)", "COMM_CANT_DEREF", Some("$comm"), Some(2));
    err_at("p f +0(\\\"x\")", "COMM_CANT_DEREF", Some("\\"), Some(2));
    err_at("p f +0(%di)x", "BAD_FETCH_ARG", Some("x"), Some(2));
    err_at("p f +0()", "BAD_FETCH_ARG", Some(")"), Some(2));
    err_at("p f #", "BAD_FETCH_ARG", Some("#"), Some(2));
}

#[test]
fn nesting_limit() {
    // 14 derefs + reg = 15 ops: fits; one more does not.
    let mut e = "%ax".to_string();
    for _ in 0..14 {
        e = format!("+0({e})");
    }
    assert_eq!(e.len(), 59);
    ok(&format!("p f {e}"));
    let e15 = format!("+0({e})");
    assert!(e15.len() <= 63);
    let line = format!("p f {e15}");
    let err = parse_probe(&line).unwrap_err();
    assert_eq!(err.code, ErrorCode::TOO_MANY_OPS, "{err}");
    // @ADDR is two ops (address, load); a bitfield adds one more.
    let mut m = "@1".to_string();
    for _ in 0..13 {
        m = format!("+0({m})");
    }
    ok(&format!("p f {m}"));
    let err = parse_probe(&format!("p f {m}:b1@0/8")).unwrap_err();
    assert_eq!(err.code, ErrorCode::TOO_MANY_OPS, "{err}");
}

#[test]
fn types() {
    for t in [
        "u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "x8", "x16", "x32", "x64", "char",
        "symbol",
    ] {
        let a = arg(&format!("p f %di:{t}"));
        assert_eq!(a.ty.base.name(), t);
        assert!(a.ty.explicit);
        assert_eq!(a.ty.to_string(), t);
    }
    for t in ["string", "ustring"] {
        assert_eq!(arg(&format!("p f +0(%di):{t}")).ty.base.name(), t);
    }
    assert_eq!(arg("p f %di:symstr").ty.base, BaseType::SymStr);
    assert_eq!(arg("p f +0(%di):symstr").ty.base, BaseType::SymStr);
    assert_eq!(arg("p f \\0x1000:string").ty.base, BaseType::String);

    err_at("p f %di:u7", "BAD_TYPE", Some("u7"), Some(2));
    err_at("p f %di:", "BAD_TYPE", None, Some(2));
    err_at("p f x=%di:string", "BAD_STRING", Some("string"), Some(2));
    err_at("p f $stack:ustring", "BAD_STRING", Some("ustring"), Some(2));
    err_at("p f \\5:symstr", "BAD_SYMSTRING", Some("symstr"), Some(2));
    err_at("p f @0x10:symstr[2]", "BAD_STRING", Some("symstr"), Some(2));
}

#[test]
fn arrays() {
    let a = arg("p f +0(%di):u8[4]");
    assert_eq!((a.ty.base, a.ty.array), (BaseType::U8, Some(4)));
    assert_eq!(a.ty.to_string(), "u8[4]");
    assert_eq!(arg("p f +0(%di):x32[0x40]").ty.array, Some(64));
    assert_eq!(arg("p f +0(%di):string[2]").ty.array, Some(2));
    err_at("p f +0(%di):u8[4", "ARRAY_NO_CLOSE", None, Some(2));
    err_at("p f +0(%di):u8[4]x", "BAD_ARRAY_SUFFIX", Some("x"), Some(2));
    err_at("p f +0(%di):u8[0]", "BAD_ARRAY_NUM", Some("0]"), Some(2));
    err_at("p f +0(%di):u8[z]", "BAD_ARRAY_NUM", Some("z]"), Some(2));
    err_at("p f +0(%di):u8[65]", "ARRAY_TOO_BIG", Some("65]"), Some(2));
    err_at("p f %di:u8[2]", "BAD_STRING", Some("u8"), Some(2));
    err_at("p f +0(%di):u9[2]", "BAD_TYPE", Some("u9"), Some(2));
}

#[test]
fn bitfields() {
    let a = arg("p f +0(%di):b4@2/32");
    assert_eq!(a.ty.base, BaseType::U32);
    assert_eq!(
        a.ty.bitfield,
        Some(Bitfield {
            width: 4,
            offset: 2,
            container: 32
        })
    );
    assert_eq!(a.ty.to_string(), "b4@2/32");
    assert_eq!(arg("p f %di:b64@0/64").ty.bitfield.unwrap().width, 64);
    assert_eq!(arg("p f %di:b1@0x7/8").ty.bitfield.unwrap().offset, 7);
    err_at("p f %di:b4@2/24", "BAD_TYPE", Some("b4"), Some(2));
    err_at("p f %di:b4@2", "BAD_TYPE", Some("b4"), Some(2));
    err_at("p f %di:b0@2/8", "BAD_BITFIELD", Some("b0"), Some(2));
    err_at("p f %di:b4/8", "BAD_BITFIELD", Some("b4"), Some(2));
    err_at("p f %di:b4@/8", "BAD_BITFIELD", Some("b4"), Some(2));
    err_at("p f %di:b4@5/8", "BAD_BITFIELD", Some("b4"), Some(2));
    err_at("p f %di:b9@0/8", "BAD_BITFIELD", Some("b9"), Some(2));
}

#[test]
fn argument_names() {
    let d = ok("p f a=%di b_2=%si %dx");
    let names: Vec<_> = d.args.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["a", "b_2", "arg3"]);
    err_at("p f =%di", "NO_ARG_NAME", Some("=%di"), Some(2));
    err_at("p f 1a=%di", "BAD_ARG_NAME", Some("1a"), Some(2));
    err_at("p f a-b=%di", "BAD_ARG_NAME", Some("a-b"), Some(2));
    let long = "n".repeat(33);
    err_at(
        &format!("p f {long}=%di"),
        "ARG_NAME_TOO_LONG",
        Some("nnn"),
        Some(2),
    );
    ok(&format!("p f {}=%di", "n".repeat(32)));
    err_at("p f a=%di a=%si", "USED_ARG_NAME", Some("a=%si"), Some(3));
    err_at(
        "p f common_pid=%di",
        "USED_ARG_NAME",
        Some("common_pid"),
        Some(2),
    );
    err_at(
        "p f __probe_ip=%di",
        "USED_ARG_NAME",
        Some("__probe_ip"),
        Some(2),
    );
    // A generated name can collide too.
    err_at("p f arg2=%di %si", "USED_ARG_NAME", Some("%si"), Some(3));
    err_at("p f a=", "NO_ARG_BODY", None, Some(2));
    let body = format!("+0({})", "x".repeat(60));
    err_at(
        &format!("p f a={body}"),
        "ARG_TOO_LONG",
        Some("+0("),
        Some(2),
    );
}

#[test]
fn too_many_args() {
    let args: Vec<String> = (0..128).map(|i| format!("a{i}=%di")).collect();
    let line = format!("p f {}", args.join(" "));
    assert_eq!(ok(&line).args.len(), 128);
    let line129 = format!("{line} z=%si");
    err_at(&line129, "TOO_MANY_ARGS", Some("z=%si"), Some(130));
}

#[test]
fn dwarf_named_forms() {
    let a = arg("p do_sys_openat2 path");
    assert_eq!(a.name, "path");
    assert!(a.name_generated);
    assert_eq!(
        a.expr,
        FetchExpr::Named(NamedExpr {
            base: NamedBase::Param("path".into()),
            path: vec![]
        })
    );
    let a = arg("p vfs_open file->f_path.dentry:x64");
    assert_eq!(a.name, "arg1");
    let FetchExpr::Named(n) = &a.expr else {
        panic!()
    };
    assert_eq!(n.base, NamedBase::Param("file".into()));
    let steps: Vec<_> = n.path.iter().map(|s| (s.arrow, s.name.as_str())).collect();
    assert_eq!(steps, [(true, "f_path"), (false, "dentry")]);
    // Step positions point at the operator in the line.
    let line = "p vfs_open file->f_path.dentry";
    assert_eq!(n.path[0].pos, line.find("->").unwrap());
    assert_eq!(n.path[1].pos, line.find(".d").unwrap());

    let a = arg("p f x=$arg1->f_flags");
    let FetchExpr::Named(n) = &a.expr else {
        panic!()
    };
    assert_eq!(n.base, NamedBase::Arg(1));
    let a = arg("r f $retval->len");
    let FetchExpr::Named(n) = &a.expr else {
        panic!()
    };
    assert_eq!(n.base, NamedBase::Retval);
    assert!(ok("p f path").has_unresolved_names());

    err_at("p f file-f_path", "BAD_HYPHEN", Some("-f_"), Some(2));
    err_at("p f file->", "NO_BTF_FIELD", None, Some(2));
    err_at("p f file->9", "NO_BTF_FIELD", Some("9"), Some(2));
    err_at("p f file+", "BAD_FETCH_ARG", Some("+"), Some(2));
    err_at("p f+8 file", "NOSUP_BTFARG", Some("file"), Some(2));
    err_at("p f $arg1-x", "BAD_HYPHEN", Some("-x"), Some(2));
    err_at("p f x=$retval->len", "RETVAL_ON_PROBE", Some("$"), Some(2));
}

#[test]
fn display_round_trips() {
    for line in [
        "p:grp/ev do_sys_openat2 dfd=%di:s32 path=+0(%si):string flags=%dx:x32",
        "r100:kprobes/r vfs_read ret=$retval:s64 c=$comm",
        "p:a/b ext4:ext4_sync_fs+16 x=-8(+u16(%bp)):u8[4] y=@jiffies z=@x-8:b3@4/32",
        "p:a/b 0xffffffff81000000 s=$stack n=$stack3 i=\\0x10 t=\\\"hi\":string",
        "p:a/b f file->f_path.dentry q=$arg2->name:string",
    ] {
        let d = ok(line);
        let again = ok(&d.to_string());
        assert_eq!(d, again, "{line} -> {d}");
    }
    assert_eq!(
        ok("p foo+0x10 a=+0x8(%di):u32").to_string(),
        "p:kprobes/p_foo_16 foo+16 a=+8(%di):u32"
    );
}

#[test]
fn scripts_with_comments() {
    let cmds = parse_script("# probes\n\np:a f %di # first\n-:a\n").unwrap();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0].0, 3);
    assert!(matches!(cmds[1].1, Command::Remove(_)));
    let (line, e) = parse_script("p f\np f %zz\n").unwrap_err();
    assert_eq!(line, 2);
    assert_eq!(e.code, ErrorCode::BAD_REG_NAME);
}

#[test]
fn error_display_has_caret_under_position() {
    let e = parse_probe("p:ev do_sys_openat2 path=+0(%rsi):string").unwrap_err();
    let s = e.to_string();
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines[0].starts_with("BAD_REG_NAME: Invalid register name"),
        "{s}"
    );
    assert!(lines[0].contains("at arg 1, position 28"), "{s}");
    assert_eq!(
        lines[1].trim_start(),
        "p:ev do_sys_openat2 path=+0(%rsi):string"
    );
    let caret = lines[2].find('^').unwrap();
    assert_eq!(&lines[1][caret..caret + 5], "%rsi)");
}

#[test]
fn hw_suffix_asks_for_a_debug_register() {
    let d = ok("p:t/a hv_add%hw x=%di:u64");
    assert!(d.hardware && !d.kind.is_return());
    assert_eq!(d.to_string(), "p:t/a hv_add%hw x=%di:u64");
    assert_eq!(ok(&d.to_string()), d, "the listing's line parses back");
    let r = ok("r8:t/b hv_add%hw $retval");
    assert!(r.hardware && r.kind.is_return());
    // With %return, in either order; an address works too.
    for line in ["p:t/c hv_add%return%hw", "p:t/c hv_add%hw%return"] {
        let d = ok(line);
        assert!(d.hardware && d.kind.is_return(), "{line}");
    }
    assert!(ok("p 0xffffffff81000000%hw").hardware);
    assert!(!ok("p:t/d hv_add").hardware);
    let e = parse_command("p foo%hw%hw").unwrap_err();
    assert_eq!((e.code.as_str(), e.pos), ("BAD_ADDR_SUFFIX", 8), "{e}");
    err_at("p foo%hw%hx", "BAD_ADDR_SUFFIX", Some("%hx"), Some(1));
    err_at("p foo+4%hw%return", "BAD_RETPROBE", Some("foo"), Some(1));
}
