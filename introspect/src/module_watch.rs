//! Module probes (`MOD:SYM+off`): resolved from the guest's own module list
//! and kallsyms, pending while the module is not loaded, armed when it
//! loads, disarmed before it is freed.
//!
//! hvprobe watches loads and unloads with two host-internal sites (no
//! event, not listed), planted when the first module probe is asked for:
//!
//! - `do_init_module(mod)` (after the ftrace site): the module's text is
//!   final (relocated; alternatives, ftrace nops and jump labels applied by
//!   `prepare_coming_module`'s notifiers) and its init has not run. Every
//!   probe on that module name is resolved in the module's kallsyms and
//!   armed, with the world stopped, before the vCPU goes on.
//! - `free_module(mod)`: the module's text is still mapped and nothing of
//!   it is freed yet. Every site in its text gets its original byte back
//!   (if the int3 is still ours) and leaves the table; its probes are listed
//!   `[GONE]` and are armed again at the module's next load (like the
//!   kernel's trace_kprobe module callback). Deleting them writes nothing.
//!
//! If the host ever misses an unload (a probe created while the module is
//! being torn down), `guest_modules.rs` tells that the module left the
//! list, and the site is gone with nothing written.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use guest_access::{SystemRegs, Vcpu, VmControl};

use crate::error::ProbeError;
use crate::guest_modules::{self, KnownModule};
use crate::kprobes::Engine;
use crate::modules::{LoadedModule, ModuleLayout, ModuleState};
use crate::table::{ModuleHook, ModuleTarget, Prepare, Probe, ProbeRequest, Site, Table};
use crate::text::{self, World};

/// Where a request's probe goes.
pub(crate) enum ModuleAddress {
    /// Not a module probe: at `req.address`.
    NotModule,
    /// Its module is loaded: at this address.
    At(u64),
    /// Its module is not loaded: pending.
    NotLoaded,
}

impl Engine {
    /// Watch the guest's module loads and unloads (idempotent): plant the
    /// two internal sites and learn the modules loaded now. Needed before
    /// any `MOD:SYM` probe.
    pub fn watch_modules(&self, layout: ModuleLayout) -> Result<(), ProbeError> {
        let _api = self.api.lock().unwrap();
        if self.guest.modules().layout.is_some() {
            return Ok(());
        }
        let sregs = self.kernel_system_regs().ok_or_else(|| {
            ProbeError::ModulesUnavailable("the guest has not enabled paging yet".into())
        })?;
        let world = World::stop(self.vm(), None);
        let mut table = self.table.write().unwrap();
        {
            let mut m = self.guest.modules_mut();
            m.layout = Some(layout);
            m.sregs = Some(sregs);
        }
        let planted = self
            .plant_hook(
                &world,
                &mut table,
                layout.load_hook,
                ModuleHook::Loaded,
                &sregs,
            )
            .and_then(|_| {
                self.plant_hook(
                    &world,
                    &mut table,
                    layout.free_hook,
                    ModuleHook::Freed,
                    &sregs,
                )
            });
        let list = planted.and_then(|_| {
            self.guest.read_module_list().ok_or_else(|| {
                ProbeError::ModulesUnavailable(format!(
                    "cannot read the module list at {:#x}",
                    layout.modules
                ))
            })
        });
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                self.unplant_hooks(&world, &mut table);
                *self.guest.modules_mut() = Default::default();
                return Err(e);
            }
        };
        // A COMING module is before do_init_module or running its init:
        // only LIVE ones are final for sure (see README, module probes).
        for m in list.iter().filter(|m| m.state == ModuleState::Live) {
            if let Some(k) = self.guest.read_module(m.address, sregs) {
                self.guest.learn_module(k);
            }
        }
        Ok(())
    }

    /// The guest's `modules` list now (None before [`Self::watch_modules`]
    /// or when it does not read).
    pub fn loaded_modules(&self) -> Option<Vec<LoadedModule>> {
        self.guest.read_module_list()
    }

    /// The two hooks' sites, for tests and listings.
    pub fn module_hooks(&self) -> Vec<u64> {
        let table = self.table.read().unwrap();
        table
            .sites
            .values()
            .filter(|s| s.hook.is_some())
            .map(|s| s.addr)
            .collect()
    }

    fn plant_hook(
        &self,
        world: &World<'_>,
        table: &mut Table,
        func: u64,
        hook: ModuleHook,
        sregs: &SystemRegs,
    ) -> Result<(), ProbeError> {
        let check = self.prepare_check(table, Some(sregs));
        let at = check.placement(func, self.guest.function_at(func).as_ref())?;
        if let Some(s) = table.sites.get(&at) {
            // A hook is an int3 that stays planted; a debug-register site
            // cannot also be one.
            if s.hardware {
                return Err(crate::table::mechanism_conflict(
                    at,
                    self.guest.location(at),
                    true,
                ));
            }
            // A user's probe is there already: the site becomes a hook too.
            let mut s2 = Site::new(
                at,
                s.text(),
                s.handling,
                s.slot.clone(),
                s.probes.snapshot().to_vec(),
                false,
            );
            s2.hook = Some(hook);
            s2.planted
                .store(s.planted.load(Ordering::SeqCst), Ordering::SeqCst);
            table.sites.insert(at, Arc::new(s2));
        } else {
            let text = check.site_text(at)?;
            let mut s = Site::new(
                at,
                text,
                crate::table::Handling::SingleStep,
                None,
                Vec::new(),
                false,
            );
            s.handling = if s.displaced.is_emulated() {
                crate::table::Handling::Emulated
            } else {
                crate::table::Handling::SingleStep
            };
            s.hook = Some(hook);
            table.sites.insert(at, Arc::new(s));
        }
        self.sync(world, table, at)
    }

    fn unplant_hooks(&self, world: &World<'_>, table: &mut Table) {
        let hooks: Vec<u64> = table
            .sites
            .values()
            .filter(|s| s.hook.is_some() && s.probes.is_empty())
            .map(|s| s.addr)
            .collect();
        for a in hooks {
            if let Some(s) = table.sites.remove(&a) {
                text::remove_site(world, &self.guest, &s);
            }
        }
    }

    pub(crate) fn prepare_check<'a>(
        &'a self,
        table: &'a Table,
        sregs: Option<&'a SystemRegs>,
    ) -> Prepare<'a> {
        Prepare {
            guest: &self.guest,
            table,
            sregs,
            default_maxactive: self.config.default_maxactive,
            trap_addr: self.kret.trap_addr(),
            planted_trap: self.kret.planted_trap(),
        }
    }

    /// Where a request goes: a module probe is looked up in the guest's
    /// module list now (the caller holds the world stopped).
    pub(crate) fn module_address(
        &self,
        req: &ProbeRequest,
        sregs: Option<&SystemRegs>,
    ) -> Result<ModuleAddress, ProbeError> {
        let Some(t) = &req.module else {
            return Ok(ModuleAddress::NotModule);
        };
        if self.guest.modules().layout.is_none() {
            return Err(ProbeError::ModulesUnavailable(
                "module watching is not set up (Engine::watch_modules)".into(),
            ));
        }
        if let Some(s) = sregs {
            self.guest.modules_mut().sregs = Some(*s);
        }
        let list = self.guest.read_module_list().ok_or_else(|| {
            ProbeError::ModulesUnavailable("cannot read the guest's module list".into())
        })?;
        let Some(m) = list
            .iter()
            .find(|m| m.name == t.module && m.state == ModuleState::Live)
        else {
            return Ok(ModuleAddress::NotLoaded);
        };
        let k = self.know(m)?;
        let addr = resolve_in(&k, t)?;
        Ok(ModuleAddress::At(addr))
    }

    /// The module `m` with its symbols, learnt now if not known yet.
    fn know(&self, m: &LoadedModule) -> Result<KnownModule, ProbeError> {
        if let Some(k) = self.guest.module_at(m.text.0) {
            if k.module.address == m.address && k.module.text == m.text {
                return Ok(k);
            }
        }
        let sregs = self.guest.modules().sregs;
        let k = sregs
            .and_then(|s| self.guest.read_module(m.address, s))
            .ok_or_else(|| {
                ProbeError::ModulesUnavailable(format!(
                    "cannot read module {}'s symbols at {:#x}",
                    m.name, m.address
                ))
            })?;
        self.guest.learn_module(k.clone());
        Ok(k)
    }

    /// A hook's site was hit (on the trapping vCPU's thread, no lock held):
    /// `module` is the `struct module *` argument.
    pub(crate) fn on_module_hook(
        &self,
        hook: ModuleHook,
        module: u64,
        vcpu: &mut dyn Vcpu,
        vm: &dyn VmControl,
    ) {
        let Ok(sregs) = vcpu.system_regs() else {
            return;
        };
        // Lock order: world, then table; never the API lock from a handler.
        let world = World::stop(vm, Some(vcpu.index()));
        let mut table = self.table.write().unwrap();
        self.guest.modules_mut().sregs = Some(sregs);
        self.counters.module_events.fetch_add(1, Ordering::Relaxed);
        match hook {
            ModuleHook::Loaded => self.module_loaded(&world, &mut table, module, sregs),
            ModuleHook::Freed => self.module_freed(&world, &mut table, module, sregs),
        }
    }

    /// Arm every probe on the module that just loaded.
    fn module_loaded(&self, world: &World<'_>, table: &mut Table, module: u64, sregs: SystemRegs) {
        let Some(k) = self.guest.read_module(module, sregs) else {
            tracing::warn!("module loaded at {module:#x}: cannot read its struct module");
            return;
        };
        self.guest.learn_module(k.clone());
        let waiting: Vec<Arc<Probe>> = table
            .probes
            .values()
            .filter(|p| p.module.as_ref().is_some_and(|t| t.module == k.module.name))
            .filter(|p| !is_attached(table, p))
            .cloned()
            .collect();
        for p in waiting {
            let staged = resolve_in(&k, p.module.as_ref().unwrap()).and_then(|addr| {
                let req = ProbeRequest {
                    kind: p.kind,
                    enabled: p.enabled.load(Ordering::SeqCst),
                    force_single_step: p.force_single_step,
                    force_out_of_line: p.force_out_of_line,
                    fetch: p.fetch.clone(),
                    definition: p.definition.clone(),
                    module: p.module.clone(),
                    ..ProbeRequest::kprobe(p.name.clone(), addr)
                };
                let check = self.prepare_check(table, Some(&sregs));
                let (staged, site) = check.prepare_at(&req, addr, Some(p.id))?;
                Ok((addr, staged.site, site))
            });
            match staged {
                Ok((addr, site_addr, site)) => {
                    let fresh = Arc::new(p.rebound(addr, site_addr));
                    p.registered.store(false, Ordering::SeqCst);
                    table.probes.insert(p.id, fresh.clone());
                    self.add_to_site(world, table, &fresh, site, Some(&sregs));
                    if let Err(e) = self.sync(world, table, site_addr) {
                        tracing::warn!("arming {} in {}: {e}", p.name, k.module.name);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "module {} loaded: probe {} stays unarmed: {e}",
                        k.module.name,
                        p.name
                    );
                    *p.module_error.lock().unwrap() = Some(e.to_string());
                }
            }
        }
        if table.any_kretprobe() {
            let _ = text::plant_trap(world, self.vm().memory(), &self.kret);
        }
    }

    /// Disarm every site in the text of the module about to be freed.
    fn module_freed(&self, world: &World<'_>, table: &mut Table, module: u64, sregs: SystemRegs) {
        let layout = self.guest.modules().layout;
        let text = self
            .guest
            .read_module(module, sregs)
            .map(|k| k.module.text)
            .or_else(|| {
                // Its kallsyms may be unreadable: the text range is enough.
                let l = layout?;
                let read = |a: u64, b: &mut [u8]| {
                    crate::paging::GuestVirt::new(self.vm().memory(), sregs, 0)
                        .read(a, b, crate::paging::Access::Inspect)
                        .ok()
                };
                crate::modules::read_module(&read, &l, module).map(|m| m.text)
            });
        let Some((start, end)) = text else {
            tracing::warn!("module freed at {module:#x}: cannot read its struct module");
            return;
        };
        let doomed: Vec<u64> = table
            .sites
            .keys()
            .copied()
            .filter(|a| *a >= start && *a < end)
            .collect();
        for a in doomed {
            if let Some(site) = table.sites.remove(&a) {
                text::remove_site(world, &self.guest, &site);
                text::release_slot(world, &self.guest, &site, &mut table.slots, &self.pool);
            }
        }
        self.guest.forget_module(module);
    }
}

/// Whether `p` is on a site in the table (armed or disabled, not gone).
fn is_attached(table: &Table, p: &Arc<Probe>) -> bool {
    !p.is_pending()
        && table
            .sites
            .get(&p.site)
            .is_some_and(|s| s.probes.snapshot().iter().any(|q| Arc::ptr_eq(q, p)))
}

/// `MOD:SYM+off`'s address in the loaded module `k`.
fn resolve_in(k: &KnownModule, t: &ModuleTarget) -> Result<u64, ProbeError> {
    let (start, end) = guest_modules::find_symbol(k, &t.symbol).ok_or_else(|| {
        ProbeError::ModuleSymbolNotFound {
            module: t.module.clone(),
            symbol: t.symbol.clone(),
        }
    })?;
    let addr = start.wrapping_add(t.offset);
    if addr >= end {
        return Err(ProbeError::ModuleOffsetOutside {
            target: t.to_string(),
            size: end - start,
        });
    }
    Ok(addr)
}
