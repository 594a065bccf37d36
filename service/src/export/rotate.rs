//! The export file: appended a whole line at a time (a failed write is
//! cut back to the last whole line), rotated by size into `backups`
//! numbered files, optionally gzipped, all of them mode 0600.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::ExportConfig;

/// Mode of every file the exporter creates.
const FILE_MODE: u32 = 0o600;

/// The export file and its rotated backups.
pub(super) struct Rotator {
    pub(super) path: PathBuf,
    max_bytes: u64,
    backups: u32,
    gzip: bool,
    pub(super) file: Option<File>,
    /// Bytes in the current file (whole lines).
    len: u64,
}

pub(super) fn create_private(path: &Path, append: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).mode(FILE_MODE);
    if append {
        o.append(true);
    } else {
        o.truncate(true);
    }
    let f = o.open(path)?;
    // An existing file keeps its mode through open(2): make it private.
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

impl Rotator {
    pub(super) fn open(cfg: &ExportConfig) -> io::Result<Rotator> {
        if cfg.max_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the size limit must be above 0",
            ));
        }
        let file = create_private(&cfg.path, true)?;
        let len = file.metadata()?.len();
        Ok(Rotator {
            path: cfg.path.clone(),
            max_bytes: cfg.max_bytes,
            backups: cfg.backups,
            gzip: cfg.gzip,
            file: Some(file),
            len,
        })
    }

    /// Whether a line of `more` bytes, after `pending` bytes not yet
    /// written, would take a non-empty file past the limit.
    pub(super) fn needs_rotation(&self, pending: u64, more: u64) -> bool {
        let before = self.len + pending;
        before > 0 && before + more > self.max_bytes
    }

    /// Append whole lines, or nothing: a failed write is cut back.
    pub(super) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(create_private(&self.path, true)?);
            self.len = self
                .file
                .as_ref()
                .map_or(Ok(0), |f| f.metadata().map(|m| m.len()))?;
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("no file"));
        };
        match f.write_all(bytes) {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Appends go to the end: cutting back to the known length
                // removes exactly the partial write.
                let _ = f.set_len(self.len);
                Err(e)
            }
        }
    }

    pub(super) fn backup(&self, i: u32, gz: bool) -> PathBuf {
        let mut s = self.path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        if gz {
            s.push(".gz");
        }
        PathBuf::from(s)
    }

    /// The existing backup `i`, compressed or not.
    fn existing(&self, i: u32) -> Option<PathBuf> {
        [true, false]
            .into_iter()
            .map(|gz| self.backup(i, gz))
            .find(|p| p.exists())
    }

    /// Shift the backups, move the file to `.1` (compressing it when asked)
    /// and start a new one. Ok(false): compressing failed, `.1` is plain.
    pub(super) fn rotate(&mut self) -> io::Result<bool> {
        self.file = None;
        if self.backups == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            // Backups are numbered 1..n without a gap: look at those only
            // (K may be large).
            let mut n = 0;
            while n < self.backups && self.existing(n + 1).is_some() {
                n += 1;
            }
            if n == self.backups {
                if let Some(p) = self.existing(n) {
                    std::fs::remove_file(p)?;
                }
                n -= 1;
            }
            for i in (1..=n).rev() {
                if let Some(p) = self.existing(i) {
                    let gz = p.extension().is_some_and(|e| e == "gz");
                    std::fs::rename(&p, self.backup(i + 1, gz))?;
                }
            }
            std::fs::rename(&self.path, self.backup(1, false))?;
        }
        self.file = Some(create_private(&self.path, false)?);
        self.len = 0;
        if self.gzip && self.backups > 0 {
            let plain = self.backup(1, false);
            let gz = self.backup(1, true);
            if gzip_file(&plain, &gz).is_err() {
                let _ = std::fs::remove_file(&gz);
                return Ok(false);
            }
            std::fs::remove_file(&plain)?;
        }
        Ok(true)
    }
}

/// Compress `from` into `to` (mode 0600), complete or not at all.
fn gzip_file(from: &Path, to: &Path) -> io::Result<()> {
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let r = (|| {
        let mut input = File::open(from)?;
        let out = create_private(&tmp, false)?;
        let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        io::copy(&mut input, &mut enc)?;
        enc.finish()?.sync_all()?;
        std::fs::rename(&tmp, to)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proto::v1;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn cfg(dir: &Path, max: u64, backups: u32, gzip: bool) -> ExportConfig {
        let mut c = ExportConfig::new(dir.join("ev.jsonl"), v1::VmIdentity::default());
        c.max_bytes = max;
        c.backups = backups;
        c.gzip = gzip;
        c
    }

    pub(crate) fn read(p: &Path) -> String {
        let mut s = String::new();
        if p.extension().is_some_and(|e| e == "gz") {
            flate2::read::GzDecoder::new(File::open(p).unwrap())
                .read_to_string(&mut s)
                .unwrap();
        } else {
            File::open(p).unwrap().read_to_string(&mut s).unwrap();
        }
        s
    }

    #[test]
    fn rotates_between_lines_keeps_k_backups_gzipped_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 25, 3, true);
        // A file left by an earlier run with another mode: appended, made private.
        std::fs::write(&c.path, b"old\n").unwrap();
        std::fs::set_permissions(&c.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut r = Rotator::open(&c).unwrap();
        let mut all = vec!["old\n".to_string()];
        for i in 0..20 {
            let line = format!("line {i:02}\n"); // 8 bytes
            if r.needs_rotation(0, line.len() as u64) {
                assert!(r.rotate().unwrap());
            }
            r.append(line.as_bytes()).unwrap();
            all.push(line);
        }
        // 3 lines a file (24 bytes; "old" and 2 lines first): the last
        // four files hold lines 08..19.
        let mut files: Vec<PathBuf> = (1..=3).rev().map(|i| r.backup(i, true)).collect();
        files.push(c.path.clone());
        let mut got = String::new();
        for f in &files {
            let meta = std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", f.display());
            let text = read(f);
            assert!(text.len() <= 25 && text.ends_with('\n'), "{text:?}");
            got.push_str(&text);
        }
        assert!(!r.backup(4, true).exists() && !r.backup(1, false).exists());
        // The newest 3 backups and the current file: the last lines, in order.
        let want: String = all.concat();
        assert!(want.ends_with(&got), "{got:?}");
        assert_eq!(got.lines().count(), 12, "{got:?}");
    }

    #[test]
    fn no_backups_starts_the_file_anew() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 10, 0, true);
        let mut r = Rotator::open(&c).unwrap();
        r.append(b"aaaaaaaa\n").unwrap();
        assert!(r.needs_rotation(0, 9));
        r.rotate().unwrap();
        r.append(b"bbbbbbbb\n").unwrap();
        assert_eq!(read(&c.path), "bbbbbbbb\n");
        assert!(!r.backup(1, true).exists() && !r.backup(1, false).exists());
    }

    #[test]
    fn a_record_longer_than_the_limit_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 4, 2, false);
        let mut r = Rotator::open(&c).unwrap();
        assert!(!r.needs_rotation(0, 100), "an empty file takes any record");
        assert!(r.needs_rotation(1, 4), "... but not what follows it");
        assert!(!r.needs_rotation(1, 3));
        r.append(b"0123456789\n").unwrap();
        assert!(r.needs_rotation(0, 1));
    }
}
