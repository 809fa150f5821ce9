//! The smoltcp device of the gateway: two bounded in-memory frame queues.
//!
//! `to_stack` holds guest frames that passed inspection, waiting for the interface;
//! `to_guest` holds frames the stack (or the DHCP server and UDP relay) produced, waiting for
//! [`crate::NetBackend::recv`]. When `to_guest` is full the device refuses transmit tokens,
//! so TCP data waits in its socket buffers instead of piling up here.

use std::collections::VecDeque;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Largest Ethernet frame either way (1500-byte MTU plus the 14-byte header; no VLAN tag).
pub(crate) const MAX_FRAME: usize = 1514;

/// Frames waiting on either side of the stack.
#[derive(Debug)]
pub(crate) struct Queues {
    pub(crate) to_stack: VecDeque<Vec<u8>>,
    pub(crate) to_guest: VecDeque<Vec<u8>>,
    pub(crate) capacity: usize,
    /// Frames the stack produced while `to_guest` was full.
    pub(crate) dropped: u64,
}

impl Queues {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            to_stack: VecDeque::with_capacity(capacity),
            to_guest: VecDeque::with_capacity(capacity),
            capacity,
            dropped: 0,
        }
    }

    pub(crate) fn guest_full(&self) -> bool {
        self.to_guest.len() >= self.capacity
    }

    /// Queues a frame for the guest; false (and counted) when the queue is full.
    pub(crate) fn push_guest(&mut self, frame: Vec<u8>) -> bool {
        if self.guest_full() {
            self.dropped += 1;
            false
        } else {
            self.to_guest.push_back(frame);
            true
        }
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.to_stack.pop_front()?;
        Some((RxToken(frame), TxToken(self)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        (!self.guest_full()).then_some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = None;
        caps.checksum = super::wire::rx_checksums();
        caps
    }
}

/// One guest frame handed to the stack.
pub(crate) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Room for one frame to the guest. A reply to a received frame may find the queue full;
/// it is then built and dropped (TCP retransmits).
pub(crate) struct TxToken<'a>(&'a mut Queues);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push_guest(frame);
        r
    }
}
