//! Boot-time vCPU state: the boot GDT, identity page tables and the register values for the
//! two entry protocols (Linux 64-bit boot protocol and PVH 32-bit entry).

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;

/// Errors while writing boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The boot tables do not fit in guest memory.
    #[error("failed to write the boot {0} into guest memory (is the memory large enough?)")]
    WriteTable(&'static str),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = boot_params.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh {
        /// 32-bit entry point from the ELF note.
        entry: u64,
    },
}

// CR0 / CR4 / EFER bits used below.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors of the boot GDT. Linux's boot protocol asks for `__BOOT_CS` = 0x10 and
/// `__BOOT_DS` = 0x18.
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

/// Builds a GDT descriptor from flags (access byte in bits 0-7, flags nibble in 12-15),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Turns a GDT descriptor into the `kvm_segment` KVM wants for the hidden part of a segment
/// register.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// The boot GDT for a given entry mode: null, null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; BOOT_GDT_ENTRIES] {
    let code = match mode {
        // 64-bit code: present, DPL0, execute/read, L=1.
        EntryMode::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        // 32-bit code: present, DPL0, execute/read, D=1, 4 KiB granularity.
        EntryMode::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data, read/write, 4 GiB
        gdt_entry(0x808b, 0, 0xfffff), // busy 32/64-bit TSS
    ]
}

/// Writes the boot GDT and an empty IDT, and returns the segment part of `sregs`.
fn setup_segments(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(|_| RegsError::WriteTable("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::WriteTable("IDT"))?;

    let code = segment_from_gdt(gdt[2], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[3], DATA_SELECTOR);
    let tss = segment_from_gdt(gdt[4], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Writes identity page tables mapping 0..4 GiB with 2 MiB pages (PML4 → PDPT → 4 PDs).
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let err = |_| RegsError::WriteTable("page tables");
    // Present + writable.
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(err)?;
    let mut pds = vec![0u8; 4 * 4096];
    for gib in 0..4u64 {
        mem.write_obj(
            (PDE_START + gib * 0x1000) | 0x3,
            GuestAddress(PDPTE_START + gib * 8),
        )
        .map_err(err)?;
        for i in 0..512u64 {
            // Present + writable + page size (2 MiB).
            let entry = ((gib << 30) | (i << 21)) | 0x83;
            let off = ((gib * 512 + i) * 8) as usize;
            pds[off..off + 8].copy_from_slice(&entry.to_le_bytes());
        }
    }
    mem.write_slice(&pds, GuestAddress(PDE_START)).map_err(err)
}

/// Sets up `sregs` (and guest-memory tables) for the given entry mode.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    setup_segments(mem, mode, sregs)?;
    match mode {
        EntryMode::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
            sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// The general-purpose registers at entry. `boot_info` is the address of `boot_params`
/// (Linux, in RSI) or `hvm_start_info` (PVH, in RBX).
pub fn boot_regs(mode: EntryMode, boot_info: u64) -> kvm_regs {
    match mode {
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot_info,
            ..Default::default()
        },
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: boot_info,
            ..Default::default()
        },
    }
}

/// x87/SSE state at reset: FCW with all exceptions masked, MXCSR default.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_match_known_encodings() {
        // Well-known flat descriptors.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0x1234_5678, 0x67), 0x1280_8b34_5678_0067);
    }

    #[test]
    fn segment_decoding_round_trips_fields() {
        let s = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 0x10);
        assert_eq!(
            (s.l, s.db, s.g, s.dpl, s.present, s.s, s.type_),
            (1, 0, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 0x10);
        let t = segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 0x20);
        assert_eq!((t.base, t.limit, t.s, t.g), (0x1234_5678, 0x67, 0, 0));
    }

    #[test]
    fn linux64_state_is_long_mode_with_identity_map() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Linux64 { entry: 0x10_0000 }, &mut s).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l), (CODE_SELECTOR, 1));
        assert_eq!(s.ds.selector, DATA_SELECTOR);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte3: u64 = m.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpte3, (PDE_START + 0x3000) | 3);
        // Last PD entry maps 4 GiB - 2 MiB.
        let last: u64 = m.read_obj(GuestAddress(PDE_START + 4 * 4096 - 8)).unwrap();
        assert_eq!(last, (0xffe0_0000) | 0x83);
        let gdt2: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, 0x00af_9b00_0000_ffff);
        assert!(m.last_addr().0 > PDE_START);
    }

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Pvh { entry: 0x10_0040 }, &mut s).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, 1);
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        let r = boot_regs(EntryMode::Pvh { entry: 0x10_0040 }, PVH_INFO_START);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0040, PVH_INFO_START, 2));
        let l = boot_regs(EntryMode::Linux64 { entry: 0x10_0000 }, ZERO_PAGE_START);
        assert_eq!((l.rip, l.rsi), (0x10_0000, ZERO_PAGE_START));
    }
}
