//! Emulated devices and the I/O bus that routes guest port accesses to them.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};

use vmm_sys_util::eventfd::EventFd;

/// How a device raises its interrupt line.
#[derive(Debug)]
pub enum Interrupt {
    /// A PIC/IOAPIC line pulsed from the raising thread with `KVM_IRQ_LINE` (what the VMM
    /// uses; see [`crate::vstate::vm::IrqLine`] for why not an irqfd).
    Line(crate::vstate::vm::IrqLine),
    /// An eventfd (registered as a KVM irqfd, or read by a test).
    Event(EventFd),
}

impl Interrupt {
    /// Raises the interrupt (one edge).
    pub fn trigger(&self) -> std::io::Result<()> {
        match self {
            Interrupt::Line(l) => l.pulse(),
            Interrupt::Event(e) => e.write(1),
        }
    }
}

impl From<EventFd> for Interrupt {
    fn from(e: EventFd) -> Self {
        Interrupt::Event(e)
    }
}
