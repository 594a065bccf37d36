//! A minimal KVM VMM for hvprobe.
//!
//! Boots a Linux guest (PVH entry of an ELF `vmlinux`, or a bzImage) with an
//! initrd and command line, N vCPUs (ACPI MADT), the in-kernel irqchip and PIT
//! and a 16550 console. One thread per vCPU owns its fd. Every `int3` trap,
//! whether KVM reports it as a debug exit or (on instruction-emulating KVM) as
//! an emulation failure, reaches one [`guest_access::BreakpointHandler`].
//! The VMM knows nothing about probes.

mod acpi;
mod bridge;
mod control;
mod cpu;
mod debug;
pub mod detect;
mod devices;
mod gaps;
pub mod layout;
mod loader;
mod memory;
pub mod snapshot;
pub mod snapshot_state;
mod vcpu;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_access::{AccessError, BreakpointHandler, GuestMemory, StopGuard, VcpuTask, VmControl};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use bridge::{BridgeMode, BridgeStatus};
pub use devices::{SerialOutput, EXIT_PORT, MARKER_PORT};
pub use loader::{BootEntry, KernelFormat, LoadError, LoadedKernel};
pub use memory::GuestRam;

pub use control::VcpuRunState;
use control::{VcpuSlot, World};

/// What to boot and how.
#[derive(Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub serial: SerialOutput,
    /// The KVM device (normally /dev/kvm).
    pub kvm_device: PathBuf,
    /// The system-call bridge for hosts that need it (see `bridge.rs`).
    pub syscall_bridge: BridgeMode,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 256,
            serial: SerialOutput::Stdout,
            kvm_device: PathBuf::from("/dev/kvm"),
            syscall_bridge: BridgeMode::Auto,
        }
    }
}

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote its exit status to [`EXIT_PORT`].
    GuestExit { status: u32 },
    /// ACPI power-off (S5).
    PowerOff,
    /// The guest reset itself (reboot, or a panic with `panic=-1`).
    Reset { how: &'static str },
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: usize },
    /// The VMM could not continue the guest.
    Crashed { vcpu: usize, reason: String },
    /// The host stopped the VM.
    Stopped,
}

impl RunOutcome {
    /// Process exit code for `hvprobe run`: the guest's own status when it
    /// reported one, 0 for a power-off, and distinct codes for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::GuestExit { status } => {
                if *status == 0 {
                    0
                } else {
                    (*status & 0x7f).max(1) as i32
                }
            }
            RunOutcome::PowerOff => 0,
            RunOutcome::Stopped => 0,
            RunOutcome::Reset { .. } => 130,
            RunOutcome::TripleFault { .. } => 131,
            RunOutcome::Crashed { .. } => 132,
        }
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::GuestExit { status } => write!(f, "guest exited with status {status}"),
            RunOutcome::PowerOff => write!(f, "guest powered off"),
            RunOutcome::Reset { how } => write!(f, "guest reset ({how})"),
            RunOutcome::TripleFault { vcpu } => write!(f, "guest triple-faulted on vCPU {vcpu}"),
            RunOutcome::Crashed { vcpu, reason } => {
                write!(f, "guest stopped on vCPU {vcpu}: {reason}")
            }
            RunOutcome::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// Errors creating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {cause}")]
    KvmOpen { path: PathBuf, cause: String },
    #[error("{op} failed: {cause}")]
    Kvm { op: &'static str, cause: String },
    #[error("vCPU count must be between 1 and {max}, got {got}")]
    BadVcpuCount { got: u8, max: u8 },
    #[error("guest memory must be between {min} and {max} MiB, got {got} MiB")]
    BadMemory { got: u64, min: u64, max: u64 },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Setup(String),
}

fn kvm_open_error(path: &Path, e: &kvm_ioctls::Error) -> VmError {
    let cause = match e.errno() {
        libc::ENOENT => {
            "no such device: is KVM available on this host (kvm_intel/kvm_amd loaded)?".to_string()
        }
        libc::EACCES | libc::EPERM => {
            "permission denied: run as root or join the group that owns the device (usually 'kvm')"
                .to_string()
        }
        libc::ENOTTY | libc::EINVAL => "not a KVM device (KVM_GET_API_VERSION failed)".to_string(),
        _ => e.to_string(),
    };
    VmError::KvmOpen {
        path: path.to_owned(),
        cause,
    }
}

/// Per-vCPU exit counters.
#[derive(Default)]
pub(crate) struct VcpuStats {
    pub exits: AtomicU64,
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub breakpoints: AtomicU64,
    pub single_steps: AtomicU64,
    pub kicks: AtomicU64,
    pub gaps: AtomicU64,
    pub bridge_syscalls: AtomicU64,
    pub bridge_int80: AtomicU64,
    pub bridge_faults_passed: AtomicU64,
    pub bridge_step_fallbacks: AtomicU64,
    pub bridge_rearms: AtomicU64,
    pub bridge_no_pf_handler: AtomicU64,
}

/// What the system-call bridge did, summed over vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// User `syscall`s completed by the VMM.
    pub syscalls: u64,
    /// User `int $0x80`s routed from #UD to the IDT[0x80] handler.
    pub int80: u64,
    /// Genuine #PF/#UD passed on to the guest's handler.
    pub faults_passed: u64,
    /// Of those, handler entries single-stepped because the emulator refused.
    pub step_fallbacks: u64,
    /// Times a vCPU re-armed its breakpoints after the guest IDT changed.
    pub rearms: u64,
    /// Times a vCPU found its IDT without a usable #PF gate and disarmed.
    pub no_pf_handler: u64,
}

/// Exit counters summed over all vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// All returns from KVM_RUN, including kicks.
    pub exits: u64,
    pub io: u64,
    pub mmio: u64,
    /// `int3` traps handed to the breakpoint handler.
    pub breakpoints: u64,
    pub single_steps: u64,
    /// KVM_RUN interrupted by the host (pause, requests).
    pub kicks: u64,
    /// Instructions KVM could not emulate that the VMM completed.
    pub gap_instructions: u64,
    /// The system-call bridge (all zero when it is off).
    pub bridge: BridgeStats,
}

/// State shared by the vCPU threads and the VM handle.
pub struct Shared {
    ram: GuestRam,
    bus: Mutex<devices::PortBus>,
    world: World,
    slots: Vec<VcpuSlot>,
    stats: Vec<VcpuStats>,
    stopping: AtomicBool,
    outcome: Mutex<Option<RunOutcome>>,
    outcome_cv: Condvar,
    handler: OnceLock<Arc<dyn BreakpointHandler>>,
    blockirq_flag: u32,
    markers: Mutex<Vec<(u32, std::time::Instant)>>,
    bridge: BridgeStatus,
    /// vCPU 0's system registers from a snapshot, until its thread runs.
    saved_sregs: Option<guest_access::SystemRegs>,
}

impl Shared {
    fn handler(&self) -> &dyn BreakpointHandler {
        match self.handler.get() {
            Some(h) => &**h,
            None => &guest_access::NoProbes,
        }
    }

    /// Record how the run ended (first one wins) and stop every vCPU.
    fn finish(&self, o: RunOutcome) {
        {
            let mut g = self.outcome.lock().unwrap();
            if g.is_none() {
                tracing::debug!("run ends: {o}");
                *g = Some(o);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.outcome_cv.notify_all();
        // Wake parked vCPUs and stoppers waiting on them.
        {
            let _st = self.world.lock();
            self.world.cv.notify_all();
        }
        control::kick_all(&self.slots, None);
    }

    /// Stop the guest from any thread (as [`RunningVm::stop`]).
    pub fn stop(&self) {
        self.finish(RunOutcome::Stopped);
    }

    /// Exit counters summed over vCPUs.
    pub fn exit_stats(&self) -> ExitStats {
        let mut s = ExitStats::default();
        for v in &self.stats {
            s.exits += v.exits.load(Ordering::Relaxed);
            s.io += v.io.load(Ordering::Relaxed);
            s.mmio += v.mmio.load(Ordering::Relaxed);
            s.breakpoints += v.breakpoints.load(Ordering::Relaxed);
            s.single_steps += v.single_steps.load(Ordering::Relaxed);
            s.kicks += v.kicks.load(Ordering::Relaxed);
            s.gap_instructions += v.gaps.load(Ordering::Relaxed);
            let b = &mut s.bridge;
            b.syscalls += v.bridge_syscalls.load(Ordering::Relaxed);
            b.int80 += v.bridge_int80.load(Ordering::Relaxed);
            b.faults_passed += v.bridge_faults_passed.load(Ordering::Relaxed);
            b.step_fallbacks += v.bridge_step_fallbacks.load(Ordering::Relaxed);
            b.rearms += v.bridge_rearms.load(Ordering::Relaxed);
            b.no_pf_handler += v.bridge_no_pf_handler.load(Ordering::Relaxed);
        }
        s
    }

    /// What vCPU `index`'s thread is doing (None: no such vCPU).
    pub fn vcpu_run_state(&self, index: usize) -> Option<VcpuRunState> {
        self.slots.get(index).map(VcpuSlot::state)
    }

    /// Whether the system-call bridge runs in this VM, and why.
    pub fn bridge_status(&self) -> &BridgeStatus {
        &self.bridge
    }

    fn record_marker(&self, tag: u32) {
        self.markers
            .lock()
            .unwrap()
            .push((tag, std::time::Instant::now()));
    }

    /// Timing markers the guest wrote to [`MARKER_PORT`], in order.
    pub fn markers(&self) -> Vec<(u32, std::time::Instant)> {
        self.markers.lock().unwrap().clone()
    }

    /// Guest RAM.
    /// Type into the guest console (16550 receive path, IRQ 4). Returns how
    /// many bytes the 64-byte FIFO took; retry the rest later.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .console_input(bytes)
    }

    /// The 16550's registers and receive FIFO, for a snapshot manifest.
    pub fn serial_state(&self) -> snapshot::SerialSnapshot {
        self.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serial_state()
            .into()
    }

    /// Type all of `bytes` into the guest console, waiting (up to `timeout`)
    /// for the guest to drain the FIFO. Returns how many bytes were accepted.
    pub fn console_input_all(&self, bytes: &[u8], timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut done = 0;
        while done < bytes.len() && std::time::Instant::now() < deadline {
            let n = self.console_input(&bytes[done..]);
            done += n;
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        done
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

thread_local! {
    static CURRENT_VCPU: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

impl VmControl for Shared {
    fn memory(&self) -> &dyn GuestMemory {
        &self.ram
    }

    fn vcpu_count(&self) -> usize {
        self.slots.len()
    }

    fn stop_others(&self, except: Option<usize>) -> StopGuard<'_> {
        let me = except.or_else(|| CURRENT_VCPU.with(|c| c.get()));
        self.world.stop(me, &self.slots, &self.stopping);
        StopGuard::new(move || self.world.resume())
    }

    fn with_vcpu(&self, index: usize, f: VcpuTask) -> Result<(), AccessError> {
        let slot = self.slots.get(index).ok_or(AccessError::VcpuGone(index))?;
        if CURRENT_VCPU.with(|c| c.get()) == Some(index) {
            return Err(AccessError::Kvm {
                op: "with_vcpu",
                vcpu: index,
                errno: "called from the vCPU's own thread; use the Vcpu you were given".into(),
            });
        }
        let (tx, rx) = mpsc::channel::<()>();
        let req: control::Request = Box::new(move |v| {
            f(v);
            let _ = tx.send(());
        });
        {
            let _st = self.world.lock();
            if slot.submit(req).is_err() {
                // Not started, or already left its loop.
                return Err(AccessError::VcpuGone(index));
            }
            self.world.cv.notify_all();
        }
        slot.kick();
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| AccessError::VcpuGone(index))
    }

    fn saved_system_regs(&self) -> Option<guest_access::SystemRegs> {
        self.saved_sregs
    }
}

/// The KVM handles of a VM and what a snapshot manifest records about it.
/// Shared by the VM handle and its snapshot writer; the VM fd outlives
/// every vCPU thread.
pub(crate) struct KvmFds {
    pub vm: VmFd,
    pub kvm: Kvm,
    pub info: snapshot::VmInfo,
}

/// A created VM, not yet running.
pub struct Vm {
    shared: Arc<Shared>,
    vcpu_fds: Vec<VcpuFd>,
    loaded: Option<LoadedKernel>,
    fds: Arc<KvmFds>,
}

/// Upper bound on vCPUs (MADT ids are one byte; keep well below).
pub const MAX_VCPUS: u8 = 64;
/// Smallest guest the VMM accepts.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Largest guest the VMM accepts.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

fn kerr(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e: kvm_ioctls::Error| VmError::Kvm {
        op,
        cause: e.to_string(),
    }
}

/// Open the KVM device and check that it is one.
fn open_kvm(config: &VmConfig) -> Result<Kvm, VmError> {
    let kvm_path = std::ffi::CString::new(config.kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::Setup("KVM device path contains a NUL byte".into()))?;
    let kvm = Kvm::new_with_path(kvm_path.as_c_str())
        .map_err(|e| kvm_open_error(&config.kvm_device, &e))?;
    // Opening succeeds on any file; the API version says whether it is KVM.
    if kvm.get_api_version() != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(kvm_open_error(
            &config.kvm_device,
            &kvm_ioctls::Error::new(libc::ENOTTY),
        ));
    }
    Ok(kvm)
}

/// A VM with its TSS, identity map, in-kernel irqchip and PIT.
fn create_vm_fd(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm_fd = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(layout::TSS_ADDR)
        .map_err(kerr("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(layout::IDENTITY_MAP_ADDR)
        .map_err(kerr("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kerr("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kerr("KVM_CREATE_PIT2"))?;
    Ok(vm_fd)
}

/// Give KVM every RAM region as a memory slot.
fn map_ram(vm_fd: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, (gpa, size, host)) in ram.regions().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which lives in
        // `Shared` as long as the VM fd and the vCPU threads.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The console's interrupt line and output.
fn console_parts(
    vm_fd: &VmFd,
    config: &VmConfig,
) -> Result<(EventFd, devices::ConsoleWriter), VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Setup(e.to_string()))?;
    vm_fd
        .register_irqfd(&irq, devices::SERIAL_IRQ)
        .map_err(kerr("KVM_IRQFD"))?;
    let console = devices::ConsoleWriter::new(&config.serial)
        .map_err(|e| VmError::Setup(format!("cannot open the serial output: {e}")))?;
    Ok((irq, console))
}

fn check_sizes(config: &VmConfig) -> Result<(), VmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::BadVcpuCount {
            got: config.vcpus,
            max: MAX_VCPUS,
        });
    }
    if config.memory_mib < MIN_MEMORY_MIB || config.memory_mib > MAX_MEMORY_MIB {
        return Err(VmError::BadMemory {
            got: config.memory_mib,
            min: MIN_MEMORY_MIB,
            max: MAX_MEMORY_MIB,
        });
    }
    Ok(())
}

struct SharedParts {
    ram: GuestRam,
    bus: devices::PortBus,
    vcpus: usize,
    blockirq_flag: u32,
    bridge: BridgeStatus,
    saved_sregs: Option<guest_access::SystemRegs>,
}

fn blockirq_flag(vm_fd: &VmFd) -> u32 {
    let caps = vm_fd.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2) as _);
    if caps > 0 && (caps as u32) & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ != 0 {
        kvm_bindings::KVM_GUESTDBG_BLOCKIRQ
    } else {
        0
    }
}

fn new_shared(p: SharedParts) -> Arc<Shared> {
    let n = p.vcpus;
    Arc::new(Shared {
        ram: p.ram,
        bus: Mutex::new(p.bus),
        world: World::new(),
        slots: (0..n).map(|_| VcpuSlot::new()).collect(),
        stats: (0..n).map(|_| VcpuStats::default()).collect(),
        stopping: AtomicBool::new(false),
        outcome: Mutex::new(None),
        outcome_cv: Condvar::new(),
        handler: OnceLock::new(),
        blockirq_flag: p.blockirq_flag,
        markers: Mutex::new(Vec::new()),
        bridge: p.bridge,
        saved_sregs: p.saved_sregs,
    })
}

impl Vm {
    /// Open KVM, allocate RAM, load the kernel and set up every vCPU.
    pub fn create(config: &VmConfig) -> Result<Vm, VmError> {
        check_sizes(config)?;
        // Check the kernel file before touching KVM, so a typo is reported as such.
        let kernel_len = match std::fs::metadata(&config.kernel) {
            Ok(m) => m.len(),
            Err(cause) => {
                return Err(LoadError::Open {
                    what: "kernel",
                    path: config.kernel.clone(),
                    cause,
                }
                .into())
            }
        };
        let kvm = open_kvm(config)?;
        let bridge = bridge::resolve(config.syscall_bridge, || {
            detect::host_needs_bridge(&config.kvm_device)
        })
        .map_err(VmError::Setup)?;
        let vm_fd = create_vm_fd(&kvm)?;
        let ram = GuestRam::new(config.memory_mib << 20).map_err(VmError::Setup)?;
        map_ram(&vm_fd, &ram)?;

        let (tables, rsdp) = acpi::build_tables(config.vcpus);
        ram.write_phys(layout::ACPI_START, &tables)
            .map_err(|e| VmError::Setup(e.to_string()))?;
        let loaded = loader::load(
            &ram,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            rsdp,
        )?;
        let (irq, console) = console_parts(&vm_fd, config)?;

        let base_cpuid = cpu::supported_cpuid(&kvm).map_err(VmError::Setup)?;
        let mut vcpu_fds = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kerr("KVM_CREATE_VCPU"))?;
            cpu::setup_common(&fd, &cpu::cpuid_for(&base_cpuid, id)).map_err(VmError::Setup)?;
            if id == 0 {
                cpu::setup_boot_cpu(&fd, &ram, loaded.entry).map_err(VmError::Setup)?;
            }
            vcpu_fds.push(fd);
        }
        control::install_kick_handler().map_err(VmError::Setup)?;
        let info = snapshot::VmInfo {
            cpuid: snapshot::leaves(&cpu::cpuid_for(&base_cpuid, 0)),
            memory_bytes: config.memory_mib << 20,
            vcpus: config.vcpus,
            kernel: config.kernel.clone(),
            kernel_len,
            cmdline: config.cmdline.clone(),
            bridge_active: bridge.active,
        };
        let shared = new_shared(SharedParts {
            ram,
            bus: devices::PortBus::new(irq, console),
            vcpus: vcpu_fds.len(),
            blockirq_flag: blockirq_flag(&vm_fd),
            bridge,
            saved_sregs: None,
        });
        Ok(Vm {
            shared,
            vcpu_fds,
            loaded: Some(loaded),
            fds: Arc::new(KvmFds {
                vm: vm_fd,
                kvm,
                info,
            }),
        })
    }

    /// A VM that continues from the snapshot in `dir`: memory mapped
    /// copy-on-write from its file, every vCPU and the irqchip, PIT, clock
    /// and console as they were. `config` gives the KVM device, the serial
    /// output and the bridge mode; its vCPU count and memory size must match
    /// the snapshot's (the restore refuses a mismatch, and other CPU
    /// features, rather than start a guest that would crash later).
    pub fn restore(config: &VmConfig, dir: &Path) -> Result<(Vm, snapshot::Restored), VmError> {
        let snap = |e: snapshot::SnapshotError| VmError::Setup(e.to_string());
        let manifest = snapshot::Manifest::load(dir).map_err(snap)?;
        let saved = snapshot::SavedState::load(dir).map_err(snap)?;
        if saved.vcpus.len() != usize::from(manifest.vcpus) {
            return Err(VmError::Setup(format!(
                "{}: {} vCPU states for {} vCPUs",
                dir.display(),
                saved.vcpus.len(),
                manifest.vcpus
            )));
        }
        let kvm = open_kvm(config)?;
        let base_cpuid = cpu::supported_cpuid(&kvm).map_err(VmError::Setup)?;
        let cpuid0 = cpu::cpuid_for(&base_cpuid, 0);
        manifest
            .check_host(config.vcpus, &snapshot::leaves(&cpuid0))
            .map_err(snap)?;
        let bridge = bridge::resolve(config.syscall_bridge, || {
            detect::host_needs_bridge(&config.kvm_device)
        })
        .map_err(VmError::Setup)?;
        if manifest.needs(snapshot::CAP_SYSCALL_BRIDGE) && !bridge.active {
            return Err(VmError::Setup(format!(
                "{}: the guest ran with the system-call bridge, which is off here ({})",
                dir.display(),
                bridge.detail
            )));
        }
        let vm_fd = create_vm_fd(&kvm)?;
        let ram = GuestRam::from_snapshot(&dir.join(snapshot::MEMORY_NAME), &manifest.regions)
            .map_err(VmError::Setup)?;
        map_ram(&vm_fd, &ram)?;
        let (irq, console) = console_parts(&vm_fd, config)?;
        let bus = devices::PortBus::from_state(irq, console, &(&saved.serial).into())
            .map_err(VmError::Setup)?;
        snapshot_state::apply_vm(&vm_fd, &saved.vm).map_err(VmError::Setup)?;
        let mut vcpu_fds = Vec::new();
        for (id, state) in saved.vcpus.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(id as u64)
                .map_err(kerr("KVM_CREATE_VCPU"))?;
            cpu::setup_common(&fd, &cpu::cpuid_for(&base_cpuid, id as u8))
                .map_err(VmError::Setup)?;
            snapshot_state::apply_vcpu(&fd, state)
                .map_err(|e| VmError::Setup(format!("vCPU {id}: {e}")))?;
            vcpu_fds.push(fd);
        }
        control::install_kick_handler().map_err(VmError::Setup)?;
        let saved_sregs = saved.vcpus[0].system_regs().map_err(VmError::Setup)?;
        let info = snapshot::VmInfo {
            cpuid: manifest.cpuid.clone(),
            memory_bytes: manifest.memory_bytes,
            vcpus: manifest.vcpus,
            kernel: PathBuf::from(&manifest.kernel),
            kernel_len: manifest.kernel_len,
            cmdline: manifest.cmdline.clone(),
            bridge_active: bridge.active,
        };
        let shared = new_shared(SharedParts {
            ram,
            bus,
            vcpus: vcpu_fds.len(),
            blockirq_flag: blockirq_flag(&vm_fd),
            bridge,
            saved_sregs: Some(saved_sregs),
        });
        let restored = snapshot::Restored::read(dir, manifest).map_err(snap)?;
        Ok((
            Vm {
                shared,
                vcpu_fds,
                loaded: None,
                fds: Arc::new(KvmFds {
                    vm: vm_fd,
                    kvm,
                    info,
                }),
            },
            restored,
        ))
    }

    /// What was loaded and where the boot CPU starts (None for a restored VM).
    pub fn loaded_kernel(&self) -> Option<&LoadedKernel> {
        self.loaded.as_ref()
    }

    /// A handle that writes snapshots of this VM once it runs.
    pub fn snapshotter(&self) -> snapshot::Snapshotter {
        snapshot::Snapshotter {
            shared: self.shared.clone(),
            fds: self.fds.clone(),
        }
    }

    /// VM control (memory, stop/resume) — usable before start for early probes.
    pub fn control(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Start every vCPU thread; breakpoints go to `handler`.
    pub fn start(self, handler: Arc<dyn BreakpointHandler>) -> Result<RunningVm, VmError> {
        let _ = self.shared.handler.set(handler);
        self.shared.world.lock().alive = self.vcpu_fds.len();
        let mut threads = Vec::new();
        for (i, fd) in self.vcpu_fds.into_iter().enumerate() {
            let runner = vcpu::VcpuRunner::new(i, fd, self.shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    CURRENT_VCPU.with(|c| c.set(Some(i)));
                    runner.run_loop();
                })
                .map_err(|e| VmError::Setup(format!("cannot start vCPU thread: {e}")))?;
            threads.push(t);
        }
        Ok(RunningVm {
            shared: self.shared,
            threads,
            fds: self.fds,
        })
    }
}

/// A running VM.
pub struct RunningVm {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    // Declared after `threads`/`shared`: the VM fd must outlive the vCPU threads.
    fds: Arc<KvmFds>,
}

impl RunningVm {
    pub fn control(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Capture every vCPU's KVM state and the VM's (irqchip, PIT, clock)
    /// with all vCPUs parked at a checkpoint (outside breakpoint handling:
    /// the stop waits for any in-flight hit to finish). The guest resumes after.
    pub fn capture_state(
        &self,
    ) -> Result<(Vec<snapshot_state::VcpuState>, snapshot_state::VmState), String> {
        let _guard = self.shared.stop_others(None);
        let s = self.snapshotter().capture_stopped()?;
        Ok((s.vcpus, s.vm))
    }

    /// A handle that writes snapshots of this VM (see [`snapshot::Snapshotter`]).
    pub fn snapshotter(&self) -> snapshot::Snapshotter {
        snapshot::Snapshotter {
            shared: self.shared.clone(),
            fds: self.fds.clone(),
        }
    }

    /// Ask the guest to stop (it is killed, not shut down).
    pub fn stop(&self) {
        self.shared.finish(RunOutcome::Stopped);
    }

    /// The outcome if the run has ended, waiting at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<RunOutcome> {
        let g = self.shared.outcome.lock().unwrap();
        let (g, _) = self
            .shared
            .outcome_cv
            .wait_timeout_while(g, timeout, |o| o.is_none())
            .unwrap();
        g.clone()
    }

    /// Wait for the run to end and join the vCPU threads.
    pub fn wait(mut self) -> RunOutcome {
        {
            let g = self.shared.outcome.lock().unwrap();
            let _g = self
                .shared
                .outcome_cv
                .wait_while(g, |o| o.is_none())
                .unwrap();
        }
        self.join()
    }

    fn join(&mut self) -> RunOutcome {
        self.shared.stopping.store(true, Ordering::SeqCst);
        control::kick_all(&self.shared.slots, None);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shared
            .outcome
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(RunOutcome::Stopped)
    }

    pub fn exit_stats(&self) -> ExitStats {
        self.shared.exit_stats()
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.finish(RunOutcome::Stopped);
            self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct() {
        assert_eq!(RunOutcome::GuestExit { status: 0 }.exit_code(), 0);
        assert_eq!(RunOutcome::GuestExit { status: 3 }.exit_code(), 3);
        assert_eq!(RunOutcome::GuestExit { status: 0x100 }.exit_code(), 1);
        assert_eq!(RunOutcome::PowerOff.exit_code(), 0);
        let codes = [
            RunOutcome::Reset { how: "x" }.exit_code(),
            RunOutcome::TripleFault { vcpu: 0 }.exit_code(),
            RunOutcome::Crashed {
                vcpu: 0,
                reason: String::new(),
            }
            .exit_code(),
        ];
        assert!(codes.iter().all(|c| *c > 127));
        assert_ne!(codes[0], codes[1]);
        assert_ne!(codes[1], codes[2]);
    }

    #[test]
    fn kvm_open_errors_say_what_is_wrong() {
        let p = Path::new("/dev/kvm");
        let e = kvm_open_error(p, &kvm_ioctls::Error::new(libc::ENOENT)).to_string();
        assert!(
            e.contains("cannot open /dev/kvm") && e.contains("no such device"),
            "{e}"
        );
        let e = kvm_open_error(p, &kvm_ioctls::Error::new(libc::EACCES)).to_string();
        assert!(e.contains("permission denied"), "{e}");
    }

    #[test]
    fn bad_vcpu_and_memory_counts() {
        let mut c = VmConfig::new("/nonexistent");
        c.vcpus = 0;
        assert!(matches!(Vm::create(&c), Err(VmError::BadVcpuCount { .. })));
        c.vcpus = 1;
        c.memory_mib = 1;
        assert!(matches!(Vm::create(&c), Err(VmError::BadMemory { .. })));
    }
}
