//! What the export file and the push sinks send alike: the
//! [`v1::ExportRecord`] envelope, and the losses owed as `lost` records
//! until one can be written or delivered.

use proto::v1::{self, export_record::Record};

use crate::time::now_ns;

/// Version of the [`v1::ExportRecord`] envelope written.
pub const EXPORT_VERSION: u32 = 1;

/// Events lost and not yet reported in band, for one reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Owed {
    pub count: u64,
    pub since_ns: u64,
    pub until_ns: u64,
}

impl Owed {
    pub fn add(&mut self, count: u64, since_ns: u64, until_ns: u64) {
        if count == 0 {
            return;
        }
        if self.count == 0 || since_ns < self.since_ns {
            self.since_ns = since_ns;
        }
        self.until_ns = self.until_ns.max(until_ns);
        self.count += count;
    }

    /// The `lost` record that reports it.
    pub fn lost(&self, reason: v1::LostReason) -> Record {
        Record::Lost(v1::LostEvents {
            count: self.count,
            since_ns: self.since_ns,
            until_ns: self.until_ns,
            probe_ids: Vec::new(),
            reason: reason as i32,
        })
    }
}

/// A record of `vm`, numbered when it is sent (`record_seq` 0 until then).
pub(crate) fn envelope(
    vm: &v1::VmIdentity,
    time: String,
    process: Option<v1::GuestProcess>,
    r: Record,
) -> v1::ExportRecord {
    v1::ExportRecord {
        version: EXPORT_VERSION,
        time,
        vm: Some(vm.clone()),
        process,
        record_seq: 0,
        record: Some(r),
    }
}

/// The identity of this run: host name, the given VM name, and an id unique
/// per start (start time and process id).
pub fn vm_identity(name: &str) -> v1::VmIdentity {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a local array, exclusively borrowed for the call, and
    // gethostname(2) writes at most `buf.len()` bytes into it and keeps no
    // pointer after returning. A truncated name may lack its NUL, which the
    // search for the end below allows for (it then takes the whole buffer).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    v1::VmIdentity {
        host,
        name: name.to_string(),
        instance: format!("{:x}-{}", now_ns(), std::process::id()),
    }
}
