//! Kernel symbols for hvprobe: names to addresses, offsets and argument
//! locations, and back. Independent of the VMM; guest memory is reached only
//! through the tiny [`GuestMemory`] trait. See README.md for the API tour.

mod blacklist;
mod dwarf;
mod elf;
mod kallsyms;
mod kaslr;
mod mem;
mod sysmap;
mod table;

pub use blacklist::{Blacklist, BlacklistEntry, BlacklistError};
pub use dwarf::{
    DebugInfo, DwarfError, FunctionInfo, LocationSource, MemberInfo, Param, ParamLocation, Register,
};
pub use elf::{ImageError, KernelImage};
pub use kallsyms::{
    decode_kallsyms, find_kallsyms, read_kallsyms, AddressEncoding, KallsymsError, KallsymsLayout,
};
pub use kaslr::{
    find_kaslr_slide, read_guest_kallsyms, slide_between, slide_from_idt, verify_slide, KaslrError,
    KaslrSlide, KASLR_ALIGN,
};
pub use mem::{GuestMemory, SliceMemory, Unmapped};
pub use sysmap::{load_system_map, parse_system_map, MapParseError};
pub use table::{
    parse_location, Location, LocationParseError, LookupError, SymOff, Symbol, SymbolTable,
    VariantMatch,
};
