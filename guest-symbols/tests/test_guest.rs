//! The test guest (gcc-built, Linux flags, DWARF) and its `nm` map.

mod common;

use common::Slid;
use guest_symbols::{
    find_kaslr_slide, load_system_map, parse_location, DebugInfo, KernelImage, LocationSource,
    ParamLocation,
};

fn image() -> KernelImage {
    KernelImage::open(test_guest::kernel_path()).expect("test guest ELF")
}

#[test]
fn nm_map_equals_elf_symbols() {
    let map = load_system_map(test_guest::system_map_path()).unwrap();
    let elf = image().symbols().unwrap();
    let mut checked = 0;
    for s in map.symbols().iter().filter(|s| s.is_text()) {
        assert!(
            elf.all_named(&s.name).any(|e| e.addr == s.addr),
            "{} {:#x}",
            s.name,
            s.addr
        );
        checked += 1;
    }
    assert!(checked >= test_guest::COUNTED_FUNCTIONS.len());
    for f in test_guest::COUNTED_FUNCTIONS {
        let a = map.lookup(f).unwrap();
        assert!(a >= 0xffff_ffff_8100_0000, "{f} linked at the kernel base");
        // With ELF sizes, describe() names the function across its body.
        let size = elf.describe(a).unwrap().size;
        let d = elf.describe(a + size - 1).unwrap();
        assert_eq!((d.name.as_str(), d.offset), (*f, size - 1));
        assert_eq!(elf.function_bounds(a + 1), Some((a, a + size)));
    }
    let loc = parse_location("hv_open_file+0x5").unwrap();
    assert_eq!(
        map.resolve(&loc),
        Ok(map.lookup("hv_open_file").unwrap() + 5)
    );
}

#[test]
fn hv_open_file_params() {
    let dbg = DebugInfo::from_image(image()).unwrap();
    let f = dbg.function_params("hv_open_file").unwrap();
    let got: Vec<(&str, &str, &str)> = f
        .params
        .iter()
        .map(|p| match p.location {
            ParamLocation::Register(r) => (p.name.as_str(), p.type_name.as_str(), r.kprobe_name()),
            l => panic!("{}: {l:?}", p.name),
        })
        .collect();
    assert_eq!(
        got,
        [
            ("dfd", "int", "di"),
            ("path", "const char *", "si"),
            ("flags", "int", "dx"),
            ("mode", "unsigned int", "cx")
        ]
    );
    assert!(f.params.iter().all(|p| p.source == LocationSource::Dwarf));
    let w = dbg.function_params("hv_work_item").unwrap();
    assert_eq!(w.params[0].type_name, "struct hv_work *");
    assert!(matches!(
        dbg.function_params("no_such_function"),
        Err(guest_symbols::DwarfError::FunctionNotFound(_))
    ));
}

#[test]
fn hv_work_members_match_contract() {
    let dbg = DebugInfo::from_image(image()).unwrap();
    for (m, off) in [
        ("id", test_guest::HV_WORK_OFF_ID),
        ("flags", test_guest::HV_WORK_OFF_FLAGS),
        ("name", test_guest::HV_WORK_OFF_NAME),
        ("next", test_guest::HV_WORK_OFF_NEXT),
        ("data", test_guest::HV_WORK_OFF_DATA),
    ] {
        assert_eq!(
            dbg.member_offset(&format!("hv_work.{m}")).unwrap(),
            off as u64,
            "{m}"
        );
    }
    let name = dbg.member("struct hv_work.name").unwrap();
    assert_eq!(name.size, Some(test_guest::HV_WORK_NAME_LEN as u64));
    assert_eq!(
        name.type_name,
        format!("char[{}]", test_guest::HV_WORK_NAME_LEN)
    );
    assert!(dbg.member("hv_work.nope").is_err());
    assert!(dbg.member("no_such_struct.x").is_err());
    assert!(dbg.member("hv_work.id.deeper").is_err());
}

#[test]
fn kaslr_slide_on_test_guest() {
    let img = image();
    let map = load_system_map(test_guest::system_map_path()).unwrap();
    let slide = 0x2a0_0000;
    let lstar = map.lookup(test_guest::SYSCALL_ENTRY_SYMBOL).unwrap() + slide;
    let s = find_kaslr_slide(&Slid(&img, slide), lstar, &map, Some(&img)).unwrap();
    assert_eq!(s.slide, slide as i64);
    assert_eq!(s.banner, test_guest::LINUX_BANNER.trim_end());
    assert!(find_kaslr_slide(&Slid(&img, slide), lstar - 0x20_0000, &map, Some(&img)).is_err());
}
