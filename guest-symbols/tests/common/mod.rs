//! Helpers shared by guest-symbols' integration tests.

use guest_symbols::{GuestMemory, KernelImage, Unmapped};

/// The image as a guest would see it after KASLR moved it by `.1` bytes.
pub struct Slid<'a>(pub &'a KernelImage, pub u64);

impl GuestMemory for Slid<'_> {
    type Error = Unmapped;
    fn read_virt(&self, addr: u64, buf: &mut [u8]) -> Result<(), Unmapped> {
        self.0.read_virt(addr.wrapping_sub(self.1), buf)
    }
}
