//! Writing an image to a device and reading it back to compare: 4 MiB aligned buffers,
//! O_DIRECT where the device takes it (so the read-back comes from the device, not the page
//! cache), progress with MiB/s and ETA.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::thread::Scope;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::MIB;

/// Bytes per write and per read-back: large enough for full device throughput.
const CHUNK: usize = 4 << 20;
/// Alignment of buffers, offsets and lengths for O_DIRECT (covers 512 and 4096-byte sectors).
const ALIGN: usize = 4096;

/// A buffer whose start is aligned for O_DIRECT, without unsafe: a larger Vec, sliced.
struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        AlignedBuf { v, off }
    }
    fn get(&self) -> &[u8] {
        let len = self.v.len() - ALIGN;
        &self.v[self.off..self.off + len]
    }
    fn buf(&mut self) -> &mut [u8] {
        let len = self.v.len() - ALIGN;
        &mut self.v[self.off..self.off + len]
    }
}

/// Opens `path` with O_DIRECT when the filesystem/driver takes it, else without; says which.
pub(super) fn open_maybe_direct(path: &Path, write: bool, excl: bool) -> Result<(File, bool)> {
    let open = |flags: i32| {
        let mut o = OpenOptions::new();
        if write {
            o.write(true);
        } else {
            o.read(true);
        }
        o.custom_flags(flags).open(path)
    };
    let excl = if excl { libc::O_EXCL } else { 0 };
    match open(libc::O_DIRECT | excl) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((open(excl).map_err(|e| open_error(path, e))?, false))
        }
        Err(e) => Err(open_error(path, e)),
    }
}

pub(super) fn open_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        anyhow::anyhow!(
            "{} is in use (the kernel refused an exclusive open: mounted, swap, device-mapper/md \
             or another exclusive user); nothing was written",
            path.display()
        )
    } else {
        anyhow::Error::new(e).context(format!("cannot open {}", path.display()))
    }
}

/// Reads until `buf` is full or the end of `f`; returns how many bytes were read.
pub(super) fn fill(f: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Reads at `off` until `buf` is full or the end; returns how many bytes were read.
pub(super) fn fill_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Chunks of a file read by a thread ahead of their consumer, [`CHUNK`] bytes at consecutive
/// offsets up to `len`; buffers circulate back through [`ReadAhead::give_back`]. The thread
/// stops at the end, at an error (passed on) or when the consumer is gone.
struct ReadAhead {
    chunks: Receiver<std::io::Result<(AlignedBuf, usize)>>,
    free: Sender<AlignedBuf>,
}

impl ReadAhead {
    /// The next chunk and how many of its bytes were read (fewer only at the file's end).
    fn next(&self) -> Result<(AlignedBuf, usize)> {
        match self.chunks.recv() {
            Ok(r) => Ok(r?),
            Err(_) => bail!("the reading thread stopped early"),
        }
    }

    /// Returns a buffer for reuse.
    fn give_back(&self, b: AlignedBuf) {
        let _ = self.free.send(b);
    }
}

/// Starts reading `f` ahead (with O_DIRECT, whole aligned blocks are asked for; the count
/// returned is capped to the chunk's share of `len`).
fn read_ahead<'s>(s: &'s Scope<'s, '_>, f: &'s File, len: u64, direct: bool) -> ReadAhead {
    let (tx, chunks) = sync_channel(1);
    let (free, free_rx) = channel::<AlignedBuf>();
    for _ in 0..3 {
        let _ = free.send(AlignedBuf::new(CHUNK));
    }
    s.spawn(move || {
        let mut off = 0u64;
        while off < len {
            let Ok(mut b) = free_rx.recv() else { return };
            let want = (len - off).min(CHUNK as u64) as usize;
            let ask = if direct {
                want.div_ceil(ALIGN) * ALIGN
            } else {
                want
            };
            let r = fill_at(f, &mut b.buf()[..ask], off).map(|got| (b, got.min(want)));
            let last = !matches!(&r, Ok((_, got)) if *got == want);
            if tx.send(r).is_err() || last {
                return;
            }
            off += want as u64;
        }
    });
    ReadAhead { chunks, free }
}

/// How a write went.
#[derive(Debug)]
pub struct Written {
    /// Bytes written (the image's length).
    pub bytes: u64,
    /// Seconds, fsync included.
    pub secs: f64,
    /// Whether O_DIRECT was used.
    pub direct: bool,
}

/// Writes all of `image` to the start of `device` (holes as zeros), then fsyncs. A block
/// device is opened exclusively (O_EXCL): the kernel refuses if it is mounted or held.
pub fn write_image(image: &Path, device: &Path, block: bool) -> Result<Written> {
    let src = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let total = src.metadata()?.len();
    let (dst, direct) = open_maybe_direct(device, true, block)?;
    // The tail that is not a multiple of ALIGN goes through a plain descriptor (O_DIRECT
    // needs aligned lengths); opened now so a failure comes before any byte is written.
    let plain = if direct && total % ALIGN as u64 != 0 {
        Some(
            OpenOptions::new()
                .write(true)
                .open(device)
                .map_err(|e| open_error(device, e))?,
        )
    } else {
        None
    };
    let mut progress = Progress::new("written", total);
    let t = Instant::now();
    let mut off = 0u64;
    std::thread::scope(|s| -> Result<()> {
        // The image is read one chunk ahead of the writes.
        let ahead = read_ahead(s, &src, total, false);
        while off < total {
            let (buf, n) = ahead
                .next()
                .with_context(|| format!("reading {}", image.display()))?;
            if n < (total - off).min(CHUNK as u64) as usize {
                let end = off + n as u64;
                bail!(
                    "{} ended at {end} of {total} bytes while being read",
                    image.display()
                );
            }
            let aligned = if direct { n - n % ALIGN } else { n };
            dst.write_all_at(&buf.get()[..aligned], off)
                .with_context(|| format!("writing {} at offset {off}", device.display()))?;
            if aligned < n {
                let at = off + aligned as u64;
                let p = plain.as_ref().expect("opened for an unaligned tail");
                p.write_all_at(&buf.get()[aligned..n], at)
                    .with_context(|| format!("writing {} at offset {at}", device.display()))?;
            }
            ahead.give_back(buf);
            off += n as u64;
            progress.update(off);
        }
        Ok(())
    })?;
    if let Some(p) = &plain {
        p.sync_all()
            .with_context(|| format!("fsync of {}", device.display()))?;
    }
    dst.sync_all()
        .with_context(|| format!("fsync of {}", device.display()))?;
    let secs = t.elapsed().as_secs_f64();
    progress.finish();
    Ok(Written {
        bytes: off,
        secs,
        direct,
    })
}

/// A run of bytes that differ between the image and the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mismatch {
    /// Offset of the first differing byte.
    pub offset: u64,
    /// Length of the run.
    pub len: u64,
}

/// What a read-back found.
#[derive(Debug)]
pub struct Verified {
    /// Bytes compared (the image's length).
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
    /// SHA-256 of the image.
    pub sha256: [u8; 32],
    /// The first [`MAX_RUNS`] runs of differing bytes (empty when identical).
    pub mismatches: Vec<Mismatch>,
    /// All differing bytes.
    pub differing: u64,
}

/// How many differing runs are kept for the report.
pub const MAX_RUNS: usize = 16;

/// Reads back the first `len` bytes of `device`, bypassing the page cache where the device
/// allows O_DIRECT (else after dropping its cached pages), and compares them with `image`.
pub fn verify(image: &Path, device: &Path, len: u64) -> Result<Verified> {
    let mut src = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let (dev, direct) = open_maybe_direct(device, false, false)?;
    if !direct {
        // SAFETY: plain syscall on an open fd; it only drops clean cached pages.
        unsafe { libc::posix_fadvise(dev.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    let mut a = AlignedBuf::new(CHUNK);
    let mut hash = Sha256::new();
    let mut progress = Progress::new("verified", len);
    let mut mismatches: Vec<Mismatch> = Vec::new();
    let mut differing = 0u64;
    let t = Instant::now();
    let mut off = 0u64;
    std::thread::scope(|s| -> Result<()> {
        // The device is read one chunk ahead while this thread reads, hashes and compares
        // the image: the two overlap.
        let ahead = read_ahead(s, &dev, len, direct);
        while off < len {
            let want = (len - off).min(CHUNK as u64) as usize;
            let n = fill(&mut src, &mut a.buf()[..want])?;
            if n < want {
                bail!(
                    "{} ended at {} of {len} bytes while being read",
                    image.display(),
                    off + n as u64
                );
            }
            let (b, got) = ahead
                .next()
                .with_context(|| format!("reading back {} at offset {off}", device.display()))?;
            if got < want {
                bail!(
                    "{} ended at offset {} but the image has {len} bytes",
                    device.display(),
                    off + got as u64
                );
            }
            let (x, y) = (&a.buf()[..want], &b.get()[..want]);
            hash.update(x);
            if x != y {
                differing += record_mismatches(x, y, off, &mut mismatches);
            }
            ahead.give_back(b);
            off += want as u64;
            progress.update(off);
        }
        Ok(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    progress.finish();
    Ok(Verified {
        bytes: off,
        secs,
        sha256: hash.finalize().into(),
        mismatches,
        differing,
    })
}

/// Adds the runs where `x` and `y` (at `base`) differ to `runs` (joining a run that continues
/// the last one, keeping at most [`MAX_RUNS`]); returns how many bytes differ.
pub(super) fn record_mismatches(x: &[u8], y: &[u8], base: u64, runs: &mut Vec<Mismatch>) -> u64 {
    let mut count = 0;
    for (i, _) in x.iter().zip(y).enumerate().filter(|(_, (p, q))| p != q) {
        count += 1;
        let at = base + i as u64;
        let full = runs.len() >= MAX_RUNS;
        match runs.last_mut() {
            Some(r) if r.offset + r.len == at => r.len += 1,
            _ if full => {}
            _ => runs.push(Mismatch { offset: at, len: 1 }),
        }
    }
    count
}

/// The verify failure: how much differs and where.
pub fn mismatch_message(device: &Path, v: &Verified) -> String {
    let mut m = format!(
        "verify failed: {} of {} bytes read back from {} differ from the image; first runs \
         (offset, length):",
        v.differing,
        v.bytes,
        device.display()
    );
    for r in &v.mismatches {
        m.push_str(&format!(
            "\n  - {:#x} ({}), {} bytes",
            r.offset, r.offset, r.len
        ));
    }
    m.push_str("\nflash again; if it fails again the device is faulty or fake-sized");
    m
}

/// Progress on stderr: MiB done, MiB/s, ETA; a line updated in place on a terminal, else a
/// line every 10 %.
struct Progress {
    what: &'static str,
    total: u64,
    start: Instant,
    last: Instant,
    last_tenth: u64,
    tty: bool,
}

impl Progress {
    fn new(what: &'static str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total,
            start: now,
            last: now,
            last_tenth: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total - done) as f64 / rate
        } else {
            0.0
        };
        format!(
            "    {:.1} / {:.1} MiB {} ({:3.0} %), {:.1} MiB/s, ETA {:.0} s",
            done as f64 / MIB,
            self.total as f64 / MIB,
            self.what,
            done as f64 * 100.0 / self.total.max(1) as f64,
            rate / MIB,
            eta
        )
    }

    fn update(&mut self, done: u64) {
        if self.tty {
            if self.last.elapsed() >= Duration::from_millis(250) {
                self.last = Instant::now();
                eprint!("\r{}\x1b[K", self.line(done));
            }
        } else {
            let tenth = done * 10 / self.total.max(1);
            if tenth > self.last_tenth && done < self.total {
                self.last_tenth = tenth;
                eprintln!("{}", self.line(done));
            }
        }
    }

    /// Clears the in-place line (the caller prints the summary).
    fn finish(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}
