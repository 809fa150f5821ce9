//! Saving a running machine into a snapshot directory.
//!
//! Save order: pause vCPUs → vCPU states → VM state (PIC, IOAPIC, PIT, clock) → devices →
//! memory → state file (written last, to a temporary name, then renamed: a snapshot with a
//! `state` file is complete).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::vstate::memory::{GuestMemoryMmap, GuestRegionMmap};
use format::base::STATE;
use format::state::{self as persist, Kind};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::state::{MachineState, SnapshotError, SnapshotInfo, DISK_DELTA_FILE};
use crate::machine::Machine;
use crate::persist::Persist;
use crate::synthesis::lazy::LazyError;

const PAGE: usize = 4096;

/// Errors while saving a machine.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Saving a component or writing the snapshot's files failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Guest memory is still being filled from an overlay and could not be completed.
    #[error("guest memory is incomplete")]
    Lazy(#[from] LazyError),
}

impl Machine {
    /// Writes a snapshot of the machine into `dir` (created if needed). The vCPUs are paused
    /// for it and left paused: call [`Machine::resume`] to go on, or drop the machine.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SaveError> {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Io("create", dir.to_owned(), e))?;
        // No device request completes from here until the state is saved: one completing
        // after the vCPUs' and controllers' state was read would raise an interrupt the
        // snapshot misses (its status is saved with the device, and raised again on restore).
        let _still = self.devices.as_ref().map(|d| d.hold());
        self.pause().map_err(|e| SnapshotError::Vcpu("pause", e))?;
        // Pages not yet filled would read as missing (and mincore would skip them).
        if let Some(lazy) = &self.lazy {
            lazy.wait(std::time::Duration::from_secs(60))?;
        }
        let state = self.machine_state()?;
        for (slot, saved) in self.virtio.iter().zip(&state.virtio) {
            if saved.disk.is_none() {
                continue;
            }
            if let Some(b) = slot.lock().block() {
                let d = b.disk();
                let blocks = d
                    .delta()
                    .delta_blocks()
                    .map(|r| r.map(|(n, data)| (n, data.into_owned())))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| SnapshotError::Disk(dir.join(DISK_DELTA_FILE), e))?;
                write_disk_delta(dir, d.size(), blocks)?;
            }
        }
        let memory_bytes_written = write_memory(&self.mem, &dir.join(format::base::MEMORY))?;
        let state_bytes = write_state(&state, dir)?;
        Ok(SnapshotInfo {
            state_bytes,
            memory_bytes_written,
            memory_bytes: state.mem_mib << 20,
        })
    }
}

impl Machine {
    /// The state of the vCPUs, the VM, COM1 and the virtio devices (not memory, not the disk
    /// δ): vCPUs paused and devices held by the caller (a snapshot, a handoff's pause).
    pub(crate) fn machine_state(&self) -> Result<MachineState, SnapshotError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SnapshotError::Vcpu("save", e))?;
        let vm = self.vm.save().map_err(|e| SnapshotError::Vm("save", e))?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save()
            .map_err(SnapshotError::from)?;
        let virtio = self
            .virtio
            .iter()
            .map(|slot| slot.save().map_err(SnapshotError::from))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            mem_mib: self.mem_mib(),
            vcpus,
            vm,
            serial,
            virtio,
        })
    }
}

/// Writes the δ blocks of a disk into `dir` as a δ file.
pub fn write_disk_delta(
    dir: &Path,
    size: u64,
    blocks: Vec<(u64, Vec<u8>)>,
) -> Result<(), SnapshotError> {
    let path = dir.join(DISK_DELTA_FILE);
    let _ = std::fs::remove_file(&path);
    crate::devices::virtio::disk::Delta::create_from_blocks(&path, size, blocks)
        .map_err(|e| SnapshotError::Disk(path.clone(), e))?;
    Ok(())
}

/// Writes guest RAM to `path` sparsely (zero pages become holes); returns the bytes written.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, SnapshotError> {
    let io = |what, e| SnapshotError::Io(what, path.to_owned(), e);
    let file = File::create(path).map_err(|e| io("create", e))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(|e| io("size", e))?;
    let mut written = 0u64;
    let mut file_off = 0u64;
    let mut buf = vec![0u8; 2 << 20];
    for region in mem.iter() {
        let len = region.len() as usize;
        // Anonymous RAM that was never touched is zero: skip it without reading (reading
        // would fault in the zero page for each of them).
        let resident = match region.file_offset() {
            None => resident_pages(region),
            Some(_) => None,
        };
        let mut off = 0usize;
        while off < len {
            let n = buf.len().min(len - off);
            if let Some(res) = &resident {
                let (first, last) = (off / PAGE, (off + n).div_ceil(PAGE));
                if res[first..last].iter().all(|r| r & 1 == 0) {
                    off += n;
                    continue;
                }
            }
            region
                .read_slice(&mut buf[..n], MemoryRegionAddress(off as u64))
                .map_err(|_| SnapshotError::Memory(region.start_addr().0 + off as u64))?;
            // Write runs of non-zero pages.
            let mut p = 0;
            while p < n {
                if is_zero(&buf[p..(p + PAGE).min(n)]) {
                    p += PAGE;
                    continue;
                }
                let start = p;
                while p < n && !is_zero(&buf[p..(p + PAGE).min(n)]) {
                    p += PAGE;
                }
                let end = p.min(n);
                file.write_all_at(&buf[start..end], file_off + (off + start) as u64)
                    .map_err(|e| io("write", e))?;
                written += (end - start) as u64;
            }
            off += n;
        }
        file_off += len as u64;
    }
    file.sync_data().map_err(|e| io("sync", e))?;
    Ok(written)
}

/// `mincore` of a region: one byte per 4 KiB page, bit 0 set when resident. `None` when the
/// call fails (then everything is read).
fn resident_pages(region: &GuestRegionMmap) -> Option<Vec<u8>> {
    let len = region.len() as usize;
    let addr = region.get_host_address(MemoryRegionAddress(0)).ok()?;
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `addr..addr+len` is the region's live, page-aligned mapping; `vec` has one byte
    // per page as mincore requires.
    let r = unsafe { libc::mincore(addr.cast(), len, vec.as_mut_ptr()) };
    (r == 0).then_some(vec)
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned part.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Writes the state file atomically (temporary name, then rename).
pub fn write_state(state: &MachineState, dir: &Path) -> Result<u64, SnapshotError> {
    let path = dir.join(STATE);
    let bytes =
        persist::encode(Kind::Machine, state).map_err(|e| SnapshotError::State(path.clone(), e))?;
    let tmp = dir.join(format!("{STATE}.tmp"));
    let io = |what, e| SnapshotError::Io(what, tmp.clone(), e);
    let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(&bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| SnapshotError::Io("rename", path.clone(), e))?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{self, MemoryError};
    use vm_memory::GuestAddress;

    #[test]
    fn memory_image_is_sparse_and_maps_back_privately() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::vstate::memory::create_guest_memory(4).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(0x20_0000))
            .unwrap();
        let written = write_memory(&mem, &dir.join(format::base::MEMORY)).unwrap();
        assert_eq!(written, 4 * PAGE as u64, "only the non-zero pages");
        let back = memory::map_image(&dir.join(format::base::MEMORY), 4).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        // Writes to the restored memory stay private: the image is unchanged.
        back.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        let again = memory::map_image(&dir.join(format::base::MEMORY), 4).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert!(matches!(
            memory::map_image(&dir.join(format::base::MEMORY), 8),
            Err(MemoryError::ImageSize { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
