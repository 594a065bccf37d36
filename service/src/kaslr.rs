//! Guest kernel memory as guest-symbols reads it to find the KASLR slide.

use guest_access::{GuestMemory, SystemRegs};
use introspect::paging::{Access, GuestVirt, PageFault};

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
