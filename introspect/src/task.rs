//! Linux tasks read from guest memory: the identity of the task a hit ran
//! in (pid, tgid, ppid, comm, executable path) and the task list, the way
//! LibVMI's process-list example walks it: `init_task.tasks`, offsets from
//! the kernel's DWARF.
//!
//! Everything here reads through a `read(addr, buf)` callback, so the same
//! code serves a hit (the vCPU's own page walk) and a listing (vCPU 0's
//! paging with the other vCPUs stopped), and tests run it on a fake RAM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// How to find the current task and its identity: a per-CPU pointer
/// (`current_task`, or `pcpu_hot.current_task` since 6.2) read through the
/// kernel's GS base, and offsets in `struct task_struct` (from DWARF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLayout {
    /// Offset of the current-task pointer in the per-CPU area.
    pub current_task_percpu: u64,
    /// `offsetof(struct task_struct, comm)` (a 16-byte name).
    pub comm_offset: u64,
    /// `offsetof(struct task_struct, pid)` (an `int`, the thread id).
    pub pid_offset: u64,
    /// `offsetof(struct task_struct, tgid)` (an `int`, the process id).
    pub tgid_offset: u64,
    /// `offsetof(struct task_struct, real_parent)` (a task pointer; the
    /// parent's tgid is `ppid`, as `getppid()` reports it).
    pub real_parent_offset: u64,
    /// What the task list and executable paths need; None when the DWARF
    /// lacks any of it.
    pub process: Option<ProcessLayout>,
}

/// Offsets for walking the task list and naming a task's executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessLayout {
    /// Address of `init_task` (the idle task, head of the task list).
    pub init_task: u64,
    /// `task_struct.tasks` (the `list_head` of all thread-group leaders).
    pub tasks_offset: u64,
    /// `task_struct.mm` (NULL for kernel threads).
    pub mm_offset: u64,
    /// `task_struct.flags` (`PF_KTHREAD`).
    pub flags_offset: u64,
    /// `task_struct.__state` (`state` before 5.14).
    pub state_offset: u64,
    /// `task_struct.exit_state` (zombie, dead).
    pub exit_state_offset: u64,
    /// `mm_struct.exe_file` (a `struct file *`).
    pub exe_file_offset: u64,
    /// `file.f_path.mnt` and `file.f_path.dentry`.
    pub f_path_mnt_offset: u64,
    pub f_path_dentry_offset: u64,
    /// `dentry.d_parent`, `dentry.d_name.hash_len` and `dentry.d_name.name`.
    pub d_parent_offset: u64,
    pub d_name_hash_len_offset: u64,
    pub d_name_name_offset: u64,
    /// `vfsmount.mnt_root`.
    pub mnt_root_offset: u64,
    /// `mount.mnt` (the `vfsmount` embedded in `struct mount`),
    /// `mount.mnt_parent` and `mount.mnt_mountpoint`.
    pub mount_mnt_offset: u64,
    pub mount_parent_offset: u64,
    pub mount_mountpoint_offset: u64,
}

/// Linux's `PF_KTHREAD`.
const PF_KTHREAD: u32 = 0x0020_0000;
/// Linux's `TASK_IDLE` (`TASK_UNINTERRUPTIBLE | TASK_NOLOAD`), shown as `I`.
const TASK_IDLE: u32 = 0x0402;
/// More tasks than any guest runs: the walk stops there (a corrupt or
/// looping list must not hang the host).
pub const MAX_TASKS: usize = 1 << 16;
/// Path components of one executable path, at most.
const MAX_COMPONENTS: usize = 64;

/// The task a hit ran in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestTask {
    /// `task->pid` (the kernel's thread id; 0 for the idle task).
    pub pid: i32,
    /// `task->tgid` (the process id user space sees).
    pub tgid: i32,
    /// `task->real_parent->tgid` (`getppid()`).
    pub ppid: i32,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; 16],
    /// `task->mm->exe_file`'s path, when asked for and the task has one.
    pub exe: Option<Arc<[u8]>>,
}

impl GuestTask {
    /// The name without its NUL padding.
    pub fn comm(&self) -> &[u8] {
        let end = self.comm.iter().position(|b| *b == 0).unwrap_or(16);
        &self.comm[..end]
    }
}

/// One row of the guest's task list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// Guest address of the `task_struct`.
    pub address: u64,
    pub pid: i32,
    pub tgid: i32,
    pub ppid: i32,
    pub comm: Vec<u8>,
    /// `ps`'s state letter: R S D T t X Z P I.
    pub state: char,
    /// A kernel thread (`PF_KTHREAD`): no user memory, no executable.
    pub kernel_thread: bool,
    /// The executable's path (None for kernel threads).
    pub exe: Option<Vec<u8>>,
}

/// Reads guest kernel memory: `None` when the address does not read.
pub type Read<'a> = dyn Fn(u64, &mut [u8]) -> Option<()> + 'a;

pub(crate) fn u64_at(read: &Read<'_>, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read(addr, &mut b)?;
    Some(u64::from_le_bytes(b))
}

pub(crate) fn u32_at(read: &Read<'_>, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read(addr, &mut b)?;
    Some(u32::from_le_bytes(b))
}

fn i32_at(read: &Read<'_>, addr: u64) -> Option<i32> {
    u32_at(read, addr).map(|v| i32::from_le_bytes(v.to_le_bytes()))
}

/// pid, tgid, ppid and comm of the task at `task`.
pub fn identity(read: &Read<'_>, l: &TaskLayout, task: u64) -> Option<GuestTask> {
    let pid = i32_at(read, task.wrapping_add(l.pid_offset))?;
    let tgid = i32_at(read, task.wrapping_add(l.tgid_offset))?;
    let parent = u64_at(read, task.wrapping_add(l.real_parent_offset))?;
    // init_task is its own parent; its tgid 0 is then the answer, as in Linux.
    let ppid = i32_at(read, parent.wrapping_add(l.tgid_offset)).unwrap_or(0);
    let mut comm = [0u8; 16];
    read(task.wrapping_add(l.comm_offset), &mut comm)?;
    Some(GuestTask {
        pid,
        tgid,
        ppid,
        comm,
        exe: None,
    })
}

/// The key under which an executable path may be cached: the `file` and
/// its dentry and mount (a freed and reused `file` naming another path
/// differs in the dentry). None for a task without user memory.
pub fn exe_key(read: &Read<'_>, p: &ProcessLayout, task: u64) -> Option<ExeKey> {
    let mm = u64_at(read, task.wrapping_add(p.mm_offset))?;
    if mm == 0 {
        return None;
    }
    let file = u64_at(read, mm.wrapping_add(p.exe_file_offset))?;
    if file == 0 {
        return None;
    }
    let mnt = u64_at(read, file.wrapping_add(p.f_path_mnt_offset))?;
    let dentry = u64_at(read, file.wrapping_add(p.f_path_dentry_offset))?;
    Some((file, dentry, mnt))
}

/// The absolute path of (`dentry`, `mnt`), crossing mount points like the
/// kernel's `d_path()`; None when a read faults or the chain is too deep.
pub fn path_of(read: &Read<'_>, p: &ProcessLayout, dentry: u64, vfsmnt: u64) -> Option<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut dentry = dentry;
    let mut vfsmnt = vfsmnt;
    let mut mount = vfsmnt.wrapping_sub(p.mount_mnt_offset);
    for _ in 0..MAX_COMPONENTS * 2 {
        let root = u64_at(read, vfsmnt.wrapping_add(p.mnt_root_offset))?;
        if dentry == root {
            let parent = u64_at(read, mount.wrapping_add(p.mount_parent_offset))?;
            if parent == mount || parent == 0 {
                return Some(join(&names));
            }
            dentry = u64_at(read, mount.wrapping_add(p.mount_mountpoint_offset))?;
            mount = parent;
            vfsmnt = mount.wrapping_add(p.mount_mnt_offset);
            continue;
        }
        let parent = u64_at(read, dentry.wrapping_add(p.d_parent_offset))?;
        if parent == dentry {
            // The root of a file system that is not the mount's root
            // (a detached mount): what d_path would mark unreachable.
            return Some(join(&names));
        }
        let hash_len = u64_at(read, dentry.wrapping_add(p.d_name_hash_len_offset))?;
        let len = usize::try_from(hash_len >> 32).ok()?.min(255);
        let name_ptr = u64_at(read, dentry.wrapping_add(p.d_name_name_offset))?;
        let mut name = vec![0u8; len];
        read(name_ptr, &mut name)?;
        names.push(name);
        if names.len() > MAX_COMPONENTS {
            return None;
        }
        dentry = parent;
    }
    None
}

fn join(rev: &[Vec<u8>]) -> Vec<u8> {
    if rev.is_empty() {
        return b"/".to_vec();
    }
    let mut out = Vec::new();
    for n in rev.iter().rev() {
        out.push(b'/');
        out.extend_from_slice(n);
    }
    out
}

/// The executable path of the task at `task` (uncached).
pub fn exe_path(read: &Read<'_>, p: &ProcessLayout, task: u64) -> Option<Vec<u8>> {
    let (_, dentry, mnt) = exe_key(read, p, task)?;
    path_of(read, p, dentry, mnt)
}

/// `ps`'s letter for `__state | exit_state`, as the kernel's
/// `task_state_index()` maps it.
pub fn state_letter(state: u32, exit_state: u32) -> char {
    if state == TASK_IDLE {
        return 'I';
    }
    let bits = (state | exit_state) & 0x7f;
    // fls(): index of the highest set bit, 1-based; 0 for running.
    let index = 32 - bits.leading_zeros();
    b"RSDTtXZP"
        .get(index as usize)
        .map_or('?', |c| char::from(*c))
}

/// Executable paths by (`file`, dentry, mount): one path walk per
/// executable, not per hit. Bounded: it starts over past [`ExeCache::MAX`].
#[derive(Default)]
pub struct ExeCache {
    paths: Mutex<HashMap<ExeKey, Arc<[u8]>>>,
}

/// (`file`, dentry, vfsmount) of an executable.
type ExeKey = (u64, u64, u64);

impl ExeCache {
    pub const MAX: usize = 4096;

    /// The executable path of the task at `task`, from the cache when its
    /// (file, dentry, mount) was seen before.
    pub fn lookup(&self, read: &Read<'_>, p: &ProcessLayout, task: u64) -> Option<Arc<[u8]>> {
        let key = exe_key(read, p, task)?;
        if let Some(path) = self.lock().get(&key) {
            return Some(path.clone());
        }
        let path: Arc<[u8]> = path_of(read, p, key.1, key.2)?.into();
        let mut paths = self.lock();
        if paths.len() >= Self::MAX {
            paths.clear();
        }
        paths.insert(key, path.clone());
        Some(path)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ExeKey, Arc<[u8]>>> {
        self.paths.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why the task list could not be walked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskListError {
    #[error("cannot read the task_struct at {addr:#x} (task {index} of the list)")]
    Unreadable { addr: u64, index: usize },
    #[error("the task list does not return to init_task within {MAX_TASKS} tasks")]
    TooLong,
}

/// Every thread-group leader on `init_task.tasks`, in list order (the idle
/// task itself is not listed, as `ps` does not list it).
pub fn list(read: &Read<'_>, l: &TaskLayout) -> Result<Vec<TaskInfo>, TaskListError> {
    let Some(p) = l.process else {
        return Ok(Vec::new());
    };
    let head = p.init_task.wrapping_add(p.tasks_offset);
    let mut out = Vec::new();
    let mut node = head;
    loop {
        let next = u64_at(read, node).ok_or(TaskListError::Unreadable {
            addr: node.wrapping_sub(p.tasks_offset),
            index: out.len(),
        })?;
        if next == head {
            return Ok(out);
        }
        if out.len() >= MAX_TASKS {
            return Err(TaskListError::TooLong);
        }
        let task = next.wrapping_sub(p.tasks_offset);
        let unreadable = TaskListError::Unreadable {
            addr: task,
            index: out.len(),
        };
        let id = identity(read, l, task).ok_or_else(|| unreadable.clone())?;
        let flags =
            u32_at(read, task.wrapping_add(p.flags_offset)).ok_or_else(|| unreadable.clone())?;
        let state =
            u32_at(read, task.wrapping_add(p.state_offset)).ok_or_else(|| unreadable.clone())?;
        let exit_state = u32_at(read, task.wrapping_add(p.exit_state_offset)).unwrap_or(0);
        let kernel_thread = flags & PF_KTHREAD != 0;
        out.push(TaskInfo {
            address: task,
            pid: id.pid,
            tgid: id.tgid,
            ppid: id.ppid,
            comm: id.comm().to_vec(),
            state: state_letter(state, exit_state),
            kernel_thread,
            exe: if kernel_thread {
                None
            } else {
                exe_path(read, &p, task)
            },
        });
        node = next;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Sparse little-endian memory for building kernel structures.
    #[derive(Default)]
    pub(crate) struct Mem(RefCell<HashMap<u64, u8>>);

    impl Mem {
        pub(crate) fn put(&self, addr: u64, bytes: &[u8]) {
            let mut m = self.0.borrow_mut();
            for (i, b) in bytes.iter().enumerate() {
                m.insert(addr + i as u64, *b);
            }
        }
        pub(crate) fn q(&self, addr: u64, v: u64) {
            self.put(addr, &v.to_le_bytes());
        }
        pub(crate) fn d(&self, addr: u64, v: u32) {
            self.put(addr, &v.to_le_bytes());
        }
        pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> Option<()> {
            let m = self.0.borrow();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *m.get(&(addr + i as u64))?;
            }
            Some(())
        }
    }

    pub(crate) const LAYOUT: TaskLayout = TaskLayout {
        current_task_percpu: 0x40,
        comm_offset: 0x100,
        pid_offset: 0x80,
        tgid_offset: 0x84,
        real_parent_offset: 0x90,
        process: Some(ProcessLayout {
            init_task: 0x10_0000,
            tasks_offset: 0x20,
            mm_offset: 0x30,
            flags_offset: 0x10,
            state_offset: 0x18,
            exit_state_offset: 0x1c,
            exe_file_offset: 0x40,
            f_path_mnt_offset: 0x10,
            f_path_dentry_offset: 0x18,
            d_parent_offset: 0x18,
            d_name_hash_len_offset: 0x20,
            d_name_name_offset: 0x28,
            mnt_root_offset: 0x0,
            mount_mnt_offset: 0x20,
            mount_parent_offset: 0x10,
            mount_mountpoint_offset: 0x18,
        }),
    };

    /// A dentry named `name` under `parent` (itself when root).
    fn dentry(m: &Mem, at: u64, parent: u64, name: &[u8]) {
        let p = LAYOUT.process.unwrap();
        m.q(
            at + p.d_parent_offset,
            if parent == 0 { at } else { parent },
        );
        m.q(
            at + p.d_name_hash_len_offset,
            (name.len() as u64) << 32 | 0xabcd,
        );
        m.q(at + p.d_name_name_offset, at + 0x100);
        m.put(at + 0x100, name);
    }

    /// A `struct mount` at `at` whose root dentry is `root`, mounted on
    /// `mountpoint` of `parent` (itself for the root mount).
    fn mount(m: &Mem, at: u64, root: u64, parent: u64, mountpoint: u64) {
        let p = LAYOUT.process.unwrap();
        m.q(at + p.mount_mnt_offset + p.mnt_root_offset, root);
        m.q(
            at + p.mount_parent_offset,
            if parent == 0 { at } else { parent },
        );
        m.q(at + p.mount_mountpoint_offset, mountpoint);
    }

    /// init_task → a kernel thread (pid 2) → `sh` (pid 7, /bin/sh on the
    /// root mount) → `tool` (pid 9, child of 7, /mnt/x/tool on a second
    /// mount at /mnt/x), back to init_task.
    pub(crate) fn guest() -> Mem {
        let m = Mem::default();
        let l = LAYOUT;
        let p = l.process.unwrap();
        // Root fs: / (0x3000) → bin (0x3200) → sh (0x3400); mnt (0x3600) → x (0x3800).
        dentry(&m, 0x3000, 0, b"/");
        dentry(&m, 0x3200, 0x3000, b"bin");
        dentry(&m, 0x3400, 0x3200, b"sh");
        dentry(&m, 0x3600, 0x3000, b"mnt");
        dentry(&m, 0x3800, 0x3600, b"x");
        mount(&m, 0x5000, 0x3000, 0, 0);
        // Second fs: its root (0x4000) → tool (0x4200), mounted on /mnt/x.
        dentry(&m, 0x4000, 0, b"/");
        dentry(&m, 0x4200, 0x4000, b"tool");
        mount(&m, 0x5400, 0x4000, 0x5000, 0x3800);
        let file = |at: u64, dentry: u64, mount: u64| {
            m.q(at + p.f_path_mnt_offset, mount + p.mount_mnt_offset);
            m.q(at + p.f_path_dentry_offset, dentry);
        };
        file(0x6000, 0x3400, 0x5000);
        file(0x6100, 0x4200, 0x5400);
        m.q(0x7000 + p.exe_file_offset, 0x6000);
        m.q(0x7100 + p.exe_file_offset, 0x6100);
        let task = |at: u64, pid: i32, tgid: i32, parent: u64, comm: &[u8], mm: u64, next: u64| {
            m.d(at + l.pid_offset, pid as u32);
            m.d(at + l.tgid_offset, tgid as u32);
            m.q(at + l.real_parent_offset, parent);
            let mut c = [0u8; 16];
            c[..comm.len()].copy_from_slice(comm);
            m.put(at + l.comm_offset, &c);
            m.q(at + p.mm_offset, mm);
            m.q(at + p.tasks_offset, next + p.tasks_offset);
            m.d(at + p.flags_offset, if mm == 0 { PF_KTHREAD } else { 0 });
            m.d(at + p.state_offset, 1);
            m.d(at + p.exit_state_offset, 0);
        };
        let init = p.init_task;
        task(init, 0, 0, init, b"swapper/0", 0, 0x20_0000);
        task(0x20_0000, 2, 2, init, b"kthreadd", 0, 0x21_0000);
        task(0x21_0000, 7, 7, init, b"sh", 0x7000, 0x22_0000);
        task(0x22_0000, 9, 9, 0x21_0000, b"tool", 0x7100, init);
        m.d(0x22_0000 + p.state_offset, 0);
        m
    }

    #[test]
    fn identity_reads_the_parents_tgid() {
        let m = guest();
        let read = |a: u64, b: &mut [u8]| m.read(a, b);
        let t = identity(&read, &LAYOUT, 0x22_0000).unwrap();
        assert_eq!((t.pid, t.tgid, t.ppid, t.comm()), (9, 9, 7, &b"tool"[..]));
        assert_eq!(identity(&read, &LAYOUT, 0xdead_0000), None);
    }

    #[test]
    fn exe_paths_cross_mount_points() {
        let m = guest();
        let read = |a: u64, b: &mut [u8]| m.read(a, b);
        let p = LAYOUT.process.unwrap();
        assert_eq!(exe_path(&read, &p, 0x21_0000).unwrap(), b"/bin/sh");
        assert_eq!(exe_path(&read, &p, 0x22_0000).unwrap(), b"/mnt/x/tool");
        // Kernel threads have no mm, hence no executable.
        assert_eq!(exe_path(&read, &p, 0x20_0000), None);
        // A dentry chain that loops without reaching a root is refused.
        dentry(&m, 0x9000, 0x9100, b"a");
        dentry(&m, 0x9100, 0x9000, b"b");
        assert_eq!(
            path_of(&read, &p, 0x9000, 0x5000 + p.mount_mnt_offset),
            None
        );
    }

    #[test]
    fn the_task_list_walks_back_to_init_task() {
        let m = guest();
        let read = |a: u64, b: &mut [u8]| m.read(a, b);
        let tasks = list(&read, &LAYOUT).unwrap();
        let rows: Vec<_> = tasks
            .iter()
            .map(|t| {
                (
                    t.pid,
                    t.ppid,
                    &t.comm[..],
                    t.state,
                    t.kernel_thread,
                    t.exe.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (2, 0, &b"kthreadd"[..], 'S', true, None),
                (7, 0, &b"sh"[..], 'S', false, Some(&b"/bin/sh"[..])),
                (9, 7, &b"tool"[..], 'R', false, Some(&b"/mnt/x/tool"[..])),
            ]
        );
        // A broken link is reported with the task that could not be read.
        let p = LAYOUT.process.unwrap();
        m.q(0x21_0000 + p.tasks_offset, 0xbad_0000 + p.tasks_offset);
        assert_eq!(
            list(&read, &LAYOUT),
            Err(TaskListError::Unreadable {
                addr: 0xbad_0000,
                index: 2
            })
        );
        // A cycle that never returns to init_task ends at the bound.
        m.q(0x21_0000 + p.tasks_offset, 0x21_0000 + p.tasks_offset);
        assert_eq!(list(&read, &LAYOUT), Err(TaskListError::TooLong));
    }

    #[test]
    fn state_letters_match_the_kernel() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(4, 0), 'T');
        assert_eq!(state_letter(0x402, 0), 'I');
        assert_eq!(state_letter(0, 0x20), 'Z');
    }
}
