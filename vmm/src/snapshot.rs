//! Machine snapshots: a directory with
//!
//! - `state`: a state file ([`format::state`], kind `Machine`) holding [`MachineState`];
//! - `memory`: guest RAM, regions back to back (region i at the sum of the sizes before it),
//!   written sparsely — all-zero 4 KiB pages are holes — and mapped `MAP_PRIVATE` on restore,
//!   so VMs restored from one snapshot share its clean pages through the page cache.
//!
//! Save order: pause vCPUs → vCPU states → VM state (PIC, IOAPIC, PIT, clock) → devices →
//! memory → state file (written last, to a temporary name, then renamed: a snapshot with a
//! `state` file is complete).

use std::fs::File;

use format::overlay::Run;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

use crate::arch::layout;
use format::state::{self as persist, Kind, StateError};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory image in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;

/// Errors while writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system failure.
    #[error("failed to {0} '{1}'")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// The state file is bad.
    #[error("snapshot state '{0}' is unusable")]
    State(PathBuf, #[source] StateError),
    /// The state does not describe a machine we can build.
    #[error("snapshot '{0}' is inconsistent: {1}")]
    Inconsistent(PathBuf, String),
    /// Reading guest memory failed.
    #[error("failed to read guest memory at {0:#x}")]
    Memory(u64),
    /// Mapping the memory image failed.
    #[error("failed to map the memory image '{0}'")]
    Map(PathBuf, #[source] vm_memory::mmap::MmapRegionError),
    /// The disk δ file is unusable.
    #[error("the disk δ '{0}' is unusable: {1}")]
    Disk(PathBuf, String),
}

/// The serial port's registers and receive FIFO (vm-superio's `SerialState`, serialisable).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch low.
    pub baud_divisor_low: u8,
    /// Divisor latch high.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Everything but RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM in MiB (the layout follows from it).
    pub mem_mib: u64,
    /// One state per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// PICs, IOAPIC, PIT, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// virtio devices, in window order.
    pub virtio: Vec<VirtioSlotState>,
}

/// One virtio device in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSlotState {
    /// Window index.
    pub index: u32,
    /// Device kind.
    pub kind: crate::devices::virtio::slot::SlotKind,
    /// Transport, queues and device registers.
    pub mmio: crate::devices::virtio::mmio::MmioState,
    /// For a disk: what it sits on (its δ blocks are in [`DISK_DELTA_FILE`]).
    pub disk: Option<DiskSnapshot>,
}

/// A disk's identity in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// The raw base image (absolute path), if any.
    pub base: Option<PathBuf>,
    /// Disk size in bytes.
    pub size: u64,
    /// Read-only.
    pub read_only: bool,
}

/// The disk δ (a δ file, see [`crate::devices::virtio::disk`]) next to a snapshot's state.
pub const DISK_DELTA_FILE: &str = "disk.delta";

/// The δ blocks of the snapshot's disk (empty without a disk or a δ file).
pub fn read_disk_delta(
    dir: &Path,
    state: &MachineState,
) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
    let Some(disk) = state.virtio.iter().find_map(|s| s.disk.as_ref()) else {
        return Ok(Vec::new());
    };
    let path = dir.join(DISK_DELTA_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bad = |e: crate::devices::virtio::disk::DiskError| {
        SnapshotError::Disk(path.clone(), e.to_string())
    };
    // Read-only: restoring must not change the snapshot (not even a torn tail).
    let delta =
        crate::devices::virtio::disk::Delta::open_read_only(&path, disk.size).map_err(bad)?;
    delta
        .delta_blocks()
        .map(|b| b.map(|(n, data)| (n, data.into_owned())).map_err(bad))
        .collect()
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
        .map_err(|e| SnapshotError::Disk(path.clone(), e.to_string()))?;
    Ok(())
}

/// What a finished snapshot wrote.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotInfo {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Non-zero bytes written to the memory image.
    pub memory_bytes_written: u64,
    /// Logical size of the memory image.
    pub memory_bytes: u64,
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
    let path = dir.join(STATE_FILE);
    let bytes =
        persist::encode(Kind::Machine, state).map_err(|e| SnapshotError::State(path.clone(), e))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let io = |what, e| SnapshotError::Io(what, tmp.clone(), e);
    let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(&bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| SnapshotError::Io("rename", path.clone(), e))?;
    Ok(bytes.len() as u64)
}

/// Reads and checks a snapshot's state file.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| SnapshotError::Io("read", path.clone(), e))?;
    let state: MachineState = persist::decode(Kind::Machine, &bytes)
        .map_err(|e| SnapshotError::State(path.clone(), e))?;
    let bad = |why: String| SnapshotError::Inconsistent(dir.to_owned(), why);
    if state.vcpus.is_empty() || state.vcpus.len() > usize::from(crate::config::MAX_VCPUS) {
        return Err(bad(format!("{} vCPUs", state.vcpus.len())));
    }
    if state.serial.in_buffer.len() > 64 {
        return Err(bad("serial FIFO holds more than 64 bytes".into()));
    }
    crate::vstate::memory::validate_size(state.mem_mib).map_err(|e| bad(e.to_string()))?;
    Ok(state)
}

/// Maps the memory image of a snapshot `MAP_PRIVATE` (copy-on-write over the page cache) with
/// the layout of `mem_mib` MiB.
pub fn map_memory(dir: &Path, mem_mib: u64) -> Result<GuestMemoryMmap, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| SnapshotError::Io("open", path.clone(), e))?;
    let len = file
        .metadata()
        .map_err(|e| SnapshotError::Io("inspect", path.clone(), e))?
        .len();
    if len != mem_mib << 20 {
        return Err(SnapshotError::Inconsistent(
            dir.to_owned(),
            format!("memory image is {len} bytes, the state says {mem_mib} MiB"),
        ));
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut off = 0u64;
    for (start, size) in layout::ram_ranges(mem_mib << 20) {
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), off)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotError::Map(path.clone(), e))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| {
                SnapshotError::Inconsistent(dir.to_owned(), "memory region overflows".into())
            })?,
        );
        off += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::Inconsistent(dir.to_owned(), format!("memory layout: {e}")))?;
    Ok(mem)
}

/// The parts of byte range `start..end` outside the page runs `skip` (sorted, not
/// overlapping). `cursor` is the first run that may still matter; calls must come in
/// ascending order of `start`.
fn outside_runs(start: u64, end: u64, skip: &[Run], cursor: &mut usize) -> Vec<(u64, u64)> {
    let page = format::PAGE_SIZE as u64;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        while skip
            .get(*cursor)
            .is_some_and(|r| (r.first + r.count) * page <= at)
        {
            *cursor += 1;
        }
        match skip.get(*cursor) {
            Some(r) if r.first * page <= at => at = ((r.first + r.count) * page).min(end),
            next => {
                let stop = next.map_or(end, |r| (r.first * page).min(end));
                out.push((at, stop));
                at = stop;
            }
        }
    }
    out
}

/// Most bytes of a memory image's data [`prefault_data`] maps up front.
const PREFAULT_MAX: u64 = 16 << 20;

/// Maps the memory image's data extents (not its holes) into the private mapping up front,
/// read-only and shared with the page cache, in one `MADV_POPULATE_READ` per extent: the
/// guest's first touches then skip the host page fault (measured on PVM hosts: ~10 µs per
/// first touch of an unpopulated page, ~2.4 µs of a populated one). Best effort, at most
/// `PREFAULT_MAX` (16 MiB) bytes. `skip` (sorted image-page runs) are left alone: lazy synthesis
/// has replaced them by memory its fault server fills, and populating those would wait for
/// it.
pub fn prefault_data(dir: &Path, mem: &GuestMemoryMmap, skip: &[Run]) {
    use std::os::fd::AsRawFd;
    let Ok(file) = File::open(dir.join(MEMORY_FILE)) else {
        return;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return;
    };
    let fd = file.as_raw_fd();
    let populate = |at: u64, n: u64| {
        let Some((gpa, in_range)) = layout::image_offset_to_gpa(len, at) else {
            return;
        };
        if let Ok(host) = mem.get_host_address(GuestAddress(gpa)) {
            // SAFETY: `host..host+n` lies in one guest RAM mapping we own (`n` is within
            // the RAM range at `gpa`); populating read-only changes no contents.
            unsafe {
                libc::madvise(
                    host.cast(),
                    in_range.min(n) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
        }
    };
    let (mut off, mut budget) = (0i64, PREFAULT_MAX);
    let mut cursor = 0;
    while (off as u64) < len && budget > 0 {
        // SAFETY: lseek on a file we own; results are checked.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole <= data {
            return;
        }
        let end = (hole as u64).min(len).min(data as u64 + budget);
        for (mut at, stop) in outside_runs(data as u64, end, skip, &mut cursor) {
            // Piecewise where the RAM layout jumps over the MMIO gap.
            while at < stop {
                let Some((_, in_range)) = layout::image_offset_to_gpa(len, at) else {
                    return;
                };
                let n = in_range.min(stop - at);
                populate(at, n);
                at += n;
            }
        }
        budget = budget.saturating_sub(end - data as u64);
        off = hole;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefault_skips_the_runs_lazy_synthesis_fills() {
        let p = format::PAGE_SIZE as u64;
        let skip = [
            Run { first: 2, count: 2 },
            Run {
                first: 10,
                count: 1,
            },
        ];
        let mut cursor = 0;
        // An extent covering pages 0..6: pages 2 and 3 are left out.
        assert_eq!(
            outside_runs(0, 6 * p, &skip, &mut cursor),
            [(0, 2 * p), (4 * p, 6 * p)]
        );
        // A later extent starting inside a run, and one past every run.
        assert_eq!(
            outside_runs(10 * p + 100, 12 * p, &skip, &mut cursor),
            [(11 * p, 12 * p)]
        );
        assert_eq!(
            outside_runs(20 * p, 21 * p, &skip, &mut cursor),
            [(20 * p, 21 * p)]
        );
        // Nothing to skip: the whole extent.
        assert_eq!(outside_runs(0, 3 * p, &[], &mut 0), [(0, 3 * p)]);
    }

    #[test]
    fn memory_image_is_sparse_and_maps_back_privately() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::vstate::memory::create_guest_memory(4).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(0x20_0000))
            .unwrap();
        let written = write_memory(&mem, &dir.join(MEMORY_FILE)).unwrap();
        assert_eq!(written, 4 * PAGE as u64, "only the non-zero pages");
        let back = map_memory(&dir, 4).unwrap();
        let mut b = [0u8; 5];
        back.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        // Writes to the restored memory stay private: the image is unchanged.
        back.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        let again = map_memory(&dir, 4).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert!(matches!(
            map_memory(&dir, 8),
            Err(SnapshotError::Inconsistent(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
