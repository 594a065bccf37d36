//! The probe table in a snapshot: taken with the world stopped at a clean
//! point, put back into a fresh engine before a restored guest runs.
//!
//! The memory image is saved as if hvprobe had never touched the guest:
//! [`Frozen::originals`] lists the guest's own bytes at every planted `int3`,
//! out-of-line slot and return trap, and the real return address at every
//! guest stack slot a live kretprobe instance redirected to the trap. The
//! instances are kept in [`EngineState`]; a restore with probes points those
//! stack slots at the trap again, so the returns are still reported.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_access::{SystemRegs, Vcpu};
use probe_spec::{EntryArgs, Value};
use serde::{Deserialize, Serialize};

use crate::error::{BatchError, ProbeError};
use crate::events::ProbeId;
use crate::kprobes::Engine;
use crate::kretprobe::Instance;
use crate::paging::{Access, GuestVirt};
use crate::table::{ProbeRequest, ProbeType, Table};
use crate::text::{self, World};

/// How often a snapshot retries to find every vCPU outside hvprobe's own
/// code (an out-of-line slot or the return trap) before giving up.
const CLEAN_POINT_TRIES: u32 = 500;

/// One probe as saved: its definition (resolved again on restore) and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedProbe {
    pub id: ProbeId,
    pub name: String,
    pub address: u64,
    /// `None` for a kprobe; `Some(maxactive)` for a kretprobe.
    pub kretprobe_maxactive: Option<u32>,
    pub definition: String,
    pub enabled: bool,
    pub force_single_step: bool,
    pub force_out_of_line: bool,
    /// A `%hw` probe (absent in snapshots from before they existed).
    #[serde(default)]
    pub hardware: bool,
    pub hits: u64,
    pub missed: u64,
    pub dropped: u64,
}

/// A live kretprobe activation: the frame at guest stack slot `slot` returns
/// to `return_to` and is reported as a return of probe `probe`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedInstance {
    pub slot: u64,
    pub probe: ProbeId,
    pub return_to: u64,
    pub func: u64,
    /// Time since entry when the snapshot was taken.
    pub elapsed_ns: u64,
    pub entry_args: Vec<Value>,
    pub saved: EntryArgs,
}

/// Engine-wide counters as saved (the live-instance count is derived).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCounters {
    pub hits: u64,
    pub emulated: u64,
    pub single_stepped: u64,
    pub out_of_line: u64,
    pub emulation_fallbacks: u64,
    pub return_traps: u64,
    pub stale_traps: u64,
    pub guest_int3: u64,
    pub recycled: u64,
    pub dropped: u64,
    pub seq: u64,
}

/// The engine's part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    pub armed: bool,
    pub next_id: ProbeId,
    pub return_trap: Option<u64>,
    pub probes: Vec<SavedProbe>,
    pub instances: Vec<SavedInstance>,
    pub counters: SavedCounters,
}

impl SavedProbe {
    pub fn kind(&self) -> ProbeType {
        match self.kretprobe_maxactive {
            None => ProbeType::Kprobe,
            Some(m) => ProbeType::Kretprobe { maxactive: Some(m) },
        }
    }
}

/// What a snapshot writer gets while the world is stopped.
pub struct Frozen {
    /// (guest-physical address, the guest's own bytes) to overlay on the
    /// memory image: every byte hvprobe changed.
    pub originals: Vec<(u64, Vec<u8>)>,
    pub state: EngineState,
}

/// Where one vCPU stands when the world is stopped.
struct VcpuPoint {
    rip: u64,
    sregs: Option<SystemRegs>,
}

impl Engine {
    /// Stop the world at a clean point (no vCPU inside an out-of-line slot
    /// or at the return trap), collect the probe table and the guest's
    /// original bytes, and run `f` with the world still stopped (it writes
    /// the snapshot). The guest resumes when this returns, whatever `f` did:
    /// nothing in the live guest is changed.
    pub fn freeze<R>(&self, f: impl FnOnce(&Frozen) -> R) -> Result<R, ProbeError> {
        let _api = self.api.lock().unwrap();
        let mut why = String::new();
        for _ in 0..CLEAN_POINT_TRIES {
            {
                let _world = World::stop(self.vm(), None);
                let table = self.table.read().unwrap();
                match self.clean_point(&table)? {
                    Ok(points) => {
                        let sregs = points.iter().find_map(|p| p.sregs);
                        return Ok(f(&self.frozen(&table, sregs.as_ref())));
                    }
                    Err(w) => why = w,
                }
            }
            // The world runs for a moment, so the vCPU in the way moves on.
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(ProbeError::Snapshot(format!(
            "no clean point for a snapshot in {CLEAN_POINT_TRIES} tries: {why}"
        )))
    }

    /// With the world stopped: every vCPU's point if this is a clean point
    /// for a snapshot, else why not (worth another try); an error when a vCPU
    /// cannot answer at all (the guest is going away).
    fn clean_point(&self, table: &Table) -> Result<Result<Vec<VcpuPoint>, String>, ProbeError> {
        // A vCPU waiting inside a handler to stop the world (to single-
        // step) is mid-hit: let it finish first. It would not answer a
        // request either: it is not at a checkpoint.
        let in_handler = self.in_handler.load(Ordering::SeqCst);
        if in_handler > 0 {
            return Ok(Err(format!("{in_handler} vCPU(s) inside probe handling")));
        }
        let points = self.vcpu_points();
        if points.len() != self.vm().vcpu_count() {
            return Err(ProbeError::Snapshot(format!(
                "only {} of {} vCPUs answered: the guest is stopping or stopped",
                points.len(),
                self.vm().vcpu_count()
            )));
        }
        Ok(match self.unclean(table, &points) {
            Some(why) => Err(why),
            None => Ok(points),
        })
    }

    fn vcpu_points(&self) -> Vec<VcpuPoint> {
        (0..self.vm().vcpu_count())
            .filter_map(|i| {
                let (tx, rx) = std::sync::mpsc::channel();
                let asked = self.vm().with_vcpu(
                    i,
                    Box::new(move |v: &mut dyn Vcpu| {
                        let rip = v.regs().map(|r| r.rip).unwrap_or(0);
                        let sregs = v.system_regs().ok().filter(|s| s.paging());
                        let _ = tx.send(VcpuPoint { rip, sregs });
                    }),
                );
                asked.ok().and_then(|()| rx.recv().ok())
            })
            .collect()
    }

    /// Why the stopped world is not a clean point for a snapshot, if it is not.
    fn unclean(&self, table: &Table, points: &[VcpuPoint]) -> Option<String> {
        let trap = self.kret.trap_addr();
        let slots = || table.slots.all();
        if let Some(sl) = slots().find(|s| s.busy()) {
            return Some(format!(
                "a vCPU is inside the out-of-line slot at {:#x}",
                sl.addr
            ));
        }
        for (i, p) in points.iter().enumerate() {
            if trap != 0 && p.rip == trap {
                return Some(format!("vCPU {i} is at the return trap"));
            }
            if let Some(sl) = slots().find(|s| s.contains(p.rip)) {
                return Some(format!(
                    "vCPU {i} is inside the out-of-line slot at {:#x}",
                    sl.addr
                ));
            }
        }
        None
    }

    fn frozen(&self, table: &Table, sregs: Option<&SystemRegs>) -> Frozen {
        let mut originals: Vec<(u64, Vec<u8>)> = table
            .sites
            .values()
            .filter(|s| s.planted.load(Ordering::SeqCst) && !self.guest.in_freed_init(s.addr))
            .map(|s| (s.gpa, vec![s.original]))
            .collect();
        let trap = self.kret.trap.lock().unwrap();
        if let Some(t) = trap.as_ref().filter(|t| t.planted) {
            originals.push((t.gpa, vec![t.original]));
        }
        for sl in table.slots.all() {
            originals.extend(sl.gpas.iter().zip(&sl.saved).map(|(g, b)| (*g, vec![*b])));
        }
        let trap_addr = trap.as_ref().map(|t| t.addr);
        drop(trap);
        let mut instances = Vec::new();
        let live = self.kret.instances.lock().unwrap();
        if let (Some(trap_addr), Some(sregs)) = (trap_addr, sregs) {
            let virt = GuestVirt::new(self.vm().memory(), *sregs, 0);
            for (slot, list) in live.iter() {
                let mut now = [0u8; 8];
                if virt.read(*slot, &mut now, Access::Inspect).is_err()
                    || u64::from_le_bytes(now) != trap_addr
                {
                    // The frame is gone; nothing of ours is on that stack.
                    continue;
                }
                let return_to = list[0].return_to;
                let Ok(gpas) = (0..8)
                    .map(|i| virt.translate(slot + i, Access::Inspect).map(|t| t.gpa))
                    .collect::<Result<Vec<u64>, _>>()
                else {
                    continue;
                };
                originals.extend(
                    gpas.iter()
                        .zip(return_to.to_le_bytes())
                        .map(|(g, b)| (*g, vec![b])),
                );
                instances.extend(list.iter().map(|i| SavedInstance {
                    slot: *slot,
                    probe: i.probe.id,
                    return_to: i.return_to,
                    func: i.func,
                    elapsed_ns: i.entered.elapsed().as_nanos() as u64,
                    entry_args: i.entry_args.clone(),
                    saved: i.saved.clone(),
                }));
            }
        }
        drop(live);
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut probes: Vec<SavedProbe> = table
            .probes
            .values()
            .map(|p| SavedProbe {
                id: p.id,
                name: p.name.clone(),
                address: p.address,
                kretprobe_maxactive: match p.kind {
                    ProbeType::Kprobe => None,
                    ProbeType::Kretprobe { .. } => Some(p.maxactive),
                },
                definition: p.definition.clone(),
                enabled: p.enabled.load(Ordering::SeqCst),
                force_single_step: p.force_single_step,
                force_out_of_line: p.force_out_of_line,
                hardware: p.hardware,
                hits: get(&p.hits),
                missed: get(&p.missed),
                dropped: get(&p.dropped),
            })
            .collect();
        probes.sort_by_key(|p| p.id);
        Frozen {
            originals,
            state: EngineState {
                armed: self.armed(),
                next_id: table.next_id,
                return_trap: trap_addr,
                probes,
                instances,
                counters: SavedCounters {
                    hits: get(&c.hits),
                    emulated: get(&c.emulated),
                    single_stepped: get(&c.single_stepped),
                    out_of_line: get(&c.out_of_line),
                    emulation_fallbacks: get(&c.emulation_fallbacks),
                    return_traps: get(&c.return_traps),
                    stale_traps: get(&c.stale_traps),
                    guest_int3: get(&c.guest_int3),
                    recycled: get(&c.recycled),
                    dropped: get(&c.dropped),
                    seq: get(&c.seq),
                },
            },
        }
    }

    /// Put a saved probe table back, before the restored guest runs:
    /// `requests[i]` is `state.probes[i]` resolved again (same name, address
    /// and kind). Probes keep their ids, enabled state and counters; sites
    /// are planted (when armed) and live kretprobe instances are taken back
    /// (their stack slots point at the trap again). All or nothing.
    pub fn restore(
        &self,
        state: &EngineState,
        requests: Vec<ProbeRequest>,
    ) -> Result<Vec<ProbeId>, BatchError> {
        let bad = |index: usize, why: String| BatchError {
            index,
            error: ProbeError::Snapshot(why),
        };
        if requests.len() != state.probes.len() {
            return Err(bad(
                0,
                "saved probes and their requests differ in number".into(),
            ));
        }
        for (i, (r, s)) in requests.iter().zip(&state.probes).enumerate() {
            if r.name != s.name || r.address != s.address {
                return Err(bad(
                    i,
                    format!(
                        "probe {} was saved at {:#x} but resolves to {} at {:#x} now",
                        s.name, s.address, r.name, r.address
                    ),
                ));
            }
        }
        if let Some(t) = state.return_trap {
            if self.return_trap_address() != Some(t) {
                self.set_return_trap(t)
                    .map_err(|error| BatchError { index: 0, error })?;
            }
        }
        self.armed.store(state.armed, Ordering::SeqCst);
        let ids: Vec<ProbeId> = state.probes.iter().map(|p| p.id).collect();
        self.register_batch_as(requests, Some(&ids))?;
        let _api = self.api.lock().unwrap();
        // Nothing runs yet in a restored VM, but the trap's int3 is text.
        let world = World::stop(self.vm(), None);
        let mut table = self.table.write().unwrap();
        table.next_id = table.next_id.max(state.next_id);
        for s in &state.probes {
            if let Some(p) = table.probes.get(&s.id) {
                p.hits.store(s.hits, Ordering::Relaxed);
                p.missed.store(s.missed, Ordering::Relaxed);
                p.dropped.store(s.dropped, Ordering::Relaxed);
            }
        }
        let c = &state.counters;
        let k = &self.counters;
        for (a, v) in [
            (&k.hits, c.hits),
            (&k.emulated, c.emulated),
            (&k.single_stepped, c.single_stepped),
            (&k.out_of_line, c.out_of_line),
            (&k.emulation_fallbacks, c.emulation_fallbacks),
            (&k.return_traps, c.return_traps),
            (&k.stale_traps, c.stale_traps),
            (&k.guest_int3, c.guest_int3),
            (&k.recycled, c.recycled),
            (&k.dropped, c.dropped),
            (&k.seq, c.seq),
        ] {
            a.store(v, Ordering::Relaxed);
        }
        self.restore_instances(&world, state, &table);
        Ok(ids)
    }

    /// Point each saved instance's stack slot at the trap again. A slot that
    /// no longer holds the real return address (it cannot change in a
    /// restored image, but the check costs nothing) is counted as recycled.
    fn restore_instances(&self, world: &World<'_>, state: &EngineState, table: &Table) {
        let Some(trap) = self.return_trap_address() else {
            return;
        };
        let Some(sregs) = self.kernel_system_regs() else {
            return;
        };
        let virt = GuestVirt::new(self.vm().memory(), sregs, 0);
        let mut live = self.kret.instances.lock().unwrap();
        for i in &state.instances {
            let probe = table
                .probes
                .get(&i.probe)
                .filter(|p| matches!(p.kind, ProbeType::Kretprobe { .. }));
            let mut now = [0u8; 8];
            let slot_ok = virt.read(i.slot, &mut now, Access::Inspect).is_ok()
                && (u64::from_le_bytes(now) == i.return_to || u64::from_le_bytes(now) == trap);
            let Some(probe) = probe.filter(|_| slot_ok) else {
                self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if virt.write(i.slot, &trap.to_le_bytes()).is_err() {
                self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            probe.active.fetch_add(1, Ordering::SeqCst);
            let entered = Instant::now()
                .checked_sub(Duration::from_nanos(i.elapsed_ns))
                .unwrap_or_else(Instant::now);
            live.entry(i.slot).or_default().push(Instance {
                probe: Arc::clone(probe),
                return_to: i.return_to,
                func: i.func,
                entered,
                entry_args: i.entry_args.clone(),
                saved: i.saved.clone(),
            });
        }
        if !live.is_empty() {
            drop(live);
            if let Err(e) = text::plant_trap(world, self.vm().memory(), &self.kret) {
                tracing::warn!("restored kretprobe instances but cannot plant the trap: {e}");
            }
        }
    }
}
