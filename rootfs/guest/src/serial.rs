//! COM1 (16550 at 0x3f8): FIFO-batched polled output, interrupt-woken input.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu::{inb, outb, outsb};

const COM1: u16 = 0x3f8;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_EMPTY: u8 = 0x40;

/// Depth of the 16550's transmit FIFO.
const TX_FIFO: usize = 16;
/// Status reads before giving up on a transmitter that never empties (no UART there, or a
/// stuck one): far longer than 16 bytes take at 9600 baud, given that each read is a port
/// access (a VM exit).
const MAX_POLLS: u32 = 1_000_000;

/// The transmitter is known to be empty (LSR.TEMT was seen and nothing was written since),
/// so the next burst needs no status read. One vCPU writes the serial port.
static TX_EMPTY: AtomicBool = AtomicBool::new(false);

/// Enables (and clears) the FIFOs, and the receive interrupt (with OUT2, which gates the IRQ
/// on a PC).
pub fn init() {
    outb(COM1 + 2, 0x07); // FCR: enable FIFOs, clear receive and transmit FIFOs
    outb(COM1 + 4, 0x0b); // MCR: DTR | RTS | OUT2
    outb(COM1 + 1, 0x01); // IER: received data available
}

/// Waits until LSR has one of the `bits` (bounded by [`MAX_POLLS`]).
fn wait_lsr(bits: u8) {
    for _ in 0..MAX_POLLS {
        if inb(COM1 + 5) & bits != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Writes bytes in transmit-FIFO bursts: whenever the transmitter holding register is empty
/// (LSR.THRE, which with FIFOs enabled means the whole transmit FIFO is empty), up to 16
/// bytes with one `rep outsb`; after a line's final `\n`, waits for the transmitter to be
/// empty (LSR.TEMT), so a finished line has left the UART, and remembers that the next line's
/// first burst needs no status read. Every port access from the guest is a trap into the
/// hypervisor, and every status read a VM exit: a 40-byte line costs 3 traps for the data and
/// 3 status reads, where byte-by-byte output costs 40 and more.
pub fn write(bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(TX_FIFO).enumerate() {
        if i > 0 || !TX_EMPTY.load(Ordering::Relaxed) {
            wait_lsr(LSR_THR_EMPTY);
        }
        outsb(COM1, chunk);
    }
    if bytes.is_empty() {
        return;
    }
    let line_end = bytes.last() == Some(&b'\n');
    if line_end {
        wait_lsr(LSR_TX_EMPTY);
    }
    TX_EMPTY.store(line_end, Ordering::Relaxed);
}

/// The next received byte, if one is waiting.
pub fn try_read() -> Option<u8> {
    (inb(COM1 + 5) & LSR_DATA_READY != 0).then(|| inb(COM1))
}

/// A `core::fmt::Write` to the serial port.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write(s.as_bytes());
        Ok(())
    }
}
