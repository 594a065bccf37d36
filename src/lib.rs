//! Glue between hvprobe's crates that the binary, the benchmarks and the
//! integration tests share.

pub mod snapshots;

use std::sync::Arc;

use anyhow::{Context, Result};
use introspect::{Engine, EngineConfig};
use service::{Guest, HvProbeService, ServiceConfig, Symbols};

/// The probe engine, the service's view of the guest and the API service
/// over one VM, as `hvprobe run` wires them.
pub struct Attached {
    pub engine: Arc<Engine>,
    pub guest: Arc<Guest>,
    pub service: HvProbeService,
}

/// Put the probe engine (with its kretprobe return trap, when the symbols
/// offer a padding byte for one) and the API service over `vm`, with
/// `CreateSnapshot` writing this VM.
pub fn attach(vm: &vmm::Vm, symbols: Arc<Symbols>, config: ServiceConfig) -> Result<Attached> {
    let control = vm.control();
    let vcpus = guest_access::VmControl::vcpu_count(&*control);
    let engine = Engine::new(
        control.clone(),
        symbols.clone(),
        EngineConfig::for_vcpus(vcpus),
    );
    // Where the kernel may be randomized, the trap's address is known only
    // with the slide: the service places it then (`settle_slide`).
    match symbols.return_trap_candidate() {
        Some(_) if vm.kaslr_possible() => {}
        Some(t) => engine
            .set_return_trap(t)
            .with_context(|| format!("setting the kretprobe return trap at {t:#x}"))?,
        None => tracing::warn!("no padding byte for a return trap: kretprobes are unavailable"),
    }
    let guest = Guest::new(control);
    guest.set_kaslr_possible(vm.kaslr_possible());
    guest.set_snapshot_writer(snapshots::writer_for(vm));
    let service = HvProbeService::new(engine.clone(), symbols, guest.clone(), config);
    Ok(Attached {
        engine,
        guest,
        service,
    })
}
