//! KASLR the way distributions boot (issue 11, item 7): Debian's bzImage
//! booted once with KASLR on (tests/debian/snapshot.sh --kaslr, 1 vCPU) and
//! cached; restored here. The slide is found in guest memory (the IDT's #PF
//! gate against `asm_exc_page_fault`, checked with the banner at the slid
//! `linux_banner`) and every address the service hands out or takes is slid.

#[path = "common/debian.rs"]
mod debian;

use std::time::Duration;

use debian::{arg_bytes, field, DebianGuest};
use proto::v1;

#[test]
fn probes_by_symbol_hit_at_the_slid_address() {
    let Some(dir) = debian::snapshot_dir_from("HVPROBE_DEBIAN_KASLR_SNAPSHOT") else {
        return;
    };
    let mut g = DebianGuest::restore(&dir);
    let info = g.info();
    let slide = info.kaslr_slide;
    assert!(info.kaslr_verified, "{info:?}");
    assert_ne!(
        slide, 0,
        "KASLR on, yet the kernel runs at its link address: {info:?}"
    );
    assert_eq!(slide.unsigned_abs() % (2 << 20), 0, "slide {slide:#x}");
    assert!(
        info.kernel_banner.starts_with("Linux version 6.1"),
        "{info:?}"
    );

    let symbols = service::Symbols::from_vmlinux(&dir.parent().unwrap().join("vmlinux")).unwrap();
    let link = symbols.table().lookup("do_sys_openat2").unwrap();
    let runtime = g.resolve("do_sys_openat2");
    assert_eq!(
        runtime,
        link.wrapping_add_signed(slide),
        "ResolveSymbol slides"
    );

    let filter = r#"comm == "hvopen""#;
    let ids = g.create(&[
        ("p:kaslr/open do_sys_openat2 path=+0(%si):string", filter),
        ("r:kaslr/open_ret do_sys_openat2 ret=$retval:s64", filter),
    ]);
    let listed = g.engine.list();
    let at = |id| listed.iter().find(|p| p.id == id).unwrap().address;
    assert_eq!(
        (at(ids[0]), at(ids[1])),
        (runtime, runtime),
        "planted at the slid address"
    );
    let site = |id| listed.iter().find(|p| p.id == id).unwrap().site;
    assert_eq!(
        (site(ids[0]), site(ids[1])),
        (runtime + 5, runtime + 5),
        "the int3 after the slid function's ftrace nop"
    );
    let sub = g.subscribe(v1::SubscribeRequest::default());
    let rc = g.run("hvopen 3 /etc/hostname", 600);
    assert_eq!(rc, 0, "{}", g.console());
    let done = g
        .console()
        .lines()
        .rev()
        .find(|l| l.contains("HVPROBE-HVOPEN n="))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("hvopen printed nothing:\n{}", g.console()));
    let events = sub.drain(Duration::from_millis(500));
    assert_eq!(sub.lost(), 0);
    let entries: Vec<_> = events.iter().filter(|e| e.probe_id == ids[0]).collect();
    let returns: Vec<_> = events.iter().filter(|e| e.probe_id == ids[1]).collect();
    assert_eq!((entries.len(), returns.len()), (3, 3), "{events:?}");
    for e in &entries {
        assert_eq!(e.ip, runtime);
        assert_eq!(arg_bytes(e, "path"), b"/etc/hostname");
        assert_eq!(e.pid, Some(field::<i32>(&done, "pid")));
        assert!(
            e.text.contains("do_sys_openat2+0x0/"),
            "symbolized: {}",
            e.text
        );
    }
    let fds: Vec<String> = returns
        .iter()
        .map(|e| e.ret.as_ref().unwrap().retval.to_string())
        .collect();
    assert_eq!(fds.join(","), field::<String>(&done, "fds"));
    // init_task is slid too: the task list walks.
    let tasks = g.list_tasks();
    assert!(tasks.iter().any(|t| t.pid == 1), "{tasks:?}");
    eprintln!(
        "KASLR slide {slide:#x}: do_sys_openat2 {link:#x} -> {runtime:#x}; 3 opens, 3 returns, \
         fds {}; {} tasks",
        fds.join(","),
        tasks.len()
    );
}
