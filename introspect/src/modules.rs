//! Linux's loaded modules read from guest memory, with no host-side `.ko`:
//! the `modules` list, each `struct module`'s name, state and core text,
//! and its own kallsyms (`mod->kallsyms`: an `Elf64_Sym` table and its
//! string table), the way `/proc/kallsyms` prints module symbols. Offsets
//! come from the kernel's DWARF ([`ModuleLayout`]).
//!
//! Everything reads through a [`crate::task::Read`] callback, so tests run
//! it on a fake RAM.

use crate::task::{u32_at, u64_at, Read};

/// Where the kernel keeps its modules: the list head and the members of
/// `struct module` and `struct mod_kallsyms` hvprobe reads (Linux 6.1's
/// `core_layout`), plus the two kernel functions hvprobe watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleLayout {
    /// Runtime address of the kernel's `modules` list head.
    pub modules: u64,
    /// `module.list`, `module.name` (56 bytes), `module.state`.
    pub list_offset: u64,
    pub name_offset: u64,
    pub state_offset: u64,
    /// `module.core_layout.base` (a pointer) and `.text_size` (an `unsigned int`).
    pub core_base_offset: u64,
    pub core_text_size_offset: u64,
    /// `module.kallsyms` (a `struct mod_kallsyms *`).
    pub kallsyms_offset: u64,
    /// `mod_kallsyms.symtab`, `.num_symtab`, `.strtab`.
    pub symtab_offset: u64,
    pub num_symtab_offset: u64,
    pub strtab_offset: u64,
    /// Runtime address of `do_init_module(struct module *)`: called once the
    /// module's text is final (relocated, alternatives, ftrace and jump
    /// labels applied by the COMING notifiers) and before its init runs.
    pub load_hook: u64,
    /// Runtime address of `free_module(struct module *)`: entered with the
    /// module's text still mapped, before any of it is freed.
    pub free_hook: u64,
}

/// `MODULE_NAME_LEN` on 64-bit.
pub const MODULE_NAME_LEN: usize = 56;
/// More modules than any kernel loads: a corrupt or looping list stops here.
const MAX_MODULES: usize = 4096;
/// More symbols than any module has.
const MAX_SYMBOLS: u32 = 1 << 18;
/// Longest symbol name read (KSYM_NAME_LEN).
const MAX_SYMBOL_NAME: usize = 512;
/// `sizeof(Elf64_Sym)`.
const ELF64_SYM: u64 = 24;

/// Linux's `enum module_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    Live,
    Coming,
    Going,
    Unformed,
    Other(u32),
}

impl From<u32> for ModuleState {
    fn from(v: u32) -> Self {
        match v {
            0 => ModuleState::Live,
            1 => ModuleState::Coming,
            2 => ModuleState::Going,
            3 => ModuleState::Unformed,
            o => ModuleState::Other(o),
        }
    }
}

/// A module as read from guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedModule {
    /// Guest address of its `struct module`.
    pub address: u64,
    pub name: String,
    pub state: ModuleState,
    /// Its core text, `[start, end)` (never freed while it is loaded).
    pub text: (u64, u64),
}

impl LoadedModule {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.text.0 && addr < self.text.1
    }
}

/// A function of a module: `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSymbol {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// Why the module list could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleListError {
    #[error("cannot read the module list at {0:#x}")]
    Unreadable(u64),
    #[error("the module list does not end after {MAX_MODULES} entries (corrupt or looping)")]
    TooLong,
}

/// The `struct module` at `address`; None when it does not read.
pub fn read_module(read: &Read<'_>, l: &ModuleLayout, address: u64) -> Option<LoadedModule> {
    let mut name = [0u8; MODULE_NAME_LEN];
    read(address.wrapping_add(l.name_offset), &mut name)?;
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let state = u32_at(read, address.wrapping_add(l.state_offset))?.into();
    let base = u64_at(read, address.wrapping_add(l.core_base_offset))?;
    let size = u32_at(read, address.wrapping_add(l.core_text_size_offset))?;
    Some(LoadedModule {
        address,
        name: String::from_utf8_lossy(&name[..len]).into_owned(),
        state,
        text: (base, base.wrapping_add(u64::from(size))),
    })
}

/// Every module on the kernel's `modules` list, in list order.
pub fn list(read: &Read<'_>, l: &ModuleLayout) -> Result<Vec<LoadedModule>, ModuleListError> {
    let head = l.modules;
    let mut out = Vec::new();
    let mut next = u64_at(read, head).ok_or(ModuleListError::Unreadable(head))?;
    while next != head {
        if out.len() >= MAX_MODULES {
            return Err(ModuleListError::TooLong);
        }
        let address = next.wrapping_sub(l.list_offset);
        let m = read_module(read, l, address).ok_or(ModuleListError::Unreadable(address))?;
        out.push(m);
        next = u64_at(read, next).ok_or(ModuleListError::Unreadable(next))?;
    }
    Ok(out)
}

/// The module's functions in its core text, from its own kallsyms (sorted
/// by address). A symbol's end is its ELF size, or the next symbol's start.
pub fn symbols(read: &Read<'_>, l: &ModuleLayout, m: &LoadedModule) -> Option<Vec<ModuleSymbol>> {
    let ks = u64_at(read, m.address.wrapping_add(l.kallsyms_offset))?;
    let symtab = u64_at(read, ks.wrapping_add(l.symtab_offset))?;
    let num = u32_at(read, ks.wrapping_add(l.num_symtab_offset))?.min(MAX_SYMBOLS);
    let strtab = u64_at(read, ks.wrapping_add(l.strtab_offset))?;
    let mut raw = vec![0u8; (u64::from(num) * ELF64_SYM) as usize];
    read(symtab, &mut raw)?;
    let mut out = Vec::new();
    for sym in raw.chunks_exact(ELF64_SYM as usize) {
        let name_off = u32::from_le_bytes(sym[0..4].try_into().unwrap());
        let value = u64::from_le_bytes(sym[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(sym[16..24].try_into().unwrap());
        if name_off == 0 || !m.contains(value) {
            continue;
        }
        let Some(name) = c_string(read, strtab.wrapping_add(u64::from(name_off))) else {
            continue;
        };
        out.push(ModuleSymbol {
            name,
            start: value,
            end: value.saturating_add(size),
        });
    }
    out.sort_by_key(|s| s.start);
    out.dedup_by(|b, a| a.start == b.start && a.name == b.name);
    for i in 0..out.len() {
        let next = out
            .get(i + 1)
            .map_or(m.text.1, |n| n.start)
            .max(out[i].start);
        if out[i].end <= out[i].start || out[i].end > m.text.1 {
            out[i].end = next;
        }
    }
    Some(out)
}

/// A NUL-terminated name, read in small pieces (it may end near a page end).
fn c_string(read: &Read<'_>, addr: u64) -> Option<String> {
    let mut name = Vec::new();
    let mut chunk = [0u8; 32];
    while name.len() < MAX_SYMBOL_NAME {
        let at = addr.wrapping_add(name.len() as u64);
        // Never read across a page: the next one may not be mapped.
        let n = chunk.len().min((0x1000 - (at & 0xfff)) as usize);
        read(at, &mut chunk[..n])?;
        if let Some(end) = chunk[..n].iter().position(|b| *b == 0) {
            name.extend_from_slice(&chunk[..end]);
            return Some(String::from_utf8_lossy(&name).into_owned());
        }
        name.extend_from_slice(&chunk[..n]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Byte-addressed fake kernel memory.
    #[derive(Default)]
    pub struct Ram(pub Mutex<BTreeMap<u64, u8>>);

    impl Ram {
        pub fn put(&self, addr: u64, bytes: &[u8]) {
            let mut m = self.0.lock().unwrap();
            for (i, b) in bytes.iter().enumerate() {
                m.insert(addr + i as u64, *b);
            }
        }
        /// Reads below 1 MiB (zero where nothing was put); nothing above.
        pub fn read(&self, addr: u64, buf: &mut [u8]) -> Option<()> {
            let m = self.0.lock().unwrap();
            for (i, b) in buf.iter_mut().enumerate() {
                let a = addr.checked_add(i as u64).filter(|a| *a < 0x10_0000)?;
                *b = m.get(&a).copied().unwrap_or(0);
            }
            Some(())
        }
    }

    pub fn layout() -> ModuleLayout {
        ModuleLayout {
            modules: 0x1000,
            list_offset: 8,
            name_offset: 24,
            state_offset: 0,
            core_base_offset: 320,
            core_text_size_offset: 332,
            kallsyms_offset: 544,
            symtab_offset: 0,
            num_symtab_offset: 8,
            strtab_offset: 16,
            load_hook: 0,
            free_hook: 0,
        }
    }

    /// A `struct module` at `at` named `name`, text `[base, base+size)`,
    /// with functions `(name, offset, size)`; its kallsyms after it.
    pub fn put_module(
        ram: &Ram,
        at: u64,
        name: &str,
        base: u64,
        size: u32,
        funcs: &[(&str, u64, u64)],
    ) {
        let l = layout();
        ram.put(at, &[0u8; 600]);
        ram.put(at + l.name_offset, name.as_bytes());
        ram.put(at + l.core_base_offset, &base.to_le_bytes());
        ram.put(at + l.core_text_size_offset, &size.to_le_bytes());
        let ks = at + 0x400;
        let symtab = at + 0x800;
        let strtab = at + 0x1000;
        ram.put(at + l.kallsyms_offset, &ks.to_le_bytes());
        ram.put(ks, &symtab.to_le_bytes());
        ram.put(ks + 8, &(funcs.len() as u32 + 1).to_le_bytes());
        ram.put(ks + 16, &strtab.to_le_bytes());
        ram.put(symtab, &[0u8; 24]);
        let mut str_off = 1u32;
        ram.put(strtab, &[0]);
        for (i, (n, off, sz)) in funcs.iter().enumerate() {
            let s = symtab + 24 * (i as u64 + 1);
            let mut e = [0u8; 24];
            e[0..4].copy_from_slice(&str_off.to_le_bytes());
            e[4] = 0x02;
            e[8..16].copy_from_slice(&(base + off).to_le_bytes());
            e[16..24].copy_from_slice(&sz.to_le_bytes());
            ram.put(s, &e);
            ram.put(strtab + u64::from(str_off), n.as_bytes());
            ram.put(strtab + u64::from(str_off) + n.len() as u64, &[0]);
            str_off += n.len() as u32 + 1;
        }
    }

    /// Link modules at `ats` into the list at the layout's head.
    pub fn link(ram: &Ram, ats: &[u64]) {
        let l = layout();
        let nodes: Vec<u64> = ats.iter().map(|a| a + l.list_offset).collect();
        let mut all = vec![l.modules];
        all.extend(&nodes);
        for i in 0..all.len() {
            let next = all[(i + 1) % all.len()];
            ram.put(all[i], &next.to_le_bytes());
        }
    }

    #[test]
    fn walks_the_list_and_reads_kallsyms() {
        let ram = Ram::default();
        put_module(
            &ram,
            0x10000,
            "binfmt_misc",
            0xa000,
            0x300,
            &[("b", 0x100, 0), ("a", 0, 0x40)],
        );
        put_module(&ram, 0x20000, "ext4", 0xc000, 0x100, &[("x", 0x10, 8)]);
        link(&ram, &[0x10000, 0x20000]);
        let read = |a: u64, b: &mut [u8]| ram.read(a, b);
        let l = layout();
        let mods = list(&read, &l).unwrap();
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].name, "binfmt_misc");
        assert_eq!(mods[0].text, (0xa000, 0xa300));
        assert_eq!(mods[0].state, ModuleState::Live);
        let syms = symbols(&read, &l, &mods[0]).unwrap();
        assert_eq!(
            syms,
            vec![
                ModuleSymbol {
                    name: "a".into(),
                    start: 0xa000,
                    end: 0xa040
                },
                // No size: up to the end of the text.
                ModuleSymbol {
                    name: "b".into(),
                    start: 0xa100,
                    end: 0xa300
                },
            ]
        );
    }

    #[test]
    fn a_looping_or_unreadable_list_is_an_error_not_a_hang() {
        let ram = Ram::default();
        let l = layout();
        put_module(&ram, 0x10000, "m", 0xa000, 0x10, &[]);
        // The module points at itself, never back to the head.
        ram.put(l.modules, &(0x10000 + l.list_offset).to_le_bytes());
        ram.put(
            0x10000 + l.list_offset,
            &(0x10000 + l.list_offset).to_le_bytes(),
        );
        let read = |a: u64, b: &mut [u8]| ram.read(a, b);
        assert_eq!(list(&read, &l), Err(ModuleListError::TooLong));
        ram.put(0x10000 + l.list_offset, &0xdead_0000u64.to_le_bytes());
        assert!(matches!(
            list(&read, &l),
            Err(ModuleListError::Unreadable(_))
        ));
    }
}
