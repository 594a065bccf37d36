//! Snapshot format: a versioned JSON manifest beside a raw guest-memory file.
//!
//! Layout of a snapshot directory (format version [`FORMAT_VERSION`]):
//!
//! * `manifest.json`: [`Manifest`], serde_json. `magic` is always
//!   [`MAGIC`]; a directory without it is "not a snapshot".
//! * `memory.raw`: the guest RAM regions of [`Manifest::regions`], back to back
//!   in guest-physical order (the MMIO hole is not stored). Probe sites, slots
//!   and return traps hold the guest's original bytes: the image is written
//!   from live RAM and then the originals are overlaid *in the file*
//!   ([`write_memory_image`]), never by unpatching the live guest.
//!
//! Restore maps `memory.raw` with `MAP_PRIVATE` ([`map_private`]): nothing is
//! read up front, guest writes stay in the restoring process, the file is never
//! modified, and any number of guests can restore one snapshot at once.
//!
//! * `state.json`: [`SavedState`]: every vCPU's KVM state, the irqchip, PIT
//!   and clock, and the 16550 with its FIFO.
//! * `probes.json` (optional): the probe table, written and read by the
//!   caller (the probe engine and the API); the VMM does not look inside.
//!
//! The manifest is written last and removed first, so a directory with a
//! manifest always holds a complete snapshot; the memory file is written
//! under a temporary name and renamed, so a guest still running from an
//! older snapshot in the same directory keeps its (unlinked) file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_access::{GuestMemory, VmControl};
use serde::{Deserialize, Serialize};

use crate::machine::Machine;
use crate::snapshot_state::{VcpuState, VmState};

/// Identifies a manifest as an hvprobe snapshot.
pub const MAGIC: &str = "hvprobe-snapshot";
/// The format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_NAME: &str = "manifest.json";
pub const MEMORY_NAME: &str = "memory.raw";
pub const STATE_NAME: &str = "state.json";
pub const PROBES_NAME: &str = "probes.json";
/// Capability: the guest ran with the system-call bridge (its user space
/// needs it to make system calls on this kind of host).
pub const CAP_SYSCALL_BRIDGE: &str = "syscall-bridge";

/// One CPUID leaf as given to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub use crate::memory::Region;

/// The snapshot manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub magic: String,
    pub format_version: u32,
    pub hvprobe_version: String,
    /// The guest kernel's `linux_banner`, when known.
    pub guest_banner: String,
    /// Host CPU model string (CPUID 0x80000002..4).
    pub host_cpu_model: String,
    /// The CPUID set the guest saw (KVM_SET_CPUID2 input).
    pub cpuid: Vec<CpuidLeaf>,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub regions: Vec<Region>,
    /// Host capabilities the guest depends on (e.g. a system-call bridge).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The kernel file the guest booted (its symbols serve the restore).
    pub kernel: String,
    /// Its size then, to tell a rebuilt kernel at the same path.
    pub kernel_len: u64,
    /// The command line it booted with (for the record).
    pub cmdline: String,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix: u64,
}

/// What the VMM knows of a VM for its manifest.
#[derive(Clone, Debug)]
pub struct VmInfo {
    pub cpuid: Vec<CpuidLeaf>,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub kernel: PathBuf,
    pub kernel_len: u64,
    pub cmdline: String,
    pub bridge_active: bool,
}

/// The CPUID leaves of a KVM CPUID set.
pub fn leaves(c: &kvm_bindings::CpuId) -> Vec<CpuidLeaf> {
    c.as_slice()
        .iter()
        .map(|e| CpuidLeaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The host CPU's brand string (CPUID 0x80000002..4).
pub fn host_cpu_model() -> String {
    let mut b = Vec::with_capacity(48);
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let r = std::arch::x86_64::__cpuid(leaf);
        for v in [r.eax, r.ebx, r.ecx, r.edx] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    String::from_utf8_lossy(&b)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// KVM and device state of every vCPU and the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
}

impl SavedState {
    pub fn load(dir: &Path) -> Result<SavedState, SnapshotError> {
        let path = dir.join(STATE_NAME);
        let text = std::fs::read(&path).map_err(|e| SnapshotError::BadManifest {
            path: path.clone(),
            cause: e.to_string(),
        })?;
        serde_json::from_slice(&text).map_err(|e| SnapshotError::BadManifest {
            path,
            cause: e.to_string(),
        })
    }
}

/// What a restore hands back besides the VM: the manifest and the caller's
/// probe table, if the snapshot has one.
#[derive(Clone, Debug)]
pub struct Restored {
    pub manifest: Manifest,
    pub probes: Option<Vec<u8>>,
}

impl Restored {
    pub(crate) fn read(dir: &Path, manifest: Manifest) -> Result<Restored, SnapshotError> {
        let path = dir.join(PROBES_NAME);
        let probes = match std::fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(SnapshotError::BadManifest {
                    path,
                    cause: e.to_string(),
                })
            }
        };
        Ok(Restored { manifest, probes })
    }
}

/// What a snapshot took.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// Bytes of guest RAM saved (the file is sparse where RAM is zero).
    pub memory_bytes: u64,
    /// Bytes actually written (non-zero pages).
    pub written_bytes: u64,
    /// With the guest paused: capturing KVM state, writing files.
    pub capture: Duration,
    pub write: Duration,
}

/// The KVM handles of a VM and what a snapshot manifest records about it.
/// Shared by the VM handle and its snapshot writer; the VM fd outlives
/// every vCPU thread.
pub(crate) struct KvmFds {
    pub vm: kvm_ioctls::VmFd,
    pub kvm: kvm_ioctls::Kvm,
    pub info: VmInfo,
}

/// The 16550's registers and receive FIFO, for a snapshot manifest.
fn serial_state(m: &Machine) -> SerialSnapshot {
    m.bus
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .serial_state()
        .into()
}

/// Writes snapshots of a running VM. Cheap to clone.
#[derive(Clone)]
pub struct Snapshotter {
    pub(crate) shared: Arc<Machine>,
    pub(crate) fds: Arc<KvmFds>,
}

impl Snapshotter {
    /// Every vCPU's and the VM's KVM state and the console's. The caller
    /// holds the world stopped (`stop_others`): parked vCPUs answer.
    pub fn capture_stopped(&self) -> Result<SavedState, String> {
        let idx = crate::snapshot_state::msr_indices(&self.fds.kvm)?;
        let mut vcpus = Vec::with_capacity(self.shared.slots.len());
        for i in 0..self.shared.slots.len() {
            let (tx, rx) = std::sync::mpsc::channel();
            let idx = idx.clone();
            self.shared
                .with_vcpu(
                    i,
                    Box::new(move |v| {
                        let _ = tx.send(crate::snapshot_state::capture_current(v, &idx));
                    }),
                )
                .map_err(|e| e.to_string())?;
            vcpus.push(
                rx.recv()
                    .map_err(|_| format!("vCPU {i} exited during capture"))??,
            );
        }
        Ok(SavedState {
            vcpus,
            vm: crate::snapshot_state::capture_vm(&self.fds.vm)?,
            serial: serial_state(&self.shared),
        })
    }

    /// Write a snapshot into `dir` (created if missing). The caller holds
    /// the world stopped at a clean point; `originals` are the guest's own
    /// bytes wherever the host changed guest memory (they go into the file,
    /// the live guest is untouched); `probes` is stored as `probes.json`.
    /// A failure leaves no manifest, so `dir` is then not a snapshot.
    pub fn write_stopped(
        &self,
        dir: &Path,
        originals: &[(u64, Vec<u8>)],
        guest_banner: &str,
        probes: Option<&[u8]>,
    ) -> Result<SnapshotReport, SnapshotError> {
        let t0 = Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| werr(dir, &e))?;
        let manifest_path = dir.join(MANIFEST_NAME);
        match std::fs::remove_file(&manifest_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(werr(&manifest_path, &e)),
        }
        let state = self
            .capture_stopped()
            .map_err(|e| werr(&dir.join(STATE_NAME), &e))?;
        let capture = t0.elapsed();
        let t1 = Instant::now();
        let info = &self.fds.info;
        let regions = Manifest::regions_for(info.memory_bytes);
        let tmp = dir.join(format!("{MEMORY_NAME}.tmp"));
        let ram = &self.shared.ram;
        let written = write_memory_image(
            &tmp,
            &regions,
            |gpa, buf| ram.read_phys(gpa, buf).map_err(|e| e.to_string()),
            originals,
        )
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        let mem_path = dir.join(MEMORY_NAME);
        std::fs::rename(&tmp, &mem_path).map_err(|e| werr(&mem_path, &e))?;
        write_file(
            &dir.join(STATE_NAME),
            &serde_json::to_vec(&state).map_err(|e| werr(dir, &e))?,
        )?;
        let probes_path = dir.join(PROBES_NAME);
        match probes {
            Some(p) => write_file(&probes_path, p)?,
            None => {
                let _ = std::fs::remove_file(&probes_path);
            }
        }
        let manifest = Manifest {
            magic: MAGIC.into(),
            format_version: FORMAT_VERSION,
            hvprobe_version: env!("CARGO_PKG_VERSION").into(),
            guest_banner: guest_banner.into(),
            host_cpu_model: host_cpu_model(),
            cpuid: info.cpuid.clone(),
            memory_bytes: info.memory_bytes,
            vcpus: info.vcpus,
            regions,
            capabilities: if info.bridge_active {
                vec![CAP_SYSCALL_BRIDGE.into()]
            } else {
                Vec::new()
            },
            kernel: info.kernel.to_string_lossy().into_owned(),
            kernel_len: info.kernel_len,
            cmdline: info.cmdline.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        manifest.store(dir)?;
        Ok(SnapshotReport {
            memory_bytes: info.memory_bytes,
            written_bytes: written,
            capture,
            write: t1.elapsed(),
        })
    }
}

/// A failed write of `path`.
fn werr(path: &Path, cause: &dyn std::fmt::Display) -> SnapshotError {
    SnapshotError::Write {
        path: path.to_owned(),
        cause: cause.to_string(),
    }
}

/// Write `bytes` to `path` through a temporary file and a rename, so a
/// failed write never leaves a half file under the real name.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| werr(&tmp, &e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| werr(&tmp, &e))?;
    std::fs::rename(&tmp, path).map_err(|e| werr(path, &e))
}

/// The 16550's state (vm-superio `SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Why a snapshot cannot be written or restored. Each is one line.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} is not an hvprobe snapshot (no readable {MANIFEST_NAME})")]
    NotASnapshot(PathBuf),
    #[error("{path}: not an hvprobe snapshot manifest: {cause}")]
    BadManifest { path: PathBuf, cause: String },
    #[error("{path}: snapshot format {found} is newer than this hvprobe reads ({FORMAT_VERSION})")]
    FutureFormat { path: PathBuf, found: u32 },
    #[error("{path}: memory file missing: {cause}")]
    MemoryMissing { path: PathBuf, cause: String },
    #[error("{path}: memory file truncated: {found} bytes, manifest needs {want}")]
    MemoryTruncated {
        path: PathBuf,
        found: u64,
        want: u64,
    },
    #[error("snapshot has {snap} vCPUs, this run asks for {asked}")]
    VcpuCount { snap: u8, asked: u8 },
    #[error("snapshot was taken with other CPU features: CPUID leaf {function:#x}.{index} differs ({what})")]
    CpuFeatures {
        function: u32,
        index: u32,
        what: String,
    },
    #[error("cannot write snapshot {path}: {cause}")]
    Write { path: PathBuf, cause: String },
    #[error("cannot map {path}: {cause}")]
    Map { path: PathBuf, cause: String },
}

impl Manifest {
    /// Whether the guest depends on host capability `cap`.
    pub fn needs(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }

    /// Bytes the memory file must hold.
    pub fn memory_file_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset + r.len)
            .max()
            .unwrap_or(0)
    }

    /// Regions for `memory_bytes` of RAM laid out as this VMM does, packed in
    /// the file in guest-physical order.
    pub fn regions_for(memory_bytes: u64) -> Vec<Region> {
        let mut off = 0;
        crate::layout::ram_ranges(memory_bytes)
            .into_iter()
            .map(|(gpa, len)| {
                let r = Region {
                    gpa,
                    len,
                    file_offset: off,
                };
                off += len;
                r
            })
            .collect()
    }

    /// Write the manifest into `dir` (via a temporary file and rename, so a
    /// failed write never leaves a half manifest that looks valid).
    pub fn store(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(MANIFEST_NAME);
        let text = serde_json::to_vec_pretty(self).map_err(|e| werr(&path, &e))?;
        write_file(&path, &text)
    }

    /// Read and check `dir`'s manifest and memory file (presence, magic,
    /// format version, memory file length). Host checks are [`Self::check_host`].
    pub fn load(dir: &Path) -> Result<Manifest, SnapshotError> {
        let path = dir.join(MANIFEST_NAME);
        let text = std::fs::read(&path).map_err(|_| SnapshotError::NotASnapshot(dir.to_owned()))?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::BadManifest {
                path: path.clone(),
                cause: e.to_string(),
            })?;
        if value.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
            return Err(SnapshotError::NotASnapshot(dir.to_owned()));
        }
        // The version is checked before the rest, so a future format with other
        // fields is refused as "future", not as "malformed".
        let found = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if found > u64::from(FORMAT_VERSION) {
            return Err(SnapshotError::FutureFormat {
                path,
                found: u32::try_from(found).unwrap_or(u32::MAX),
            });
        }
        let m: Manifest =
            serde_json::from_value(value).map_err(|e| SnapshotError::BadManifest {
                path: path.clone(),
                cause: e.to_string(),
            })?;
        let mem = dir.join(MEMORY_NAME);
        let meta = std::fs::metadata(&mem).map_err(|e| SnapshotError::MemoryMissing {
            path: mem.clone(),
            cause: e.to_string(),
        })?;
        let want = m.memory_file_len();
        if meta.len() < want || want == 0 {
            return Err(SnapshotError::MemoryTruncated {
                path: mem,
                found: meta.len(),
                want,
            });
        }
        Ok(m)
    }

    /// Refuse a restore this host/run cannot honour: a different vCPU count, or
    /// a CPUID set that differs from the one the guest saw.
    pub fn check_host(&self, vcpus: u8, host_cpuid: &[CpuidLeaf]) -> Result<(), SnapshotError> {
        if vcpus != self.vcpus {
            return Err(SnapshotError::VcpuCount {
                snap: self.vcpus,
                asked: vcpus,
            });
        }
        let key = |l: &CpuidLeaf| (l.function, l.index);
        for want in &self.cpuid {
            match host_cpuid.iter().find(|h| key(h) == key(want)) {
                None => {
                    return Err(SnapshotError::CpuFeatures {
                        function: want.function,
                        index: want.index,
                        what: "missing on this host".into(),
                    })
                }
                Some(h) if h != want => {
                    return Err(SnapshotError::CpuFeatures {
                        function: want.function,
                        index: want.index,
                        what: format!(
                        "snapshot {:08x} {:08x} {:08x} {:08x}, host {:08x} {:08x} {:08x} {:08x}",
                        want.eax, want.ebx, want.ecx, want.edx, h.eax, h.ebx, h.ecx, h.edx
                    ),
                    })
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = host_cpuid
            .iter()
            .find(|h| !self.cpuid.iter().any(|w| key(w) == key(h)))
        {
            return Err(SnapshotError::CpuFeatures {
                function: extra.function,
                index: extra.index,
                what: "not in the snapshot".into(),
            });
        }
        Ok(())
    }
}

/// Write guest RAM to `path` region by region (`read(gpa, buf)` supplies the
/// live bytes), then overlay `originals` — (gpa, original bytes) for every
/// probe site, slot and return trap — in the file. The live guest is
/// untouched. Zero pages are left as holes (the file is sparse). Returns
/// the bytes written.
pub fn write_memory_image(
    path: &Path,
    regions: &[Region],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    originals: &[(u64, Vec<u8>)],
) -> Result<u64, SnapshotError> {
    let werr = |e: &dyn std::fmt::Display| werr(path, e);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| werr(&e))?;
    let total = regions
        .iter()
        .map(|r| r.file_offset + r.len)
        .max()
        .unwrap_or(0);
    f.set_len(total).map_err(|e| werr(&e))?;
    const CHUNK: usize = 1 << 20;
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for r in regions {
        let mut done = 0u64;
        while done < r.len {
            let n = usize::try_from(r.len - done)
                .unwrap_or(usize::MAX)
                .min(CHUNK);
            read(r.gpa + done, &mut buf[..n]).map_err(|e| werr(&e))?;
            // Write runs of non-zero pages; zero pages stay holes.
            let mut p = 0;
            while p < n {
                let nonzero = |p: usize| buf[p..(p + PAGE).min(n)].iter().any(|b| *b != 0);
                if !nonzero(p) {
                    p += PAGE;
                    continue;
                }
                let mut q = p;
                while q < n && nonzero(q) {
                    q += PAGE;
                }
                let q = q.min(n);
                f.write_all_at(&buf[p..q], r.file_offset + done + p as u64)
                    .map_err(|e| werr(&e))?;
                written += (q - p) as u64;
                p = q;
            }
            done += n as u64;
        }
    }
    for (gpa, bytes) in originals {
        let end = gpa + bytes.len() as u64;
        let r = regions
            .iter()
            .find(|r| *gpa >= r.gpa && end <= r.gpa + r.len)
            .ok_or_else(|| werr(&format!("original bytes at {gpa:#x} outside guest RAM")))?;
        f.write_all_at(bytes, r.file_offset + (gpa - r.gpa))
            .map_err(|e| werr(&e))?;
    }
    f.sync_all().map_err(|e| werr(&e))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hvprobe-snap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn leaf(function: u32, ecx: u32) -> CpuidLeaf {
        CpuidLeaf {
            function,
            index: 0,
            eax: 1,
            ebx: 2,
            ecx,
            edx: 4,
        }
    }

    fn manifest(mem: u64) -> Manifest {
        Manifest {
            magic: MAGIC.into(),
            format_version: FORMAT_VERSION,
            hvprobe_version: "0.1.0".into(),
            guest_banner: "Linux version test".into(),
            host_cpu_model: "test cpu".into(),
            cpuid: vec![leaf(1, 0x8000_0000), leaf(7, 0)],
            memory_bytes: mem,
            vcpus: 2,
            regions: Manifest::regions_for(mem),
            capabilities: vec![],
            kernel: "/boot/vmlinux".into(),
            kernel_len: 1,
            cmdline: String::new(),
            created_unix: 0,
        }
    }

    fn save(dir: &Path, m: &Manifest) {
        m.store(dir).unwrap();
        let f = File::create(dir.join(MEMORY_NAME)).unwrap();
        f.set_len(m.memory_file_len()).unwrap();
    }

    #[test]
    fn round_trip_and_host_checks() {
        let d = tmpdir("rt");
        let m = manifest(1 << 20);
        save(&d, &m);
        let back = Manifest::load(&d).unwrap();
        assert_eq!(back, m);
        back.check_host(2, &m.cpuid).unwrap();
        let e = back.check_host(1, &m.cpuid).unwrap_err().to_string();
        assert_eq!(e, "snapshot has 2 vCPUs, this run asks for 1");
        let mut other = m.cpuid.clone();
        other[0].ecx = 0;
        let e = back.check_host(2, &other).unwrap_err().to_string();
        assert!(
            e.contains("other CPU features") && e.contains("0x1.0"),
            "{e}"
        );
        let e = back.check_host(2, &m.cpuid[..1]).unwrap_err().to_string();
        assert!(e.contains("0x7.0") && e.contains("missing"), "{e}");
        let mut more = m.cpuid.clone();
        more.push(leaf(0xd, 0));
        let e = back.check_host(2, &more).unwrap_err().to_string();
        assert!(e.contains("not in the snapshot"), "{e}");
    }

    #[test]
    fn refusals_are_one_line() {
        let d = tmpdir("bad");
        let e = Manifest::load(&d).unwrap_err().to_string();
        assert!(e.contains("is not an hvprobe snapshot"), "{e}");
        std::fs::write(d.join(MANIFEST_NAME), b"{\"hello\": 1}").unwrap();
        let e = Manifest::load(&d).unwrap_err().to_string();
        assert!(e.contains("is not an hvprobe snapshot"), "{e}");

        let m = manifest(1 << 20);
        save(&d, &m);
        let mut v = serde_json::to_value(&m).unwrap();
        v["format_version"] = (FORMAT_VERSION + 1).into();
        v["new_field_of_the_future"] = 1.into();
        std::fs::write(d.join(MANIFEST_NAME), v.to_string()).unwrap();
        let e = Manifest::load(&d).unwrap_err().to_string();
        assert!(e.contains("format 2 is newer"), "{e}");

        save(&d, &m);
        File::options()
            .write(true)
            .open(d.join(MEMORY_NAME))
            .unwrap()
            .set_len((1 << 20) - 1)
            .unwrap();
        let e = Manifest::load(&d).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("1048575"), "{e}");
        std::fs::remove_file(d.join(MEMORY_NAME)).unwrap();
        let e = Manifest::load(&d).unwrap_err().to_string();
        assert!(e.contains("memory file missing"), "{e}");

        for e in [
            SnapshotError::NotASnapshot(d.clone()).to_string(),
            Manifest::load(Path::new("/nonexistent"))
                .unwrap_err()
                .to_string(),
        ] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn image_overlays_originals_and_private_map_never_writes_the_file() {
        let d = tmpdir("img");
        let regions = vec![
            Region {
                gpa: 0,
                len: 8192,
                file_offset: 0,
            },
            Region {
                gpa: 1 << 32,
                len: 4096,
                file_offset: 8192,
            },
        ];
        // "Live" RAM: every byte 0xCC, as if patched everywhere.
        let path = d.join(MEMORY_NAME);
        let originals = vec![(0x1000, vec![0x55, 0x48]), ((1 << 32) + 16, vec![0x90])];
        write_memory_image(
            &path,
            &regions,
            |_, b| {
                b.fill(0xcc);
                Ok(())
            },
            &originals,
        )
        .unwrap();
        let img = std::fs::read(&path).unwrap();
        assert_eq!(img.len(), 12288);
        assert_eq!(&img[0x1000..0x1002], &[0x55, 0x48]);
        assert_eq!(img[8192 + 16], 0x90);
        assert_eq!(img.iter().filter(|&&b| b != 0xcc).count(), 3);
        // Zero pages become holes: written bytes count only the rest.
        let sparse = write_memory_image(
            &path,
            &regions,
            |gpa, b| {
                b.fill(0);
                if gpa == 0 {
                    b[5000] = 7;
                }
                Ok(())
            },
            &[],
        )
        .unwrap();
        assert_eq!(sparse, 4096);
        let img2 = std::fs::read(&path).unwrap();
        assert_eq!(
            (
                img2.len(),
                img2[5000],
                img2.iter().filter(|&&b| b != 0).count()
            ),
            (12288, 7, 1)
        );

        let bad = write_memory_image(&path, &regions, |_, _| Ok(()), &[(0x9000_0000, vec![1])]);
        assert!(bad.unwrap_err().to_string().contains("outside guest RAM"));
        write_memory_image(
            &path,
            &regions,
            |_, b| {
                b.fill(0xcc);
                Ok(())
            },
            &originals,
        )
        .unwrap();

        let a = crate::memory::GuestRam::from_snapshot(&path, &regions).unwrap();
        let b = crate::memory::GuestRam::from_snapshot(&path, &regions).unwrap();
        let mut x = [0u8; 1];
        a.read_phys(0x1000, &mut x).unwrap();
        assert_eq!(x[0], 0x55);
        a.write_phys(0x1000, &[0x11]).unwrap();
        b.read_phys(0x1000, &mut x).unwrap();
        assert_eq!(x[0], 0x55, "copy-on-write is per mapping");
        b.read_phys((1 << 32) + 16, &mut x).unwrap();
        assert_eq!(x[0], 0x90);
        drop((a, b));
        assert_eq!(std::fs::read(&path).unwrap(), img, "file unchanged");

        let e = write_memory_image(
            Path::new("/proc/hvprobe-no/memory.raw"),
            &regions,
            |_, _| Ok(()),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("cannot write snapshot"), "{e}");
    }
}
