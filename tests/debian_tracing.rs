//! The guest's own tracing beside hvprobe on Debian's 6.1 kernel (issue 11,
//! item 6): hvprobe probes at a function's entry while the guest puts its
//! own kprobe (kprobe_events, ftrace-based on this kernel) and the function
//! tracer on that function and on its caller (the openat system call). Both sides see every call,
//! the guest logs no ftrace bug or warning, each side keeps working when the
//! other goes, and the guest's text is byte-identical to the original when
//! both are gone.
//!
//! Why it works: hvprobe plants its int3 after the function's ftrace site
//! (the `call __fentry__` that the kernel turned into a 5-byte nop at boot),
//! so ftrace finds the bytes it expects when it patches the site.

#[path = "common/debian.rs"]
mod debian;

use std::time::Duration;

use debian::{field, DebianGuest};
use proto::v1;

const T: &str = "/sys/kernel/tracing";
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// What ftrace and kprobes print when they fail or warn.
const TROUBLE: &str = "-e 'ftrace bug' -e 'ftrace faulted' -e 'ftrace failed' -e 'WARNING:' \
                       -e 'Failed to' -e 'BUG:'";

/// `hvopen N /etc/hostname`: its pid from what it prints.
fn hvopen(g: &mut DebianGuest, n: usize) -> i32 {
    g.type_line(&format!("hvopen {n} /etc/hostname"));
    let done = g.wait_console("HVPROBE-HVOPEN n=", 600);
    assert_eq!(
        g.wait_console("HVPROBE-CMD-DONE rc=", 120),
        "HVPROBE-CMD-DONE rc=0"
    );
    assert_eq!(field::<usize>(&done, "opened"), n, "{done}");
    field(&done, "pid")
}

/// Lines of the guest's trace buffer from process `pid` that contain
/// `what`, counted by the guest.
fn guest_count(g: &mut DebianGuest, pid: i32, what: &str) -> usize {
    g.type_line(&format!(
        "echo \"HVT-COUNT $(grep -c -e '-{pid} .*{what}' {T}/trace)\""
    ));
    echoed_number(g, "HVT-COUNT ")
}

fn trouble_lines(g: &mut DebianGuest) -> usize {
    g.type_line(&format!(
        "echo \"HVT-TROUBLE $(dmesg | grep -c {TROUBLE})\""
    ));
    echoed_number(g, "HVT-TROUBLE ")
}

/// The number the guest echoed after `tag`. The shell's echo of the typed
/// command can start a console record too, when a kernel log line splits
/// it ("HVT-COUNT $(grep ..."): only a number is the answer.
fn echoed_number(g: &mut DebianGuest, tag: &str) -> usize {
    loop {
        let line = g.wait_console(tag, 300);
        if let Ok(n) = line[tag.len()..].trim().parse() {
            return n;
        }
        eprintln!("not the number: {line:?}");
    }
}

fn sh(g: &mut DebianGuest, cmd: &str) {
    assert_eq!(g.run(cmd, 900), 0, "guest command failed: {cmd}");
}

#[test]
fn guest_ftrace_and_kprobes_share_a_function_with_hvprobe() {
    let Some(mut g) = DebianGuest::start() else {
        return;
    };
    let f = g.resolve("do_sys_openat2");
    let caller = g.resolve("__x64_sys_openat");
    let orig_f = g.read_kernel(f, 64);
    let orig_caller = g.read_kernel(caller, 64);
    assert_eq!(
        orig_f[..5],
        NOP5,
        "do_sys_openat2 starts with the booted ftrace nop"
    );
    let trouble_at_start = trouble_lines(&mut g);

    let filter = r#"comm == "hvopen""#;
    let defs = [
        ("p:hv6/open do_sys_openat2 path=+0(%si):string", filter),
        ("r:hv6/open_ret do_sys_openat2 ret=$retval:s64", filter),
        ("p:hv6/caller __x64_sys_openat", filter),
    ];
    let ids = g.create(&defs);
    for p in g.engine.list() {
        eprintln!("{p}");
        if ids.contains(&p.id) {
            assert_eq!(p.site, p.address + 5, "planted after the ftrace site: {p}");
        }
    }
    let sub = g.subscribe(v1::SubscribeRequest::default());

    // The guest's own kprobe and function tracer on the same two functions.
    sh(
        &mut g,
        &format!("echo 'p:gk/openat do_sys_openat2' > {T}/kprobe_events"),
    );
    sh(&mut g, &format!("echo 1 > {T}/events/gk/openat/enable"));
    sh(
        &mut g,
        &format!("echo 'do_sys_openat2 __x64_sys_openat' > {T}/set_ftrace_filter"),
    );
    sh(&mut g, &format!("echo function > {T}/current_tracer"));
    sh(&mut g, &format!("echo > {T}/trace"));
    assert_ne!(
        g.read_kernel(f, 5),
        NOP5,
        "the guest's ftrace patched its site"
    );

    // Both sides, every call.
    let pid = hvopen(&mut g, 5);
    let events = sub.drain(Duration::from_millis(500));
    let of = |i: usize| {
        events
            .iter()
            .filter(|e| e.probe_id == ids[i] && e.pid == Some(pid))
            .count()
    };
    assert_eq!(
        (of(0), of(1), of(2)),
        (5, 5, 5),
        "hvprobe, with the guest tracing too"
    );
    assert_eq!(guest_count(&mut g, pid, "openat:"), 5, "guest kprobe");
    assert_eq!(
        guest_count(&mut g, pid, "do_sys_openat2 <-"),
        5,
        "guest function tracer"
    );
    assert_eq!(
        guest_count(&mut g, pid, "__x64_sys_openat <-"),
        5,
        "guest function tracer (caller)"
    );

    // hvprobe goes: the guest keeps tracing, hvprobe's bytes are gone.
    g.delete(&ids);
    assert_eq!(
        g.read_kernel(f + 5, 59),
        orig_f[5..],
        "after hvprobe's delete"
    );
    sh(&mut g, &format!("echo > {T}/trace"));
    let pid = hvopen(&mut g, 3);
    assert_eq!(guest_count(&mut g, pid, "openat:"), 3, "guest kprobe alone");
    assert_eq!(
        guest_count(&mut g, pid, "do_sys_openat2 <-"),
        3,
        "guest tracer alone"
    );

    // hvprobe comes back, then the guest's tracing goes: hvprobe keeps working.
    let ids = g.create(&defs);
    sh(&mut g, &format!("echo nop > {T}/current_tracer"));
    sh(&mut g, &format!("echo > {T}/set_ftrace_filter"));
    sh(&mut g, &format!("echo 0 > {T}/events/gk/openat/enable"));
    sh(&mut g, &format!("echo '-:gk/openat' >> {T}/kprobe_events"));
    assert_eq!(
        g.read_kernel(f, 5),
        NOP5,
        "the guest's ftrace put its nop back"
    );
    sh(&mut g, &format!("echo > {T}/trace"));
    let pid = hvopen(&mut g, 4);
    let events = sub.drain(Duration::from_millis(500));
    let of = |i: usize| {
        events
            .iter()
            .filter(|e| e.probe_id == ids[i] && e.pid == Some(pid))
            .count()
    };
    assert_eq!((of(0), of(1), of(2)), (4, 4, 4), "hvprobe alone");
    assert_eq!(
        guest_count(&mut g, pid, "do_sys_openat2"),
        0,
        "the guest no longer traces"
    );
    assert_eq!(sub.lost(), 0);

    // Both gone: the text is the original, and the guest complained of nothing.
    g.delete(&ids);
    assert_eq!(g.read_kernel(f, 64), orig_f, "do_sys_openat2 byte for byte");
    assert_eq!(
        g.read_kernel(caller, 64),
        orig_caller,
        "__x64_sys_openat byte for byte"
    );
    assert_eq!(
        trouble_lines(&mut g),
        trouble_at_start,
        "new ftrace/kprobe failures or warnings in the guest's log"
    );
}
