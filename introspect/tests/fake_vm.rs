//! The probe table and the hit path against `guest_access::fake`: guest RAM
//! with 4-level page tables (kernel text read and patched through the page
//! walk, as in a booted guest), vCPUs whose registers each test sets, and
//! hits handed to the engine's own breakpoint handler. No KVM.
//!
//! Guest layout (one text page, one stack page):
//!
//! | virtual                  | physical   | what                                |
//! |--------------------------|------------|-------------------------------------|
//! | `TEXT + 0x000`           | `0x10_0000`| `nop5; ret` (`f_nop5`)              |
//! | `TEXT + 0x010`           | `0x10_0010`| `push rbp; mov rbp,rsp; pop; ret`   |
//! | `TEXT + 0x020`           | `0x10_0020`| `mov eax, 1; ret`                   |
//! | `TEXT + 0x030`           | `0x10_0030`| `lea rax, [rbp+8]; ret`             |
//! | `TEXT + 0x800..+0x900`   |            | padding (0xcc): out-of-line slots   |
//! | `TEXT + 0x900`           |            | padding: the kretprobe return trap  |
//! | `STACK`                  | `0x8_0000` | a writable, non-executable page     |

use std::sync::{Arc, Mutex};

use guest_access::fake::{long_mode, FakeMemory, FakeVcpu, FakeVm, PageTables, Perm, Write};
use guest_access::{AccessError, BreakpointAction, BreakpointHandler, GuestMemory, Regs};
use introspect::{
    BatchError, Engine, EngineConfig, EventKind, Handling, KernelSymbols, ProbeError, ProbeId,
    ProbeRequest, KERNEL_TEXT_MAP,
};

const TEXT_GPA: u64 = 0x10_0000;
const TEXT: u64 = KERNEL_TEXT_MAP + TEXT_GPA;
const STACK_GPA: u64 = 0x8_0000;
const STACK: u64 = 0xffff_c900_0000_0000;

const F_NOP5: u64 = TEXT;
const F_PUSH: u64 = TEXT + 0x10;
const F_MOV: u64 = TEXT + 0x20;
const F_LEA: u64 = TEXT + 0x30;
const PAD: (u64, u64) = (TEXT + 0x800, TEXT + 0x900);
const TRAP: u64 = TEXT + 0x900;

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const PUSH_RBP: u8 = 0x55;
const INT3: u8 = 0xcc;
const RFLAGS_IF: u64 = 1 << 9;

/// No functions known (no entry or boundary checks); the padding is free
/// for out-of-line slots.
struct Padding;

impl KernelSymbols for Padding {
    fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
        None
    }
    fn scratch_ranges(&self) -> Vec<(u64, u64)> {
        vec![PAD]
    }
}

struct Rig {
    vm: Arc<FakeVm>,
    engine: Arc<Engine>,
}

/// Guest-physical address of kernel text at `addr`.
fn gpa(addr: u64) -> u64 {
    addr - KERNEL_TEXT_MAP
}

fn rig() -> Rig {
    let mem = FakeMemory::new(0x20_0000);
    let mut text = vec![INT3; 0x1000];
    text[..6].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]);
    text[0x10..0x16].copy_from_slice(&[PUSH_RBP, 0x48, 0x89, 0xe5, 0x5d, 0xc3]);
    text[0x20..0x26].copy_from_slice(&[0xb8, 1, 0, 0, 0, 0xc3]);
    text[0x30..0x35].copy_from_slice(&[0x48, 0x8d, 0x45, 0x08, 0xc3]);
    mem.write_phys(TEXT_GPA, &text).unwrap();
    let mut pt = PageTables::new(&mem, 0x1000..0x10000);
    pt.map(TEXT, TEXT_GPA, 0x1000, Perm::TEXT);
    pt.map(STACK, STACK_GPA, 0x1000, Perm::DATA);
    let cr3 = pt.cr3();
    let vm = Arc::new(FakeVm::new(mem, 2));
    vm.set_system_regs(long_mode(cr3));
    let engine = Engine::new(vm.clone(), Arc::new(Padding), EngineConfig::for_vcpus(2));
    Rig { vm, engine }
}

impl Rig {
    fn mem(&self) -> &FakeMemory {
        self.vm.mem()
    }

    /// The whole text page.
    fn text(&self) -> Vec<u8> {
        self.mem().read_vec(TEXT_GPA, 0x1000)
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem().read_vec(gpa(addr), 1)[0]
    }

    /// Register one probe; its id.
    fn add(&self, req: ProbeRequest) -> ProbeId {
        self.engine.register(req).unwrap()
    }

    /// vCPU `index` (paging on) with these registers.
    fn vcpu(&self, index: usize, regs: Regs) -> FakeVcpu {
        let mut v = self.vm.vcpu(index);
        v.regs = regs;
        v
    }

    /// A hit at `rip` on vCPU 0 with the stack at `rsp`; the vCPU after it.
    fn hit_at(&self, rip: u64, rsp: u64) -> FakeVcpu {
        let mut v = self.vcpu(
            0,
            Regs {
                rip,
                rsp,
                rbp: 0x1234,
                rflags: 0x2 | RFLAGS_IF,
                ..Default::default()
            },
        );
        assert_eq!(v.hit(&*self.engine, &*self.vm), BreakpointAction::Resume);
        v
    }

    /// Per probe: (id, hits, missed, handling, gone).
    fn rows(&self) -> Vec<(ProbeId, u64, u64, Handling, bool)> {
        self.engine
            .list()
            .iter()
            .map(|p| (p.id, p.hits, p.missed, p.handling, p.gone))
            .collect()
    }
}

fn out_of_line(name: &str, addr: u64) -> ProbeRequest {
    ProbeRequest {
        force_out_of_line: true,
        ..ProbeRequest::kprobe(name, addr)
    }
}

/// The relocated `nop5` plus the slot's trailing int3.
const NOP5_SLOT: [u8; 6] = [0x0f, 0x1f, 0x44, 0x00, 0x00, INT3];

#[test]
fn a_batch_failing_in_its_third_definition_says_index_2_and_leaves_no_trace() {
    let r = rig();
    // A probe from before the batch stays as it was.
    let old = r.add(ProbeRequest::kprobe("t/old", F_LEA));
    let before = r.text();
    assert_eq!(before[0x30], INT3);
    // The int3 of the third definition cannot be written.
    r.mem().refuse_writes(gpa(F_PUSH)..gpa(F_PUSH) + 1);
    let err = r
        .engine
        .register_batch(vec![
            ProbeRequest::kprobe("t/a", F_NOP5),
            out_of_line("t/b", F_MOV), // a slot in the padding
            ProbeRequest::kprobe("t/c", F_PUSH),
        ])
        .unwrap_err();
    assert_eq!(
        err,
        BatchError {
            index: 2,
            error: ProbeError::Guest(AccessError::OutOfRam {
                gpa: gpa(F_PUSH),
                len: 1
            }),
        }
    );
    assert_eq!(r.text(), before, "guest text is byte-identical");
    assert_eq!(r.rows(), [(old, 0, 0, Handling::Emulated, false)]);
    assert_eq!(r.engine.planted_bytes(), [(gpa(F_LEA), 0x48)]);

    // The same batch with the return trap unwritable fails at its kretprobe.
    r.mem().accept_writes();
    r.engine.set_return_trap(TRAP).unwrap();
    r.mem().refuse_writes(gpa(TRAP)..gpa(TRAP) + 1);
    let err = r
        .engine
        .register_batch(vec![
            ProbeRequest::kprobe("t/a", F_NOP5),
            ProbeRequest::kretprobe("t/r", F_PUSH, None),
        ])
        .unwrap_err();
    assert_eq!(err.index, 1, "{err}");
    assert_eq!(r.text(), before);
    assert_eq!(r.rows(), [(old, 0, 0, Handling::Emulated, false)]);
}

#[test]
fn a_batch_refused_in_validation_names_the_definition() {
    let r = rig();
    let before = r.text();
    let err = r
        .engine
        .register_batch(vec![
            ProbeRequest::kprobe("t/a", F_NOP5),
            ProbeRequest::kprobe("t/b", F_PUSH),
            ProbeRequest::kprobe("t/unmapped", TEXT + 0x1000),
        ])
        .unwrap_err();
    assert_eq!(err.index, 2, "{err}");
    assert!(
        matches!(err.error, ProbeError::Unmapped { addr, .. } if addr == TEXT + 0x1000),
        "{err}"
    );
    assert_eq!(r.text(), before);
    assert_eq!(r.rows(), []);
}

#[test]
fn many_probes_at_one_address_count_their_own_hits_and_share_one_int3() {
    let r = rig();
    let before = r.text();
    let sub = r.engine.subscribe(64, None, None);
    let ids: Vec<ProbeId> = ["t/p1", "t/p2", "t/p3"]
        .iter()
        .map(|n| r.add(ProbeRequest::kprobe(*n, F_PUSH)))
        .collect();
    assert_eq!(r.byte(F_PUSH), INT3);
    assert_eq!(r.engine.planted_bytes(), [(gpa(F_PUSH), PUSH_RBP)]);
    let rsp = STACK + 0x800;
    for _ in 0..5 {
        let v = r.hit_at(F_PUSH, rsp);
        // `push rbp` was emulated: one instruction on, rbp on the stack.
        assert_eq!((v.regs.rip, v.regs.rsp), (F_PUSH + 1, rsp - 8));
        assert_eq!(r.mem().read_u64(STACK_GPA + 0x7f8), 0x1234);
    }
    r.engine.set_enabled(ids[1], false).unwrap();
    assert_eq!(r.byte(F_PUSH), INT3, "other probes are still enabled");
    for _ in 0..2 {
        r.hit_at(F_PUSH, rsp);
    }
    r.engine.set_enabled(ids[1], true).unwrap();
    assert_eq!(
        r.rows(),
        [
            (ids[0], 7, 0, Handling::Emulated, false),
            (ids[1], 5, 0, Handling::Emulated, false),
            (ids[2], 7, 0, Handling::Emulated, false),
        ]
    );
    let stats = r.engine.stats();
    assert_eq!(
        (stats.hits, stats.emulated, stats.single_stepped),
        (7, 7, 0)
    );
    let mut per_probe = [0; 3];
    for e in sub.drain(64) {
        assert_eq!((e.kind, e.ip), (EventKind::Entry, F_PUSH));
        per_probe[ids.iter().position(|id| *id == e.probe_id).unwrap()] += 1;
    }
    assert_eq!(per_probe, [7, 5, 7]);

    r.engine.unregister(ids[0]).unwrap();
    assert_eq!(r.byte(F_PUSH), INT3);
    r.engine.unregister(ids[2]).unwrap();
    assert_eq!(r.byte(F_PUSH), INT3);
    assert_eq!(r.rows(), [(ids[1], 5, 0, Handling::Emulated, false)]);
    r.engine.unregister(ids[1]).unwrap();
    assert_eq!(
        r.text(),
        before,
        "the last delete restores the original bytes"
    );
    assert_eq!(r.engine.planted_bytes(), []);
    assert_eq!(r.rows(), []);
}

#[test]
fn kretprobe_counts_nmissed_exactly_and_recycles_stale_instances() {
    let r = rig();
    r.engine.set_return_trap(TRAP).unwrap();
    let id = r.add(ProbeRequest::kretprobe("t/ret", F_PUSH, Some(2)));
    let sub = r.engine.subscribe(64, None, None);
    assert_eq!(r.byte(TRAP), INT3);
    // Four frames, each with its return address on top of the stack.
    let frame = |i: u64| STACK + 0x100 * (i + 1);
    let ret_to = |i: u64| F_MOV + 0x100 + i;
    let slot = |i: u64| r.mem().read_u64(gpa_stack(frame(i)));
    for i in 0..4 {
        r.mem().write_u64(gpa_stack(frame(i)), ret_to(i));
    }
    let live = || r.engine.stats().live_instances;

    // Two entries take both instances; the third finds none.
    r.hit_at(F_PUSH, frame(0));
    r.hit_at(F_PUSH, frame(1));
    assert_eq!((slot(0), slot(1), live()), (TRAP, TRAP, 2));
    r.hit_at(F_PUSH, frame(2));
    assert_eq!(slot(2), ret_to(2), "a missed entry is not redirected");
    assert_eq!(r.rows(), [(id, 3, 1, Handling::Emulated, false)]);
    assert_eq!(live(), 2);

    // Frame 0 is abandoned (the guest reused its stack): the next entry
    // recycles its instance instead of missing.
    r.mem().write_u64(gpa_stack(frame(0)), 0);
    r.hit_at(F_PUSH, frame(3));
    assert_eq!(slot(3), TRAP);
    let stats = r.engine.stats();
    assert_eq!((stats.live_instances, stats.recycled_instances), (2, 1));
    assert_eq!(r.rows(), [(id, 4, 1, Handling::Emulated, false)]);

    // Frame 1 returns into the trap: to its real return address, one
    // instance free again, and the return value reported.
    let mut v = r.vcpu(
        1,
        Regs {
            rip: TRAP,
            rsp: frame(1) + 8,
            rax: 42,
            ..Default::default()
        },
    );
    assert_eq!(v.hit(&*r.engine, &*r.vm), BreakpointAction::Resume);
    assert_eq!((v.regs.rip, v.regs.rsp), (ret_to(1), frame(1) + 8));
    assert_eq!(slot(1), ret_to(1), "the popped slot holds the real address");
    assert_eq!(live(), 1);
    let returns: Vec<(u64, u64)> = sub
        .drain(64)
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Return {
                retval, return_to, ..
            } => Some((retval, return_to)),
            EventKind::Entry => None,
        })
        .collect();
    assert_eq!(returns, [(42, ret_to(1))]);

    // With an instance free, the next entry is not missed.
    r.mem().write_u64(gpa_stack(frame(2)), ret_to(2));
    r.hit_at(F_PUSH, frame(2));
    assert_eq!(slot(2), TRAP);
    assert_eq!(r.rows(), [(id, 5, 1, Handling::Emulated, false)]);
    assert_eq!(r.engine.stats().return_traps, 1);
}

fn gpa_stack(addr: u64) -> u64 {
    addr - STACK + STACK_GPA
}

#[test]
fn out_of_line_slots_are_freed_once_no_vcpu_can_be_inside() {
    let r = rig();
    let pristine = r.text();
    let pad = |r: &Rig| r.mem().read_vec(gpa(PAD.0), (PAD.1 - PAD.0) as usize);
    let pad_before = pad(&r);

    // A slot nobody entered goes back at once.
    let id = r.add(out_of_line("t/x", F_NOP5));
    assert_eq!(r.rows(), [(id, 0, 0, Handling::OutOfLine, false)]);
    assert_ne!(pad(&r), pad_before, "the slot is written in the padding");
    r.engine.unregister(id).unwrap();
    assert_eq!(r.text(), pristine);

    // Two vCPUs enter the slot; the probe is deleted while they are inside.
    let id = r.add(out_of_line("t/y", F_NOP5));
    let enter = |index: usize| {
        let mut v = r.vcpu(
            index,
            Regs {
                rip: F_NOP5,
                rflags: 0x2 | RFLAGS_IF,
                ..Default::default()
            },
        );
        assert_eq!(v.hit(&*r.engine, &*r.vm), BreakpointAction::Resume);
        v
    };
    let mut a = enter(0);
    let mut b = enter(1);
    let slot = a.regs.rip;
    assert!(slot >= PAD.0 && slot < PAD.1, "slot at {slot:#x}");
    assert_eq!(b.regs.rip, slot);
    assert_eq!(
        a.regs.rflags & RFLAGS_IF,
        0,
        "interrupts masked in the slot"
    );
    assert_eq!(r.mem().read_vec(gpa(slot), 6), NOP5_SLOT);
    assert_eq!(r.engine.stats().out_of_line, 2);
    r.engine.unregister(id).unwrap();
    assert_eq!(r.mem().read_vec(gpa(F_NOP5), 5), NOP5, "site restored");
    assert_eq!(
        r.mem().read_vec(gpa(slot), 6),
        NOP5_SLOT,
        "the slot stays while vCPUs are inside"
    );
    assert!(r.engine.owns_address(slot + 5));

    // Each runs the nop5 and traps on the slot's int3.
    let leave = |v: &mut FakeVcpu| {
        v.regs.rip = slot + 5;
        assert_eq!(v.hit(&*r.engine, &*r.vm), BreakpointAction::Resume);
        assert_eq!(v.regs.rip, F_NOP5 + 5);
        assert_ne!(v.regs.rflags & RFLAGS_IF, 0, "IF restored");
    };
    leave(&mut a);
    assert_eq!(
        r.mem().read_vec(gpa(slot), 6),
        NOP5_SLOT,
        "b is still inside"
    );
    leave(&mut b);
    assert_eq!(r.text(), pristine, "the last vCPU out freed the slot");
    assert!(!r.engine.owns_address(slot + 5));
    assert_eq!(r.engine.planted_bytes(), []);
}

#[test]
fn gone_sites_are_listed_and_their_delete_writes_nothing() {
    let r = rig();
    let poisoned = r.add(ProbeRequest::kprobe("t/a", F_NOP5));
    let rewritten = r.add(ProbeRequest::kprobe("t/b", F_PUSH));
    let kept = r.add(ProbeRequest::kprobe("t/c", F_MOV));
    // The guest frees the code under the first (poison over the whole
    // instruction: the int3 byte still reads 0xcc) and rewrites the second.
    r.mem().write_phys(gpa(F_NOP5), &[INT3; 6]).unwrap();
    r.mem().write_phys(gpa(F_PUSH), &[0x90]).unwrap();
    let after_guest = r.text();
    assert_eq!(
        r.rows(),
        [
            (poisoned, 0, 0, Handling::Emulated, true),
            (rewritten, 0, 0, Handling::Emulated, true),
            (kept, 0, 0, Handling::Emulated, false),
        ]
    );
    assert!(r.engine.list()[0].to_string().contains("[GONE]"));

    r.mem().record_writes();
    r.engine.unregister_batch(&[poisoned, rewritten]).unwrap();
    assert_eq!(r.mem().take_writes(), [], "nothing written into gone code");
    assert_eq!(r.text(), after_guest);
    // Code poisoned after the last listing: the delete itself sees it.
    let late = r.add(ProbeRequest::kprobe("t/d", F_LEA));
    r.mem().write_phys(gpa(F_LEA), &[INT3; 4]).unwrap();
    r.mem().take_writes();
    r.engine.unregister(late).unwrap();
    assert_eq!(r.mem().take_writes(), [], "nothing written into gone code");
    assert_eq!(r.mem().read_vec(gpa(F_LEA), 4), [INT3; 4]);
    // The live one is still restored as usual.
    r.engine.unregister(kept).unwrap();
    assert_eq!(
        r.mem().take_writes(),
        [Write {
            gpa: gpa(F_MOV),
            data: vec![0xb8]
        }]
    );
}

#[test]
fn a_site_moves_to_the_strictest_handling_its_probes_ask_for() {
    let r = rig();
    let pristine = r.text();
    let e = r.add(ProbeRequest::kprobe("t/e", F_NOP5));
    assert_eq!(r.rows(), [(e, 0, 0, Handling::Emulated, false)]);

    let o = r.add(out_of_line("t/o", F_NOP5));
    assert_eq!(
        r.rows(),
        [
            (e, 0, 0, Handling::OutOfLine, false),
            (o, 0, 0, Handling::OutOfLine, false)
        ]
    );
    assert_ne!(
        r.text()[0x800..0x900],
        pristine[0x800..0x900],
        "slot written"
    );

    let s = r.add(ProbeRequest {
        force_single_step: true,
        ..ProbeRequest::kprobe("t/s", F_NOP5)
    });
    let site = |h| {
        [
            (e, 0, 0, h, false),
            (o, 0, 0, h, false),
            (s, 0, 0, h, false),
        ]
    };
    assert_eq!(r.rows(), site(Handling::SingleStep));
    let mut expected = pristine.clone();
    expected[0] = INT3;
    assert_eq!(r.text(), expected, "the slot went back to the padding");

    // A hit stops the world, puts the original byte back for the step and
    // plants the int3 again.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (vm, log) = (r.vm.clone(), seen.clone());
    let mut v = r
        .vcpu(
            0,
            Regs {
                rip: F_NOP5,
                ..Default::default()
            },
        )
        .on_single_step(move |regs| {
            let byte = vm.mem().read_vec(gpa(regs.rip), 1)[0];
            log.lock()
                .unwrap()
                .push((regs.rip, byte, vm.world_stopped()));
            regs.rip += 5;
            Ok(())
        });
    let stops = r.vm.stops();
    assert_eq!(v.hit(&*r.engine, &*r.vm), BreakpointAction::Resume);
    assert_eq!(*seen.lock().unwrap(), [(F_NOP5, NOP5[0], true)]);
    assert_eq!((v.steps, v.regs.rip), (1, F_NOP5 + 5));
    assert_eq!(r.vm.stops(), stops + 1);
    assert_eq!(r.byte(F_NOP5), INT3);
    let st = r.engine.stats();
    assert_eq!((st.single_stepped, st.emulated, st.out_of_line), (1, 0, 0));
    let mut hit = site(Handling::SingleStep);
    for row in &mut hit {
        row.1 = 1;
    }
    assert_eq!(r.rows(), hit);

    r.engine.unregister_batch(&[e, o, s]).unwrap();
    assert_eq!(r.text(), pristine);
}
