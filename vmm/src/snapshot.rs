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
//! Status: the manifest, its checks, the image writer and the private mapping
//! are done and unit-tested; capturing/setting vCPU and irqchip state and the
//! `snapshot`/`run --restore` commands are not wired yet.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Identifies a manifest as an hvprobe snapshot.
pub const MAGIC: &str = "hvprobe-snapshot";
/// The format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_NAME: &str = "manifest.json";
pub const MEMORY_NAME: &str = "memory.raw";

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

/// One guest RAM region and where it lives in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

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
        let tmp = dir.join(format!("{MANIFEST_NAME}.tmp"));
        let werr = |p: &Path, e: &dyn std::fmt::Display| SnapshotError::Write {
            path: p.to_owned(),
            cause: e.to_string(),
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| werr(&path, &e))?;
        let mut f = File::create(&tmp).map_err(|e| werr(&tmp, &e))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(|e| werr(&tmp, &e))?;
        std::fs::rename(&tmp, &path).map_err(|e| werr(&path, &e))
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
                found: found.min(u64::from(u32::MAX)) as u32,
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
/// probe site, slot and return trap — in the file. The live guest is untouched.
pub fn write_memory_image(
    path: &Path,
    regions: &[Region],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    originals: &[(u64, Vec<u8>)],
) -> Result<(), SnapshotError> {
    let werr = |e: &dyn std::fmt::Display| SnapshotError::Write {
        path: path.to_owned(),
        cause: e.to_string(),
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| werr(&e))?;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    for r in regions {
        f.seek(SeekFrom::Start(r.file_offset))
            .map_err(|e| werr(&e))?;
        let mut done = 0u64;
        while done < r.len {
            let n = ((r.len - done) as usize).min(CHUNK);
            read(r.gpa + done, &mut buf[..n]).map_err(|e| werr(&e))?;
            f.write_all(&buf[..n]).map_err(|e| werr(&e))?;
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
    f.sync_all().map_err(|e| werr(&e))
}

/// A `MAP_PRIVATE` (copy-on-write) mapping of part of a snapshot's memory file.
pub struct PrivateMap {
    ptr: *mut u8,
    len: usize,
}

// The mapping is plain memory; users synchronise access like any guest RAM.
unsafe impl Send for PrivateMap {}
unsafe impl Sync for PrivateMap {}

impl PrivateMap {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PrivateMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Map `len` bytes of `path` at `offset` copy-on-write. Pages are read lazily
/// on first touch; writes never reach the file.
pub fn map_private(path: &Path, offset: u64, len: u64) -> Result<PrivateMap, SnapshotError> {
    use std::os::fd::AsRawFd;
    let merr = |cause: String| SnapshotError::Map {
        path: path.to_owned(),
        cause,
    };
    let f = File::open(path).map_err(|e| merr(e.to_string()))?;
    let len = usize::try_from(len).map_err(|e| merr(e.to_string()))?;
    // SAFETY: a fresh private file mapping; the fd may be closed afterwards.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            f.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(merr(std::io::Error::last_os_error().to_string()));
    }
    Ok(PrivateMap {
        ptr: ptr.cast(),
        len,
    })
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

        let a = map_private(&path, 0, 12288).unwrap();
        let b = map_private(&path, 0, 12288).unwrap();
        // SAFETY: both mappings are 12288 bytes long.
        unsafe {
            assert_eq!(*a.as_ptr().add(0x1000), 0x55);
            *a.as_ptr().add(0x1000) = 0x11;
            assert_eq!(
                *b.as_ptr().add(0x1000),
                0x55,
                "copy-on-write is per mapping"
            );
        }
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
