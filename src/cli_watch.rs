//! `hvprobe watch add|ls|rm|hits`: watches on guest data of a running
//! `hvprobe run` (the API's WatchMemory, ListWatches, UnwatchMemory,
//! TakeWatchHits).

use anyhow::Result;
use proto::v1;

use crate::cli::{connect, runtime, status, ServerArg};

#[derive(clap::Subcommand, Clone)]
pub enum WatchAction {
    /// Watch LENGTH bytes at a kernel SYMBOL[+OFF] or address.
    Add {
        location: String,
        /// Bytes (1..4096).
        #[arg(default_value_t = 8)]
        length: u64,
        /// Reads too (needs the debug-register mechanism).
        #[arg(long)]
        rw: bool,
        /// `page` (default: a read-only memory slot, any number, any host)
        /// or `dr` (a debug-register data breakpoint, where the host
        /// delivers them for guest kernel code).
        #[arg(long, value_parser = ["page", "dr"])]
        mechanism: Option<String>,
    },
    /// List watches with their mechanism and hits.
    Ls,
    /// Remove a watch by id.
    Rm { id: u64 },
    /// Print the hits recorded since the last call, one line each.
    Hits {
        /// Wait up to this many milliseconds for a first hit.
        #[arg(long, default_value_t = 0)]
        wait_ms: u32,
    },
}

fn mechanism_name(m: i32) -> &'static str {
    match v1::WatchMechanism::try_from(m) {
        Ok(v1::WatchMechanism::WatchDebugRegister) => "dr",
        _ => "page",
    }
}

fn print_watch(w: &v1::WatchInfo) {
    let access = if w.access == v1::WatchAccess::WatchReadWrite as i32 {
        "rw"
    } else {
        "w"
    };
    let pages: Vec<String> = w.pages.iter().map(|p| format!("{p:#x}")).collect();
    println!(
        "{}\t{}\t{:#x}+{}\t{access}\t{}\tpages {}\thits {}",
        w.id,
        w.location,
        w.address,
        w.length,
        mechanism_name(w.mechanism),
        pages.join(","),
        w.hits
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn watch(server: &ServerArg, action: WatchAction) -> Result<u8> {
    runtime()?.block_on(async {
        let mut c = connect(server).await?;
        match action {
            WatchAction::Add {
                location,
                length,
                rw,
                mechanism,
            } => {
                let mechanism = match mechanism.as_deref() {
                    Some("page") => v1::WatchMechanism::WatchPage,
                    Some("dr") => v1::WatchMechanism::WatchDebugRegister,
                    _ => v1::WatchMechanism::Default,
                };
                let r = c
                    .watch_memory(v1::WatchMemoryRequest {
                        location,
                        length,
                        access: if rw {
                            v1::WatchAccess::WatchReadWrite
                        } else {
                            v1::WatchAccess::WatchWrite
                        } as i32,
                        mechanism: mechanism as i32,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(w) = r.watch {
                    print_watch(&w);
                }
            }
            WatchAction::Ls => {
                let r = c
                    .list_watches(v1::ListWatchesRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                for w in &r.watches {
                    print_watch(w);
                }
            }
            WatchAction::Rm { id } => {
                let r = c
                    .unwatch_memory(v1::UnwatchMemoryRequest { id })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(w) = r.watch {
                    print_watch(&w);
                }
            }
            WatchAction::Hits { wait_ms } => {
                let r = c
                    .take_watch_hits(v1::TakeWatchHitsRequest { wait_ms })
                    .await
                    .map_err(status)?
                    .into_inner();
                for h in &r.hits {
                    println!(
                        "watch {} {} cpu {} pid {} {}: {} wrote {}@{:#x} old {} new {}",
                        h.watch_id,
                        h.location,
                        h.vcpu,
                        h.pid,
                        h.comm,
                        h.writer,
                        h.length,
                        h.address,
                        hex(&h.old_value),
                        hex(&h.new_value)
                    );
                }
                if r.dropped > 0 {
                    eprintln!("{} hits dropped (queue full)", r.dropped);
                }
            }
        }
        Ok(0)
    })
}
