//! The guest physical address map.
//!
//! ```text
//! 0x0000_0000  ┌──────────────────────────────┐
//!              │ real-mode area (unused)      │
//! 0x0000_0500  │ boot GDT                     │
//! 0x0000_0520  │ boot IDT (empty)             │
//! 0x0000_6000  │ PVH hvm_start_info + memmap  │
//! 0x0000_7000  │ Linux boot_params (zero page)│
//! 0x0000_8ff0  │ boot stack (grows down)      │
//! 0x0000_9000  │ PML4, PDPT, 4 × PD: identity │
//!              │ map of 0..4 GiB, 2 MiB pages │
//! 0x0002_0000  │ kernel command line          │
//! 0x0009_fc00  │ reserved (EBDA)              │
//! 0x000a_0000  │ legacy VGA/BIOS hole         │
//! 0x0010_0000  │ kernel image (1 MiB)         │
//!              │ … RAM …          initrd at top│
//! 0xc000_0000  ├──────────────────────────────┤ MMIO gap (devices, LAPIC, IOAPIC)
//! 0xd000_0000  │ virtio-mmio windows, 4 KiB each│
//! 0x1_0000_0000├──────────────────────────────┤ RAM above 4 GiB when the guest is large
//! ```

/// Start of the boot GDT written by the VMM.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 5;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// Where the PVH `hvm_start_info` structure is written.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH memory map follows the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (each maps 1 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line we pass (Linux x86 accepts 2048 bytes by default).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the reserved EBDA area at the top of base memory.
pub const EBDA_START: u64 = 0x9_fc00;
/// First address above the legacy hole: where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window (in the MMIO gap); device `i` is at
/// `VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window (registers + config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt line of virtio-mmio device 0; device `i` uses `VIRTIO_IRQ_BASE + i` (8259 lines
/// 5–15, so a guest without an IOAPIC driver gets them too).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// I/O port of the isa-debug-exit compatible power-off device.
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 controller data port (its command port is at +4).
pub const I8042_PORT: u16 = 0x60;

/// The guest RAM ranges for `mem_size` bytes of memory: one range below the MMIO gap, and a
/// second one from 4 GiB when the memory does not fit below it.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The e820 map the guest is told about: `(start, size, type)` with type 1 = RAM, 2 = reserved.
pub fn e820_entries(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut out = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x400, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        if start == 0 {
            if size > HIMEM_START {
                out.push((HIMEM_START, size - HIMEM_START, E820_RAM));
            }
        } else {
            out.push((start, size, E820_RAM));
        }
    }
    out
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Guest physical address of byte `offset` of a memory image (the RAM ranges of `mem_bytes`
/// back to back, as snapshots and overlays store them), and how many bytes from there on lie
/// in the same range; `None` beyond RAM.
pub fn image_offset_to_gpa(mem_bytes: u64, offset: u64) -> Option<(u64, u64)> {
    let mut base = 0;
    for (start, size) in ram_ranges(mem_bytes) {
        if offset < base + size {
            return Some((start + (offset - base), base + size - offset));
        }
        base += size;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_memory_splits_around_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        let total: u64 = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_reserves_ebda_and_skips_legacy_hole() {
        let e = e820_entries(64 << 20);
        assert_eq!(e[0], (0, EBDA_START, E820_RAM));
        assert_eq!(e[1], (EBDA_START, 0x400, E820_RESERVED));
        assert_eq!(e[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(e.len(), 3);
        let big = e820_entries(5 << 30);
        assert_eq!(big.last(), Some(&(MMIO_GAP_END, 2 << 30, E820_RAM)));
    }
}
