//! Module probes on Debian's 6.1 kernel (issue 11, item 4), on the cached
//! console snapshot, with binfmt_misc.ko from the same kernel package
//! (/lib/binfmt_misc.ko in its initramfs): `binfmt_misc:SYM` probes are
//! accepted while the module is not loaded (pending), armed by `insmod`,
//! count exactly what the guest did, go `[GONE]` at `rmmod` (their int3s
//! removed before the module's memory is freed, nothing written on
//! delete) and are armed again by the next `insmod`.

#[path = "common/debian.rs"]
mod debian;

use std::collections::BTreeSet;
use std::time::Duration;

use debian::DebianGuest;
use proto::v1;

fn by_event<'a>(rows: &'a [v1::ProbeInfo], event: &str) -> &'a v1::ProbeInfo {
    rows.iter()
        .find(|p| p.event == event)
        .unwrap_or_else(|| panic!("no probe {event} in {rows:#?}"))
}

const REGISTER: &str = "/proc/sys/fs/binfmt_misc/register";

#[test]
fn binfmt_misc_probes_pending_armed_counted_gone_and_armed_again() {
    let Some(mut g) = DebianGuest::start() else {
        return;
    };
    // load_misc_binary(bprm): the file being executed, by the offset of
    // linux_binprm.filename in vmlinux's DWARF (the module has none here).
    let vmlinux = debian::snapshot_dir()
        .unwrap()
        .parent()
        .unwrap()
        .join("vmlinux");
    let filename = guest_symbols::DebugInfo::open(&vmlinux)
        .unwrap()
        .member_offset("linux_binprm.filename")
        .unwrap();
    let load_def =
        format!("p:hvmod/load binfmt_misc:load_misc_binary file=+0(+{filename}(%di)):string");
    let ids = g.create(&[
        (
            "p:hvmod/register binfmt_misc:bm_register_write count=%dx:s64",
            "",
        ),
        (load_def.as_str(), ""),
        ("p:hvmod/nosuch binfmt_misc:no_such_function", ""),
    ]);
    let (register, load, nosuch) = (ids[0], ids[1], ids[2]);
    let rows = g.list();
    for p in &rows {
        assert!(p.pending && !p.gone && p.address == 0, "{p:?}");
    }
    assert_eq!(
        by_event(&rows, "register").location,
        "binfmt_misc:bm_register_write"
    );
    // Only the two module hooks (do_init_module, free_module) are planted.
    let hooks: BTreeSet<(u64, u8)> = g.engine.planted_bytes().into_iter().collect();
    assert_eq!(hooks.len(), 2, "{hooks:x?}");
    let events0 = g.engine.stats().module_events;

    let sub = g.subscribe(v1::SubscribeRequest::default());
    assert_eq!(
        g.run("insmod /lib/binfmt_misc.ko", 900),
        0,
        "{}",
        g.console()
    );
    assert_eq!(g.engine.stats().module_events, events0 + 1, "insmod seen");
    let rows = g.list();
    let reg = by_event(&rows, "register");
    assert!(!reg.pending && !reg.gone && reg.address != 0, "{reg:?}");
    assert_eq!(reg.location, "binfmt_misc:bm_register_write", "{reg:?}");
    // The engine names the point from the module's own kallsyms.
    let row = g
        .engine
        .list()
        .into_iter()
        .find(|p| p.id == register)
        .unwrap();
    assert!(
        row.location.starts_with("bm_register_write+0x0/")
            && row.location.ends_with(" [binfmt_misc]"),
        "{row:?}"
    );
    let first_address = reg.address;
    assert!(
        first_address >= 0xffff_ffff_c000_0000,
        "module space: {first_address:#x}"
    );
    let ns = by_event(&rows, "nosuch");
    assert!(ns.pending, "{ns:?}");
    assert!(
        ns.module_error.contains("binfmt_misc") && ns.module_error.contains("no_such_function"),
        "{ns:?}"
    );
    // Two new int3s in the module's text (register, load); the +5 site.
    let armed: BTreeSet<(u64, u8)> = g.engine.planted_bytes().into_iter().collect();
    let module_sites: Vec<(u64, u8)> = armed.difference(&hooks).copied().collect();
    assert_eq!(module_sites.len(), 2, "{armed:x?}");
    assert_eq!(g.read_kernel(reg.site_address, 1), [0xcc]);
    eprintln!("armed at insmod: {reg:?}");

    // Once loaded, a function the module lacks is refused, naming both.
    let e = g.create_refused("p:hvmod/bad binfmt_misc:not_in_binfmt_misc");
    assert!(
        e.message().contains("binfmt_misc") && e.message().contains("not_in_binfmt_misc"),
        "{e:?}"
    );

    // The guest: 2 registrations, 3 execs of a file only binfmt_misc takes
    // (ELF and #! handlers come first and decline it).
    let entry1 = ":hvx:E::hvx::/bin/true:";
    let entry2 = ":hvy:E::hvy::/bin/true:";
    let cmd = format!(
        "mount -t binfmt_misc none /proc/sys/fs/binfmt_misc && \
         printf '%s' '{entry1}' > {REGISTER} && printf '%s' '{entry2}' > {REGISTER} && \
         mkdir -p /tmp && printf 'x' > /tmp/a.hvx && chmod +x /tmp/a.hvx && \
         /tmp/a.hvx && /tmp/a.hvx && /tmp/a.hvx && \
         cat /proc/sys/fs/binfmt_misc/hvx"
    );
    assert_eq!(g.run(&cmd, 900), 0, "{}", g.console());
    let events = sub.drain(Duration::from_millis(500));
    let regs: Vec<_> = events.iter().filter(|e| e.probe_id == register).collect();
    // binfmt_misc is first in the kernel's handler list: every exec asks
    // it, a.hvx's and its interpreter's among them.
    let files: Vec<String> = events
        .iter()
        .filter(|e| e.probe_id == load)
        .map(|e| String::from_utf8_lossy(&debian::arg_bytes(e, "file")).into_owned())
        .collect();
    eprintln!("load_misc_binary saw: {files:?}");
    let of = |f: &str| files.iter().filter(|x| *x == f).count();
    // Twice per exec of a.hvx: once for the file, once more when the exec
    // goes on with its interpreter (/bin/true; bprm->filename stays).
    assert_eq!(of("/tmp/a.hvx"), 2 * 3, "{files:?}");
    // The rest are busybox running its own applets (chmod, cat) through
    // /proc/self/exe.
    assert_eq!(of("/proc/self/exe"), files.len() - 6, "{files:?}");
    let loads = files.len();
    assert_eq!(regs.len(), 2, "{regs:?}");
    let counts: Vec<i64> = regs.iter().map(|e| debian::arg_i64(e, "count")).collect();
    assert_eq!(counts, [entry1.len() as i64, entry2.len() as i64]);
    let rows = g.list();
    assert_eq!(by_event(&rows, "register").hits, 2);
    assert_eq!(
        by_event(&rows, "load").hits,
        loads as u64,
        "every hit an event"
    );
    assert_eq!(sub.lost(), 0);

    // rmmod: the int3s leave before the module's memory is freed.
    assert_eq!(
        g.run("umount /proc/sys/fs/binfmt_misc && rmmod binfmt_misc", 900),
        0,
        "{}",
        g.console()
    );
    assert_eq!(g.engine.stats().module_events, events0 + 2, "rmmod seen");
    let after: BTreeSet<(u64, u8)> = g.engine.planted_bytes().into_iter().collect();
    assert_eq!(after, hooks, "only the hooks stay planted");
    let rows = g.list();
    for e in ["register", "load"] {
        let p = by_event(&rows, e);
        assert!(p.gone && !p.pending, "{p:?}");
    }
    let freed: Vec<u8> = module_sites
        .iter()
        .map(|(gpa, _)| g.read_phys(*gpa, 1)[0])
        .collect();
    eprintln!(
        "after rmmod, the freed sites hold {freed:02x?} (originals {:02x?})",
        module_sites.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    // The int3s were taken out at free_module, before the pages went back
    // to the allocator (they may be reused since, but not by an int3 of ours).
    assert!(
        !freed.contains(&0xcc),
        "an int3 left in the freed module text"
    );
    // Nothing fires any more: exec of a.hvx is no binfmt_misc business now.
    assert_ne!(g.run("/tmp/a.hvx", 300), 0, "no handler for a.hvx any more");
    let late = sub.drain(Duration::from_millis(500));
    assert!(
        late.iter()
            .all(|e| e.probe_id != register && e.probe_id != load),
        "{late:?}"
    );
    // Deleting a gone probe writes nothing into the freed text (the guest
    // sits idle at its console read meanwhile; the pages may have been
    // reused by now: seen [00, 88] where [55, 8b] was).
    let before_delete: Vec<u8> = module_sites
        .iter()
        .map(|(gpa, _)| g.read_phys(*gpa, 1)[0])
        .collect();
    eprintln!("before the delete, the freed sites hold {before_delete:02x?}");
    g.delete(&[load]);
    let now: Vec<u8> = module_sites
        .iter()
        .map(|(gpa, _)| g.read_phys(*gpa, 1)[0])
        .collect();
    assert_eq!(now, before_delete, "the delete wrote into freed memory");

    // insmod again: the remaining probe is armed again and counts on.
    assert_eq!(
        g.run("insmod /lib/binfmt_misc.ko", 900),
        0,
        "{}",
        g.console()
    );
    let rows = g.list();
    let reg = by_event(&rows, "register");
    assert!(!reg.gone && !reg.pending && reg.address != 0, "{reg:?}");
    eprintln!(
        "re-armed at the second insmod at {:#x} (first load at {first_address:#x})",
        reg.address
    );
    assert_eq!(g.read_kernel(reg.site_address, 1), [0xcc]);
    let cmd = format!(
        "mount -t binfmt_misc none /proc/sys/fs/binfmt_misc && \
         printf '%s' '{entry1}' > {REGISTER} && umount /proc/sys/fs/binfmt_misc && \
         rmmod binfmt_misc"
    );
    assert_eq!(g.run(&cmd, 900), 0, "{}", g.console());
    let rows = g.list();
    let reg = by_event(&rows, "register");
    assert_eq!(reg.hits, 3, "{reg:?}");
    assert!(reg.gone, "{reg:?}");
    assert!(by_event(&rows, "nosuch").pending);
    g.delete(&[register, nosuch]);
    assert_eq!(
        g.engine
            .planted_bytes()
            .into_iter()
            .collect::<BTreeSet<_>>(),
        hooks
    );
    eprintln!("engine stats: {:?}", g.engine.stats());
}
