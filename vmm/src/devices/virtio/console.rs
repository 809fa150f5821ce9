//! virtio-console: one port (no `MULTIPORT`), receive queue 0 and transmit queue 1, no
//! emergency write, no size in config space; the VMM's standard input and output (or the
//! serial output file) on the host side.
//!
//! Why it exists: on a host where every VM exit is expensive, the 16550 costs one exit per
//! byte received and one per 16-byte burst sent. The console moves a whole buffer per queue
//! notification, and host input reaches buffers the guest posted beforehand without any exit.
//!
//! - Transmit: every available chain of device-readable buffers is copied out (at most
//!   [`MAX_TX_CHAIN`] bytes per chain) and all of one processing round's bytes go to the
//!   output with a single `write_all` (then `flush`). A round stops at [`TX_BATCH_MAX`]
//!   bytes and has the queue re-scheduled for the rest. Chains with device-writable buffers
//!   or longer than [`MAX_TX_CHAIN`] are returned unwritten. Every chain is returned with
//!   length 0. Output that cannot be written is dropped (reported once).
//! - Receive: host input waits in a bounded buffer ([`PENDING_INPUT_MAX`] bytes; input past
//!   that is refused, the caller is told how much was taken) and is copied into chains of
//!   device-writable buffers as the guest posts them; the used length is the number of bytes
//!   written. Chains with device-readable buffers are returned with length 0.
//! - Back-pressure: when [`Console::host_input`] refused bytes, the device writes its
//!   "input room" eventfd once it has delivered pending input to the guest (room again), so
//!   the host side retries then instead of polling.
//! - State: the pending input is saved and restored; it also survives a driver reset (a
//!   driver resets the device before first use, and input typed before that must not be lost).

use std::collections::VecDeque;
use std::io::Write;

use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{read_bufs, write_bufs};
use super::{DeviceState, QueueIo, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Most host input the device holds while the guest has no receive buffer.
pub const PENDING_INPUT_MAX: usize = 64 * 1024;
/// Longest transmit chain the device accepts, in bytes.
pub const MAX_TX_CHAIN: usize = 64 * 1024;
/// Most bytes one transmit round gathers before writing them out.
pub const TX_BATCH_MAX: usize = 256 * 1024;
/// `struct virtio_console_config`: cols (u16), rows (u16), max_nr_ports (u32), emerg_wr
/// (u32).
const CONFIG_LEN: usize = 12;

/// Where the guest's console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// Saved state of a console device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Host input not yet delivered to the guest (at most [`PENDING_INPUT_MAX`] bytes).
    pub pending_input: Vec<u8>,
}

/// A virtio-console device.
pub struct Console {
    out: ConsoleOut,
    /// Host input waiting for guest receive buffers.
    pending: VecDeque<u8>,
    /// Output of the current transmit round.
    tx_buf: Vec<u8>,
    /// Written when input was refused and room has appeared since.
    input_room: EventFd,
    /// Input was refused since the last time room appeared.
    host_waiting: bool,
    output_failed: bool,
    config: [u8; CONFIG_LEN],
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending_input", &self.pending.len())
            .field("host_waiting", &self.host_waiting)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing the guest's output to `out`, and writing `input_room` when input it
    /// refused can be offered again.
    pub fn new(out: ConsoleOut, input_room: EventFd) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        // max_nr_ports = 1; cols, rows and emerg_wr stay 0.
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        Console {
            out,
            pending: VecDeque::new(),
            tx_buf: Vec::new(),
            input_room,
            host_waiting: false,
            output_failed: false,
            config,
        }
    }

    /// Bytes of host input waiting for the guest.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Copies pending input into the guest's receive buffers while both exist; returns the
    /// bytes delivered.
    fn receive(&mut self, io: &mut QueueIo<'_>) -> usize {
        let mut delivered = 0;
        while !self.pending.is_empty() {
            let Some(chain) = io.pop_one_way(RX_QUEUE, true) else {
                break;
            };
            // Fits: pending input is at most PENDING_INPUT_MAX bytes.
            let n = chain.writable_len().min(self.pending.len() as u64) as usize;
            let (front, back) = self.pending.as_slices();
            let in_front = n.min(front.len());
            let written = write_bufs(io.mem(), &chain.writable, 0, &front[..in_front])
                && write_bufs(
                    io.mem(),
                    &chain.writable,
                    in_front as u64,
                    &back[..n - in_front],
                );
            if !written {
                io.reject(RX_QUEUE, chain.head, &"receive buffer not writable");
                continue;
            }
            self.pending.drain(..n);
            io.add_used(RX_QUEUE, chain.head, n as u32);
            delivered += n;
        }
        if delivered > 0 && self.host_waiting {
            self.host_waiting = false;
            if let Err(e) = self.input_room.write(1) {
                warn!("virtio-console: cannot signal room for input: {e}");
            }
        }
        delivered
    }

    /// Gathers every queued transmit chain and writes the bytes out in one go.
    fn transmit(&mut self, io: &mut QueueIo<'_>) {
        self.tx_buf.clear();
        while let Some(chain) = io.pop_one_way(TX_QUEUE, false) {
            let len = chain.readable_len();
            if len > MAX_TX_CHAIN as u64 {
                io.reject(
                    TX_QUEUE,
                    chain.head,
                    &"transmit chain longer than the maximum",
                );
                continue;
            }
            // At most MAX_TX_CHAIN.
            let len = len as usize;
            let start = self.tx_buf.len();
            if start + len > TX_BATCH_MAX {
                // This round is full (so not empty: progress is made); the chain goes out in
                // the next one.
                io.unpop(TX_QUEUE);
                io.requeue(TX_QUEUE);
                break;
            }
            self.tx_buf.resize(start + len, 0);
            if !read_bufs(io.mem(), &chain.readable, 0, &mut self.tx_buf[start..]) {
                debug!("virtio-console: transmit chain {} unreadable", chain.head);
                self.tx_buf.truncate(start);
            }
            io.add_used(TX_QUEUE, chain.head, 0);
        }
        if self.tx_buf.is_empty() {
            return;
        }
        let r = self
            .out
            .write_all(&self.tx_buf)
            .and_then(|()| self.out.flush());
        if let Err(e) = r {
            // Output that cannot be written (closed pipe, full disk) must not stop the guest;
            // say so once.
            if !self.output_failed {
                warn!("virtio-console: output failed, further output may be lost: {e}");
                self.output_failed = true;
            }
        }
        // Do not keep a large round's buffer for good.
        if self.tx_buf.capacity() > MAX_TX_CHAIN {
            self.tx_buf = Vec::new();
        }
    }
}

impl VirtioDevice for Console {
    const DEVICE_TYPE: u32 = VIRTIO_ID_CONSOLE;

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(&mut self, index: usize, io: &mut QueueIo<'_>) {
        match index {
            RX_QUEUE => {
                self.receive(io);
            }
            TX_QUEUE => self.transmit(io),
            _ => {}
        }
    }

    /// Takes as much of `bytes` as fits in the pending input and delivers what it can to
    /// posted receive buffers; when fewer bytes are taken than offered, the input-room eventfd
    /// is written once room appears.
    fn host_input(&mut self, bytes: &[u8], mut io: Option<&mut QueueIo<'_>>) -> usize {
        let mut taken = 0;
        loop {
            let room = PENDING_INPUT_MAX.saturating_sub(self.pending.len());
            let n = room.min(bytes.len() - taken);
            self.pending.extend(&bytes[taken..taken + n]);
            taken += n;
            let delivered = match io.as_deref_mut() {
                Some(io) => self.receive(io),
                None => 0,
            };
            // Delivering made room for the rest: take it now rather than after a wake-up.
            if taken == bytes.len() || delivered == 0 {
                break;
            }
        }
        if taken < bytes.len() {
            self.host_waiting = true;
        }
        taken
    }

    /// Pending input is host data, not per-activation state: it stays for the next driver.
    fn reset(&mut self) {}

    fn save(&self) -> DeviceState {
        DeviceState::Console(ConsoleState {
            pending_input: self.pending.iter().copied().collect(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        let DeviceState::Console(s) = state else {
            return Err(VirtioError::DeviceState(
                "not a console device state".into(),
            ));
        };
        if s.pending_input.len() > PENDING_INPUT_MAX {
            return Err(VirtioError::DeviceState(format!(
                "saved console input holds {} bytes, at most {PENDING_INPUT_MAX} are kept",
                s.pending_input.len()
            )));
        }
        self.pending = s.pending_input.iter().copied().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::slot::{Slot, SlotKind};
    use crate::devices::virtio::testing::{guest_memory, GuestQueue, RxTx, Sink, F_NEXT, F_WRITE};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Rig {
        q: RxTx,
        console: Console,
        sink: Sink,
        room: EventFd,
    }

    impl Rig {
        fn new() -> Self {
            let sink = Sink::default();
            let room = EventFd::new(EFD_NONBLOCK).unwrap();
            Rig {
                q: RxTx::new(),
                console: Console::new(Box::new(sink.clone()), room.try_clone().unwrap()),
                sink,
                room,
            }
        }

        fn run(&mut self, index: usize) -> (u32, u32) {
            let mut io = QueueIo::new(&self.q.mem, &mut self.q.queues);
            self.console.process_queue(index, &mut io);
            (io.used_mask(), io.requeue_mask())
        }

        fn input(&mut self, bytes: &[u8]) -> (usize, u32) {
            let mut io = QueueIo::new(&self.q.mem, &mut self.q.queues);
            let n = self.console.host_input(bytes, Some(&mut io));
            (n, io.used_mask())
        }

        fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.q.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }
    }

    fn text(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| b'a' + (i as u8).wrapping_add(seed) % 26)
            .collect()
    }

    #[test]
    fn config_space_and_features() {
        let mut rig = Rig::new();
        let mut b = [0xffu8; 16];
        rig.console.read_config(0, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut one = [0u8; 4];
        rig.console.read_config(4, &mut one);
        assert_eq!(u32::from_le_bytes(one), 1, "max_nr_ports");
        rig.console.write_config(0, &[9; 12]);
        rig.console.read_config(0, &mut b);
        assert_eq!(
            b[..12],
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
            "writes ignored"
        );
        assert_eq!(rig.console.features(), VIRTIO_F_VERSION_1);
        assert_eq!(Console::DEVICE_TYPE, 3);
        assert_eq!(rig.console.queue_max_sizes(), &[256, 256]);
    }

    #[test]
    fn transmit_writes_every_chain_in_one_write() {
        let mut rig = Rig::new();
        rig.q
            .mem
            .write_slice(b"hello, ", GuestAddress(0x4_0000))
            .unwrap();
        rig.q
            .mem
            .write_slice(b"world", GuestAddress(0x5_0000))
            .unwrap();
        rig.q
            .mem
            .write_slice(b"!\n", GuestAddress(0x6_0000))
            .unwrap();
        rig.q.tx.add_chain(&[(0x4_0000, 7, false)]);
        // A chain split across descriptors.
        rig.q
            .tx
            .add_chain(&[(0x5_0000, 3, false), (0x5_0003, 2, false)]);
        rig.q.tx.add_chain(&[(0x6_0000, 2, false)]);
        assert_eq!(rig.run(TX_QUEUE), (1 << TX_QUEUE, 0));
        assert_eq!(rig.sink.bytes(), b"hello, world!\n");
        assert_eq!(rig.sink.writes(), 1);
        assert_eq!(rig.q.tx.used_idx(), 3);
        for i in 0..3 {
            assert_eq!(rig.q.tx.used_elem(i).1, 0);
        }
        // Nothing queued: nothing written.
        assert_eq!(rig.run(TX_QUEUE), (0, 0));
        assert_eq!(rig.sink.writes(), 1);
    }

    #[test]
    fn a_round_stops_at_the_batch_bound_and_comes_back() {
        let mut rig = Rig::new();
        let chunk = text(MAX_TX_CHAIN, 3);
        rig.q
            .mem
            .write_slice(&chunk, GuestAddress(0x4_0000))
            .unwrap();
        let chains = TX_BATCH_MAX / MAX_TX_CHAIN + 1;
        for _ in 0..chains {
            rig.q
                .tx
                .add_chain(&[(0x4_0000, MAX_TX_CHAIN as u32, false)]);
        }
        assert_eq!(rig.run(TX_QUEUE), (1 << TX_QUEUE, 1 << TX_QUEUE));
        assert_eq!(rig.sink.bytes().len(), TX_BATCH_MAX);
        assert_eq!(rig.sink.writes(), 1);
        assert_eq!(usize::from(rig.q.tx.used_idx()), chains - 1);
        assert_eq!(rig.run(TX_QUEUE), (1 << TX_QUEUE, 0));
        assert_eq!(rig.sink.bytes().len(), chains * MAX_TX_CHAIN);
        assert_eq!(rig.sink.writes(), 2);
        assert_eq!(usize::from(rig.q.tx.used_idx()), chains);
    }

    #[test]
    fn hostile_transmit_chains_are_returned_unwritten() {
        let mut rig = Rig::new();
        // Device-writable buffer.
        rig.q
            .tx
            .add_chain(&[(0x4_0000, 4, false), (0x4_1000, 4, true)]);
        // Longer than a chain may be (and longer than guest memory, through repetition).
        rig.q.tx.add_chain(&[
            (0x0, 0x8_0000, false),
            (0x0, 0x8_0000, false),
            (0x0, 0x8_0000, false),
        ]);
        // A loop.
        rig.q.tx.set_desc(6, 0x4_0000, 64, F_NEXT, 7);
        rig.q.tx.set_desc(7, 0x4_0000, 64, F_NEXT, 6);
        rig.q.tx.publish(6);
        // Outside memory.
        rig.q.tx.add_chain(&[(0xffff_f000, 64, false)]);
        // Head out of range (skipped: it cannot go into the used ring).
        rig.q.tx.publish(200);
        assert_eq!(rig.run(TX_QUEUE).0, 1 << TX_QUEUE);
        assert_eq!(rig.sink.writes(), 0);
        assert_eq!(rig.q.tx.used_idx(), 4);
        for i in 0..4 {
            assert_eq!(rig.q.tx.used_elem(i).1, 0);
        }
    }

    #[test]
    fn output_failure_does_not_stop_the_device() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut rig = Rig::new();
        rig.console = Console::new(Box::new(Broken), EventFd::new(EFD_NONBLOCK).unwrap());
        for _ in 0..2 {
            rig.q.tx.add_chain(&[(0x4_0000, 8, false)]);
            rig.run(TX_QUEUE);
        }
        assert_eq!(rig.q.tx.used_idx(), 2);
    }

    #[test]
    fn receive_fills_posted_buffers_and_keeps_the_rest() {
        let mut rig = Rig::new();
        // No buffer: everything waits.
        assert_eq!(rig.input(b"primes 100\n"), (11, 0));
        assert_eq!(rig.console.pending_input(), 11);
        // A buffer split in two descriptors, smaller than the input.
        rig.q
            .rx
            .add_chain(&[(0x6_0000, 4, true), (0x6_1000, 3, true)]);
        assert_eq!(rig.run(RX_QUEUE), (1 << RX_QUEUE, 0));
        assert_eq!(rig.q.rx.used_elem(0), (0, 7));
        assert_eq!(rig.bytes(0x6_0000, 4), b"prim");
        assert_eq!(rig.bytes(0x6_1000, 3), b"es ");
        assert_eq!(rig.console.pending_input(), 4);
        // The next buffer takes the rest; more input goes straight to a posted buffer.
        let h = rig.q.rx.add_chain(&[(0x7_0000, 4096, true)]);
        rig.run(RX_QUEUE);
        assert_eq!(rig.q.rx.used_elem(1), (u32::from(h), 4));
        assert_eq!(rig.bytes(0x7_0000, 4), b"100\n");
        rig.q.rx.add_chain(&[(0x8_0000, 4096, true)]);
        assert_eq!(rig.input(b"stats\n"), (6, 1 << RX_QUEUE));
        assert_eq!(rig.bytes(0x8_0000, 6), b"stats\n");
        assert_eq!(rig.console.pending_input(), 0);
        // Nothing pending: a posted buffer stays posted.
        rig.q.rx.add_chain(&[(0x9_0000, 4096, true)]);
        assert_eq!(rig.run(RX_QUEUE), (0, 0));
        assert_eq!(rig.q.rx.used_idx(), 3);
    }

    #[test]
    fn input_is_bounded_and_room_is_signalled() {
        let mut rig = Rig::new();
        let big = text(PENDING_INPUT_MAX + 100, 1);
        assert_eq!(rig.input(&big), (PENDING_INPUT_MAX, 0));
        assert_eq!(rig.input(b"more"), (0, 0));
        assert!(rig.room.read().is_err(), "no room yet");
        // The guest posts a buffer: input moves, room appears, the host is told once.
        rig.q.rx.add_chain(&[(0x6_0000, 1000, true)]);
        rig.run(RX_QUEUE);
        assert_eq!(rig.console.pending_input(), PENDING_INPUT_MAX - 1000);
        assert_eq!(rig.bytes(0x6_0000, 1000), big[..1000]);
        assert_eq!(rig.room.read().unwrap(), 1);
        rig.q.rx.add_chain(&[(0x7_0000, 10, true)]);
        rig.run(RX_QUEUE);
        assert!(rig.room.read().is_err(), "only after a refusal");
        // With buffers posted, input that did not fit at first is taken in the same call once
        // delivering made room.
        let mut rig = Rig::new();
        for i in 0..2 {
            rig.q
                .rx
                .add_chain(&[(0x4_0000 + 0x1_0000 * i, 0x8000, true)]);
        }
        let big = text(PENDING_INPUT_MAX + 0x8000, 2);
        assert_eq!(rig.input(&big), (big.len(), 1 << RX_QUEUE));
        assert_eq!(rig.console.pending_input(), 0x8000);
        assert_eq!(rig.bytes(0x5_0000, 0x8000), big[0x8000..0x1_0000]);
        assert!(rig.room.read().is_err(), "nothing was refused");
    }

    #[test]
    fn hostile_receive_chains_do_not_lose_input() {
        let mut rig = Rig::new();
        rig.input(b"abc");
        // Device-readable buffer.
        rig.q.rx.add_chain(&[(0x6_0000, 16, false)]);
        // A loop.
        rig.q.rx.set_desc(6, 0x6_0000, 16, F_NEXT | F_WRITE, 7);
        rig.q.rx.set_desc(7, 0x6_0000, 16, F_NEXT | F_WRITE, 6);
        rig.q.rx.publish(6);
        // Outside memory.
        rig.q.rx.add_chain(&[(0xffff_f000, 64, true)]);
        // Readable after writable.
        rig.q
            .rx
            .add_chain(&[(0x6_0000, 4, true), (0x6_1000, 4, false)]);
        // Head out of range (skipped: it cannot go into the used ring).
        rig.q.rx.publish(99);
        // A good one.
        let good = rig.q.rx.add_chain(&[(0x7_0000, 16, true)]);
        rig.run(RX_QUEUE);
        assert_eq!(rig.q.rx.used_idx(), 5);
        for i in 0..4 {
            assert_eq!(rig.q.rx.used_elem(i).1, 0);
        }
        assert_eq!(rig.q.rx.used_elem(4), (u32::from(good), 3));
        assert_eq!(rig.bytes(0x7_0000, 3), b"abc");
    }

    #[test]
    fn input_waits_while_inactive_and_survives_reset() {
        let mut rig = Rig::new();
        assert_eq!(rig.console.host_input(b"early", None), 5);
        rig.console.reset();
        assert_eq!(rig.console.pending_input(), 5);
        rig.q.rx.add_chain(&[(0x6_0000, 16, true)]);
        rig.run(RX_QUEUE);
        assert_eq!(rig.bytes(0x6_0000, 5), b"early");
    }

    #[test]
    fn state_keeps_pending_input_and_refuses_too_much() {
        let mut rig = Rig::new();
        rig.input(b"pending");
        let state = rig.console.save();
        assert_eq!(
            state,
            DeviceState::Console(ConsoleState {
                pending_input: b"pending".to_vec()
            })
        );
        let mut other = Console::new(Box::new(Sink::default()), rig.room.try_clone().unwrap());
        other.restore(&state).unwrap();
        assert_eq!(other.pending_input(), 7);
        assert_eq!(other.save(), state);

        let big = DeviceState::Console(ConsoleState {
            pending_input: vec![0; PENDING_INPUT_MAX + 1],
        });
        let e = other.restore(&big).unwrap_err();
        assert!(matches!(e, VirtioError::DeviceState(_)), "{e}");
        assert_eq!(other.pending_input(), 7, "unchanged");
        let net = DeviceState::Net(crate::devices::virtio::NetState { mac: [0; 6] });
        assert!(other.restore(&net).is_err());
    }

    fn w(t: &mut MmioTransport<Console>, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Negotiates VERSION_1 and sets up both queues (driver side).
    fn driver_setup(t: &mut MmioTransport<Console>, queues: [&GuestQueue; 2]) {
        for s in [1, 3] {
            w(t, 0x70, s);
        }
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(t, 0x70, 11);
        for (q, gq) in queues.iter().enumerate() {
            w(t, 0x30, q as u32);
            w(t, 0x38, u32::from(gq.size));
            for (reg, addr) in [(0x80, gq.desc), (0x90, gq.avail), (0xa0, gq.used)] {
                w(t, reg, addr as u32);
                w(t, reg + 4, (addr >> 32) as u32);
            }
            w(t, 0x44, 1);
        }
    }

    #[test]
    fn through_the_transport_input_waits_for_activation_then_arrives_with_an_interrupt() {
        let mem = guest_memory();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let dev = Console::new(Box::new(sink.clone()), EventFd::new(EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(dev, mem.clone(), irq.try_clone().unwrap()).unwrap();
        let mut rx = GuestQueue::new(&mem, 0x1_0000, 8);
        let mut tx = GuestQueue::new(&mem, 0x2_0000, 8);
        // Typed before the guest's driver is up (and reset by it).
        assert_eq!(t.host_input(b"hi\n"), 3);
        w(&mut t, 0x70, 0);
        driver_setup(&mut t, [&rx, &tx]);
        rx.add_chain(&[(0x6_0000, 64, true)]);
        w(&mut t, 0x70, 15);
        assert!(t.is_active());
        // Activation kicks every queue; the event loop then processes them.
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
        t.process_queue_event(0);
        assert_eq!(rx.used_elem(0), (0, 3));
        assert_eq!(irq.read().unwrap(), 1);
        // Through the type-erased slot: delivered from the calling thread, interrupt raised.
        let slot = Slot::new(2, SlotKind::Console, t);
        rx.add_chain(&[(0x7_0000, 64, true)]);
        assert_eq!(slot.lock().host_input(b"stats\n"), 6);
        assert_eq!(rx.used_elem(1), (1, 6));
        let mut got = [0u8; 6];
        mem.read_slice(&mut got, GuestAddress(0x7_0000)).unwrap();
        assert_eq!(&got, b"stats\n");
        assert_eq!(irq.read().unwrap(), 1);
        // Output through the queue notification.
        mem.write_slice(b"ok\n", GuestAddress(0x8_0000)).unwrap();
        tx.add_chain(&[(0x8_0000, 3, false)]);
        slot.lock().process_queue_event(TX_QUEUE);
        assert_eq!(sink.bytes(), b"ok\n");
        assert_eq!(irq.read().unwrap(), 1);
    }
}
