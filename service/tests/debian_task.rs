//! On the real Debian 6.1 vmlinux: the current-task layout `$comm` uses.
//! Skipped with a visible message when the artifacts are absent, unless
//! HVPROBE_REQUIRE_DEBIAN=1 (CI), where that is a failure.

use std::path::PathBuf;

use introspect::KernelSymbols;

fn vmlinux() -> Option<PathBuf> {
    let dir = std::env::var_os("HVPROBE_DEBIAN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../artifacts/debian"));
    let p = dir.join("vmlinux");
    if p.exists() {
        return Some(p);
    }
    let required = std::env::var("HVPROBE_REQUIRE_DEBIAN").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "HVPROBE_REQUIRE_DEBIAN=1 but {} is missing",
        p.display()
    );
    eprintln!(
        "SKIPPED: {} is missing (run tests/debian/fetch-kernel.sh --dbg)",
        p.display()
    );
    None
}

#[test]
fn current_task_layout_from_dwarf() {
    let Some(path) = vmlinux() else { return };
    let syms = service::Symbols::from_vmlinux(&path).unwrap();
    let layout = syms.task_layout().expect("DWARF gives the task layout");
    // 6.1 keeps `current_task` as a per-CPU variable; the offset is its
    // System.map value (per-CPU symbols are zero-based).
    let map = std::fs::read_to_string(path.with_file_name("System.map")).unwrap();
    let want = map
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let (a, _, n) = (w.next()?, w.next()?, w.next()?);
            (n == "current_task").then(|| u64::from_str_radix(a, 16).unwrap())
        })
        .unwrap();
    assert_eq!(layout.current_task_percpu, want);
    // guest-symbols' own Debian test checks this offset against gdb.
    let dwarf = guest_symbols::DebugInfo::open(&path).unwrap();
    assert_eq!(
        layout.comm_offset,
        dwarf.member_offset("task_struct.comm").unwrap()
    );
    assert_eq!(
        layout.pid_offset,
        dwarf.member_offset("task_struct.pid").unwrap()
    );
}

#[test]
fn named_retval_members_resolve_through_return_types() {
    let Some(path) = vmlinux() else { return };
    let syms = service::Symbols::from_vmlinux(&path).unwrap();
    let dbg = syms.debug_info().expect("DWARF");
    let dwarf = guest_symbols::DebugInfo::open(&path).unwrap();
    // getname() returns `struct filename *`; `uptr` is its user pointer.
    let uptr = dwarf.member_offset("filename.uptr").unwrap();
    let line = "r:t/g getname up=$retval->uptr:x64 name=$retval->name:string";
    let mut def = probe_spec::parse_probe(line).unwrap();
    probe_spec::resolve_names(&mut def, line, &dbg).unwrap();
    let probe_spec::FetchExpr::Deref { offset, inner, .. } = &def.args[0].expr else {
        panic!("{:?}", def.args[0].expr)
    };
    assert_eq!(
        (*offset, &**inner),
        (uptr as i64, &probe_spec::FetchExpr::Retval)
    );
    // `name` is a `const char *` member: loaded, then read as a string.
    let name = dwarf.member_offset("filename.name").unwrap();
    let probe_spec::FetchExpr::Deref { inner, .. } = &def.args[1].expr else {
        panic!("{:?}", def.args[1].expr)
    };
    assert_eq!(
        **inner,
        probe_spec::FetchExpr::Deref {
            offset: name as i64,
            user: false,
            inner: Box::new(probe_spec::FetchExpr::Retval)
        }
    );
    // A void function has no return value to name.
    let line = "r:t/v kfree p=$retval->x";
    let mut def = probe_spec::parse_probe(line).unwrap();
    let e = probe_spec::resolve_names(&mut def, line, &dbg).unwrap_err();
    assert_eq!(e.code, probe_spec::ErrorCode::NO_RETVAL);
}
