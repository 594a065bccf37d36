//! Probe actions on Debian's 6.1 cloud kernel (the cached 2-vCPU snapshot):
//! an `override` of `do_sys_openat2` filtered to one path makes `cat` of
//! that path fail with the chosen errno, while other files open; the event
//! says what was done; deleting the probe gives the file back.

#[path = "common/debian.rs"]
mod debian;

use std::time::Duration;

use debian::{arg_bytes, snapshot_dir, DebianGuest};
use proto::v1::{self, action_taken::Taken, probe_action::Action};

/// EACCES: `cat` says "Permission denied", which nothing else here does.
const EACCES: i64 = 13;

#[test]
fn override_of_openat2_fails_one_path_and_no_other() {
    let Some(dir) = snapshot_dir() else {
        return;
    };
    let mut g = DebianGuest::restore_with(
        &dir,
        service::ServiceConfig {
            allow_actions: true,
            ..Default::default()
        },
    );
    assert_eq!(g.run("cat /etc/hostname", 300), 0, "{}", g.console());
    // A void function cannot be overridden (DWARF says so).
    let s = g
        .create_defs(vec![v1::ProbeDefinition {
            definition: Some(v1::probe_definition::Definition::KprobeEvents(
                "p:hv13/void fd_install".into(),
            )),
            action: Some(v1::ProbeAction {
                action: Some(Action::OverrideReturn(-1)),
            }),
            ..Default::default()
        }])
        .unwrap_err();
    assert!(s.message().contains("returns void"), "{}", s.message());
    let probes = g
        .create_defs(vec![v1::ProbeDefinition {
            definition: Some(v1::probe_definition::Definition::KprobeEvents(
                "p:hv13/deny do_sys_openat2 path=+0(%si):string".into(),
            )),
            filter: r#"path == "/etc/hostname""#.into(),
            action: Some(v1::ProbeAction {
                action: Some(Action::OverrideReturn(-EACCES)),
            }),
            ..Default::default()
        }])
        .unwrap();
    let id = probes[0].id;
    let sub = g.subscribe(v1::SubscribeRequest {
        probe_ids: vec![id],
        ..Default::default()
    });
    assert_eq!(g.run("cat /etc/hostname", 300), 1, "{}", g.console());
    // (Printed before the status line `run` waited for.)
    let console = g.console();
    assert!(
        console.contains("cat: can't open '/etc/hostname': Permission denied"),
        "{console}"
    );
    // Other files open.
    assert_eq!(g.run("cat /proc/version", 300), 0, "{}", g.console());
    assert_eq!(g.run("ls /etc", 300), 0, "{}", g.console());
    let events = sub.drain(Duration::from_millis(500));
    assert_eq!(sub.lost(), 0);
    assert!(!events.is_empty());
    for e in &events {
        assert_eq!(arg_bytes(e, "path"), b"/etc/hostname", "{e:?}");
        let taken = e.action.as_ref().and_then(|a| a.taken.clone());
        assert_eq!(taken, Some(Taken::OverrideReturn(-EACCES)), "{e:?}");
    }
    let info = g.engine.list().into_iter().find(|p| p.id == id).unwrap();
    assert_eq!(info.actions, events.len() as u64);
    // Gone: the file opens again.
    g.delete(&[id]);
    assert_eq!(g.run("cat /etc/hostname", 300), 0, "{}", g.console());
}
