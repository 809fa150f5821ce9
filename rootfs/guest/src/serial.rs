//! COM1 (16550 at 0x3f8): FIFO-batched polled output, interrupt-woken input.

use crate::cpu::{inb, outb};

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

/// Writes bytes the way Linux's 8250 driver does: whenever the transmitter holding register
/// is empty (LSR.THRE, which with FIFOs enabled means the whole transmit FIFO is empty), up to
/// 16 bytes at once; after a line's final `\n`, waits for the transmitter to be empty
/// (LSR.TEMT), so a finished line has left the UART. One status read per 16 bytes matters
/// here: every port access from the guest is a VM exit.
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(TX_FIFO) {
        wait_lsr(LSR_THR_EMPTY);
        for &b in chunk {
            outb(COM1, b);
        }
    }
    if bytes.last() == Some(&b'\n') {
        wait_lsr(LSR_TX_EMPTY);
    }
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
