//! The virtio device thread: waits on every device's queue notifications (KVM ioeventfds)
//! and host-side fds (network backends), and runs the devices.
//!
//! A thread of its own rather than the VMM's main loop, so a machine driven as a library
//! (image-builder, tests) has working devices without running that loop. Snapshots take
//! [`DeviceWorker::hold`] so no request completes while the machine's state is being saved.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::slot::Slot;

const TOKEN_STOP: u64 = u64::MAX;
/// Queue `q` of slot `i`: `i * 16 + q`.
const TOKEN_QUEUE_END: u64 = 1 << 32;
/// Host fd of slot `i`: `TOKEN_QUEUE_END + i`.
const TOKEN_HOST: u64 = TOKEN_QUEUE_END;

/// The running device thread.
pub struct DeviceWorker {
    stop: EventFd,
    busy: Arc<Mutex<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWorker").finish_non_exhaustive()
    }
}

impl DeviceWorker {
    /// Starts driving `slots` (none: no thread).
    pub fn start(slots: Arc<Vec<Slot>>) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let busy = Arc::new(Mutex::new(()));
        let thread = if slots.is_empty() {
            None
        } else {
            let epoll = Epoll::new()?;
            epoll.ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_STOP),
            )?;
            for (i, slot) in slots.iter().enumerate() {
                for (q, fd) in slot.queue_fds.iter().enumerate() {
                    epoll.ctl(
                        ControlOperation::Add,
                        *fd,
                        EpollEvent::new(EventSet::IN, i as u64 * 16 + q as u64),
                    )?;
                }
                if let Some(fd) = slot.lock().host_event_fd() {
                    epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::empty(), TOKEN_HOST + i as u64),
                    )?;
                }
            }
            let b = busy.clone();
            Some(
                std::thread::Builder::new()
                    .name("virtio".into())
                    .spawn(move || run(epoll, &slots, &b))?,
            )
        };
        Ok(DeviceWorker { stop, busy, thread })
    }

    /// Keeps the devices still (no request processed) while the guard lives.
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(epoll: Epoll, slots: &[Slot], busy: &Mutex<()>) {
    crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Device);
    let mut watching = vec![false; slots.len()];
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let timeout = {
            let _g = busy.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = update_host_watch(&epoll, slots, &mut watching) {
                tracing::error!("virtio device thread: {e}");
                return;
            }
            next_timeout(slots)
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio device thread: {e}");
                return;
            }
        };
        let _g = busy.lock().unwrap_or_else(|e| e.into_inner());
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return,
                t if t < TOKEN_QUEUE_END => {
                    if let Some(slot) = slots.get((t / 16) as usize) {
                        slot.lock().process_queue_event((t % 16) as usize);
                    }
                }
                t => {
                    if let Some(slot) = slots.get((t - TOKEN_HOST) as usize) {
                        slot.lock().process_host_event();
                    }
                }
            }
        }
    }
}

/// Milliseconds until the next device timer (running those already due); -1 for none.
fn next_timeout(slots: &[Slot]) -> i32 {
    let mut ms: Option<u128> = None;
    for slot in slots {
        let mut t = slot.lock();
        if let Some(d) = t.next_timeout() {
            if d.is_zero() {
                t.process_host_event();
            }
            let d = t.next_timeout().map_or(u128::MAX, |d| d.as_millis().max(1));
            ms = Some(ms.map_or(d, |m| m.min(d)));
        }
    }
    ms.map_or(-1, |m| m.min(i32::MAX as u128) as i32)
}

/// Watches each device's host fd only while it can take host input.
fn update_host_watch(epoll: &Epoll, slots: &[Slot], watching: &mut [bool]) -> std::io::Result<()> {
    for (i, slot) in slots.iter().enumerate() {
        let t = slot.lock();
        let Some(fd): Option<RawFd> = t.host_event_fd() else {
            continue;
        };
        let want = t.host_events_wanted();
        if want != watching[i] {
            let set = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, TOKEN_HOST + i as u64),
            )?;
            watching[i] = want;
        }
    }
    Ok(())
}
