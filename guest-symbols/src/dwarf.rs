//! Lazy DWARF queries on a kernel image: function parameters with their
//! locations at entry, and struct/union member offsets.
//!
//! Nothing is parsed up front. A function is found through its symbol
//! address and `.debug_aranges` (one CU parsed); a type by walking only the
//! top-level DIEs of CUs in order until it appears (types such as
//! `task_struct` are defined in the first few CUs), remembering every type
//! seen so later queries resume where the last one stopped.

use crate::elf::{ImageError, KernelImage};
use gimli::{AttributeValue, DebugInfoOffset, EndianSlice, LittleEndian, UnitOffset};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Mutex;

type R<'a> = EndianSlice<'a, LittleEndian>;
type Unit<'a> = gimli::Unit<R<'a>>;

/// A DWARF query that failed.
#[derive(Debug, thiserror::Error)]
pub enum DwarfError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image has no DWARF (.debug_info missing); use the -dbg vmlinux")]
    NoDebugInfo,
    #[error("function `{0}` not in the symbol table")]
    FunctionNotFound(String),
    #[error("no DWARF subprogram at {addr:#x} ({name})")]
    NoSubprogram { name: String, addr: u64 },
    #[error("type `{0}` not found in DWARF")]
    TypeNotFound(String),
    #[error("`{ty}` has no member `{member}`")]
    MemberNotFound { ty: String, member: String },
    #[error("`{path}`: `{ty}` is not a struct or union")]
    NotAggregate { path: String, ty: String },
    #[error("bad member path `{0}` (expected `type.member[.member...]`)")]
    BadPath(String),
    #[error("malformed DWARF: cycle or absurd nesting while {0}")]
    TooDeep(&'static str),
    #[error("malformed DWARF while {context}: {source}")]
    Malformed {
        context: &'static str,
        source: gimli::Error,
    },
}

trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, DwarfError>;
}
impl<T> Ctx<T> for gimli::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T, DwarfError> {
        self.map_err(|source| DwarfError::Malformed { context, source })
    }
}

fn malformed(context: &'static str) -> DwarfError {
    DwarfError::TooDeep(context)
}

/// An x86-64 general-purpose register by DWARF number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Register(pub u16);

impl Register {
    /// The name `kprobe_events` uses (`di`, `si`, `dx`, ..., `r8`).
    pub fn kprobe_name(self) -> &'static str {
        const NAMES: [&str; 17] = [
            "ax", "dx", "cx", "bx", "si", "di", "bp", "sp", "r8", "r9", "r10", "r11", "r12", "r13",
            "r14", "r15", "ip",
        ];
        NAMES.get(usize::from(self.0)).copied().unwrap_or("?")
    }
}

/// Where a parameter's value is when the function's first instruction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamLocation {
    Register(Register),
    /// In memory at `offset(%sp)` (the return address is at `0(%sp)`).
    Stack(i64),
    /// Passed in several registers (a small struct), in order.
    RegisterPair(Register, Register),
    Unknown,
}

/// Where a [`ParamLocation`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocationSource {
    /// DWARF location (list) entry covering the function's entry address.
    Dwarf,
    /// Derived from the SysV x86-64 calling convention and the types.
    Abi,
}

/// One formal parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub type_name: String,
    pub size: Option<u64>,
    pub location: ParamLocation,
    pub source: LocationSource,
}

/// A function's entry address and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    pub name: String,
    pub entry: u64,
    pub params: Vec<Param>,
    /// C type name and size of the return value; None for `void`.
    pub return_type: Option<(String, Option<u64>)>,
}

/// A resolved struct/union member path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Byte offset from the start of the outermost type.
    pub offset: u64,
    pub size: Option<u64>,
    pub type_name: String,
    /// For bitfields: bit offset within the byte at `offset`, and width.
    pub bitfield: Option<(u8, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DieRef {
    unit: usize,
    die: usize,
}

#[derive(Default)]
struct LazyIndex {
    /// `.debug_aranges` as sorted `(start, end, cu)`; built on first use.
    aranges: Option<Vec<(u64, u64, usize)>>,
    /// Complete struct/union/typedef/enum definitions seen so far.
    types: HashMap<String, DieRef>,
    /// Offset of the next CU whose top level is not yet indexed.
    next_unit: usize,
    all_scanned: bool,
}

enum Source {
    Image(Box<KernelImage>),
    Sections(HashMap<&'static str, Vec<u8>>),
}

/// Lazily indexed DWARF of one kernel image.
pub struct DebugInfo {
    source: Source,
    index: Mutex<LazyIndex>,
}

const SECTIONS: &[&str] = &[
    ".debug_info",
    ".debug_abbrev",
    ".debug_str",
    ".debug_line_str",
    ".debug_str_offsets",
    ".debug_addr",
    ".debug_aranges",
    ".debug_loclists",
    ".debug_loc",
    ".debug_rnglists",
    ".debug_ranges",
];

impl DebugInfo {
    /// Memory-map a vmlinux with DWARF. Only headers are read here.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DwarfError> {
        Self::from_image(KernelImage::open(path)?)
    }

    pub fn from_image(image: KernelImage) -> Result<Self, DwarfError> {
        if image
            .section_data(".debug_info")
            .is_none_or(|d| d.is_empty())
        {
            return Err(DwarfError::NoDebugInfo);
        }
        Ok(DebugInfo {
            source: Source::Image(Box::new(image)),
            index: Mutex::default(),
        })
    }

    /// DWARF from raw section bytes keyed by name (`.debug_info`, ...);
    /// there is no symbol table, so only [`Self::function_at`] and
    /// [`Self::member`] work. Meant for tests and fuzzing.
    pub fn from_sections(sections: HashMap<&'static str, Vec<u8>>) -> Self {
        DebugInfo {
            source: Source::Sections(sections),
            index: Mutex::default(),
        }
    }

    /// The underlying image, when opened from one.
    pub fn image(&self) -> Option<&KernelImage> {
        match &self.source {
            Source::Image(i) => Some(i),
            Source::Sections(_) => None,
        }
    }

    fn dwarf(&self) -> gimli::Dwarf<R<'_>> {
        let section = |id: gimli::SectionId| -> Result<R<'_>, ()> {
            let data: &[u8] = match &self.source {
                Source::Image(img) => img.section_data(id.name()).unwrap_or(&[]),
                Source::Sections(m) => m.get(id.name()).map_or(&[][..], |v| v.as_slice()),
            };
            Ok(EndianSlice::new(data, LittleEndian))
        };
        let _ = SECTIONS; // the names gimli asks for; documented for from_sections
        gimli::Dwarf::load(section).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LazyIndex> {
        // A panic in another thread cannot leave the index inconsistent
        // (entries are inserted whole), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parameters of the function `name` (its address from `.symtab`).
    pub fn function_params(&self, name: &str) -> Result<FunctionInfo, DwarfError> {
        let addr = self
            .image()
            .and_then(|i| i.symbol_address(name))
            .ok_or_else(|| DwarfError::FunctionNotFound(name.to_string()))?;
        self.function_at(addr).map_err(|e| match e {
            DwarfError::NoSubprogram { addr, .. } => DwarfError::NoSubprogram {
                name: name.to_string(),
                addr,
            },
            e => e,
        })
    }

    /// Parameters of the function whose out-of-line code starts at `addr`.
    pub fn function_at(&self, addr: u64) -> Result<FunctionInfo, DwarfError> {
        let dwarf = self.dwarf();
        let not_found = || DwarfError::NoSubprogram {
            name: "?".into(),
            addr,
        };
        let cu = self.cu_for_address(&dwarf, addr)?.ok_or_else(not_found)?;
        let cx = Cx::new(&dwarf);
        let unit = cx.unit(cu)?;
        let mut cursor = unit.entries();
        while let Some(e) = cursor.next_dfs().ctx("walking a CU")? {
            if e.tag() != gimli::DW_TAG_subprogram {
                continue;
            }
            let Some(low) = e.attr_value(gimli::DW_AT_low_pc) else {
                continue;
            };
            if dwarf.attr_address(&unit, low).ctx("reading low_pc")? == Some(addr) {
                let die = DieRef {
                    unit: cu,
                    die: e.offset().0,
                };
                return cx.function(die, addr);
            }
        }
        Err(not_found())
    }

    fn cu_for_address(
        &self,
        dwarf: &gimli::Dwarf<R<'_>>,
        addr: u64,
    ) -> Result<Option<usize>, DwarfError> {
        let mut idx = self.lock();
        if idx.aranges.is_none() {
            let mut v = Vec::new();
            let mut headers = dwarf.debug_aranges.headers();
            while let Some(h) = headers.next().ctx("reading .debug_aranges")? {
                let cu = h.debug_info_offset().0;
                let mut entries = h.entries();
                while let Some(e) = entries.next().ctx("reading .debug_aranges")? {
                    let r = e.range();
                    if r.end > r.begin {
                        v.push((r.begin, r.end, cu));
                    }
                }
            }
            v.sort_unstable();
            idx.aranges = Some(v);
        }
        let ar = idx.aranges.as_deref().unwrap_or(&[]);
        let i = ar.partition_point(|r| r.0 <= addr);
        Ok(ar[..i]
            .iter()
            .rev()
            .take(64)
            .find(|r| addr < r.1)
            .map(|r| r.2))
    }

    /// Offset, size and type of a member path such as `task_struct.comm`,
    /// `file.f_path.dentry` or `struct rq.nr_running`.
    pub fn member(&self, path: &str) -> Result<MemberInfo, DwarfError> {
        let p = path
            .trim()
            .trim_start_matches("struct ")
            .trim_start_matches("union ");
        let mut parts = p.split('.');
        let root = parts.next().filter(|r| !r.is_empty());
        let members: Vec<&str> = parts.collect();
        let (Some(root), false) = (root, members.is_empty()) else {
            return Err(DwarfError::BadPath(path.to_string()));
        };
        if members.iter().any(|m| m.is_empty()) {
            return Err(DwarfError::BadPath(path.to_string()));
        }
        let dwarf = self.dwarf();
        let cx = Cx::new(&dwarf);
        let mut ty = self
            .find_type(&cx, root)?
            .ok_or_else(|| DwarfError::TypeNotFound(root.to_string()))?;
        let mut offset = 0u64;
        let mut bitfield = None;
        for (i, m) in members.iter().enumerate() {
            let agg = cx.strip(ty)?;
            let tag = cx.tag(agg)?;
            if tag != gimli::DW_TAG_structure_type && tag != gimli::DW_TAG_union_type {
                return Err(DwarfError::NotAggregate {
                    path: format!("{root}.{}", members[..i].join(".")),
                    ty: cx.type_name(ty, 0)?,
                });
            }
            let (off, mty, bf) =
                cx.find_member(agg, m, 0)?
                    .ok_or_else(|| DwarfError::MemberNotFound {
                        ty: cx.type_name(ty, 0).unwrap_or_default(),
                        member: m.to_string(),
                    })?;
            offset += off;
            bitfield = bf;
            ty = mty;
        }
        Ok(MemberInfo {
            offset,
            size: cx.size_of(ty, 0)?,
            type_name: cx.type_name(ty, 0)?,
            bitfield,
        })
    }

    /// Shorthand for `member(path)?.offset`.
    pub fn member_offset(&self, path: &str) -> Result<u64, DwarfError> {
        Ok(self.member(path)?.offset)
    }

    fn find_type(&self, cx: &Cx<'_, '_>, name: &str) -> Result<Option<DieRef>, DwarfError> {
        let mut idx = self.lock();
        loop {
            if let Some(&d) = idx.types.get(name) {
                return Ok(Some(d));
            }
            if idx.all_scanned {
                return Ok(None);
            }
            let Ok(header) = cx
                .dwarf
                .debug_info
                .header_from_offset(DebugInfoOffset(idx.next_unit))
            else {
                idx.all_scanned = true;
                continue;
            };
            let next = idx.next_unit + header.length_including_self();
            if next <= idx.next_unit {
                idx.all_scanned = true;
                continue;
            }
            let cu = idx.next_unit;
            idx.next_unit = next;
            // Parsed without caching: a scan may pass over many units.
            let unit = cx.dwarf.unit(header).ctx("parsing a unit")?;
            let mut cursor = unit.entries();
            let mut depth = 0isize;
            // Top level only: children of the CU root, siblings skipped
            // via DW_AT_sibling where gcc emits it.
            if cursor.next_dfs().ctx("reading a CU root")?.is_none()
                || !cursor.next_entry().ctx("entering a CU")?
            {
                continue;
            }
            while let Some(e) = cursor.current() {
                depth += 1;
                let tag = e.tag();
                if matches!(
                    tag,
                    gimli::DW_TAG_structure_type
                        | gimli::DW_TAG_union_type
                        | gimli::DW_TAG_typedef
                        | gimli::DW_TAG_enumeration_type
                        | gimli::DW_TAG_base_type
                ) && e.attr_value(gimli::DW_AT_declaration).is_none()
                {
                    if let Some(n) = e.attr_value(gimli::DW_AT_name) {
                        let n = cx.dwarf.attr_string(&unit, n).ctx("reading a type name")?;
                        idx.types
                            .entry(n.to_string_lossy().into_owned())
                            .or_insert(DieRef {
                                unit: cu,
                                die: e.offset().0,
                            });
                    }
                }
                if cursor
                    .next_sibling()
                    .ctx("walking a CU's top level")?
                    .is_none()
                    || depth > 10_000_000
                {
                    break;
                }
            }
        }
    }
}

/// Per-query context: the DWARF sections and the units parsed so far.
struct Cx<'d, 'a> {
    dwarf: &'d gimli::Dwarf<R<'a>>,
    units: RefCell<HashMap<usize, Rc<Unit<'a>>>>,
}

const MAX_DEPTH: u32 = 64;

impl<'d, 'a> Cx<'d, 'a> {
    fn new(dwarf: &'d gimli::Dwarf<R<'a>>) -> Self {
        Cx {
            dwarf,
            units: RefCell::default(),
        }
    }

    fn unit(&self, off: usize) -> Result<Rc<Unit<'a>>, DwarfError> {
        if let Some(u) = self.units.borrow().get(&off) {
            return Ok(u.clone());
        }
        let header = self
            .dwarf
            .debug_info
            .header_from_offset(DebugInfoOffset(off))
            .ctx("reading a unit header")?;
        let unit = Rc::new(self.dwarf.unit(header).ctx("parsing a unit")?);
        self.units.borrow_mut().insert(off, unit.clone());
        Ok(unit)
    }

    fn with_entry<T>(
        &self,
        d: DieRef,
        f: impl FnOnce(&Unit<'a>, &gimli::DebuggingInformationEntry<R<'a>>) -> Result<T, DwarfError>,
    ) -> Result<T, DwarfError> {
        let unit = self.unit(d.unit)?;
        let e = unit.entry(UnitOffset(d.die)).ctx("reading a DIE")?;
        f(&unit, &e)
    }

    fn tag(&self, d: DieRef) -> Result<gimli::DwTag, DwarfError> {
        self.with_entry(d, |_, e| Ok(e.tag()))
    }

    /// Follow a reference attribute (`DW_AT_type`, `DW_AT_abstract_origin`).
    fn reference(&self, d: DieRef, at: gimli::DwAt) -> Result<Option<DieRef>, DwarfError> {
        let v = self.with_entry(d, |_, e| Ok(e.attr_value(at)))?;
        self.resolve_ref(d.unit, v)
    }

    fn resolve_ref(
        &self,
        unit: usize,
        v: Option<AttributeValue<R<'a>>>,
    ) -> Result<Option<DieRef>, DwarfError> {
        Ok(match v {
            Some(AttributeValue::UnitRef(o)) => Some(DieRef { unit, die: o.0 }),
            Some(AttributeValue::DebugInfoRef(o)) => {
                let mut units = self.dwarf.units();
                let mut found = None;
                while let Some(h) = units.next().ctx("finding a referenced unit")? {
                    if let Some(uo) = o.to_unit_offset(&h) {
                        let start = h.debug_info_offset().map_or(0, |x| x.0);
                        found = Some(DieRef {
                            unit: start,
                            die: uo.0,
                        });
                        break;
                    }
                }
                found
            }
            _ => None,
        })
    }

    fn name(&self, d: DieRef) -> Result<Option<String>, DwarfError> {
        let unit = self.unit(d.unit)?;
        let e = unit.entry(UnitOffset(d.die)).ctx("reading a DIE")?;
        match e.attr_value(gimli::DW_AT_name) {
            Some(v) => Ok(Some(
                self.dwarf
                    .attr_string(&unit, v)
                    .ctx("reading a name")?
                    .to_string_lossy()
                    .into_owned(),
            )),
            None => Ok(None),
        }
    }

    fn udata(&self, d: DieRef, at: gimli::DwAt) -> Result<Option<u64>, DwarfError> {
        self.with_entry(d, |_, e| Ok(e.attr(at).and_then(|a| a.udata_value())))
    }

    /// Skip typedefs and qualifiers.
    fn strip(&self, mut d: DieRef) -> Result<DieRef, DwarfError> {
        for _ in 0..MAX_DEPTH {
            match self.tag(d)? {
                gimli::DW_TAG_typedef
                | gimli::DW_TAG_const_type
                | gimli::DW_TAG_volatile_type
                | gimli::DW_TAG_restrict_type
                | gimli::DW_TAG_atomic_type => match self.reference(d, gimli::DW_AT_type)? {
                    Some(t) => d = t,
                    None => return Ok(d),
                },
                _ => return Ok(d),
            }
        }
        Err(malformed("following a typedef chain (too deep)"))
    }

    fn size_of(&self, d: DieRef, depth: u32) -> Result<Option<u64>, DwarfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("sizing a type (too deep)"));
        }
        let d = self.strip(d)?;
        if let Some(sz) = self.udata(d, gimli::DW_AT_byte_size)? {
            return Ok(Some(sz));
        }
        match self.tag(d)? {
            gimli::DW_TAG_pointer_type | gimli::DW_TAG_reference_type => Ok(Some(8)),
            gimli::DW_TAG_array_type => {
                let Some(elem) = self.reference(d, gimli::DW_AT_type)? else {
                    return Ok(None);
                };
                let Some(esz) = self.size_of(elem, depth + 1)? else {
                    return Ok(None);
                };
                let mut total = esz;
                for dim in self.array_dims(d)? {
                    match dim {
                        Some(n) => total = total.saturating_mul(n),
                        None => return Ok(None),
                    }
                }
                Ok(Some(total))
            }
            _ => Ok(None),
        }
    }

    /// Element counts of an array's dimensions (`None` = flexible).
    fn array_dims(&self, d: DieRef) -> Result<Vec<Option<u64>>, DwarfError> {
        let unit = self.unit(d.unit)?;
        let mut tree = unit
            .entries_tree(Some(UnitOffset(d.die)))
            .ctx("reading an array")?;
        let root = tree.root().ctx("reading an array")?;
        let mut kids = root.children();
        let mut dims = Vec::new();
        while let Some(k) = kids.next().ctx("reading array bounds")? {
            let e = k.entry();
            if e.tag() != gimli::DW_TAG_subrange_type {
                continue;
            }
            let count = e.attr(gimli::DW_AT_count).and_then(|a| a.udata_value());
            let upper = e
                .attr(gimli::DW_AT_upper_bound)
                .and_then(|a| a.udata_value());
            dims.push(count.or(upper.map(|u| u.saturating_add(1))));
        }
        Ok(dims)
    }

    /// C-like spelling of a type: `struct path`, `char[16]`, `const char *`.
    fn type_name(&self, d: DieRef, depth: u32) -> Result<String, DwarfError> {
        if depth > MAX_DEPTH {
            return Ok("...".into());
        }
        let inner = |s: &Self| -> Result<String, DwarfError> {
            match s.reference(d, gimli::DW_AT_type)? {
                Some(t) => s.type_name(t, depth + 1),
                None => Ok("void".into()),
            }
        };
        let name = self.name(d)?;
        Ok(match self.tag(d)? {
            gimli::DW_TAG_structure_type => format!("struct {}", name.unwrap_or_default()),
            gimli::DW_TAG_union_type => format!("union {}", name.unwrap_or_default()),
            gimli::DW_TAG_enumeration_type => format!("enum {}", name.unwrap_or_default()),
            gimli::DW_TAG_pointer_type => format!("{} *", inner(self)?),
            gimli::DW_TAG_const_type => format!("const {}", inner(self)?),
            gimli::DW_TAG_volatile_type => format!("volatile {}", inner(self)?),
            gimli::DW_TAG_array_type => {
                let dims: String = self
                    .array_dims(d)?
                    .iter()
                    .map(|n| n.map_or("[]".to_string(), |n| format!("[{n}]")))
                    .collect();
                format!("{}{dims}", inner(self)?)
            }
            gimli::DW_TAG_subroutine_type => "function".into(),
            _ => name.unwrap_or_else(|| "?".into()),
        })
    }

    /// Find `member` in the struct/union `agg`, descending into anonymous
    /// members. Returns offset, member type and bitfield info.
    #[allow(clippy::type_complexity)]
    fn find_member(
        &self,
        agg: DieRef,
        member: &str,
        depth: u32,
    ) -> Result<Option<(u64, DieRef, Option<(u8, u64)>)>, DwarfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("searching nested anonymous members (too deep)"));
        }
        let unit = self.unit(agg.unit)?;
        let mut tree = unit
            .entries_tree(Some(UnitOffset(agg.die)))
            .ctx("reading a struct")?;
        let root = tree.root().ctx("reading a struct")?;
        let mut kids = root.children();
        let mut anonymous = Vec::new();
        while let Some(k) = kids.next().ctx("reading struct members")? {
            let e = k.entry();
            if e.tag() != gimli::DW_TAG_member {
                continue;
            }
            let me = DieRef {
                unit: agg.unit,
                die: e.offset().0,
            };
            let (byte_off, bit_off) = member_location(e);
            let bit_size = e.attr(gimli::DW_AT_bit_size).and_then(|a| a.udata_value());
            let Some(ty) = self.resolve_ref(agg.unit, e.attr_value(gimli::DW_AT_type))? else {
                continue;
            };
            match e.attr_value(gimli::DW_AT_name) {
                Some(n) => {
                    let n = self
                        .dwarf
                        .attr_string(&unit, n)
                        .ctx("reading a member name")?;
                    if n.slice() == member.as_bytes() {
                        let bf = bit_size.map(|w| ((bit_off % 8) as u8, w));
                        return Ok(Some((byte_off + bit_off / 8, ty, bf)));
                    }
                }
                None => anonymous.push((me, byte_off, ty)),
            }
        }
        for (_, off, ty) in anonymous {
            let inner = self.strip(ty)?;
            if matches!(
                self.tag(inner)?,
                gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type
            ) {
                if let Some((o, t, bf)) = self.find_member(inner, member, depth + 1)? {
                    return Ok(Some((off + o, t, bf)));
                }
            }
        }
        Ok(None)
    }

    /// The subprogram `d` (possibly a concrete instance of an abstract
    /// origin) with its parameters' locations at `entry`.
    fn function(&self, d: DieRef, entry: u64) -> Result<FunctionInfo, DwarfError> {
        let origin = self.reference(d, gimli::DW_AT_abstract_origin)?;
        let named = match origin {
            Some(o) => o,
            None => d,
        };
        let name = match self.name(d)? {
            Some(n) => n,
            None => self.name(named)?.unwrap_or_default(),
        };
        let unit = self.unit(d.unit)?;
        // Parameters as DWARF lists them, with their entry locations.
        let mut raw: Vec<(Option<String>, Option<DieRef>, Option<ParamLocation>)> = Vec::new();
        let mut tree = unit
            .entries_tree(Some(UnitOffset(d.die)))
            .ctx("reading a subprogram")?;
        let root = tree.root().ctx("reading a subprogram")?;
        let frame_base_is_cfa = root
            .entry()
            .attr(gimli::DW_AT_frame_base)
            .and_then(|a| a.exprloc_value())
            .is_some_and(|ex| {
                let mut ops = ex.operations(unit.encoding());
                matches!(ops.next(), Ok(Some(gimli::Operation::CallFrameCFA)))
            });
        let mut kids = root.children();
        while let Some(k) = kids.next().ctx("reading parameters")? {
            let e = k.entry();
            if e.tag() != gimli::DW_TAG_formal_parameter {
                continue;
            }
            let me = DieRef {
                unit: d.unit,
                die: e.offset().0,
            };
            let porigin = self.resolve_ref(d.unit, e.attr_value(gimli::DW_AT_abstract_origin))?;
            let pname = match self.name(me)? {
                Some(n) => Some(n),
                None => match porigin {
                    Some(o) => self.name(o)?,
                    None => None,
                },
            };
            let mut ty = self.resolve_ref(d.unit, e.attr_value(gimli::DW_AT_type))?;
            if ty.is_none() {
                if let Some(o) = porigin {
                    ty = self.reference(o, gimli::DW_AT_type)?;
                }
            }
            let loc = match e.attr_value(gimli::DW_AT_location) {
                Some(v) => self.location_at(&unit, v, entry, frame_base_is_cfa)?,
                None => None,
            };
            raw.push((pname, ty, loc));
        }
        // The ABI view, for parameters without an entry location.
        let ret = self.reference(named, gimli::DW_AT_type)?;
        let return_type = match ret {
            Some(t) => Some((self.type_name(t, 0)?, self.size_of(t, 0)?)),
            None => None,
        };
        let ret_in_memory = match ret {
            Some(t) => {
                let st = self.strip(t)?;
                matches!(
                    self.tag(st)?,
                    gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type
                ) && self.size_of(st, 0)?.is_some_and(|s| s > 16)
            }
            None => false,
        };
        let mut abi = SysV::new(ret_in_memory);
        let mut params = Vec::with_capacity(raw.len());
        for (i, (pname, ty, loc)) in raw.into_iter().enumerate() {
            let (type_name, size, aggregate) = match ty {
                Some(t) => {
                    let st = self.strip(t)?;
                    let agg = matches!(
                        self.tag(st)?,
                        gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type
                    );
                    (self.type_name(t, 0)?, self.size_of(t, 0)?, agg)
                }
                None => ("?".to_string(), None, false),
            };
            let abi_loc = abi.next(size, aggregate);
            let (location, source) = match loc {
                Some(l) => (l, LocationSource::Dwarf),
                None => (abi_loc, LocationSource::Abi),
            };
            params.push(Param {
                name: pname.unwrap_or_else(|| format!("arg{}", i + 1)),
                type_name,
                size,
                location,
                source,
            });
        }
        Ok(FunctionInfo {
            name,
            entry,
            params,
            return_type,
        })
    }

    /// The location expression in force at `pc`, reduced to a register or
    /// a stack slot when it is that simple.
    fn location_at(
        &self,
        unit: &Unit<'a>,
        v: AttributeValue<R<'a>>,
        pc: u64,
        frame_base_is_cfa: bool,
    ) -> Result<Option<ParamLocation>, DwarfError> {
        if let AttributeValue::Exprloc(ex) = v {
            return Ok(simple_location(ex, unit.encoding(), frame_base_is_cfa));
        }
        let Some(mut locs) = self
            .dwarf
            .attr_locations(unit, v)
            .ctx("reading a location list")?
        else {
            return Ok(None);
        };
        while let Some(l) = locs.next().ctx("reading a location list")? {
            if l.range.begin <= pc && pc < l.range.end {
                return Ok(simple_location(l.data, unit.encoding(), frame_base_is_cfa));
            }
        }
        Ok(None)
    }
}

fn member_location(e: &gimli::DebuggingInformationEntry<R<'_>>) -> (u64, u64) {
    let bit = e
        .attr(gimli::DW_AT_data_bit_offset)
        .and_then(|a| a.udata_value())
        .unwrap_or(0);
    let byte = match e.attr_value(gimli::DW_AT_data_member_location) {
        Some(AttributeValue::Exprloc(ex)) => {
            // Old producers: DW_OP_plus_uconst N.
            let mut ops = ex.0;
            match gimli::Operation::parse(
                &mut ops,
                gimli::Encoding {
                    format: gimli::Format::Dwarf32,
                    version: 4,
                    address_size: 8,
                },
            ) {
                Ok(gimli::Operation::PlusConstant { value }) => value,
                _ => 0,
            }
        }
        Some(_) => e
            .attr(gimli::DW_AT_data_member_location)
            .and_then(|a| a.udata_value())
            .unwrap_or(0),
        None => 0,
    };
    (byte, bit)
}

fn simple_location(
    ex: gimli::Expression<R<'_>>,
    enc: gimli::Encoding,
    frame_base_is_cfa: bool,
) -> Option<ParamLocation> {
    let mut ops = ex.operations(enc);
    let first = ops.next().ok()??;
    let rest_is_empty = matches!(ops.next(), Ok(None));
    match first {
        gimli::Operation::Register { register } if rest_is_empty => {
            Some(ParamLocation::Register(Register(register.0)))
        }
        // At entry the CFA is %sp + 8 (only the return address pushed).
        gimli::Operation::FrameOffset { offset } if rest_is_empty && frame_base_is_cfa => {
            Some(ParamLocation::Stack(8 + offset))
        }
        gimli::Operation::RegisterOffset {
            register, offset, ..
        } if rest_is_empty && register.0 == 7 => Some(ParamLocation::Stack(offset)),
        _ => None,
    }
}

/// SysV x86-64 classification for the integer-only kernel.
struct SysV {
    next_reg: usize,
    stack: i64,
}

const ARG_REGS: [u16; 6] = [5, 4, 1, 2, 8, 9]; // rdi rsi rdx rcx r8 r9

impl SysV {
    fn new(hidden_return_pointer: bool) -> Self {
        SysV {
            next_reg: usize::from(hidden_return_pointer),
            stack: 8,
        }
    }

    fn next(&mut self, size: Option<u64>, aggregate: bool) -> ParamLocation {
        let Some(size) = size else {
            return ParamLocation::Unknown;
        };
        let slots = size.div_ceil(8).max(1);
        let in_regs = !(aggregate && size > 16);
        if in_regs && self.next_reg + slots as usize <= ARG_REGS.len() {
            let r = Register(ARG_REGS[self.next_reg]);
            self.next_reg += slots as usize;
            return if slots == 2 {
                ParamLocation::RegisterPair(r, Register(ARG_REGS[self.next_reg - 1]))
            } else {
                ParamLocation::Register(r)
            };
        }
        let at = self.stack;
        self.stack += 8 * slots as i64;
        ParamLocation::Stack(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysv_assignment() {
        let mut a = SysV::new(false);
        let names: Vec<_> = (0..6)
            .map(|_| match a.next(Some(8), false) {
                ParamLocation::Register(r) => r.kprobe_name(),
                l => panic!("{l:?}"),
            })
            .collect();
        assert_eq!(names, ["di", "si", "dx", "cx", "r8", "r9"]);
        assert_eq!(a.next(Some(4), false), ParamLocation::Stack(8));
        assert_eq!(a.next(Some(8), false), ParamLocation::Stack(16));
        let mut b = SysV::new(true);
        assert_eq!(b.next(Some(8), false), ParamLocation::Register(Register(4)));
        assert_eq!(b.next(Some(24), true), ParamLocation::Stack(8));
        assert_eq!(
            b.next(Some(16), true),
            ParamLocation::RegisterPair(Register(1), Register(2))
        );
    }

    #[test]
    fn garbage_sections_give_errors() {
        let mut s = HashMap::new();
        s.insert(".debug_info", vec![0xff; 64]);
        s.insert(".debug_abbrev", vec![1, 2, 3]);
        s.insert(
            ".debug_aranges",
            vec![0x20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 8, 0],
        );
        let d = DebugInfo::from_sections(s);
        assert!(d.member("task_struct.comm").is_err());
        assert!(d.function_at(0x1000).is_err());
        assert!(matches!(d.member("nodot"), Err(DwarfError::BadPath(_))));
        assert!(matches!(d.member("a..b"), Err(DwarfError::BadPath(_))));
    }
}
