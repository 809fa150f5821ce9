//! COM1 (16550 at 0x3f8): polled output, interrupt-woken input.

use crate::cpu::{inb, outb, wait_for_interrupt};

const COM1: u16 = 0x3f8;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

/// Enables the FIFOs and the receive interrupt (with OUT2, which gates the IRQ on a PC).
pub fn init() {
    outb(COM1 + 2, 0x07); // FCR: enable and clear FIFOs
    outb(COM1 + 4, 0x0b); // MCR: DTR | RTS | OUT2
    outb(COM1 + 1, 0x01); // IER: received data available
}

/// Depth of the 16550's transmit FIFO.
const TX_FIFO: usize = 16;

/// Writes bytes, as a real UART needs: whenever the transmitter is empty (LSR.THRE, which with
/// FIFOs enabled means the whole transmit FIFO is empty), up to 16 bytes. One status read per
/// 16 bytes matters here: every port access from the guest is a VM exit.
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(TX_FIFO) {
        while inb(COM1 + 5) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        for &b in chunk {
            outb(COM1, b);
        }
    }
}

/// Reads one line (without its `\n`; `\r` dropped) into `buf`. Returns `Err(())` when the
/// line was longer than `buf` (the rest of it is consumed).
pub fn read_line(buf: &mut [u8]) -> Result<&[u8], ()> {
    let mut len = 0;
    let mut overflow = false;
    loop {
        if inb(COM1 + 5) & LSR_DATA_READY == 0 {
            wait_for_interrupt();
            continue;
        }
        match inb(COM1) {
            b'\n' => break,
            b'\r' => {}
            b => {
                if len < buf.len() {
                    buf[len] = b;
                    len += 1;
                } else {
                    overflow = true;
                }
            }
        }
    }
    if overflow {
        Err(())
    } else {
        Ok(&buf[..len])
    }
}

/// A `core::fmt::Write` to the serial port.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write(s.as_bytes());
        Ok(())
    }
}
