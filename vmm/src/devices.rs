//! Port I/O devices: the 16550 console, the test-guest exit port, the ACPI
//! sleep/reset registers and the keyboard controller's reset line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;

pub use crate::layout::{SERIAL_BASE, SERIAL_IRQ};

/// The 16550 register a port in `SERIAL_BASE..=0x3ff` selects (0..=7).
// The callers' match arms bound the port, so the difference is at most 7.
#[allow(clippy::cast_possible_truncation)]
fn serial_offset(port: u16) -> u8 {
    (port - SERIAL_BASE) as u8
}
/// The test guest writes its 32-bit exit status here (`outl`).
pub const EXIT_PORT: u16 = 0xf4;
/// A guest writes a 32-bit tag here (`outl`); the VMM records it with the host
/// time, so benchmarks can time guest phases without a guest clock.
pub const MARKER_PORT: u16 = 0xf5;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// What a port write asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAction {
    None,
    /// The guest reported its exit status on [`EXIT_PORT`].
    Exit(u32),
    /// A timing marker on [`MARKER_PORT`].
    Marker(u32),
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// Reset through the ACPI reset register or the i8042.
    Reset(&'static str),
}

/// Raises the serial IRQ through an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console goes.
#[derive(Clone)]
pub enum SerialOutput {
    Stdout,
    File(std::path::PathBuf),
    /// Kept in memory (tests read it).
    Capture(Arc<Mutex<Vec<u8>>>),
    Discard,
}

/// Writes to the chosen sink and, when capturing, to a shared buffer.
pub struct ConsoleWriter {
    sink: Box<dyn Write + Send>,
    /// For stdout only: the guest's current, unfinished line. The 16550
    /// hands us one byte at a time while other threads (the demo's event
    /// printer) print whole lines to the same stdout; writing the console
    /// a line at a time under the stdout lock keeps both readable
    /// (a CI run saw `hvtescpu0 open: ...` split a guest line).
    line: Option<Vec<u8>>,
}

/// A partial line longer than this is written out anyway.
const MAX_HELD_LINE: usize = 4096;

impl ConsoleWriter {
    pub fn new(out: &SerialOutput) -> std::io::Result<Self> {
        Ok(match out {
            SerialOutput::Stdout => Self::line_buffered(Box::new(std::io::stdout())),
            SerialOutput::File(p) => Self::unbuffered(Box::new(std::fs::File::create(p)?)),
            SerialOutput::Capture(buf) => Self::unbuffered(Box::new(CaptureWriter(buf.clone()))),
            SerialOutput::Discard => Self::unbuffered(Box::new(std::io::sink())),
        })
    }

    fn unbuffered(sink: Box<dyn Write + Send>) -> Self {
        Self { sink, line: None }
    }

    fn line_buffered(sink: Box<dyn Write + Send>) -> Self {
        Self {
            sink,
            line: Some(Vec::new()),
        }
    }

    /// Writes the held bytes up to and including the last newline (all of
    /// them when `everything`) in one call.
    fn write_held(&mut self, everything: bool) -> std::io::Result<()> {
        let Some(line) = self.line.as_mut() else {
            return Ok(());
        };
        let upto = if everything || line.len() >= MAX_HELD_LINE {
            line.len()
        } else {
            match line.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => return Ok(()),
            }
        };
        if upto == 0 {
            return Ok(());
        }
        let done: Vec<u8> = line.drain(..upto).collect();
        self.sink.write_all(&done)?;
        self.sink.flush()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(line) = self.line.as_mut() {
            line.extend_from_slice(buf);
            self.write_held(false)?;
            return Ok(buf.len());
        }
        // Flush per write so a crashed guest's last words are not lost.
        let n = self.sink.write(buf)?;
        self.sink.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.line.is_some() {
            return self.write_held(false);
        }
        self.sink.flush()
    }
}

impl Drop for ConsoleWriter {
    /// A guest that stops mid-line (a crash, a prompt) still has its last
    /// words printed.
    fn drop(&mut self) {
        let _ = self.write_held(true);
    }
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// All port-I/O devices of the VM.
pub struct PortBus {
    serial: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl PortBus {
    pub fn new(irq: EventFd, console: ConsoleWriter) -> Self {
        Self {
            serial: Serial::new(IrqLine(irq), console),
        }
    }

    /// Host-to-guest console input: queue `bytes` in the 16550 receive FIFO
    /// (64 bytes), set LSR data-ready and raise IRQ 4 when the guest enabled
    /// the received-data interrupt. Returns how many bytes fit; the caller
    /// retries the rest once the guest has drained the FIFO.
    /// The bus with the 16550 as a snapshot left it (registers and FIFO).
    pub fn from_state(
        irq: EventFd,
        console: ConsoleWriter,
        state: &vm_superio::serial::SerialState,
    ) -> Result<Self, String> {
        let serial = Serial::from_state(state, IrqLine(irq), vm_superio::serial::NoEvents, console)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { serial })
    }

    pub fn console_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                tracing::warn!("serial input failed: {e:?}");
                0
            }
        }
    }

    /// The 16550's registers and receive FIFO (for snapshots).
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            SERIAL_BASE..=0x3ff if data.len() == 1 => {
                data[0] = self.serial.read(serial_offset(port));
            }
            // i8042 status: nothing to read, input buffer empty.
            I8042_COMMAND => data.fill(0),
            acpi::SLEEP_STATUS_PORT => data.fill(0),
            // Absent devices float high, as on real hardware.
            _ => data.fill(0xff),
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> PortAction {
        match port {
            SERIAL_BASE..=0x3ff if data.len() == 1 => {
                if let Err(e) = self.serial.write(serial_offset(port), data[0]) {
                    tracing::warn!("serial write failed: {e:?}");
                }
                PortAction::None
            }
            EXIT_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                PortAction::Exit(u32::from_le_bytes(b))
            }
            MARKER_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                PortAction::Marker(u32::from_le_bytes(b))
            }
            acpi::SLEEP_CONTROL_PORT if data.first().is_some_and(|v| v & 0x20 != 0) => {
                PortAction::PowerOff
            }
            acpi::RESET_PORT if data.first() == Some(&acpi::RESET_VALUE) => {
                PortAction::Reset("ACPI reset register")
            }
            I8042_COMMAND if data.first() == Some(&I8042_RESET) => {
                PortAction::Reset("keyboard controller reset")
            }
            _ => PortAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (PortBus, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = ConsoleWriter::new(&SerialOutput::Capture(buf.clone())).unwrap();
        (PortBus::new(EventFd::new(0).unwrap(), w), buf)
    }

    #[test]
    fn serial_thr_reaches_the_console() {
        let (mut b, buf) = bus();
        for c in b"hi\n" {
            assert_eq!(b.write(SERIAL_BASE, &[*c]), PortAction::None);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn stdout_console_writes_whole_lines_and_its_last_words_on_drop() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut w = ConsoleWriter::line_buffered(Box::new(CaptureWriter(buf.clone())));
        for c in b"hvtest: user ok\nhal" {
            w.write_all(&[*c]).unwrap();
            w.flush().unwrap();
            let seen = buf.lock().unwrap().clone();
            assert!(
                seen.is_empty() || seen == b"hvtest: user ok\n",
                "partial line written: {:?}",
                String::from_utf8_lossy(&seen)
            );
        }
        assert_eq!(&*buf.lock().unwrap(), b"hvtest: user ok\n");
        // A line that never ends is not held forever.
        w.write_all(&[b'x'; MAX_HELD_LINE]).unwrap();
        assert_eq!(buf.lock().unwrap().len(), 16 + 3 + MAX_HELD_LINE);
        w.write_all(b"panic").unwrap();
        drop(w);
        assert!(buf.lock().unwrap().ends_with(b"xpanic"));
    }

    #[test]
    fn console_input_reaches_the_guest_with_its_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let w = ConsoleWriter::new(&SerialOutput::Discard).unwrap();
        let mut b = PortBus::new(irq.try_clone().unwrap(), w);
        let mut d = [0u8; 1];
        // LSR: nothing received yet.
        b.read(SERIAL_BASE + 5, &mut d);
        assert_eq!(d[0] & 1, 0);
        // Guest enables the received-data-available interrupt (IER bit 0).
        b.write(SERIAL_BASE + 1, &[1]);
        let _ = irq.read();
        assert_eq!(b.console_input(b"ls\n"), 3);
        assert_eq!(irq.read().unwrap(), 1, "IRQ raised");
        // IIR: received data available (0b0100).
        b.read(SERIAL_BASE + 2, &mut d);
        assert_eq!(d[0] & 0x0f, 0x04);
        let mut got = Vec::new();
        loop {
            b.read(SERIAL_BASE + 5, &mut d);
            if d[0] & 1 == 0 {
                break;
            }
            b.read(SERIAL_BASE, &mut d);
            got.push(d[0]);
        }
        assert_eq!(got, b"ls\n");
        // The FIFO holds 64 bytes; the rest is for the caller to retry.
        assert_eq!(b.console_input(&[b'x'; 100]), 64);
        assert_eq!(b.console_input(b"y"), 0);
        assert_eq!(b.serial_state().in_buffer.len(), 64);
    }

    #[test]
    fn exit_and_power_ports() {
        let (mut b, _) = bus();
        assert_eq!(b.write(EXIT_PORT, &7u32.to_le_bytes()), PortAction::Exit(7));
        assert_eq!(
            b.write(acpi::SLEEP_CONTROL_PORT, &[(5 << 2) | 0x20]),
            PortAction::PowerOff
        );
        assert_eq!(
            b.write(acpi::SLEEP_CONTROL_PORT, &[5 << 2]),
            PortAction::None
        );
        assert!(matches!(
            b.write(I8042_COMMAND, &[0xfe]),
            PortAction::Reset(_)
        ));
        assert!(matches!(
            b.write(acpi::RESET_PORT, &[acpi::RESET_VALUE]),
            PortAction::Reset(_)
        ));
        let mut d = [0u8; 1];
        b.read(0x80, &mut d);
        assert_eq!(d, [0xff]);
    }
}
