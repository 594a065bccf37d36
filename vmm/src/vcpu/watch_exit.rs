//! A guest write to a write-protected page (a memory watch's page): the
//! VMM completes it, or rolls back a read-modify-write that raced another
//! vCPU's write to the page (see `protect.rs` for why and `rmw.rs` for how).

use std::sync::atomic::Ordering;
use std::time::Instant;

use guest_access::{GuestMemory, ProtectedWrite, Vcpu};

use super::VcpuRunner;
use crate::gaps::GapCpu;
use crate::protect::PAGE;
use crate::rmw::{self, Conflict, MAX_INSN};

impl VcpuRunner {
    /// Note the write sequence before entering the guest (protect.rs).
    pub(crate) fn watch_enter(&mut self) {
        if self.shared.protect.active() {
            self.watch_entry = self.shared.protect.seq();
        }
    }

    /// Serve a write exit at `gpa` if its page is protected; false if it
    /// is not (an ordinary MMIO write).
    pub(crate) fn protected_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        if !self.shared.protect.active() {
            return false;
        }
        let began = Instant::now();
        let shared = self.shared.clone();
        let page = gpa & !(PAGE - 1);
        let mut st = shared.protect.lock();
        let Some(&last_write) = st.pages.get(&page) else {
            return false;
        };
        let len = data.len().min(8);
        let mut new = [0u8; 8];
        new[..len].copy_from_slice(&data[..len]);
        let stats = &shared.stats[self.index];
        if last_write > self.watch_entry {
            match self.conflict(gpa, len, u64::from_le_bytes(new)) {
                Conflict::Complete => {}
                Conflict::DropWrite => {
                    stats.watch_dropped.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Conflict::RollBack(regs) => {
                    if let Err(e) = Vcpu::set_regs(self, &regs) {
                        tracing::warn!("vCPU {}: cannot roll back at {gpa:#x}: {e}", self.index);
                    } else {
                        stats.watch_rollbacks.fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                }
                Conflict::Unknown(why) => tracing::warn!(
                    "vCPU {}: write to {gpa:#x} raced another vCPU and cannot be rolled back ({why}); completed",
                    self.index
                ),
            }
        }
        let mut old = [0u8; 8];
        let done = shared
            .ram
            .read_phys(gpa, &mut old[..len])
            .and_then(|()| shared.ram.write_phys(gpa, &new[..len]));
        if let Err(e) = done {
            tracing::warn!("vCPU {}: protected write at {gpa:#x}: {e}", self.index);
            return true;
        }
        shared.protect.stamp(&mut st, page);
        let rip_after = Vcpu::regs(self).map(|r| r.rip).unwrap_or(0);
        let w = ProtectedWrite {
            gpa,
            len,
            old,
            new,
            rip_after,
        };
        shared.handler().on_protected_write(self, &*shared, &w);
        drop(st);
        stats.watch_writes.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stats.watch_ns.fetch_add(ns, Ordering::Relaxed);
        true
    }

    /// The page was written since this vCPU entered the guest: find the
    /// writing instruction and say whether its write may complete.
    fn conflict(&mut self, gpa: u64, len: usize, data: u64) -> Conflict {
        let regs = match Vcpu::regs(self) {
            Ok(r) => r,
            Err(e) => return Conflict::Unknown(e.to_string()),
        };
        let mut at_rip = [0u8; MAX_INSN];
        let rep = match self.read_virt(regs.rip, &mut at_rip) {
            Ok(()) => rmw::rep_string_store_at(&at_rip, regs.rip),
            Err(_) => None,
        };
        let code = rmw::code_before(regs.rip, |a, b| self.read_virt(a, b).is_ok());
        let writers = rmw::writers(&code, regs.rip, &regs.gprs(), gpa, len);
        match rmw::trusted_writer(&code, regs.rip, &writers, rep.as_ref()) {
            Some(w) => rmw::on_conflict(&w, &regs, data),
            // Undoing the wrong instruction would corrupt the guest; a
            // plain store needs no undoing anyway.
            None if writers.iter().all(|w| !rmw::is_rmw(&w.insn)) => Conflict::Complete,
            None => Conflict::Unknown(format!(
                "{} candidate writers end at {:#x}, none matches the write exactly",
                writers.len(),
                regs.rip
            )),
        }
    }
}
