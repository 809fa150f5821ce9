//! The AOA handshake (see the crate doc for the requests) and the watch for arriving devices.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::link::AccessoryLink;
use crate::{DeviceInfo, UsbDevice, UsbError, UsbTransport};

/// Google's vendor id, which a phone in accessory mode takes.
pub const GOOGLE_VID: u16 = 0x18D1;
/// Product ids of a phone in accessory mode (accessory, + ADB, + audio, …).
pub const ACCESSORY_PIDS: std::ops::RangeInclusive<u16> = 0x2D00..=0x2D05;
/// Vendor request: the AOA protocol version the phone speaks.
pub const GET_PROTOCOL: u8 = 51;
/// Vendor request: one identity string (`index` 0..=5).
pub const SEND_STRING: u8 = 52;
/// Vendor request: switch to accessory mode.
pub const START: u8 = 53;
/// bmRequestType of GET_PROTOCOL: device to host, vendor, device.
pub const REQ_IN: u8 = 0xC0;
/// bmRequestType of SEND_STRING and START: host to device, vendor, device.
pub const REQ_OUT: u8 = 0x40;

/// Whether `d` is a phone already in accessory mode.
pub fn is_accessory(d: &DeviceInfo) -> bool {
    d.vendor_id == GOOGLE_VID && ACCESSORY_PIDS.contains(&d.product_id)
}

/// What the appliance tells the phone it is (the phone matches an app by manufacturer and
/// model, and offers `uri` when none is installed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Index 0.
    pub manufacturer: String,
    /// Index 1.
    pub model: String,
    /// Index 2.
    pub description: String,
    /// Index 3.
    pub version: String,
    /// Index 4.
    pub uri: String,
    /// Index 5.
    pub serial: String,
}

impl Identity {
    /// The six strings in index order.
    pub fn strings(&self) -> [&str; 6] {
        [
            &self.manufacturer,
            &self.model,
            &self.description,
            &self.version,
            &self.uri,
            &self.serial,
        ]
    }
}

/// How long each step may take.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Each control transfer.
    pub control: Duration,
    /// From START to the accessory on the bus.
    pub reenumerate: Duration,
    /// Each bulk transfer of the frame exchange.
    pub bulk: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            control: Duration::from_secs(1),
            reenumerate: Duration::from_secs(10),
            bulk: Duration::from_secs(30),
        }
    }
}

/// Asks the protocol version: `Ok(n ≥ 1)` or [`UsbError::NotAccessory`].
pub fn get_protocol<D: UsbDevice>(
    dev: &mut D,
    info: &DeviceInfo,
    t: &Timeouts,
) -> Result<u16, UsbError> {
    let not = || UsbError::NotAccessory {
        vendor_id: info.vendor_id,
        product_id: info.product_id,
    };
    let mut b = [0u8; 2];
    let n = match dev.control_in(REQ_IN, GET_PROTOCOL, 0, 0, &mut b, t.control) {
        Ok(n) => n,
        Err(UsbError::Stall(_)) => return Err(not()),
        Err(e) => return Err(e),
    };
    let v = u16::from_le_bytes(b);
    if n != 2 || v == 0 {
        return Err(not());
    }
    Ok(v)
}

/// Sends the identity strings and START: the phone then leaves the bus and comes back as an
/// accessory. Returns the protocol version it announced.
pub fn start_accessory<D: UsbDevice>(
    dev: &mut D,
    info: &DeviceInfo,
    id: &Identity,
    t: &Timeouts,
) -> Result<u16, UsbError> {
    let version = get_protocol(dev, info, t)?;
    for (i, s) in id.strings().iter().enumerate() {
        let mut z = Vec::with_capacity(s.len() + 1);
        z.extend_from_slice(s.as_bytes());
        z.push(0);
        dev.control_out(REQ_OUT, SEND_STRING, 0, i as u16, &z, t.control)?;
    }
    dev.control_out(REQ_OUT, START, 0, 0, &[], t.control)?;
    Ok(version)
}

/// Waits for a phone in accessory mode on `bus` that is not in `before`.
pub fn wait_accessory<T: UsbTransport>(
    transport: &T,
    bus: u8,
    before: &HashSet<DeviceInfo>,
    within: Duration,
) -> Result<DeviceInfo, UsbError> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(d) = transport
            .devices()?
            .into_iter()
            .find(|d| d.bus == bus && is_accessory(d) && !before.contains(d))
        {
            return Ok(d);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(UsbError::NoReenumeration(within));
        }
        transport.wait_change((deadline - now).min(Duration::from_millis(50)));
    }
}

/// Opens a phone in accessory mode: finds the interface with a bulk IN and a bulk OUT
/// endpoint, claims it, and returns the frame link over them.
pub fn open_accessory<T: UsbTransport>(
    transport: &T,
    info: &DeviceInfo,
    t: &Timeouts,
) -> Result<AccessoryLink<T::Device>, UsbError> {
    let mut dev = transport.open(info)?;
    let (number, ep_in, ep_out) = dev
        .interfaces()?
        .into_iter()
        .find_map(|i| {
            let ep_in = i.endpoints.iter().find(|e| e.bulk && e.is_in())?.address;
            let ep_out = i.endpoints.iter().find(|e| e.bulk && !e.is_in())?.address;
            Some((i.number, ep_in, ep_out))
        })
        .ok_or(UsbError::NoBulkEndpoints)?;
    dev.claim_interface(number)?;
    Ok(AccessoryLink::new(dev, *info, ep_in, ep_out, t.bulk))
}

/// The whole handshake for a device that arrived: a phone not yet in accessory mode is
/// switched (GET_PROTOCOL, the identity, START) and waited for; then its bulk endpoints are
/// claimed.
pub fn connect<T: UsbTransport>(
    transport: &T,
    info: &DeviceInfo,
    id: &Identity,
    t: &Timeouts,
) -> Result<AccessoryLink<T::Device>, UsbError> {
    if is_accessory(info) {
        return open_accessory(transport, info, t);
    }
    let before: HashSet<DeviceInfo> = transport.devices()?.into_iter().collect();
    {
        let mut dev = transport.open(info)?;
        start_accessory(&mut dev, info, id, t)?;
    }
    let acc = wait_accessory(transport, info.bus, &before, t.reenumerate)?;
    open_accessory(transport, &acc, t)
}

/// Devices as they arrive: each one on the bus once, until it leaves (or is marked seen).
pub struct Arrivals<'a, T: UsbTransport> {
    transport: &'a T,
    seen: HashSet<DeviceInfo>,
    poll: Duration,
}

impl<'a, T: UsbTransport> Arrivals<'a, T> {
    /// Watches `transport`; devices already there count as arrived. Between looks it waits
    /// for a hotplug event or `poll`.
    pub fn new(transport: &'a T, poll: Duration) -> Self {
        Arrivals {
            transport,
            seen: HashSet::new(),
            poll,
        }
    }

    /// Does not report `d` (the accessory a handshake brought up and already served).
    pub fn mark_seen(&mut self, d: DeviceInfo) {
        self.seen.insert(d);
    }

    /// The next device that arrived (in the order the bus lists them), or `None` when `stop()` says so (checked between
    /// looks).
    pub fn next(&mut self, mut stop: impl FnMut() -> bool) -> Result<Option<DeviceInfo>, UsbError> {
        loop {
            if stop() {
                return Ok(None);
            }
            let now = self.transport.devices()?;
            self.seen.retain(|d| now.contains(d));
            if let Some(d) = now.into_iter().find(|d| !self.seen.contains(d)) {
                self.seen.insert(d);
                return Ok(Some(d));
            }
            self.transport.wait_change(self.poll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakePhone, Misbehave, EP_IN, EP_OUT};
    use format::pairing::{Message, Reason, Refusal};

    fn id() -> Identity {
        Identity {
            manufacturer: "Cloudlet".into(),
            model: "Appliance".into(),
            description: "pairing".into(),
            version: "1".into(),
            uri: "https://example.invalid/app".into(),
            serial: "0123456789ab".into(),
        }
    }

    fn fast() -> Timeouts {
        Timeouts {
            control: Duration::from_millis(100),
            reenumerate: Duration::from_millis(300),
            bulk: Duration::from_millis(300),
        }
    }

    fn echo_phone() -> FakePhone {
        FakePhone::new(|f| f.to_vec())
    }

    fn phone_device(p: &FakePhone) -> DeviceInfo {
        let mut a = Arrivals::new(p, Duration::from_millis(1));
        let hub = a.next(|| false).unwrap().unwrap();
        assert_eq!(hub.vendor_id, 0x1D6B);
        a.next(|| false).unwrap().unwrap()
    }

    #[test]
    fn the_handshake_switches_the_phone_and_claims_its_bulk_endpoints() {
        let p = echo_phone();
        let dev = phone_device(&p);
        assert!(!is_accessory(&dev));
        let mut link = connect(&p, &dev, &id(), &fast()).unwrap();
        assert!(p.in_accessory_mode());
        assert_eq!(p.requests(), [51, 52, 52, 52, 52, 52, 52, 53]);
        let ids: Vec<u16> = p.identity().iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        assert_eq!(p.identity()[5].1, "0123456789ab");
        assert_eq!(p.claimed(), Some(0));
        assert_eq!(link.endpoints(), (EP_IN, EP_OUT));
        assert!(is_accessory(&link.info()));
        assert_ne!(link.info().address, dev.address, "re-enumerated");
        // A frame goes out and comes back in short bulk transfers, reassembled.
        let f = Message::Refusal(Refusal {
            reason: Reason::Other(9),
            text: "x".repeat(100),
        })
        .emit()
        .unwrap();
        link.send_frame(&f).unwrap();
        assert_eq!(link.recv_frame().unwrap(), f);
        assert_eq!(p.frames_received(), [f]);
    }

    #[test]
    fn a_released_phone_leaves_accessory_mode_and_comes_back_as_itself() {
        let p = echo_phone();
        let dev = phone_device(&p);
        let link = connect(&p, &dev, &id(), &fast()).unwrap();
        let acc = link.info();
        link.release().unwrap();
        assert_eq!(p.resets(), 1);
        assert!(!p.in_accessory_mode());
        std::thread::sleep(Duration::from_millis(40));
        let back = p.devices().unwrap()[1];
        assert_eq!(
            (back.vendor_id, back.product_id),
            (dev.vendor_id, dev.product_id)
        );
        assert!(back.address != acc.address && back.address != dev.address);
        assert!(p.on_bus_as_itself());
        // The old accessory handle is gone with it.
        assert!(open_accessory(&p, &acc, &fast()).is_err());
    }

    #[test]
    fn a_phone_already_in_accessory_mode_is_opened_directly() {
        let p = echo_phone();
        let dev = phone_device(&p);
        drop(connect(&p, &dev, &id(), &fast()).unwrap());
        let acc = p.devices().unwrap()[1];
        let before = p.identity().len();
        connect(&p, &acc, &id(), &fast()).unwrap();
        assert_eq!(p.identity().len(), before, "no second identity");
    }

    #[test]
    fn misbehaving_phones_give_clear_errors() {
        let p = echo_phone().misbehaving(Misbehave::RefuseAoa);
        let dev = phone_device(&p);
        let e = connect(&p, &dev, &id(), &fast()).err().unwrap();
        assert!(matches!(e, UsbError::NotAccessory { .. }), "{e}");
        assert_eq!(p.requests(), [GET_PROTOCOL]);

        let p = echo_phone().misbehaving(Misbehave::NeverReturns);
        let dev = phone_device(&p);
        let e = connect(&p, &dev, &id(), &fast()).err().unwrap();
        assert!(matches!(e, UsbError::NoReenumeration(_)), "{e}");
        assert!(e.to_string().contains("accept the accessory prompt"), "{e}");

        let f = Message::Refusal(Refusal {
            reason: Reason::BadFrame,
            text: String::new(),
        })
        .emit()
        .unwrap();
        let p = echo_phone().misbehaving(Misbehave::Garbage);
        let dev = phone_device(&p);
        let mut link = connect(&p, &dev, &id(), &fast()).unwrap();
        link.send_frame(&f).unwrap();
        let e = link.recv_frame().unwrap_err();
        assert!(matches!(e, UsbError::Frame(_)), "{e}");

        let p = echo_phone().misbehaving(Misbehave::DisconnectMidExchange);
        let dev = phone_device(&p);
        let mut link = connect(&p, &dev, &id(), &fast()).unwrap();
        link.send_frame(&f).unwrap();
        let e = link.recv_frame().unwrap_err();
        assert!(matches!(e, UsbError::Disconnected(_)), "{e}");

        // A silent phone: the exchange times out.
        let p = FakePhone::new(|_| Vec::new());
        let dev = phone_device(&p);
        let mut link = connect(&p, &dev, &id(), &fast()).unwrap();
        link.send_frame(&f).unwrap();
        let e = link.recv_frame().unwrap_err();
        assert!(matches!(e, UsbError::Timeout(_)), "{e}");
    }

    #[test]
    fn a_hub_refuses_aoa_and_is_left_alone() {
        let p = echo_phone();
        let e = connect(&p, &crate::fake::HUB, &id(), &fast())
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                UsbError::NotAccessory {
                    vendor_id: 0x1D6B,
                    ..
                }
            ),
            "{e}"
        );
        assert!(p.requests().is_empty(), "the phone saw nothing");
    }

    #[test]
    fn arrivals_report_each_device_once_until_it_leaves() {
        let p = echo_phone().unplugged();
        let mut a = Arrivals::new(&p, Duration::from_millis(1));
        assert_eq!(a.next(|| false).unwrap().unwrap().address, 1, "the hub");
        let mut polls = 0;
        assert_eq!(
            a.next(|| {
                polls += 1;
                polls > 3
            })
            .unwrap(),
            None
        );
        p.plug();
        let dev = a.next(|| false).unwrap().unwrap();
        let link = connect(&p, &dev, &id(), &fast()).unwrap();
        a.mark_seen(link.info());
        let mut polls = 0;
        assert_eq!(
            a.next(|| {
                polls += 1;
                polls > 3
            })
            .unwrap(),
            None,
            "the accessory it became is not a new arrival"
        );
    }

    #[cfg(feature = "rusb")]
    #[test]
    fn without_usb_the_rusb_backend_says_so() {
        if std::path::Path::new("/sys/bus/usb").exists() {
            // A machine with USB: the backend opens.
            crate::RusbTransport::new().unwrap();
        } else {
            let e = crate::RusbTransport::new().err().unwrap();
            assert!(matches!(e, UsbError::NoUsb(_)), "{e}");
            assert!(e.to_string().contains("/sys/bus/usb"), "{e}");
        }
    }
}
