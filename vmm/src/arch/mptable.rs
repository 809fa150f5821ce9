//! The Intel MultiProcessor Specification 1.4 table: how a Linux guest without ACPI learns
//! about its CPUs, the IOAPIC and the ISA interrupt wiring. Written by hand: no maintained
//! crate provides it.
//!
//! ```text
//! EBDA_START (0x9fc00)
//! ┌───────────────────────────┐ floating pointer, 16 bytes
//! │ "_MP_" | phys ptr → table │ length 1 (16-byte units), spec rev 4, checksum
//! ├───────────────────────────┤ configuration table header, 44 bytes
//! │ "PCMP" | length | rev 4   │ checksum, OEM "CLOUDLET", product "MICROVM",
//! │ entry count | LAPIC addr  │ LAPIC at 0xfee00000
//! ├───────────────────────────┤ entries:
//! │ processor × vCPUs (20 B)  │ APIC id = index, enabled, BSP flag on 0
//! │ bus "ISA   " (8 B)        │ bus id 0
//! │ I/O APIC (8 B)            │ id = vCPUs, version 0x11, at 0xfec00000
//! │ I/O interrupt × 16 (8 B)  │ ISA IRQ n → IOAPIC pin n
//! │ local interrupt × 2 (8 B) │ ExtINT → LINT0, NMI → LINT1 (all CPUs)
//! └───────────────────────────┘
//! ```
//! Checksums make the byte sum of each structure 0 (mod 256).

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::EBDA_START;

/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
/// The table must fit in the 1 KiB reserved EBDA area.
const MAX_SIZE: usize = 0x400;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the reserved area.
    #[error("an MP table for {0} vCPUs does not fit in the 1 KiB reserved for it")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("failed to write the MP table into guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP table bytes for `cpus` vCPUs, to be placed at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    let table_addr = base + 16;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    // CPUID signature/features reported for each processor: family 6, APIC + FPU present.
    let (signature, features) = (0x0600u32, 0x0201u32);
    for i in 0..cpus {
        entries.push(0u8); // entry type: processor
        entries.push(i); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(0x01 | if i == 0 { 0x02 } else { 0 }); // enabled, BSP
        entries.extend_from_slice(&signature.to_le_bytes());
        entries.extend_from_slice(&features.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus entry, bus id 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 0x01]); // I/O APIC, enabled
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 IRQ → IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts to every LAPIC (0xff): ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    if 16 + table_len > MAX_SIZE {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"CLOUDLET");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte paragraphs
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs at the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_are_consistent() {
        let b = build(2, EBDA_START).unwrap();
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, EBDA_START + 16);
        let t = &b[16..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(sum(t), 0, "table checksum");
        let count = u16::from_le_bytes([t[34], t[35]]);
        // 2 CPUs + bus + IOAPIC + 16 IRQs + 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 16 + 2);
        assert_eq!(len, 44 + 2 * 20 + 8 * (count as usize - 2));
        // First processor entry: BSP, APIC id 0; second: id 1, not BSP.
        assert_eq!(&t[44..48], &[0, 0, APIC_VERSION, 3]);
        assert_eq!(&t[64..68], &[0, 1, APIC_VERSION, 1]);
    }

    #[test]
    fn golden_bytes_for_one_cpu() {
        let b = build(1, EBDA_START).unwrap();
        // Floating pointer: "_MP_", 0x0009fc10, len 1, rev 4, checksum.
        assert_eq!(
            &b[..16],
            &[0x5f, 0x4d, 0x50, 0x5f, 0x10, 0xfc, 0x09, 0x00, 1, 4, 0x8b, 0, 0, 0, 0, 0]
        );
        // The IOAPIC entry follows the processor and bus entries.
        let io = 16 + 44 + 20 + 8;
        assert_eq!(&b[io..io + 8], &[2, 1, IOAPIC_VERSION, 1, 0, 0, 0xc0, 0xfe]);
    }

    #[test]
    fn fits_for_many_cpus_and_refuses_too_many() {
        assert!(build(32, EBDA_START).is_ok());
        assert!(matches!(
            build(254, EBDA_START),
            Err(MptableError::TooManyCpus(254))
        ));
    }
}
