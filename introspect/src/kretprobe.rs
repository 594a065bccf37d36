//! Return probes: instances are host-side objects (`maxactive` per probe,
//! `nmissed` counted when none is free). At entry the return address on the
//! guest stack is redirected to a host-owned return trap; the guest's own
//! `ret` lands there and the return is reported. Instances of frames that
//! never return are recycled, not leaked (the kernel's `recycle_rp_inst`).
//!
//! Planting and removing the trap's `int3` is `text.rs`'s; this file writes
//! only guest *stack* slots, from the vCPU that owns the frame.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use guest_access::Regs;
use probe_spec::{EntryArgs, Value};

use crate::events::{Event, EventKind};
use crate::fetch::{now_ns, HitContext, Reporter};
use crate::paging::{Access, GuestVirt};
use crate::stats::Counters;
use crate::table::Probe;

/// A kretprobe activation in flight.
pub(crate) struct Instance {
    pub probe: Arc<Probe>,
    pub return_to: u64,
    pub func: u64,
    pub entered: Instant,
    pub entry_args: Vec<Value>,
    pub saved: EntryArgs,
}

/// The host-owned address return addresses are redirected to.
pub(crate) struct ReturnTrap {
    pub addr: u64,
    pub gpa: u64,
    pub original: u8,
    pub planted: bool,
}

/// Live instances by guest stack slot (the map, through `Deref`), and the
/// buffers of instances that returned, kept for the next entries: a steady
/// stream of calls and returns allocates nothing on the host.
#[derive(Default)]
pub(crate) struct Live {
    by_slot: HashMap<u64, Vec<Instance>>,
    spare_lists: Vec<Vec<Instance>>,
    spare_args: Vec<(Vec<Value>, EntryArgs)>,
}

/// Spare buffers kept at most (beyond that they are freed): enough for
/// every instance of a few busy kretprobes.
const SPARE_MAX: usize = 4096;

impl Live {
    /// An empty instance list, from the spares if there is one.
    fn list(&mut self) -> Vec<Instance> {
        self.spare_lists.pop().unwrap_or_default()
    }

    /// Entry-argument buffers, from the spares if there are some (with an
    /// earlier instance's values, which the next fetch overwrites).
    fn args(&mut self) -> (Vec<Value>, EntryArgs) {
        self.spare_args.pop().unwrap_or_default()
    }

    /// Keep the buffers of `list`'s instances and the list itself; the
    /// instances (and their probe references) are dropped. The argument
    /// values stay: the next entry's fetch overwrites them in place,
    /// reusing their string buffers.
    fn recycle(&mut self, mut list: Vec<Instance>) {
        for i in list.drain(..) {
            if self.spare_args.len() < SPARE_MAX {
                self.spare_args.push((i.entry_args, i.saved));
            }
        }
        if self.spare_lists.len() < SPARE_MAX {
            self.spare_lists.push(list);
        }
    }
}

impl std::ops::Deref for Live {
    type Target = HashMap<u64, Vec<Instance>>;
    fn deref(&self) -> &Self::Target {
        &self.by_slot
    }
}

impl std::ops::DerefMut for Live {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.by_slot
    }
}

/// Live instances by guest stack slot, and the return trap.
///
/// Lock order: `trap` and `instances` are never held together; both come
/// after the engine's table lock.
#[derive(Default)]
pub(crate) struct Kretprobes {
    pub trap: Mutex<Option<ReturnTrap>>,
    /// Address of the return trap, readable without the lock on the hit path.
    pub trap_addr: AtomicU64,
    pub instances: Mutex<Live>,
    /// No kretprobe is left but instances were live: the last return removes the trap.
    pub retire_pending: AtomicBool,
}

impl Kretprobes {
    /// The return trap's address, 0 when none is set.
    pub fn trap_addr(&self) -> u64 {
        self.trap_addr.load(Ordering::SeqCst)
    }

    /// The planted trap's (address, original byte), if it is planted.
    pub fn planted_trap(&self) -> Option<(u64, u8)> {
        let t = self.trap.lock().unwrap();
        t.as_ref()
            .filter(|t| t.planted)
            .map(|t| (t.addr, t.original))
    }

    pub fn live_instances(&self) -> u64 {
        self.instances
            .lock()
            .unwrap()
            .values()
            .map(|v| v.len() as u64)
            .sum()
    }

    /// kretprobe entry: take an instance and redirect the return address.
    pub fn entry(
        &self,
        probes: &[&Arc<Probe>],
        ctx: &HitContext<'_>,
        trap: u64,
        reporter: &Reporter<'_>,
    ) {
        let slot = ctx.regs.rsp;
        let mut ret = [0u8; 8];
        if ctx.virt.read(slot, &mut ret, Access::KernelRead).is_err() {
            for p in probes {
                p.missed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let return_to = u64::from_le_bytes(ret);
        let counters = reporter.counters;
        let mut live = self.instances.lock().unwrap();
        // A new call at a slot with live instances: those frames were abandoned.
        if return_to != trap {
            if let Some(stale) = live.remove(&slot) {
                for i in &stale {
                    i.probe.active.fetch_sub(1, Ordering::SeqCst);
                    counters.recycled.fetch_add(1, Ordering::Relaxed);
                }
                live.recycle(stale);
            }
        }
        let mut taken = live.list();
        for &p in probes {
            if p.active.load(Ordering::SeqCst) >= p.maxactive {
                recycle_stale(&mut live, p, ctx.virt, trap, counters);
            }
            if p.active.load(Ordering::SeqCst) >= p.maxactive {
                p.missed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            p.active.fetch_add(1, Ordering::SeqCst);
            let (mut entry_args, mut saved) = live.args();
            match &p.fetch {
                Some(def) => {
                    reporter.fetch_into(def, ctx, |a| !a.uses_retval(), &mut entry_args);
                    saved.recapture(def, ctx);
                }
                // Nothing of an earlier instance's arguments stays (a
                // snapshot would save them).
                None => {
                    entry_args.clear();
                    saved = EntryArgs::default();
                }
            }
            taken.push(Instance {
                probe: p.clone(),
                return_to,
                func: p.address,
                entered: Instant::now(),
                entry_args,
                saved,
            });
        }
        if taken.is_empty() {
            live.recycle(taken);
            return;
        }
        let real_return = live
            .get(&slot)
            .and_then(|v| v.first().map(|i| i.return_to))
            .unwrap_or(return_to);
        if ctx.virt.write(slot, &trap.to_le_bytes()).is_err() {
            for i in &taken {
                i.probe.active.fetch_sub(1, Ordering::SeqCst);
                i.probe.missed.fetch_add(1, Ordering::Relaxed);
            }
            live.recycle(taken);
            return;
        }
        for i in taken.iter_mut() {
            i.return_to = real_return;
        }
        match live.get_mut(&slot) {
            Some(list) => {
                list.append(&mut taken);
                live.recycle(taken);
            }
            None => {
                live.insert(slot, taken);
            }
        }
    }

    /// The guest returned into the trap (its `ret` already ran): take the
    /// instances of the popped stack slot, put the real return address back
    /// in that slot, report each return and free the instances. The real
    /// return address, or None when no instance was there.
    pub fn returned(
        &self,
        ctx: &HitContext<'_>,
        vcpu: u32,
        reporter: &Reporter<'_>,
    ) -> Option<u64> {
        let regs: &Regs = ctx.regs;
        let slot = regs.rsp.wrapping_sub(8);
        let found = self.instances.lock().unwrap().remove(&slot);
        let Some(instances) = found else {
            tracing::error!(
                "vCPU {vcpu} returned into the return trap with no instance at stack slot {slot:#x}"
            );
            return None;
        };
        let return_to = instances[0].return_to;
        // The popped slot keeps the trap address in the guest's dead stack;
        // put the real return address there, as a native call would have
        // left it (nothing of hvprobe's stays in guest memory, snapshots
        // included). Best effort: the slot is below RSP, free stack.
        let _ = ctx.virt.write(slot, &return_to.to_le_bytes());
        let mut instances = instances;
        if reporter.has_subscribers() {
            for i in instances.iter_mut() {
                if !i.probe.registered.load(Ordering::SeqCst) || !reporter.wants_event(&i.probe) {
                    continue;
                }
                let args = match &i.probe.fetch {
                    Some(def) => {
                        let at = probe_spec::AtReturn {
                            inner: ctx,
                            entry: &i.saved,
                        };
                        reporter.fetch(def, &at, probe_spec::FetchArg::uses_retval)
                    }
                    None => Vec::new(),
                };
                let ev = Event {
                    probe_id: i.probe.id,
                    seq: reporter.next_seq(),
                    vcpu,
                    time_ns: now_ns(),
                    ip: i.func,
                    kind: EventKind::Return {
                        func: i.func,
                        return_to,
                        retval: regs.rax,
                        duration_ns: i.entered.elapsed().as_nanos() as u64,
                        // The event owns them now; the instance keeps
                        // a given-back list for the next entry.
                        entry_args: std::mem::replace(&mut i.entry_args, reporter.take_args()),
                    },
                    task: ctx.current_task(),
                    args,
                    action: None,
                };
                reporter.publish(&i.probe, ev);
            }
        }
        for i in &instances {
            i.probe.active.fetch_sub(1, Ordering::SeqCst);
        }
        self.instances.lock().unwrap().recycle(instances);
        Some(return_to)
    }

    /// Whether the trap waits for its last instance to come home, and it has.
    pub fn retire_due(&self) -> bool {
        self.retire_pending.load(Ordering::SeqCst) && self.instances.lock().unwrap().is_empty()
    }
}

/// Free instances of `p` whose stack slot no longer holds the trap address
/// (the frame is gone without returning).
fn recycle_stale(
    live: &mut Live,
    p: &Arc<Probe>,
    virt: &GuestVirt<'_>,
    trap: u64,
    counters: &Counters,
) {
    let mut freed = 0;
    live.retain(|slot, v| {
        let mut b = [0u8; 8];
        let still_ours =
            virt.read(*slot, &mut b, Access::Inspect).is_ok() && u64::from_le_bytes(b) == trap;
        if still_ours {
            return true;
        }
        v.retain(|i| {
            if Arc::ptr_eq(&i.probe, p) {
                freed += 1;
                i.probe.active.fetch_sub(1, Ordering::SeqCst);
                false
            } else {
                true
            }
        });
        !v.is_empty()
    });
    counters.recycled.fetch_add(freed, Ordering::Relaxed);
}
