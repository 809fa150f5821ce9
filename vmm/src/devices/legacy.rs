//! Legacy PC ports the guest uses to stop: the isa-debug-exit compatible power-off port and
//! the i8042 controller's reset command.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// Power-off port (`out 0x501, code`): the VM stops and `vmm` exits with `code`.
///
/// QEMU's isa-debug-exit at the same address exits with `(code << 1) | 1`; we use the code as
/// is, so a guest's 0 means success.
#[derive(Debug)]
pub struct DebugExit {
    exit: Arc<ExitNotifier>,
}

impl DebugExit {
    /// A power-off port reporting to `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(code) = data.first() {
                self.exit.notify(ExitReason::PowerOff(*code));
            }
        }
    }
}

/// Turns the i8042 "pulse reset line" command into a VM exit.
#[derive(Debug)]
pub struct ResetTrigger(pub Arc<ExitNotifier>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.notify(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 controller (ports 0x60–0x64), reset command only.
#[derive(Debug)]
pub struct I8042(pub I8042Device<ResetTrigger>);

impl I8042 {
    /// An i8042 whose reset command reports to `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        I8042(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The trigger cannot fail.
            let _ = self.0.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_reports_the_code() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut d = DebugExit::new(n.clone());
        d.write(1, &[9]);
        assert_eq!(n.reason(), None, "only the first port powers off");
        d.write(0, &[42]);
        assert_eq!(n.reason(), Some(ExitReason::PowerOff(42)));
    }

    #[test]
    fn i8042_reset_command_stops_the_vm() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut k = I8042::new(n.clone());
        k.write(4, &[0x20]);
        assert_eq!(n.reason(), None);
        k.write(4, &[0xfe]);
        assert_eq!(n.reason(), Some(ExitReason::Reset));
    }
}
