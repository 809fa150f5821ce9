//! Read-only memory maps of image files (RAM images are hundreds of MiB, mostly holes).

use std::fs::File;
use std::path::Path;

/// A file mapped read-only, shared.
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]` views across
// threads is sound.
unsafe impl Sync for Mapped {}
// SAFETY: as above; the mapping can be unmapped from any thread.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps all of `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let f = File::open(path)?;
        let len = f.metadata()?.len() as usize;
        Self::from_file(&f, len)
    }

    /// Maps the first `len` bytes of `f` (opened for reading).
    pub fn from_file(f: &File, len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty",
            ));
        }
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a file we opened read-only, PROT_READ, at a kernel-chosen address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live read-only mapping owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped({} bytes)", self.len)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns; no view outlives `self`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}
