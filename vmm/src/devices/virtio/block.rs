//! virtio-blk over a [`CowDisk`]: one request queue; IN, OUT, FLUSH and GET_ID requests.
//!
//! A request is a readable 16-byte header (`type: u32, reserved: u32, sector: u64`), data
//! buffers (device-writable for IN, readable for OUT), and a device-writable status byte at the
//! very end. Anything that does not fit that shape — header too short or writable, data in the
//! wrong direction, sectors past the end, lengths not a whole number of sectors — completes
//! with `VIRTIO_BLK_S_IOERR`; unknown types with `VIRTIO_BLK_S_UNSUPP`. A chain without a
//! writable byte cannot carry a status and goes back with length 0. Data moves through a fixed
//! 64 KiB buffer, so a request's size never decides how much the VMM allocates.

use crate::vstate::memory::GuestMemoryMmap;
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::{Address, Bytes};

use super::disk::{CowDisk, SECTOR_SIZE};
use super::queue::{read_bufs, segments, write_bufs, Chain, Popped};
use super::{DeviceState, QueueIo, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const HEADER_LEN: u64 = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
const SCRATCH_LEN: usize = 64 * 1024;
/// Config space: capacity (u64), size_max (u32), seg_max (u32), geometry (4 bytes),
/// blk_size (u32).
const CONFIG_LEN: usize = 24;

/// Saved state of a block device: what the guest was told, checked against the new disk on
/// restore. The disk's contents are saved separately (its δ).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether the disk was read-only.
    pub read_only: bool,
}

/// A disk's identity in a snapshot: what it sits on (its δ blocks are saved beside the
/// state). Field order is the state file's encoding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSnapshot {
    /// The raw base image (absolute path), if any.
    pub base: Option<std::path::PathBuf>,
    /// Disk size in bytes.
    pub size: u64,
    /// Read-only.
    pub read_only: bool,
}

/// A virtio-blk device.
pub struct Block {
    disk: CowDisk,
    read_only: bool,
    id: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A block device over `disk`; `id` (at most 20 bytes are used) answers GET_ID.
    pub fn new(disk: CowDisk, read_only: bool, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(disk.size() / SECTOR_SIZE).to_le_bytes());
        // seg_max: leave room for the header and status descriptors.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Block {
            disk,
            read_only,
            id: id_bytes,
            config,
            scratch: vec![0; SCRATCH_LEN],
        }
    }

    /// The disk (e.g. to export its δ).
    pub fn disk(&self) -> &CowDisk {
        &self.disk
    }

    /// The disk, mutably.
    pub fn disk_mut(&mut self) -> &mut CowDisk {
        &mut self.disk
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Serves one request; returns the bytes written into the chain (0 when it has no room
    /// for a status byte).
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> u32 {
        let writable = chain.writable_len();
        let Some(status_at) = writable.checked_sub(1) else {
            debug!("virtio-blk: request {} has no status byte", chain.head);
            return 0;
        };
        let (status, written) = match self.execute(mem, chain, status_at) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(status) => (status, 0),
        };
        if !write_bufs(mem, &chain.writable, status_at, &[status as u8]) {
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    /// Executes a request whose device-writable area holds `data_room` bytes before the status
    /// byte; returns the data bytes written for the guest, or the failure status.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &Chain,
        data_room: u64,
    ) -> Result<u64, u32> {
        let mut header = [0u8; HEADER_LEN as usize];
        if chain.readable_len() < HEADER_LEN || !read_bufs(mem, &chain.readable, 0, &mut header) {
            debug!("virtio-blk: request {} has no readable header", chain.head);
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match req_type {
            VIRTIO_BLK_T_IN => {
                if chain.readable_len() != HEADER_LEN {
                    debug!("virtio-blk: read request {} has readable data", chain.head);
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let offset = self.range(sector, data_room)?;
                self.transfer(mem, chain, offset, data_room, Direction::ToGuest)?;
                Ok(data_room)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    debug!("virtio-blk: write to a read-only disk");
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                if data_room != 0 {
                    debug!("virtio-blk: write request {} has writable data", chain.head);
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let len = chain.readable_len() - HEADER_LEN;
                let offset = self.range(sector, len)?;
                self.transfer(mem, chain, offset, len, Direction::ToDisk)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.disk.flush().map_err(|e| {
                    warn!("virtio-blk: flush failed: {e}");
                    VIRTIO_BLK_S_IOERR
                })?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_room.min(ID_LEN as u64) as usize;
                if !write_bufs(mem, &chain.writable, 0, &self.id[..n]) {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                Ok(n as u64)
            }
            other => {
                debug!("virtio-blk: unsupported request type {other}");
                Err(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors on the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, u32> {
        let ok = len % SECTOR_SIZE == 0;
        let offset = sector.checked_mul(SECTOR_SIZE);
        match offset.and_then(|o| o.checked_add(len)) {
            Some(end) if ok && end <= self.disk.size() => Ok(end - len),
            _ => {
                debug!("virtio-blk: bad range: sector {sector}, {len} bytes");
                Err(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    /// Copies through the scratch buffer: disk `[offset, offset + len)` → the chain's
    /// writable buffers ([`Direction::ToGuest`]), or the chain's readable data after the
    /// header → disk `[offset, offset + len)` ([`Direction::ToDisk`]).
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &Chain,
        offset: u64,
        len: u64,
        dir: Direction,
    ) -> Result<(), u32> {
        let (bufs, skip) = match dir {
            Direction::ToGuest => (&chain.writable, 0),
            Direction::ToDisk => (&chain.readable, HEADER_LEN),
        };
        let mut pos = offset;
        for (addr, n) in segments(bufs, skip, len) {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(SCRATCH_LEN);
                let buf = &mut self.scratch[..k];
                let at = addr.checked_add(done as u64).ok_or(VIRTIO_BLK_S_IOERR)?;
                match dir {
                    Direction::ToGuest => {
                        self.disk.read_at(pos, buf).map_err(|e| {
                            warn!("virtio-blk: read failed: {e}");
                            VIRTIO_BLK_S_IOERR
                        })?;
                        mem.write_slice(buf, at).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                    }
                    Direction::ToDisk => {
                        mem.read_slice(buf, at).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                        self.disk.write_at(pos, buf).map_err(|e| {
                            warn!("virtio-blk: write failed: {e}");
                            VIRTIO_BLK_S_IOERR
                        })?;
                    }
                }
                done += k;
                pos += k as u64;
            }
        }
        Ok(())
    }
}

/// Which way [`Block::transfer`] copies.
#[derive(Clone, Copy)]
enum Direction {
    /// Disk → guest (a read request).
    ToGuest,
    /// Guest → disk (a write request).
    ToDisk,
}

impl VirtioDevice for Block {
    const DEVICE_TYPE: u32 = VIRTIO_ID_BLOCK;

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(&mut self, index: usize, io: &mut QueueIo<'_>) {
        if index != 0 {
            return;
        }
        while let Some(popped) = io.pop(0) {
            match popped {
                Popped::Bad { head, error } => io.reject(0, head, &error),
                Popped::Chain(chain) => {
                    let len = self.handle(io.mem(), &chain);
                    io.add_used(0, chain.head, len);
                }
            }
        }
    }

    fn reset(&mut self) {}

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            capacity: self.capacity(),
            read_only: self.read_only,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError> {
        let DeviceState::Block(s) = state else {
            return Err(VirtioError::DeviceState("not a block device state".into()));
        };
        if s.capacity != self.capacity() || s.read_only != self.read_only {
            return Err(VirtioError::DeviceState(format!(
                "saved disk had {} sectors{}, this one has {}{}",
                s.capacity,
                if s.read_only { " (read-only)" } else { "" },
                self.capacity(),
                if self.read_only { " (read-only)" } else { "" },
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::disk::{Delta, BLOCK_SIZE};
    use crate::devices::virtio::testing::{guest_memory, GuestQueue, F_INDIRECT, F_WRITE};
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    const DISK_SIZE: u64 = 64 * 1024;
    const HDR: u64 = 0x2_0000;
    const DATA: u64 = 0x3_0000;
    const STATUS: u64 = 0x2_1000;

    struct Rig {
        mem: GuestMemoryMmap,
        blk: Block,
        queues: [Queue; 1],
    }

    impl Rig {
        fn new(read_only: bool) -> Self {
            let base: Vec<u8> = (0..DISK_SIZE / 2).map(|i| (i % 251) as u8).collect();
            let delta =
                Delta::from_blocks(DISK_SIZE, [(15u64, base[..BLOCK_SIZE].to_vec())]).unwrap();
            let disk = CowDisk::new(Some(base_file(&base)), delta).unwrap();
            let mem = guest_memory();
            let queues = [GuestQueue::new(&mem, 0x1_0000, 16).queue()];
            Rig {
                mem,
                blk: Block::new(disk, read_only, "cloudlet-disk-0"),
                queues,
            }
        }

        fn gq(&self) -> GuestQueue {
            GuestQueue::new(&self.mem, 0x1_0000, 16)
        }

        fn run(&mut self) -> u32 {
            let mut io = QueueIo::new(&self.mem, &mut self.queues);
            self.blk.process_queue(0, &mut io);
            io.used_mask()
        }

        fn header(&self, req: u32, sector: u64) {
            self.mem.write_obj(req, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        /// Posts request `req` at `sector` as `chain` (header first), runs the device and
        /// returns the status it wrote.
        fn request(
            &mut self,
            gq: &mut GuestQueue,
            req: u32,
            sector: u64,
            chain: &[(u64, u32, bool)],
        ) -> u8 {
            self.header(req, sector);
            gq.add_chain(chain);
            self.run();
            self.status()
        }

        /// [`Rig::request`] with the usual chain: header, `len` data bytes at `DATA`, status.
        fn data_request(
            &mut self,
            gq: &mut GuestQueue,
            req: u32,
            sector: u64,
            len: u32,
            writable: bool,
        ) -> u8 {
            let chain = [(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)];
            self.request(gq, req, sector, &chain)
        }

        fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }
    }

    /// A base image file (unlinked right away; the handle keeps it).
    fn base_file(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!(
            "vmm-virtio-blk-base-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let f = CowDisk::open_base(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn config_and_features() {
        let rig = Rig::new(false);
        let mut cap = [0u8; 8];
        rig.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
        let mut past = [0xffu8; 4];
        rig.blk.read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
        assert_ne!(rig.blk.features() & VIRTIO_F_VERSION_1, 0);
        assert_eq!(rig.blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(Rig::new(true).blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn write_then_read_back_across_descriptors() {
        let mut rig = Rig::new(false);
        let mut gq = rig.gq();
        // OUT: 1 KiB at sector 3, data split over two descriptors.
        let payload: Vec<u8> = (0..1024).map(|i| (i * 13) as u8).collect();
        rig.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        rig.header(VIRTIO_BLK_T_OUT, 3);
        gq.add_chain(&[
            (HDR, 16, false),
            (DATA, 100, false),
            (DATA + 100, 924, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(rig.run(), 1);
        assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(gq.used_elem(0), (0, 1));
        assert_eq!(
            rig.blk.disk().delta().block_numbers().collect::<Vec<_>>(),
            [0, 15]
        );

        // IN: the first 8 KiB into three buffers, one of them straddling the write.
        rig.header(VIRTIO_BLK_T_IN, 0);
        let head = gq.add_chain(&[
            (HDR, 16, false),
            (0x4_0000, 1000, true),
            (0x5_0000, 7192, true),
            (STATUS, 1, true),
        ]);
        rig.run();
        assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(gq.used_elem(1), (u32::from(head), 8192 + 1));
        let mut got = rig.bytes(0x4_0000, 1000);
        got.extend(rig.bytes(0x5_0000, 7192));
        let mut want: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        want[1536..2560].copy_from_slice(&payload);
        assert_eq!(got, want);
    }

    #[test]
    fn reads_past_the_base_are_zero_and_delta_blocks_win() {
        let mut rig = Rig::new(false);
        let mut gq = rig.gq();
        rig.mem
            .write_slice(&[0x55; 4096], GuestAddress(0x4_0000))
            .unwrap();
        assert_eq!(
            rig.request(
                &mut gq,
                VIRTIO_BLK_T_IN,
                (DISK_SIZE - 4096) / 512,
                &[(HDR, 16, false), (0x4_0000, 4096, true), (STATUS, 1, true)]
            ),
            0
        );
        // Block 15 is past the 32 KiB base but is in the δ.
        let want: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        assert_eq!(rig.bytes(0x4_0000, 4096), want);
        rig.header(VIRTIO_BLK_T_IN, (DISK_SIZE - 8192) / 512);
        gq.add_chain(&[(HDR, 16, false), (0x4_0000, 4096, true), (STATUS, 1, true)]);
        rig.run();
        assert_eq!(rig.bytes(0x4_0000, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let mut rig = Rig::new(false);
        let mut gq = rig.gq();
        assert_eq!(
            rig.request(
                &mut gq,
                VIRTIO_BLK_T_FLUSH,
                0,
                &[(HDR, 16, false), (STATUS, 1, true)]
            ),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(gq.used_elem(0).1, 1);

        assert_eq!(
            rig.data_request(&mut gq, VIRTIO_BLK_T_GET_ID, 0, 20, true),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(gq.used_elem(1).1, 21);
        assert_eq!(&rig.bytes(DATA, 20)[..15], b"cloudlet-disk-0");

        assert_eq!(
            rig.data_request(&mut gq, 11, 0, 16, false),
            VIRTIO_BLK_S_UNSUPP as u8
        );
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut rig = Rig::new(true);
        let mut gq = rig.gq();
        assert_eq!(
            rig.data_request(&mut gq, VIRTIO_BLK_T_OUT, 0, 512, false),
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(rig.blk.disk().delta().len(), 1, "only the preloaded block");
        // Reads still work.
        assert_eq!(
            rig.data_request(&mut gq, VIRTIO_BLK_T_IN, 0, 512, true),
            VIRTIO_BLK_S_OK as u8
        );
    }

    #[test]
    fn bad_ranges_are_io_errors() {
        let mut rig = Rig::new(false);
        let mut gq = rig.gq();
        let cases: [(u32, u64, u32); 5] = [
            (VIRTIO_BLK_T_IN, DISK_SIZE / 512, 512), // first sector past the end
            (VIRTIO_BLK_T_IN, DISK_SIZE / 512 - 1, 1024), // runs past the end
            (VIRTIO_BLK_T_OUT, u64::MAX, 512),       // sector * 512 overflows
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, 1024), // offset + len overflows
            (VIRTIO_BLK_T_IN, 0, 100),               // not whole sectors
        ];
        for (i, (req, sector, len)) in cases.into_iter().enumerate() {
            rig.header(req, sector);
            let writable = req == VIRTIO_BLK_T_IN;
            gq.add_chain(&[(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)]);
            rig.run();
            assert_eq!(rig.status(), VIRTIO_BLK_S_IOERR as u8, "case {i}");
            assert_eq!(gq.used_elem(i as u16).1, 1, "case {i}");
        }
        // A request larger than guest memory could hold, against a tiny disk.
        assert_eq!(
            rig.request(
                &mut gq,
                VIRTIO_BLK_T_IN,
                0,
                &[
                    (HDR, 16, false),
                    (0x8_0000, 0x8_0000, true),
                    (STATUS, 1, true),
                ]
            ),
            VIRTIO_BLK_S_IOERR as u8
        );
    }

    #[test]
    fn malformed_requests_get_io_errors() {
        let mut rig = Rig::new(false);
        let mut gq = rig.gq();
        // (what, request, header length, header writable, data writable); an OUT with
        // device-writable data writes nothing to the disk.
        let cases = [
            ("header device-writable", VIRTIO_BLK_T_IN, 16, true, true),
            ("header too short", VIRTIO_BLK_T_IN, 8, false, true),
            (
                "IN with device-readable data",
                VIRTIO_BLK_T_IN,
                16,
                false,
                false,
            ),
            (
                "OUT with device-writable data",
                VIRTIO_BLK_T_OUT,
                16,
                false,
                true,
            ),
        ];
        for (what, req, hdr_len, hdr_writable, data_writable) in cases {
            let chain = [
                (HDR, hdr_len, hdr_writable),
                (DATA, 512, data_writable),
                (STATUS, 1, true),
            ];
            let status = rig.request(&mut gq, req, 0, &chain);
            assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "{what}");
        }
        assert_eq!(rig.blk.disk().delta().len(), 1);
        assert_eq!(gq.used_idx(), 4);
    }

    #[test]
    fn broken_chains_are_returned_empty_and_processing_goes_on() {
        let mut rig = Rig::new(false);
        let mut gq = rig.gq();
        rig.header(VIRTIO_BLK_T_IN, 0);
        // 1. No status byte at all.
        gq.add_chain(&[(HDR, 16, false), (DATA, 512, false)]);
        // 2. Status byte device-readable after writable data.
        gq.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
        // 3. A loop.
        gq.set_desc(13, HDR, 16, 1, 14);
        gq.set_desc(14, DATA, 512, 1 | F_WRITE, 13);
        gq.publish(13);
        // 4. A buffer outside guest memory, with a huge length.
        gq.add_chain(&[
            (HDR, 16, false),
            (0x1000, 0xffff_0000, true),
            (STATUS, 1, true),
        ]);
        // 5. Head index out of range: cannot even be returned.
        gq.publish(300);
        // 6. A chain longer than the queue, through an indirect table of 40 descriptors.
        for i in 0..40u16 {
            let at = 0x6_0000 + 16 * u64::from(i);
            rig.mem.write_obj(DATA, GuestAddress(at)).unwrap();
            rig.mem.write_obj(16u32, GuestAddress(at + 8)).unwrap();
            rig.mem
                .write_obj(1u16 | F_WRITE, GuestAddress(at + 12))
                .unwrap();
            rig.mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
        }
        gq.set_desc(15, 0x6_0000, 40 * 16, F_INDIRECT, 0);
        gq.publish(15);
        // 7. Finally a good request, which must still be served.
        let good = gq.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        rig.run();
        assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(gq.used_idx(), 6);
        for i in 0..5 {
            assert_eq!(gq.used_elem(i).1, 0, "refused chain {i}");
        }
        assert_eq!(gq.used_elem(5), (u32::from(good), 513));
    }

    #[test]
    fn writes_reach_a_file_delta_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("vmm-virtio-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.delta");
        let disk = CowDisk::new(None, Delta::create(&path, DISK_SIZE).unwrap()).unwrap();
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 0x1_0000, 16);
        let mut queues = [gq.queue()];
        let mut blk = Block::new(disk, false, "");
        mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
        for (req, sector) in [(VIRTIO_BLK_T_OUT, 9u64), (VIRTIO_BLK_T_FLUSH, 0)] {
            mem.write_obj(req, GuestAddress(HDR)).unwrap();
            mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            if req == VIRTIO_BLK_T_OUT {
                gq.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
            } else {
                gq.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
            }
            let mut io = QueueIo::new(&mem, &mut queues);
            blk.process_queue(0, &mut io);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        }
        drop(blk);
        let disk = CowDisk::new(None, Delta::open(&path, DISK_SIZE).unwrap()).unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(9 * 512, &mut buf).unwrap();
        assert_eq!(buf, [0x77; 512]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_round_trip_checks_the_disk() {
        let rig = Rig::new(false);
        let state = rig.blk.save();
        let mut same = Rig::new(false).blk;
        same.restore(&state).unwrap();
        let mut ro = Rig::new(true).blk;
        assert!(ro.restore(&state).is_err());
        let net = DeviceState::Net(crate::devices::virtio::NetState { mac: [0; 6] });
        assert!(same.restore(&net).is_err());
    }
}
