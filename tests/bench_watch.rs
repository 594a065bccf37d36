//! `hvprobe bench` reports the cost of watched-page writes (a short run):
//! both lines are there, every watched write was a hit.

mod common;

use common::{hvprobe_cli, kvm_available};

#[test]
fn bench_prints_watched_and_unwatched_write_costs() {
    if !kvm_available() {
        return;
    }
    let (code, out, err) = hvprobe_cli(&["bench", "--iters", "300", "--rounds", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = |what: &str| {
        out.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line in:\n{out}"))
            .to_string()
    };
    let watched = line("watched write (hv_watch_set, with event)");
    assert!(!watched.contains("!="), "{watched}");
    assert!(watched.contains("bare exits"), "{watched}");
    line("unwatched write on a watched page");
    line("host share per watched-page write");
}
