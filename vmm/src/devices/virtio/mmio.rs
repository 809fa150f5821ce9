//! The virtio-mmio transport, version 2 ("modern"): a 4 KiB register window per device.
//!
//! ```text
//! 0x000 MagicValue "virt"   R   0x044 QueueReady          RW
//! 0x004 Version (2)         R   0x050 QueueNotify         W   (ioeventfd, datamatch = queue)
//! 0x008 DeviceID            R   0x060 InterruptStatus     R   bit 0 used buffer, bit 1 config
//! 0x00c VendorID            R   0x064 InterruptACK        W
//! 0x010 DeviceFeatures      R   0x070 Status              RW
//! 0x014 DeviceFeaturesSel   W   0x080/0x084 QueueDesc     W   low/high
//! 0x020 DriverFeatures      W   0x090/0x094 QueueDriver   W   (available ring)
//! 0x024 DriverFeaturesSel   W   0x0a0/0x0a4 QueueDevice   W   (used ring)
//! 0x030 QueueSel            W   0x0b0..0x0bc SHM regions  R   none (length all ones)
//! 0x034 QueueNumMax         R   0x0fc ConfigGeneration    R
//! 0x038 QueueNum            W   0x100… device config      RW  (delegated to the device)
//! ```
//!
//! Registers below 0x100 take aligned 32-bit accesses only; others read as zero and are not
//! written. The status register moves only forward, one documented step at a time, and 0
//! resets the device:
//!
//! ```text
//! 0 --ACKNOWLEDGE--> 1 --DRIVER--> 3 --FEATURES_OK--> 11 --DRIVER_OK--> 15 (active)
//!                                      │ refused (stays 3) unless the driver took
//!                                      │ VIRTIO_F_VERSION_1 and nothing unoffered
//! any --write 0--> 0 (device and queues reset)      any --FAILED--> stops processing
//! DRIVER_OK with an invalid ready queue or a refused activation --> DEVICE_NEEDS_RESET
//! ```
//!
//! Features are written while DRIVER is set and FEATURES_OK is not; queues are configured
//! after FEATURES_OK and before DRIVER_OK, each while it is not ready.

use std::os::fd::RawFd;
use std::time::Duration;

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceState, QueueIo, VirtioDevice, VirtioError, MAX_QUEUES, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::devices::Interrupt;
use crate::persist::Persist;

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The transport version this implements.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id: "CLDL", little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"CLDL");
/// Offset of QueueNotify in the window: where to register the queue ioeventfds.
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Start of device config space in the window.
pub const CONFIG_OFFSET: u64 = 0x100;

const STATUS_KNOWN: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

/// One queue's saved configuration and position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size the device offered.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
}

impl QueueSnapshot {
    fn of(q: &Queue) -> Self {
        QueueSnapshot {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        }
    }

    fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Saved state of a transport and its device: plain data, postcard-friendly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// virtio device type.
    pub device_type: u32,
    /// Status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: DeviceState,
}

/// A virtio device behind its virtio-mmio register window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: Interrupt,
    status: u32,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &D::DEVICE_TYPE)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("interrupt_status", &self.interrupt_status)
            .finish_non_exhaustive()
    }
}

/// The transport's and device's state (take it with the vCPUs paused); restored: a
/// transport around a freshly built device (same disk or backend), on the guest's memory
/// and its interrupt line.
impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    type Args<'a> = (D, GuestMemoryMmap, Interrupt);
    type Error = VirtioError;

    /// The transport's and device's state, for a snapshot (take it with vCPUs paused).
    fn save(&self) -> Result<MmioState, VirtioError> {
        Ok(MmioState {
            device_type: D::DEVICE_TYPE,
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device: self.device.save(),
        })
    }

    /// Rebuilds a transport from `state` around a freshly built `device` (same disk or
    /// backend). An active device comes back activated; every queue event is signalled once
    /// so that notifications in flight at snapshot time are not lost, and a pending interrupt
    /// is raised again.
    fn restore(
        (device, mem, irq): (D, GuestMemoryMmap, Interrupt),
        state: &MmioState,
    ) -> Result<Self, VirtioError> {
        let mut t = Self::new(device, mem, irq)?;
        let device_type = D::DEVICE_TYPE;
        if state.device_type != device_type {
            return Err(VirtioError::DeviceType {
                saved: state.device_type,
                device: device_type,
            });
        }
        if state.queues.len() != t.queues.len() {
            return Err(VirtioError::QueueLayout(format!(
                "{} saved queues, the device has {}",
                state.queues.len(),
                t.queues.len()
            )));
        }
        for (index, (saved, live)) in state.queues.iter().zip(&mut t.queues).enumerate() {
            if saved.max_size != live.max_size() {
                return Err(VirtioError::QueueLayout(format!(
                    "queue {index} had {} entries at most, now {}",
                    saved.max_size,
                    live.max_size()
                )));
            }
            *live = saved
                .to_queue()
                .map_err(|source| VirtioError::QueueState { index, source })?;
        }
        let status = state.status;
        if status & !STATUS_KNOWN != 0 || !status_ordered(status) {
            return Err(VirtioError::TransportState(format!(
                "status {status:#x} cannot be reached"
            )));
        }
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && !features_acceptable(state.acked_features, t.device.features())
        {
            return Err(VirtioError::TransportState(format!(
                "accepted features {:#x} are not acceptable for offered {:#x}",
                state.acked_features,
                t.device.features()
            )));
        }
        t.device.restore(&state.device)?;
        t.status = status;
        t.acked_features = state.acked_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.interrupt_status =
            state.interrupt_status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        t.config_generation = state.config_generation;
        if t.is_active() {
            if let Some(index) = t.invalid_ready_queue() {
                return Err(VirtioError::QueueMemory(index));
            }
            t.device.activate(t.acked_features)?;
            t.kick_queues();
        }
        // A pending interrupt is raised again by `reassert_interrupt` once the interrupt
        // controllers and vCPUs have their state back: raised now, it would be lost when
        // their restore overwrites the lines.
        Ok(t)
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over guest memory `mem`, raising its interrupt with `irq`
    /// (the device's line, or an eventfd registered as its KVM irqfd).
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        irq: impl Into<Interrupt>,
    ) -> Result<Self, VirtioError> {
        let irq = irq.into();
        let sizes = device.queue_max_sizes();
        if sizes.len() > MAX_QUEUES {
            return Err(VirtioError::TooManyQueues(sizes.len()));
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| VirtioError::QueueMaxSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_evts,
            irq,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    /// Raises the interrupt again if the device has one pending (interrupt status not yet
    /// acknowledged): called after a restore, once the interrupt controllers' state is back.
    pub fn reassert_interrupt(&self) {
        if self.interrupt_status != 0 {
            self.raise_irq();
        }
    }

    /// One eventfd per queue, in queue order: register each as a KVM ioeventfd at
    /// `window base + NOTIFY_OFFSET`, datamatch = queue index (u32), and poll it.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver has activated the device (DRIVER_OK, not failed or needing reset).
    pub fn is_active(&self) -> bool {
        self.status
            & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)
            == VIRTIO_CONFIG_S_DRIVER_OK
    }

    /// Queue `index`'s eventfd fired: consume it and process the queue.
    pub fn process_queue_event(&mut self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            // Nothing to read (EAGAIN) is fine: we were called directly.
            let _ = evt.read();
        }
        self.process_queue(index);
    }

    /// The device's host-side file descriptor, if any (poll it for readability).
    pub fn host_event_fd(&self) -> Option<RawFd> {
        self.device.host_event_fd()
    }

    /// Whether to watch [`Self::host_event_fd`] now: only while the device is active and can
    /// take host input. Re-check after every call into the transport.
    pub fn host_events_wanted(&self) -> bool {
        self.is_active() && self.device.host_events_wanted()
    }

    /// The host event fd was readable or the timeout elapsed.
    pub fn process_host_event(&mut self) {
        if !self.is_active() {
            self.device.process_host_event(None);
            return;
        }
        let mut io = QueueIo::new(&self.mem, &mut self.queues);
        self.device.process_host_event(Some(&mut io));
        let (used, requeue) = (io.used_mask(), io.requeue_mask());
        self.finish(used, requeue);
    }

    /// Host input for the guest (see [`VirtioDevice::host_input`]): delivered now to buffers
    /// the driver posted, interrupt raised; what finds no buffer waits in the device. Returns
    /// how many bytes the device took.
    pub fn host_input(&mut self, bytes: &[u8]) -> usize {
        if !self.is_active() {
            return self.device.host_input(bytes, None);
        }
        let mut io = QueueIo::new(&self.mem, &mut self.queues);
        let taken = self.device.host_input(bytes, Some(&mut io));
        let (used, requeue) = (io.used_mask(), io.requeue_mask());
        self.finish(used, requeue);
        taken
    }

    /// How long the event loop may wait before calling [`Self::process_host_event`].
    pub fn next_timeout(&mut self) -> Option<Duration> {
        self.device.next_timeout()
    }

    /// Tells the driver the device's config changed (new generation, config interrupt).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn process_queue(&mut self, index: usize) {
        if !self.is_active() || index >= self.queues.len() {
            return;
        }
        let mut io = QueueIo::new(&self.mem, &mut self.queues);
        self.device.process_queue(index, &mut io);
        let (used, requeue) = (io.used_mask(), io.requeue_mask());
        self.finish(used, requeue);
    }

    /// Raises the interrupt for used buffers (unless the driver suppressed it on every queue
    /// that got some), and re-schedules queues with work left over.
    fn finish(&mut self, used: u32, requeue: u32) {
        let wanted = (0..self.queues.len()).any(|q| used & (1 << q) != 0 && !self.suppressed(q));
        if wanted {
            self.signal(VIRTIO_MMIO_INT_VRING);
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if requeue & (1 << i) != 0 {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot re-schedule queue {i}: {e}");
                }
            }
        }
    }

    /// Whether the driver set VIRTQ_AVAIL_F_NO_INTERRUPT on queue `q` (virtio 1.x 2.7.7: it
    /// polls that queue; e.g. the micro guest's console transmit queue). Read after the used
    /// index was published; unreadable flags count as "interrupt me". virtio-queue does not
    /// look at this flag (only at EVENT_IDX, which these devices do not offer).
    fn suppressed(&self, q: usize) -> bool {
        const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let Some(queue) = self.queues.get(q) else {
            return false;
        };
        use vm_memory::Bytes;
        self.mem
            .read_obj::<u16>(vm_memory::GuestAddress(queue.avail_ring()))
            .is_ok_and(|f| u16::from_le(f) & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
    }

    fn signal(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        self.raise_irq();
    }

    fn raise_irq(&self) {
        if let Err(e) = self.irq.trigger() {
            warn!("virtio-mmio: cannot raise the interrupt: {e}");
        }
    }

    /// The first ready queue whose rings are not in guest memory.
    fn invalid_ready_queue(&self) -> Option<usize> {
        self.queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            debug!("virtio-mmio: device reset");
            self.reset();
            return;
        }
        let old = self.status;
        // Only the device sets NEEDS_RESET; a driver writing back what it read is fine.
        let needs_reset_forged = value & VIRTIO_CONFIG_S_NEEDS_RESET & !old != 0;
        if value & old != old
            || value & !STATUS_KNOWN != 0
            || needs_reset_forged
            || !status_ordered(value)
        {
            debug!("virtio-mmio: refused status change {old:#x} -> {value:#x}");
            return;
        }
        let mut value = value;
        let added = value & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && !features_acceptable(self.acked_features, self.device.features())
        {
            debug!(
                "virtio-mmio: refusing FEATURES_OK for features {:#x}",
                self.acked_features
            );
            value &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        }
        self.status = value;
        if value & !old & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & VIRTIO_CONFIG_S_FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let result = match self.invalid_ready_queue() {
            Some(index) => Err(VirtioError::QueueMemory(index)),
            None => self.device.activate(self.acked_features),
        };
        match result {
            // Wake the event loop: buffers posted before DRIVER_OK get processed, and host
            // event interest is re-checked.
            Ok(()) => self.kick_queues(),
            Err(e) => {
                warn!("virtio-mmio: activation failed, the device needs a reset: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.signal(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    /// Signals every queue event once.
    fn kick_queues(&self) {
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                warn!("virtio-mmio: cannot signal a queue event: {e}");
            }
        }
    }

    /// The selected queue, if it exists and may be configured now.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let setup = self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
            == VIRTIO_CONFIG_S_FEATURES_OK;
        let q = self.queues.get_mut(self.queue_sel as usize)?;
        if !setup || q.ready() {
            debug!("virtio-mmio: queue configuration refused in this state");
            return None;
        }
        Some(q)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => D::DEVICE_TYPE,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            // No shared memory regions: length reads as all ones.
            0x0b0 | 0x0b4 | 0x0b8 | 0x0bc => u32::MAX,
            0x0fc => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                let writable = self.status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
                    == VIRTIO_CONFIG_S_DRIVER;
                if !writable {
                    debug!(
                        "virtio-mmio: driver features written in status {:#x}",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // No device offers feature bits past 63.
                    _ => debug!(
                        "virtio-mmio: driver features page {} ignored",
                        self.driver_features_sel
                    ),
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.configurable_queue() {
                    let size = u16::try_from(v).unwrap_or(0);
                    if size == 0 || size > q.max_size() || !size.is_power_of_two() {
                        debug!("virtio-mmio: invalid queue size {v}");
                    } else {
                        q.set_size(size);
                    }
                }
            }
            0x044 => {
                let idx = self.queue_sel as usize;
                let setup = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
                let active = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
                if let Some(q) = self.queues.get_mut(idx) {
                    match v {
                        // Disabling is allowed any time after setup began.
                        0 if setup => q.set_ready(false),
                        1 if setup && !active => q.set_ready(true),
                        _ => debug!("virtio-mmio: QueueReady {v} refused for queue {idx}"),
                    }
                }
            }
            0x050 => self.process_queue(v as usize),
            0x064 => self.interrupt_status &= !v,
            0x070 => self.set_status(v),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.configurable_queue() {
            f(q);
        }
    }
}

/// Each status bit only with its prerequisite: DRIVER needs ACKNOWLEDGE, FEATURES_OK needs
/// DRIVER, DRIVER_OK needs FEATURES_OK.
fn status_ordered(s: u32) -> bool {
    let has = |b: u32| s & b != 0;
    (!has(VIRTIO_CONFIG_S_DRIVER) || has(VIRTIO_CONFIG_S_ACKNOWLEDGE))
        && (!has(VIRTIO_CONFIG_S_FEATURES_OK) || has(VIRTIO_CONFIG_S_DRIVER))
        && (!has(VIRTIO_CONFIG_S_DRIVER_OK) || has(VIRTIO_CONFIG_S_FEATURES_OK))
}

/// The driver took VIRTIO_F_VERSION_1 and nothing the device did not offer.
fn features_acceptable(acked: u64, offered: u64) -> bool {
    acked & VIRTIO_F_VERSION_1 != 0 && acked & !offered == 0
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            debug!(
                "virtio-mmio: {}-byte read at {offset:#x} refused",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "virtio-mmio: {}-byte write at {offset:#x} refused",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            debug!("virtio-mmio: unaligned write at {offset:#x} refused");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::disk::{CowDisk, Delta};
    use crate::devices::virtio::fuzz::FakeBackend;
    use crate::devices::virtio::net::Net;
    use crate::devices::virtio::testing::{guest_memory, GuestQueue};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::{Bytes, GuestAddress};

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const QBASE: u64 = 0x1_0000;
    const HDR: u64 = 0x2_0000;
    const STATUS: u64 = 0x2_1000;

    fn block() -> Block {
        let disk = CowDisk::new(None, Delta::in_memory(1 << 20).unwrap()).unwrap();
        Block::new(disk, false, "t")
    }

    fn transport<D: VirtioDevice>(dev: D) -> (MmioTransport<D>, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev, guest_memory(), irq.try_clone().unwrap()).unwrap();
        (t, irq)
    }

    fn w<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn r<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates `features` (returns the status read back).
    fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D>, features: u64) -> u32 {
        w(t, 0x70, ACK);
        w(t, 0x70, ACK | DRV);
        w(t, 0x24, 0);
        w(t, 0x20, features as u32);
        w(t, 0x24, 1);
        w(t, 0x20, (features >> 32) as u32);
        w(t, 0x70, ACK | DRV | FOK);
        r(t, 0x70)
    }

    /// Points queue `q` at the rings of `gq` and marks it ready.
    fn setup_queue<D: VirtioDevice>(t: &mut MmioTransport<D>, q: u32, gq: &GuestQueue) {
        w(t, 0x30, q);
        assert_eq!(r(t, 0x44), 0);
        w(t, 0x38, u32::from(gq.size));
        for (reg, addr) in [(0x80, gq.desc), (0x90, gq.avail), (0xa0, gq.used)] {
            w(t, reg, addr as u32);
            w(t, reg + 4, (addr >> 32) as u32);
        }
        w(t, 0x44, 1);
        assert_eq!(r(t, 0x44), 1);
    }

    fn driver_ready(t: &mut MmioTransport<Block>, gq: &GuestQueue) {
        let f = t.device().features();
        assert_eq!(negotiate(t, f), ACK | DRV | FOK);
        setup_queue(t, 0, gq);
        w(t, 0x70, ACK | DRV | FOK | DOK);
        assert!(t.is_active());
    }

    fn blk_request(
        t: &MmioTransport<Block>,
        gq: &mut GuestQueue,
        req: u32,
        sector: u64,
        data: u64,
    ) {
        let mem = &t.mem;
        mem.write_obj(req, GuestAddress(HDR)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let writable = req == VIRTIO_BLK_T_IN;
        gq.add_chain(&[(HDR, 16, false), (data, 512, writable), (STATUS, 1, true)]);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(block());
        assert_eq!(r(&mut t, 0x000), 0x7472_6976);
        assert_eq!(r(&mut t, 0x004), 2);
        assert_eq!(r(&mut t, 0x008), 2);
        assert_eq!(r(&mut t, 0x00c), VENDOR_ID);
        let f = t.device().features();
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), f as u32);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), (f >> 32) as u32);
        assert_eq!(r(&mut t, 0x10) & 1, 1, "VERSION_1 is bit 32");
        w(&mut t, 0x14, 2);
        assert_eq!(r(&mut t, 0x10), 0);
        assert_eq!(r(&mut t, 0x34), 256);
        w(&mut t, 0x30, 5);
        assert_eq!(r(&mut t, 0x34), 0, "no queue 5");
        assert_eq!(r(&mut t, 0xb0), u32::MAX, "no shared memory");
        // Config space: capacity in sectors, readable with any width.
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);
        // Odd widths and alignments on registers read zero.
        let mut two = [0xffu8; 2];
        t.read(0x000, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xffu8; 4];
        t.read(0x002, &mut four);
        assert_eq!(four, [0; 4]);
    }

    #[test]
    fn features_ok_requires_version_1_and_offered_features_only() {
        let (mut t, _) = transport(block());
        let offered = t.device().features();
        assert_eq!(negotiate(&mut t, offered & !VIRTIO_F_VERSION_1), ACK | DRV);
        w(&mut t, 0, 0);
        w(&mut t, 0x70, 0);
        assert_eq!(negotiate(&mut t, offered | 1 << 40), ACK | DRV);
        w(&mut t, 0x70, 0);
        assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1), ACK | DRV | FOK);
        // Features are frozen after FEATURES_OK.
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, u32::MAX);
        assert_eq!(t.save().unwrap().acked_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_moves_forward_one_step_at_a_time() {
        let (mut t, _) = transport(block());
        w(&mut t, 0x70, DRV);
        assert_eq!(r(&mut t, 0x70), 0, "DRIVER before ACKNOWLEDGE");
        w(&mut t, 0x70, ACK | DRV | FOK | DOK);
        assert_eq!(
            r(&mut t, 0x70),
            ACK | DRV,
            "FEATURES_OK refused without VERSION_1"
        );
        w(&mut t, 0x70, ACK);
        assert_eq!(r(&mut t, 0x70), ACK | DRV, "bits cannot be cleared");
        w(&mut t, 0x70, ACK | DRV | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(r(&mut t, 0x70), ACK | DRV, "NEEDS_RESET is the device's");
        w(&mut t, 0x70, ACK | DRV | 0x200);
        assert_eq!(r(&mut t, 0x70), ACK | DRV, "unknown bits");
        w(&mut t, 0x70, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(r(&mut t, 0x70), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn queues_are_configured_only_during_setup() {
        let (mut t, _) = transport(block());
        let gq = GuestQueue::new(&t.mem, QBASE, 16);
        // Before FEATURES_OK nothing sticks.
        w(&mut t, 0x38, 16);
        w(&mut t, 0x44, 1);
        assert_eq!(r(&mut t, 0x44), 0);
        let f = t.device().features();
        negotiate(&mut t, f);
        // Invalid sizes are ignored.
        for bad in [0, 3, 512, 0x1_0010] {
            w(&mut t, 0x38, bad);
            assert_eq!(t.save().unwrap().queues[0].size, 256, "size {bad}");
        }
        setup_queue(&mut t, 0, &gq);
        // A ready queue cannot be moved.
        w(&mut t, 0x80, 0x9000);
        assert_eq!(t.save().unwrap().queues[0].desc_table, gq.desc);
        w(&mut t, 0x70, ACK | DRV | FOK | DOK);
        assert!(t.is_active());
        // After DRIVER_OK it cannot be re-enabled once disabled.
        w(&mut t, 0x44, 0);
        w(&mut t, 0x44, 1);
        assert_eq!(r(&mut t, 0x44), 0);
    }

    #[test]
    fn requests_complete_with_an_interrupt_that_the_driver_acks() {
        let (mut t, irq) = transport(block());
        let mut gq = GuestQueue::new(&t.mem, QBASE, 16);
        driver_ready(&mut t, &gq);
        // Through the bus (no ioeventfd): QueueNotify processes the queue at once.
        t.mem
            .write_slice(&[0x42; 512], GuestAddress(0x3_0000))
            .unwrap();
        blk_request(&t, &mut gq, VIRTIO_BLK_T_OUT, 5, 0x3_0000);
        w(&mut t, NOTIFY_OFFSET, 0);
        assert_eq!(gq.used_idx(), 1);
        assert_eq!(t.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        assert_eq!(r(&mut t, 0x60), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        let _ = t.queue_events()[0].read(); // the activation kick
        w(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, 0x60), 0);
        // Through the queue eventfd, as the event loop would.
        blk_request(&t, &mut gq, VIRTIO_BLK_T_IN, 5, 0x3_1000);
        t.queue_events()[0].write(1).unwrap();
        t.process_queue_event(0);
        assert!(t.queue_events()[0].read().is_err(), "event consumed");
        assert_eq!(gq.used_idx(), 2);
        let mut back = [0u8; 512];
        t.mem.read_slice(&mut back, GuestAddress(0x3_1000)).unwrap();
        assert_eq!(back, [0x42; 512]);
        // Notifications for queues that do not exist are ignored.
        w(&mut t, NOTIFY_OFFSET, 7);
        t.process_queue_event(7);
    }

    #[test]
    fn no_interrupt_when_the_driver_polls_the_queue() {
        let (mut t, irq) = transport(block());
        let mut gq = GuestQueue::new(&t.mem, QBASE, 16);
        driver_ready(&mut t, &gq);
        let _ = irq.read();
        // VIRTQ_AVAIL_F_NO_INTERRUPT: the request completes, silently.
        t.mem.write_obj(1u16, GuestAddress(gq.avail)).unwrap();
        blk_request(&t, &mut gq, VIRTIO_BLK_T_IN, 5, 0x3_0000);
        w(&mut t, NOTIFY_OFFSET, 0);
        assert_eq!(gq.used_idx(), 1);
        assert!(irq.read().is_err(), "suppressed by the driver");
        // Flag cleared: interrupts again.
        t.mem.write_obj(0u16, GuestAddress(gq.avail)).unwrap();
        blk_request(&t, &mut gq, VIRTIO_BLK_T_IN, 5, 0x3_0000);
        w(&mut t, NOTIFY_OFFSET, 0);
        assert_eq!(gq.used_idx(), 2);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn nothing_is_processed_before_driver_ok_or_after_failed() {
        let (mut t, irq) = transport(block());
        let mut gq = GuestQueue::new(&t.mem, QBASE, 16);
        let f = t.device().features();
        negotiate(&mut t, f);
        setup_queue(&mut t, 0, &gq);
        blk_request(&t, &mut gq, VIRTIO_BLK_T_IN, 0, 0x3_0000);
        w(&mut t, NOTIFY_OFFSET, 0);
        assert_eq!(gq.used_idx(), 0);
        w(&mut t, 0x70, ACK | DRV | FOK | DOK | VIRTIO_CONFIG_S_FAILED);
        assert!(!t.is_active());
        t.process_queue_event(0);
        assert_eq!(gq.used_idx(), 0);
        assert!(irq.read().is_err());
    }

    #[test]
    fn rings_outside_memory_make_driver_ok_need_a_reset() {
        let (mut t, irq) = transport(block());
        let gq = GuestQueue::new(&t.mem, (1 << 20) - 0x100, 16);
        let f = t.device().features();
        negotiate(&mut t, f);
        setup_queue(&mut t, 0, &gq);
        w(&mut t, 0x70, ACK | DRV | FOK | DOK);
        assert_ne!(r(&mut t, 0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!t.is_active());
        assert_eq!(r(&mut t, 0x60), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1);
        // Reset brings everything back to the start.
        w(&mut t, 0x70, 0);
        let s = t.save().unwrap();
        assert_eq!((s.status, s.acked_features, s.interrupt_status), (0, 0, 0));
        assert!(!s.queues[0].ready);
        assert_eq!(s.queues[0].size, 256);
    }

    #[test]
    fn config_change_bumps_the_generation() {
        let (mut t, irq) = transport(block());
        assert_eq!(r(&mut t, 0xfc), 0);
        t.notify_config_change();
        assert_eq!(r(&mut t, 0xfc), 1);
        assert_eq!(r(&mut t, 0x60), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn saved_mid_use_restores_and_continues() {
        let (mut t, irq) = transport(block());
        let mut gq = GuestQueue::new(&t.mem, QBASE, 16);
        driver_ready(&mut t, &gq);
        for i in 0..3u8 {
            t.mem
                .write_slice(&[i + 1; 512], GuestAddress(0x3_0000))
                .unwrap();
            blk_request(&t, &mut gq, VIRTIO_BLK_T_OUT, u64::from(i), 0x3_0000);
            w(&mut t, NOTIFY_OFFSET, 0);
        }
        // One more request is queued but not yet processed when the snapshot is taken.
        blk_request(&t, &mut gq, VIRTIO_BLK_T_IN, 1, 0x3_2000);
        assert_eq!(gq.used_idx(), 3);
        let _ = irq.read();
        let state = t.save().unwrap();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let state: MmioState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(state, t.save().unwrap());
        assert_eq!(state.queues[0].next_used, 3);

        // A fresh device over the same disk δ, in the same guest memory.
        let blocks: Vec<(u64, Vec<u8>)> = t
            .device()
            .disk()
            .delta()
            .delta_blocks()
            .map(|b| b.map(|(n, d)| (n, d.into_owned())))
            .collect::<Result<_, _>>()
            .unwrap();
        let disk = CowDisk::new(None, Delta::from_blocks(1 << 20, blocks).unwrap()).unwrap();
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t2 = MmioTransport::restore(
            (
                Block::new(disk, false, "t"),
                t.mem.clone(),
                irq2.try_clone().unwrap().into(),
            ),
            &state,
        )
        .unwrap();
        drop(t);
        assert!(t2.is_active());
        assert_eq!(r(&mut t2, 0x70), ACK | DRV | FOK | DOK);
        assert_eq!(
            r(&mut t2, 0x60),
            VIRTIO_MMIO_INT_VRING,
            "unacked interrupt kept"
        );
        // Raised again only when asked (after the interrupt controllers are restored).
        assert!(irq2.read().is_err(), "not raised by the restore itself");
        t2.reassert_interrupt();
        assert_eq!(irq2.read().unwrap(), 1);
        // The in-flight notification is replayed through the queue event.
        assert_eq!(t2.queue_events()[0].read().unwrap(), 1);
        t2.process_queue_event(0);
        assert_eq!(gq.used_idx(), 4);
        let mut back = [0u8; 512];
        t2.mem
            .read_slice(&mut back, GuestAddress(0x3_2000))
            .unwrap();
        assert_eq!(back, [2; 512]);
        // And new requests go on from there.
        blk_request(&t2, &mut gq, VIRTIO_BLK_T_IN, 2, 0x3_3000);
        w(&mut t2, NOTIFY_OFFSET, 0);
        assert_eq!(gq.used_idx(), 5);
        assert_eq!(gq.used_elem(4).1, 513);
        assert!(irq2.read().unwrap() >= 1);
    }

    #[test]
    fn restore_refuses_mismatched_state() {
        let (mut t, _) = transport(block());
        let gq = GuestQueue::new(&t.mem, QBASE, 16);
        driver_ready(&mut t, &gq);
        let state = t.save().unwrap();
        let mem = t.mem.clone();
        let irq = || EventFd::new(EFD_NONBLOCK).unwrap();
        let net = Net::new(Box::new(FakeBackend::new().unwrap()), [0; 6]);
        assert!(matches!(
            MmioTransport::restore((net, mem.clone(), irq().into()), &state),
            Err(VirtioError::DeviceType { .. })
        ));
        let mut bad = state.clone();
        bad.status = DOK;
        assert!(MmioTransport::restore((block(), mem.clone(), irq().into()), &bad).is_err());
        let mut bad = state.clone();
        bad.acked_features = 0;
        assert!(MmioTransport::restore((block(), mem.clone(), irq().into()), &bad).is_err());
        let mut bad = state.clone();
        bad.queues[0].size = 3;
        assert!(matches!(
            MmioTransport::restore((block(), mem.clone(), irq().into()), &bad),
            Err(VirtioError::QueueState { .. })
        ));
        let mut bad = state.clone();
        bad.queues[0].used_ring = (1 << 20) - 8;
        assert!(matches!(
            MmioTransport::restore((block(), mem.clone(), irq().into()), &bad),
            Err(VirtioError::QueueMemory(0))
        ));
        let mut bad = state.clone();
        bad.queues.push(QueueSnapshot::default());
        assert!(matches!(
            MmioTransport::restore((block(), mem.clone(), irq().into()), &bad),
            Err(VirtioError::QueueLayout(_))
        ));
        let small = CowDisk::new(None, Delta::in_memory(4096).unwrap()).unwrap();
        assert!(matches!(
            MmioTransport::restore((Block::new(small, false, ""), mem, irq().into()), &state),
            Err(VirtioError::DeviceState(_))
        ));
    }

    #[test]
    fn net_device_end_to_end_with_host_events() {
        let backend = FakeBackend::new().unwrap();
        let (mut t, irq) = transport(Net::new(Box::new(backend.clone()), [2, 0, 0, 0, 0, 9]));
        assert_eq!(
            t.host_event_fd(),
            Some(netback::NetBackend::event_fd(&backend))
        );
        let rx = GuestQueue::new(&t.mem, 0x1_0000, 8);
        let mut tx = GuestQueue::new(&t.mem, 0x2_0000, 8);
        let f = t.device().features();
        assert_eq!(negotiate(&mut t, f), ACK | DRV | FOK);
        setup_queue(&mut t, 0, &rx);
        setup_queue(&mut t, 1, &tx);
        // A frame arrives before the driver is ready: the backend is polled, nothing delivered.
        backend.push(&[0xab; 60]);
        assert!(!t.host_events_wanted());
        t.process_host_event();
        assert_eq!(*backend.polls.lock().unwrap(), 1);
        w(&mut t, 0x70, ACK | DRV | FOK | DOK);
        assert!(t.host_events_wanted());
        assert_eq!(
            t.queue_events()[0].read().unwrap(),
            1,
            "activation wakes the loop"
        );
        // Still no receive buffer: the frame waits in the device, which stops listening.
        t.process_host_event();
        assert!(!t.host_events_wanted());
        let mut rx = rx;
        rx.add_chain(&[(0x6_0000, 1526, true)]);
        t.process_queue_event(0);
        assert!(t.host_events_wanted());
        assert_eq!(rx.used_idx(), 1);
        assert_eq!(rx.used_elem(0).1, 72);
        assert_eq!(irq.read().unwrap(), 1);
        // Transmit through the queue eventfd.
        t.mem
            .write_slice(&[0x11; 72], GuestAddress(0x7_0000))
            .unwrap();
        tx.add_chain(&[(0x7_0000, 72, false)]);
        t.process_queue_event(1);
        assert_eq!(backend.sent.lock().unwrap().as_slice(), &[vec![0x11u8; 60]]);
        assert_eq!(t.next_timeout(), None);
    }

    /// A device that, like a guest posting from another vCPU, re-publishes every buffer it
    /// consumes: the available ring never runs dry.
    struct Flooder {
        avail: u64,
        sizes: [u16; 1],
    }

    impl VirtioDevice for Flooder {
        const DEVICE_TYPE: u32 = 99;
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn config_space(&self) -> &[u8] {
            &[]
        }
        fn process_queue(&mut self, index: usize, io: &mut QueueIo<'_>) {
            while let Some(crate::devices::virtio::queue::Popped::Chain(c)) = io.pop(index) {
                io.add_used(index, c.head, 0);
                let mem = io.mem();
                let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
                let slot = self.avail + 4 + 2 * u64::from(idx % 4);
                mem.write_obj(c.head, GuestAddress(slot)).unwrap();
                mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
                    .unwrap();
            }
        }
        fn reset(&mut self) {}
        fn save(&self) -> DeviceState {
            DeviceState::Net(crate::devices::virtio::NetState { mac: [0; 6] })
        }
        fn restore(&mut self, _: &DeviceState) -> Result<(), VirtioError> {
            Ok(())
        }
    }

    #[test]
    fn a_flooded_queue_is_rescheduled_instead_of_processed_forever() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, QBASE, 4);
        let dev = Flooder {
            avail: gq.avail,
            sizes: [4],
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(dev, mem, irq).unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &gq);
        w(&mut t, 0x70, ACK | DRV | FOK | DOK);
        gq.add_chain(&[(0x3_0000, 16, false)]);
        let _ = t.queue_events()[0].read(); // the activation kick
        t.process_queue_event(0);
        assert_eq!(gq.used_idx(), 4, "one ring's worth per round");
        assert_eq!(t.queue_events()[0].read().unwrap(), 1, "re-scheduled");
        t.process_queue_event(0);
        assert_eq!(gq.used_idx(), 8);
    }
}
