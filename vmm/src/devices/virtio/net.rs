//! virtio-net over a [`NetBackend`]: receive queue 0, transmit queue 1, a MAC address in
//! config space, virtio 1.x headers (12-byte `virtio_net_hdr_v1`), no offloads.
//!
//! - Transmit: a chain of device-readable buffers holding header + frame (at most
//!   [`MAX_FRAME_LEN`] bytes of frame); the header is stripped and the frame handed to
//!   [`NetBackend::send`]. Chains with writable buffers, without a full header, or with an
//!   oversized frame are returned unsent.
//! - Receive: one frame per chain of device-writable buffers: a zeroed header with
//!   `num_buffers = 1`, then the frame. A frame the backend gave us while the guest had no
//!   buffer posted stays pending in the device (one frame) until the guest posts one; the
//!   backend keeps the rest. A frame larger than the guest's buffer is dropped.

use std::os::fd::RawFd;
use std::time::Duration;

use netback::NetBackend;
use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

use super::queue::{read_bufs, write_bufs};
use super::{DeviceState, QueueIo, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Length of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (without FCS) the device moves.
pub const MAX_FRAME_LEN: usize = 1514;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = 10;

/// Saved state of a network device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The MAC address the guest was given.
    pub mac: [u8; 6],
}

/// A virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    /// Header + frame for the guest; `rx_pending` is the length of a frame waiting in it.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("rx_pending", &self.rx_pending)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A NIC with address `mac` whose frames go to and come from `backend`.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let mut rx_buf = vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN];
        rx_buf[NUM_BUFFERS_AT..NET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        Net {
            backend,
            mac,
            rx_buf,
            rx_pending: None,
            tx_buf: vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN],
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The backend's port forwards, as bound.
    pub fn forwards(&self) -> Vec<netback::Forward> {
        self.backend.forwards()
    }

    /// Closes the backend's host sockets (the guest has stopped for good).
    pub fn close_backend(&mut self) {
        self.backend.close();
    }

    /// Whether a received frame waits for a guest buffer.
    pub fn rx_pending(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self, io: &mut QueueIo<'_>) {
        while let Some(chain) = io.pop_one_way(TX_QUEUE, false) {
            let len = chain.readable_len();
            let why = if len < NET_HDR_LEN as u64 {
                Some("transmit chain shorter than the header")
            } else if len > (NET_HDR_LEN + MAX_FRAME_LEN) as u64 {
                Some("frame longer than the maximum")
            } else {
                None
            };
            if let Some(why) = why {
                io.reject(TX_QUEUE, chain.head, &why);
                continue;
            }
            let len = len as usize;
            let buf = &mut self.tx_buf[..len];
            if read_bufs(io.mem(), &chain.readable, 0, buf) && len > NET_HDR_LEN {
                if let Err(e) = self.backend.send(&buf[NET_HDR_LEN..]) {
                    warn!("virtio-net: backend failed to send: {e}");
                }
            }
            io.add_used(TX_QUEUE, chain.head, 0);
        }
    }

    /// Moves frames from the backend into guest receive buffers while both exist.
    fn receive(&mut self, io: &mut QueueIo<'_>) {
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf[NET_HDR_LEN..]) {
                    Ok(Some(len)) => len.min(MAX_FRAME_LEN),
                    Ok(None) => return,
                    Err(e) => {
                        warn!("virtio-net: backend failed to receive: {e}");
                        return;
                    }
                },
            };
            self.rx_pending = Some(len);
            // No buffer: the frame stays pending until the guest posts one.
            let Some(chain) = io.pop_one_way(RX_QUEUE, true) else {
                return;
            };
            let total = NET_HDR_LEN + len;
            if chain.writable_len() < total as u64 {
                debug!(
                    "virtio-net: dropping a {len}-byte frame, the guest's buffer holds {}",
                    chain.writable_len()
                );
                self.rx_pending = None;
                io.unpop(RX_QUEUE);
                continue;
            }
            if write_bufs(io.mem(), &chain.writable, 0, &self.rx_buf[..total]) {
                self.rx_pending = None;
                io.add_used(RX_QUEUE, chain.head, total as u32);
            } else {
                io.reject(RX_QUEUE, chain.head, &"receive buffer not writable");
            }
        }
    }
}

impl VirtioDevice for Net {
    const DEVICE_TYPE: u32 = VIRTIO_ID_NET;

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
    }

    fn config_space(&self) -> &[u8] {
        &self.mac
    }

    fn process_queue(&mut self, index: usize, io: &mut QueueIo<'_>) {
        match index {
            RX_QUEUE => self.receive(io),
            TX_QUEUE => {
                self.transmit(io);
                // Sending may have produced answers (ARP, a local TCP stack).
                self.receive(io);
            }
            _ => {}
        }
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.backend.event_fd())
    }

    fn host_events_wanted(&self) -> bool {
        self.rx_pending.is_none()
    }

    fn process_host_event(&mut self, io: Option<&mut QueueIo<'_>>) {
        if let Err(e) = self.backend.poll() {
            warn!("virtio-net: backend poll failed: {e}");
        }
        if let Some(io) = io {
            self.receive(io);
        }
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        self.backend.next_timeout()
    }

    fn reset(&mut self) {
        self.rx_pending = None;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState { mac: self.mac })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        let DeviceState::Net(s) = state else {
            return Err(VirtioError::DeviceState(
                "not a network device state".into(),
            ));
        };
        // The guest keeps the address it was given.
        self.mac = s.mac;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fuzz::FakeBackend;
    use crate::devices::virtio::testing::{RxTx, F_NEXT};
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];

    struct Rig {
        q: RxTx,
        net: Net,
        backend: FakeBackend,
    }

    impl Rig {
        fn new() -> Self {
            let backend = FakeBackend::new().unwrap();
            Rig {
                q: RxTx::new(),
                net: Net::new(Box::new(backend.clone()), MAC),
                backend,
            }
        }

        fn run(&mut self, index: usize) -> u32 {
            let mut io = QueueIo::new(&self.q.mem, &mut self.q.queues);
            self.net.process_queue(index, &mut io);
            io.used_mask()
        }

        fn host_event(&mut self) -> u32 {
            let mut io = QueueIo::new(&self.q.mem, &mut self.q.queues);
            self.net.process_host_event(Some(&mut io));
            io.used_mask()
        }

        fn sent(&self) -> Vec<Vec<u8>> {
            self.backend.sent.lock().unwrap().clone()
        }

        fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.q.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn config_space_holds_the_mac() {
        let rig = Rig::new();
        let mut b = [0u8; 8];
        rig.net.read_config(0, &mut b);
        assert_eq!(&b[..6], &MAC);
        assert_eq!(&b[6..], &[0, 0]);
        let mut one = [0u8; 1];
        rig.net.read_config(5, &mut one);
        assert_eq!(one[0], 0x56);
        let f = rig.net.features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0);
    }

    #[test]
    fn transmit_strips_the_header() {
        let mut rig = Rig::new();
        let f = frame(60, 1);
        rig.q
            .mem
            .write_slice(&[0xaa; 12], GuestAddress(0x4_0000))
            .unwrap();
        rig.q.mem.write_slice(&f, GuestAddress(0x4_000c)).unwrap();
        rig.q.tx.add_chain(&[(0x4_0000, 72, false)]);
        // Header split across descriptors, frame across two more.
        rig.q.mem.write_slice(&f, GuestAddress(0x5_0000)).unwrap();
        rig.q.tx.add_chain(&[
            (0x4_0000, 5, false),
            (0x4_0005, 7, false),
            (0x5_0000, 20, false),
            (0x5_0014, 40, false),
        ]);
        assert_eq!(rig.run(TX_QUEUE), 1 << TX_QUEUE);
        assert_eq!(rig.sent(), vec![f.clone(), f]);
        assert_eq!(rig.q.tx.used_idx(), 2);
        assert_eq!(rig.q.tx.used_elem(0), (0, 0));
    }

    #[test]
    fn bad_transmit_chains_are_not_sent() {
        let mut rig = Rig::new();
        // Device-writable buffer.
        rig.q
            .tx
            .add_chain(&[(0x4_0000, 12, false), (0x4_1000, 60, true)]);
        // Shorter than the header.
        rig.q.tx.add_chain(&[(0x4_0000, 11, false)]);
        // Longer than the largest frame.
        rig.q
            .tx
            .add_chain(&[(0x4_0000, (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32, false)]);
        // A loop.
        rig.q.tx.set_desc(6, 0x4_0000, 64, F_NEXT, 7);
        rig.q.tx.set_desc(7, 0x4_0000, 64, F_NEXT, 6);
        rig.q.tx.publish(6);
        // Outside memory.
        rig.q.tx.add_chain(&[(0xffff_f000, 64, false)]);
        rig.run(TX_QUEUE);
        assert!(rig.sent().is_empty());
        assert_eq!(rig.q.tx.used_idx(), 5);
        for i in 0..5 {
            assert_eq!(rig.q.tx.used_elem(i).1, 0);
        }
    }

    #[test]
    fn receive_waits_for_a_buffer_then_delivers() {
        let mut rig = Rig::new();
        let f = frame(98, 7);
        rig.backend.push(&f);
        rig.backend.push(&frame(200, 9));
        // No receive buffer yet: one frame pends in the device, the other stays in the backend.
        assert_eq!(rig.host_event(), 0);
        assert!(rig.net.rx_pending());
        assert_eq!(rig.backend.inbox.lock().unwrap().len(), 1);
        assert_eq!(*rig.backend.polls.lock().unwrap(), 1);
        // Calling again without a buffer neither spins nor loses anything.
        rig.host_event();
        assert_eq!(rig.backend.inbox.lock().unwrap().len(), 1);

        // A buffer split in two descriptors; the guest notifies the receive queue.
        rig.q
            .mem
            .write_slice(&[0xff; 2048], GuestAddress(0x6_0000))
            .unwrap();
        rig.q
            .rx
            .add_chain(&[(0x6_0000, 10, true), (0x6_0010, 1600, true)]);
        assert_eq!(rig.run(RX_QUEUE), 1 << RX_QUEUE);
        assert_eq!(rig.q.rx.used_elem(0), (0, (NET_HDR_LEN + f.len()) as u32));
        let mut hdr = rig.bytes(0x6_0000, 10);
        hdr.extend(rig.bytes(0x6_0010, 2));
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(rig.bytes(0x6_0012, f.len()), f);
        // The second frame waits for the next buffer.
        assert!(rig.net.rx_pending());
        rig.q.rx.add_chain(&[(0x7_0000, 1526, true)]);
        rig.run(RX_QUEUE);
        assert!(!rig.net.rx_pending());
        assert_eq!(rig.bytes(0x7_000c, 200), frame(200, 9));
        assert_eq!(rig.q.rx.used_idx(), 2);
    }

    #[test]
    fn bad_receive_buffers_are_skipped_and_too_small_ones_drop_the_frame() {
        let mut rig = Rig::new();
        rig.backend.push(&frame(1000, 1));
        rig.backend.push(&frame(64, 2));
        // A buffer with a device-readable part: refused, the frame goes to the next buffer.
        rig.q.rx.add_chain(&[(0x6_0000, 1526, false)]);
        // Too small for the 1000-byte frame: that frame is dropped, the buffer kept for the
        // next frame.
        let small = rig.q.rx.add_chain(&[(0x7_0000, 100, true)]);
        rig.host_event();
        assert_eq!(rig.q.rx.used_idx(), 2);
        assert_eq!(rig.q.rx.used_elem(0).1, 0);
        assert_eq!(rig.q.rx.used_elem(1), (u32::from(small), 12 + 64));
        assert_eq!(rig.bytes(0x7_000c, 64), frame(64, 2));
        assert!(!rig.net.rx_pending());
    }

    #[test]
    fn a_flood_of_frames_too_big_for_the_buffer_is_bounded_per_round() {
        let mut rig = Rig::new();
        for _ in 0..1000 {
            rig.backend.push(&frame(1000, 5));
        }
        rig.q.rx.add_chain(&[(0x7_0000, 100, true)]);
        let mut io = QueueIo::new(&rig.q.mem, &mut rig.q.queues);
        rig.net.process_host_event(Some(&mut io));
        assert_eq!(io.requeue_mask(), 1 << RX_QUEUE, "comes back later");
        let left = rig.backend.inbox.lock().unwrap().len();
        assert!(
            left >= 1000 - 9,
            "at most a ring's worth dropped per round ({left} left)"
        );
        assert_eq!(rig.q.rx.used_idx(), 0);
    }

    #[test]
    fn transmit_also_delivers_replies_and_reset_drops_the_pending_frame() {
        let mut rig = Rig::new();
        rig.q.rx.add_chain(&[(0x6_0000, 1526, true)]);
        rig.backend.push(&frame(42, 3));
        rig.q.tx.add_chain(&[(0x4_0000, 12 + 42, false)]);
        assert_eq!(rig.run(TX_QUEUE), (1 << TX_QUEUE) | (1 << RX_QUEUE));
        assert_eq!(rig.q.rx.used_idx(), 1);
        rig.backend.push(&frame(42, 4));
        rig.host_event();
        assert!(rig.net.rx_pending());
        rig.net.reset();
        assert!(!rig.net.rx_pending());
    }

    #[test]
    fn state_keeps_the_mac() {
        let rig = Rig::new();
        let state = rig.net.save();
        let mut other = Net::new(Box::new(FakeBackend::new().unwrap()), [0; 6]);
        other.restore(&state).unwrap();
        assert_eq!(other.mac(), MAC);
        let blk = DeviceState::Block(crate::devices::virtio::BlockState {
            capacity: 1,
            read_only: false,
        });
        assert!(other.restore(&blk).is_err());
    }
}
