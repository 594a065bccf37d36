//! Watches on guest data: every guest write to a watched byte range is
//! reported with the writing instruction (symbolized), the task and the
//! watched range's value before and after.
//!
//! Mechanism: the page. Each page a watch touches is write-protected in
//! the VMM ([`VmControl::protect_page`]); watches on one page share it (a
//! count per page), and the last one gone gives the page back. The VMM
//! completes every guest write to a protected page and calls
//! [`Engine::on_watched_write`]; a write to other bytes of the page costs
//! that exit and no event. Reads are not seen (a read-only slot does not
//! trap them), so read/write watches need debug-register data breakpoints,
//! which are refused where the host does not deliver them for guest kernel
//! code ([`VmControl::data_breakpoints`]).
//!
//! Lock order: `api`, the world, then `Watches::table`; the write hook runs
//! with the VMM's page lock held and takes `table` for reading only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use guest_access::{ProtectedWrite, Vcpu, VmControl};
use insn_emu::writer::{self, MAX_INSN};

use crate::events::GuestTask;
use crate::fetch::{now_ns, HitContext};
use crate::kprobes::Engine;
use crate::paging::{Access, GuestVirt};
use crate::text::World;

pub type WatchId = u64;

const PAGE: u64 = 0x1000;
/// Longest watched range (a watch spans at most two pages).
pub const MAX_WATCH_LEN: u64 = PAGE;
/// Bytes of the watched range carried as old/new value in each hit.
pub const VALUE_CAP: usize = 256;
/// Hits kept for [`Engine::take_watch_hits`]; beyond it they are dropped and counted.
pub const HIT_QUEUE: usize = 1 << 16;

/// Which guest accesses a watch reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchAccess {
    Write,
    ReadWrite,
}

/// How a watch traps the guest's accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchMechanism {
    /// A read-only KVM memory slot over the page; any number, any host.
    Page,
    /// A debug-register data breakpoint (at most 4, 1/2/4/8 aligned bytes).
    DebugRegister,
}

/// What to watch: `len` bytes at guest-virtual `addr` (kernel address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRequest {
    /// What the caller asked for (`modprobe_path`, `sym+0x10`); listed as is.
    pub name: String,
    pub addr: u64,
    pub len: u64,
    pub access: WatchAccess,
    /// None: the page mechanism.
    pub mechanism: Option<WatchMechanism>,
}

/// Why a watch operation was refused. Says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("watch {name}: length {len} is out of range (1..={max} bytes)")]
    BadLength { name: String, len: u64, max: u64 },
    #[error("watch {name}: {addr:#x} is not mapped in the guest kernel's page tables: {why}")]
    Unmapped {
        name: String,
        addr: u64,
        why: String,
    },
    #[error("watch {name}: the guest has no paging yet (no vCPU answered with paging on)")]
    NoPaging { name: String },
    #[error("watch {name}: the page mechanism sees writes only; read/write watches need debug-register data breakpoints")]
    ReadNeedsDebugRegister { name: String },
    #[error("watch {name}: {why}")]
    DebugRegisterUnavailable { name: String, why: String },
    #[error("watch {name}: cannot write-protect guest-physical page {page:#x}: {why}")]
    Protect {
        name: String,
        page: u64,
        why: String,
    },
    #[error("watch {0} does not exist")]
    NotFound(WatchId),
}

/// One guest-physical piece of a watched range (a range crossing a page
/// boundary has two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchPiece {
    pub gpa: u64,
    pub len: u64,
    /// Offset of this piece in the watched range.
    pub offset: u64,
}

/// A watch as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchInfo {
    pub id: WatchId,
    pub name: String,
    pub addr: u64,
    pub len: u64,
    pub access: WatchAccess,
    pub mechanism: WatchMechanism,
    pub pieces: Vec<WatchPiece>,
    pub hits: u64,
}

/// One guest write to a watched range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchHit {
    pub watch: WatchId,
    pub name: String,
    pub vcpu: u32,
    /// Guest-virtual address and length of the write (its part inside the
    /// watched range may be smaller).
    pub addr: u64,
    pub len: usize,
    /// Where the guest goes on (KVM reports the write after the instruction).
    pub rip_after: u64,
    /// Start of the writing instruction: the candidates found decoding
    /// backwards from `rip_after`, best first (one in all but odd cases).
    pub writers: Vec<u64>,
    /// `sym+off/size` of the writer (of `rip_after - 1` when none was found:
    /// always inside the writing function).
    pub writer: String,
    pub task: Option<GuestTask>,
    /// The watched range (its first [`VALUE_CAP`] bytes) before and after.
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    pub time_ns: u64,
}

struct Watch {
    info: WatchInfo,
    hits: AtomicU64,
}

#[derive(Default)]
struct WatchTable {
    next_id: WatchId,
    watches: BTreeMap<WatchId, Arc<Watch>>,
    /// Protected page -> watches on it.
    pages: BTreeMap<u64, usize>,
}

/// The engine's watches and their hits.
#[derive(Default)]
pub(crate) struct Watches {
    table: RwLock<WatchTable>,
    hits: Mutex<VecDeque<WatchHit>>,
    hits_cv: Condvar,
    dropped: AtomicU64,
}

fn pages_of(pieces: &[WatchPiece]) -> Vec<u64> {
    let mut pages: Vec<u64> = pieces.iter().map(|p| p.gpa & !(PAGE - 1)).collect();
    pages.dedup();
    pages
}

/// Whether `[a, a+alen)` and `[b, b+blen)` share a byte.
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

impl Engine {
    /// Watch guest data (see the module doc). The world is stopped while
    /// the pages are protected.
    pub fn watch(&self, req: WatchRequest) -> Result<WatchId, WatchError> {
        let name = if req.name.is_empty() {
            format!("{:#x}", req.addr)
        } else {
            req.name.clone()
        };
        if req.len == 0 || req.len > MAX_WATCH_LEN {
            return Err(WatchError::BadLength {
                name,
                len: req.len,
                max: MAX_WATCH_LEN,
            });
        }
        let mechanism = req.mechanism.unwrap_or(WatchMechanism::Page);
        match mechanism {
            WatchMechanism::DebugRegister => {
                let why = match self.vm().data_breakpoints() {
                    Err(why) => why,
                    Ok(()) => {
                        "debug-register watches are not implemented yet; use the page mechanism"
                            .into()
                    }
                };
                return Err(WatchError::DebugRegisterUnavailable { name, why });
            }
            WatchMechanism::Page if req.access == WatchAccess::ReadWrite => {
                return Err(WatchError::ReadNeedsDebugRegister { name });
            }
            WatchMechanism::Page => {}
        }
        let _api = self.api.lock().unwrap();
        let pieces = self.watch_pieces(&name, req.addr, req.len)?;
        let world = World::stop(self.vm(), None);
        let mut t = self.watches.table.write().unwrap();
        let mut protected = Vec::new();
        for page in pages_of(&pieces) {
            if t.pages.get(&page).copied().unwrap_or(0) > 0 {
                continue;
            }
            if let Err(why) = self.vm().protect_page(page) {
                for p in protected {
                    let _ = self.vm().unprotect_page(p);
                }
                return Err(WatchError::Protect { name, page, why });
            }
            protected.push(page);
        }
        for page in pages_of(&pieces) {
            *t.pages.entry(page).or_insert(0) += 1;
        }
        t.next_id += 1;
        let id = t.next_id;
        t.watches.insert(
            id,
            Arc::new(Watch {
                info: WatchInfo {
                    id,
                    name,
                    addr: req.addr,
                    len: req.len,
                    access: req.access,
                    mechanism,
                    pieces,
                    hits: 0,
                },
                hits: AtomicU64::new(0),
            }),
        );
        drop(t);
        drop(world);
        Ok(id)
    }

    /// Remove a watch; its pages are given back when no other watch holds them.
    pub fn unwatch(&self, id: WatchId) -> Result<(), WatchError> {
        let _api = self.api.lock().unwrap();
        let world = World::stop(self.vm(), None);
        let mut t = self.watches.table.write().unwrap();
        let w = t.watches.remove(&id).ok_or(WatchError::NotFound(id))?;
        for page in pages_of(&w.info.pieces) {
            let n = t.pages.get_mut(&page).expect("a watched page is counted");
            *n -= 1;
            if *n == 0 {
                t.pages.remove(&page);
                if let Err(e) = self.vm().unprotect_page(page) {
                    tracing::warn!("watch {id}: cannot unprotect page {page:#x}: {e}");
                }
            }
        }
        drop(t);
        drop(world);
        Ok(())
    }

    /// Every watch, by id.
    pub fn watches(&self) -> Vec<WatchInfo> {
        let t = self.watches.table.read().unwrap();
        t.watches
            .values()
            .map(|w| WatchInfo {
                hits: w.hits.load(Ordering::Relaxed),
                ..w.info.clone()
            })
            .collect()
    }

    /// Guest-physical pages the watches hold.
    pub fn watched_pages(&self) -> Vec<u64> {
        self.watches
            .table
            .read()
            .unwrap()
            .pages
            .keys()
            .copied()
            .collect()
    }

    /// The hits so far (oldest first), and how many were dropped because
    /// nobody took them in time.
    pub fn take_watch_hits(&self) -> (Vec<WatchHit>, u64) {
        let hits = self.watches.hits.lock().unwrap().drain(..).collect();
        (hits, self.watches.dropped.load(Ordering::Relaxed))
    }

    /// Wait up to `timeout` until there is a hit to take.
    pub fn wait_watch_hits(&self, timeout: Duration) -> bool {
        let q = self.watches.hits.lock().unwrap();
        let (q, _) = self
            .watches
            .hits_cv
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap();
        !q.is_empty()
    }

    /// Translate `[addr, addr+len)` page by page through the kernel's page tables.
    fn watch_pieces(&self, name: &str, addr: u64, len: u64) -> Result<Vec<WatchPiece>, WatchError> {
        let sregs = self
            .kernel_system_regs()
            .ok_or_else(|| WatchError::NoPaging {
                name: name.to_string(),
            })?;
        let virt = GuestVirt::new(self.vm().memory(), sregs, 0);
        let mut pieces = Vec::new();
        let mut offset = 0;
        while offset < len {
            let va = addr.wrapping_add(offset);
            let t = virt
                .translate(va, Access::Inspect)
                .map_err(|e| WatchError::Unmapped {
                    name: name.to_string(),
                    addr: va,
                    why: e.to_string(),
                })?;
            let n = (len - offset).min(PAGE - (t.gpa & (PAGE - 1)));
            if t.gpa + n > self.vm().memory().ram_end() {
                return Err(WatchError::Unmapped {
                    name: name.to_string(),
                    addr: va,
                    why: format!("it maps to {:#x}, outside guest RAM", t.gpa),
                });
            }
            pieces.push(WatchPiece {
                gpa: t.gpa,
                len: n,
                offset,
            });
            offset += n;
        }
        Ok(pieces)
    }

    /// The VMM completed a guest write to a protected page: report it to
    /// every watch whose bytes it touched (nothing for other bytes).
    pub(crate) fn on_watched_write(
        &self,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
        w: &ProtectedWrite,
    ) {
        let touched: Vec<Arc<Watch>> = {
            let t = self.watches.table.read().unwrap();
            t.watches
                .values()
                .filter(|x| {
                    x.info
                        .pieces
                        .iter()
                        .any(|p| overlaps(p.gpa, p.len, w.gpa, w.len as u64))
                })
                .cloned()
                .collect()
        };
        if touched.is_empty() {
            return;
        }
        let (Ok(regs), Ok(sregs)) = (vcpu.regs(), vcpu.system_regs()) else {
            return;
        };
        let virt = GuestVirt::new(vm.memory(), sregs, regs.rflags);
        let code =
            writer::code_before(w.rip_after, |a, b| virt.read(a, b, Access::Inspect).is_ok());
        let mut at_rip = [0u8; MAX_INSN];
        let rep = virt
            .read(w.rip_after, &mut at_rip, Access::Inspect)
            .ok()
            .and_then(|()| writer::rep_string_store_at(&at_rip, w.rip_after));
        let writers: Vec<u64> = match rep {
            // Not the last iteration: RIP is still at the writer.
            Some(r) => vec![r.start],
            None => writer::writers(&code, w.rip_after, &regs.gprs(), w.gpa, w.len)
                .iter()
                .map(|c| c.start)
                .collect(),
        };
        let writer_name = self
            .guest
            .location(writers.first().copied().unwrap_or(w.rip_after - 1));
        let task = HitContext::new(&regs, &virt, &*self.guest.symbols).current_task();
        let time_ns = now_ns();
        for watch in touched {
            let (old, new, addr) = values(vm, &watch.info, w);
            watch.hits.fetch_add(1, Ordering::Relaxed);
            self.push_hit(WatchHit {
                watch: watch.info.id,
                name: watch.info.name.clone(),
                vcpu: vcpu.index() as u32,
                addr,
                len: w.len,
                rip_after: w.rip_after,
                writers: writers.clone(),
                writer: writer_name.clone(),
                task: task.clone(),
                old,
                new,
                time_ns,
            });
        }
    }

    fn push_hit(&self, hit: WatchHit) {
        let mut q = self.watches.hits.lock().unwrap();
        if q.len() >= HIT_QUEUE {
            self.watches.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(hit);
        self.watches.hits_cv.notify_all();
    }
}

/// The watched range's first [`VALUE_CAP`] bytes after the write (read from
/// RAM, which the VMM's page lock keeps still) and before it (the same with
/// the written bytes' old values put back), and the write's guest-virtual
/// address.
fn values(vm: &dyn VmControl, watch: &WatchInfo, w: &ProtectedWrite) -> (Vec<u8>, Vec<u8>, u64) {
    let shown = (watch.len as usize).min(VALUE_CAP);
    let mut new = vec![0u8; shown];
    let mut addr = watch.addr;
    for p in &watch.pieces {
        let start = p.offset as usize;
        if start < shown {
            let end = (start + p.len as usize).min(shown);
            if vm.memory().read_phys(p.gpa, &mut new[start..end]).is_err() {
                new[start..end].fill(0);
            }
        }
        if w.gpa >= p.gpa && w.gpa < p.gpa + p.len {
            addr = watch.addr + p.offset + (w.gpa - p.gpa);
        }
    }
    let mut old = new.clone();
    for p in &watch.pieces {
        for i in 0..w.len as u64 {
            let g = w.gpa + i;
            if g >= p.gpa && g < p.gpa + p.len {
                let at = (p.offset + (g - p.gpa)) as usize;
                if at < shown {
                    old[at] = w.old[i as usize];
                }
            }
        }
    }
    if w.gpa < watch.pieces[0].gpa {
        // The write starts before the watched range.
        addr = watch.addr - (watch.pieces[0].gpa - w.gpa);
    }
    (old, new, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(addr: u64, pieces: Vec<WatchPiece>, len: u64) -> WatchInfo {
        WatchInfo {
            id: 1,
            name: "x".into(),
            addr,
            len,
            access: WatchAccess::Write,
            mechanism: WatchMechanism::Page,
            pieces,
            hits: 0,
        }
    }

    /// A watch straddling two pages (its pieces far apart in RAM), written
    /// by 4 bytes across its start: old/new are the watch's own bytes, the
    /// written ones replaced in `old`, and the address is the write's.
    #[test]
    fn values_of_a_straddling_watch_around_a_write() {
        use guest_access::fake::{FakeMemory, FakeVm};
        let vm = FakeVm::new(FakeMemory::new(0x10000), 1);
        let pieces = vec![
            WatchPiece {
                gpa: 0x1ffe,
                len: 2,
                offset: 0,
            },
            WatchPiece {
                gpa: 0x8000,
                len: 4,
                offset: 2,
            },
        ];
        let w = watch(0xffff_8880_0000_1ffe, pieces, 6);
        vm.memory().write_phys(0x1ffc, &[9, 9, 0xa1, 0xa2]).unwrap();
        vm.memory().write_phys(0x8000, &[1, 2, 3, 4]).unwrap();
        // The guest wrote 9 9 a1 a2 at 0x1ffc over 0 0 5 6.
        let write = ProtectedWrite {
            gpa: 0x1ffc,
            len: 4,
            old: [0, 0, 5, 6, 0, 0, 0, 0],
            new: [9, 9, 0xa1, 0xa2, 0, 0, 0, 0],
            rip_after: 0,
        };
        let (old, new, addr) = values(&vm, &w, &write);
        assert_eq!(new, vec![0xa1, 0xa2, 1, 2, 3, 4]);
        assert_eq!(old, vec![5, 6, 1, 2, 3, 4]);
        assert_eq!(addr, 0xffff_8880_0000_1ffc);
    }

    #[test]
    fn overlap_is_half_open() {
        assert!(overlaps(10, 4, 13, 1));
        assert!(!overlaps(10, 4, 14, 1));
        assert!(!overlaps(10, 4, 6, 4));
        assert!(overlaps(10, 4, 6, 5));
    }

    #[test]
    fn pages_of_a_range_crossing_a_boundary() {
        let p = vec![
            WatchPiece {
                gpa: 0x1ffc,
                len: 4,
                offset: 0,
            },
            WatchPiece {
                gpa: 0x7000,
                len: 4,
                offset: 4,
            },
        ];
        assert_eq!(pages_of(&p), vec![0x1000, 0x7000]);
    }
}
