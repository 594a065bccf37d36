//! Stopping the world: parking vCPUs outside guest mode, one stopper at a time,
//! and kicking vCPU threads out of KVM_RUN.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// What a vCPU thread is doing, as other threads see it (compare
/// Firecracker's vCPU state machine). Only the vCPU's own thread changes
/// it, always under its `VcpuSlot`'s run lock:
///
/// ```text
/// NotStarted --thread starts its loop--> Running
/// Running --BreakpointHandler::on_breakpoint--> InHandler --returns--> Running
/// Running --checkpoint while another thread stops the world--> Parked
/// Parked --the stopper resumes the world (or the VM stops)--> Running
/// Running --loop ends (guest exit, crash, host stop)--> Exited
/// ```
///
/// `Exited` is final and is set before the thread returns, so a kick (which
/// takes the same lock) never signals a thread that has been, or is being,
/// joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// The VM was created but its vCPU threads not started.
    NotStarted,
    /// In the run loop: in KVM_RUN, serving an exit or a request.
    Running,
    /// In the breakpoint handler (a trap of this vCPU is being handled).
    InHandler,
    /// Parked at a checkpoint while another thread holds the world stopped.
    Parked,
    /// The thread left its loop; it takes no more kicks or requests.
    Exited,
}

/// The run state and, while the thread is in its loop, its pthread handle.
struct VcpuThread {
    state: VcpuRunState,
    /// Set with `Running` by the thread itself, cleared with `Exited`.
    pthread: Option<libc::pthread_t>,
}

/// Per-vCPU slot visible to other threads.
pub(crate) struct VcpuSlot {
    run: Mutex<VcpuThread>,
    pub requests: Mutex<VecDeque<Request>>,
}

impl VcpuSlot {
    pub fn new() -> Self {
        Self {
            run: Mutex::new(VcpuThread {
                state: VcpuRunState::NotStarted,
                pthread: None,
            }),
            requests: Mutex::new(VecDeque::new()),
        }
    }

    fn thread(&self) -> MutexGuard<'_, VcpuThread> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VcpuRunState {
        self.thread().state
    }

    /// Called by the vCPU thread as it enters its loop.
    pub fn enter(&self) {
        let mut t = self.thread();
        debug_assert_eq!(t.state, VcpuRunState::NotStarted);
        t.state = VcpuRunState::Running;
        t.pthread = Some(current_pthread());
    }

    /// Called by the vCPU thread for the transitions between `Running`,
    /// `InHandler` and `Parked`.
    pub fn set(&self, state: VcpuRunState) {
        debug_assert!(!matches!(
            state,
            VcpuRunState::NotStarted | VcpuRunState::Exited
        ));
        let mut t = self.thread();
        // A runner driven outside its loop (the dispatch tests) keeps its
        // state.
        if t.pthread.is_some() {
            t.state = state;
        }
    }

    /// Called by the vCPU thread as it leaves its loop, before it returns:
    /// from here on no kick targets it.
    pub fn exit(&self) {
        let mut t = self.thread();
        t.state = VcpuRunState::Exited;
        t.pthread = None;
    }

    /// Queue `req` for the vCPU thread, unless it is not in its loop (then
    /// `req` comes back). The thread drops what is queued after it marks
    /// itself `Exited`, so a queued request is either served or dropped.
    pub fn submit(&self, req: Request) -> Result<(), Request> {
        let t = self.thread();
        if t.pthread.is_none() {
            return Err(req);
        }
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(req);
        Ok(())
    }

    /// Signal the vCPU thread out of KVM_RUN. Returns whether a signal was
    /// sent (false when the thread is not in its loop).
    pub fn kick(&self) -> bool {
        let t = self.thread();
        let Some(thread) = t.pthread else {
            return false;
        };
        // SAFETY: `thread` is the pthread_self() of a thread that is still
        // inside its loop: it clears `pthread` under this lock (held here
        // until after the call) before it returns, and it cannot be joined
        // before it returns. So the handle names a live, unjoined thread of
        // this process, never a reused one. The signal's handler
        // (`on_kick`) is installed before any vCPU thread starts.
        let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
        rc == 0
    }
}

/// This thread's pthread handle.
fn current_pthread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
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

    /// Whether every vCPU but the stopper's own is outside KVM_RUN now: the
    /// world is stopped, or no vCPU thread runs (before start, after the end).
    pub fn is_stopped(&self) -> bool {
        let st = self.lock();
        if st.alive == 0 {
            return true;
        }
        match st.stopper {
            None => false,
            Some(who) => st.parked >= st.alive - usize::from(who != EXTERNAL),
        }
    }

    /// Wait (up to `timeout`) until no vCPU thread runs its loop: for a VM
    /// whose run has ended, whose threads are on their way out.
    pub fn wait_gone(&self, timeout: Duration) {
        let st = self.lock();
        let waited = self.cv.wait_timeout_while(st, timeout, |st| st.alive > 0);
        drop(waited);
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
            // SAFETY: KVM_RUN is thread-local, so `run` is the kvm_run page
            // of the vCPU fd this very thread owns; the loop clears it before
            // the fd (and the mmap) is dropped, so non-null means mapped. The
            // signal interrupts this thread only, so no other code of ours
            // holds a Rust reference into the page across the write; KVM
            // reads `immediate_exit` at the next KVM_RUN.
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

pub(crate) fn kick_all(slots: &[VcpuSlot], except: Option<usize>) {
    for (i, s) in slots.iter().enumerate() {
        if Some(i) != except {
            s.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Kicks racing with vCPU-like threads that enter, leave their loop and
    /// are joined, over and over (so pthread handles get reused): a kick is
    /// only ever sent to a thread between `enter` and `exit`, never to a
    /// joined one, and the kicked threads survive the signal.
    #[test]
    fn kicks_never_reach_a_joined_thread() {
        install_kick_handler().unwrap();
        let slot = Arc::new(VcpuSlot::new());
        let done = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let kickers: Vec<_> = (0..2)
            .map(|_| {
                let (slot, done, sent) = (slot.clone(), done.clone(), sent.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        if slot.kick() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        // Leave the lock free now and then: back-to-back
                        // kicks under it would starve the thread's own
                        // `enter`/`exit` (each signal restarts its wait).
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    }
                })
            })
            .collect();
        for round in 0..300 {
            // A fresh slot state for every "vCPU thread", as a new VM would have.
            *slot.thread() = VcpuThread {
                state: VcpuRunState::NotStarted,
                pthread: None,
            };
            let s = slot.clone();
            let t = std::thread::spawn(move || {
                s.enter();
                for _ in 0..(round % 50) * 100 {
                    std::hint::spin_loop();
                }
                s.set(VcpuRunState::Parked);
                s.set(VcpuRunState::Running);
                s.exit();
            });
            t.join().unwrap();
            assert_eq!(slot.state(), VcpuRunState::Exited);
            assert!(!slot.kick(), "a kick went to joined thread {round}");
            assert!(slot.submit(Box::new(|_| {})).is_err());
        }
        done.store(true, Ordering::Relaxed);
        for k in kickers {
            k.join().unwrap();
        }
        // The race was exercised (the count varies with scheduling).
        tracing::debug!("{} kicks sent", sent.load(Ordering::Relaxed));
    }
}
