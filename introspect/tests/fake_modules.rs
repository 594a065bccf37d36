//! Module probes (`MOD:SYM`) against `guest_access::fake`: a fake kernel
//! with a `modules` list, `struct module`s and their kallsyms laid out as
//! Linux 6.1 has them (offsets given in a [`ModuleLayout`], as the service
//! takes them from DWARF), the two watched kernel functions, and module
//! text that a test "loads" (links into the list, hits `do_init_module`),
//! "unloads" (hits `free_module`, unlinks, poisons) or frees behind the
//! host's back. No KVM.
//!
//! | virtual              | physical    | what                                      |
//! |----------------------|-------------|-------------------------------------------|
//! | `TEXT + 0x00`        | `0x10_0000` | `do_init_module`: push rbp; mov; pop; ret |
//! | `TEXT + 0x10`        | `0x10_0010` | `free_module`: the same                   |
//! | `DATA`               | `0x12_0000` | `modules` head, struct modules, kallsyms  |
//! | `MOD_A`, `MOD_B`     | `0x14_0000`, `0x15_0000` | a module's text (two load addresses) |
//! | `STACK`              | `0x8_0000`  | the stack                                 |

use std::sync::Arc;

use guest_access::fake::{long_mode, FakeMemory, FakeVm, PageTables, Perm};
use guest_access::{BreakpointAction, GuestMemory, Regs};
use introspect::modules::ModuleLayout;
use introspect::{
    Engine, EngineConfig, KernelSymbols, ModuleTarget, ProbeError, ProbeId, ProbeInfo,
    ProbeRequest, KERNEL_TEXT_MAP,
};

const TEXT_GPA: u64 = 0x10_0000;
const TEXT: u64 = KERNEL_TEXT_MAP + TEXT_GPA;
const LOAD_HOOK: u64 = TEXT;
const FREE_HOOK: u64 = TEXT + 0x10;
const DATA_GPA: u64 = 0x12_0000;
const DATA: u64 = 0xffff_8880_0012_0000;
const MODULES: u64 = DATA;
const MOD_STRUCT: u64 = DATA + 0x1000;
const MOD_A_GPA: u64 = 0x14_0000;
const MOD_A: u64 = 0xffff_ffff_c000_0000;
const MOD_B_GPA: u64 = 0x15_0000;
const MOD_B: u64 = 0xffff_ffff_c000_4000;
const STACK_GPA: u64 = 0x8_0000;
const STACK: u64 = 0xffff_c900_0000_0000;

/// `push rbp; mov rbp,rsp; pop rbp; ret`: instruction starts at +0, +1, +4, +5.
const FUNC: [u8; 6] = [0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3];
const INT3: u8 = 0xcc;
/// Module text: `f_a` at +0, `f_b` at +0x20, 0x40 bytes.
const F_B: u64 = 0x20;
const TEXT_SIZE: u32 = 0x40;

fn layout() -> ModuleLayout {
    ModuleLayout {
        modules: MODULES,
        list_offset: 8,
        name_offset: 24,
        state_offset: 0,
        core_base_offset: 320,
        core_text_size_offset: 332,
        kallsyms_offset: 544,
        symtab_offset: 0,
        num_symtab_offset: 8,
        strtab_offset: 16,
        load_hook: LOAD_HOOK,
        free_hook: FREE_HOOK,
    }
}

struct NoFunctions;

impl KernelSymbols for NoFunctions {
    fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
        None
    }
}

struct Rig {
    vm: Arc<FakeVm>,
    engine: Arc<Engine>,
}

fn data_gpa(v: u64) -> u64 {
    v - DATA + DATA_GPA
}

fn rig() -> Rig {
    let mem = FakeMemory::new(0x20_0000);
    let mut text = vec![INT3; 0x1000];
    text[..6].copy_from_slice(&FUNC);
    text[0x10..0x16].copy_from_slice(&FUNC);
    mem.write_phys(TEXT_GPA, &text).unwrap();
    let mut pt = PageTables::new(&mem, 0x1000..0x10000);
    pt.map(TEXT, TEXT_GPA, 0x1000, Perm::TEXT);
    pt.map(DATA, DATA_GPA, 0x4000, Perm::DATA);
    pt.map(MOD_A, MOD_A_GPA, 0x1000, Perm::TEXT);
    pt.map(MOD_B, MOD_B_GPA, 0x1000, Perm::TEXT);
    pt.map(STACK, STACK_GPA, 0x1000, Perm::DATA);
    let cr3 = pt.cr3();
    let vm = Arc::new(FakeVm::new(mem, 2));
    vm.set_system_regs(long_mode(cr3));
    let r = Rig {
        engine: Engine::new(
            vm.clone(),
            Arc::new(NoFunctions),
            EngineConfig::for_vcpus(2),
        ),
        vm,
    };
    r.set_list(&[]);
    r
}

impl Rig {
    fn mem(&self) -> &FakeMemory {
        self.vm.mem()
    }

    fn put(&self, v: u64, bytes: &[u8]) {
        self.mem().write_phys(data_gpa(v), bytes).unwrap();
    }

    /// The `modules` list holds exactly the modules at `ats`.
    fn set_list(&self, ats: &[u64]) {
        let l = layout();
        let mut nodes = vec![MODULES];
        nodes.extend(ats.iter().map(|a| a + l.list_offset));
        for i in 0..nodes.len() {
            let next = nodes[(i + 1) % nodes.len()];
            self.put(nodes[i], &next.to_le_bytes());
        }
    }

    /// Module text at `gpa` (pristine: f_a, f_b, 0xcc padding).
    fn write_text(&self, gpa: u64) {
        let mut t = vec![INT3; TEXT_SIZE as usize];
        t[..6].copy_from_slice(&FUNC);
        t[F_B as usize..F_B as usize + 6].copy_from_slice(&[0xb8, 1, 0, 0, 0, 0xc3]);
        self.mem().write_phys(gpa, &t).unwrap();
    }

    /// A `struct module` "binfmt_misc" (state `state`) for text at `base`,
    /// kallsyms naming f_a and f_b.
    fn write_module(&self, base: u64, state: u32) {
        let l = layout();
        let m = MOD_STRUCT;
        self.put(m, &[0u8; 0x600]);
        self.put(m + l.state_offset, &state.to_le_bytes());
        self.put(m + l.name_offset, b"binfmt_misc\0");
        self.put(m + l.core_base_offset, &base.to_le_bytes());
        self.put(m + l.core_text_size_offset, &TEXT_SIZE.to_le_bytes());
        let (ks, symtab, strtab) = (m + 0x300, m + 0x400, m + 0x500);
        self.put(m + l.kallsyms_offset, &ks.to_le_bytes());
        self.put(ks, &symtab.to_le_bytes());
        self.put(ks + 8, &3u32.to_le_bytes());
        self.put(ks + 16, &strtab.to_le_bytes());
        self.put(strtab, b"\0f_a\0f_b\0");
        let sym = |name: u32, value: u64, size: u64| {
            let mut e = [0u8; 24];
            e[0..4].copy_from_slice(&name.to_le_bytes());
            e[4] = 0x02;
            e[8..16].copy_from_slice(&value.to_le_bytes());
            e[16..24].copy_from_slice(&size.to_le_bytes());
            e
        };
        self.put(symtab, &[0u8; 24]);
        self.put(symtab + 24, &sym(1, base, 6));
        self.put(symtab + 48, &sym(5, base + F_B, 6));
    }

    /// insmod: text and struct module written, listed (COMING), then the
    /// kernel calls do_init_module(mod).
    fn load(&self, base: u64, gpa: u64) {
        self.write_text(gpa);
        self.write_module(base, 1);
        self.set_list(&[MOD_STRUCT]);
        self.call(LOAD_HOOK, MOD_STRUCT);
        self.put(MOD_STRUCT, &0u32.to_le_bytes());
    }

    /// A vCPU runs into the int3 at `rip` with `rdi` = `arg`.
    fn call(&self, rip: u64, arg: u64) -> BreakpointAction {
        let mut v = self.vm.vcpu(0);
        v.regs = Regs {
            rip,
            rdi: arg,
            rsp: STACK + 0x800,
            rflags: 0x202,
            ..Default::default()
        };
        v.hit(&*self.engine, &*self.vm)
    }

    fn add(&self, name: &str, symbol: &str, offset: u64) -> Result<ProbeId, ProbeError> {
        self.engine.register(module_probe(name, symbol, offset))
    }

    fn row(&self, id: ProbeId) -> ProbeInfo {
        self.engine
            .list()
            .into_iter()
            .find(|p| p.id == id)
            .expect("listed")
    }

    fn byte(&self, gpa: u64) -> u8 {
        self.mem().read_vec(gpa, 1)[0]
    }
}

fn module_probe(name: &str, symbol: &str, offset: u64) -> ProbeRequest {
    ProbeRequest {
        module: Some(ModuleTarget {
            module: "binfmt_misc".into(),
            symbol: symbol.into(),
            offset,
        }),
        ..ProbeRequest::kprobe(name, 0)
    }
}

#[test]
fn a_pending_probe_arms_at_load_fires_goes_at_unload_and_rearms_at_the_next_load() {
    let r = rig();
    let refused = r.add("m/early", "f_a", 0).unwrap_err();
    assert!(
        matches!(refused, ProbeError::ModulesUnavailable(_)),
        "{refused}"
    );
    r.engine.watch_modules(layout()).unwrap();
    assert_eq!(r.byte(TEXT_GPA), INT3, "do_init_module watched");
    assert_eq!(r.byte(TEXT_GPA + 0x10), INT3, "free_module watched");

    let a = r.add("m/a", "f_a", 0).unwrap();
    let b = r.add("m/b", "f_b", 0).unwrap();
    let missing = r.add("m/missing", "no_such_function", 0).unwrap();
    let row = r.row(a);
    assert!(row.pending && !row.gone && row.address == 0, "{row:?}");
    assert!(row.to_string().contains("[PENDING"), "{row}");
    assert_eq!(row.location, "binfmt_misc:f_a");

    // insmod: armed before do_init_module goes on.
    r.load(MOD_A, MOD_A_GPA);
    assert_eq!(r.byte(MOD_A_GPA), INT3);
    assert_eq!(r.byte(MOD_A_GPA + F_B), INT3);
    let row = r.row(a);
    assert!(!row.pending && !row.gone && row.address == MOD_A, "{row:?}");
    assert_eq!(row.location, "f_a+0x0/0x6 [binfmt_misc]");
    let row = r.row(missing);
    assert!(row.pending, "{row:?}");
    let why = row.module_error.expect("why it was not armed");
    assert!(
        why.contains("binfmt_misc") && why.contains("no_such_function"),
        "{why}"
    );
    // The module's own functions run: each hit counted once.
    assert_eq!(r.call(MOD_A, 0), BreakpointAction::Resume);
    assert_eq!(r.call(MOD_A + F_B, 0), BreakpointAction::Resume);
    assert_eq!(r.call(MOD_A, 0), BreakpointAction::Resume);
    assert_eq!((r.row(a).hits, r.row(b).hits), (2, 1));
    // Once loaded, a function it lacks is refused at once, naming both.
    let e = r.add("m/bad", "nope", 0).unwrap_err();
    assert_eq!(
        e,
        ProbeError::ModuleSymbolNotFound {
            module: "binfmt_misc".into(),
            symbol: "nope".into()
        }
    );
    assert!(matches!(
        r.add("m/far", "f_a", 6).unwrap_err(),
        ProbeError::ModuleOffsetOutside { .. }
    ));

    // rmmod: the original bytes are back while the text is still the
    // module's, then the probes are gone.
    r.put(MOD_STRUCT, &2u32.to_le_bytes());
    r.call(FREE_HOOK, MOD_STRUCT);
    let mut pristine = FUNC.to_vec();
    assert_eq!(r.mem().read_vec(MOD_A_GPA, 6), pristine);
    pristine = vec![0xb8, 1, 0, 0, 0, 0xc3];
    assert_eq!(r.mem().read_vec(MOD_A_GPA + F_B, 6), pristine);
    r.set_list(&[]);
    r.mem().write_phys(MOD_A_GPA, &[0x6b; 0x40]).unwrap();
    let row = r.row(a);
    assert!(row.gone && !row.pending, "{row:?}");
    assert!(row.to_string().contains("[GONE]"), "{row}");
    // A vCPU that trapped before the unload: the int3 is not there any
    // more, so it runs on.
    let stale = r.engine.stats().stale_traps;
    assert_eq!(r.call(MOD_A, 0), BreakpointAction::Resume);
    assert_eq!(r.engine.stats().stale_traps, stale + 1);
    assert_eq!(r.row(a).hits, 2, "a gone probe does not fire");

    // Deleting a gone probe writes nothing into the freed memory.
    r.mem().record_writes();
    r.engine.unregister(b).unwrap();
    assert_eq!(r.mem().take_writes(), [], "nothing written on delete");

    // insmod again, elsewhere: the probe is armed again, counters kept.
    r.load(MOD_B, MOD_B_GPA);
    let row = r.row(a);
    assert!(!row.gone && row.address == MOD_B, "{row:?}");
    assert_eq!(r.byte(MOD_B_GPA), INT3);
    assert_eq!(r.byte(MOD_B_GPA + F_B), 0xb8, "m/b was deleted");
    assert_eq!(r.call(MOD_B, 0), BreakpointAction::Resume);
    assert_eq!(r.row(a).hits, 3);
    // Deleting a live module probe restores its byte, as any probe.
    r.engine.unregister(a).unwrap();
    assert_eq!(r.byte(MOD_B_GPA), FUNC[0]);
    assert_eq!(r.engine.stats().module_events, 3);
}

#[test]
fn an_unload_the_host_missed_marks_the_probe_gone_and_nothing_is_written() {
    let r = rig();
    r.engine.watch_modules(layout()).unwrap();
    let a = r.add("m/a", "f_a", 0).unwrap();
    r.load(MOD_A, MOD_A_GPA);
    assert_eq!(r.byte(MOD_A_GPA), INT3);
    // The module leaves the list and is freed without free_module being
    // seen (the memory still holds the old bytes and our int3, as vfree
    // leaves them): only the module list says the code is gone.
    r.set_list(&[]);
    r.mem().record_writes();
    assert!(r.row(a).gone);
    r.engine.unregister(a).unwrap();
    assert_eq!(r.mem().take_writes(), [], "nothing written into freed text");
    assert_eq!(r.byte(MOD_A_GPA), INT3, "the freed memory is left as it is");
}

#[test]
fn a_probe_on_a_loaded_module_is_armed_at_once() {
    let r = rig();
    r.write_text(MOD_A_GPA);
    r.write_module(MOD_A, 0);
    r.set_list(&[MOD_STRUCT]);
    r.engine.watch_modules(layout()).unwrap();
    let a = r.add("m/a", "f_a", 1).unwrap();
    let row = r.row(a);
    assert_eq!((row.address, row.pending), (MOD_A + 1, false));
    assert_eq!(r.byte(MOD_A_GPA + 1), INT3);
    // Not an instruction boundary inside the module's function.
    let e = r.add("m/mid", "f_a", 2).unwrap_err();
    assert!(
        matches!(e, ProbeError::NotInstructionBoundary { .. }),
        "{e}"
    );
}

/// Many probes on a module's functions through insmod/rmmod cycles, with
/// deletes while it is unloaded: exact hits, pristine text after every
/// unload, no write into freed text.
#[test]
fn many_module_probes_survive_load_unload_cycles_exactly() {
    let r = rig();
    r.engine.watch_modules(layout()).unwrap();
    let points = [
        ("f_a", 0u64),
        ("f_a", 1),
        ("f_a", 4),
        ("f_a", 5),
        ("f_b", 0),
        ("f_b", 5),
    ];
    let mut ids = Vec::new();
    for i in 0..60 {
        let (sym, off) = points[i % points.len()];
        ids.push((r.add(&format!("m/p{i}"), sym, off).unwrap(), sym, off));
    }
    let cycles = 12;
    let mut deleted = Vec::new();
    for c in 0..cycles {
        let (base, gpa) = if c % 2 == 0 {
            (MOD_A, MOD_A_GPA)
        } else {
            (MOD_B, MOD_B_GPA)
        };
        r.load(base, gpa);
        for (sym, off) in points {
            let at = base + if sym == "f_b" { F_B } else { 0 } + off;
            assert_eq!(r.byte(gpa + (at - base)), INT3, "cycle {c}: {sym}+{off}");
            assert_eq!(r.call(at, 0), BreakpointAction::Resume);
        }
        r.put(MOD_STRUCT, &2u32.to_le_bytes());
        r.call(FREE_HOOK, MOD_STRUCT);
        // Still the module's text: every original byte is back.
        let mut pristine = vec![INT3; TEXT_SIZE as usize];
        pristine[..6].copy_from_slice(&FUNC);
        pristine[F_B as usize..F_B as usize + 6].copy_from_slice(&[0xb8, 1, 0, 0, 0, 0xc3]);
        assert_eq!(
            r.mem().read_vec(gpa, TEXT_SIZE as usize),
            pristine,
            "cycle {c}"
        );
        r.set_list(&[]);
        r.mem()
            .write_phys(gpa, &vec![0x6b; TEXT_SIZE as usize])
            .unwrap();
        // Delete a few while unloaded: nothing written.
        r.mem().record_writes();
        r.mem().take_writes();
        let victims: Vec<ProbeId> = ids
            .iter()
            .map(|p| p.0)
            .filter(|id| !deleted.contains(id))
            .take(2)
            .collect();
        r.engine.unregister_batch(&victims).unwrap();
        assert_eq!(r.mem().take_writes(), [], "cycle {c}");
        deleted.extend(victims);
    }
    let rows = r.engine.list();
    for (id, _, _) in &ids {
        let hits = rows.iter().find(|p| p.id == *id).map(|p| p.hits);
        if deleted.contains(id) {
            assert_eq!(hits, None);
        } else {
            // Every probe of a point fires on each of its point's hits.
            assert_eq!(hits, Some(cycles), "probe {id}");
        }
    }
    assert_eq!(r.engine.stats().module_events, 2 * cycles);
}
