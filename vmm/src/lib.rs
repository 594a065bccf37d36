//! A minimal KVM VMM for hvprobe.
//!
//! Boots a Linux guest (PVH entry of an ELF `vmlinux`, or a bzImage) with an
//! initrd and command line, N vCPUs (ACPI MADT), the in-kernel irqchip and PIT
//! and a 16550 console. One thread per vCPU owns its fd. Every `int3` trap,
//! whether KVM reports it as a debug exit or (on instruction-emulating KVM) as
//! an emulation failure, reaches one [`guest_access::BreakpointHandler`].
//! The VMM knows nothing about probes.
//!
//! # Files
//!
//! | file | what it holds |
//! |------|---------------|
//! | `lib.rs` | [`VmConfig`], [`Vm`] (create / restore / start), [`RunningVm`] |
//! | `machine.rs` | [`Machine`]: the state every thread shares, its [`guest_access::VmControl`]; [`RunOutcome`], exit counters |
//! | `control.rs` | stop-the-world (`World`), per-vCPU slots with [`VcpuRunState`], the kick signal |
//! | `vcpu.rs` | the vCPU thread: KVM_RUN loop, device exits, trap dispatch, single-step |
//! | `vcpu/bridge_exit.rs` | the system-call bridge's exits (IDT tracking, #PF/#UD completion) |
//! | `bridge.rs` | bridge configuration, gate decoding, per-vCPU bridge state |
//! | `gaps.rs` | instructions KVM's emulator lacks, completed by the VMM |
//! | `debug.rs` | the one owner of a vCPU's KVM_SET_GUEST_DEBUG state; the VM-wide DR0..DR3 allocator |
//! | `devices.rs` | the port bus: 16550 console, exit/marker ports, ACPI PM ports |
//! | `memory.rs`, `layout.rs` | guest RAM and the guest-physical layout |
//! | `loader.rs`, `cpu.rs`, `acpi.rs` | kernel/initrd loading, CPUID and boot registers, ACPI tables |
//! | `regs.rs` | KVM ↔ guest-access register conversions |
//! | `snapshot.rs`, `snapshot_state.rs` | snapshot files, KVM vCPU/VM state capture and restore |
//! | `detect.rs` | probing whether this host's KVM needs the system-call bridge |
//!
//! # The path of a trap
//!
//! ```text
//! guest executes int3
//!   -> KVM_RUN returns (vcpu.rs, VcpuRunner::run_once)
//!        KVM_EXIT_DEBUG, exception 3          (hardware KVM, USE_SW_BP)
//!        KVM_EXIT_INTERNAL_ERROR, emulation   (instruction-emulating KVM)
//!   -> device_exit() does not claim it (it serves port/MMIO exits only)
//!   -> VcpuRunner::dispatch(TrapExit) -> ExitKind
//!        Breakpoint / EmulationFailure at an int3 or an owned address
//!   -> VcpuRunner::breakpoint: run state InHandler,
//!        BreakpointHandler::on_breakpoint(vcpu, machine, kind)
//!   -> Resume (the handler moved RIP) or DeliverToGuest (#BP re-injected)
//!   -> back to the loop: checkpoint (requests, park if the world is
//!      stopped), then the next KVM_RUN
//! ```
//!
//! A single-step (`Vcpu::single_step`) runs its own KVM_RUN loop
//! (`step_until_db`), which serves device exits through the same
//! `device_exit` and ends at the #DB.

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
mod machine;
mod memory;
mod protect;
mod regs;
mod rmw;
pub mod snapshot;
pub mod snapshot_state;
mod vcpu;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use guest_access::{BreakpointHandler, GuestMemory, VmControl};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use bridge::{BridgeMode, BridgeStatus};
pub use devices::{SerialOutput, EXIT_PORT, MARKER_PORT};
pub use loader::{BootEntry, KernelFormat, LoadError, LoadedKernel};
pub use memory::GuestRam;

pub use control::VcpuRunState;
pub use machine::{BridgeStats, ExitStats, HitCost, Machine, RunOutcome, WatchStats};

use machine::CURRENT_VCPU;
use snapshot::KvmFds;

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

/// A created VM, not yet running.
pub struct Vm {
    shared: Arc<Machine>,
    vcpu_fds: Vec<VcpuFd>,
    loaded: Option<LoadedKernel>,
    fds: Arc<KvmFds>,
    /// The guest kernel may have randomized its base (KASLR).
    kaslr_possible: bool,
}

/// Whether a kernel booted this way may randomize its base: only a bzImage
/// runs the decompressor that picks a KASLR slide (a PVH vmlinux starts at
/// its link address), and `nokaslr` turns it off.
fn kaslr_possible(format: KernelFormat, cmdline: &str) -> bool {
    format == KernelFormat::BzImage && !cmdline.split_whitespace().any(|w| w == "nokaslr")
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
            slot: u32::try_from(slot)
                .map_err(|_| VmError::Setup("too many RAM regions for KVM memory slots".into()))?,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: (gpa, size, host) is one of `ram`'s own mmapped regions, so
        // the host range is valid for `size` bytes, and the regions are
        // disjoint (one slot each). KVM touches it only on behalf of a vCPU
        // in KVM_RUN or of our own ioctls; `ram` moves into the Machine, and
        // every vCPU thread holds an Arc of that Machine for as long as it
        // can run the guest, so the mapping outlives every such access.
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

fn blockirq_flag(vm_fd: &VmFd) -> u32 {
    let caps = vm_fd.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2) as _);
    if caps > 0 && (caps as u32) & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ != 0 {
        kvm_bindings::KVM_GUESTDBG_BLOCKIRQ
    } else {
        0
    }
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

        // The bridge is on exactly where KVM emulates guest kernel code (or
        // where the user asked for it): there hypercalls fault.
        let base_cpuid = cpu::supported_cpuid(&kvm, bridge.active).map_err(VmError::Setup)?;
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
        let shared = machine::new_machine(machine::MachineParts {
            ram,
            bus: devices::PortBus::new(irq, console),
            vcpus: vcpu_fds.len(),
            blockirq_flag: blockirq_flag(&vm_fd),
            bridge,
            saved_sregs: None,
        });
        let fds = Arc::new(KvmFds {
            vm: vm_fd,
            kvm,
            info,
        });
        let _ = shared.kvm_fds.set(fds.clone());
        Ok(Vm {
            shared,
            vcpu_fds,
            kaslr_possible: kaslr_possible(loaded.format, &config.cmdline),
            loaded: Some(loaded),
            fds,
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
        let bridge = bridge::resolve(config.syscall_bridge, || {
            detect::host_needs_bridge(&config.kvm_device)
        })
        .map_err(VmError::Setup)?;
        let base_cpuid = cpu::supported_cpuid(&kvm, bridge.active).map_err(VmError::Setup)?;
        let cpuid0 = cpu::cpuid_for(&base_cpuid, 0);
        manifest
            .check_host(config.vcpus, &snapshot::leaves(&cpuid0))
            .map_err(snap)?;
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
            cpu::setup_common(
                &fd,
                &cpu::cpuid_for(
                    &base_cpuid,
                    u8::try_from(id)
                        .map_err(|_| VmError::Setup(format!("vCPU id {id} beyond 255")))?,
                ),
            )
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
        let shared = machine::new_machine(machine::MachineParts {
            ram,
            bus,
            vcpus: vcpu_fds.len(),
            blockirq_flag: blockirq_flag(&vm_fd),
            bridge,
            saved_sregs: Some(saved_sregs),
        });
        let (manifest_kernel, manifest_cmdline) =
            (manifest.kernel.clone(), manifest.cmdline.clone());
        let restored = snapshot::Restored::read(dir, manifest).map_err(snap)?;
        let fds = Arc::new(KvmFds {
            vm: vm_fd,
            kvm,
            info,
        });
        let _ = shared.kvm_fds.set(fds.clone());
        Ok((
            Vm {
                shared,
                vcpu_fds,
                kaslr_possible: kaslr_possible(
                    loader::sniff_format(Path::new(&manifest_kernel))
                        .unwrap_or(KernelFormat::BzImage),
                    &manifest_cmdline,
                ),
                loaded: None,
                fds,
            },
            restored,
        ))
    }

    /// Whether the guest kernel may run at a randomized base (KASLR): a
    /// bzImage booted without `nokaslr`, fresh or restored. Symbols then
    /// need the slide found in guest memory before they can be used.
    pub fn kaslr_possible(&self) -> bool {
        self.kaslr_possible
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
    pub fn control(&self) -> Arc<Machine> {
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
    shared: Arc<Machine>,
    threads: Vec<JoinHandle<()>>,
    // Declared after `threads`/`shared`: the VM fd must outlive the vCPU threads.
    fds: Arc<KvmFds>,
}

impl RunningVm {
    pub fn control(&self) -> Arc<Machine> {
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
    fn only_a_bzimage_without_nokaslr_may_randomize() {
        assert!(kaslr_possible(KernelFormat::BzImage, "console=ttyS0 quiet"));
        assert!(!kaslr_possible(
            KernelFormat::BzImage,
            "console=ttyS0 nokaslr quiet"
        ));
        assert!(!kaslr_possible(KernelFormat::BzImage, "nokaslr"));
        // A word that merely contains it does not count.
        assert!(kaslr_possible(KernelFormat::BzImage, "x.nokaslrx=1"));
        assert!(!kaslr_possible(KernelFormat::ElfPvh, "console=ttyS0"));
    }

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
