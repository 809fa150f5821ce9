//! Which guest pages changed since a point in time, and which pages differ from the base.
//!
//! Two writers change guest RAM, and a handoff must see both:
//!
//! - **the guest**: KVM's dirty log. [`DirtyLog::start`] re-registers every memory slot with
//!   `KVM_MEM_LOG_DIRTY_PAGES`; [`DirtyLog::take`] reads (and so clears) each slot's log with
//!   `KVM_GET_DIRTY_LOG`; [`DirtyLog::stop`] (or dropping it) registers the slots without the
//!   flag again, so a failed handoff leaves the guest writing at full speed (a logged first
//!   write costs ~21 µs more here). `KVM_CLEAR_DIRTY_LOG`/manual protect would spread the
//!   re-protection over the round; the plain log clears as it reads, which is all a round needs.
//! - **the VMM**: virtio devices (block reads, received frames) and virtio-queue's used rings
//!   write guest memory from userspace, which KVM never logs. Guest memory carries vm-memory's
//!   `AtomicBitmap` (see [`crate::vstate::memory::GuestMemoryMmap`]): every write through
//!   vm-memory's API marks its pages. Chosen over hooks in each device because it covers every
//!   writer that goes through vm-memory, present and future, with no code in the devices; its
//!   cost is one atomic OR per page a device writes: measured here (release, vm-memory 0.18),
//!   a 16-byte `write_slice` 9.9 → 12.7 ns, a 4 KiB one unchanged within noise (~230 ns),
//!   against a virtio request's vCPU exit of microseconds. Synthesis writes through host
//!   pointers and `UFFDIO_COPY`, so it pays nothing. [`DirtyLog::take`] takes and clears these bits with KVM's.
//!   The lazy fill writes with `UFFDIO_COPY`, seen by neither: a handoff waits for the fill
//!   to complete before it reads the δ, so those pages are in round 0.
//!
//! The δ against the base (round 0, [`base_delta`]): the VM runs on the base's RAM mapped
//! `MAP_PRIVATE`, with anonymous mappings where synthesis rewrote pages. `/proc/self/maps`
//! says which parts of guest RAM are anonymous, `/proc/self/pagemap` which pages of the file
//! mapping were written (a written private file page becomes anonymous: present, without the
//! file bit). Only those pages, and the anonymous ones, are candidates; the rest is the base
//! by construction and is never read. A candidate is then read: zero, equal to the base page
//! at that place (not sent), or data.
//!
//! The base's other pages ([`BaseIndex`]): the non-zero pages of the base's memory file
//! (its data extents, found with `SEEK_DATA`/`SEEK_HOLE`: the file is sparse), by 128-bit
//! xxh3, so a page equal to one the base holds elsewhere is named, not sent. Built once per
//! handoff before round 0, while the VM runs: measured here on the bench's 256 MiB base with
//! 64 MiB of content (16 441 distinct pages, debug build), 23–26 ms with the file cached,
//! 62–79 ms with its pages dropped from the page cache.
//!
//! Page numbers are image pages: guest RAM regions back to back, as in the base's memory file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_dirty_log, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, MmapRegion};

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;
use xxhash_rust::xxh3::xxh3_128;

/// Bytes of a page.
pub const PAGE: usize = format::PAGE_SIZE;

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Re-registering a memory slot failed.
    #[error("failed to {0} dirty logging on memory slot {1}")]
    Slot(&'static str, u32, #[source] std::io::Error),
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("failed to read the dirty log of memory slot {0}")]
    Log(u32, #[source] std::io::Error),
    /// Reading this process's page tables or mappings failed.
    #[error("failed to read {0}")]
    Proc(&'static str, #[source] std::io::Error),
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    kvm_bindings::KVMIO,
    0x46,
    kvm_userspace_memory_region
);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, kvm_bindings::KVMIO, 0x42, kvm_dirty_log);

/// A set of image pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    /// An empty set for `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Adds page `p` (ignored past the end).
    pub fn insert(&mut self, p: u64) {
        if let Some(w) = self.words.get_mut((p / 64) as usize) {
            *w |= 1 << (p % 64);
        }
    }

    /// Whether page `p` is in the set.
    pub fn contains(&self, p: u64) -> bool {
        self.words
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// ORs `bits` (bit i = page `first + i`) into the set.
    fn or_at(&mut self, first: u64, bits: &[u64]) {
        for (i, &w) in bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                self.insert(first + i as u64 * 64 + b);
                w &= w - 1;
            }
        }
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True when no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    i as u64 * 64 + b
                })
            })
        })
    }
}

/// One memory slot as registered (slot i = region i).
#[derive(Clone, Copy, Debug)]
struct SlotInfo {
    slot: u32,
    gpa: u64,
    len: u64,
    host: u64,
    /// First image page of the slot.
    first_page: u64,
}

fn slots(mem: &GuestMemoryMmap) -> Vec<SlotInfo> {
    let mut first_page = 0;
    mem.iter()
        .enumerate()
        .map(|(i, r)| {
            let s = SlotInfo {
                slot: i as u32,
                gpa: r.start_addr().0,
                len: r.len(),
                host: r
                    .get_host_address(MemoryRegionAddress(0))
                    .expect("offset 0 is inside every region") as u64,
                first_page,
            };
            first_page += r.len() / PAGE as u64;
            s
        })
        .collect()
}

/// Pages of guest RAM.
pub fn mem_pages(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum::<u64>() / PAGE as u64
}

/// Dirty logging of a VM's memory slots (guest writes) and of the VMM's own writes.
#[derive(Debug)]
pub struct DirtyLog {
    vm: OwnedFd,
    mem: GuestMemoryMmap,
    slots: Vec<SlotInfo>,
    on: bool,
}

impl DirtyLog {
    /// Turns logging on for every slot of the VM `vm` (a duplicate of its fd) with memory
    /// `mem`, and forgets the VMM's earlier writes: from now on, every write is recorded.
    pub fn start(vm: OwnedFd, mem: &GuestMemoryMmap) -> Result<Self, DirtyError> {
        let mut log = DirtyLog {
            vm,
            mem: mem.clone(),
            slots: slots(mem),
            on: false,
        };
        for r in mem.iter() {
            bitmap(r).reset();
        }
        for s in log.slots.clone() {
            log.register(s, KVM_MEM_LOG_DIRTY_PAGES)
                .map_err(|e| DirtyError::Slot("start", s.slot, e))?;
            log.on = true;
        }
        Ok(log)
    }

    fn register(&self, s: SlotInfo, flags: u32) -> std::io::Result<()> {
        let r = kvm_userspace_memory_region {
            slot: s.slot,
            flags,
            guest_phys_addr: s.gpa,
            memory_size: s.len,
            userspace_addr: s.host,
        };
        // SAFETY: re-registers a slot exactly as the VM registered it (same live mapping,
        // kept alive by `self.mem`), changing only its flags; the ioctl reads `r` only.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_SET_USER_MEMORY_REGION(), &r)
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The pages written since [`DirtyLog::start`] or the last `take`, by the guest or the
    /// VMM; both records are cleared as they are read.
    pub fn take(&mut self) -> Result<PageSet, DirtyError> {
        let mut set = PageSet::new(mem_pages(&self.mem));
        for (s, r) in self.slots.iter().zip(self.mem.iter()) {
            let pages = s.len / PAGE as u64;
            let mut bits = vec![0u64; pages.div_ceil(64) as usize];
            let mut log = kvm_dirty_log {
                slot: s.slot,
                ..Default::default()
            };
            log.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
            // SAFETY: KVM writes one bit per page of the slot into `bits`, which has room for
            // that many bits and outlives the call.
            let ret =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
            if ret < 0 {
                return Err(DirtyError::Log(s.slot, std::io::Error::last_os_error()));
            }
            set.or_at(s.first_page, &bits);
            let vmm = bitmap(r).get_and_reset();
            set.or_at(s.first_page, &vmm);
        }
        Ok(set)
    }

    /// Turns logging off again.
    pub fn stop(mut self) -> Result<(), DirtyError> {
        self.turn_off()
    }

    fn turn_off(&mut self) -> Result<(), DirtyError> {
        if !std::mem::take(&mut self.on) {
            return Ok(());
        }
        for s in self.slots.clone() {
            self.register(s, 0)
                .map_err(|e| DirtyError::Slot("stop", s.slot, e))?;
        }
        Ok(())
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if let Err(e) = self.turn_off() {
            tracing::warn!("{e}");
        }
    }
}

fn bitmap(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let m: &MmapRegion<AtomicBitmap> = r;
    m.bitmap()
}

/// How a page of the VM compares with the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    /// All zero.
    Zero,
    /// The base's page at the same place.
    Base,
    /// Anything else.
    Data,
}

/// Classifies `page` (the VM's bytes) against `base` (the base's bytes there).
pub fn classify(page: &[u8], base: &[u8]) -> PageClass {
    if page == base {
        PageClass::Base
    } else if page.iter().all(|&b| b == 0) {
        PageClass::Zero
    } else {
        PageClass::Data
    }
}

/// Pagemap entry bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// The pages of `mem` that may differ from the base: in anonymous mappings (synthesis
/// rewrote them), or written since the base was mapped (private copies), or swapped out.
/// Pages of the file mapping never written are left out without being read.
pub fn delta_candidates(mem: &GuestMemoryMmap) -> Result<PageSet, DirtyError> {
    let slots = slots(mem);
    let mut set = PageSet::new(mem_pages(mem));
    let anon = anonymous_ranges().map_err(|e| DirtyError::Proc("/proc/self/maps", e))?;
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| DirtyError::Proc("/proc/self/pagemap", e))?;
    for s in &slots {
        let pages = (s.len / PAGE as u64) as usize;
        let mut raw = vec![0u8; pages * 8];
        pagemap
            .read_exact_at(&mut raw, s.host / PAGE as u64 * 8)
            .map_err(|e| DirtyError::Proc("/proc/self/pagemap", e))?;
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            let host = s.host + (i * PAGE) as u64;
            // The last anonymous range starting at or below `host`, if it covers it.
            let at = anon.partition_point(|&(a, _)| a <= host);
            let is_anon = at > 0 && host < anon[at - 1].1;
            let written = e & PM_SWAPPED != 0 || (e & PM_PRESENT != 0 && e & PM_FILE == 0);
            if is_anon || written {
                set.insert(s.first_page + i as u64);
            }
        }
    }
    Ok(set)
}

/// Address ranges of this process's anonymous mappings (no file behind them), ascending.
fn anonymous_ranges() -> std::io::Result<Vec<(u64, u64)>> {
    let maps = BufReader::new(File::open("/proc/self/maps")?);
    let mut out = Vec::new();
    for line in maps.lines() {
        let line = line?;
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if inode != "0" {
            continue;
        }
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                out.push((a, b));
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads image page `p` of `mem` into `buf` (one page).
pub fn read_page(mem: &GuestMemoryMmap, p: u64, buf: &mut [u8]) -> bool {
    let mut at = p * PAGE as u64;
    for r in mem.iter() {
        if at < r.len() {
            return r.read_slice(buf, MemoryRegionAddress(at)).is_ok();
        }
        at -= r.len();
    }
    false
}

/// The VM's pages that differ from the base whose memory file is `base`: each with its class
/// (never [`PageClass::Base`]), ascending. When guest RAM maps another file privately
/// (`image`: a shared RAM image, base and overlay in one), its unwritten pages are candidates
/// too wherever that file or the base holds data.
pub fn base_delta(
    mem: &GuestMemoryMmap,
    base: &File,
    image: Option<&File>,
) -> Result<Vec<(u64, PageClass)>, DirtyError> {
    let mut candidates = delta_candidates(mem)?;
    if let Some(image) = image {
        let len = mem_pages(mem) * PAGE as u64;
        for f in [image, base] {
            for (start, end) in data_extents(f, len) {
                for p in start / PAGE as u64..end.div_ceil(PAGE as u64) {
                    candidates.insert(p);
                }
            }
        }
    }
    let (mut page, mut theirs) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut out = Vec::new();
    for p in candidates.iter() {
        if !read_page(mem, p, &mut page) {
            continue;
        }
        theirs.fill(0);
        // Past the base file's end (a sparse or short file) reads as zeros.
        let _ = base.read_at(&mut theirs, p * PAGE as u64);
        match classify(&page, &theirs) {
            PageClass::Base => {}
            c => out.push((p, c)),
        }
    }
    Ok(out)
}

static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// The base's non-zero pages by content, for dedup against the base's other pages
/// (`Fill::BaseAt`): built once per handoff from the base's memory file, holes skipped.
pub struct BaseIndex {
    map: Option<format::mapped::Mapped>,
    /// Content hash → the first base page with that content.
    by_hash: HashMap<u128, u64>,
}

impl BaseIndex {
    /// Indexes the non-zero pages of the base memory file `base` below page `mem_pages`
    /// (the data extents only: the file is sparse).
    pub fn build(base: &File, mem_pages: u64) -> std::io::Result<Self> {
        let len = base.metadata()?.len().min(mem_pages * PAGE as u64) / PAGE as u64 * PAGE as u64;
        let mut by_hash = HashMap::new();
        if len == 0 {
            return Ok(BaseIndex { map: None, by_hash });
        }
        let map = format::mapped::Mapped::from_file(base, len as usize)?;
        let bytes = map.bytes();
        for (start, end) in data_extents(base, len) {
            for p in start / PAGE as u64..end.div_ceil(PAGE as u64) {
                let s = p as usize * PAGE;
                let page = &bytes[s..s + PAGE];
                // memcmp: fast even unoptimised.
                if page != &ZERO_PAGE[..] {
                    by_hash.entry(xxh3_128(page)).or_insert(p);
                }
            }
        }
        Ok(BaseIndex {
            map: Some(map),
            by_hash,
        })
    }

    /// The base page holding exactly `page` (whose 128-bit xxh3 is `hash`), if any: a hash
    /// hit is confirmed byte by byte, so a collision never names a wrong page.
    pub fn find(&self, hash: u128, page: &[u8]) -> Option<u64> {
        let p = *self.by_hash.get(&hash)?;
        let s = p as usize * PAGE;
        let theirs = self.map.as_ref()?.bytes().get(s..s + PAGE)?;
        (theirs == page).then_some(p)
    }

    /// Distinct non-zero contents indexed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when the base has no non-zero page.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// An index whose entry for `hash` names base page `p` (a collision stand-in for tests).
    #[cfg(test)]
    pub fn with_entry(mut self, hash: u128, p: u64) -> Self {
        self.by_hash.insert(hash, p);
        self
    }
}

impl std::fmt::Debug for BaseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BaseIndex({} pages)", self.by_hash.len())
    }
}

/// The data extents of `f`'s first `len` bytes (`SEEK_DATA`/`SEEK_HOLE`); all of it when
/// the file system cannot say.
fn data_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < len {
        // SAFETY: lseek on a file we own; results are checked.
        let data = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // a hole up to the end
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole <= data {
            return vec![(0, len)];
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if data >= len {
            break;
        }
        out.push((data, hole));
        off = hole;
    }
    out
}

/// A duplicate of `fd` (the VM's), for the handoff thread.
pub fn dup_fd(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: `fd` is open for the duration of the borrow; the clone is a new descriptor.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) }.try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::kvm::KvmContext;
    use crate::vstate::memory;
    use crate::vstate::vm::Vm;
    use vm_memory::GuestAddress;

    #[test]
    fn page_sets_hold_what_is_inserted() {
        let mut s = PageSet::new(200);
        for p in [0, 63, 64, 199, 500] {
            s.insert(p);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 63, 64, 199]);
        assert_eq!(s.len(), 4);
        assert!(s.contains(63) && !s.contains(62));
        s.or_at(100, &[0b101]);
        assert!(s.contains(100) && s.contains(102) && !s.contains(101));
    }

    /// Times the index of a real base (`VMM_BASE_INDEX_TIMING=path/to/memory`).
    #[test]
    #[ignore]
    fn base_index_timing() {
        let path = std::env::var("VMM_BASE_INDEX_TIMING").unwrap();
        let f = File::open(path).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let i = BaseIndex::build(&f, 65536).unwrap();
            eprintln!("{} pages in {:?}", i.len(), t.elapsed());
        }
    }

    #[test]
    fn classes() {
        let z = [0u8; PAGE];
        let mut d = [0u8; PAGE];
        d[9] = 1;
        assert_eq!(classify(&d, &d), PageClass::Base);
        assert_eq!(classify(&z, &d), PageClass::Zero);
        assert_eq!(classify(&d, &z), PageClass::Data);
    }

    /// A real-mode guest fills pages 0x10..0x13 with one `rep stosb` and leaves through a
    /// port write; the VMM writes page 0x300 through vm-memory.
    #[test]
    fn guest_writes_and_device_writes_are_logged_and_nothing_else() {
        let Ok(kvm) = KvmContext::open(std::path::Path::new("/dev/kvm")) else {
            return;
        };
        let mem = memory::create_guest_memory(4).unwrap();
        let vm = Vm::new(&kvm, &mem).unwrap();
        // Real mode at 0x1000: mov di,0x10000>>4 → es; rep stosb of 0x3000 bytes at es:0.
        let code: &[u8] = &[
            0xb8, 0x00, 0x10, // mov ax, 0x1000
            0x8e, 0xc0, // mov es, ax
            0x31, 0xff, // xor di, di
            0xb9, 0x00, 0x30, // mov cx, 0x3000
            0xb0, 0xaa, // mov al, 0xaa
            0xf3, 0xaa, // rep stosb
            0xe6, 0x80, // out 0x80, al
        ];
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let mut log = DirtyLog::start(dup_fd(vm.fd()).unwrap(), &mem).unwrap();
        assert!(log.take().unwrap().is_empty(), "nothing written yet");
        let vcpu = vm.fd().create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).unwrap();
        let mut vcpu = vcpu;
        match vcpu.run().unwrap() {
            kvm_ioctls::VcpuExit::IoOut(0x80, _) => {}
            other => panic!("unexpected exit {other:?}"),
        }
        // A device write (through vm-memory) far from the guest's.
        mem.write_slice(&[1u8; 10], GuestAddress(0x30_0000))
            .unwrap();
        let set = log.take().unwrap();
        for p in 0x10..0x13 {
            assert!(
                set.contains(p),
                "guest page {p:#x} not logged: {:?}",
                set.iter().collect::<Vec<_>>()
            );
        }
        assert!(set.contains(0x300), "the device's write is missing");
        assert!(
            !set.contains(0x14) && !set.contains(0x200),
            "unwritten pages logged"
        );
        assert!(log.take().unwrap().is_empty(), "reading cleared the log");
        log.stop().unwrap();
    }

    #[test]
    fn base_delta_finds_written_pages_only() {
        let dir = std::env::temp_dir().join(format!("vmm-dirty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("memory");
        let mut bytes = vec![0u8; 4 << 20];
        bytes[5 * PAGE..6 * PAGE].fill(7);
        bytes[9 * PAGE..10 * PAGE].fill(3);
        std::fs::write(&image, &bytes).unwrap();
        let mem = memory::map_image(&image, 4).unwrap();
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(7 * PAGE as u64))
            .unwrap(); // a read: not δ
        mem.write_slice(&[1, 2, 3], GuestAddress(2 * PAGE as u64))
            .unwrap(); // data
        mem.write_slice(&[0u8; PAGE], GuestAddress(9 * PAGE as u64))
            .unwrap(); // zeroed
        mem.write_slice(&[7u8; 5], GuestAddress(5 * PAGE as u64))
            .unwrap(); // same as base
        let base = File::open(&image).unwrap();
        let d = base_delta(&mem, &base, None).unwrap();
        assert_eq!(d, [(2, PageClass::Data), (9, PageClass::Zero)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guest RAM mapped from a RAM image (base and overlay in one): pages the guest never
    /// wrote still differ from the base where the image does, a page the image zeroed
    /// included.
    #[test]
    fn base_delta_of_a_ram_image_includes_its_unwritten_differences() {
        let dir = std::env::temp_dir().join(format!("vmm-dirty-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base_p, image_p) = (dir.join("memory"), dir.join("app.overlay.ram"));
        let mut base = vec![0u8; 4 << 20];
        base[5 * PAGE..6 * PAGE].fill(7);
        base[9 * PAGE..10 * PAGE].fill(3);
        let mut image = base.clone();
        image[12 * PAGE..13 * PAGE].fill(4); // overlay data
        image[9 * PAGE..10 * PAGE].fill(0); // the overlay zeroed a base page
        std::fs::write(&base_p, &base).unwrap();
        std::fs::write(&image_p, &image).unwrap();
        let mem = memory::map_image(&image_p, 4).unwrap();
        mem.write_slice(&[1, 2, 3], GuestAddress(2 * PAGE as u64))
            .unwrap();
        let (b, i) = (File::open(&base_p).unwrap(), File::open(&image_p).unwrap());
        let d = base_delta(&mem, &b, Some(&i)).unwrap();
        assert_eq!(
            d,
            [
                (2, PageClass::Data),
                (9, PageClass::Zero),
                (12, PageClass::Data)
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
