//! A bump allocator over a zeroed static array: the guest has no heap, but its drivers and the
//! TCP/IP stack need buffers that live forever (virtqueues, packet buffers, socket buffers).
//! Nothing is ever freed. The memory is in `.bss`, identity-mapped, so a buffer's address is
//! also its physical (DMA) address.

use core::cell::{Cell, UnsafeCell};

/// Bytes available.
const SIZE: usize = 640 * 1024;

/// The arena: zeroed memory and how much of it is handed out.
struct Arena {
    mem: UnsafeCell<[u8; SIZE]>,
    used: Cell<usize>,
}

// SAFETY: the guest runs one thread on one vCPU and its interrupt handlers (assembly in
// entry.rs) never touch the arena, so there is no concurrent access.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    mem: UnsafeCell::new([0; SIZE]),
    used: Cell::new(0),
};

/// `len` zeroed bytes aligned to `align` (a power of two), never freed; panics when the arena
/// is exhausted (a build-time sizing error).
pub fn bytes(len: usize, align: usize) -> &'static mut [u8] {
    let base = ARENA.mem.get() as usize;
    let start = (base + ARENA.used.get()).next_multiple_of(align) - base;
    let end = start.checked_add(len).expect("arena size overflow");
    assert!(end <= SIZE, "arena exhausted");
    ARENA.used.set(end);
    // SAFETY: [start, end) lies inside the arena and is handed out once (`used` only grows),
    // so this is the only reference to it; the bytes are zero (`.bss`, never written before).
    unsafe { core::slice::from_raw_parts_mut((base + start) as *mut u8, len) }
}

/// Moves `value` into the arena and returns it with a `'static` lifetime.
pub fn leak<T>(value: T) -> &'static mut T {
    let b = bytes(core::mem::size_of::<T>(), core::mem::align_of::<T>());
    let p = b.as_mut_ptr().cast::<T>();
    // SAFETY: `p` is aligned for T, points to size_of::<T>() bytes nobody else references,
    // and is initialised here before the reference is made.
    unsafe {
        p.write(value);
        &mut *p
    }
}
