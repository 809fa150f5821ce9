//! Pairing frames over an accessory's bulk endpoints. A frame may arrive in several bulk
//! transfers, or several frames in one: the header's length (checked by
//! `format::pairing::frame_len` before anything is awaited) says where each ends.

use std::time::{Duration, Instant};

use format::pairing::frame_len;

use crate::{DeviceInfo, UsbDevice, UsbError};

/// Bytes asked of each bulk IN transfer (AOA recommends at least 16 KiB buffers).
pub const READ_CHUNK: usize = 16 * 1024;

/// A claimed accessory: frames out on its bulk OUT endpoint, in on its bulk IN endpoint.
pub struct AccessoryLink<D: UsbDevice> {
    dev: D,
    info: DeviceInfo,
    ep_in: u8,
    ep_out: u8,
    timeout: Duration,
    pending: Vec<u8>,
}

impl<D: UsbDevice> AccessoryLink<D> {
    /// A link over `dev`'s endpoints `ep_in` and `ep_out`; each frame may take `timeout`.
    pub fn new(dev: D, info: DeviceInfo, ep_in: u8, ep_out: u8, timeout: Duration) -> Self {
        AccessoryLink {
            dev,
            info,
            ep_in,
            ep_out,
            timeout,
            pending: Vec::new(),
        }
    }

    /// The accessory (as re-enumerated).
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The endpoints (IN, OUT).
    pub fn endpoints(&self) -> (u8, u8) {
        (self.ep_in, self.ep_out)
    }

    /// Ends the link: resets the device, so a phone leaves accessory mode and enumerates
    /// again as itself (otherwise it would stay an accessory until unplugged).
    pub fn release(mut self) -> Result<(), UsbError> {
        self.dev.reset()
    }

    /// Sends one whole frame.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), UsbError> {
        let mut rest = frame;
        while !rest.is_empty() {
            let n = self.dev.bulk_out(self.ep_out, rest, self.timeout)?;
            if n == 0 {
                return Err(UsbError::Timeout("sending a frame"));
            }
            rest = &rest[n.min(rest.len())..];
        }
        Ok(())
    }

    /// Receives one whole frame (its checks beyond the header are the caller's).
    pub fn recv_frame(&mut self) -> Result<Vec<u8>, UsbError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            if let Some(n) = frame_len(&self.pending).map_err(UsbError::Frame)? {
                if self.pending.len() >= n {
                    let rest = self.pending.split_off(n);
                    return Ok(std::mem::replace(&mut self.pending, rest));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(UsbError::Timeout("waiting for the phone's frame"));
            }
            let got = self.dev.bulk_in(self.ep_in, &mut buf, deadline - now)?;
            self.pending.extend_from_slice(&buf[..got.min(buf.len())]);
        }
    }
}
