//! The read-only views of the probe table: the listing (like debugfs
//! `kprobes/list`, with `[GONE]` for code the guest rewrote or freed) and
//! the bytes hvprobe changed in guest memory.

use std::sync::atomic::Ordering;

use crate::events::ProbeId;
use crate::kprobes::Engine;
use crate::table::{Handling, ProbeType, Table};
use crate::text::{World, INT3};

/// A row of the probe listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    pub id: ProbeId,
    pub name: String,
    pub kind: ProbeType,
    pub address: u64,
    /// Where the int3 is; after the ftrace site when `address` is a
    /// function's entry (listed as `[FTRACE]`, like Linux's ftrace-based
    /// kprobes).
    pub site: u64,
    pub location: String,
    pub enabled: bool,
    /// The code went away: init text freed, or its module unloaded (a
    /// module probe is armed again when the module loads again).
    pub gone: bool,
    /// A `MOD:SYM` probe whose module has not been loaded since it was
    /// created (address 0).
    pub pending: bool,
    /// Why a module probe was not armed at its module's last load.
    pub module_error: Option<String>,
    pub hits: u64,
    /// kretprobes: entries with no free instance (nmissed).
    pub missed: u64,
    /// Events lost to full subscriber queues.
    pub dropped: u64,
    pub handling: Handling,
    /// The displaced instruction.
    pub instruction: String,
    /// kretprobes: the effective maxactive.
    pub maxactive: u32,
    pub definition: String,
    /// Traps with a debug register (`%hw`) instead of an `int3`.
    pub hardware: bool,
    /// The debug register (0..=3 for DR0..DR3) it holds while armed.
    pub hw_slot: Option<usize>,
    /// What a hit does beyond reporting, and how many hits it ran for.
    pub action: Option<crate::action::Action>,
    pub actions: u64,
}

impl std::fmt::Display for ProbeInfo {
    /// Like debugfs `kprobes/list`: address, type, location, flags.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kind {
            ProbeType::Kprobe => 'k',
            ProbeType::Kretprobe { .. } => 'r',
        };
        write!(f, "{:016x}  {k}  {}", self.address, self.location)?;
        if !self.enabled {
            f.write_str(" [DISABLED]")?;
        }
        if self.pending {
            return write!(f, " [PENDING: module not loaded]");
        }
        if self.gone {
            f.write_str(" [GONE]")?;
        }
        if self.site != self.address {
            write!(f, " [FTRACE: at +{:#x}]", self.site - self.address)?;
        }
        let how = match self.handling {
            Handling::Emulated => "EMULATED",
            Handling::OutOfLine => "OUT-OF-LINE",
            Handling::SingleStep => "SINGLESTEP",
        };
        write!(f, " [{how}: {}]", self.instruction)?;
        match (self.hardware, self.hw_slot) {
            (true, Some(slot)) => write!(f, " [HW: DR{slot}]"),
            (true, None) => f.write_str(" [HW: unarmed]"),
            (false, _) => Ok(()),
        }
    }
}

impl Engine {
    /// Planted sites whose int3 is no longer in guest memory: the guest
    /// overwrote it (its code changed or went away), so mark them gone. Only
    /// believed with the world stopped: a single-step puts the original byte
    /// back for the length of one step, and a site marked gone then would
    /// keep its int3 in guest text after its last probe is deleted (the guest
    /// would take it as its own breakpoint and resume one byte into the
    /// instruction).
    fn detect_gone_sites(&self) {
        let reads_not_int3 = |table: &Table| -> Vec<u64> {
            table
                .sites
                .values()
                .filter(|s| s.planted.load(Ordering::SeqCst) && !s.gone.load(Ordering::SeqCst))
                .filter(|s| {
                    if self.guest.code_gone(s.addr) {
                        return true;
                    }
                    let mut b = [0u8; 1];
                    let ours = self.vm().memory().read_phys(s.gpa, &mut b).is_ok() && b[0] == INT3;
                    !ours || !self.guest.holds(&s.tail)
                })
                .map(|s| s.addr)
                .collect()
        };
        if reads_not_int3(&self.table.read().unwrap()).is_empty() {
            return;
        }
        // Lock order: world, then table (a stopper may wait for the table).
        let _world = World::stop(self.vm(), None);
        let table = self.table.read().unwrap();
        for a in reads_not_int3(&table) {
            table.sites[&a].gone.store(true, Ordering::SeqCst);
        }
    }

    /// The probe listing.
    pub fn list(&self) -> Vec<ProbeInfo> {
        self.detect_gone_sites();
        let table = self.table.read().unwrap();
        let mut v: Vec<ProbeInfo> = table
            .probes
            .values()
            .map(|p| {
                // A module probe's site leaves the table when its module is
                // freed (and another probe's may come to its address).
                let site = table.sites.get(&p.site).filter(|s| {
                    p.module.is_none() || s.probes.snapshot().iter().any(|q| q.id == p.id)
                });
                let pending = p.is_pending();
                ProbeInfo {
                    id: p.id,
                    name: p.name.clone(),
                    kind: p.kind,
                    address: p.address,
                    site: p.site,
                    location: match &p.module {
                        Some(t) if pending => t.to_string(),
                        _ => self.guest.location(p.address),
                    },
                    enabled: p.enabled.load(Ordering::SeqCst),
                    gone: !pending && site.is_none_or(|s| s.gone.load(Ordering::SeqCst)),
                    pending,
                    module_error: p.module_error.lock().unwrap().clone(),
                    hits: p.hits.load(Ordering::Relaxed),
                    missed: p.missed.load(Ordering::Relaxed),
                    dropped: p.dropped.load(Ordering::Relaxed),
                    handling: site.map_or(Handling::SingleStep, |s| s.handling),
                    instruction: site
                        .map_or(String::new(), |s| s.displaced.disassembly().to_string()),
                    maxactive: p.maxactive,
                    definition: p.definition.clone(),
                    hardware: p.hardware,
                    hw_slot: site.and_then(|s| s.armed_hw_slot()),
                    action: p.action.clone(),
                    actions: p.actions.load(Ordering::Relaxed),
                }
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Guest-physical addresses and original bytes of every planted int3
    /// (sites and the return trap): what differs from pristine guest text.
    pub fn planted_bytes(&self) -> Vec<(u64, u8)> {
        let table = self.table.read().unwrap();
        let mut v: Vec<(u64, u8)> = table
            .sites
            .values()
            .filter(|s| s.planted.load(Ordering::SeqCst))
            .map(|s| (s.gpa, s.original))
            .collect();
        if let Some(t) = self.kret.trap.lock().unwrap().as_ref() {
            if t.planted {
                v.push((t.gpa, t.original));
            }
        }
        for sl in table.slots.by_end.values() {
            v.extend(sl.gpas.iter().copied().zip(sl.saved.iter().copied()));
        }
        v
    }
}
