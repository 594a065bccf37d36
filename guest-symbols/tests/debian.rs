//! Checks on the real Debian 6.1 cloud kernel fetched by
//! `tests/debian/fetch-kernel.sh --dbg`. Skipped with a visible message when
//! the files are absent, unless HVPROBE_REQUIRE_DEBIAN=1 (CI).

mod common;

use common::Slid;
use guest_symbols::{
    find_kallsyms, find_kaslr_slide, load_system_map, read_guest_kallsyms, AddressEncoding,
    Blacklist, DebugInfo, KernelImage, LocationSource, ParamLocation, SymbolTable,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Printed outside the test harness's capture so it shows in CI logs.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

struct Kernel {
    image: KernelImage,
    map: SymbolTable,
    dir: PathBuf,
}

fn kernel() -> Option<&'static Kernel> {
    static K: OnceLock<Option<Kernel>> = OnceLock::new();
    K.get_or_init(|| {
        let dir = std::env::var_os("HVPROBE_DEBIAN_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../artifacts/debian"),
            PathBuf::from,
        );
        let required = std::env::var("HVPROBE_REQUIRE_DEBIAN").is_ok_and(|v| v == "1");
        let missing = |why: String| {
            assert!(!required, "HVPROBE_REQUIRE_DEBIAN=1 but {why}");
            say(&format!(
                "SKIPPED: {why} (run tests/debian/fetch-kernel.sh --dbg)"
            ));
            None
        };
        let (vmlinux, map) = (dir.join("vmlinux"), dir.join("System.map"));
        if !vmlinux.exists() || !map.exists() {
            return missing(format!("no vmlinux/System.map in {}", dir.display()));
        }
        let map = match load_system_map(&map) {
            Ok(m) if m.len() > 10_000 => m,
            // The -unsigned package ships a one-line placeholder.
            r => {
                return missing(format!(
                    "{}/System.map is not the real map ({:?} symbols); it is in the -dbg package",
                    dir.display(),
                    r.map(|m| m.len()).ok()
                ))
            }
        };
        let image = KernelImage::open(&vmlinux).expect("open vmlinux");
        Some(Kernel { image, map, dir })
    })
    .as_ref()
}

#[test]
fn elf_addresses_equal_system_map() {
    let Some(k) = kernel() else { return };
    for name in [
        "do_sys_openat2",
        "vfs_read",
        "entry_SYSCALL_64",
        "linux_banner",
    ] {
        let from_map = k.map.lookup(name).unwrap();
        assert_eq!(k.image.symbol_address(name), Some(from_map), "{name}");
    }
    let elf = k.image.symbols().unwrap();
    assert_eq!(elf.lookup("vfs_read"), k.map.lookup("vfs_read"));
    let d = elf.describe(k.map.lookup("vfs_read").unwrap() + 5).unwrap();
    assert_eq!((d.name.as_str(), d.offset), ("vfs_read", 5));
    assert!(d.size > 5);
}

#[test]
fn do_sys_openat2_params() {
    let Some(k) = kernel() else { return };
    let dbg = DebugInfo::open(k.dir.join("vmlinux")).unwrap();
    let f = dbg.function_params("do_sys_openat2").unwrap();
    assert_eq!(f.entry, k.map.lookup("do_sys_openat2").unwrap());
    let got: Vec<(&str, &str, ParamLocation)> = f
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.type_name.as_str(), p.location))
        .collect();
    say(&format!("do_sys_openat2 params: {got:?}"));
    let names: Vec<&str> = got.iter().map(|g| g.0).collect();
    assert_eq!(names, ["dfd", "filename", "how"]);
    // `static long do_sys_openat2(...)`.
    assert_eq!(f.return_type, Some(("long int".to_string(), Some(8))));
    let regs: Vec<&str> = f
        .params
        .iter()
        .map(|p| match p.location {
            ParamLocation::Register(r) => r.kprobe_name(),
            other => panic!("{}: {other:?}", p.name),
        })
        .collect();
    assert_eq!(regs, ["di", "si", "dx"]);
    assert!(f.params.iter().all(|p| p.source == LocationSource::Dwarf));
    assert_eq!(f.params[1].type_name, "const char *");
    assert_eq!(f.params[2].type_name, "struct open_how *");
}

/// Offsets from gdb on the same file, when gdb is installed (independent
/// oracle); the sizes and types are checked either way.
fn gdb_offsets(vmlinux: &std::path::Path, exprs: &[&str]) -> Option<Vec<u64>> {
    let mut cmd = std::process::Command::new("gdb");
    cmd.args(["-batch", "-nx"]);
    for e in exprs {
        cmd.arg("-ex").arg(format!("print/d (unsigned long)&{e}"));
    }
    let out = cmd.arg(vmlinux).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_once("= ").and_then(|(_, n)| n.trim().parse().ok()))
        .collect();
    (v.len() == exprs.len()).then_some(v)
}

#[test]
fn task_struct_members() {
    let Some(k) = kernel() else { return };
    let dbg = DebugInfo::open(k.dir.join("vmlinux")).unwrap();
    let comm = dbg.member("task_struct.comm").unwrap();
    let pid = dbg.member("task_struct.pid").unwrap();
    let dentry = dbg.member("file.f_path.dentry").unwrap();
    say(&format!(
        "task_struct.comm={comm:?} task_struct.pid={pid:?} file.f_path.dentry={dentry:?}"
    ));
    assert_eq!((comm.type_name.as_str(), comm.size), ("char[16]", Some(16)));
    assert_eq!((pid.type_name.as_str(), pid.size), ("pid_t", Some(4)));
    assert_eq!(dentry.type_name, "struct dentry *");
    if std::env::var_os("HVPROBE_SKIP_GDB").is_some() {
        return;
    }
    match gdb_offsets(
        &k.dir.join("vmlinux"),
        &[
            "((struct task_struct *)0)->comm",
            "((struct task_struct *)0)->pid",
            "((struct file *)0)->f_path.dentry",
        ],
    ) {
        Some(v) => assert_eq!(v, [comm.offset, pid.offset, dentry.offset]),
        None => say("task_struct_members: gdb not usable, offsets not cross-checked"),
    }
}

#[test]
fn kallsyms_from_raw_image_equal_system_map() {
    let Some(k) = kernel() else { return };
    // Search the loaded image bytes (PT_LOAD segments) by shape only.
    let (start, end) = k
        .image
        .loaded_ranges()
        .filter(|r| r.0 >= 0xffff_ffff_8000_0000)
        .fold((u64::MAX, 0), |a, r| (a.0.min(r.0), a.1.max(r.1)));
    let layout = find_kallsyms(&k.image, start, end).unwrap();
    // Independent check of where it was found, from the ELF symtab.
    for (name, at) in [
        ("kallsyms_token_table", layout.token_table),
        ("kallsyms_token_index", layout.token_index),
        ("kallsyms_names", layout.names),
        ("kallsyms_markers", layout.markers),
        ("kallsyms_num_syms", layout.num_syms_addr),
        ("kallsyms_offsets", layout.addresses),
    ] {
        assert_eq!(k.image.symbol_address(name), Some(at), "{name}");
    }
    assert_eq!(layout.encoding, AddressEncoding::BaseRelativeAbsolutePercpu);
    assert!(!layout.post_6_4);
    let decoded = guest_symbols::decode_kallsyms(&k.image, &layout).unwrap();
    assert_eq!(decoded.len(), layout.num_syms as usize);
    let mut matched = 0usize;
    let mut text_in_map = 0usize;
    for s in decoded.symbols().iter().filter(|s| s.is_text()) {
        assert!(
            k.map
                .all_named(&s.name)
                .any(|m| m.addr == s.addr && m.kind == s.kind),
            "decoded {} {:#x} {} not in System.map",
            s.name,
            s.addr,
            s.kind
        );
        matched += 1;
    }
    // And the other way: every text symbol of System.map kallsyms keeps.
    for m in k.map.symbols().iter().filter(|s| s.is_text()) {
        text_in_map += 1;
        assert!(
            decoded.all_named(&m.name).any(|d| d.addr == m.addr),
            "System.map {} {:#x} missing from decoded kallsyms",
            m.name,
            m.addr
        );
    }
    say(&format!(
        "kallsyms decoded from raw image: {} symbols, {matched} text symbols all equal System.map \
         ({text_in_map} text symbols in System.map)",
        decoded.len()
    ));
    assert!(matched > 30_000);
}

#[test]
fn kaslr_slide_from_lstar_and_banner() {
    let Some(k) = kernel() else { return };
    let slide = 0x1e0_0000u64 * 7;
    let mem = Slid(&k.image, slide);
    let lstar = k.map.lookup("entry_SYSCALL_64").unwrap() + slide;
    let found = find_kaslr_slide(&mem, lstar, &k.map, Some(&k.image)).unwrap();
    assert_eq!(found.slide, slide as i64);
    assert!(
        found.banner.starts_with("Linux version 6.1."),
        "{}",
        found.banner
    );
    // A wrong LSTAR (e.g. another kernel's) is refused, not trusted.
    assert!(find_kaslr_slide(&mem, lstar + 0x20_0000, &k.map, Some(&k.image)).is_err());
    // Zero-config: the tables are found from LSTAR alone in slid memory.
    // (The image's relative_base is not relocated here as the real boot
    // would, so names and count are compared, not addresses.)
    let guest = read_guest_kallsyms(&mem, lstar, 64 << 20).unwrap();
    let at_link =
        guest_symbols::read_kallsyms(&k.image, lstar - slide, lstar - slide + (64 << 20)).unwrap();
    assert_eq!(guest.len(), at_link.len());
    assert_eq!(
        guest.lookup("do_sys_openat2").ok(),
        at_link.lookup("do_sys_openat2").ok()
    );
}

#[test]
fn kprobe_blacklist_of_the_kernel() {
    let Some(k) = kernel() else { return };
    let syms = k.image.symbols().unwrap();
    let bl = Blacklist::from_image(&k.image, &syms).unwrap();
    say(&format!(
        "blacklist: {} functions from _kprobe_blacklist, {} ranges",
        bl.functions().len(),
        bl.ranges().len()
    ));
    let addr = |n: &str| k.map.lookup(n).unwrap();
    // NOKPROBE_SYMBOL(do_int3) etc., entry text, noinstr text.
    assert!(bl.contains(addr("do_int3")).is_some());
    assert!(bl.contains(addr("entry_SYSCALL_64") + 3).is_some());
    assert!(bl.contains(addr("__noinstr_text_start")).is_some());
    assert!(bl.contains(addr("do_sys_openat2")).is_none());
    assert!(bl.contains(addr("vfs_read")).is_none());
    // Jump labels and static calls: thousands in 6.1 (5,980 + 4,268 table
    // entries in 6.1.0-57), each refused, none of them a whole function.
    let bl = bl.with_patched_sites(&k.image, &syms);
    say(&format!(
        "blacklist: {} run-time patched sites",
        bl.patched_sites()
    ));
    assert!(bl.patched_sites() > 5000, "{}", bl.patched_sites());
    assert!(bl.contains(addr("do_sys_openat2")).is_none());
    assert!(bl.contains(addr("do_sys_openat2") + 5).is_none());
}
