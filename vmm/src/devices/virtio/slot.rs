//! A virtio device as the VM sees it: its register window on the MMIO bus, its line, and
//! what the event loop and snapshots need from it — whatever the device type.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::block::{Block, DiskSnapshot};
use super::mmio::{MmioState, MmioTransport};
use super::net::Net;
use super::{VirtioDevice, VirtioError};
use crate::devices::bus::BusDevice;
use crate::persist::Persist;

/// The event-loop and snapshot face of a transport, independent of its device type.
pub trait Transport: BusDevice {
    /// A queue's notification eventfd fired.
    fn process_queue_event(&mut self, index: usize);
    /// The device's host-side fd.
    fn host_event_fd(&self) -> Option<RawFd>;
    /// Whether to watch the host fd now.
    fn host_events_wanted(&self) -> bool;
    /// The host fd was readable, or the timeout elapsed.
    fn process_host_event(&mut self);
    /// Longest wait before [`Transport::process_host_event`] must run again.
    fn next_timeout(&mut self) -> Option<Duration>;
    /// Host input for the guest (a console's): how many bytes the device took; devices
    /// without host input take none.
    fn host_input(&mut self, _bytes: &[u8]) -> usize {
        0
    }
    /// Transport, queue and device state (vCPUs paused): [`Persist::save`] of the transport.
    fn save(&self) -> Result<MmioState, VirtioError>;
    /// Raises a pending interrupt again (after a restore; see
    /// [`MmioTransport::reassert_interrupt`]).
    fn reassert_interrupt(&self);
    /// The block device behind this transport, if it is one.
    fn block(&self) -> Option<&Block> {
        None
    }
    /// The block device behind this transport, if it is one, to change.
    fn block_mut(&mut self) -> Option<&mut Block> {
        None
    }
    /// The network device behind this transport, if it is one.
    fn net(&self) -> Option<&Net> {
        None
    }
    /// The network device behind this transport, if it is one, to change.
    fn net_mut(&mut self) -> Option<&mut Net> {
        None
    }
}

impl<D: VirtioDevice + 'static> Transport for MmioTransport<D> {
    fn process_queue_event(&mut self, index: usize) {
        MmioTransport::process_queue_event(self, index)
    }
    fn host_event_fd(&self) -> Option<RawFd> {
        MmioTransport::host_event_fd(self)
    }
    fn host_events_wanted(&self) -> bool {
        MmioTransport::host_events_wanted(self)
    }
    fn process_host_event(&mut self) {
        MmioTransport::process_host_event(self)
    }
    fn next_timeout(&mut self) -> Option<Duration> {
        MmioTransport::next_timeout(self)
    }
    fn host_input(&mut self, bytes: &[u8]) -> usize {
        MmioTransport::host_input(self, bytes)
    }
    fn save(&self) -> Result<MmioState, VirtioError> {
        Persist::save(self)
    }
    fn reassert_interrupt(&self) {
        MmioTransport::reassert_interrupt(self)
    }
    fn block(&self) -> Option<&Block> {
        (self.device() as &dyn std::any::Any).downcast_ref::<Block>()
    }
    fn block_mut(&mut self) -> Option<&mut Block> {
        (self.device_mut() as &mut dyn std::any::Any).downcast_mut::<Block>()
    }
    fn net(&self) -> Option<&Net> {
        (self.device() as &dyn std::any::Any).downcast_ref::<Net>()
    }
    fn net_mut(&mut self) -> Option<&mut Net> {
        (self.device_mut() as &mut dyn std::any::Any).downcast_mut::<Net>()
    }
}

/// What kind of device a slot holds, as recorded in snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-console.
    Console,
}

/// One virtio device in a snapshot. Field order is the state file's encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// Window index.
    pub index: u32,
    /// Device kind.
    pub kind: SlotKind,
    /// Transport, queues and device registers.
    pub mmio: MmioState,
    /// For a disk: what it sits on (its δ blocks are in the snapshot's
    /// `DISK_DELTA_FILE`).
    pub disk: Option<DiskSnapshot>,
}

/// One attached virtio-mmio device.
pub struct Slot {
    /// Device index: window at `VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE`.
    pub index: u32,
    /// What it is.
    pub kind: SlotKind,
    /// The transport (also on the MMIO bus).
    pub transport: Arc<Mutex<dyn Transport>>,
    /// Raw fds of the queue eventfds, in queue order (owned by the transport).
    pub queue_fds: Vec<RawFd>,
    /// For a disk: what it sits on, as snapshots record it.
    pub disk: Option<DiskSnapshot>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("index", &self.index)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// Wraps `transport` (whose queue eventfds are already registered with KVM).
    pub fn new<D: VirtioDevice + 'static>(
        index: u32,
        kind: SlotKind,
        transport: MmioTransport<D>,
    ) -> Self {
        let queue_fds = transport
            .queue_events()
            .iter()
            .map(|e| e.as_raw_fd())
            .collect();
        Slot {
            index,
            kind,
            transport: Arc::new(Mutex::new(transport)),
            queue_fds,
            disk: None,
        }
    }

    /// The slot's state (vCPUs paused): its transport's, and for a disk what it sits on.
    pub fn save(&self) -> Result<VirtioSlotState, VirtioError> {
        let t = self.lock();
        Ok(VirtioSlotState {
            index: self.index,
            kind: self.kind,
            mmio: t.save()?,
            disk: t.block().and(self.disk.clone()),
        })
    }

    /// Locks the transport (a poisoned lock still yields it: device state stays usable).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, dyn Transport + 'static> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }
}
