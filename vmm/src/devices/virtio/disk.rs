//! A copy-on-write disk: a raw base image opened read-only (never written) plus a per-VM δ of
//! 4 KiB blocks. Reads take a block from the δ when it has one, else from the base (zeros past
//! the base's end); writes go to the δ only, whole blocks, read-modify-write for partial ones.
//!
//! The δ lives in memory ([`Delta::in_memory`], for tests and synthesis) or in a file. Either
//! way it exports and imports as a list of `(block number, 4096 bytes)`: the disk part of a VM
//! overlay ([`Delta::delta_blocks`], [`Delta::from_blocks`], [`Delta::create_from_blocks`]).
//!
//! # δ file
//!
//! The bytes of the δ file — two header copies, then 4 KiB block records, each with a
//! CRC-64/XZ — are drawn and encoded in [`format::disk_delta`]; this module keeps the log.
//!
//! The file is a log: a write appends a record, later records win. A flush `fdatasync`s the
//! records, then writes the other header copy with `committed` = record count and a higher
//! sequence number, then `fdatasync`s again — a torn header write leaves the older copy valid.
//! Opening checks every record: a bad record below `committed` is corruption and an error
//! (never silently wrong); the first bad or partial record at or after `committed` is the torn
//! tail of unflushed writes, and the file is truncated there (those writes were never flushed,
//! so losing them is a state a real disk could be in after a crash).
//! When dead records (overwritten blocks) outnumber live ones by [`COMPACT_SLACK`], the log is
//! rewritten with live records only into `<path>.tmp`, synced, and renamed over the file.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use format::disk_delta::{self as layout, Record, HEADER_LEN, HEADER_SLOT, RECORDS_START};
use format::disk_delta::{record_data_offset, record_offset};

/// Size of a δ block.
pub use format::disk_delta::BLOCK_SIZE;
const BS: u64 = BLOCK_SIZE as u64;
/// Bytes in a sector (the unit of disk sizes and virtio-blk requests).
pub const SECTOR_SIZE: u64 = 512;

/// δ file format version.
pub const DELTA_VERSION: u32 = layout::VERSION;
/// Bytes of one δ record.
pub const RECORD_LEN: u64 = layout::RECORD_LEN as u64;
/// Dead records tolerated beyond the live count before the log is compacted.
pub const COMPACT_SLACK: u64 = 1024;

/// Errors of the copy-on-write disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O operation failed.
    #[error("failed to {0}")]
    Io(&'static str, #[source] io::Error),
    /// Neither header copy is valid.
    #[error("{0} is not a disk delta file (bad magic or header checksum)")]
    NotDelta(PathBuf),
    /// Unknown format version.
    #[error("disk delta version {0} is not supported (expected {DELTA_VERSION})")]
    Version(u32),
    /// Block size other than 4096.
    #[error("disk delta has block size {0}, expected {BLOCK_SIZE}")]
    BlockSize(u32),
    /// The δ was made for a disk of another size.
    #[error("disk delta is for a disk of {found} bytes, this disk has {expected}")]
    DiskSize {
        /// Size in the δ.
        found: u64,
        /// Size expected.
        expected: u64,
    },
    /// A flushed record is damaged or missing.
    #[error("disk delta record {0} is corrupt or missing although a flush committed it")]
    Corrupt(u64),
    /// A disk size that is not a whole number of sectors.
    #[error("disk size {0} is not a multiple of {SECTOR_SIZE} bytes")]
    Size(u64),
    /// A block number past the end of the disk.
    #[error("block {block} is outside the disk ({blocks} blocks)")]
    BlockRange {
        /// Block number.
        block: u64,
        /// Blocks on the disk.
        blocks: u64,
    },
    /// Block data of the wrong length.
    #[error("block data is {0} bytes, expected {BLOCK_SIZE}")]
    BlockLen(usize),
    /// An access past the end of the disk.
    #[error("access {offset:#x}+{len:#x} is outside the disk ({size:#x} bytes)")]
    Range {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DiskError {
    move |e| DiskError::Io(what, e)
}

/// One exported δ block: its number and its [`BLOCK_SIZE`] bytes.
pub type DeltaBlock<'a> = (u64, Cow<'a, [u8]>);

/// The per-VM δ layer: 4 KiB blocks that override the base.
#[derive(Debug)]
pub struct Delta {
    disk_size: u64,
    store: Store,
    /// Blocks written since [`Delta::track_writes`] (a handoff's), while tracking.
    written: Option<std::collections::BTreeSet<u64>>,
}

#[derive(Debug)]
enum Store {
    Memory(BTreeMap<u64, Box<[u8]>>),
    File(DeltaFile),
}

/// A file-backed δ: the log plus an index of block number → record slot.
#[derive(Debug)]
struct DeltaFile {
    file: File,
    path: PathBuf,
    index: BTreeMap<u64, u64>,
    /// Records in the file.
    slots: u64,
    /// Records covered by the current header.
    committed: u64,
    /// Sequence number of the current header.
    seq: u64,
    /// Scratch record for appends.
    record: Vec<u8>,
}

impl Delta {
    fn check_size(disk_size: u64) -> Result<(), DiskError> {
        if disk_size % SECTOR_SIZE != 0 {
            return Err(DiskError::Size(disk_size));
        }
        Ok(())
    }

    /// An empty δ held in memory, for a disk of `disk_size` bytes.
    pub fn in_memory(disk_size: u64) -> Result<Self, DiskError> {
        Self::check_size(disk_size)?;
        Ok(Delta {
            disk_size,
            store: Store::Memory(BTreeMap::new()),
            written: None,
        })
    }

    /// A δ in memory holding `blocks` (later entries for the same block win).
    pub fn from_blocks<I, B>(disk_size: u64, blocks: I) -> Result<Self, DiskError>
    where
        I: IntoIterator<Item = (u64, B)>,
        B: AsRef<[u8]>,
    {
        let mut d = Self::in_memory(disk_size)?;
        for (n, data) in blocks {
            d.write_block(n, data.as_ref())?;
        }
        Ok(d)
    }

    /// Creates (or truncates) the δ file at `path`, empty.
    pub fn create(path: &Path, disk_size: u64) -> Result<Self, DiskError> {
        Self::check_size(disk_size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err("create the disk delta file"))?;
        let mut f = DeltaFile {
            file,
            path: path.to_owned(),
            index: BTreeMap::new(),
            slots: 0,
            committed: 0,
            seq: 0,
            record: vec![0; layout::RECORD_LEN],
        };
        // Both copies valid from the start; B (sequence 1) is current.
        f.write_header(disk_size, 0, 0)?;
        f.write_header(disk_size, 1, 0)?;
        f.seq = 1;
        f.file
            .sync_all()
            .map_err(io_err("sync the disk delta file"))?;
        sync_parent(path);
        Ok(Delta {
            disk_size,
            store: Store::File(f),
            written: None,
        })
    }

    /// Creates the δ file at `path` holding `blocks`, flushed.
    pub fn create_from_blocks<I, B>(
        path: &Path,
        disk_size: u64,
        blocks: I,
    ) -> Result<Self, DiskError>
    where
        I: IntoIterator<Item = (u64, B)>,
        B: AsRef<[u8]>,
    {
        let mut d = Self::create(path, disk_size)?;
        for (n, data) in blocks {
            d.write_block(n, data.as_ref())?;
        }
        d.flush()?;
        Ok(d)
    }

    /// Opens an existing δ file for a disk of `disk_size` bytes, checking every record and
    /// dropping a torn tail of unflushed records.
    pub fn open(path: &Path, disk_size: u64) -> Result<Self, DiskError> {
        Self::open_with(path, disk_size, true)
    }

    /// Opens an existing δ file only to read it (a snapshot's, copied into a new VM's δ):
    /// checked as [`Delta::open`] does, but the file is opened read-only and a torn tail is
    /// skipped, not truncated. Writing to the result fails.
    pub fn open_read_only(path: &Path, disk_size: u64) -> Result<Self, DiskError> {
        Self::open_with(path, disk_size, false)
    }

    fn open_with(path: &Path, disk_size: u64, writable: bool) -> Result<Self, DiskError> {
        Self::check_size(disk_size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_err("open the disk delta file"))?;
        let len = file
            .metadata()
            .map_err(io_err("stat the disk delta file"))?
            .len();
        let header = [0, HEADER_SLOT]
            .iter()
            .filter_map(|&at| {
                let mut b = [0u8; HEADER_LEN];
                file.read_exact_at(&mut b, at).ok()?;
                let h = layout::Header::new_checked(&b[..]).ok()?;
                Some(layout::HeaderRepr::parse(&h))
            })
            .max_by_key(|h| h.seq)
            .ok_or_else(|| DiskError::NotDelta(path.to_owned()))?;
        if header.version != DELTA_VERSION {
            return Err(DiskError::Version(header.version));
        }
        if header.block_size as usize != BLOCK_SIZE {
            return Err(DiskError::BlockSize(header.block_size));
        }
        if header.disk_size != disk_size {
            return Err(DiskError::DiskSize {
                found: header.disk_size,
                expected: disk_size,
            });
        }
        let blocks = disk_size.div_ceil(BS);
        let in_file = len.saturating_sub(RECORDS_START) / RECORD_LEN;
        let mut record = vec![0u8; layout::RECORD_LEN];
        let mut index = BTreeMap::new();
        let mut slots = 0;
        while slots < in_file {
            let ok = file
                .read_exact_at(&mut record, record_offset(slots))
                .is_ok();
            let block = Record::new_checked(&record[..]).ok().map(|r| r.block());
            match block.filter(|_| ok) {
                Some(block) if block < blocks => {
                    index.insert(block, slots);
                    slots += 1;
                }
                _ if slots < header.committed => return Err(DiskError::Corrupt(slots)),
                _ => break,
            }
        }
        if slots < header.committed {
            return Err(DiskError::Corrupt(slots));
        }
        let end = record_offset(slots);
        if len != end && writable {
            debug!(
                "disk delta {}: dropping {} bytes of unflushed tail",
                path.display(),
                len - end
            );
            file.set_len(end)
                .map_err(io_err("truncate the disk delta's torn tail"))?;
        }
        Ok(Delta {
            disk_size,
            store: Store::File(DeltaFile {
                file,
                path: path.to_owned(),
                index,
                slots,
                committed: header.committed,
                seq: header.seq,
                record,
            }),
            written: None,
        })
    }

    /// Size of the disk this δ belongs to, in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of blocks in the δ.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Memory(m) => m.len(),
            Store::File(f) => f.index.len(),
        }
    }

    /// True when the δ holds no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether block `n` is in the δ.
    pub fn contains(&self, n: u64) -> bool {
        match &self.store {
            Store::Memory(m) => m.contains_key(&n),
            Store::File(f) => f.index.contains_key(&n),
        }
    }

    /// Block numbers in the δ, ascending.
    pub fn block_numbers(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match &self.store {
            Store::Memory(m) => Box::new(m.keys().copied()),
            Store::File(f) => Box::new(f.index.keys().copied()),
        }
    }

    /// Every δ block with its data, ascending: the disk part of a VM overlay.
    pub fn delta_blocks(&self) -> Box<dyn Iterator<Item = Result<DeltaBlock<'_>, DiskError>> + '_> {
        match &self.store {
            Store::Memory(m) => Box::new(m.iter().map(|(&n, d)| Ok((n, Cow::Borrowed(&d[..]))))),
            Store::File(f) => Box::new(f.index.keys().map(move |&n| {
                let mut data = vec![0u8; BLOCK_SIZE];
                self.read_block(n, 0, &mut data)?;
                Ok((n, Cow::Owned(data)))
            })),
        }
    }

    /// Reads `buf.len()` bytes of block `n` from `offset` within it; `Ok(false)` when the
    /// block is not in the δ.
    pub fn read_block(&self, n: u64, offset: usize, buf: &mut [u8]) -> Result<bool, DiskError> {
        let end = offset.checked_add(buf.len()).filter(|&e| e <= BLOCK_SIZE);
        let Some(end) = end else {
            return Err(DiskError::BlockLen(offset.saturating_add(buf.len())));
        };
        match &self.store {
            Store::Memory(m) => match m.get(&n) {
                Some(data) => {
                    buf.copy_from_slice(&data[offset..end]);
                    Ok(true)
                }
                None => Ok(false),
            },
            Store::File(f) => match f.index.get(&n) {
                Some(&slot) => {
                    f.file
                        .read_exact_at(buf, record_data_offset(slot) + offset as u64)
                        .map_err(io_err("read the disk delta"))?;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }

    /// Stores block `n` (exactly [`BLOCK_SIZE`] bytes).
    pub fn write_block(&mut self, n: u64, data: &[u8]) -> Result<(), DiskError> {
        if data.len() != BLOCK_SIZE {
            return Err(DiskError::BlockLen(data.len()));
        }
        let blocks = self.disk_size.div_ceil(BS);
        if n >= blocks {
            return Err(DiskError::BlockRange { block: n, blocks });
        }
        if let Some(w) = &mut self.written {
            w.insert(n);
        }
        match &mut self.store {
            Store::Memory(m) => {
                match m.get_mut(&n) {
                    Some(b) => b.copy_from_slice(data),
                    None => {
                        m.insert(n, data.into());
                    }
                }
                Ok(())
            }
            Store::File(f) => {
                f.append(n, data)?;
                if f.slots >= 2 * f.index.len() as u64 + COMPACT_SLACK {
                    f.compact(self.disk_size)?;
                }
                Ok(())
            }
        }
    }

    /// Starts (`true`) or stops recording which blocks are written (a handoff sends the blocks
    /// written while it runs); starting forgets earlier records.
    pub fn track_writes(&mut self, on: bool) {
        self.written = on.then(Default::default);
    }

    /// The blocks written since tracking started or since the last call, ascending.
    pub fn take_written(&mut self) -> Vec<u64> {
        self.written
            .as_mut()
            .map(|w| std::mem::take(w).into_iter().collect())
            .unwrap_or_default()
    }

    /// Makes every write so far durable (file-backed δ; a no-op in memory).
    pub fn flush(&mut self) -> Result<(), DiskError> {
        match &mut self.store {
            Store::Memory(_) => Ok(()),
            Store::File(f) => f.commit(self.disk_size),
        }
    }

    /// The δ file's path, if file-backed.
    pub fn path(&self) -> Option<&Path> {
        match &self.store {
            Store::Memory(_) => None,
            Store::File(f) => Some(&f.path),
        }
    }
}

/// Best effort: makes a rename or create in `path`'s directory durable.
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!("cannot sync directory {}: {e}", dir.display());
    }
}

impl DeltaFile {
    fn write_header(&mut self, disk_size: u64, seq: u64, committed: u64) -> Result<(), DiskError> {
        let h = layout::HeaderRepr {
            version: DELTA_VERSION,
            block_size: BLOCK_SIZE as u32,
            disk_size,
            seq,
            committed,
        };
        self.file
            .write_all_at(&h.to_bytes(), layout::header_offset(seq))
            .map_err(io_err("write the disk delta header"))
    }

    fn append(&mut self, n: u64, data: &[u8]) -> Result<(), DiskError> {
        Record::new_unchecked(&mut self.record[..]).emit(n, data);
        self.file
            .write_all_at(&self.record, record_offset(self.slots))
            .map_err(io_err("write the disk delta"))?;
        self.index.insert(n, self.slots);
        self.slots += 1;
        Ok(())
    }

    /// Records → disk, then a header that commits them → disk.
    fn commit(&mut self, disk_size: u64) -> Result<(), DiskError> {
        if self.committed == self.slots {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(io_err("sync the disk delta"))?;
        let seq = self.seq + 1;
        self.write_header(disk_size, seq, self.slots)?;
        self.file
            .sync_data()
            .map_err(io_err("sync the disk delta header"))?;
        self.seq = seq;
        self.committed = self.slots;
        Ok(())
    }

    /// Rewrites the log with live records only (this also commits everything).
    fn compact(&mut self, disk_size: u64) -> Result<(), DiskError> {
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp_path = PathBuf::from(tmp_name);
        let mut new = DeltaFile {
            file: OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp_path)
                .map_err(io_err("create the compacted disk delta"))?,
            path: self.path.clone(),
            index: BTreeMap::new(),
            slots: 0,
            committed: 0,
            seq: 0,
            record: vec![0; layout::RECORD_LEN],
        };
        let mut data = vec![0u8; BLOCK_SIZE];
        for (&n, &slot) in &self.index {
            self.file
                .read_exact_at(&mut data, record_data_offset(slot))
                .map_err(io_err("read the disk delta"))?;
            new.append(n, &data)?;
        }
        new.write_header(disk_size, 0, new.slots)?;
        new.write_header(disk_size, 1, new.slots)?;
        new.seq = 1;
        new.committed = new.slots;
        new.file
            .sync_all()
            .map_err(io_err("sync the compacted disk delta"))?;
        std::fs::rename(&tmp_path, &self.path)
            .map_err(io_err("replace the disk delta by its compacted copy"))?;
        sync_parent(&self.path);
        debug!(
            "disk delta {}: compacted {} records to {}",
            self.path.display(),
            self.slots,
            new.slots
        );
        *self = new;
        Ok(())
    }
}

/// The copy-on-write disk: a read-only base under a [`Delta`].
#[derive(Debug)]
pub struct CowDisk {
    base: Option<File>,
    base_len: u64,
    delta: Delta,
}

impl CowDisk {
    /// Opens a raw base image read-only.
    pub fn open_base(path: &Path) -> Result<File, DiskError> {
        File::open(path).map_err(io_err("open the base disk image"))
    }

    /// The disk size that covers a base image of `len` bytes (rounded up to a sector).
    pub fn size_for_base(len: u64) -> u64 {
        len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE
    }

    /// A disk of `delta.disk_size()` bytes over `base` (`None`: a blank disk). The base is
    /// only ever read; bytes past its end read as zeros.
    pub fn new(base: Option<File>, delta: Delta) -> Result<Self, DiskError> {
        let base_len = match &base {
            Some(f) => f
                .metadata()
                .map_err(io_err("stat the base disk image"))?
                .len(),
            None => 0,
        };
        Ok(CowDisk {
            base,
            base_len,
            delta,
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.delta.disk_size
    }

    /// The δ layer.
    pub fn delta(&self) -> &Delta {
        &self.delta
    }

    /// The δ layer, mutably (e.g. to flush it).
    pub fn delta_mut(&mut self) -> &mut Delta {
        &mut self.delta
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        let size = self.size();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DiskError::Range {
                offset,
                len: len as u64,
                size,
            }),
        }
    }

    /// Reads part of block `n` from the base (zeros past its end).
    fn read_base(&self, n: u64, offset: usize, buf: &mut [u8]) -> Result<(), DiskError> {
        let at = n * BS + offset as u64;
        let have = self.base_len.saturating_sub(at).min(buf.len() as u64) as usize;
        let (from_base, zeros) = buf.split_at_mut(have);
        if let Some(base) = &self.base {
            if !from_base.is_empty() {
                base.read_exact_at(from_base, at)
                    .map_err(io_err("read the base disk image"))?;
            }
        }
        zeros.fill(0);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (n, within) = (pos / BS, (pos % BS) as usize);
            let len = (BLOCK_SIZE - within).min(buf.len() - done);
            let part = &mut buf[done..done + len];
            if !self.delta.read_block(n, within, part)? {
                self.read_base(n, within, part)?;
            }
            done += len;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the δ.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_range(offset, data.len())?;
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let (n, within) = (pos / BS, (pos % BS) as usize);
            let len = (BLOCK_SIZE - within).min(data.len() - done);
            if len == BLOCK_SIZE {
                self.delta.write_block(n, &data[done..done + len])?;
            } else {
                if !self.delta.read_block(n, 0, &mut block)? {
                    self.read_base(n, 0, &mut block)?;
                }
                block[within..within + len].copy_from_slice(&data[done..done + len]);
                self.delta.write_block(n, &block)?;
            }
            done += len;
        }
        Ok(())
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.delta.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A δ file of a 64-block disk in `dir`: each batch of `(block, byte)` written, then
    /// flushed (the last batch only with `flush_last`).
    fn delta_file(dir: &TempDir, batches: &[&[(u64, u8)]], flush_last: bool) -> PathBuf {
        let path = dir.0.join("disk.delta");
        let mut d = Delta::create(&path, 64 * BS).unwrap();
        for (i, b) in batches.iter().enumerate() {
            fill(&mut d, b);
            if flush_last || i + 1 < batches.len() {
                d.flush().unwrap();
            }
        }
        path
    }

    /// Overwrites `bytes` at `offset` of the file at `path`.
    fn poke(path: &Path, offset: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    /// Writes block `n` full of byte `v` for each `(n, v)`.
    fn fill(d: &mut Delta, blocks: &[(u64, u8)]) {
        for &(n, v) in blocks {
            d.write_block(n, &[v; BLOCK_SIZE]).unwrap();
        }
    }
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "vmm-virtio-disk-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn base_file(dir: &Path, bytes: &[u8]) -> File {
        let p = dir.join("base.raw");
        File::create(&p).unwrap().write_all(bytes).unwrap();
        CowDisk::open_base(&p).unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn reads_base_then_zeros_and_writes_go_to_the_delta_only() {
        let dir = TempDir::new();
        let base = pattern(6000);
        let mut disk = CowDisk::new(
            Some(base_file(&dir.0, &base)),
            Delta::in_memory(16384).unwrap(),
        )
        .unwrap();
        let mut buf = vec![0u8; 8192];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..6000], &base[..]);
        assert!(buf[6000..].iter().all(|&b| b == 0));

        // A partial write inside block 0 and one straddling blocks 1 and 2.
        disk.write_at(100, b"hello").unwrap();
        disk.write_at(8190, &[0xaa; 4]).unwrap();
        assert_eq!(disk.delta().block_numbers().collect::<Vec<_>>(), [0, 1, 2]);
        disk.read_at(0, &mut buf).unwrap();
        let mut want = base.clone();
        want.resize(8192, 0);
        want[100..105].copy_from_slice(b"hello");
        want[8190..8192].copy_from_slice(&[0xaa; 2]);
        assert_eq!(buf, want);
        let mut tail = [0u8; 4];
        disk.read_at(8192, &mut tail).unwrap();
        assert_eq!(tail, [0xaa, 0xaa, 0, 0]);
        // The base file is untouched.
        assert_eq!(std::fs::read(dir.0.join("base.raw")).unwrap(), base);
        // Out of range.
        assert!(matches!(
            disk.read_at(16380, &mut [0u8; 8]),
            Err(DiskError::Range { .. })
        ));
        assert!(disk.write_at(u64::MAX, &[1]).is_err());
    }

    #[test]
    fn exports_and_imports_blocks() {
        let mut disk = CowDisk::new(None, Delta::in_memory(8 * BS).unwrap()).unwrap();
        disk.write_at(3 * BS, &[5u8; BLOCK_SIZE]).unwrap();
        disk.write_at(BS + 1, &[6u8; 2]).unwrap();
        let blocks: Vec<(u64, Vec<u8>)> = disk
            .delta()
            .delta_blocks()
            .map(|r| r.map(|(n, d)| (n, d.into_owned())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].0, 1);
        assert_eq!(blocks[1], (3, vec![5u8; BLOCK_SIZE]));
        let copy = CowDisk::new(None, Delta::from_blocks(8 * BS, blocks.clone()).unwrap()).unwrap();
        let (mut a, mut b) = (vec![0u8; 8 * BLOCK_SIZE], vec![0u8; 8 * BLOCK_SIZE]);
        disk.read_at(0, &mut a).unwrap();
        copy.read_at(0, &mut b).unwrap();
        assert_eq!(a, b);
        assert!(matches!(
            Delta::from_blocks(8 * BS, [(8u64, vec![0u8; BLOCK_SIZE])]),
            Err(DiskError::BlockRange { block: 8, .. })
        ));
        assert!(matches!(
            Delta::from_blocks(8 * BS, [(0u64, vec![0u8; 10])]),
            Err(DiskError::BlockLen(10))
        ));
        assert!(matches!(Delta::in_memory(1000), Err(DiskError::Size(1000))));
    }

    #[test]
    fn file_delta_survives_reopen_and_rejects_other_disks() {
        let dir = TempDir::new();
        let path = delta_file(&dir, &[&[(7, 7), (2, 2), (7, 8)]], true);
        let d = Delta::open(&path, 64 * BS).unwrap();
        assert_eq!(d.block_numbers().collect::<Vec<_>>(), [2, 7]);
        let mut b = vec![0u8; BLOCK_SIZE];
        assert!(d.read_block(7, 0, &mut b).unwrap());
        assert_eq!(b, vec![8u8; BLOCK_SIZE]);
        assert!(!d.read_block(3, 0, &mut b).unwrap());
        drop(d);
        assert!(matches!(
            Delta::open(&path, 32 * BS),
            Err(DiskError::DiskSize { .. })
        ));
        std::fs::write(dir.0.join("junk"), [0u8; 2000]).unwrap();
        assert!(matches!(
            Delta::open(&dir.0.join("junk"), 64 * BS),
            Err(DiskError::NotDelta(_))
        ));
    }

    #[test]
    fn unflushed_torn_tail_is_dropped_but_flushed_corruption_is_an_error() {
        let dir = TempDir::new();
        let path = delta_file(&dir, &[&[(1, 1)], &[(2, 2), (3, 3)]], false);
        // Tear the last (unflushed) record in half and damage the one before it.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(RECORDS_START + 2 * RECORD_LEN + 100).unwrap();
        f.write_all_at(&[0xff], RECORDS_START + RECORD_LEN + 50)
            .unwrap();
        drop(f);
        // Read-only: the same blocks, and the file is left exactly as it was.
        let ro = Delta::open_read_only(&path, 64 * BS).unwrap();
        assert_eq!(ro.block_numbers().collect::<Vec<_>>(), [1]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            RECORDS_START + 2 * RECORD_LEN + 100
        );
        drop(ro);
        let d = Delta::open(&path, 64 * BS).unwrap();
        assert_eq!(d.block_numbers().collect::<Vec<_>>(), [1]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            RECORDS_START + RECORD_LEN
        );
        drop(d);
        // Now damage the flushed record: refused, not silently dropped.
        poke(&path, RECORDS_START + 30, &[0xff]);
        assert!(matches!(
            Delta::open(&path, 64 * BS),
            Err(DiskError::Corrupt(0))
        ));
        // A file cut below the committed records is refused too.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(RECORDS_START).unwrap();
        drop(f);
        assert!(matches!(
            Delta::open(&path, 64 * BS),
            Err(DiskError::Corrupt(0))
        ));
    }

    #[test]
    fn torn_header_write_falls_back_to_the_other_copy() {
        let dir = TempDir::new();
        // Two flushes: sequence 2 in header copy A, sequence 3 in copy B.
        let path = delta_file(&dir, &[&[(1, 1)], &[(2, 2)]], true);
        poke(&path, HEADER_SLOT + 20, &[0u8; 8]);
        // Copy A commits one record; the second is a valid uncommitted one and is kept.
        let d = Delta::open(&path, 64 * BS).unwrap();
        assert_eq!(d.block_numbers().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn overwrites_are_compacted() {
        let dir = TempDir::new();
        let path = dir.0.join("disk.delta");
        let mut d = Delta::create(&path, 64 * BS).unwrap();
        for i in 0..(COMPACT_SLACK + 10) {
            d.write_block(i % 3, &[i as u8; BLOCK_SIZE]).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len < RECORDS_START + 20 * RECORD_LEN, "file is {len} bytes");
        assert!(!dir.0.join("disk.delta.tmp").exists());
        d.flush().unwrap();
        drop(d);
        let d = Delta::open(&path, 64 * BS).unwrap();
        let mut b = vec![0u8; BLOCK_SIZE];
        let last = COMPACT_SLACK + 9;
        assert!(d.read_block(last % 3, 0, &mut b).unwrap());
        assert_eq!(b[0], last as u8);
        // Export from a file δ, import into a new file δ.
        let copy_path = dir.0.join("copy.delta");
        let blocks: Vec<_> = d.delta_blocks().collect::<Result<_, _>>().unwrap();
        let copy = Delta::create_from_blocks(&copy_path, 64 * BS, blocks).unwrap();
        drop(copy);
        let copy = Delta::open(&copy_path, 64 * BS).unwrap();
        assert_eq!(copy.len(), 3);
    }
}
