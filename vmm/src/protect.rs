//! Write-protected guest pages: the page mechanism of memory watches.
//!
//! A protected page is given to KVM as a read-only memory slot
//! (KVM_MEM_READONLY) over the same host memory as the RAM around it. The
//! guest reads it as usual; a guest write exits as KVM_EXIT_MMIO (is_write,
//! 1..8 bytes, RIP already past the writing instruction) and the VMM
//! completes it into RAM itself (`vcpu/watch_exit.rs`).
//!
//! Slots: each RAM region is cut into runs of ordinary and protected pages
//! ([`layout`]); a change deletes the slots that no longer fit and creates
//! the new ones ([`SlotTable::apply`]). KVM cannot split a live slot, so a
//! change must be made with every vCPU outside KVM_RUN (world stopped):
//! between the delete and the create the range is a hole.
//!
//! Atomicity: KVM emulates a locked read-modify-write on a read-only slot as
//! a read of the slot inside KVM followed by the write exit. A write another
//! vCPU completes in between would be overwritten with a stale result. Each
//! completed write takes a number from one VM-wide sequence and stamps its
//! page; a vCPU notes the sequence before each KVM_RUN. A read-modify-write
//! whose page was stamped after its vCPU entered the guest is not completed
//! but rolled back and run again (`rmw.rs`). All completions of one VM run
//! under [`ProtectedPages::lock`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

pub(crate) const PAGE: u64 = 0x1000;

/// One run of guest-physical RAM given to KVM as one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
    pub readonly: bool,
}

/// Cut each RAM region `(gpa, size, host)` into runs of writable and
/// protected pages (adjacent protected pages share one read-only run).
pub(crate) fn layout(regions: &[(u64, u64, u64)], pages: &BTreeSet<u64>) -> Vec<Segment> {
    let mut out = Vec::new();
    for &(gpa, size, host) in regions {
        let end = gpa + size;
        let mut at = gpa;
        let mut push = |from: u64, to: u64, readonly: bool| {
            if to > from {
                out.push(Segment {
                    gpa: from,
                    size: to - from,
                    host: host + (from - gpa),
                    readonly,
                });
            }
        };
        let mut pages_in = pages.range(gpa..end).copied().peekable();
        while let Some(p) = pages_in.next() {
            let mut run_end = p + PAGE;
            while pages_in.peek() == Some(&run_end) {
                pages_in.next();
                run_end += PAGE;
            }
            push(at, p, false);
            push(p, run_end.min(end), true);
            at = run_end.min(end);
        }
        push(at, end, false);
    }
    out
}

/// The slots KVM has, and which segment each holds.
#[derive(Debug, Default)]
pub(crate) struct SlotTable {
    slots: BTreeMap<u32, Segment>,
}

/// What [`SlotTable::plan`] asks of KVM: delete these slots, then create these.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SlotPlan {
    pub delete: Vec<(u32, Segment)>,
    pub create: Vec<(u32, Segment)>,
}

impl SlotTable {
    /// The slots `map_ram` created: one per RAM region, numbered from 0.
    pub fn from_regions(regions: &[(u64, u64, u64)]) -> Self {
        let slots = regions
            .iter()
            .enumerate()
            .map(|(i, &(gpa, size, host))| {
                (
                    u32::try_from(i).expect("few RAM regions"),
                    Segment {
                        gpa,
                        size,
                        host,
                        readonly: false,
                    },
                )
            })
            .collect();
        Self { slots }
    }

    /// Slots to delete and create so that KVM holds exactly `want`; a
    /// segment already held keeps its slot.
    pub fn plan(&self, want: &[Segment]) -> SlotPlan {
        let delete: Vec<_> = self
            .slots
            .iter()
            .filter(|(_, s)| !want.contains(s))
            .map(|(&id, &s)| (id, s))
            .collect();
        let mut used: BTreeSet<u32> = self
            .slots
            .keys()
            .copied()
            .filter(|id| !delete.iter().any(|(d, _)| d == id))
            .collect();
        let mut create = Vec::new();
        for s in want {
            if self.slots.values().any(|have| have == s) {
                continue;
            }
            let id = (0u32..)
                .find(|i| !used.contains(i))
                .expect("a free slot id");
            used.insert(id);
            create.push((id, *s));
        }
        SlotPlan { delete, create }
    }

    fn commit(&mut self, plan: &SlotPlan) {
        for (id, _) in &plan.delete {
            self.slots.remove(id);
        }
        for (id, s) in &plan.create {
            self.slots.insert(*id, *s);
        }
    }

    /// Make KVM hold `want`. Call with every vCPU outside KVM_RUN.
    pub fn apply(&mut self, vm: &VmFd, want: &[Segment]) -> Result<(), String> {
        let plan = self.plan(want);
        for (id, s) in &plan.delete {
            set_slot(vm, *id, s, 0)?;
        }
        for (id, s) in &plan.create {
            set_slot(vm, *id, s, s.size)?;
        }
        self.commit(&plan);
        Ok(())
    }
}

fn set_slot(vm: &VmFd, slot: u32, s: &Segment, size: u64) -> Result<(), String> {
    let region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: s.gpa,
        memory_size: size,
        userspace_addr: s.host,
        flags: if s.readonly { KVM_MEM_READONLY } else { 0 },
    };
    // SAFETY: `s` is a piece of one of the Machine's own guest RAM regions
    // (built by `layout` from `GuestRam::regions`), so the host range is
    // mapped for `s.size` bytes for as long as the Machine (which holds both
    // the RAM and this table) lives; the pieces are disjoint, and a size of
    // 0 deletes the slot.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| {
        format!(
            "KVM_SET_USER_MEMORY_REGION slot {slot} ({:#x}+{:#x}, {}): {e}",
            s.gpa,
            size,
            if size == 0 {
                "delete"
            } else if s.readonly {
                "read-only"
            } else {
                "writable"
            }
        )
    })
}

/// The protected pages of a VM and when each was last written.
#[derive(Debug, Default)]
pub(crate) struct PageState {
    /// Protected page -> sequence number of its last completed write.
    pub pages: BTreeMap<u64, u64>,
    pub slots: Option<SlotTable>,
}

/// The VM-wide state of write-protected pages (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct ProtectedPages {
    state: Mutex<PageState>,
    /// Number of protected pages: the hot path's "anything to do?" check.
    count: AtomicUsize,
    /// The write sequence: bumped by every completed write.
    seq: AtomicU64,
}

impl ProtectedPages {
    pub fn active(&self) -> bool {
        self.count.load(Ordering::SeqCst) != 0
    }

    /// Whether `gpa` lies in a protected page.
    pub fn covers(&self, gpa: u64) -> bool {
        self.active() && self.lock().pages.contains_key(&(gpa & !(PAGE - 1)))
    }

    /// The sequence now (noted by a vCPU before it enters the guest).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    pub fn lock(&self) -> MutexGuard<'_, PageState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stamp a completed write to `page` (call under [`Self::lock`]).
    pub fn stamp(&self, st: &mut PageState, page: u64) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(p) = st.pages.get_mut(&page) {
            *p = n;
        }
    }

    /// Protect or unprotect `page` (world stopped).
    pub fn set(
        &self,
        vm: &VmFd,
        regions: &[(u64, u64, u64)],
        page: u64,
        protect: bool,
    ) -> Result<(), String> {
        let mut st = self.lock();
        let had = st.pages.contains_key(&page);
        if had == protect {
            return Ok(());
        }
        let mut pages: BTreeSet<u64> = st.pages.keys().copied().collect();
        if protect {
            pages.insert(page);
        } else {
            pages.remove(&page);
        }
        let want = layout(regions, &pages);
        let table = st
            .slots
            .get_or_insert_with(|| SlotTable::from_regions(regions));
        table.apply(vm, &want)?;
        if protect {
            st.pages.insert(page, self.seq());
        } else {
            st.pages.remove(&page);
        }
        self.count.store(st.pages.len(), Ordering::SeqCst);
        Ok(())
    }

    pub fn pages(&self) -> Vec<u64> {
        self.lock().pages.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(gpa: u64, size: u64, readonly: bool) -> Segment {
        Segment {
            gpa,
            size,
            host: 0x7000_0000 + gpa,
            readonly,
        }
    }

    const REGION: (u64, u64, u64) = (0, 0x10_0000, 0x7000_0000);

    #[test]
    fn no_pages_leave_one_writable_slot() {
        assert_eq!(
            layout(&[REGION], &BTreeSet::new()),
            vec![seg(0, 0x10_0000, false)]
        );
    }

    #[test]
    fn a_page_cuts_its_region_in_three_and_neighbours_share_a_run() {
        let pages: BTreeSet<u64> = [0x5000, 0x6000, 0x9000].into();
        assert_eq!(
            layout(&[REGION], &pages),
            vec![
                seg(0, 0x5000, false),
                seg(0x5000, 0x2000, true),
                seg(0x7000, 0x2000, false),
                seg(0x9000, 0x1000, true),
                seg(0xa000, 0x10_0000 - 0xa000, false),
            ]
        );
    }

    #[test]
    fn pages_at_region_edges_and_in_the_second_region() {
        let regions = [REGION, (0x20_0000, 0x2000, 0x7020_0000)];
        let pages: BTreeSet<u64> = [0, 0xff000, 0x20_1000].into();
        assert_eq!(
            layout(&regions, &pages),
            vec![
                seg(0, 0x1000, true),
                seg(0x1000, 0xfe000, false),
                seg(0xff000, 0x1000, true),
                seg(0x20_0000, 0x1000, false),
                seg(0x20_1000, 0x1000, true),
            ]
        );
        // Host addresses follow the region's.
        assert!(layout(&regions, &pages)
            .iter()
            .all(|s| s.host == 0x7000_0000 + s.gpa));
    }

    #[test]
    fn plan_keeps_held_segments_and_reuses_freed_ids() {
        let mut t = SlotTable::from_regions(&[REGION, (0x20_0000, 0x2000, 0x7020_0000)]);
        let pages: BTreeSet<u64> = [0x5000].into();
        let want = layout(&[REGION, (0x20_0000, 0x2000, 0x7020_0000)], &pages);
        let plan = t.plan(&want);
        // Region 0's slot goes; region 1's stays; three new ones, the first
        // taking the freed id 0.
        assert_eq!(plan.delete, vec![(0, seg(0, 0x10_0000, false))]);
        let ids: Vec<u32> = plan.create.iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, vec![0, 2, 3]);
        t.commit(&plan);
        // Back to no pages: the three go, one whole region slot returns.
        let back = layout(
            &[REGION, (0x20_0000, 0x2000, 0x7020_0000)],
            &BTreeSet::new(),
        );
        let plan = t.plan(&back);
        assert_eq!(plan.delete.len(), 3);
        assert_eq!(plan.create, vec![(0, seg(0, 0x10_0000, false))]);
        t.commit(&plan);
        assert_eq!(t.slots.len(), 2);
    }
}
