//! The guest's loaded modules as the probe table sees them: their text
//! counts as kernel text, their own kallsyms name and bound their
//! functions, and a site in the text of a module that has left the
//! `modules` list is gone: nothing is ever written there again (the memory
//! may belong to someone else by now). Reads only.

use std::sync::{Arc, RwLock};

use guest_access::SystemRegs;

use crate::guest::Guest;
use crate::modules::{self, LoadedModule, ModuleLayout, ModuleState, ModuleSymbol};
use crate::paging::{Access, GuestVirt};

/// What the engine knows of the guest's modules (empty until module
/// probes are asked for: [`crate::Engine::watch_modules`]).
#[derive(Default)]
pub(crate) struct GuestModules {
    pub layout: Option<ModuleLayout>,
    /// Kernel paging (any vCPU's: the kernel half is shared), to read the
    /// module list from a handler or an API call alike.
    pub sregs: Option<SystemRegs>,
    /// Modules seen loaded, with their functions.
    pub known: Vec<KnownModule>,
}

#[derive(Clone)]
pub(crate) struct KnownModule {
    pub module: LoadedModule,
    pub symbols: Arc<Vec<ModuleSymbol>>,
}

impl KnownModule {
    fn function_at(&self, addr: u64) -> Option<&ModuleSymbol> {
        let i = self.symbols.partition_point(|s| s.start <= addr);
        self.symbols[..i]
            .last()
            .filter(|s| addr >= s.start && addr < s.end)
    }
}

impl Guest {
    pub(crate) fn modules(&self) -> std::sync::RwLockReadGuard<'_, GuestModules> {
        self.modules.read().unwrap()
    }

    pub(crate) fn modules_mut(&self) -> std::sync::RwLockWriteGuard<'_, GuestModules> {
        self.modules.write().unwrap()
    }

    /// Reads kernel memory through `sregs`' page tables.
    fn reader(&self, sregs: SystemRegs) -> impl Fn(u64, &mut [u8]) -> Option<()> + '_ {
        move |addr, buf| {
            GuestVirt::new(self.vm.memory(), sregs, 0)
                .read(addr, buf, Access::Inspect)
                .ok()
        }
    }

    /// The guest's `modules` list now (None: not watching, or unreadable).
    pub(crate) fn read_module_list(&self) -> Option<Vec<LoadedModule>> {
        let (layout, sregs) = {
            let m = self.modules();
            (m.layout?, m.sregs?)
        };
        let read = self.reader(sregs);
        modules::list(&read, &layout)
            .map_err(|e| tracing::warn!("module list: {e}"))
            .ok()
    }

    /// The `struct module` at `address` and its functions, read with `sregs`.
    pub(crate) fn read_module(&self, address: u64, sregs: SystemRegs) -> Option<KnownModule> {
        let layout = self.modules().layout?;
        let read = self.reader(sregs);
        let module = modules::read_module(&read, &layout, address)?;
        let symbols = modules::symbols(&read, &layout, &module)?;
        Some(KnownModule {
            module,
            symbols: Arc::new(symbols),
        })
    }

    /// Remember a loaded module (replacing any older one at its address or
    /// with its name).
    pub(crate) fn learn_module(&self, k: KnownModule) {
        let mut m = self.modules_mut();
        m.known
            .retain(|o| o.module.address != k.module.address && o.module.name != k.module.name);
        m.known.push(k);
    }

    pub(crate) fn forget_module(&self, address: u64) {
        self.modules_mut()
            .known
            .retain(|o| o.module.address != address);
    }

    /// The known module whose text holds `addr`.
    pub(crate) fn module_at(&self, addr: u64) -> Option<KnownModule> {
        self.modules()
            .known
            .iter()
            .find(|k| k.module.contains(addr))
            .cloned()
    }

    /// The function containing `addr`, vmlinux's or a known module's.
    pub(crate) fn function_at(&self, addr: u64) -> Option<(String, u64, u64)> {
        if let Some(k) = self.module_at(addr) {
            return k
                .function_at(addr)
                .map(|s| (s.name.clone(), s.start, s.end));
        }
        self.symbols.function_at(addr)
    }

    /// Whether `addr` is kernel text the guest runs: a function of vmlinux
    /// or of a known module (None: no symbols to say).
    pub(crate) fn is_kernel_text(&self, addr: u64) -> Option<bool> {
        if let Some(k) = self.module_at(addr) {
            return Some(k.function_at(addr).is_some());
        }
        self.symbols.is_kernel_text(addr)
    }

    /// `sym+0x5/0x40 [module]` for module text.
    pub(crate) fn module_location(&self, addr: u64) -> Option<String> {
        let k = self.module_at(addr)?;
        Some(match k.function_at(addr) {
            Some(s) => format!(
                "{}+{:#x}/{:#x} [{}]",
                s.name,
                addr - s.start,
                s.end - s.start,
                k.module.name
            ),
            None => format!("{addr:#x} [{}]", k.module.name),
        })
    }

    /// Whether `addr` is in the text of a module hvprobe saw loaded that is
    /// no longer on the guest's `modules` list (or is being torn down:
    /// UNFORMED): then its memory is not that code any more. Unknown
    /// (unreadable list) counts as gone.
    pub(crate) fn in_unloaded_module(&self, addr: u64) -> bool {
        let Some(k) = self.module_at(addr) else {
            return false;
        };
        match self.read_module_list() {
            Some(list) => !list.iter().any(|m| {
                m.address == k.module.address
                    && m.text == k.module.text
                    && m.state != ModuleState::Unformed
            }),
            None => true,
        }
    }

    /// Code the guest freed: init text after boot, or an unloaded module's.
    pub(crate) fn code_gone(&self, addr: u64) -> bool {
        self.in_freed_init(addr) || self.in_unloaded_module(addr)
    }
}

/// A module's function by name: `[start, end)`.
pub(crate) fn find_symbol(k: &KnownModule, name: &str) -> Option<(u64, u64)> {
    k.symbols
        .iter()
        .find(|s| s.name == name)
        .map(|s| (s.start, s.end))
}

/// The lock the [`Guest`] keeps its modules under (innermost: taken with
/// the table held, never the other way).
pub(crate) type ModulesLock = RwLock<GuestModules>;
