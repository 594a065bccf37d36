//! The guest's symbols as the service uses them: name ↔ address, function
//! bounds and the kprobe blacklist for the engine, and DWARF parameter and
//! member lookups for named fetch arguments.

use std::path::Path;

use guest_symbols::{
    Blacklist, DwarfError, GuestMemory as _, KernelImage, LookupError, SymOff, SymbolTable,
};
use probe_spec::{MemberInfo, ParamInfo, TypeInfo, TypeKind};
use proto::v1::SymbolSource;

/// Why symbols could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("cannot read kernel image {path}: {cause}")]
    Image { path: String, cause: String },
    #[error("cannot read System.map {path}: {cause}")]
    SystemMap { path: String, cause: String },
}

/// Symbols of one guest kernel.
pub struct Symbols {
    /// Table and blacklist; also what the engine sees (introspect::KernelSymbols).
    index: introspect::SymbolIndex,
    image: Option<KernelImage>,
    dwarf: Option<guest_symbols::DebugInfo>,
    /// Where the current task and its name are (needs DWARF).
    task: Option<introspect::TaskLayout>,
    source: SymbolSource,
    detail: String,
    /// The KASLR slide (runtime = link-time + slide), once established:
    /// every address in or out of this type goes through it.
    slide: std::sync::OnceLock<i64>,
}

impl Symbols {
    /// No symbols: only absolute addresses can be probed.
    pub fn none() -> Self {
        Symbols {
            index: introspect::SymbolIndex::new(SymbolTable::default(), None),
            image: None,
            dwarf: None,
            task: None,
            source: SymbolSource::None,
            detail: String::new(),
            slide: std::sync::OnceLock::new(),
        }
    }

    /// ELF symbols, the kprobe blacklist and (when present) DWARF of a vmlinux.
    pub fn from_vmlinux(path: &Path) -> Result<Self, SymbolError> {
        let err = |cause: String| SymbolError::Image {
            path: path.display().to_string(),
            cause,
        };
        let image = KernelImage::open(path).map_err(|e| err(e.to_string()))?;
        let table = image.symbols().map_err(|e| err(e.to_string()))?;
        // Kernels without a _kprobe_blacklist section (like the test guest)
        // still get the text ranges Linux refuses.
        let blacklist = Some(
            Blacklist::from_image(&image, &table)
                .unwrap_or_else(|_| Blacklist::from_entries(&table, &[]))
                .with_patched_sites(&image, &table),
        );
        // A second mapping for DWARF: DebugInfo takes ownership of its image.
        let dwarf = KernelImage::open(path)
            .ok()
            .and_then(|i| guest_symbols::DebugInfo::from_image(i).ok());
        let source = if dwarf.is_some() {
            SymbolSource::VmlinuxDwarf
        } else {
            SymbolSource::Vmlinux
        };
        let task = dwarf.as_ref().and_then(|d| task_layout(&table, d));
        Ok(Symbols {
            index: introspect::SymbolIndex::new(table, blacklist),
            image: Some(image),
            dwarf,
            task,
            source,
            detail: path.display().to_string(),
            slide: std::sync::OnceLock::new(),
        })
    }

    /// Symbols from a System.map (no sizes, no DWARF, no blacklist section).
    pub fn from_system_map(path: &Path) -> Result<Self, SymbolError> {
        let table = guest_symbols::load_system_map(path).map_err(|e| SymbolError::SystemMap {
            path: path.display().to_string(),
            cause: e.to_string(),
        })?;
        let blacklist = Some(Blacklist::from_entries(&table, &[]));
        Ok(Symbols {
            index: introspect::SymbolIndex::new(table, blacklist),
            image: None,
            dwarf: None,
            task: None,
            source: SymbolSource::SystemMap,
            detail: path.display().to_string(),
            slide: std::sync::OnceLock::new(),
        })
    }

    /// The link-time table (addresses not slid).
    pub fn table(&self) -> &SymbolTable {
        &self.index.table
    }

    /// The kernel image the symbols came from, if any.
    pub fn image(&self) -> Option<&KernelImage> {
        self.image.as_ref()
    }

    /// The KASLR slide, once established (see [`Symbols::set_slide`]).
    pub fn slide(&self) -> Option<i64> {
        self.slide.get().copied()
    }

    /// Establish the slide (once: a running kernel does not move). Returns
    /// the slide in force, which differs from `slide` if one was set before.
    pub fn set_slide(&self, slide: i64) -> i64 {
        *self.slide.get_or_init(|| slide)
    }

    fn to_runtime(&self, link: u64) -> u64 {
        link.wrapping_add_signed(self.slide().unwrap_or(0))
    }

    fn to_link(&self, runtime: u64) -> u64 {
        runtime.wrapping_add_signed(self.slide().unwrap_or(0).wrapping_neg())
    }

    pub fn source(&self) -> (SymbolSource, &str) {
        (self.source, &self.detail)
    }

    pub fn has_dwarf(&self) -> bool {
        self.dwarf.is_some()
    }

    /// The C return type of function `name` from DWARF: `Ok(None)` for
    /// `void`; None without DWARF.
    pub fn return_type(&self, name: &str) -> Option<Result<Option<String>, String>> {
        let dwarf = self.dwarf.as_ref()?;
        Some(
            dwarf
                .function_params(name)
                .map(|f| f.return_type.map(|(t, _)| t))
                .map_err(|e| e.to_string()),
        )
    }

    /// Runtime address of `name`.
    pub fn lookup(&self, name: &str) -> Result<u64, LookupError> {
        self.index.table.lookup(name).map(|a| self.to_runtime(a))
    }

    /// Runtime address of a `SYM+off` or absolute location.
    pub fn resolve(&self, loc: &guest_symbols::Location) -> Result<u64, LookupError> {
        match loc {
            guest_symbols::Location::Address(a) => Ok(*a),
            guest_symbols::Location::Symbol { name, offset } => {
                Ok(self.lookup(name)?.wrapping_add(*offset))
            }
        }
    }

    /// `SYM+off/size` of the runtime address `addr`.
    pub fn sym_off(&self, addr: u64) -> Option<SymOff> {
        self.index.table.describe(self.to_link(addr))
    }

    /// Symbol type letter of the symbol `describe` picked for `addr`.
    pub fn kind_at(&self, name: &str, addr: u64) -> Option<char> {
        let addr = self.to_link(addr);
        self.index
            .table
            .all_named(name)
            .find(|s| s.addr <= addr)
            .map(|s| s.kind)
    }

    /// A kernel-text byte the guest never executes, for the kretprobe return
    /// trap (see [`introspect::SymbolIndex::return_trap_candidate`]).
    pub fn return_trap_candidate(&self) -> Option<u64> {
        self.index
            .return_trap_candidate()
            .map(|a| self.to_runtime(a))
    }

    /// `linux_banner`'s runtime address and its bytes in the kernel image
    /// (NUL excluded).
    pub fn image_banner(&self) -> Option<(u64, Vec<u8>)> {
        let addr = self.index.table.lookup("linux_banner").ok()?;
        let image = self.image.as_ref()?;
        let mut buf = vec![0u8; 256];
        // The banner may end near a segment end: shrink until it reads.
        let mut len = buf.len();
        while len > 0 && image.read_virt(addr, &mut buf[..len]).is_err() {
            len /= 2;
        }
        buf.truncate(len);
        let end = buf.iter().position(|&b| b == 0)?;
        buf.truncate(end);
        Some((self.to_runtime(addr), buf))
    }

    /// The DWARF view for probe-spec's name resolution, if DWARF is loaded.
    pub fn debug_info(&self) -> Option<DwarfNames<'_>> {
        self.dwarf.as_ref().map(DwarfNames)
    }
}

impl Symbols {
    /// Where the guest keeps its modules (`modules`, `struct module`'s
    /// `core_layout` as in Linux 6.1, `struct mod_kallsyms`) and the two
    /// functions hvprobe watches for loads and unloads, at runtime
    /// addresses; the reason when the DWARF or a symbol is missing.
    pub fn module_layout(&self) -> Result<introspect::modules::ModuleLayout, String> {
        let dwarf = self
            .dwarf
            .as_ref()
            .ok_or("they need the kernel's DWARF (load a vmlinux with debug info)")?;
        let off = |path: &str| {
            dwarf
                .member_offset(path)
                .map_err(|e| format!("no {path} in the kernel's DWARF: {e}"))
        };
        let sym = |name: &str| {
            self.lookup(name)
                .map_err(|e| format!("no symbol {name} in the kernel: {e}"))
        };
        Ok(introspect::modules::ModuleLayout {
            modules: sym("modules")?,
            list_offset: off("module.list")?,
            name_offset: off("module.name")?,
            state_offset: off("module.state")?,
            core_base_offset: off("module.core_layout.base")?,
            core_text_size_offset: off("module.core_layout.text_size")?,
            kallsyms_offset: off("module.kallsyms")?,
            symtab_offset: off("mod_kallsyms.symtab")?,
            num_symtab_offset: off("mod_kallsyms.num_symtab")?,
            strtab_offset: off("mod_kallsyms.strtab")?,
            load_hook: sym("do_init_module")?,
            free_hook: sym("free_module")?,
        })
    }
}

/// The engine sees runtime addresses: each goes back to link time for the
/// table and blacklist, and what comes out is slid again.
impl introspect::KernelSymbols for Symbols {
    fn function_at(&self, addr: u64) -> Option<(String, u64, u64)> {
        self.index
            .function_at(self.to_link(addr))
            .map(|(n, s, e)| (n, self.to_runtime(s), self.to_runtime(e)))
    }

    fn blacklisted(&self, addr: u64) -> Option<String> {
        self.index.blacklisted(self.to_link(addr))
    }

    fn describe(&self, addr: u64) -> Option<String> {
        self.index.describe(self.to_link(addr))
    }

    fn scratch_ranges(&self) -> Vec<(u64, u64)> {
        self.index
            .scratch_ranges()
            .into_iter()
            .map(|(s, e)| (self.to_runtime(s), self.to_runtime(e)))
            .collect()
    }

    fn is_kernel_text(&self, addr: u64) -> Option<bool> {
        self.index.is_kernel_text(self.to_link(addr))
    }

    fn init_text(&self) -> Option<introspect::InitText> {
        self.index.init_text().map(|i| introspect::InitText {
            start: self.to_runtime(i.start),
            end: self.to_runtime(i.end),
            system_state: self.to_runtime(i.system_state),
        })
    }

    /// Per-CPU offsets are not slid; `init_task` is.
    fn task_layout(&self) -> Option<introspect::TaskLayout> {
        self.task.map(|mut t| {
            if let Some(p) = t.process.as_mut() {
                p.init_task = self.to_runtime(p.init_task);
            }
            t
        })
    }
}

/// Linux's current-task pointer and `task_struct`'s identity fields: the
/// per-CPU `current_task` (up to 6.1) or `pcpu_hot.current_task` (6.2+);
/// plus, when the DWARF has them all, what the task list and executable
/// paths need.
fn task_layout(
    table: &SymbolTable,
    dwarf: &guest_symbols::DebugInfo,
) -> Option<introspect::TaskLayout> {
    let off = |path: &str| dwarf.member_offset(path).ok();
    let current_task_percpu = match table.lookup("current_task") {
        Ok(a) => a,
        Err(_) => table.lookup("pcpu_hot").ok()? + off("pcpu_hot.current_task")?,
    };
    Some(introspect::TaskLayout {
        current_task_percpu,
        comm_offset: off("task_struct.comm")?,
        pid_offset: off("task_struct.pid")?,
        tgid_offset: off("task_struct.tgid")?,
        real_parent_offset: off("task_struct.real_parent")?,
        process: process_layout(table, dwarf),
    })
}

fn process_layout(
    table: &SymbolTable,
    dwarf: &guest_symbols::DebugInfo,
) -> Option<introspect::ProcessLayout> {
    let off = |path: &str| dwarf.member_offset(path).ok();
    Some(introspect::ProcessLayout {
        init_task: table.lookup("init_task").ok()?,
        tasks_offset: off("task_struct.tasks")?,
        mm_offset: off("task_struct.mm")?,
        flags_offset: off("task_struct.flags")?,
        // Renamed in 5.14.
        state_offset: off("task_struct.__state").or_else(|| off("task_struct.state"))?,
        exit_state_offset: off("task_struct.exit_state")?,
        exe_file_offset: off("mm_struct.exe_file")?,
        f_path_mnt_offset: off("file.f_path.mnt")?,
        f_path_dentry_offset: off("file.f_path.dentry")?,
        d_parent_offset: off("dentry.d_parent")?,
        d_name_hash_len_offset: off("dentry.d_name.hash_len")?,
        d_name_name_offset: off("dentry.d_name.name")?,
        mnt_root_offset: off("vfsmount.mnt_root")?,
        mount_mnt_offset: off("mount.mnt")?,
        mount_parent_offset: off("mount.mnt_parent")?,
        mount_mountpoint_offset: off("mount.mnt_mountpoint")?,
    })
}

/// guest-symbols' DWARF seen through probe-spec's [`probe_spec::DebugInfo`].
/// guest-symbols reports types by their C spelling, so the shape probe-spec
/// needs (pointer, struct, char, integer) is read back from that spelling.
pub struct DwarfNames<'a>(&'a guest_symbols::DebugInfo);

impl DwarfNames<'_> {
    fn type_info(&self, name: &str, size: Option<u64>) -> TypeInfo {
        let clean = strip_qualifiers(name);
        let kind = if let Some(inner) = clean.strip_suffix('*') {
            let inner = inner.trim_end();
            let pointee = (inner != "void").then(|| Box::new(self.type_info(inner, None)));
            TypeKind::Pointer { pointee }
        } else if let Some(open) = clean.find('[') {
            let elem = clean[..open].trim_end();
            TypeKind::Array {
                elem: Box::new(self.type_info(elem, None)),
            }
        } else if matches!(clean, "char" | "signed char" | "unsigned char") {
            TypeKind::Char
        } else if clean.starts_with("struct ") || clean.starts_with("union ") {
            TypeKind::Struct
        } else if clean.starts_with("enum ") || clean == "_Bool" || clean == "bool" {
            TypeKind::Int { signed: false }
        } else if let Some(signed) = int_signedness(clean) {
            TypeKind::Int { signed }
        } else if self.is_aggregate(clean) {
            TypeKind::Struct
        } else {
            TypeKind::Other
        };
        let size = size.unwrap_or(match &kind {
            TypeKind::Pointer { .. } => 8,
            TypeKind::Char => 1,
            _ => 0,
        });
        TypeInfo {
            id: 0,
            name: name.to_string(),
            size,
            kind,
        }
    }

    /// A typedef name that stands for a struct or union.
    fn is_aggregate(&self, name: &str) -> bool {
        // Asking for a member that cannot exist tells aggregates (member not
        // found) from everything else (not an aggregate, unknown type).
        matches!(
            self.0.member(&format!("{name}.\u{1}")),
            Err(DwarfError::MemberNotFound { .. })
        )
    }

    fn param_info(&self, func: &str, pick: impl Fn(usize, &str) -> bool) -> Option<ParamInfo> {
        let f = self.0.function_params(func).ok()?;
        let (index, p) = f
            .params
            .iter()
            .enumerate()
            .find(|(i, p)| pick(*i, &p.name))?;
        Some(ParamInfo {
            index: u32::try_from(index).ok()?,
            ty: self.type_info(&p.type_name, p.size),
        })
    }
}

impl probe_spec::DebugInfo for DwarfNames<'_> {
    fn param(&self, func: &str, name: &str) -> Option<ParamInfo> {
        self.param_info(func, |_, n| n == name)
    }

    fn param_at(&self, func: &str, index: u32) -> Option<ParamInfo> {
        self.param_info(func, |i, _| i as u64 == u64::from(index))
    }

    fn return_type(&self, func: &str) -> Option<TypeInfo> {
        let (name, size) = self.0.function_params(func).ok()?.return_type?;
        Some(self.type_info(&name, size))
    }

    fn member(&self, ty: &TypeInfo, name: &str) -> Option<MemberInfo> {
        let root = strip_qualifiers(&ty.name);
        let m = self.0.member(&format!("{root}.{name}")).ok()?;
        Some(MemberInfo {
            offset: m.offset,
            ty: self.type_info(&m.type_name, m.size),
            bitfield: m
                .bitfield
                .and_then(|(off, width)| Some((u32::from(off), u32::try_from(width).ok()?))),
        })
    }
}

fn strip_qualifiers(name: &str) -> &str {
    let mut s = name.trim();
    loop {
        match s
            .strip_prefix("const ")
            .or_else(|| s.strip_prefix("volatile "))
        {
            Some(r) => s = r.trim_start(),
            None => return s,
        }
    }
}

/// Signedness of C integer spellings and the kernel's integer typedefs.
fn int_signedness(name: &str) -> Option<bool> {
    const UNSIGNED: &[&str] = &[
        "u8",
        "u16",
        "u32",
        "u64",
        "__u8",
        "__u16",
        "__u32",
        "__u64",
        "size_t",
        "uintptr_t",
        "uint8_t",
        "uint16_t",
        "uint32_t",
        "uint64_t",
        "umode_t",
        "gfp_t",
        "dev_t",
        "fmode_t",
    ];
    const SIGNED: &[&str] = &[
        "s8", "s16", "s32", "s64", "__s8", "__s16", "__s32", "__s64", "ssize_t", "loff_t", "pid_t",
        "int8_t", "int16_t", "int32_t", "int64_t",
    ];
    if name.starts_with("unsigned ") || UNSIGNED.contains(&name) {
        return Some(false);
    }
    if SIGNED.contains(&name) {
        return Some(true);
    }
    let words: Vec<&str> = name.split_whitespace().collect();
    let c_int = !words.is_empty()
        && words
            .iter()
            .all(|w| matches!(*w, "signed" | "int" | "long" | "short"));
    c_int.then_some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::KernelSymbols;

    fn guest() -> Symbols {
        Symbols::from_vmlinux(test_guest::kernel_path()).expect("test guest symbols")
    }

    #[test]
    fn test_guest_symbols_bounds_and_trap() {
        let s = guest();
        assert_eq!(s.source().0, SymbolSource::VmlinuxDwarf);
        let fib = s.lookup("hv_fib").unwrap();
        let (name, start, end) = s.function_at(fib + 4).unwrap();
        assert_eq!((name.as_str(), start), ("hv_fib", fib));
        assert!(end > start);
        let trap = s.return_trap_candidate().expect("padding after a function");
        assert!(
            s.function_at(trap).is_none(),
            "trap {trap:#x} inside a function"
        );
        let (_, banner) = s.image_banner().expect("banner");
        assert!(banner.starts_with(b"Linux version"));
    }

    #[test]
    fn dwarf_types_have_the_shapes_probe_spec_needs() {
        let s = guest();
        let d = s.debug_info().expect("test guest has DWARF");
        use probe_spec::DebugInfo as _;
        let path = d.param("hv_open_file", "path").expect("path param");
        assert_eq!(path.index, 1);
        let TypeKind::Pointer { pointee: Some(p) } = &path.ty.kind else {
            panic!("{:?}", path.ty)
        };
        assert_eq!(p.kind, TypeKind::Char);
        let w = d.param("hv_work_item", "w").expect("w param");
        let TypeKind::Pointer { pointee: Some(st) } = &w.ty.kind else {
            panic!("{:?}", w.ty)
        };
        assert_eq!(st.kind, TypeKind::Struct);
        let name = d.member(st, "name").expect("name member");
        assert_eq!(name.offset, 8);
        assert!(matches!(name.ty.kind, TypeKind::Array { .. }));
        let id = d.member(st, "id").expect("id member");
        assert_eq!(id.ty.kind, TypeKind::Int { signed: false });
        assert_eq!(id.ty.size, 4);
        assert!(d.member(st, "nope").is_none());
        assert!(d.param("hv_open_file", "nope").is_none());
        let fib = d.return_type("hv_fib").expect("long");
        assert_eq!((fib.kind, fib.size), (TypeKind::Int { signed: true }, 8));
        let open = d.return_type("hv_open_file").expect("int");
        assert_eq!((open.kind, open.size), (TypeKind::Int { signed: true }, 4));
        let memset = d.return_type("memset").expect("void *");
        assert!(matches!(memset.kind, TypeKind::Pointer { .. }));
    }

    #[test]
    fn integer_spellings() {
        assert_eq!(int_signedness("unsigned int"), Some(false));
        assert_eq!(int_signedness("long int"), Some(true));
        assert_eq!(int_signedness("u32"), Some(false));
        assert_eq!(int_signedness("struct x"), None);
        assert_eq!(strip_qualifiers("const volatile char"), "char");
    }
}
