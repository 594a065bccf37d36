//! The probe table: like `kernel/kprobes.c`'s hash table of kprobes, one
//! [`Site`] (one `int3`) per address with the aggregate list of [`Probe`]s
//! behind it, and [`Prepare`], which checks a request (name, blacklist,
//! kernel text, instruction boundary, ftrace site, init text) and builds its
//! site's data without touching the guest.
//!
//! The table owns the original bytes: when every probe is gone, guest text
//! is byte-identical to before. Planting and removing the `int3`s is
//! `text.rs`'s, with the world stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use guest_access::SystemRegs;
use insn_emu::Displaced;
use probe_spec::ProbeDef;

use crate::action::{Action, ActionGate};
use crate::addr_map::AddrMap;
use crate::error::ProbeError;
use crate::events::ProbeId;
use crate::guest::Guest;
use crate::xol::{Slots, XolSlot};

/// Upper bound for `maxactive` (the kernel's KRETPROBE_MAXACTIVE_MAX).
pub const MAXACTIVE_MAX: u32 = 4096;

/// kprobe or kretprobe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeType {
    Kprobe,
    Kretprobe { maxactive: Option<u32> },
}

/// How the displaced instruction is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Emulated on the host: one exit per hit.
    Emulated,
    /// Run out of line in a host-owned slot followed by an int3: two exits,
    /// no other vCPU stops.
    OutOfLine,
    /// Stop the world, restore the byte, single-step, re-plant.
    SingleStep,
}

impl Handling {
    /// How strict a handling is: a site takes the strictest any probe asks for.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Handling::Emulated => 0,
            Handling::OutOfLine => 1,
            Handling::SingleStep => 2,
        }
    }
}

/// A probe to register.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    /// `group/event`, unique.
    pub name: String,
    pub address: u64,
    pub kind: ProbeType,
    /// Fetch arguments (kprobe_events syntax, resolved).
    pub fetch: Option<ProbeDef>,
    pub enabled: bool,
    /// Force the stop-the-world single-step even if the instruction is emulable.
    pub force_single_step: bool,
    /// Force out-of-line execution even if the instruction is emulable.
    pub force_out_of_line: bool,
    /// Trap with a debug register instead of an `int3`: guest text is never
    /// written for it (the return trap of a kretprobe still is).
    pub hardware: bool,
    /// The definition as the user wrote it (for listings).
    pub definition: String,
    /// `MOD:SYM+off`: resolved from the guest's module list, armed when the
    /// module loads (`address` is ignored).
    pub module: Option<ModuleTarget>,
    /// What a hit does beyond reporting (see [`crate::action`]).
    pub action: Option<Action>,
    /// Which hits the action runs for (none: every hit).
    pub action_gate: Option<Gate>,
}

/// An [`ActionGate`] that prints as its presence (requests are `Debug`).
#[derive(Clone)]
pub struct Gate(pub ActionGate);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

/// A probe point in a module, `MOD:SYM+off`, resolved from guest memory
/// each time the module loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleTarget {
    pub module: String,
    pub symbol: String,
    pub offset: u64,
}

impl std::fmt::Display for ModuleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.module, self.symbol)?;
        if self.offset != 0 {
            write!(f, "+{:#x}", self.offset)?;
        }
        Ok(())
    }
}

/// Which kernel function a host-internal site watches ([`Site::hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModuleHook {
    /// `do_init_module(mod)`: the module's text is final; arm its probes.
    Loaded,
    /// `free_module(mod)`: its text is still mapped; disarm its probes.
    Freed,
}

impl ProbeRequest {
    pub fn kprobe(name: impl Into<String>, address: u64) -> Self {
        Self {
            name: name.into(),
            address,
            kind: ProbeType::Kprobe,
            fetch: None,
            enabled: true,
            force_single_step: false,
            force_out_of_line: false,
            hardware: false,
            definition: String::new(),
            module: None,
            action: None,
            action_gate: None,
        }
    }

    pub fn kretprobe(name: impl Into<String>, address: u64, maxactive: Option<u32>) -> Self {
        Self {
            kind: ProbeType::Kretprobe { maxactive },
            ..Self::kprobe(name, address)
        }
    }
}

/// One registered probe: a kprobe, or a kretprobe with its instance limit.
pub(crate) struct Probe {
    pub id: ProbeId,
    pub name: String,
    /// 0 while a module probe waits for its module ([`Probe::is_pending`]).
    pub address: u64,
    /// Where its int3 is: `address`, or the instruction after the function's
    /// ftrace site for a probe on a function entry (see [`Prepare::placement`]).
    pub site: u64,
    pub kind: ProbeType,
    pub maxactive: u32,
    pub fetch: Option<ProbeDef>,
    pub definition: String,
    pub force_single_step: bool,
    pub force_out_of_line: bool,
    /// Its site is a debug-register breakpoint.
    pub hardware: bool,
    pub action: Option<Action>,
    pub action_gate: Option<Gate>,
    /// Hits whose action ran.
    pub actions: AtomicU64,
    pub enabled: AtomicBool,
    /// Cleared when unregistered (a hit or return may still hold it).
    pub registered: AtomicBool,
    pub hits: AtomicU64,
    /// kretprobes: entries with no free instance (nmissed).
    pub missed: AtomicU64,
    pub dropped: AtomicU64,
    /// kretprobes: live instances.
    pub active: AtomicU32,
    /// `MOD:SYM+off` probes: where to arm again when the module loads.
    pub module: Option<ModuleTarget>,
    /// Why a module probe could not be armed at the module's last load.
    pub module_error: std::sync::Mutex<Option<String>>,
}

impl Probe {
    /// A module probe whose module has not been loaded since it was created.
    pub fn is_pending(&self) -> bool {
        self.module.is_some() && self.address == 0
    }

    /// The same probe (id, settings, counters) at `address`, its int3 at `site`.
    pub fn rebound(&self, address: u64, site: u64) -> Probe {
        let copy = |a: &AtomicU64| AtomicU64::new(a.load(Ordering::SeqCst));
        Probe {
            id: self.id,
            name: self.name.clone(),
            address,
            site,
            kind: self.kind,
            maxactive: self.maxactive,
            fetch: self.fetch.clone(),
            definition: self.definition.clone(),
            force_single_step: self.force_single_step,
            force_out_of_line: self.force_out_of_line,
            hardware: self.hardware,
            action: self.action.clone(),
            action_gate: self.action_gate.clone(),
            actions: copy(&self.actions),
            enabled: AtomicBool::new(self.enabled.load(Ordering::SeqCst)),
            registered: AtomicBool::new(true),
            hits: copy(&self.hits),
            missed: copy(&self.missed),
            dropped: copy(&self.dropped),
            active: AtomicU32::new(0),
            module: self.module.clone(),
            module_error: Default::default(),
        }
    }

    /// The handling this probe asks for at a site displacing `d`.
    pub fn wanted_handling(&self, d: &Displaced) -> Handling {
        if self.hardware {
            // Out of line would write a slot into guest text; stepping in
            // place needs no text change (the VMM leaves the debug
            // registers out for the one step).
            return if self.force_single_step || !d.is_emulated() {
                Handling::SingleStep
            } else {
                Handling::Emulated
            };
        }
        if self.force_single_step {
            Handling::SingleStep
        } else if self.force_out_of_line || !d.is_emulated() {
            Handling::OutOfLine
        } else {
            Handling::Emulated
        }
    }

    pub fn is_kretprobe(&self) -> bool {
        matches!(self.kind, ProbeType::Kretprobe { .. })
    }
}

/// The probes at one address (the aggregate list). A hit takes a snapshot
/// (one reference count, no copy); registration replaces the list (copy on
/// write).
#[derive(Default)]
pub(crate) struct SiteProbes(RwLock<Arc<Vec<Arc<Probe>>>>);

impl SiteProbes {
    pub fn new(probes: Vec<Arc<Probe>>) -> Self {
        SiteProbes(RwLock::new(Arc::new(probes)))
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Probe>>> {
        self.0.read().unwrap().clone()
    }

    pub fn push(&self, p: Arc<Probe>) {
        Arc::make_mut(&mut self.0.write().unwrap()).push(p);
    }

    /// Removes probe `id`; true if none is left.
    pub fn remove(&self, id: ProbeId) -> bool {
        let mut w = self.0.write().unwrap();
        Arc::make_mut(&mut w).retain(|q| q.id != id);
        w.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap().is_empty()
    }
}

/// [`Site::hw_slot`] when no debug register is held.
pub(crate) const NO_HW_SLOT: usize = usize::MAX;

/// One `int3` in guest text (or one debug-register breakpoint) and the
/// probes behind it.
pub(crate) struct Site {
    pub addr: u64,
    pub gpa: u64,
    pub original: u8,
    /// The displaced instruction's other bytes (guest-physical address,
    /// original byte). The int3 is put back only while all of them still
    /// hold the instruction: a guest that freed or rewrote the code (its
    /// init text poisoned with 0xcc, a module's memory reused, a jump label
    /// flipped) gets nothing written into it.
    pub tail: Vec<(u64, u8)>,
    pub displaced: Displaced,
    pub handling: Handling,
    /// The int3 is in guest memory. Changed only by the world's stopper.
    pub planted: AtomicBool,
    /// The guest overwrote the int3 (its code changed or went away).
    pub gone: AtomicBool,
    pub probes: SiteProbes,
    /// The out-of-line slot, for [`Handling::OutOfLine`].
    pub slot: Option<Arc<XolSlot>>,
    /// A debug-register site: `planted` stays false, `hw_slot` holds the
    /// slot while armed ([`NO_HW_SLOT`] otherwise). Changed only by the
    /// world's stopper, like `planted`.
    pub hardware: bool,
    pub hw_slot: AtomicUsize,
    /// A host-internal site watching module loads or unloads: planted
    /// whatever the probes behind it (none, or users' own) and the global
    /// arm switch say, and never removed.
    pub hook: Option<ModuleHook>,
}

impl Site {
    /// A site at `addr` over `text` with `want` handling, or single-step when
    /// out-of-line was wanted and no slot could be had.
    pub fn new(
        addr: u64,
        text: SiteText,
        want: Handling,
        slot: Option<Arc<XolSlot>>,
        probes: Vec<Arc<Probe>>,
        hardware: bool,
    ) -> Site {
        let handling = match (want, &slot) {
            (Handling::OutOfLine, None) => Handling::SingleStep,
            _ => want,
        };
        Site {
            addr,
            gpa: text.gpa,
            original: text.original,
            tail: text.tail,
            displaced: text.displaced,
            handling,
            planted: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            probes: SiteProbes::new(probes),
            slot,
            hardware,
            hw_slot: AtomicUsize::new(NO_HW_SLOT),
            hook: None,
        }
    }

    /// The debug-register slot armed for this site, if any.
    pub fn armed_hw_slot(&self) -> Option<usize> {
        Some(self.hw_slot.load(Ordering::SeqCst)).filter(|s| *s != NO_HW_SLOT)
    }

    /// The bytes the site was built on (to build it again).
    pub fn text(&self) -> SiteText {
        SiteText {
            gpa: self.gpa,
            original: self.original,
            displaced: self.displaced.clone(),
            tail: self.tail.clone(),
        }
    }

    /// Whether any probe here wants the int3 (given the global arm switch).
    pub fn wanted(&self, armed: bool) -> bool {
        self.hook.is_some()
            || armed
                && self
                    .probes
                    .snapshot()
                    .iter()
                    .any(|p| p.enabled.load(Ordering::SeqCst))
    }
}

/// The guest bytes of a site to create for a new probe.
pub(crate) struct SiteText {
    pub gpa: u64,
    pub original: u8,
    pub displaced: Displaced,
    pub tail: Vec<(u64, u8)>,
}

/// A new site's bytes, or None when the probe joins an existing site.
pub(crate) type NewSite = Option<SiteText>;

/// Sites by address, probes by id, and the out-of-line slots.
#[derive(Default)]
pub(crate) struct Table {
    pub sites: AddrMap<Arc<Site>>,
    pub probes: HashMap<ProbeId, Arc<Probe>>,
    pub next_id: ProbeId,
    pub slots: Slots,
}

impl Table {
    pub fn any_kretprobe(&self) -> bool {
        self.probes.values().any(|p| p.is_kretprobe())
    }
}

/// A new probe for `req` at `address`, its int3 at `site` (maxactive 0).
fn new_probe(req: &ProbeRequest, address: u64, site: u64) -> Probe {
    Probe {
        id: 0,
        name: req.name.clone(),
        address,
        site,
        kind: req.kind,
        maxactive: 0,
        fetch: req.fetch.clone(),
        definition: req.definition.clone(),
        force_single_step: req.force_single_step,
        force_out_of_line: req.force_out_of_line,
        hardware: req.hardware,
        action: req.action.clone(),
        action_gate: req.action_gate.clone(),
        actions: AtomicU64::new(0),
        enabled: AtomicBool::new(req.enabled),
        registered: AtomicBool::new(true),
        hits: AtomicU64::new(0),
        missed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        active: AtomicU32::new(0),
        module: req.module.clone(),
        module_error: Default::default(),
    }
}

/// Checks a request against the table and the guest, and reads the bytes
/// its site needs. Run with the API lock and the table held, so neither the
/// table nor the return trap changes meanwhile.
pub(crate) struct Prepare<'a> {
    pub guest: &'a Guest,
    pub table: &'a Table,
    pub sregs: Option<&'a SystemRegs>,
    pub default_maxactive: u32,
    /// The return trap's address (0: none).
    pub trap_addr: u64,
    /// The return trap's original byte while its int3 is planted.
    pub planted_trap: Option<(u64, u8)>,
}

/// Probes at one address share one trap: an `int3` and a debug register
/// there cannot both be had.
pub(crate) fn mechanism_conflict(addr: u64, location: String, existing_hw: bool) -> ProbeError {
    let (have, want) = if existing_hw {
        ("a hardware breakpoint (%hw)", "an int3")
    } else {
        ("an int3", "a hardware breakpoint (%hw)")
    };
    ProbeError::Mechanism {
        addr,
        location,
        why: format!(
            "the probes already there trap with {have}; one address has one trap, so it cannot \
             also use {want}"
        ),
    }
}

impl Prepare<'_> {
    fn location(&self, addr: u64) -> String {
        self.guest.location(addr)
    }

    /// Check a request and build its site data (without planting).
    pub fn prepare(&self, req: &ProbeRequest) -> Result<(Probe, NewSite), ProbeError> {
        self.prepare_at(req, req.address, None)
    }

    /// A module probe whose module is not loaded: checked as far as it can
    /// be without its text, no site.
    pub fn prepare_pending(&self, req: &ProbeRequest) -> Result<Probe, ProbeError> {
        if let Some(p) = self.table.probes.values().find(|p| p.name == req.name) {
            return Err(ProbeError::AlreadyExists {
                name: req.name.clone(),
                id: p.id,
            });
        }
        let maxactive = self.maxactive(req)?;
        Ok(Probe {
            address: 0,
            site: 0,
            maxactive,
            ..new_probe(req, 0, 0)
        })
    }

    fn maxactive(&self, req: &ProbeRequest) -> Result<u32, ProbeError> {
        match req.kind {
            ProbeType::Kprobe => Ok(0),
            ProbeType::Kretprobe { maxactive } => {
                let m = maxactive.unwrap_or(self.default_maxactive);
                if m == 0 || m > MAXACTIVE_MAX {
                    return Err(ProbeError::BadMaxactive {
                        got: m,
                        max: MAXACTIVE_MAX,
                    });
                }
                if self.trap_addr == 0 {
                    return Err(ProbeError::NoReturnTrap);
                }
                Ok(m)
            }
        }
    }

    /// Check `req` placed at `addr` and build its site data; `rebinding`
    /// names the probe being armed again (its own name and point are no
    /// clash).
    pub fn prepare_at(
        &self,
        req: &ProbeRequest,
        addr: u64,
        rebinding: Option<ProbeId>,
    ) -> Result<(Probe, NewSite), ProbeError> {
        let table = self.table;
        let others = || table.probes.values().filter(|p| Some(p.id) != rebinding);
        if let Some(p) = others().find(|p| p.name == req.name) {
            return Err(ProbeError::AlreadyExists {
                name: req.name.clone(),
                id: p.id,
            });
        }
        // Like the kernel's SAME_PROBE: the same point with the same
        // definition again. Other probes at one address are welcome.
        if let Some(p) = others().find(|p| {
            p.address == addr
                && p.kind == req.kind
                && p.fetch == req.fetch
                && !req.definition.is_empty()
                && p.definition == req.definition
        }) {
            return Err(ProbeError::Duplicate { addr, id: p.id });
        }
        if let Some(why) = self.guest.symbols.blacklisted(addr) {
            return Err(ProbeError::Blacklisted {
                addr,
                location: self.location(addr),
                why,
            });
        }
        if self.trap_addr == addr && addr != 0 {
            return Err(ProbeError::Blacklisted {
                addr,
                location: self.location(addr),
                why: "it is hvprobe's own return trap".into(),
            });
        }
        if let Some(why) = self.host_owned(addr) {
            return Err(ProbeError::NotKernelText {
                addr,
                location: self.location(addr),
                why,
            });
        }
        // Before the page-table checks: freed init text is also unmapped or
        // NX by then, and this says why.
        self.guest.check_init_text(addr, self.sregs)?;
        let maxactive = self.maxactive(req)?;
        let func = self.guest.function_at(addr);
        self.check_action(req, func.as_ref())?;
        if let ProbeType::Kretprobe { .. } = req.kind {
            if let Some((_, start, _)) = &func {
                if *start != addr {
                    return Err(ProbeError::RetprobeNotAtEntry {
                        addr,
                        location: self.location(addr),
                    });
                }
            }
        }
        if self.guest.is_kernel_text(addr) == Some(false) {
            // An unmapped address says so first.
            self.guest.text_gpa(addr, self.sregs)?;
            return Err(ProbeError::NotKernelText {
                addr,
                location: self.location(addr),
                why: "it is not inside any function of the kernel's symbol table \
                      (data, padding, user or direct-map addresses are never patched)"
                    .into(),
            });
        }
        if let Some((_, start, _)) = &func {
            self.check_boundary(addr, *start)?;
        }
        let site_addr = self.placement(addr, func.as_ref())?;
        if site_addr != addr {
            if let Some(why) = self.guest.symbols.blacklisted(site_addr) {
                return Err(ProbeError::Blacklisted {
                    addr,
                    location: self.location(addr),
                    why: format!(
                        "its int3 would go after the ftrace site, at {site_addr:#x}, which is {why}"
                    ),
                });
            }
            if let Some(why) = self.host_owned(site_addr) {
                return Err(ProbeError::NotKernelText {
                    addr: site_addr,
                    location: self.location(site_addr),
                    why,
                });
            }
        }
        self.guest.check_init_text(site_addr, self.sregs)?;
        if req.hardware && req.force_out_of_line {
            return Err(ProbeError::Mechanism {
                addr,
                location: self.location(addr),
                why: "a hardware-breakpoint probe cannot run out of line (the slot would be \
                      written into guest text)"
                    .into(),
            });
        }
        if let Some(s) = table
            .sites
            .get(&site_addr)
            .filter(|s| s.hardware != req.hardware)
        {
            return Err(mechanism_conflict(addr, self.location(addr), s.hardware));
        }
        let site = if table.sites.contains_key(&site_addr) {
            None
        } else {
            Some(self.site_text(site_addr)?)
        };
        let probe = Probe {
            maxactive,
            ..new_probe(req, addr, site_addr)
        };
        Ok((probe, site))
    }

    /// Actions are for kprobes; `override` only at a function's first
    /// byte (its int3 may sit after the ftrace nop, which changes nothing)
    /// and only one per site: two could not both decide the return value.
    fn check_action(
        &self,
        req: &ProbeRequest,
        func: Option<&(String, u64, u64)>,
    ) -> Result<(), ProbeError> {
        let Some(action) = &req.action else {
            return Ok(());
        };
        let addr = req.address;
        let refuse = |why: String| ProbeError::ActionRefused {
            addr,
            location: self.location(addr),
            why,
        };
        if req.kind != ProbeType::Kprobe {
            return Err(refuse(
                "actions belong on kprobes ('p:'); a return probe runs after the function did"
                    .into(),
            ));
        }
        if let Action::Override { .. } = action {
            match func {
                Some((_, start, _)) if *start == addr => {}
                Some((name, start, _)) => {
                    return Err(refuse(format!(
                        "override only at a function's entry; this is {name}+{:#x}",
                        addr - start
                    )))
                }
                None => {
                    return Err(refuse(
                        "override only at a function's entry, and no function of the \
                         symbol table starts here"
                            .into(),
                    ))
                }
            }
            let other =
                self.table.probes.values().find(|p| {
                    p.address == addr && matches!(p.action, Some(Action::Override { .. }))
                });
            if let Some(p) = other {
                return Err(refuse(format!(
                    "probe {} ({}) already overrides this function (one override per function)",
                    p.id, p.name
                )));
            }
        }
        Ok(())
    }

    /// Refuse `addr` unless an instruction starts there: decode from the
    /// function's `start`.
    fn check_boundary(&self, addr: u64, start: u64) -> Result<(), ProbeError> {
        if start >= addr {
            return Ok(());
        }
        let code = self.original_bytes(start, (addr - start) as usize)?;
        let mut off = 0usize;
        while (off as u64) < addr - start {
            let ip = start + off as u64;
            let d = insn_emu::prepare(&code[off..], ip).or_else(|_| {
                let tail = self.original_bytes(ip, 15)?;
                insn_emu::prepare(&tail, ip).map_err(|e| ProbeError::Undecodable {
                    addr: ip,
                    why: e.to_string(),
                })
            })?;
            if ip + d.len() as u64 > addr {
                return Err(ProbeError::NotInstructionBoundary {
                    addr,
                    location: self.location(addr),
                    insn_start: ip,
                    insn: d.disassembly().to_string(),
                });
            }
            off += d.len();
        }
        Ok(())
    }

    /// The bytes of a new site at `addr`: its address in guest memory and
    /// the instruction it displaces, byte by byte.
    pub fn site_text(&self, addr: u64) -> Result<SiteText, ProbeError> {
        let gpa = self.guest.text_gpa(addr, self.sregs)?;
        let bytes = self.original_bytes(addr, 15)?;
        let displaced = insn_emu::prepare(&bytes, addr).map_err(|e| ProbeError::Undecodable {
            addr,
            why: e.to_string(),
        })?;
        let len = displaced.len();
        let tail_gpas = self.guest.text_gpas(addr + 1, len - 1, self.sregs)?;
        let tail = tail_gpas
            .into_iter()
            .zip(bytes[1..len].iter().copied())
            .collect();
        Ok(SiteText {
            gpa,
            original: bytes[0],
            displaced,
            tail,
        })
    }

    /// Where the int3 of a probe at `addr` goes. Linux's ftrace rewrites the
    /// five bytes of every function's fentry site (`call __fentry__`, a nop
    /// once booted) when the guest's function tracer or its own ftrace-based
    /// kprobes attach, and it first checks that they hold what it expects:
    /// an int3 there is an ftrace bug (a WARN, and ftrace turns itself off).
    /// So a probe on a function's entry (or on its fentry site) is planted
    /// on the instruction after the site, as KPROBES_ON_FTRACE moves the
    /// kernel's own: the registers there are the entry's (the nop changes
    /// nothing, ftrace's call returns with them restored) and the return
    /// address is still on top of the stack.
    pub fn placement(
        &self,
        addr: u64,
        func: Option<&(String, u64, u64)>,
    ) -> Result<u64, ProbeError> {
        const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
        const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        let Some((_, start, end)) = func else {
            return Ok(addr);
        };
        let head = self.original_bytes(*start, (end - start).min(9) as usize)?;
        let skip = if head.starts_with(&ENDBR64) { 4 } else { 0 };
        let fentry = start + skip as u64;
        let site = &head[skip..];
        if (addr != *start && addr != fentry) || site.len() < 5 || fentry + 5 >= *end {
            return Ok(addr);
        }
        let ftrace = site[..5] == NOP5
            || (site[0] == 0xe8 && {
                let rel = i32::from_le_bytes([site[1], site[2], site[3], site[4]]);
                let target = (fentry + 5).wrapping_add(rel as i64 as u64);
                self.guest.is_ftrace_target(target)
            });
        Ok(if ftrace { fentry + 5 } else { addr })
    }

    /// Guest bytes of `[addr, addr+len)` with every planted int3 replaced by
    /// its original byte.
    pub fn original_bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, ProbeError> {
        let mut out = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let a = addr + done as u64;
            let gpa = self.guest.text_gpa(a, self.sregs)?;
            let n = (len - done).min((0x1000 - (a & 0xfff)) as usize);
            self.guest
                .vm
                .memory()
                .read_phys(gpa, &mut out[done..done + n])?;
            done += n;
        }
        let inside = |a: u64| a >= addr && a < addr + len as u64;
        for (a, s) in &self.table.sites {
            if inside(*a) && s.planted.load(Ordering::SeqCst) {
                out[(*a - addr) as usize] = s.original;
            }
        }
        if let Some((a, original)) = self.planted_trap.filter(|t| inside(t.0)) {
            out[(a - addr) as usize] = original;
        }
        Ok(out)
    }

    /// Why `addr` belongs to the host (an out-of-line slot or the free
    /// padding they are taken from), if it does.
    fn host_owned(&self, addr: u64) -> Option<String> {
        if let Some(sl) = self.table.slots.all().find(|sl| sl.contains(addr)) {
            return Some(format!(
                "it is inside hvprobe's out-of-line slot at {:#x}",
                sl.addr
            ));
        }
        self.guest
            .scratch_ranges()
            .iter()
            .any(|(s, e)| addr >= *s && addr < *e)
            .then(|| {
                "it is padding between functions, which hvprobe owns for out-of-line slots".into()
            })
    }
}
