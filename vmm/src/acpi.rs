//! Minimal ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT, MADT.
//!
//! Debian's cloud kernel has no MP-table parsing, so SMP needs a MADT. The
//! FADT declares a hardware-reduced platform (no PM timer, no SCI, no legacy
//! PIC) with a sleep control register, so `poweroff` reaches the VMM as a
//! write to [`SLEEP_CONTROL_PORT`] and `reboot` as a write to [`RESET_PORT`].

use crate::layout;

/// I/O port of the FADT sleep control register (SLP_EN = bit 5).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the FADT sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the FADT reset register; [`RESET_VALUE`] written there resets.
pub const RESET_PORT: u16 = 0x602;
pub const RESET_VALUE: u8 = 0x0e;
/// The S5 sleep type the DSDT advertises (written as SLP_TYP << 2 | SLP_EN).
const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: &[u8; 6] = b"HVPRBE";
const OEM_TABLE_ID: &[u8; 8] = b"HVPROBE ";
const CREATOR_ID: &[u8; 4] = b"HVPB";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: header plus body, checksummed on `finish`.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(
        &u32::try_from(len)
            .expect("an ACPI table is far below 4 GiB")
            .to_le_bytes(),
    );
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// Generic Address Structure for a one-byte I/O port register.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // bit width
    g[2] = 0; // bit offset
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    let dsdt32 = u32::try_from(dsdt_addr).expect("the ACPI area is below 4 GiB");
    b[at(40)..at(44)].copy_from_slice(&dsdt32.to_le_bytes());
    // IAPC_BOOT_ARCH: no VGA, no CMOS RTC.
    b[at(109)..at(111)].copy_from_slice(&((1u16 << 2) | (1 << 5)).to_le_bytes());
    // Flags: HW_REDUCED_ACPI (bit 20), RESET_REG_SUP (bit 10).
    b[at(112)..at(116)].copy_from_slice(&((1u32 << 20) | (1 << 10)).to_le_bytes());
    b[at(116)..at(128)].copy_from_slice(&gas_io_byte(RESET_PORT));
    b[at(128)] = RESET_VALUE;
    b[at(131)] = 3; // FADT minor version: ACPI 6.3
    b[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(SLEEP_STATUS_PORT));
    b[at(268)..at(276)].copy_from_slice(b"HVPROBE\0");
    table(b"FACP", 6, &b)
}

/// An AML PkgLength for a package whose contents are `len` bytes.
// The encoding takes `len` apart into a 4-bit and 8-bit fields: each `as u8`
// keeps the bits it was shifted and masked to, by design.
#[allow(clippy::cast_possible_truncation)]
fn pkg_length(len: usize) -> Vec<u8> {
    // One byte up to 63; else a lead byte with the low nibble and 1-3 more.
    let total = |n: usize| len + n;
    if total(1) < 64 {
        return vec![total(1) as u8];
    }
    let (n, t) = if total(2) < 1 << 12 {
        (2, total(2))
    } else if total(3) < 1 << 20 {
        (3, total(3))
    } else {
        (4, total(4))
    };
    let mut v = vec![(((n - 1) << 6) | (t & 0xf)) as u8];
    for i in 1..n {
        v.push((t >> (4 + 8 * (i - 1))) as u8);
    }
    v
}

/// AML `Name (NAME, <data>)`.
fn aml_name(name: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(data);
    v
}

/// AML for COM1, so the guest's tty gets IRQ 4: on a hardware-reduced
/// platform Linux has no legacy ISA interrupts, and without this the 8250
/// driver cannot request its IRQ and user writes to the console fail with
/// EIO (DESIGN.md). `Scope (\_SB) { Device (COM1) { _HID PNP0501, _UID 0,
/// _CRS { IO 0x3F8-0x3FF, IRQNoFlags {4} } } }`.
fn com1_aml() -> Vec<u8> {
    let base = layout::SERIAL_BASE.to_le_bytes();
    let irq_mask = (1u16 << layout::SERIAL_IRQ).to_le_bytes();
    let crs: Vec<u8> = [
        &[0x47, 0x01, base[0], base[1], base[0], base[1], 0x01, 0x08][..], // IO, Decode16
        &[0x22, irq_mask[0], irq_mask[1]],                                 // IRQNoFlags
        &[0x79, 0x00],                                                     // End tag
    ]
    .concat();
    let mut buffer = vec![
        0x0a,
        u8::try_from(crs.len()).expect("_CRS resources fit a ByteConst length"),
    ]; // BufferSize (ByteConst)
    buffer.extend_from_slice(&crs);
    let mut crs_data = vec![0x11]; // BufferOp
    crs_data.extend(pkg_length(buffer.len()));
    crs_data.extend(buffer);
    // EisaId("PNP0501"): compressed vendor "PNP", product 0x0501.
    let hid = [0x0c, 0x41, 0xd0, 0x05, 0x01];
    let mut dev_body = b"COM1".to_vec();
    dev_body.extend(aml_name(b"_HID", &hid));
    dev_body.extend(aml_name(b"_UID", &[0x00]));
    dev_body.extend(aml_name(b"_CRS", &crs_data));
    let mut dev = vec![0x5b, 0x82]; // DeviceOp
    dev.extend(pkg_length(dev_body.len()));
    dev.extend(dev_body);
    let mut scope_body = b"\\_SB_".to_vec();
    scope_body.extend(dev);
    let mut scope = vec![0x10]; // ScopeOp
    scope.extend(pkg_length(scope_body.len()));
    scope.extend(scope_body);
    scope
}

fn dsdt() -> Vec<u8> {
    // AML: Name (_S5_, Package (2) { S5, S5 })
    let mut aml = aml_name(
        b"_S5_",
        &[0x12, 0x06, 0x02, 0x0a, S5_SLEEP_TYPE, 0x0a, S5_SLEEP_TYPE],
    );
    aml.extend(com1_aml());
    table(b"DSDT", 2, &aml)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&layout::LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // no dual 8259
    for id in 0..vcpus {
        // Processor Local APIC: uid, APIC id, flags = enabled.
        b.extend_from_slice(&[0, 8, id, id]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: id, reserved, address, GSI base.
    b.extend_from_slice(&[1, 12, vcpus, 0]);
    b.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (PIT) is wired to GSI 2.
    b.extend_from_slice(&[2, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI on LINT1 of every processor.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    table(b"APIC", 5, &b)
}

/// All tables laid out from [`layout::ACPI_START`]; returns (bytes, RSDP address).
pub fn build_tables(vcpus: u8) -> (Vec<u8>, u64) {
    let base = layout::ACPI_START;
    let mut blob = vec![0u8; 64]; // RSDP (36 bytes) at the start, 16-byte aligned
    let place = |t: Vec<u8>, blob: &mut Vec<u8>| -> u64 {
        while !blob.len().is_multiple_of(16) {
            blob.push(0);
        }
        let addr = base + blob.len() as u64;
        blob.extend_from_slice(&t);
        addr
    };
    let dsdt_addr = place(dsdt(), &mut blob);
    let fadt_addr = place(fadt(dsdt_addr), &mut blob);
    let madt_addr = place(madt(vcpus), &mut blob);
    let mut xsdt_body = Vec::new();
    for a in [fadt_addr, madt_addr] {
        xsdt_body.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt_addr = place(table(b"XSDT", 1, &xsdt_body), &mut blob);

    let mut rsdp = [0u8; 36];
    rsdp[0..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(OEM_ID);
    rsdp[15] = 2; // ACPI 2.0+
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    blob[..36].copy_from_slice(&rsdp);
    assert!(
        base + blob.len() as u64 <= layout::ACPI_END,
        "ACPI tables overflow"
    );
    (blob, base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(blob: &[u8], addr: u64) -> &[u8] {
        let off = usize::try_from(addr - layout::ACPI_START).expect("ACPI offsets fit usize");
        let len = u32::from_le_bytes(blob[off + 4..off + 8].try_into().unwrap()) as usize;
        &blob[off..off + len]
    }

    #[test]
    fn tables_are_consistent_and_checksummed() {
        let (blob, rsdp_addr) = build_tables(4);
        assert_eq!(rsdp_addr, layout::ACPI_START);
        assert_eq!(&blob[..8], b"RSD PTR ");
        assert_eq!(sum(&blob[..20]), 0);
        assert_eq!(sum(&blob[..36]), 0);
        let xsdt_addr = u64::from_le_bytes(blob[24..32].try_into().unwrap());
        let xsdt = table_at(&blob, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let mut sigs = Vec::new();
        for e in xsdt[36..].chunks(8) {
            let t = table_at(&blob, u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(sum(t), 0, "{:?}", &t[..4]);
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"APIC" {
                // Count enabled Local APIC entries.
                let mut i = 44;
                let mut cpus = 0;
                while i < t.len() {
                    if t[i] == 0 && t[i + 4] & 1 == 1 {
                        cpus += 1;
                    }
                    i += t[i + 1] as usize;
                }
                assert_eq!(cpus, 4);
            }
            if &t[..4] == b"FACP" {
                assert_eq!(t.len(), 276);
                let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
                assert_eq!(&table_at(&blob, dsdt)[..4], b"DSDT");
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn dsdt_describes_com1_with_irq4() {
        let d = dsdt();
        assert_eq!(sum(&d), 0);
        let aml = &d[36..];
        // _S5_ first, then the scope.
        assert_eq!(&aml[..5], b"\x08_S5_");
        let scope = &aml[12..];
        assert_eq!(scope[0], 0x10);
        assert_eq!(scope[1] as usize, scope.len() - 1, "scope PkgLength");
        assert_eq!(&scope[2..7], b"\\_SB_");
        let dev = &scope[7..];
        assert_eq!(&dev[..2], &[0x5b, 0x82]);
        assert_eq!(dev[2] as usize, dev.len() - 2, "device PkgLength");
        assert_eq!(&dev[3..7], b"COM1");
        let hid = dev.windows(4).position(|w| w == b"_HID").unwrap();
        assert_eq!(&dev[hid + 4..hid + 9], &[0x0c, 0x41, 0xd0, 0x05, 0x01]);
        // IO 0x3f8 length 8, IRQ mask bit 4, end tag.
        let io = dev.windows(2).position(|w| w == [0x47, 0x01]).unwrap();
        assert_eq!(&dev[io + 2..io + 8], &[0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]);
        assert_eq!(&dev[io + 8..io + 11], &[0x22, 0x10, 0x00]);
        assert_eq!(&dev[io + 11..io + 13], &[0x79, 0x00]);
        assert_eq!(io + 13, dev.len());
        assert_eq!(pkg_length(62), vec![63]);
        assert_eq!(pkg_length(63), vec![0x40 | (65 & 0xf), 65 >> 4]);
    }
}
