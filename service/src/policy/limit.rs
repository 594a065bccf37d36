//! A policy's rate limit: at most N events per fixed window (aligned to the
//! Unix epoch, on the events' own timestamps) for each key of its scope.
//! Runs on vCPU threads: one short mutex hold per decision, no allocation
//! once a key has its window, and a bounded number of keys.

use std::collections::HashMap;
use std::sync::Mutex;

use introspect::GuestTask;
use proto::v1;

/// Whose events are counted together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Per guest task (`task->pid`, a thread).
    Task,
    /// Per guest process (`task->tgid`).
    Process,
    /// All events of the policy.
    Global,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s.trim() {
            "task" => Some(Scope::Task),
            "process" => Some(Scope::Process),
            "global" => Some(Scope::Global),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Task => "task",
            Scope::Process => "process",
            Scope::Global => "global",
        }
    }

    pub fn to_proto(self) -> v1::RateLimitScope {
        match self {
            Scope::Task => v1::RateLimitScope::Task,
            Scope::Process => v1::RateLimitScope::Process,
            Scope::Global => v1::RateLimitScope::Global,
        }
    }
}

/// Most keys (tasks or processes) with a window of their own; beyond, keys
/// whose window has passed are forgotten, and if all are current the new
/// key shares one overflow window (counted, never unbounded memory).
pub const MAX_KEYS: usize = 4096;

/// Key of events whose task is unknown (no task_struct layout).
const UNKNOWN: i64 = i64::MIN;
/// The shared window of keys beyond `MAX_KEYS`.
const OVERFLOW: i64 = i64::MIN + 1;

#[derive(Clone, Copy, Debug)]
struct Window {
    index: u64,
    count: u64,
}

/// The rate limiter of one policy.
#[derive(Debug)]
pub struct Limiter {
    events: u64,
    window_ns: u64,
    scope: Scope,
    windows: Mutex<HashMap<i64, Window>>,
}

impl Limiter {
    pub fn new(events: u64, window_ns: u64, scope: Scope) -> Limiter {
        Limiter {
            events,
            window_ns: window_ns.max(1),
            scope,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, task: Option<&GuestTask>) -> i64 {
        match (self.scope, task) {
            (Scope::Global, _) => 0,
            (Scope::Task, Some(t)) => i64::from(t.pid),
            (Scope::Process, Some(t)) => i64::from(t.tgid),
            (_, None) => UNKNOWN,
        }
    }

    /// Whether an event at `time_ns` of `task` may pass (it is counted in
    /// its window if so).
    pub fn admit(&self, time_ns: u64, task: Option<&GuestTask>) -> bool {
        let index = time_ns / self.window_ns;
        let mut key = self.key(task);
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if !w.contains_key(&key) && w.len() >= MAX_KEYS {
            w.retain(|_, v| v.index >= index);
            if w.len() >= MAX_KEYS {
                key = OVERFLOW;
            }
        }
        let win = w.entry(key).or_insert(Window { index, count: 0 });
        if win.index != index {
            // A later window (events of one key come from one vCPU at a
            // time, and an earlier straggler counts in the current one).
            if index > win.index {
                *win = Window { index, count: 0 };
            }
        }
        if win.count < self.events {
            win.count += 1;
            true
        } else {
            false
        }
    }

    /// Keys that have a window now.
    pub fn keys(&self) -> usize {
        self.windows.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: i32, tgid: i32) -> GuestTask {
        GuestTask {
            pid,
            tgid,
            ppid: 1,
            comm: *b"t\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            exe: None,
        }
    }

    const S: u64 = 1_000_000_000;

    /// Admitted of `n` events per task in `tasks`, all in one window.
    fn run(l: &Limiter, tasks: &[GuestTask], n: usize) -> usize {
        let mut ok = 0;
        for i in 0..n {
            for t in tasks {
                ok += usize::from(l.admit(10 * S + i as u64, Some(t)));
            }
        }
        ok
    }

    #[test]
    fn task_scope_counts_each_thread() {
        // Two threads of one process, and a second process.
        let tasks = [task(10, 10), task(11, 10), task(20, 20)];
        let l = Limiter::new(3, S, Scope::Task);
        assert_eq!(run(&l, &tasks, 5), 9);
        assert_eq!(l.keys(), 3);
    }

    #[test]
    fn process_scope_counts_threads_together() {
        let tasks = [task(10, 10), task(11, 10), task(20, 20)];
        let l = Limiter::new(3, S, Scope::Process);
        assert_eq!(run(&l, &tasks, 5), 6);
        assert_eq!(l.keys(), 2);
    }

    #[test]
    fn global_scope_counts_everything_together() {
        let tasks = [task(10, 10), task(11, 10), task(20, 20)];
        let l = Limiter::new(3, S, Scope::Global);
        assert_eq!(run(&l, &tasks, 5), 3);
        assert_eq!(l.keys(), 1);
    }

    #[test]
    fn windows_start_afresh_and_unknown_tasks_share_one() {
        let l = Limiter::new(2, S, Scope::Task);
        let t = task(5, 5);
        let got: Vec<bool> = [0, 1, 2, S - 1, S, S + 1, S + 2, 3 * S]
            .iter()
            .map(|&ns| l.admit(ns, Some(&t)))
            .collect();
        assert_eq!(got, [true, true, false, false, true, true, false, true]);
        // An earlier straggler counts in the current window.
        assert!(!l.admit(3 * S, Some(&t)) || !l.admit(2 * S, Some(&t)));
        let u = Limiter::new(1, S, Scope::Process);
        assert!(u.admit(0, None));
        assert!(!u.admit(1, None));
        assert!(u.admit(2, Some(&t)));
    }

    #[test]
    fn keys_are_bounded() {
        let l = Limiter::new(1, S, Scope::Task);
        for pid in 0..(i32::try_from(MAX_KEYS).unwrap() + 100) {
            l.admit(0, Some(&task(pid, pid)));
        }
        assert!(l.keys() <= MAX_KEYS + 1, "{}", l.keys());
        // In the next window old keys are forgotten to make room.
        assert!(l.admit(S, Some(&task(1_000_000, 1))));
        assert!(l.keys() <= MAX_KEYS + 1);
    }
}
