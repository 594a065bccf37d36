//! The guest's kernel as the probe table reads it: virtual to physical for
//! text and data, raw reads by physical address, `sym+off` names, and
//! whether the guest has freed its init text. Reads only: every write of
//! guest text is `text.rs`'s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use guest_access::{SystemRegs, VmControl};

use crate::error::ProbeError;
use crate::guest_modules::ModulesLock;
use crate::paging::{Access, GuestVirt};
use crate::symbols::{InitText, KernelSymbols, KERNEL_TEXT_MAP, SYSTEM_FREEING_INITMEM};

/// The VM and its symbols, with what the engine learns about them once.
pub(crate) struct Guest {
    pub vm: Arc<dyn VmControl>,
    pub symbols: Arc<dyn KernelSymbols>,
    /// The symbols' padding ranges, asked for once (refusing probes there).
    scratch_ranges: OnceLock<Vec<(u64, u64)>>,
    /// The symbols' init text, asked for once.
    init_text: OnceLock<Option<InitText>>,
    /// Guest-physical address of `system_state` (the kernel image's mapping
    /// never moves once set up), found by the first probe in init text.
    system_state_gpa: OnceLock<u64>,
    /// The guest has freed its init text (never goes back).
    init_freed: AtomicBool,
    /// Loaded modules (see `guest_modules.rs`).
    pub(crate) modules: ModulesLock,
}

impl Guest {
    pub fn new(vm: Arc<dyn VmControl>, symbols: Arc<dyn KernelSymbols>) -> Self {
        Guest {
            vm,
            symbols,
            scratch_ranges: OnceLock::new(),
            init_text: OnceLock::new(),
            system_state_gpa: OnceLock::new(),
            init_freed: AtomicBool::new(false),
            modules: ModulesLock::default(),
        }
    }

    /// `sym+0x5/0x40`, or the bare address.
    pub fn location(&self, addr: u64) -> String {
        self.module_location(addr)
            .or_else(|| self.symbols.describe(addr))
            .unwrap_or_else(|| format!("{addr:#x}"))
    }

    /// The padding between functions (host-owned: out-of-line slots).
    pub fn scratch_ranges(&self) -> &[(u64, u64)] {
        self.scratch_ranges
            .get_or_init(|| self.symbols.scratch_ranges())
    }

    /// Guest-physical address of kernel text at `addr`.
    pub fn text_gpa(&self, addr: u64, sregs: Option<&SystemRegs>) -> Result<u64, ProbeError> {
        match sregs {
            Some(s) => {
                let v = GuestVirt::new(self.vm.memory(), *s, 0);
                let t = v
                    .translate(addr, Access::Inspect)
                    .map_err(|e| ProbeError::Unmapped {
                        addr,
                        why: e.to_string(),
                    })?;
                if !t.executable {
                    return Err(ProbeError::Unmapped {
                        addr,
                        why: "the page is not executable (NX)".into(),
                    });
                }
                // Mapped by the guest but not to RAM (a hole, MMIO): a bad
                // address, not a guest that went away.
                if let Err(e) = self.vm.memory().read_phys(t.gpa, &mut [0u8; 1]) {
                    return Err(ProbeError::Unmapped {
                        addr,
                        why: format!("it maps to {:#x}, which is not guest RAM ({e})", t.gpa),
                    });
                }
                Ok(t.gpa)
            }
            None if addr >= KERNEL_TEXT_MAP => {
                let gpa = addr - KERNEL_TEXT_MAP;
                if gpa >= self.vm.memory().ram_end() {
                    return Err(ProbeError::Unmapped {
                        addr,
                        why: "outside the loaded kernel image".into(),
                    });
                }
                Ok(gpa)
            }
            None => Err(ProbeError::Unmapped {
                addr,
                why: "not a kernel-text address and the guest has not enabled paging yet".into(),
            }),
        }
    }

    /// Guest-physical address of each byte of kernel text `[addr, addr+len)`.
    pub fn text_gpas(
        &self,
        addr: u64,
        len: usize,
        sregs: Option<&SystemRegs>,
    ) -> Result<Vec<u64>, ProbeError> {
        (0..len as u64)
            .map(|i| self.text_gpa(addr + i, sregs))
            .collect()
    }

    /// One byte of guest RAM.
    pub fn read_byte(&self, gpa: u64) -> Result<u8, ProbeError> {
        let mut b = [0u8; 1];
        self.vm.memory().read_phys(gpa, &mut b)?;
        Ok(b[0])
    }

    /// The bytes at `gpas`, one each.
    pub fn read_gpas(&self, gpas: &[u64], buf: &mut [u8]) -> Result<(), ProbeError> {
        for (gpa, b) in gpas.iter().zip(buf.iter_mut()) {
            *b = self.read_byte(*gpa)?;
        }
        Ok(())
    }

    /// Whether every `(gpa, byte)` still holds that byte: a displaced
    /// instruction's other bytes are as the site was built on.
    pub fn holds(&self, bytes: &[(u64, u8)]) -> bool {
        bytes
            .iter()
            .all(|(gpa, want)| self.read_byte(*gpa).is_ok_and(|b| b == *want))
    }

    pub fn init_text(&self) -> Option<InitText> {
        *self.init_text.get_or_init(|| self.symbols.init_text())
    }

    /// Refuse a site in init text that the guest has freed, or when whether
    /// it has cannot be told.
    pub fn check_init_text(&self, addr: u64, sregs: Option<&SystemRegs>) -> Result<(), ProbeError> {
        let Some(init) = self.init_text().filter(|i| i.contains(addr)) else {
            return Ok(());
        };
        let unknown = |why: String| ProbeError::InitStateUnknown {
            addr,
            location: self.location(addr),
            state_addr: init.system_state,
            why,
        };
        if self.system_state_gpa.get().is_none() {
            let gpa = self
                .kernel_data_gpa(init.system_state, sregs)
                .map_err(unknown)?;
            let _ = self.system_state_gpa.set(gpa);
        }
        match self.read_system_state() {
            Some(state) if state >= SYSTEM_FREEING_INITMEM => {
                self.init_freed.store(true, Ordering::SeqCst);
                Err(ProbeError::InitTextFreed {
                    addr,
                    location: self.location(addr),
                    state,
                })
            }
            Some(_) => Ok(()),
            None => Err(unknown("it is not in guest RAM".into())),
        }
    }

    fn read_system_state(&self) -> Option<u32> {
        let gpa = *self.system_state_gpa.get()?;
        let mut b = [0u8; 4];
        self.vm.memory().read_phys(gpa, &mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    /// Whether `addr` is init text the guest has freed or is freeing: then
    /// nothing may be written there. Unknown counts as freed.
    pub fn in_freed_init(&self, addr: u64) -> bool {
        if !self.init_text().is_some_and(|i| i.contains(addr)) {
            return false;
        }
        if self.init_freed.load(Ordering::SeqCst) {
            return true;
        }
        match self.read_system_state() {
            Some(state) if state < SYSTEM_FREEING_INITMEM => false,
            Some(_) => {
                self.init_freed.store(true, Ordering::SeqCst);
                true
            }
            None => true,
        }
    }

    /// Guest-physical address of kernel data at `addr` (no NX check).
    fn kernel_data_gpa(&self, addr: u64, sregs: Option<&SystemRegs>) -> Result<u64, String> {
        let gpa = match sregs {
            Some(s) => {
                GuestVirt::new(self.vm.memory(), *s, 0)
                    .translate(addr, Access::Inspect)
                    .map_err(|e| e.to_string())?
                    .gpa
            }
            None if addr >= KERNEL_TEXT_MAP => addr - KERNEL_TEXT_MAP,
            None => return Err("the guest has not enabled paging yet".into()),
        };
        if gpa + 4 > self.vm.memory().ram_end() {
            return Err(format!("it maps to {gpa:#x}, outside guest RAM"));
        }
        Ok(gpa)
    }

    /// A call at a function's entry into `__fentry__`, ftrace's own code or
    /// a trampoline outside the kernel's text (ftrace allocates those).
    pub fn is_ftrace_target(&self, target: u64) -> bool {
        match self.function_at(target) {
            Some((name, _, _)) => name == "__fentry__" || name.starts_with("ftrace_"),
            None => self.is_kernel_text(target) != Some(true),
        }
    }
}
