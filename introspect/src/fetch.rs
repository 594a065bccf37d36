//! What a hit reports: the fetch-argument context of a hit ([`HitContext`]:
//! registers, a page walk, the current task read once) and the building and
//! publishing of events ([`Reporter`]), like `kernel/trace/trace_kprobe.c`.

use std::cell::OnceCell;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use guest_access::Regs;
use probe_spec::{EvalOptions, Fault, FetchContext, ProbeDef, Reg, Value};

use crate::events::{Event, EventBus, EventKind, GuestTask, Interest};
use crate::paging::{Access, GuestVirt};
use crate::stats::Counters;
use crate::symbols::KernelSymbols;
use crate::table::Probe;
use crate::task;

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Fetch-argument context of a hit: registers plus a page walk.
pub(crate) struct HitContext<'a> {
    /// Borrowed, as the walker: a hit copies neither (copies of the
    /// register file showed in the hit path's profile).
    pub regs: &'a Regs,
    pub virt: &'a GuestVirt<'a>,
    symbols: &'a dyn KernelSymbols,
    /// The current task, read at most once per hit (event and `$comm`).
    task: OnceCell<Option<GuestTask>>,
    /// Set when someone wants executable paths: their cache.
    exe: Option<&'a task::ExeCache>,
}

impl<'a> HitContext<'a> {
    pub fn new(regs: &'a Regs, virt: &'a GuestVirt<'a>, symbols: &'a dyn KernelSymbols) -> Self {
        HitContext {
            regs,
            virt,
            symbols,
            task: OnceCell::new(),
            exe: None,
        }
    }

    pub fn with_exe(mut self, exe: Option<&'a task::ExeCache>) -> Self {
        self.exe = exe;
        self
    }

    /// The current task: per-CPU base (GS at CPL0) + current-task pointer,
    /// then `task->pid` and `task->comm`. None outside kernel mode, without
    /// a layout, or when a read faults.
    pub fn current_task(&self) -> Option<GuestTask> {
        self.task.get_or_init(|| self.read_current_task()).clone()
    }

    fn read_current_task(&self) -> Option<GuestTask> {
        let layout = self.symbols.task_layout()?;
        let s = &self.virt.sregs;
        if s.cpl != 0 || s.gs_base == 0 {
            return None;
        }
        let read = |addr: u64, buf: &mut [u8]| self.virt.read(addr, buf, Access::Inspect).ok();
        let mut p = [0u8; 8];
        read(s.gs_base.wrapping_add(layout.current_task_percpu), &mut p)?;
        let task = u64::from_le_bytes(p);
        let mut t = task::identity(&read, &layout, task)?;
        if let (Some(exe), Some(process)) = (self.exe, layout.process) {
            t.exe = exe.lookup(&read, &process, task);
        }
        Some(t)
    }
}

impl FetchContext for HitContext<'_> {
    fn reg(&self, r: Reg) -> u64 {
        let g = self.regs;
        match r {
            Reg::R15 => g.r15,
            Reg::R14 => g.r14,
            Reg::R13 => g.r13,
            Reg::R12 => g.r12,
            Reg::R11 => g.r11,
            Reg::R10 => g.r10,
            Reg::R9 => g.r9,
            Reg::R8 => g.r8,
            Reg::Bx => g.rbx,
            Reg::Cx => g.rcx,
            Reg::Dx => g.rdx,
            Reg::Si => g.rsi,
            Reg::Di => g.rdi,
            Reg::Bp => g.rbp,
            Reg::Ax | Reg::OrigAx => g.rax,
            Reg::Ip => g.rip,
            Reg::Cs => 0x10,
            Reg::Flags => g.rflags,
            Reg::Sp => g.rsp,
            Reg::Ss => 0x18,
        }
    }

    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.virt
            .read(addr, buf, Access::Inspect)
            .map_err(|e| Fault { addr: e.gva() })
    }

    fn symbolize(&self, addr: u64) -> Option<String> {
        self.symbols.describe(addr)
    }

    fn comm(&self) -> Option<String> {
        self.current_task()
            .map(|t| String::from_utf8_lossy(t.comm()).into_owned())
    }
}

/// Turns hits into events on the bus: decides whether a hit is worth
/// fetching, fetches, numbers and publishes, and counts what is lost.
pub(crate) struct Reporter<'a> {
    pub bus: &'a EventBus,
    pub counters: &'a Counters,
    pub max_string_len: usize,
}

impl Reporter<'_> {
    /// An argument list a consumer gave back, or a new one.
    pub fn take_args(&self) -> Vec<Value> {
        self.bus.take_args()
    }

    pub fn has_subscribers(&self) -> bool {
        self.bus.has_subscribers()
    }

    pub fn publish(&self, probe: &Probe, ev: Event) {
        let dropped = self.bus.publish(ev);
        self.count_dropped(probe, dropped);
    }

    fn count_dropped(&self, probe: &Probe, dropped: u64) {
        if dropped > 0 {
            probe.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// The next event's sequence number.
    pub fn next_seq(&self) -> u64 {
        self.counters.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a hit of `probe` is worth fetching. A hit that only finds full
    /// queues is counted lost here, unfetched, and still takes a sequence
    /// number so that gaps keep meaning losses.
    pub fn wants_event(&self, probe: &Probe) -> bool {
        match self.bus.interest(probe.id) {
            Interest::Fetch => true,
            Interest::Nobody => false,
            Interest::Dropped(n) => {
                self.next_seq();
                self.count_dropped(probe, n);
                false
            }
        }
    }

    /// Values of the arguments of `def` that `pick` accepts, in order. Only
    /// values: names and types are the definition's, and sharing them per
    /// event (reference counts touched by vCPU and consumer threads alike)
    /// cost more than the fetch itself. The list is one that a consumer gave
    /// back when there is one (no allocation then).
    pub fn fetch<C: FetchContext + ?Sized>(
        &self,
        def: &ProbeDef,
        ctx: &C,
        pick: impl Fn(&probe_spec::FetchArg) -> bool,
    ) -> Vec<Value> {
        let mut out = self.bus.take_args();
        self.fetch_into(def, ctx, pick, &mut out);
        out
    }

    /// [`Self::fetch`] into `out`, overwriting its values: their string
    /// buffers are read into again, so a list used before allocates nothing.
    pub fn fetch_into<C: FetchContext + ?Sized>(
        &self,
        def: &ProbeDef,
        ctx: &C,
        pick: impl Fn(&probe_spec::FetchArg) -> bool,
        out: &mut Vec<Value>,
    ) {
        let opts = EvalOptions {
            max_string_len: self.max_string_len,
        };
        let mut n = 0;
        for a in def.args.iter().filter(|a| pick(a)) {
            match out.get_mut(n) {
                Some(slot) => {
                    let old = std::mem::replace(slot, Value::Char { value: 0 });
                    *slot = probe_spec::evaluate_value_reusing(a, ctx, &opts, old);
                }
                None => out.push(probe_spec::evaluate_value(a, ctx, &opts)),
            }
            n += 1;
        }
        out.truncate(n);
    }

    /// A kprobe hit: its entry event, if anyone wants it.
    pub fn kprobe_hit(&self, probe: &Probe, ctx: &HitContext<'_>, vcpu: u32) {
        if !self.wants_event(probe) {
            return;
        }
        let ev = self.entry_event(probe, ctx, vcpu);
        self.publish(probe, ev);
    }

    /// A kprobe hit's event, fetched and numbered (not yet published).
    pub fn entry_event(&self, probe: &Probe, ctx: &HitContext<'_>, vcpu: u32) -> Event {
        let args = match &probe.fetch {
            Some(def) => self.fetch(def, ctx, |_| true),
            None => Vec::new(),
        };
        Event {
            probe_id: probe.id,
            seq: self.next_seq(),
            vcpu,
            time_ns: now_ns(),
            ip: probe.address,
            kind: EventKind::Entry,
            task: ctx.current_task(),
            args,
            action: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbols::NoSymbols;
    use crate::task::TaskLayout;
    use guest_access::fake::FakeMemory;
    use guest_access::GuestMemory;
    use guest_access::SystemRegs;

    struct Layout;
    impl KernelSymbols for Layout {
        fn function_at(&self, _: u64) -> Option<(String, u64, u64)> {
            None
        }
        fn task_layout(&self) -> Option<TaskLayout> {
            Some(TaskLayout {
                process: None,
                ..crate::task::tests::LAYOUT
            })
        }
    }

    #[test]
    fn pid_and_comm_of_the_current_task() {
        let ram = FakeMemory::new(1 << 16);
        // per-CPU area at 0x1000; current_task -> task at 0x4000; pid 4242;
        // comm "kworker/0:1".
        ram.write_u64(0x1040, 0x4000);
        ram.write_phys(0x4080, &4242i32.to_le_bytes()).unwrap();
        ram.write_phys(0x4084, &4240i32.to_le_bytes()).unwrap();
        // real_parent -> task at 0x5000 with tgid 2.
        ram.write_u64(0x4090, 0x5000);
        ram.write_phys(0x5084, &2i32.to_le_bytes()).unwrap();
        ram.write_phys(0x4100, b"kworker/0:1\0").unwrap();
        let sregs = SystemRegs {
            gs_base: 0x1000,
            ..Default::default()
        };
        let regs = Regs::default();
        let virt = GuestVirt::new(&ram, sregs, 0);
        let ctx = HitContext::new(&regs, &virt, &Layout);
        assert_eq!(ctx.comm().as_deref(), Some("kworker/0:1"));
        let task = ctx.current_task().unwrap();
        assert_eq!(
            (task.pid, task.tgid, task.ppid, task.comm()),
            (4242, 4240, 2, &b"kworker/0:1"[..])
        );
        // Read once per hit: a later change in guest memory is not seen.
        ram.write_phys(0x4080, &7i32.to_le_bytes()).unwrap();
        assert_eq!(ctx.current_task().unwrap().pid, 4242);
        // Without a GS base (user GS before swapgs) there is no answer.
        let no_gs = GuestVirt::new(&ram, SystemRegs::default(), 0);
        let ctx = HitContext::new(&regs, &no_gs, &Layout);
        assert_eq!(ctx.comm(), None);
        assert_eq!(ctx.current_task(), None);
        // And none without a layout (e.g. System.map only).
        let ctx = HitContext::new(&regs, &virt, &NoSymbols);
        assert_eq!(ctx.comm(), None);
        // Nor when the task pointer leads nowhere.
        ram.write_u64(0x1040, 0xdead_0000_0000);
        let virt = GuestVirt::new(&ram, sregs, 0);
        let ctx = HitContext::new(&regs, &virt, &Layout);
        assert_eq!(ctx.current_task(), None);
    }
}
