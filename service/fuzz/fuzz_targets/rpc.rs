#![no_main]
//! Every hvprobe.v1 request handler on arbitrary bytes: the input is a
//! sequence of calls `[op: u8][len: u16 LE][len bytes]`; the bytes are
//! decoded as the op's request message (prost, as tonic decodes a request
//! body) and, when that succeeds, the real `HvProbe` handler runs on it.
//! One input is one fresh service (engine, probe table, admissions) over a
//! fake VM holding the test guest's kernel: creates really plant `int3`s in
//! the fake RAM and deletes restore the bytes, so state carries from call to
//! call within an input (create, then enable/get/list/subscribe/delete).
//! Nothing may panic, and every probe deleted must leave the text as it was.
//!
//! The VM: guest RAM is the test guest's loaded segments at their physical
//! addresses, copied once; each input writes into a page overlay that is
//! dropped afterwards. No vCPU thread exists, so the engine sees a guest
//! before boot (kernel text at its link address), as for `--probe` probes.
//! No snapshot writer is installed: CreateSnapshot must refuse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use guest_access::fake::FakeVm;
use guest_access::{AccessError, GuestMemory};
use introspect::{Engine, EngineConfig};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::v1::{self, hv_probe_server::HvProbe};
use service::{Guest, HvProbeService, ServiceConfig, Symbols};
use tokio_stream::StreamExt;
use tonic::Request;

const PAGE: usize = 4096;

/// The test guest's RAM image, shared read-only by every input.
struct Base {
    bytes: Vec<u8>,
    symbols: Arc<Symbols>,
}

fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let img = guest_symbols::KernelImage::from_bytes(test_guest::kernel_image().to_vec())
            .expect("test guest ELF");
        let ranges: Vec<(u64, u64)> = img.loaded_ranges().collect();
        let end = ranges
            .iter()
            .map(|r| r.1 - introspect::KERNEL_TEXT_MAP)
            .max()
            .unwrap_or(0);
        // Room above the kernel, rounded to pages.
        let mut bytes = vec![0u8; (end as usize + (1 << 20)).next_multiple_of(PAGE)];
        for (s, e) in ranges {
            let gpa = (s - introspect::KERNEL_TEXT_MAP) as usize;
            // Segments as loaded: file bytes, then .bss zeros.
            guest_symbols::GuestMemory::read_virt(&img, s, &mut bytes[gpa..gpa + (e - s) as usize])
                .expect("reading a loaded segment");
        }
        let symbols = Symbols::from_vmlinux(test_guest::kernel_path()).expect("test guest symbols");
        Base {
            bytes,
            symbols: Arc::new(symbols),
        }
    })
}

/// Guest RAM: the base image under a per-input overlay of written pages.
struct FakeRam {
    base: &'static [u8],
    dirty: Mutex<HashMap<usize, Box<[u8; PAGE]>>>,
}

impl FakeRam {
    fn check(&self, gpa: u64, len: usize) -> Result<usize, AccessError> {
        let out = AccessError::OutOfRam { gpa, len };
        let start = usize::try_from(gpa).map_err(|_| out.clone())?;
        match start.checked_add(len) {
            Some(end) if end <= self.base.len() => Ok(start),
            _ => Err(out),
        }
    }

    /// Whether the RAM reads as the base image again.
    fn pristine(&self) -> bool {
        let d = self.dirty.lock().unwrap();
        d.iter()
            .all(|(p, page)| page[..] == self.base[p * PAGE..(p + 1) * PAGE])
    }
}

impl GuestMemory for FakeRam {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let mut at = self.check(gpa, buf.len())?;
        let d = self.dirty.lock().unwrap();
        let mut done = 0;
        while done < buf.len() {
            let (p, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(buf.len() - done);
            let src = match d.get(&p) {
                Some(page) => &page[off..off + n],
                None => &self.base[at..at + n],
            };
            buf[done..done + n].copy_from_slice(src);
            done += n;
            at += n;
        }
        Ok(())
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut at = self.check(gpa, data.len())?;
        let mut d = self.dirty.lock().unwrap();
        let mut done = 0;
        while done < data.len() {
            let (p, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(data.len() - done);
            let page = d.entry(p).or_insert_with(|| {
                let mut b = Box::new([0u8; PAGE]);
                b.copy_from_slice(&self.base[p * PAGE..(p + 1) * PAGE]);
                b
            });
            page[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
            at += n;
        }
        Ok(())
    }

    fn ram_end(&self) -> u64 {
        self.base.len() as u64
    }
}

/// Small limits so that the limit paths are reachable by short inputs and
/// a subscription's queue is cheap.
fn config() -> ServiceConfig {
    ServiceConfig {
        max_probes: 8,
        max_subscribers: 2,
        default_queue_capacity: 64,
        max_queue_capacity: 256,
        max_queued_events_total: 384,
        default_batch_events: 16,
        max_batch_events: 64,
        default_batch_delay_ms: 1,
        max_batch_delay_ms: 10,
    }
}

/// Decodes `bytes` as `$req` and awaits the handler; `Err` answers are fine.
macro_rules! call {
    ($svc:expr, $bytes:expr, $req:ty, $method:ident) => {
        if let Ok(r) = <$req>::decode($bytes) {
            let a = <HvProbeService as HvProbe>::$method($svc, Request::new(r)).await;
            trace(stringify!($method), &a);
        }
    };
}

/// `RPC_FUZZ_TRACE=1 rpc FILE...` prints every call's answer (to check seeds).
fn trace<T: std::fmt::Debug>(what: &str, answer: &T) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("RPC_FUZZ_TRACE").is_some()) {
        eprintln!("{what}: {answer:?}");
    }
}

async fn run(svc: &HvProbeService, data: &[u8]) {
    let mut rest = data;
    // Bounded work per input.
    for _ in 0..24 {
        let Some((&op, tail)) = rest.split_first() else {
            break;
        };
        let Some((len, tail)) = tail.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (msg, tail) = tail.split_at(len);
        rest = tail;
        match op % 15 {
            0 => call!(svc, msg, v1::CreateProbeRequest, create_probe),
            1 => call!(svc, msg, v1::CreateProbesRequest, create_probes),
            2 => call!(svc, msg, v1::DeleteProbeRequest, delete_probe),
            3 => call!(svc, msg, v1::DeleteProbesRequest, delete_probes),
            4 => call!(svc, msg, v1::EnableProbeRequest, enable_probe),
            5 => call!(svc, msg, v1::DisableProbeRequest, disable_probe),
            6 => call!(svc, msg, v1::ArmRequest, arm),
            7 => call!(svc, msg, v1::DisarmRequest, disarm),
            8 => call!(svc, msg, v1::ListProbesRequest, list_probes),
            9 => call!(svc, msg, v1::GetProbeRequest, get_probe),
            10 => call!(svc, msg, v1::ResolveSymbolRequest, resolve_symbol),
            11 => call!(svc, msg, v1::GetGuestInfoRequest, get_guest_info),
            12 => {
                if let Ok(r) = v1::SubscribeRequest::decode(msg) {
                    let a = HvProbe::subscribe(svc, Request::new(r)).await;
                    trace("subscribe", &a.as_ref().map(|_| "stream"));
                    if let Ok(resp) = a {
                        // The first message is `started`; then the stream
                        // is dropped, as by a client that goes away.
                        let mut s = resp.into_inner();
                        let first = s.next().await;
                        assert!(
                            matches!(
                                first,
                                Some(Ok(v1::SubscribeResponse {
                                    payload: Some(v1::subscribe_response::Payload::Started(_))
                                }))
                            ),
                            "a stream must start with `started`: {first:?}"
                        );
                    }
                }
            }
            13 => {
                if let Ok(r) = v1::CreateSnapshotRequest::decode(msg) {
                    let e = HvProbe::create_snapshot(svc, Request::new(r)).await;
                    trace("create_snapshot", &e);
                    assert!(e.is_err(), "no snapshot writer, yet: {e:?}");
                }
            }
            _ => call!(svc, msg, v1::GetProbeRequest, get_probe),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let b = base();
    // Two vCPUs that never run: nobody to stop.
    let ram = FakeRam {
        base: &b.bytes,
        dirty: Mutex::new(HashMap::new()),
    };
    let vm = Arc::new(FakeVm::new(ram, 2));
    let engine = Engine::new(vm.clone(), b.symbols.clone(), EngineConfig::for_vcpus(2));
    if let Some(trap) = b.symbols.return_trap_candidate() {
        engine.set_return_trap(trap).expect("return trap");
    }
    let guest = Guest::new(vm.clone());
    guest.set_state(v1::GuestState::Running);
    let svc = HvProbeService::new(engine.clone(), b.symbols.clone(), guest, config());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        run(&svc, data).await;
        // Every probe gone restores every byte the engine wrote.
        let all = v1::DeleteProbesRequest {
            all: true,
            ..Default::default()
        };
        HvProbe::delete_probes(&svc, Request::new(all))
            .await
            .expect("deleting all probes");
    });
    drop(rt);
    assert!(engine.list().is_empty(), "probes left after deleting all");
    assert!(
        vm.mem().pristine(),
        "guest text not restored after deleting all probes"
    );
});
