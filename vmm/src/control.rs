//! Stopping the world: parking vCPUs outside guest mode, one stopper at a time,
//! and kicking vCPU threads out of KVM_RUN.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use guest_access::Vcpu;
use kvm_bindings::kvm_run;

/// A request run on a vCPU's own thread.
pub(crate) type Request = Box<dyn FnOnce(&mut dyn Vcpu) + Send>;

/// The stopper id used for stops requested from outside any vCPU thread.
pub(crate) const EXTERNAL: usize = usize::MAX;

pub(crate) struct WorldState {
    /// Who holds the world stopped (a vCPU index or [`EXTERNAL`]).
    pub stopper: Option<usize>,
    /// vCPU threads parked (or waiting to become stopper, which counts as parked).
    pub parked: usize,
    /// vCPU threads running their loop.
    pub alive: usize,
}

pub(crate) struct World {
    pub state: Mutex<WorldState>,
    pub cv: Condvar,
    pub stop_requested: AtomicBool,
    /// Mirror of `WorldState::parked`, so a stopper can spin without the lock.
    pub parked_hint: AtomicUsize,
}

/// Per-vCPU slot visible to other threads.
pub(crate) struct VcpuSlot {
    /// pthread id of the vCPU thread, 0 while not running.
    pub tid: AtomicU64,
    pub requests: Mutex<VecDeque<Request>>,
}

impl World {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(WorldState {
                stopper: None,
                parked: 0,
                alive: 0,
            }),
            cv: Condvar::new(),
            stop_requested: AtomicBool::new(false),
            parked_hint: AtomicUsize::new(0),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, WorldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Become the stopper and wait until every other live vCPU is parked.
    /// `me` is the caller's vCPU index, or None for an outside thread.
    pub fn stop(&self, me: Option<usize>, slots: &[VcpuSlot], stopping: &AtomicBool) {
        let mut st = self.lock();
        // Another stopper first: a vCPU caller counts as parked while it waits.
        if st.stopper.is_some() {
            if me.is_some() {
                st.parked += 1;
                self.parked_hint.store(st.parked, Ordering::SeqCst);
                self.cv.notify_all();
            }
            while st.stopper.is_some() {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if me.is_some() {
                st.parked -= 1;
                self.parked_hint.store(st.parked, Ordering::SeqCst);
            }
        }
        st.stopper = Some(me.unwrap_or(EXTERNAL));
        self.stop_requested.store(true, Ordering::SeqCst);
        let need = st.alive - usize::from(me.is_some() && st.alive > 0);
        if st.parked < need {
            // Kick, then spin briefly: parking takes microseconds, while
            // sleeping on the condvar costs a scheduler round trip each time.
            drop(st);
            kick_all(slots, me);
            let spin_until = std::time::Instant::now() + Duration::from_micros(300);
            while self.parked_hint.load(Ordering::SeqCst) < need
                && std::time::Instant::now() < spin_until
                && !stopping.load(Ordering::SeqCst)
            {
                std::hint::spin_loop();
            }
            st = self.lock();
        }
        loop {
            let need = st.alive - usize::from(me.is_some() && st.alive > 0);
            if st.parked >= need || stopping.load(Ordering::SeqCst) {
                break;
            }
            drop(st);
            kick_all(slots, me);
            st = self.lock();
            let (s, _) = self
                .cv
                .wait_timeout(st, Duration::from_millis(2))
                .unwrap_or_else(|p| p.into_inner());
            st = s;
        }
    }

    /// Let every parked vCPU run again.
    pub fn resume(&self) {
        let mut st = self.lock();
        st.stopper = None;
        self.stop_requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

thread_local! {
    /// The kvm_run area of the vCPU this thread owns, for the kick signal.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit makes the current or the next KVM_RUN return
    // EINTR, so a kick that lands just before KVM_RUN is not lost.
    let _ = KVM_RUN.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mapped kvm_run, set by
            // the vCPU loop and cleared before the mapping goes away.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Install the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
        })
        .clone()
}

/// Register this thread's kvm_run for the kick handler.
pub(crate) fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

pub(crate) fn kick(slot: &VcpuSlot) {
    let tid = slot.tid.load(Ordering::SeqCst);
    if tid != 0 {
        // SAFETY: tid is a live pthread of this process (cleared before exit).
        unsafe {
            libc::pthread_kill(tid as libc::pthread_t, kick_signal());
        }
    }
}

pub(crate) fn kick_all(slots: &[VcpuSlot], except: Option<usize>) {
    for (i, s) in slots.iter().enumerate() {
        if Some(i) != except {
            kick(s);
        }
    }
}
