//! The host side of Android Open Accessory (AOA): the appliance sees a phone arrive on USB,
//! switches it to accessory mode and exchanges frames with it over two bulk endpoints. No USB
//! debugging is needed on the phone.
//!
//! ```text
//! host (appliance)                                   phone
//!  ── control IN  0xC0 req 51 GET_PROTOCOL ────────▶  u16 LE protocol (1 or 2; 0 = no AOA)
//!  ── control OUT 0x40 req 52 SEND_STRING index 0..5 ▶ manufacturer, model, description,
//!                                                      version, URI, serial (NUL-terminated)
//!  ── control OUT 0x40 req 53 START ───────────────▶  leaves the bus …
//!                                                      … and comes back as 18D1:2D00..=2D05
//!  open it, find the interface with a bulk IN and a bulk OUT endpoint, claim it
//!  ── bulk OUT / bulk IN: frames (format::pairing) ─▶
//! ```
//!
//! - [`UsbTransport`] / [`UsbDevice`]: what the handshake needs of a USB stack — enumeration,
//!   control transfers, descriptors, bulk transfers. [`RusbTransport`] (feature `rusb`) is
//!   libusb; [`fake::FakePhone`] plays a phone at the same level, for tests.
//! - [`aoa`]: the handshake ([`aoa::connect`]) and the watch for arriving devices
//!   ([`aoa::Arrivals`]).
//! - [`link`]: frames over the bulk endpoints ([`link::AccessoryLink`]); once the exchange is
//!   over, [`link::AccessoryLink::release`] resets the phone so it leaves accessory mode.

use std::time::Duration;

pub mod aoa;
pub mod fake;
pub mod link;
#[cfg(feature = "rusb")]
mod rusb_backend;

#[cfg(feature = "rusb")]
pub use rusb_backend::{RusbDevice, RusbTransport};

/// Why a USB operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    /// The machine has no usable USB stack.
    #[error("no USB on this machine ({0})")]
    NoUsb(String),
    /// The device answered GET_PROTOCOL with 0 or not at all.
    #[error("USB device {vendor_id:04x}:{product_id:04x} does not speak Android Open Accessory")]
    NotAccessory {
        /// Its vendor id.
        vendor_id: u16,
        /// Its product id.
        product_id: u16,
    },
    /// The device left the bus.
    #[error("the USB device was disconnected while {0}")]
    Disconnected(&'static str),
    /// A transfer timed out.
    #[error("USB transfer timed out while {0}")]
    Timeout(&'static str),
    /// The device stalled the request (refused it).
    #[error("the USB device refused the request while {0}")]
    Stall(&'static str),
    /// The phone did not come back in accessory mode.
    #[error("the phone did not come back in accessory mode within {0:?}: unlock it and accept the accessory prompt, then plug it in again")]
    NoReenumeration(Duration),
    /// The accessory has no bulk IN/OUT endpoint pair.
    #[error("the accessory has no interface with a bulk IN and a bulk OUT endpoint")]
    NoBulkEndpoints,
    /// The device is not on the bus (any more).
    #[error("USB device {bus:03}:{address:03} is not on the bus")]
    NoSuchDevice {
        /// Bus number.
        bus: u8,
        /// Device address.
        address: u8,
    },
    /// The bytes on the bulk endpoint are not pairing frames.
    #[error("the phone sent bytes that are not a pairing frame")]
    Frame(#[source] format::pairing::PairingError),
    /// Another failure of the USB stack.
    #[error("USB {what} failed")]
    Backend {
        /// What was being done.
        what: &'static str,
        /// The stack's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A device on the bus, as enumeration shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// Bus number.
    pub bus: u8,
    /// Address on the bus (a re-enumerated device gets a new one).
    pub address: u8,
    /// idVendor.
    pub vendor_id: u16,
    /// idProduct.
    pub product_id: u16,
}

/// An endpoint of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// bEndpointAddress (bit 7 set: IN, device to host).
    pub address: u8,
    /// A bulk endpoint (otherwise interrupt or isochronous).
    pub bulk: bool,
}

impl Endpoint {
    /// Device to host.
    pub fn is_in(&self) -> bool {
        self.address & 0x80 != 0
    }
}

/// An interface (alternate setting 0) of the active configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// bInterfaceNumber.
    pub number: u8,
    /// bInterfaceClass (0xFF: vendor specific, as the AOA interface).
    pub class: u8,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// A USB stack: which devices are on the bus, and opening one.
pub trait UsbTransport {
    /// An open device.
    type Device: UsbDevice;

    /// Every device on the bus now.
    fn devices(&self) -> Result<Vec<DeviceInfo>, UsbError>;

    /// Opens the device `info` names (by bus and address).
    fn open(&self, info: &DeviceInfo) -> Result<Self::Device, UsbError>;

    /// Blocks until the set of devices may have changed or `timeout` passed: a hotplug
    /// event where the stack has them, otherwise just the timeout (the caller polls).
    fn wait_change(&self, timeout: Duration) {
        std::thread::sleep(timeout);
    }
}

/// An open device: control and bulk transfers, and its descriptors.
pub trait UsbDevice {
    /// A control transfer from the device into `buf`; the bytes received.
    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, UsbError>;

    /// A control transfer of `data` to the device; the bytes sent.
    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, UsbError>;

    /// The interfaces of the active configuration.
    fn interfaces(&mut self) -> Result<Vec<Interface>, UsbError>;

    /// Claims interface `number` for this process.
    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError>;

    /// A bulk transfer from IN endpoint `endpoint` into `buf`; the bytes received.
    fn bulk_in(
        &mut self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, UsbError>;

    /// A bulk transfer of `data` to OUT endpoint `endpoint`; the bytes sent.
    fn bulk_out(&mut self, endpoint: u8, data: &[u8], timeout: Duration)
        -> Result<usize, UsbError>;

    /// A USB port reset: the device leaves the bus and enumerates again. A phone in
    /// accessory mode leaves that mode and comes back as itself (its own vendor and product
    /// ids, a new address). The handle is unusable afterwards.
    fn reset(&mut self) -> Result<(), UsbError>;
}
