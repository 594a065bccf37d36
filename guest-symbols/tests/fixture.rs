//! A small C file compiled here with gcc (kernel code model, -O2 -g) for the
//! DWARF shapes the test guest does not have.

use guest_symbols::{DebugInfo, KernelImage, ParamLocation};
use std::path::PathBuf;
use std::process::Command;

/// Built once per test process (tests run in parallel threads).
fn build() -> &'static PathBuf {
    static OUT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    OUT.get_or_init(compile)
}

fn compile() -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixture/types.c");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("symbols-fixture.elf");
    let ok = Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-mcmodel=kernel",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-mno-red-zone",
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-asynchronous-unwind-tables",
            "-Wl,-Ttext=0xffffffff81000000",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    // gcc is part of the build environment (the test guest needs it too).
    assert!(ok, "gcc failed to build {}", src.display());
    out
}

fn dbg() -> DebugInfo {
    DebugInfo::from_image(KernelImage::open(build()).unwrap()).unwrap()
}

#[test]
fn members_through_typedefs_anonymous_and_bitfields() {
    let d = dbg();
    let o = |p: &str| d.member(p).unwrap();
    // Layout as gcc lays it out (checked with `gdb ptype/o struct outer`):
    // tag@0, in@8 (16 bytes), union@24, bitfields@32, comm@36, next@56.
    assert_eq!(o("outer.in").offset, 8);
    // gcc chooses the qualifier order in DWARF.
    let t = o("outer.in").type_name;
    assert!(
        t == "const volatile inner_t" || t == "volatile const inner_t",
        "{t}"
    );
    assert_eq!(o("outer.in").size, Some(16));
    assert_eq!(o("outer.in.pair.hi").offset, 8 + 8 + 4);
    assert_eq!(o("outer.pid").offset, 24);
    assert_eq!(o("outer.pid").type_name, "pid_t");
    assert_eq!(o("outer.raw").size, Some(8));
    let y = o("outer.y");
    assert_eq!((y.offset, y.bitfield), (32, Some((3, 5))));
    assert_eq!(o("outer.comm").type_name, "char[16]");
    assert_eq!(o("outer.comm").offset, 36);
    assert_eq!(o("outer.next").offset, 56);
    assert_eq!(o("inner.pair").size, Some(8));
    assert!(matches!(
        d.member("outer.tag.x"),
        Err(guest_symbols::DwarfError::NotAggregate { .. })
    ));
}

#[test]
fn stack_and_by_value_parameters() {
    let d = dbg();
    let m = d.function_params("many").unwrap();
    assert_eq!(m.params.len(), 8);
    for (p, r) in m.params.iter().zip(["di", "si", "dx", "cx", "r8", "r9"]) {
        assert_eq!(p.location, ParamLocation::Register(reg(r)), "{}", p.name);
    }
    // 7th and 8th are above the return address.
    assert_eq!(m.params[6].location, ParamLocation::Stack(8));
    assert_eq!(m.params[7].location, ParamLocation::Stack(16));

    let b = d.function_params("by_value").unwrap();
    let kinds: Vec<_> = b.params.iter().map(|p| (p.name.as_str(), p.size)).collect();
    assert_eq!(kinds, [("b", Some(24)), ("s", Some(16)), ("k", Some(4))]);
    // struct big (24 bytes) in memory; small in rdi:rsi; k in rdx.
    let abi: Vec<_> = b.params.iter().map(|p| (p.location, p.source)).collect();
    assert_eq!(abi[0].0, ParamLocation::Stack(8), "{abi:?}");
    assert_eq!(abi[2].0, ParamLocation::Register(reg("dx")), "{abi:?}");

    // Returning struct big in memory takes %rdi for the hidden pointer.
    let r = d.function_params("ret_big").unwrap();
    assert_eq!(r.params[0].location, ParamLocation::Register(reg("si")));
    assert_eq!(r.params[1].location, ParamLocation::Register(reg("dx")));
}

fn reg(name: &str) -> guest_symbols::Register {
    let n = ["ax", "dx", "cx", "bx", "si", "di", "bp", "sp", "r8", "r9"]
        .iter()
        .position(|r| *r == name)
        .unwrap();
    guest_symbols::Register(n as u16)
}
