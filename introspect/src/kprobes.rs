//! The engine and its public operations: register (one or a batch, all or
//! nothing), unregister, enable, arm, the return trap, subscriptions and
//! statistics. Like `kernel/kprobes.c`'s `register_kprobe` and friends: each
//! operation takes the API lock, stops the world, takes the table, and
//! leaves guest text matching the table.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use guest_access::{SystemRegs, Vcpu, VmControl};

use crate::action::Action;
use crate::error::{BatchError, ProbeError, TaskListingError};
use crate::events::{EventBus, EventFilter, ProbeId, SubscribeOptions, Subscription, Waker};
use crate::fetch::Reporter;
use crate::guest::Guest;
use crate::hwbp;
use crate::kretprobe::{Kretprobes, ReturnTrap};
use crate::module_watch::ModuleAddress;
use crate::paging::{Access, GuestVirt};
use crate::stats::{Counters, EngineStats};
use crate::symbols::KernelSymbols;
use crate::table::{Handling, NewSite, Probe, ProbeRequest, ProbeType, Site, SiteText, Table};
use crate::task;
use crate::text::{self, World};
use crate::xol::Scratch;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Default kretprobe maxactive (Linux: max(10, 2 × CPUs)).
    pub default_maxactive: u32,
    /// Longest string a fetch reads.
    pub max_string_len: usize,
}

impl EngineConfig {
    pub fn for_vcpus(vcpus: usize) -> Self {
        Self {
            default_maxactive: (2 * vcpus as u32).max(10),
            max_string_len: 256,
        }
    }
}

/// The probe engine. Register it as the VM's breakpoint handler.
///
/// Lock order (take them in this order, skip any; never the other way):
///
/// 1. `api`: one API operation at a time (registration, snapshot, ...).
/// 2. the world ([`World::stop`]): every vCPU but the caller's parked. A
///    vCPU thread stops the world from its handler holding no lock, since
///    an API stopper that holds the table would wait for it forever.
/// 3. `table` (read on the hit path, write to change sites or slots).
/// 4. then at most one of: `kret.trap`, `kret.instances`, `pool`; a
///    site's probe list ([`crate::table::SiteProbes`]) nests inside any.
///
/// Guest text is written only with the world stopped (`text.rs` takes a
/// [`World`]); `Site::planted` changes only then.
pub struct Engine {
    pub(crate) guest: Guest,
    pub(crate) config: EngineConfig,
    /// Serialises API operations (registration etc.).
    pub(crate) api: Mutex<()>,
    pub(crate) table: RwLock<Table>,
    pub(crate) armed: AtomicBool,
    /// Return trap and live kretprobe instances.
    pub(crate) kret: Kretprobes,
    /// Free padding for out-of-line slots (built on first use).
    pub(crate) pool: Mutex<Option<Scratch>>,
    pub(crate) bus: Arc<EventBus>,
    pub(crate) counters: Counters,
    /// Per vCPU: RFLAGS.IF to restore when it leaves an out-of-line slot.
    pub(crate) xol_if: Vec<AtomicBool>,
    /// vCPUs inside [`guest_access::BreakpointHandler::on_breakpoint`].
    /// With the world stopped, a non-zero count means a vCPU waits inside a
    /// handler to stop the world itself (a single-step): not a point to
    /// snapshot.
    pub(crate) in_handler: AtomicU32,
    /// Executable paths already walked by hits.
    pub(crate) exe_cache: task::ExeCache,
    /// Live [`ExeInterest`]s: hits read `mm->exe_file` only while some
    /// subscriber or filter wants it (three more reads per hit).
    pub(crate) exe_interest: AtomicUsize,
    /// Freeze and snapshot actions' holds on the vCPUs (`hold.rs`).
    pub(crate) holds: crate::action::Holds,
    pub(crate) action_sink: Mutex<Option<Arc<dyn crate::action::ActionSink>>>,
    /// Watches on guest data and their hits (`watch.rs`).
    pub(crate) watches: crate::watch::Watches,
}

/// Held while a subscriber or filter wants executable paths on events.
pub struct ExeInterest(Arc<Engine>);

impl Drop for ExeInterest {
    fn drop(&mut self) {
        self.0.exe_interest.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine {
    pub fn new(
        vm: Arc<dyn VmControl>,
        symbols: Arc<dyn KernelSymbols>,
        config: EngineConfig,
    ) -> Arc<Self> {
        let vcpus = vm.vcpu_count();
        Arc::new(Self {
            guest: Guest::new(vm, symbols),
            config,
            api: Mutex::new(()),
            table: RwLock::new(Table {
                next_id: 1,
                ..Default::default()
            }),
            armed: AtomicBool::new(true),
            kret: Kretprobes::default(),
            pool: Mutex::new(None),
            bus: Arc::new(EventBus::default()),
            counters: Counters::default(),
            xol_if: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            in_handler: AtomicU32::new(0),
            exe_cache: task::ExeCache::default(),
            exe_interest: AtomicUsize::new(0),
            holds: Default::default(),
            action_sink: Mutex::new(None),
            watches: Default::default(),
        })
    }

    pub(crate) fn vm(&self) -> &dyn VmControl {
        &*self.guest.vm
    }

    /// Ask for executable paths on events until the returned guard drops.
    pub fn want_exe(self: &Arc<Self>) -> ExeInterest {
        self.exe_interest.fetch_add(1, Ordering::SeqCst);
        ExeInterest(self.clone())
    }

    pub(crate) fn exe_for_hit(&self) -> Option<&task::ExeCache> {
        (self.exe_interest.load(Ordering::Relaxed) > 0).then_some(&self.exe_cache)
    }

    pub(crate) fn reporter(&self) -> Reporter<'_> {
        Reporter {
            bus: &self.bus,
            counters: &self.counters,
            max_string_len: self.config.max_string_len,
        }
    }

    /// The guest's processes (thread-group leaders on `init_task.tasks`),
    /// read with the other vCPUs stopped so no task exits mid-walk.
    pub fn list_tasks(&self) -> Result<Vec<task::TaskInfo>, TaskListingError> {
        let layout = self
            .guest
            .symbols
            .task_layout()
            .filter(|l| l.process.is_some())
            .ok_or(TaskListingError::NoLayout)?;
        let sregs = self
            .kernel_system_regs()
            .ok_or(TaskListingError::NoPaging)?;
        let _world = World::stop(self.vm(), None);
        let virt = GuestVirt::new(self.vm().memory(), sregs, 0);
        let read = |addr: u64, buf: &mut [u8]| virt.read(addr, buf, Access::Inspect).ok();
        Ok(task::list(&read, &layout)?)
    }

    /// The host-owned return trap's address, once set.
    pub fn return_trap_address(&self) -> Option<u64> {
        Some(self.kret.trap_addr()).filter(|a| *a != 0)
    }

    /// Set the host-owned return trap: a kernel-text byte the guest never
    /// executes (e.g. padding after a function). Required for kretprobes.
    pub fn set_return_trap(&self, addr: u64) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let mut t = self.kret.trap.lock().unwrap();
        if let Some(t) = t.as_ref().filter(|t| t.planted) {
            return Err(ProbeError::ReturnTrapInUse { addr: t.addr });
        }
        if self.guest.init_text().is_some_and(|i| i.contains(addr)) {
            return Err(ProbeError::Blacklisted {
                addr,
                location: self.guest.location(addr),
                why: "the return trap cannot live in init text, which the guest frees".into(),
            });
        }
        let sregs = self.kernel_system_regs();
        let gpa = self.guest.text_gpa(addr, sregs.as_ref())?;
        let mut b = [0u8; 1];
        self.vm().memory().read_phys(gpa, &mut b)?;
        *t = Some(ReturnTrap {
            addr,
            gpa,
            original: b[0],
            planted: false,
        });
        self.kret.trap_addr.store(addr, Ordering::SeqCst);
        Ok(())
    }

    /// Subscribe to events; see [`Subscription`].
    pub fn subscribe(
        &self,
        capacity: usize,
        filter: Option<EventFilter>,
        waker: Option<Waker>,
    ) -> Subscription {
        self.bus.subscribe(SubscribeOptions {
            capacity,
            select: None,
            filter,
            waker,
        })
    }

    /// Subscribe with a probe selector; see [`SubscribeOptions`].
    pub fn subscribe_with(&self, opts: SubscribeOptions) -> Subscription {
        self.bus.subscribe(opts)
    }

    pub fn stats(&self) -> EngineStats {
        self.counters.stats(self.kret.live_instances())
    }

    /// Number of live event subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.bus.subscriber_count()
    }

    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    /// Paging state of a running vCPU (fresh), or None before boot.
    /// A vCPU's system registers when the guest has paging on (the first
    /// vCPU that answers, or a restored VM's saved ones before its vCPUs
    /// run): what reading kernel memory by virtual address needs.
    pub fn kernel_system_regs(&self) -> Option<SystemRegs> {
        // Any vCPU with paging on will do (the kernel half is shared); ask
        // the next one when one cannot answer.
        let mut any_thread = false;
        for index in 0..self.vm().vcpu_count() {
            let out = Arc::new(Mutex::new(None));
            let o = out.clone();
            let r = self.vm().with_vcpu(
                index,
                Box::new(move |v: &mut dyn Vcpu| {
                    *o.lock().unwrap() = v.system_regs().ok();
                }),
            );
            any_thread |= r.is_ok();
            let s = *out.lock().unwrap();
            if let Some(s) = s.filter(|s| s.paging()) {
                return Some(s);
            }
        }
        if !any_thread {
            // No vCPU thread yet: a restored VM still knows its paging.
            return self.vm().saved_system_regs().filter(|s| s.paging());
        }
        None
    }

    /// Register one probe.
    pub fn register(&self, req: ProbeRequest) -> Result<ProbeId, ProbeError> {
        self.register_batch(vec![req])
            .map(|v| v[0])
            .map_err(|e| e.error)
    }

    /// Register all probes or none.
    pub fn register_batch(&self, reqs: Vec<ProbeRequest>) -> Result<Vec<ProbeId>, BatchError> {
        self.register_batch_as(reqs, None)
    }

    /// [`Self::register_batch`] with the probes' ids given (a restored
    /// table keeps its ids) or taken from the counter.
    pub(crate) fn register_batch_as(
        &self,
        reqs: Vec<ProbeRequest>,
        given_ids: Option<&[ProbeId]>,
    ) -> Result<Vec<ProbeId>, BatchError> {
        let _api = self.api.lock().unwrap();
        let sregs = self.kernel_system_regs();
        let world = World::stop(self.vm(), None);
        let mut table = self.table.write().unwrap();
        let staged = self.stage(&reqs, sregs.as_ref(), &table)?;
        if let Some(given) = given_ids {
            let taken = given.iter().position(|id| table.probes.contains_key(id));
            if given.len() != staged.len() || taken.is_some() {
                return Err(BatchError {
                    index: taken.unwrap_or(0),
                    error: ProbeError::Snapshot("restored probe ids collide or miscount".into()),
                });
            }
        }
        let mut ids = Vec::new();
        for (n, (mut probe, site)) in staged.into_iter().enumerate() {
            probe.id = match given_ids {
                Some(given) => given[n],
                None => table.next_id,
            };
            table.next_id = table.next_id.max(probe.id + 1);
            let probe = Arc::new(probe);
            if !probe.is_pending() {
                self.add_to_site(&world, &mut table, &probe, site, sregs.as_ref());
            }
            ids.push(probe.id);
            table.probes.insert(probe.id, probe);
        }
        // `addrs[i]` is the site of `reqs[i]`: a failure names that request.
        let addrs: Vec<u64> = ids.iter().map(|id| table.probes[id].site).collect();
        let mut failed = addrs
            .iter()
            .enumerate()
            .find_map(|(index, a)| self.sync(&world, &table, *a).err().map(|e| (index, e)));
        if failed.is_none() && table.any_kretprobe() {
            if let Err(e) = text::plant_trap(&world, self.vm().memory(), &self.kret) {
                // Planted already if an older kretprobe needed it, so it is
                // for this batch's first one.
                let index = reqs
                    .iter()
                    .position(|r| matches!(r.kind, ProbeType::Kretprobe { .. }))
                    .unwrap_or(0);
                failed = Some((index, e));
            }
        }
        if let Some((index, error)) = failed {
            self.roll_back(&world, &mut table, &ids, &addrs);
            return Err(BatchError { index, error });
        }
        Ok(ids)
    }

    /// Validate every request first: a batch that fails leaves no trace.
    fn stage(
        &self,
        reqs: &[ProbeRequest],
        sregs: Option<&SystemRegs>,
        table: &Table,
    ) -> Result<Vec<(Probe, NewSite)>, BatchError> {
        let check = self.prepare_check(table, sregs);
        let mut staged: Vec<(Probe, NewSite)> = Vec::new();
        let mut names = HashSet::new();
        for (index, req) in reqs.iter().enumerate() {
            if !names.insert(req.name.clone()) {
                return Err(BatchError {
                    index,
                    error: ProbeError::AlreadyExists {
                        name: req.name.clone(),
                        id: 0,
                    },
                });
            }
            if req.module.is_some() && req.action.is_some() {
                return Err(BatchError {
                    index,
                    error: ProbeError::ActionRefused {
                        addr: req.address,
                        location: req.definition.clone(),
                        why: "actions are not supported on module (MOD:SYM) probes".into(),
                    },
                });
            }
            let mut s = match self.module_address(req, sregs) {
                Ok(ModuleAddress::NotModule) => check.prepare(req),
                Ok(ModuleAddress::At(addr)) => check.prepare_at(req, addr, None),
                Ok(ModuleAddress::NotLoaded) => check.prepare_pending(req).map(|p| (p, None)),
                Err(e) => Err(e),
            }
            .map_err(|error| BatchError { index, error })?;
            if let Some((p, _)) = staged
                .iter()
                .find(|(p, _)| p.site == s.0.site && p.hardware != req.hardware)
            {
                return Err(BatchError {
                    index,
                    error: crate::table::mechanism_conflict(
                        req.address,
                        self.guest.location(req.address),
                        p.hardware,
                    ),
                });
            }
            let overrides = |p: &Probe| matches!(p.action, Some(Action::Override { .. }));
            if overrides(&s.0)
                && staged
                    .iter()
                    .any(|(p, _)| p.address == s.0.address && overrides(p))
            {
                return Err(BatchError {
                    index,
                    error: ProbeError::ActionRefused {
                        addr: req.address,
                        location: self.guest.location(req.address),
                        why: "another probe of this batch already overrides this function \
                              (one override per function)"
                            .into(),
                    },
                });
            }
            // Two new probes at one new address share one site.
            if s.1.is_some()
                && staged
                    .iter()
                    .any(|(p, site)| p.site == s.0.site && site.is_some())
            {
                s.1 = None;
            }
            staged.push(s);
        }
        Ok(staged)
    }

    /// Put `probe` on its site: a new one from `site`, or the existing one,
    /// rebuilt when the probe asks for a stricter handling than it has (no
    /// handler runs on it while we hold the world).
    pub(crate) fn add_to_site(
        &self,
        world: &World<'_>,
        table: &mut Table,
        probe: &Arc<Probe>,
        site: NewSite,
        sregs: Option<&SystemRegs>,
    ) {
        if let Some(text) = site {
            let want = probe.wanted_handling(&text.displaced);
            let s = self.new_site(world, table, probe, text, want, sregs, Vec::new());
            table.sites.insert(probe.site, Arc::new(s));
        }
        let site = table.sites[&probe.site].clone();
        site.probes.push(probe.clone());
        let want = probe.wanted_handling(&site.displaced);
        if want.rank() > site.handling.rank() {
            text::release_slot(world, &self.guest, &site, &mut table.slots, &self.pool);
            let probes = site.probes.snapshot().to_vec();
            let mut s2 = self.new_site(world, table, probe, site.text(), want, sregs, probes);
            s2.hook = site.hook;
            s2.planted
                .store(site.planted.load(Ordering::SeqCst), Ordering::SeqCst);
            s2.hw_slot
                .store(site.hw_slot.load(Ordering::SeqCst), Ordering::SeqCst);
            table.sites.insert(site.addr, Arc::new(s2));
        }
    }

    /// A site with `want` handling, or the next best: out-of-line needs a
    /// relocatable instruction and free padding, else single-step.
    #[allow(clippy::too_many_arguments)]
    fn new_site(
        &self,
        world: &World<'_>,
        table: &mut Table,
        probe: &Probe,
        text: SiteText,
        want: Handling,
        sregs: Option<&SystemRegs>,
        probes: Vec<Arc<Probe>>,
    ) -> Site {
        let mut slot = None;
        if want == Handling::OutOfLine {
            let mut pool = self.pool.lock().unwrap();
            let pool = pool.get_or_insert_with(|| {
                Scratch::for_padding(
                    self.guest.symbols.scratch_ranges(),
                    self.guest.init_text().map(|i| (i.start, i.end)),
                    self.kret.trap_addr(),
                )
            });
            slot = text::install_slot(world, &self.guest, pool, table, &text.displaced, sregs);
        }
        if let Some(sl) = &slot {
            table.slots.by_end.insert(sl.end(), sl.clone());
        }
        Site::new(probe.site, text, want, slot, probes, probe.hardware)
    }

    /// Undo a failed batch: remove what it added and restore its bytes.
    fn roll_back(&self, world: &World<'_>, table: &mut Table, ids: &[ProbeId], addrs: &[u64]) {
        for id in ids {
            if let Some(p) = table.probes.remove(id) {
                p.registered.store(false, Ordering::SeqCst);
                if let Some(s) = table.sites.get(&p.site).cloned() {
                    s.probes.remove(*id);
                }
            }
        }
        for a in addrs {
            let _ = self.sync(world, table, *a);
            if table
                .sites
                .get(a)
                .is_some_and(|s| s.probes.is_empty() && s.hook.is_none())
            {
                if let Some(site) = table.sites.remove(a) {
                    text::release_slot(world, &self.guest, &site, &mut table.slots, &self.pool);
                }
            }
        }
    }

    /// Plant or remove the int3 (or arm or release the debug register) at
    /// `addr` to match the probes' state.
    pub(crate) fn sync(
        &self,
        world: &World<'_>,
        table: &Table,
        addr: u64,
    ) -> Result<(), ProbeError> {
        match table.sites.get(&addr) {
            Some(site) if site.hardware => {
                hwbp::sync_hw_site(world, &self.guest, site, self.armed())
            }
            _ => text::sync_site(world, &self.guest, table, addr, self.armed()),
        }
    }

    /// Unregister one probe.
    pub fn unregister(&self, id: ProbeId) -> Result<(), ProbeError> {
        self.unregister_batch(&[id])
    }

    /// Unregister all of `ids`, or none if any is unknown.
    pub fn unregister_batch(&self, ids: &[ProbeId]) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let world = World::stop(self.vm(), None);
        let mut table = self.table.write().unwrap();
        if let Some(missing) = ids.iter().find(|id| !table.probes.contains_key(id)) {
            return Err(ProbeError::NotFound(*missing));
        }
        let mut first_err = None;
        for id in ids {
            let Some(p) = table.probes.remove(id) else {
                continue;
            };
            p.registered.store(false, Ordering::SeqCst);
            let addr = p.site;
            // A module probe whose module went away has no site: nothing to
            // write (and another probe's site may be at its old address).
            let empty = match table.sites.get(&addr).filter(|s| s.addr == addr) {
                Some(s) => s.probes.remove(*id) && s.hook.is_none(),
                None => false,
            };
            if let Err(e) = self.sync(&world, &table, addr) {
                first_err.get_or_insert(e);
            }
            if empty {
                if let Some(site) = table.sites.remove(&addr) {
                    text::release_slot(&world, &self.guest, &site, &mut table.slots, &self.pool);
                }
            }
        }
        text::retire_trap_if_unused(&world, self.vm().memory(), &table, &self.kret);
        first_err.map_or(Ok(()), Err)
    }

    /// Enable or disable one probe; the int3 stays while any probe at the
    /// address is enabled.
    pub fn set_enabled(&self, id: ProbeId, enabled: bool) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let world = World::stop(self.vm(), None);
        let table = self.table.read().unwrap();
        let p = table.probes.get(&id).ok_or(ProbeError::NotFound(id))?;
        p.enabled.store(enabled, Ordering::SeqCst);
        self.sync(&world, &table, p.site)
    }

    /// Arm or disarm every probe at once; each keeps its own enabled state.
    pub fn set_armed(&self, armed: bool) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        let world = World::stop(self.vm(), None);
        let table = self.table.read().unwrap();
        self.armed.store(armed, Ordering::SeqCst);
        let mut first_err = None;
        let addrs: Vec<u64> = table.sites.keys().copied().collect();
        for a in addrs {
            if let Err(e) = self.sync(&world, &table, a) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
