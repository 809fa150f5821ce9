//! COM1: a 16550 UART (vm-superio's register model) wired to an interrupt eventfd, an output
//! writer, and a "receive FIFO drained" eventfd that tells the event loop to feed more input.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, Interrupt};
use crate::persist::Persist;

/// Why a saved serial state was refused.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// vm-superio refused the saved registers or FIFO.
    #[error("the saved serial port state is invalid")]
    State(#[source] vm_superio::serial::Error<std::io::Error>),
}

/// The serial port's registers and receive FIFO (vm-superio's `SerialState`, serialisable).
/// Field order is the state file's encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch low.
    pub baud_divisor_low: u8,
    /// Divisor latch high.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Moves every register field of one struct into the other (the two have the same fields).
macro_rules! serial_fields {
    ($from:expr => $to:ident) => {{
        let s = $from;
        $to {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }};
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        serial_fields!(s => SerialSnapshot)
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        serial_fields!(s.clone() => SerialState)
    }
}

/// The UART raises its line as any device does.
impl Trigger for Interrupt {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Interrupt::trigger(self)
    }
}

/// Signals the event loop when the guest has drained the receive FIFO.
#[derive(Debug)]
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Saturation means it is signalled already.
        let _ = self.0.write(1);
    }
}

/// Where serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// Output bytes gathered until the guest's next register read, line end or
/// [`SerialDevice::flush_output`]. vm-superio writes and flushes its writer once per byte,
/// which is one `write` system call per byte; a guest sends a FIFO burst (16 bytes) and then
/// reads the line status, so one call per burst carries the same bytes as early as the guest
/// can observe them.
struct Batched {
    out: SerialOut,
    buf: Vec<u8>,
}

/// Output held before it is written regardless.
const BATCH_MAX: usize = 4096;

impl Batched {
    fn push_out(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush());
        self.buf.clear();
        r
    }
}

impl Drop for Batched {
    /// Output still gathered when the device goes (a machine dropped without a shutdown).
    fn drop(&mut self) {
        let _ = self.push_out();
    }
}

impl Write for Batched {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= BATCH_MAX || b.contains(&b'\n') {
            self.push_out()?;
        }
        Ok(b.len())
    }

    /// vm-superio flushes after every byte: batching means not passing that on.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The registers and FIFO; restored: a UART with them, raising the line, signalling the
/// eventfd and writing to the output given.
impl Persist for SerialDevice {
    type State = SerialSnapshot;
    type Args<'a> = (Interrupt, EventFd, SerialOut);
    type Error = SerialError;

    fn save(&self) -> Result<SerialSnapshot, SerialError> {
        Ok(self.uart.state().into())
    }

    fn restore(
        (irq, drained, out): (Interrupt, EventFd, SerialOut),
        state: &SerialSnapshot,
    ) -> Result<Self, SerialError> {
        let uart = Serial::from_state(&state.into(), irq, InputDrained(drained), batched(out))
            .map_err(SerialError::State)?;
        Ok(SerialDevice {
            uart,
            output_failed: false,
        })
    }
}

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<Interrupt, InputDrained, Batched>,
    output_failed: bool,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq`, signalling `drained`, writing to `out`.
    pub fn new(irq: Interrupt, drained: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::with_events(irq, InputDrained(drained), batched(out)),
            output_failed: false,
        }
    }

    /// Queues as much of `input` as the receive FIFO takes; returns how many bytes it took.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e}");
                0
            }
        }
    }

    /// Writes out the output gathered so far (the event loop calls this periodically, for
    /// guests that print without reading a register or ending a line).
    pub fn flush_output(&mut self) {
        let r = self.uart.writer_mut().push_out();
        self.note_output(r);
    }

    fn note_output(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            // Output that cannot be written (closed pipe, full disk) must not stop the guest;
            // say so once.
            if !self.output_failed {
                tracing::warn!("serial output failed, further output is dropped: {e}");
                self.output_failed = true;
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A register read is where a guest looks for its output having left: write it now.
        self.flush_output();
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        let r = self.uart.write(off, value).map_err(|e| match e {
            vm_superio::serial::Error::IOError(e) => e,
            other => std::io::Error::other(other),
        });
        self.note_output(r);
    }
}

fn batched(out: SerialOut) -> Batched {
    Batched {
        out,
        buf: Vec::with_capacity(256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Shared, EventFd, EventFd) {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            Interrupt::Event(irq.try_clone().unwrap()),
            drained.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (dev, out, irq, drained)
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut dev, out, _, _) = device();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn output_is_written_per_burst_not_per_byte() {
        let out = crate::devices::virtio::testing::Sink::default();
        let mut dev = SerialDevice::new(
            Interrupt::Event(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Box::new(out.clone()),
        );
        for b in b"a burst of 16 by" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.writes(), 0, "held until the guest looks");
        // The guest reads the line status before its next burst: the burst goes out whole.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(
            (out.bytes(), out.writes()),
            (b"a burst of 16 by".to_vec(), 1)
        );
        // A line end goes out at once; a partial line when the event loop flushes.
        for b in b"tes\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.writes(), 2);
        dev.write(0, b"p");
        dev.flush_output();
        assert_eq!(
            (out.bytes(), out.writes()),
            (b"a burst of 16 bytes\np".to_vec(), 3)
        );
    }

    #[test]
    fn input_is_bounded_by_the_fifo_and_raises_irq_and_drained() {
        let (mut dev, _, irq, drained) = device();
        dev.write(1, &[0x01]); // IER: receive-data interrupt
        let big = vec![b'x'; 100];
        let took = dev.enqueue_input(&big);
        assert_eq!(took, 64);
        assert_eq!(dev.input_room(), 0);
        assert_eq!(dev.enqueue_input(&big), 0);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        for _ in 0..64 {
            dev.read(0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(drained.read().unwrap(), 1);
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "fifo empty");
    }

    #[test]
    fn saved_registers_and_fifo_restore_and_an_overfull_fifo_is_refused() {
        let (mut dev, _, _, _) = device();
        dev.write(3, &[0x03]); // LCR: 8 data bits
        dev.write(7, &[0x5a]); // scratch
        assert_eq!(dev.enqueue_input(b"abc"), 3);
        let saved = dev.save().unwrap();
        assert_eq!(saved.scratch, 0x5a);
        assert_eq!(saved.in_buffer, b"abc");
        let fresh = || {
            (
                Interrupt::Event(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                Box::new(std::io::sink()) as SerialOut,
            )
        };
        let back = SerialDevice::restore(fresh(), &saved).unwrap();
        assert_eq!(back.save().unwrap(), saved);
        let overfull = SerialSnapshot {
            in_buffer: vec![0; 65],
            ..saved
        };
        assert!(matches!(
            SerialDevice::restore(fresh(), &overfull),
            Err(SerialError::State(_))
        ));
    }

    #[test]
    fn the_saved_state_encodes_field_by_field_in_declaration_order() {
        // State files and overlays hold this encoding: moving or retyping a field breaks them.
        let s = SerialSnapshot {
            baud_divisor_low: 1,
            baud_divisor_high: 2,
            interrupt_enable: 3,
            interrupt_identification: 4,
            line_control: 5,
            line_status: 6,
            modem_control: 7,
            modem_status: 8,
            scratch: 9,
            in_buffer: b"xy".to_vec(),
        };
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 2, b'x', b'y']);
    }
}
