//! Init text on Debian's 6.1 kernel (issue 11, item 5). The boot that
//! tests/debian/snapshot.sh caches runs with an early probe
//! (`hvprobe run --probe`) on `populate_rootfs`, an `__init` function; once
//! at the console loop the script lists the probes into `init-probe.json`
//! beside the snapshot, deletes the probe and only then snapshots. So the
//! snapshot holds the guest's memory as hvprobe left it after deleting a
//! probe in freed init text.

#[path = "common/debian.rs"]
mod debian;

use debian::DebianGuest;
use guest_symbols::GuestMemory;
use proto::v1::{self, hv_probe_server::HvProbe};

/// Linux's `__START_KERNEL_map`: the PVH boot of vmlinux (nokaslr) puts
/// kernel virtual `0xffffffff80000000 + x` at physical `x`.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

fn hex(v: &serde_json::Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a hex string: {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn early_probe_in_init_text_fired_went_gone_and_its_delete_wrote_nothing() {
    let Some(dir) = debian::snapshot_dir() else {
        return;
    };
    let cache = dir.parent().unwrap();
    let listing = std::fs::read_to_string(cache.join("init-probe.json"))
        .expect("tests/debian/snapshot.sh keeps the early probe's listing beside the snapshot");
    let probe: serde_json::Value = listing
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|p| p["group"] == "hvinit" && p["event"] == "populate_rootfs")
        .unwrap_or_else(|| panic!("no hvinit/populate_rootfs in {listing}"));
    eprintln!("at the console loop: {probe}");
    assert_eq!(
        probe["hits"], 1,
        "populate_rootfs runs once at boot: {probe}"
    );
    assert_eq!(
        probe["state"], "gone",
        "init text is freed by then: {probe}"
    );
    let (addr, site) = (hex(&probe["address"]), hex(&probe["site"]));
    assert_eq!(
        site,
        addr + 5,
        "the int3 was after the ftrace site: {probe}"
    );

    // The boot's log: the early int3 did not upset ftrace's own patching
    // of every fentry site at boot (it checks the bytes first).
    let boot_log = std::fs::read_to_string(cache.join("console.log")).unwrap();
    for bad in ["ftrace bug", "ftrace faulted", "ftrace failed"] {
        assert!(!boot_log.contains(bad), "{bad:?} in the boot log");
    }

    let g = DebianGuest::restore(&dir);
    let symbols =
        service::Symbols::from_vmlinux(&cache.join("vmlinux")).expect("vmlinux beside the cache");
    let image = symbols.image().expect("the kernel image");
    let mut original = [0u8; 3];
    image.read_virt(site, &mut original).unwrap();
    assert_eq!(
        original,
        [0x83, 0xca, 0xff],
        "or $-1,%edx at populate_rootfs+5"
    );
    let now = g.read_phys(site - START_KERNEL_MAP, original.len());
    eprintln!(
        "populate_rootfs+5: {original:02x?} in vmlinux, {now:02x?} in the guest after the delete"
    );
    assert_ne!(
        now, original,
        "the delete wrote the old instruction into freed memory"
    );
    assert_ne!(
        now[0], 0x83,
        "the delete wrote the old byte into freed memory"
    );

    // A new probe there is refused with the reason.
    let req = v1::CreateProbeRequest {
        definition: Some(v1::ProbeDefinition {
            definition: Some(v1::probe_definition::Definition::KprobeEvents(
                "p:hvinit/again populate_rootfs".into(),
            )),
            ..Default::default()
        }),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(g.service.create_probe(tonic::Request::new(req)))
        .expect_err("a probe in freed init text");
    assert!(
        err.message().contains("INIT_TEXT_FREED") && err.message().contains("init text"),
        "{err:?}"
    );
}
