//! CPU and platform access from CPL3: time, CPUID, port I/O (allowed by the TSS bitmap), the idle
//! system call and power-off.

use core::arch::asm;

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the TSC; CR4.TSD is clear, so it is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// TSC frequency in Hz from CPUID: leaf 0x15 (which our VMM fills), the hypervisor timing
/// leaf 0x40000010, or leaf 0x16's base MHz; `None` when none is given.
pub fn tsc_hz() -> Option<u64> {
    let max = cpuid(0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal != 0 {
            return Some(u64::from(crystal) * u64::from(num) / u64::from(den));
        }
    }
    if cpuid(1).2 & (1 << 31) != 0 && cpuid(0x4000_0000).0 >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010).0;
        if khz != 0 {
            return Some(u64::from(khz) * 1000);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16).0 & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1_000_000);
        }
    }
    None
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the TSS bitmap allows these ports at CPL3; the ones used (COM1, 0x501, 0x64) have no
    // memory side effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes `bytes` to one I/O port with a single `rep outsb` (a device FIFO filled in one
/// instruction). Under a VMM that is one trap into the hypervisor for the whole run instead of
/// one per byte.
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: reads `bytes.len()` bytes from `bytes` (rsi/rcx describe exactly that slice;
    // the direction flag is clear, as the ABI guarantees) and writes them to `port`, which
    // the TSS bitmap allows at CPL3 as for `outb`.
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

extern "C" {
    /// entry.rs: the system call that waits for an interrupt.
    fn guest_wait();
}

/// Sleeps until the next interrupt: the system call (a `ud2` the #UD handler recognises) does
/// `sti; hlt` at CPL0 unless an interrupt arrived since the last call.
pub fn wait_for_interrupt() {
    // SAFETY: `guest_wait` follows the C ABI, touches no memory of ours and returns.
    unsafe { guest_wait() }
}

/// Powers off with `code`: the isa-debug-exit compatible port, then the i8042 reset line
/// (for VMMs without the port, e.g. QEMU with -no-reboot), then spins.
pub fn poweroff(code: u8) -> ! {
    outb(0x501, code);
    outb(0x64, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}
