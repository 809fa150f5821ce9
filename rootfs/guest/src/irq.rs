//! Interrupt lines and the wake-up timer, programmed from CPL3 through the ports the TSS I/O
//! bitmap allows: the 8259 pair (0x20/0x21, 0xa0/0xa1), its edge/level control registers
//! (ELCR, 0x4d0/0x4d1) and the 8254 PIT (0x40, 0x43).
//!
//! Every line the guest uses is edge-triggered: an interrupt marks "something happened" and
//! the CPL0 handler only records it and acknowledges the PIC (entry.rs). Drivers acknowledge
//! their device's interrupt cause before looking for work, so the next event raises the line
//! again; a level-triggered line still high after the PIC's EOI would interrupt CPL3 in a loop.

use core::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use crate::clock;
use crate::cpu::{inb, outb, wait_for_interrupt};

extern "C" {
    /// entry.rs: the IRQ handler sets bit 32 + IRQ here.
    static irq_fired: AtomicU64;
}

/// Lines that fired and that nobody has taken yet (CPL3's side of `irq_fired`).
static SEEN: AtomicU16 = AtomicU16::new(0);

/// Takes the lines in `mask` (bit n: IRQ n) that fired since they were last taken; the other
/// lines stay recorded for their owners.
pub fn take(mask: u16) -> u16 {
    // SAFETY: `irq_fired` is a u64 in entry.rs's .bss, written only by the IRQ handler (with
    // one instruction, on this one CPU); the swap is a single `xchg`, so no bit is lost.
    let fired = unsafe { irq_fired.swap(0, Ordering::SeqCst) };
    let seen = SEEN.load(Ordering::Relaxed) | (fired >> 32) as u16;
    SEEN.store(seen & !mask, Ordering::Relaxed);
    seen & mask
}

/// The `take` mask bit of line `irq` (0 for lines beyond the 8259's).
pub fn bit(irq: u32) -> u16 {
    if irq < 16 {
        1 << irq
    } else {
        0
    }
}

/// The PIT's input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Longest one-shot the 16-bit counter gives (65535 ticks ≈ 54.9 ms), in microseconds.
pub const MAX_TIMER_US: u64 = 65_535 * 1_000_000 / PIT_HZ;

/// Unmasks 8259 line `irq` (0–15) and makes it edge-triggered. Returns false for lines the
/// 8259 does not have (an IOAPIC-only line: the caller polls instead).
pub fn enable_line(irq: u32) -> bool {
    let Ok(line) = u8::try_from(irq) else {
        return false;
    };
    if line >= 16 || line == 2 {
        return false;
    }
    let (mask_port, elcr_port, bit) = if line < 8 {
        (0x21, 0x4d0, line)
    } else {
        (0xa1, 0x4d1, line - 8)
    };
    outb(elcr_port, inb(elcr_port) & !(1 << bit));
    outb(mask_port, inb(mask_port) & !(1 << bit));
    if line >= 8 {
        // The slave PIC reaches the CPU through the master's line 2.
        outb(0x21, inb(0x21) & !(1 << 2));
    }
    true
}

/// When the armed one-shot runs out (microseconds since boot; 0: none armed).
static ARMED_UNTIL: AtomicU64 = AtomicU64::new(0);

/// Sleeps until the next interrupt, or at most about `timeout_us` when given (the PIT's
/// channel 0 is armed as a one-shot; longer timeouts are cut to [`MAX_TIMER_US`], so the
/// caller may wake early and sleep again). A one-shot already armed to run out no later than
/// needed is left alone: reprogramming costs three port writes (VM exits). Line 0 must be
/// enabled for the timeout to work.
pub fn sleep(timeout_us: Option<u64>) {
    if let Some(us) = timeout_us {
        let us = us.clamp(1, MAX_TIMER_US);
        let now = clock::micros();
        let armed = ARMED_UNTIL.load(Ordering::Relaxed);
        if armed <= now || armed > now + us {
            let ticks = (us * PIT_HZ / 1_000_000).clamp(1, 65_535);
            // Channel 0, low then high byte, mode 0 (interrupt on terminal count: the output
            // goes low now and rises, raising IRQ 0 once, when the count runs out), binary.
            outb(0x43, 0x30);
            outb(0x40, ticks as u8);
            outb(0x40, (ticks >> 8) as u8);
            ARMED_UNTIL.store(now + ticks * 1_000_000 / PIT_HZ, Ordering::Relaxed);
        }
    }
    wait_for_interrupt();
}

/// Puts the PIT's channel 0 into one-shot mode without starting it (its output stays low:
/// no IRQ 0 until [`sleep`] arms it), whatever firmware left it doing.
pub fn stop_timer() {
    outb(0x43, 0x30);
    ARMED_UNTIL.store(0, Ordering::Relaxed);
}
