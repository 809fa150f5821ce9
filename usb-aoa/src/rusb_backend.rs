//! The libusb backend (rusb). Where libusb has hotplug events, [`UsbTransport::wait_change`]
//! waits for one; otherwise the caller's polling interval applies.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusb::{Context, Device, DeviceHandle, Hotplug, HotplugBuilder, Registration, UsbContext};

use crate::{DeviceInfo, Endpoint, Interface, UsbDevice, UsbError, UsbTransport};

/// The machine's USB stack through libusb.
pub struct RusbTransport {
    ctx: Context,
    changed: Arc<AtomicBool>,
    _hotplug: Option<Registration<Context>>,
}

struct Changed(Arc<AtomicBool>);

impl Hotplug<Context> for Changed {
    fn device_arrived(&mut self, _: Device<Context>) {
        self.0.store(true, Ordering::Release);
    }

    fn device_left(&mut self, _: Device<Context>) {
        self.0.store(true, Ordering::Release);
    }
}

fn backend(what: &'static str) -> impl FnOnce(rusb::Error) -> UsbError {
    move |e| match e {
        rusb::Error::NoDevice => UsbError::Disconnected(what),
        rusb::Error::Timeout => UsbError::Timeout(what),
        rusb::Error::Pipe => UsbError::Stall(what),
        e => UsbError::Backend {
            what,
            source: Box::new(e),
        },
    }
}

impl RusbTransport {
    /// Opens libusb. A machine without USB (no `/sys/bus/usb` on Linux, or libusb cannot
    /// start) gives [`UsbError::NoUsb`].
    pub fn new() -> Result<RusbTransport, UsbError> {
        if cfg!(target_os = "linux") && !Path::new("/sys/bus/usb").exists() {
            return Err(UsbError::NoUsb(
                "the kernel has no USB support: /sys/bus/usb is absent".into(),
            ));
        }
        let ctx = Context::new().map_err(|e| UsbError::NoUsb(format!("libusb: {e}")))?;
        let changed = Arc::new(AtomicBool::new(false));
        let hotplug = if rusb::has_hotplug() {
            HotplugBuilder::new()
                .enumerate(false)
                .register(&ctx, Box::new(Changed(changed.clone())))
                .ok()
        } else {
            None
        };
        Ok(RusbTransport {
            ctx,
            changed,
            _hotplug: hotplug,
        })
    }

    /// Whether libusb delivers hotplug events here (otherwise the watch polls).
    pub fn hotplug(&self) -> bool {
        self._hotplug.is_some()
    }

    fn find(&self, info: &DeviceInfo) -> Result<Device<Context>, UsbError> {
        self.ctx
            .devices()
            .map_err(backend("enumerating devices"))?
            .iter()
            .find(|d| d.bus_number() == info.bus && d.address() == info.address)
            .ok_or(UsbError::NoSuchDevice {
                bus: info.bus,
                address: info.address,
            })
    }
}

impl UsbTransport for RusbTransport {
    type Device = RusbDevice;

    fn devices(&self) -> Result<Vec<DeviceInfo>, UsbError> {
        let list = self.ctx.devices().map_err(backend("enumerating devices"))?;
        Ok(list
            .iter()
            .filter_map(|d| {
                let desc = d.device_descriptor().ok()?;
                Some(DeviceInfo {
                    bus: d.bus_number(),
                    address: d.address(),
                    vendor_id: desc.vendor_id(),
                    product_id: desc.product_id(),
                })
            })
            .collect())
    }

    fn open(&self, info: &DeviceInfo) -> Result<RusbDevice, UsbError> {
        let device = self.find(info)?;
        let handle = device.open().map_err(backend("opening the device"))?;
        // A kernel driver bound to the interface would keep us from claiming it.
        let _ = handle.set_auto_detach_kernel_driver(true);
        Ok(RusbDevice { device, handle })
    }

    fn wait_change(&self, timeout: Duration) {
        if self._hotplug.is_none() {
            std::thread::sleep(timeout);
            return;
        }
        if self.changed.swap(false, Ordering::AcqRel) {
            return;
        }
        if self.ctx.handle_events(Some(timeout)).is_err() {
            std::thread::sleep(timeout);
        }
        self.changed.store(false, Ordering::Release);
    }
}

/// An open libusb device.
pub struct RusbDevice {
    device: Device<Context>,
    handle: DeviceHandle<Context>,
}

impl UsbDevice for RusbDevice {
    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, UsbError> {
        self.handle
            .read_control(request_type, request, value, index, buf, timeout)
            .map_err(backend("a control IN transfer"))
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, UsbError> {
        self.handle
            .write_control(request_type, request, value, index, data, timeout)
            .map_err(backend("a control OUT transfer"))
    }

    fn interfaces(&mut self) -> Result<Vec<Interface>, UsbError> {
        let config = self
            .device
            .active_config_descriptor()
            .map_err(backend("reading the configuration descriptor"))?;
        Ok(config
            .interfaces()
            .filter_map(|i| {
                let alt = i.descriptors().next()?;
                Some(Interface {
                    number: alt.interface_number(),
                    class: alt.class_code(),
                    endpoints: alt
                        .endpoint_descriptors()
                        .map(|e| Endpoint {
                            address: e.address(),
                            bulk: e.transfer_type() == rusb::TransferType::Bulk,
                        })
                        .collect(),
                })
            })
            .collect())
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        self.handle
            .claim_interface(number)
            .map_err(backend("claiming the interface"))
    }

    fn bulk_in(
        &mut self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, UsbError> {
        self.handle
            .read_bulk(endpoint, buf, timeout)
            .map_err(backend("a bulk IN transfer"))
    }

    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, UsbError> {
        self.handle
            .write_bulk(endpoint, data, timeout)
            .map_err(backend("a bulk OUT transfer"))
    }

    fn reset(&mut self) -> Result<(), UsbError> {
        match self.handle.reset() {
            // libusb says NotFound when the device came back as another (a phone leaving
            // accessory mode): the reset did what it was for.
            Ok(()) | Err(rusb::Error::NotFound) | Err(rusb::Error::NoDevice) => Ok(()),
            Err(e) => Err(backend("resetting the device")(e)),
        }
    }
}
