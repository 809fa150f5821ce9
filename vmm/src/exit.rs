//! Why a VM stopped, and the one-shot notifier the vCPUs and devices use to say so.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Exit status of the `vmm` process when the guest crashed (triple fault, emulation failure,
/// failed VM entry). Distinct from the 0–255 a guest may choose, except by a guest that
/// deliberately powers off with 124.
pub const EXIT_GUEST_CRASHED: i32 = 124;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off through the debug-exit port with this code.
    PowerOff(u8),
    /// The guest asked for a reset (i8042 0xfe, KVM system event); we stop instead.
    Reset,
    /// The guest crashed; the string describes how, with its registers.
    Crashed(String),
    /// A VMM-side failure while running the guest.
    Error(String),
    /// The VMM was asked to stop by a control request.
    Stopped,
    /// The VMM was stopped by this signal (SIGINT, SIGTERM, SIGHUP).
    Signalled(i32),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff(code) => i32::from(*code),
            ExitReason::Reset | ExitReason::Stopped => 0,
            ExitReason::Crashed(_) => EXIT_GUEST_CRASHED,
            ExitReason::Error(_) => 1,
            ExitReason::Signalled(sig) => 128 + sig,
        }
    }
}

/// Records the first exit reason and wakes the event loop. Later reasons are ignored, so the
/// cause reported is the one that happened first.
#[derive(Debug)]
pub struct ExitNotifier {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitNotifier {
    /// A notifier with a fresh eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one was recorded already, and signals the eventfd.
    pub fn notify(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            *r = Some(reason);
        }
        drop(r);
        // A failed write can only mean the counter is saturated, i.e. already signalled.
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the event loop waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_maps_to_exit_code() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.reason(), None);
        n.notify(ExitReason::PowerOff(7));
        n.notify(ExitReason::Crashed("later".into()));
        assert_eq!(n.reason(), Some(ExitReason::PowerOff(7)));
        assert_eq!(n.reason().unwrap().exit_code(), 7);
        assert_eq!(
            ExitReason::Crashed(String::new()).exit_code(),
            EXIT_GUEST_CRASHED
        );
        assert_eq!(n.eventfd().read().unwrap(), 2);
    }
}
