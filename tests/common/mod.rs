//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use object::{Object, ObjectSymbol};

/// Kernel virtual base of Linux's (and the test guest's) kernel-text mapping:
/// virtual `0xffffffff80000000 + x` is physical `x`.
pub const KERNEL_MAP_BASE: u64 = 0xffff_ffff_8000_0000;

/// True when tests needing /dev/kvm should run. With HVPROBE_REQUIRE_KVM=1 a
/// missing /dev/kvm fails the test instead of skipping it.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("HVPROBE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("HVPROBE_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
        }
        eprintln!("SKIPPED: /dev/kvm is not available");
    }
    ok
}

/// Address of `name` in the test guest's ELF symbol table.
pub fn symbol(name: &str) -> u64 {
    let data = std::fs::read(test_guest::kernel_path()).expect("read test guest");
    let file = object::File::parse(&*data).expect("parse test guest ELF");
    file.symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("symbol {name} not in the test guest"))
        .address()
}

pub fn phys(vaddr: u64) -> u64 {
    vaddr - KERNEL_MAP_BASE
}

/// A VM config for the test guest with captured serial output.
pub fn test_guest_config(vcpus: u8, cmdline: &str) -> (vmm::VmConfig, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut c = vmm::VmConfig::new(test_guest::kernel_path());
    c.vcpus = vcpus;
    c.memory_mib = 128;
    c.cmdline = cmdline.to_string();
    c.serial = vmm::SerialOutput::Capture(buf.clone());
    (c, buf)
}

pub fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

/// Read a u64 from guest-physical memory.
pub fn read_u64(mem: &dyn guest_access::GuestMemory, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read_phys(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Slot `func` of the guest's u64 counter array `array`.
fn counter_slot(mem: &dyn guest_access::GuestMemory, array: &str, func: &str) -> u64 {
    let idx = test_guest::counter_index(func)
        .unwrap_or_else(|| panic!("{func} is not a counted function"));
    read_u64(mem, phys(symbol(array)) + 8 * idx as u64)
}

/// The guest's own call counter of `func`.
pub fn guest_counter(mem: &dyn guest_access::GuestMemory, func: &str) -> u64 {
    counter_slot(mem, test_guest::COUNTER_SYMBOL, func)
}

/// What the guest's callers counted for `func` (equals the counter after a clean run).
pub fn guest_expected(mem: &dyn guest_access::GuestMemory, func: &str) -> u64 {
    counter_slot(mem, test_guest::EXPECTED_COUNTER_SYMBOL, func)
}

/// The engine's view of test-guest symbols (guest-symbols over the ELF),
/// with `entry_SYSCALL_64` blacklisted as on Linux.
pub fn guest_symbols() -> introspect::SymbolIndex {
    let image = guest_symbols::KernelImage::open(test_guest::kernel_path()).unwrap();
    let table = image.symbols().unwrap();
    let entry = symbol(test_guest::SYSCALL_ENTRY_SYMBOL);
    let blacklist = guest_symbols::Blacklist::from_entries(&table, &[entry]);
    introspect::SymbolIndex::new(table, Some(blacklist))
}

/// The probe engine over `control` with the test guest's symbols and its
/// kretprobe return trap in place.
pub fn test_engine(control: Arc<vmm::Machine>, vcpus: usize) -> Arc<introspect::Engine> {
    let symbols = Arc::new(guest_symbols());
    let trap = symbols.return_trap_candidate().unwrap();
    let engine =
        introspect::Engine::new(control, symbols, introspect::EngineConfig::for_vcpus(vcpus));
    engine.set_return_trap(trap).unwrap();
    engine
}

/// Offset of the first `lock`-prefixed instruction in `func` (the counter
/// increment): an instruction the emulator refuses.
pub fn first_locked_insn(mem: &dyn guest_access::GuestMemory, func: &str) -> u64 {
    let start = symbol(func);
    let mut code = vec![0u8; 256];
    mem.read_phys(phys(start), &mut code).unwrap();
    let mut off = 0usize;
    loop {
        let d = insn_emu::prepare(&code[off..], start + off as u64).unwrap();
        if d.bytes()[0] == 0xf0 {
            return start + off as u64;
        }
        off += d.len();
        assert!(off < 200, "no lock prefix in {func}");
    }
}

/// Guest-physical range of the test guest's loaded text (.text section).
pub fn text_range() -> (u64, u64) {
    use object::ObjectSection;
    let data = std::fs::read(test_guest::kernel_path()).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let s = file.section_by_name(".text").expect(".text");
    (phys(s.address()), phys(s.address()) + s.size())
}

/// FNV-1a hash of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Guest-physical bytes `[start, end)`.
pub fn read_range(mem: &dyn guest_access::GuestMemory, (start, end): (u64, u64)) -> Vec<u8> {
    let mut buf = vec![0u8; (end - start) as usize];
    mem.read_phys(start, &mut buf).unwrap();
    buf
}

/// FNV-1a hash of guest memory `[start, end)`.
pub fn hash_range(mem: &dyn guest_access::GuestMemory, range: (u64, u64)) -> u64 {
    fnv1a(&read_range(mem, range))
}

/// (function, address) of every instruction boundary of the test guest's C
/// functions in `.text` (they start with the ftrace nop or endbr64; the
/// assembly boot code runs in 32-bit and real mode). With `padding`, also
/// the "instructions" objdump shows in the padding after each function (up
/// to the next symbol, at most 64 bytes), as a user listing boundaries with
/// objdump would.
pub fn c_function_boundaries(padding: bool) -> Vec<(String, u64)> {
    use object::{ObjectSection, SymbolKind};
    let data = test_guest::kernel_image();
    let file = object::File::parse(data).unwrap();
    let text = file.section_by_name(".text").unwrap();
    let bytes = text.data().unwrap();
    let mut out = Vec::new();
    for s in file.symbols() {
        if s.kind() != SymbolKind::Text || s.size() == 0 || s.section_index() != Some(text.index())
        {
            continue;
        }
        let off = (s.address() - text.address()) as usize;
        let head = &bytes[off..(off + 9).min(bytes.len())];
        if !(head.starts_with(&[0x0f, 0x1f, 0x44, 0, 0])
            || head.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]))
        {
            continue;
        }
        let name = s.name().unwrap_or_default().to_string();
        let mut ip = s.address();
        let mut end = s.address() + s.size();
        if padding {
            end = file
                .symbols()
                .filter(|o| o.address() > s.address())
                .map(|o| o.address())
                .min()
                .unwrap_or(end)
                .min(end + 64);
        }
        while ip < end {
            let off = (ip - text.address()) as usize;
            let Ok(d) = insn_emu::prepare(&bytes[off..(off + 15).min(bytes.len())], ip) else {
                break;
            };
            out.push((name.clone(), ip));
            ip += d.len() as u64;
        }
    }
    out
}

/// Run the `hvprobe` binary: (exit code, stdout, stderr). Fails the test if
/// it panicked.
pub fn hvprobe_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(args)
        .output()
        .expect("run hvprobe");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "hvprobe panicked: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// `hvprobe run` of the bundled test guest, on a socket of its own in `dir`
/// (never the default one), with `extra` flags: for flags that must be
/// refused before the VM is created. (exit code, stdout, stderr)
pub fn hvprobe_run_test_guest(dir: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let sock = format!("unix:{}", dir.join("s.sock").display());
    let k = test_guest::kernel_path().to_str().unwrap();
    let mut args = vec!["run", "--kernel", k, "--listen", sock.as_str()];
    args.extend_from_slice(extra);
    hvprobe_cli(&args)
}

/// Exactly one non-empty stderr line, an `hvprobe: error:` containing `needle`.
pub fn assert_one_line_error(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("hvprobe: error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
}

/// A test-guest VM with the probe engine over it, not started yet.
pub struct Setup {
    pub vm: Option<vmm::Vm>,
    pub control: Arc<vmm::Machine>,
    pub engine: Arc<introspect::Engine>,
    pub serial: Arc<Mutex<Vec<u8>>>,
}

pub fn setup(vcpus: u8, cmdline: &str) -> Setup {
    let (config, serial) = test_guest_config(vcpus, cmdline);
    let vm = vmm::Vm::create(&config).expect("create VM");
    let control = vm.control();
    let engine = test_engine(control.clone(), vcpus as usize);
    Setup {
        vm: Some(vm),
        control,
        engine,
        serial,
    }
}

/// A VM with the probe engine and the API service over it.
pub struct Probed {
    pub vm: Option<vmm::Vm>,
    pub control: Arc<vmm::Machine>,
    pub engine: Arc<introspect::Engine>,
    pub svc: service::HvProbeService,
    pub guest: Arc<service::Guest>,
    pub serial: Arc<Mutex<Vec<u8>>>,
}

impl Probed {
    pub fn new(vm: vmm::Vm, serial: Arc<Mutex<Vec<u8>>>) -> Probed {
        let symbols = Arc::new(service::Symbols::from_vmlinux(test_guest::kernel_path()).unwrap());
        let a = hvprobe::attach(&vm, symbols, service::ServiceConfig::default()).unwrap();
        Probed {
            control: vm.control(),
            vm: Some(vm),
            engine: a.engine,
            svc: a.service,
            guest: a.guest,
            serial,
        }
    }

    pub fn start(&mut self) -> vmm::RunningVm {
        let r = self.vm.take().unwrap().start(self.engine.clone()).unwrap();
        self.guest.set_state(proto::v1::GuestState::Running);
        r
    }

    pub fn probe(&self, name: &str) -> introspect::ProbeInfo {
        self.engine
            .list()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no probe {name}"))
    }
}
