//! The channel between a handoff's thread and the event loop that owns the machine: the
//! few things only the loop may do ([`MachineOp`]: pause and save, resume, release, report
//! progress), queued on a channel with an eventfd to wake the loop. The loop carries them
//! out in `machine.rs`; the thread (`send.rs`) asks for them.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use format::control::HandoffProgress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What the handoff thread asks of the event loop.
#[derive(Debug)]
pub enum MachineOp {
    /// Hold the devices, pause the vCPUs, save the machine state (a `format::state` file).
    Pause(Sender<Result<Vec<u8>, String>>),
    /// Resume what `Pause` stopped (after a failure).
    Resume(Sender<Result<(), String>>),
    /// The VM runs on the target: stop here.
    Release,
    /// Report progress to the supervisor.
    Progress(HandoffProgress),
    /// The handoff has ended (either way).
    Ended,
}

/// The channel from handoff threads to the event loop; the machine owns one.
#[derive(Debug)]
pub struct HandoffLink {
    pub(crate) tx: Sender<MachineOp>,
    pub(crate) rx: Receiver<MachineOp>,
    pub(crate) wake: Arc<EventFd>,
    pub(crate) active: AtomicBool,
    /// The base the VM was synthesised from, if it was.
    pub(crate) base: Option<HandoffBase>,
}

/// The base a synthesised VM runs on.
#[derive(Clone, Debug)]
pub struct HandoffBase {
    /// The base's memory file.
    pub memory: PathBuf,
    /// Its content id.
    pub id: [u8; 32],
    /// The file guest RAM maps privately when it is not the base's memory (a service's shared
    /// RAM image, `format::ram_image`): its unwritten pages may differ from the base.
    pub image: Option<PathBuf>,
}

impl HandoffLink {
    /// A new link for a VM that runs on `base` (if it has one).
    pub fn new(base: Option<HandoffBase>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        Ok(HandoffLink {
            tx,
            rx,
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            active: AtomicBool::new(false),
            base,
        })
    }

    /// Readable when operations wait for the event loop.
    pub fn event_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }

    /// Whether a handoff runs.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}
