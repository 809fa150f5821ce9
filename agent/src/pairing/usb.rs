//! Pairing over USB: a thread watches the bus, switches each arriving phone to accessory mode
//! (`usb_aoa::aoa::connect`) and runs the exchange over its bulk endpoints, then releases the
//! phone (a USB reset: it leaves accessory mode and comes back as itself, which the watch
//! does not take for a new arrival), whether it was welcomed or refused. Devices that are
//! not phones refuse GET_PROTOCOL and are left alone. On a machine without USB the watcher
//! says so once and ends; pairing by claim code still works.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usb_aoa::aoa::{connect, Arrivals, Identity, Timeouts};
use usb_aoa::{UsbError, UsbTransport};

use super::{Paired, Pairing, PairingError, Session};
use crate::store::error_chain;

/// How often the bus is looked at when libusb has no hotplug events.
pub const POLL: Duration = Duration::from_secs(1);

/// What the appliance tells a phone it is, as an accessory: the phone offers `uri` (this
/// appliance's app store) when no app handles the accessory.
pub fn identity(facts: &super::ApplianceFacts) -> Identity {
    Identity {
        manufacturer: "Cloudlet".into(),
        model: "Cloudlet appliance".into(),
        description: "Pair this phone with the cloudlet appliance".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uri: facts
            .api
            .first()
            .map(|a| format!("{a}/v1/apps"))
            .unwrap_or_default(),
        serial: facts.appliance_id.clone(),
    }
}

/// Why pairing one USB device failed.
#[derive(Debug, thiserror::Error)]
pub enum UsbPairingError {
    /// The AOA handshake failed.
    #[error("the USB accessory handshake failed")]
    Handshake(#[source] UsbError),
    /// The exchange failed or was refused.
    #[error("USB pairing failed")]
    Exchange(#[source] PairingError),
}

/// How long after a release the phone coming back as itself is not taken for a new
/// arrival (it re-enumerates within a second or two; it is a new arrival again once it has
/// left the bus, i.e. was unplugged).
pub const RELEASE_GRACE: Duration = Duration::from_secs(15);

/// What happened to a USB device that arrived.
pub struct Outcome {
    /// The accessory it became (so the watch does not take it for a new arrival).
    pub accessory: Option<usb_aoa::DeviceInfo>,
    /// Whether the appliance released it after the exchange (a USB reset: it leaves
    /// accessory mode and comes back as itself).
    pub released: bool,
    /// The pairing, or why there is none.
    pub result: Result<Paired, UsbPairingError>,
}

/// Pairs the device `dev` that arrived on `transport`: handshake, then the exchange (which
/// ends with a Welcome or a Refusal sent), then the release of the phone (a USB reset), so a
/// refused phone does not stay an accessory until it is unplugged.
pub fn pair_device<T: UsbTransport>(
    transport: &T,
    dev: &usb_aoa::DeviceInfo,
    pairing: &Pairing,
    id: &Identity,
    t: &Timeouts,
) -> Outcome {
    let mut link = match connect(transport, dev, id, t) {
        Ok(l) => l,
        Err(e) => {
            return Outcome {
                accessory: None,
                released: false,
                result: Err(UsbPairingError::Handshake(e)),
            }
        }
    };
    let acc = link.info();
    let result = pairing
        .exchange(&mut link, Session::Usb)
        .map_err(UsbPairingError::Exchange);
    let released = match link.release() {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("cannot release the phone (USB reset): {}", error_chain(&e));
            false
        }
    };
    Outcome {
        accessory: Some(acc),
        released,
        result,
    }
}

/// Phones released lately: (bus, vendor id, product id) as they arrived, until when their
/// return is not a new arrival.
type Released = Vec<((u8, u16, u16), Instant)>;

/// Watches `transport` until `stop` is set, pairing every phone that arrives.
pub fn serve<T: UsbTransport>(
    transport: &T,
    pairing: &Pairing,
    t: &Timeouts,
    poll: Duration,
    stop: &AtomicBool,
) -> Result<(), UsbError> {
    let id = identity(&pairing.facts());
    let mut arrivals = Arrivals::new(transport, poll);
    let mut released: Released = Vec::new();
    while let Some(dev) = arrivals.next(|| stop.load(Ordering::Acquire))? {
        let now = Instant::now();
        released.retain(|(_, until)| *until > now);
        let key = (dev.bus, dev.vendor_id, dev.product_id);
        if let Some(i) = released.iter().position(|(k, _)| *k == key) {
            // The phone just released, back as itself: left alone until it leaves the bus.
            released.swap_remove(i);
            tracing::debug!(
                "USB device {:04x}:{:04x} is back after its release",
                dev.vendor_id,
                dev.product_id
            );
            continue;
        }
        let out = pair_device(transport, &dev, pairing, &id, t);
        if let Some(a) = out.accessory {
            arrivals.mark_seen(a);
        }
        if out.released && !usb_aoa::aoa::is_accessory(&dev) {
            released.push((key, now + RELEASE_GRACE));
        }
        match out.result {
            Ok(_) => {}
            // Hubs, keyboards, disks: not phones.
            Err(UsbPairingError::Handshake(UsbError::NotAccessory { .. })) => {
                tracing::debug!(
                    "USB device {:04x}:{:04x} is not a phone",
                    dev.vendor_id,
                    dev.product_id
                )
            }
            Err(e) => tracing::warn!(
                "USB device {:04x}:{:04x}: {}",
                dev.vendor_id,
                dev.product_id,
                error_chain(&e)
            ),
        }
    }
    Ok(())
}

/// Starts the USB watcher thread on the machine's USB stack (libusb). Without USB it logs
/// that once and returns `None`.
pub fn start_watcher(
    pairing: Arc<Pairing>,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let transport = match usb_aoa::RusbTransport::new() {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(
                "USB pairing is off: {}; phones pair with the manager's QR code instead",
                error_chain(&e)
            );
            return None;
        }
    };
    tracing::info!(
        hotplug = transport.hotplug(),
        "watching USB for phones to pair"
    );
    std::thread::Builder::new()
        .name("usb-pairing".into())
        .spawn(move || {
            if let Err(e) = serve(&transport, &pairing, &Timeouts::default(), POLL, &stop) {
                tracing::warn!("USB pairing stopped: {}", error_chain(&e));
            }
        })
        .map_err(|e| tracing::warn!("cannot start the USB pairing thread: {e}"))
        .ok()
}
