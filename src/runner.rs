//! Booting a guest from the command line.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

/// Boot the guest described by `config` and wait for it; returns the process
/// exit code that reflects the guest's fate.
pub fn boot(config: vmm::VmConfig) -> Result<u8> {
    let started = Instant::now();
    let vm = vmm::Vm::create(&config)?;
    let running = vm.start(Arc::new(guest_access::NoProbes))?;
    let outcome = running.wait();
    eprintln!(
        "hvprobe: {outcome} after {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(outcome.exit_code() as u8)
}
