//! `hvprobe`: hypervisor-side kprobes for KVM guests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod bench;
mod runner;

#[derive(Parser)]
#[command(
    name = "hvprobe",
    version,
    about = "Hypervisor-side kprobes and kretprobes for KVM guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct GuestArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Where the serial console goes: `stdout` or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel (ELF vmlinux with a PVH note, or bzImage).
    Run {
        /// Kernel image.
        #[arg(long)]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Measure probe costs against a bare VM exit (test guest).
    Bench(bench::BenchArgs),
    /// Boot the bundled test guest (no downloads needed).
    Demo {
        /// Test-guest command line (e.g. `hvtest.iters=500`).
        #[arg(long, default_value = "")]
        cmdline: String,
        #[command(flatten)]
        guest: GuestArgs,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HVPROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            kernel,
            initrd,
            cmdline,
            guest,
        } => runner::boot(guest.config(kernel, initrd, cmdline)),
        Command::Bench(args) => bench::run(args),
        Command::Demo { cmdline, guest } => {
            runner::boot(guest.config(test_guest::kernel_path().to_owned(), None, cmdline))
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hvprobe: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

impl GuestArgs {
    fn config(&self, kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String) -> vmm::VmConfig {
        let mut c = vmm::VmConfig::new(kernel);
        c.initrd = initrd;
        c.cmdline = cmdline;
        c.vcpus = self.vcpus;
        c.memory_mib = self.memory;
        c.kvm_device = self.kvm_device.clone();
        c.serial = if self.serial == "stdout" {
            vmm::SerialOutput::Stdout
        } else {
            vmm::SerialOutput::File(PathBuf::from(&self.serial))
        };
        c
    }
}

#[allow(dead_code)]
fn _assert_send_sync(_: Arc<dyn guest_access::BreakpointHandler>) {}
