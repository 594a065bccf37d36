//! The guest kernel as the service sees it: its KASLR slide (found once in
//! guest memory), its banner, symbol queries (`ResolveSymbol`) and
//! `GetGuestInfo`.

use guest_access::{GuestMemory, SystemRegs};
use introspect::paging::{Access, GuestVirt, PageFault};
use proto::v1;
use tonic::Status;

use crate::errors::{check_len, quote};
use crate::state::Inner;

/// Kernel virtual memory through one vCPU's page tables.
pub(crate) struct KernelVirt<'a> {
    pub mem: &'a dyn GuestMemory,
    pub sregs: SystemRegs,
}

impl guest_symbols::GuestMemory for KernelVirt<'_> {
    type Error = PageFault;

    fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), PageFault> {
        GuestVirt::new(self.mem, self.sregs, 0).read(addr, buf, Access::Inspect)
    }
}

/// Longest ResolveSymbol query, `[MODULE:]SYMBOL[+OFFSET]`: a module and a
/// symbol name within the kernel's `MODULE_NAME_LEN` and `KSYM_NAME_LEN`, a
/// colon and a 64-bit offset in hex with its `+0x`.
pub const MAX_LOCATION_LEN: usize =
    probe_spec::limits::MODULE_NAME_LEN - 1 + 1 + probe_spec::limits::KSYM_NAME_LEN - 1 + 19;

impl Inner {
    /// The KASLR slide, found once in guest memory: the #PF gate of a
    /// vCPU's IDT against `asm_exc_page_fault`, checked with the banner at
    /// the slid `linux_banner`. Until the kernel has an IDT the slide can
    /// only be assumed 0, which is refused where the boot may randomize
    /// (`Guest::set_kaslr_possible`).
    pub(crate) fn settle_slide(&self) -> Result<i64, Status> {
        if let Some(s) = self.symbols.slide() {
            return Ok(s);
        }
        let possible = self.guest.kaslr_possible();
        let sregs = self
            .engine
            .kernel_system_regs()
            .filter(|s| s.long_mode && s.idt_base != 0);
        let Some(sregs) = sregs else {
            if possible {
                return Err(Status::failed_precondition(
                    "the guest kernel may run at a randomized base (a bzImage booted without \
                     nokaslr) and has not set up its IDT yet, so its KASLR slide is unknown: \
                     create probes once it runs, or boot with nokaslr for probes before boot",
                ));
            }
            // Not running yet, and it cannot move: link-time addresses.
            return Ok(self.symbols.set_slide(0));
        };
        let mem = KernelVirt {
            mem: self.guest.vm.memory(),
            sregs,
        };
        match guest_symbols::slide_from_idt(
            &mem,
            sregs.idt_base,
            self.symbols.table(),
            self.symbols.image(),
        ) {
            Ok(k) => {
                let slide = self.symbols.set_slide(k.slide);
                tracing::info!("KASLR slide {slide:#x} (banner at the slid linux_banner matches)");
                // Not placed yet (a randomizable boot), or placed before
                // the slide was known: put it at the slid padding byte.
                if let Some(t) = self.symbols.return_trap_candidate() {
                    if self.engine.return_trap_address() != Some(t) {
                        self.engine.set_return_trap(t).map_err(|e| {
                            Status::failed_precondition(format!(
                                "placing the kretprobe return trap at {t:#x}: {e}"
                            ))
                        })?;
                    }
                }
                Ok(slide)
            }
            Err(e) if possible => Err(Status::failed_precondition(format!(
                "the guest kernel may run at a randomized base and its KASLR slide could \
                 not be established: {e}"
            ))),
            Err(e) => {
                tracing::debug!("no KASLR slide found ({e}); the boot cannot randomize: 0");
                Ok(self.symbols.set_slide(0))
            }
        }
    }

    pub(crate) fn resolve_symbol(
        &self,
        q: &v1::ResolveSymbolRequest,
    ) -> Result<v1::ResolveSymbolResponse, Status> {
        let address = match &q.query {
            Some(v1::resolve_symbol_request::Query::Address(a)) => *a,
            Some(v1::resolve_symbol_request::Query::Symbol(s)) => {
                check_len("symbol", s, MAX_LOCATION_LEN)?;
                let text = match s.split_once(':') {
                    Some(("vmlinux", rest)) => rest,
                    Some((m, _)) => {
                        return Err(Status::not_found(format!(
                            "symbol: module '{}' is not loaded",
                            quote(m)
                        )))
                    }
                    None => s.as_str(),
                };
                let loc = guest_symbols::parse_location(text)
                    .map_err(|e| Status::invalid_argument(format!("symbol: {e}")))?;
                self.symbols.resolve(&loc).map_err(|e| match e {
                    guest_symbols::LookupError::NotFound(_) => {
                        Status::not_found(format!("symbol: {e}"))
                    }
                    e => Status::invalid_argument(format!("symbol: {e}")),
                })?
            }
            None => {
                return Err(Status::invalid_argument(
                    "query: missing (symbol or address)",
                ))
            }
        };
        let so = self
            .symbols
            .sym_off(address)
            .ok_or_else(|| Status::not_found(format!("no symbol covers {address:#x}")))?;
        let module = so.module.clone().unwrap_or_default();
        let base = if module.is_empty() {
            String::new()
        } else {
            format!("{module}:")
        };
        Ok(v1::ResolveSymbolResponse {
            address,
            kind: self
                .symbols
                .kind_at(&so.name, address)
                .map(String::from)
                .unwrap_or_default(),
            location: format!("{base}{}+{:#x}", so.name, so.offset),
            symbol: so.name,
            offset: so.offset,
            module,
            size: so.size,
        })
    }

    /// The image's banner, and whether the guest has the same bytes at the
    /// (slid) `linux_banner`: read through a vCPU's page tables once the
    /// kernel runs, else at the unrelocated physical address.
    pub(crate) fn kernel_banner(&self) -> (String, bool) {
        let Some((addr, want)) = self.symbols.image_banner() else {
            return (String::new(), false);
        };
        let mut got = vec![0u8; want.len()];
        let read = match self.engine.kernel_system_regs() {
            Some(sregs) => {
                use guest_symbols::GuestMemory as _;
                KernelVirt {
                    mem: self.guest.vm.memory(),
                    sregs,
                }
                .read_virt(addr, &mut got)
                .is_ok()
            }
            None => {
                addr >= introspect::KERNEL_TEXT_MAP
                    && self
                        .guest
                        .vm
                        .memory()
                        .read_phys(addr - introspect::KERNEL_TEXT_MAP, &mut got)
                        .is_ok()
            }
        };
        (
            String::from_utf8_lossy(&want).trim_end().to_string(),
            read && got == want,
        )
    }

    pub(crate) fn guest_info(&self) -> v1::GetGuestInfoResponse {
        let (source, detail) = self.symbols.source();
        let vm = &self.guest.vm;
        // Best effort: an unknown slide is reported as 0, not verified.
        let slide = self.settle_slide().ok();
        let (banner, verified) = self.kernel_banner();
        v1::GetGuestInfoResponse {
            state: self.guest.state() as i32,
            vcpus: u32::try_from(vm.vcpu_count()).unwrap_or(u32::MAX),
            kernel_banner: banner,
            kaslr_slide: slide.unwrap_or(0),
            kaslr_verified: verified && slide.is_some(),
            symbol_source: source as i32,
            symbol_source_detail: detail.to_string(),
            symbol_count: self.symbols.table().len() as u64,
            memory_bytes: vm.memory().ram_end(),
            armed: self.engine.armed(),
            probe_count: u32::try_from(self.engine.list().len()).unwrap_or(u32::MAX),
            syscall_bridge: self.guest.bridge_info(),
            frozen: self
                .engine
                .frozen_by()
                .as_ref()
                .map(crate::actions::freeze_info),
        }
    }
}
