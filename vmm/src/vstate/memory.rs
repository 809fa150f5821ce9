//! Guest RAM: anonymous, lazily populated mappings laid out by [`crate::arch::layout`].

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout;

/// Smallest guest we accept: the kernel is loaded at 1 MiB and needs room above it.
pub const MIN_MEM_MIB: u64 = 2;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is below the minimum.
    #[error("guest memory of {0} MiB is too small: at least {MIN_MEM_MIB} MiB is needed")]
    TooSmall(u64),
    /// The requested size exceeds the host.
    #[error("guest memory of {requested} MiB exceeds this host's {host} MiB of RAM: choose a smaller --mem")]
    TooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host RAM in MiB.
        host: u64,
    },
    /// mmap failed.
    #[error("failed to map {0} MiB of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Host RAM in MiB (from `sysinfo`), or `None` if it cannot be read.
pub fn host_ram_mib() -> Option<u64> {
    // SAFETY: `sysinfo` only writes into the zeroed struct we pass; all-zero is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `sysinfo` struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some((info.totalram as u64 * u64::from(info.mem_unit)) >> 20)
}

/// Checks a requested guest size against the minimum and the host's RAM.
pub fn validate_size(mem_mib: u64) -> Result<(), MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    if let Some(host) = host_ram_mib() {
        if mem_mib > host {
            return Err(MemoryError::TooLarge {
                requested: mem_mib,
                host,
            });
        }
    }
    Ok(())
}

/// Creates anonymous guest memory of `mem_mib` MiB (pages are populated on first touch).
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(mem_mib)?;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(mem_mib, e))
}

/// Replaces `[host, host + len)` of guest RAM by fresh, zeroed anonymous private memory
/// (synthesis does so where an overlay rewrites the base's pages).
pub fn remap_anonymous(host: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: callers pass a page-aligned range of guest RAM this VMM mapped and owns, with no
    // vCPU running on it yet; MAP_FIXED replaces exactly those pages and keeps the range valid.
    let r = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn rejects_tiny_and_absurd_sizes() {
        assert!(matches!(validate_size(1), Err(MemoryError::TooSmall(1))));
        assert!(matches!(
            validate_size(1 << 40),
            Err(MemoryError::TooLarge { .. })
        ));
        validate_size(64).unwrap();
    }

    #[test]
    fn creates_memory_of_the_requested_size() {
        let m = create_guest_memory(64).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
