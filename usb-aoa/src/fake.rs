//! A phone on a fake USB bus, for tests: it implements [`UsbTransport`] and plays the phone's
//! side of AOA at the control-transfer and bulk level, so the handshake code runs exactly as
//! against a real phone. Its "app" answers each whole frame the host sends on bulk OUT; it
//! can be told to misbehave ([`Misbehave`]).
//!
//! ```text
//! plugged:     vid:pid (e.g. 18d1:4ee7) at address 5
//! GET_PROTOCOL → 2;  SEND_STRING × 6 recorded;  START → leaves the bus
//! after `reappear_after`: 18d1:2d01 at address 6, interface 0 (class 0xff) with bulk IN 0x81
//! and bulk OUT 0x01 (and an ADB-like interface 1 without bulk endpoints)
//! USB reset:   leaves the bus; after `reappear_after` back as 18d1:4ee7 at address 7
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use format::pairing::frame_len;

use crate::aoa::{GET_PROTOCOL, GOOGLE_VID, REQ_IN, REQ_OUT, SEND_STRING, START};
use crate::{DeviceInfo, Endpoint, Interface, UsbDevice, UsbError, UsbTransport};

/// Bus number of the fake bus.
pub const BUS: u8 = 1;
/// The accessory's bulk IN endpoint.
pub const EP_IN: u8 = 0x81;
/// The accessory's bulk OUT endpoint.
pub const EP_OUT: u8 = 0x01;

/// The root hub on the fake bus.
pub const HUB: DeviceInfo = DeviceInfo {
    bus: BUS,
    address: 1,
    vendor_id: 0x1D6B,
    product_id: 0x0002,
};

/// How the fake phone goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// It does everything right.
    Nothing,
    /// GET_PROTOCOL answers 0: no accessory support.
    RefuseAoa,
    /// After START it never comes back in accessory mode.
    NeverReturns,
    /// It answers the first frame with bytes that are no frame.
    Garbage,
    /// It leaves the bus as soon as it has received the first frame.
    DisconnectMidExchange,
}

/// What the phone's app does with each whole frame the host sends: the bytes to put on
/// bulk IN.
pub type App = Box<dyn FnMut(&[u8]) -> Vec<u8> + Send>;

struct State {
    vendor_id: u16,
    product_id: u16,
    /// Its ids when not an accessory.
    own_ids: (u16, u16),
    /// What it comes back as at `reappear_at`: an accessory (after START) or itself (after a
    /// reset).
    back_as_accessory: bool,
    resets: u32,
    address: u8,
    /// On the bus (`false` between START and re-enumeration, and after a disconnect).
    present: bool,
    accessory: bool,
    reappear_at: Option<Instant>,
    reappear_after: Duration,
    protocol: u16,
    misbehave: Misbehave,
    identity: Vec<(u16, String)>,
    requests: Vec<u8>,
    claimed: Option<u8>,
    from_host: Vec<u8>,
    frames_from_host: Vec<Vec<u8>>,
    to_host: VecDeque<u8>,
    app: App,
}

impl State {
    fn tick(&mut self) {
        if let Some(t) = self.reappear_at {
            if Instant::now() >= t {
                self.reappear_at = None;
                self.present = true;
                self.accessory = self.back_as_accessory;
                (self.vendor_id, self.product_id) = if self.accessory {
                    (GOOGLE_VID, 0x2D01)
                } else {
                    self.own_ids
                };
                self.address += 1;
            }
        }
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            bus: BUS,
            address: self.address,
            vendor_id: self.vendor_id,
            product_id: self.product_id,
        }
    }
}

/// A phone plugged into a fake bus. Clones share the phone.
#[derive(Clone)]
pub struct FakePhone {
    state: Arc<Mutex<State>>,
}

/// An open handle on the fake phone (valid for the device it was opened as: after the phone
/// re-enumerates or leaves, transfers fail with [`UsbError::Disconnected`]).
pub struct FakeHandle {
    state: Arc<Mutex<State>>,
    opened_as: DeviceInfo,
}

impl FakePhone {
    /// A phone (a Pixel's 18d1:4ee7 at address 5) whose app answers frames with `app`.
    pub fn new(app: impl FnMut(&[u8]) -> Vec<u8> + Send + 'static) -> FakePhone {
        FakePhone {
            state: Arc::new(Mutex::new(State {
                vendor_id: GOOGLE_VID,
                product_id: 0x4EE7,
                own_ids: (GOOGLE_VID, 0x4EE7),
                back_as_accessory: true,
                resets: 0,
                address: 5,
                present: true,
                accessory: false,
                reappear_at: None,
                reappear_after: Duration::from_millis(20),
                protocol: 2,
                misbehave: Misbehave::Nothing,
                identity: Vec::new(),
                requests: Vec::new(),
                claimed: None,
                from_host: Vec::new(),
                frames_from_host: Vec::new(),
                to_host: VecDeque::new(),
                app: Box::new(app),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The same phone, misbehaving as `m`.
    pub fn misbehaving(self, m: Misbehave) -> FakePhone {
        self.lock().misbehave = m;
        self
    }

    /// The same phone, back on the bus in accessory mode `d` after START (20 ms by
    /// default).
    pub fn reappearing_after(self, d: Duration) -> FakePhone {
        self.lock().reappear_after = d;
        self
    }

    /// The same phone, starting unplugged: it arrives at [`FakePhone::plug`].
    pub fn unplugged(self) -> FakePhone {
        self.lock().present = false;
        self
    }

    /// Plugs the phone in (not in accessory mode).
    pub fn plug(&self) {
        let mut s = self.lock();
        s.tick();
        s.present = true;
        s.accessory = false;
        (s.vendor_id, s.product_id) = s.own_ids;
        s.reappear_at = None;
    }

    /// Unplugs the phone (it leaves the bus; plugged in again, it has a new address).
    pub fn unplug(&self) {
        let mut s = self.lock();
        s.tick();
        s.present = false;
        s.accessory = false;
        s.claimed = None;
        s.reappear_at = None;
        s.address += 1;
        // Plugged in again, it is asked who it is anew.
        s.identity.clear();
    }

    /// The identity strings received (index, string without its NUL), in order.
    pub fn identity(&self) -> Vec<(u16, String)> {
        self.lock().identity.clone()
    }

    /// Every vendor control request received (51, 52, 53), in order.
    pub fn requests(&self) -> Vec<u8> {
        self.lock().requests.clone()
    }

    /// Whether it is in accessory mode.
    pub fn in_accessory_mode(&self) -> bool {
        let mut s = self.lock();
        s.tick();
        s.accessory && s.present
    }

    /// How many USB resets the host made.
    pub fn resets(&self) -> u32 {
        self.lock().resets
    }

    /// Whether it is on the bus as itself (neither in accessory mode nor away).
    pub fn on_bus_as_itself(&self) -> bool {
        let mut s = self.lock();
        s.tick();
        s.present && !s.accessory
    }

    /// The interface the host claimed, if any.
    pub fn claimed(&self) -> Option<u8> {
        self.lock().claimed
    }

    /// Every whole frame the host sent on bulk OUT.
    pub fn frames_received(&self) -> Vec<Vec<u8>> {
        self.lock().frames_from_host.clone()
    }
}

impl UsbTransport for FakePhone {
    type Device = FakeHandle;

    fn devices(&self) -> Result<Vec<DeviceInfo>, UsbError> {
        let mut s = self.lock();
        s.tick();
        // A hub that is always there: it refuses AOA, as hubs do.
        let mut v = vec![HUB];
        if s.present {
            v.push(s.info());
        }
        Ok(v)
    }

    fn open(&self, info: &DeviceInfo) -> Result<FakeHandle, UsbError> {
        if *info == HUB {
            return Ok(FakeHandle {
                state: self.state.clone(),
                opened_as: HUB,
            });
        }
        let mut s = self.lock();
        s.tick();
        if !(s.present && s.info() == *info) {
            return Err(UsbError::NoSuchDevice {
                bus: info.bus,
                address: info.address,
            });
        }
        Ok(FakeHandle {
            state: self.state.clone(),
            opened_as: *info,
        })
    }

    fn wait_change(&self, timeout: Duration) {
        std::thread::sleep(timeout.min(Duration::from_millis(5)));
    }
}

impl FakeHandle {
    fn live(&self, what: &'static str) -> Result<MutexGuard<'_, State>, UsbError> {
        if self.opened_as == HUB {
            // The hub stalls every request the phone side would answer.
            return Err(UsbError::Stall(what));
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.tick();
        if s.present && s.info() == self.opened_as {
            Ok(s)
        } else {
            Err(UsbError::Disconnected(what))
        }
    }
}

impl UsbDevice for FakeHandle {
    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        _value: u16,
        _index: u16,
        buf: &mut [u8],
        _timeout: Duration,
    ) -> Result<usize, UsbError> {
        let mut s = self.live("asking the AOA protocol")?;
        s.requests.push(request);
        if request_type != REQ_IN || request != GET_PROTOCOL || buf.len() < 2 {
            return Err(UsbError::Stall("a control IN transfer"));
        }
        let v = if s.misbehave == Misbehave::RefuseAoa {
            0
        } else {
            s.protocol
        };
        buf[..2].copy_from_slice(&v.to_le_bytes());
        Ok(2)
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        _value: u16,
        index: u16,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, UsbError> {
        let mut s = self.live("sending the accessory identity")?;
        s.requests.push(request);
        if request_type != REQ_OUT || s.accessory {
            return Err(UsbError::Stall("a control OUT transfer"));
        }
        match request {
            SEND_STRING if index <= 5 => {
                // A string must be NUL-terminated, as the phone reads it.
                let Some((0, text)) = data.split_last() else {
                    return Err(UsbError::Stall("sending an identity string"));
                };
                s.identity
                    .push((index, String::from_utf8_lossy(text).into_owned()));
                Ok(data.len())
            }
            START if s.identity.len() == 6 => {
                s.present = false;
                if s.misbehave != Misbehave::NeverReturns {
                    s.reappear_at = Some(Instant::now() + s.reappear_after);
                    s.back_as_accessory = true;
                }
                Ok(0)
            }
            _ => Err(UsbError::Stall("an AOA request")),
        }
    }

    fn interfaces(&mut self) -> Result<Vec<Interface>, UsbError> {
        let s = self.live("reading descriptors")?;
        if !s.accessory {
            return Ok(vec![Interface {
                number: 0,
                class: 0x06,
                endpoints: vec![Endpoint {
                    address: 0x83,
                    bulk: false,
                }],
            }]);
        }
        Ok(vec![
            Interface {
                number: 0,
                class: 0xFF,
                endpoints: vec![
                    Endpoint {
                        address: EP_IN,
                        bulk: true,
                    },
                    Endpoint {
                        address: EP_OUT,
                        bulk: true,
                    },
                ],
            },
            Interface {
                number: 1,
                class: 0xFF,
                endpoints: vec![Endpoint {
                    address: 0x82,
                    bulk: false,
                }],
            },
        ])
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        let mut s = self.live("claiming the interface")?;
        s.claimed = Some(number);
        Ok(())
    }

    fn bulk_in(
        &mut self,
        endpoint: u8,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, UsbError> {
        let mut s = self.live("reading from the phone")?;
        if endpoint != EP_IN || !s.accessory || s.claimed != Some(0) {
            return Err(UsbError::Stall("a bulk IN transfer"));
        }
        if s.to_host.is_empty() {
            drop(s);
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
            return Err(UsbError::Timeout("reading from the phone"));
        }
        // Short transfers, so that the host reassembles frames.
        let n = buf.len().min(s.to_host.len()).min(24);
        for (i, b) in s.to_host.drain(..n).enumerate() {
            buf[i] = b;
        }
        Ok(n)
    }

    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, UsbError> {
        let mut s = self.live("writing to the phone")?;
        if endpoint != EP_OUT || !s.accessory || s.claimed != Some(0) {
            return Err(UsbError::Stall("a bulk OUT transfer"));
        }
        s.from_host.extend_from_slice(data);
        while let Ok(Some(n)) = frame_len(&s.from_host) {
            if s.from_host.len() < n {
                break;
            }
            let rest = s.from_host.split_off(n);
            let frame = std::mem::replace(&mut s.from_host, rest);
            s.frames_from_host.push(frame.clone());
            match s.misbehave {
                Misbehave::DisconnectMidExchange => {
                    s.present = false;
                    return Ok(data.len());
                }
                Misbehave::Garbage => {
                    s.to_host.extend(b"HTTP/1.1 200 OK\r\n\r\n garbage".iter());
                }
                _ => {
                    let answer = (s.app)(&frame);
                    s.to_host.extend(answer);
                }
            }
        }
        Ok(data.len())
    }

    fn reset(&mut self) -> Result<(), UsbError> {
        let mut s = self.live("resetting the device")?;
        s.resets += 1;
        // Leaves the bus (and accessory mode), back as itself shortly.
        s.present = false;
        s.accessory = false;
        s.claimed = None;
        s.to_host.clear();
        s.from_host.clear();
        s.back_as_accessory = false;
        s.reappear_at = Some(Instant::now() + s.reappear_after);
        Ok(())
    }
}
