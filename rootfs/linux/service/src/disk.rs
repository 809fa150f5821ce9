//! The disk table (`micro_service::table`) on a block device or file: `get`, `put`, `disk`
//! and `scan`, as the micro guest answers them from its virtio disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use micro_service::scan::{self, Checksum, Chunks};
use micro_service::table::{self, Header, TableError, SECTOR};

/// An open disk and what its sector 0 says.
pub struct TableDisk {
    file: File,
    sectors: u64,
    read_only: bool,
    header: Result<Header, TableError>,
}

/// Why a `get`, `put` or `scan` failed.
#[derive(Debug)]
pub enum DiskError {
    /// The disk holds no usable table.
    Table(TableError),
    /// The entry is not in the table.
    Entry(u64, u64),
    /// The disk is read-only.
    ReadOnly,
    /// The range is beyond the end of the disk.
    Range(u64),
    /// The device failed.
    Io(io::Error),
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskError::Table(e) => write!(f, "{e}"),
            DiskError::Entry(i, n) => write!(f, "entry {i} is beyond the table ({n} entries)"),
            DiskError::ReadOnly => write!(f, "the disk is read-only"),
            DiskError::Range(n) => write!(f, "beyond the end of the disk ({n} sectors)"),
            DiskError::Io(e) => write!(f, "disk I/O failed: {e}"),
        }
    }
}

impl std::error::Error for DiskError {}

impl From<io::Error> for DiskError {
    fn from(e: io::Error) -> Self {
        DiskError::Io(e)
    }
}

impl TableDisk {
    /// Opens `path` read-write (read-only when the device refuses writes) and reads sector 0.
    pub fn open(path: &Path) -> io::Result<TableDisk> {
        let (file, read_only) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => (f, false),
            Err(_) => (File::open(path)?, true),
        };
        // A block device's size is where a seek to its end lands.
        let bytes = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        let sectors = bytes / SECTOR as u64;
        let mut s0 = [0u8; SECTOR];
        let header = match file.read_exact_at(&mut s0, 0) {
            Ok(()) => Header::parse(&s0, sectors),
            Err(_) => Err(TableError::Short),
        };
        Ok(TableDisk {
            file,
            sectors,
            read_only,
            header,
        })
    }

    fn entries(&self) -> Result<u64, DiskError> {
        self.header.map(|h| h.entries).map_err(DiskError::Table)
    }

    /// Entry `i` of the table.
    pub fn get(&mut self, i: u64) -> Result<u64, DiskError> {
        let n = self.entries()?;
        if i >= n {
            return Err(DiskError::Entry(i, n));
        }
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, table::entry_offset(i))?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes entry `i` and flushes it to the device.
    pub fn put(&mut self, i: u64, v: u64) -> Result<(), DiskError> {
        let n = self.entries()?;
        if i >= n {
            return Err(DiskError::Entry(i, n));
        }
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.file
            .write_all_at(&v.to_le_bytes(), table::entry_offset(i))?;
        self.file.sync_data()?;
        Ok(())
    }

    /// The `disk` reply.
    pub fn describe(&self) -> String {
        let magic = match self.header {
            Ok(h) => format!("magic=CLDTABLE entries={}", h.entries),
            Err(TableError::NoMagic) => "magic=none".into(),
            Err(_) => "magic=invalid".into(),
        };
        format!(
            "ok disk sectors={} ro={} {magic}",
            self.sectors,
            u8::from(self.read_only)
        )
    }

    /// Reads `sectors` sectors from `first` in requests of `req_kib` KiB; their checksum.
    pub fn scan(&mut self, first: u64, sectors: u64, req_kib: u64) -> Result<u64, DiskError> {
        if !scan::in_range(first, sectors, self.sectors) {
            return Err(DiskError::Range(self.sectors));
        }
        let mut buf = vec![0u8; (req_kib as usize) * 1024];
        let mut sum = Checksum::default();
        for (at, n) in Chunks::new(first, sectors, req_kib) {
            let part = &mut buf[..(n * scan::SECTOR) as usize];
            self.file.read_exact_at(part, at * scan::SECTOR)?;
            sum.add(part);
        }
        Ok(sum.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use micro_service::oracle;

    #[test]
    fn reads_writes_and_scans_a_table_image() {
        let dir = std::env::temp_dir().join(format!("linux-service-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.img");
        let img = oracle::table_image(1000, 1 << 16);
        std::fs::write(&path, &img).unwrap();
        let mut d = TableDisk::open(&path).unwrap();
        assert_eq!(
            d.describe(),
            "ok disk sectors=128 ro=0 magic=CLDTABLE entries=1000"
        );
        assert_eq!(d.get(7).unwrap(), oracle::table_value(7));
        assert!(matches!(d.get(1000), Err(DiskError::Entry(1000, 1000))));
        d.put(7, 42).unwrap();
        assert_eq!(d.get(7).unwrap(), 42);
        let now = std::fs::read(&path).unwrap();
        assert_eq!(
            d.scan(3, 100, 8).unwrap(),
            oracle::word_sum(&now[3 * 512..103 * 512])
        );
        assert!(matches!(d.scan(100, 29, 4), Err(DiskError::Range(128))));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut blank = TableDisk::open(&path).unwrap();
        assert_eq!(blank.describe(), "ok disk sectors=8 ro=0 magic=none");
        assert!(blank.get(0).unwrap_err().to_string().contains("no table"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
