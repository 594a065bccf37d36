//! A write watch on Debian 6.1's `modprobe_path` (the cached 2-vCPU
//! snapshot): `echo /sbin/hvmod > /proc/sys/kernel/modprobe` in the guest
//! shell is caught with the writer in `proc_dostring` (6.1 inlines
//! `_proc_do_string` into it: System.map has no `_proc_do_string`) and the
//! new string; the old value is put back, the watch removed, and the guest
//! keeps running commands (its page holds other kernel data too).

#[path = "common/debian.rs"]
mod debian;

use debian::{snapshot_dir, DebianGuest};
use introspect::{WatchAccess, WatchRequest};

const NEW: &[u8] = b"/sbin/hvmod";

fn c_string(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|c| *c == 0).unwrap_or(b.len())]
}

#[test]
fn a_watch_on_modprobe_path_catches_the_sysctl_write() {
    let Some(dir) = snapshot_dir() else {
        return;
    };
    let mut g = DebianGuest::restore(&dir);
    assert_eq!(
        g.run("cat /proc/sys/kernel/modprobe", 300),
        0,
        "{}",
        g.console()
    );
    let addr = g.resolve("modprobe_path");
    let old = g.read_kernel(addr, 64);
    let old_text = String::from_utf8_lossy(c_string(&old)).into_owned();
    assert!(old_text.starts_with('/'), "{old_text:?}");
    let id = g
        .engine
        .watch(WatchRequest {
            name: "modprobe_path".into(),
            addr,
            len: 64,
            access: WatchAccess::Write,
            mechanism: None,
        })
        .unwrap();
    assert_eq!(
        g.run(
            &format!(
                "echo {} > /proc/sys/kernel/modprobe",
                String::from_utf8_lossy(NEW)
            ),
            300
        ),
        0,
        "{}",
        g.console()
    );
    let (hits, dropped) = g.engine.take_watch_hits();
    assert_eq!(dropped, 0);
    let hits: Vec<_> = hits.into_iter().filter(|h| h.watch == id).collect();
    eprintln!(
        "{} hits; first {:?}; last new {:?}",
        hits.len(),
        hits.first().map(|h| (&h.writer, h.len, h.addr, &h.task)),
        hits.last()
            .map(|h| String::from_utf8_lossy(c_string(&h.new)).into_owned())
    );
    // _proc_do_string stores the string a byte at a time, then its NUL.
    assert_eq!(hits.len(), NEW.len() + 1);
    for h in &hits {
        assert!(h.writer.starts_with("proc_dostring+"), "{h:?}");
        assert_eq!(h.writers.len(), 1, "{h:?}");
        assert!(h.addr >= addr && h.addr < addr + 64, "{h:?}");
    }
    let last = hits.last().unwrap();
    assert_eq!(c_string(&last.new), NEW, "the final value");
    assert_eq!(
        c_string(&hits[0].old),
        old_text.as_bytes(),
        "the value before"
    );
    let comm = last
        .task
        .as_ref()
        .map(|t| String::from_utf8_lossy(t.comm()).into_owned());
    assert!(comm.is_some(), "{last:?}");
    assert_eq!(c_string(&g.read_kernel(addr, 64)), NEW);

    // Put the old value back (a hit too), remove the watch, carry on.
    assert_eq!(
        g.run(&format!("echo {old_text} > /proc/sys/kernel/modprobe"), 300),
        0,
        "{}",
        g.console()
    );
    let (back, _) = g.engine.take_watch_hits();
    assert_eq!(
        c_string(&back.last().expect("the restoring write").new),
        old_text.as_bytes()
    );
    g.engine.unwatch(id).unwrap();
    assert!(g.engine.watched_pages().is_empty());
    assert_eq!(c_string(&g.read_kernel(addr, 64)), old_text.as_bytes());
    assert_eq!(
        g.run("cat /proc/sys/kernel/modprobe", 300),
        0,
        "{}",
        g.console()
    );
    assert_eq!(g.run("ls /proc/self", 300), 0, "{}", g.console());
    assert_eq!(g.run("cat /proc/version", 300), 0, "{}", g.console());
    eprintln!("watch stats: {:?}", g.exit_stats().watch);
}
