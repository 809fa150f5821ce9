//! The memory functions the compiler calls (no libc here). `rep movsb`/`rep stosb` are fast on
//! current CPUs and keep the compiler from turning these bodies back into calls to themselves.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest` (non-overlapping).
///
/// # Safety
/// As C `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; DF is clear (ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// As C `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dest is below src or the ranges are disjoint.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: backward copy from the last byte; DF is restored before returning.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.wrapping_add(n - 1) => _,
            inout("rsi") src.wrapping_add(n - 1) => _,
            options(nostack)
        )
    };
    dest
}

/// Fills `n` bytes at `dest` with `c`.
///
/// # Safety
/// As C `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dest
}

/// Compares `n` bytes.
///
/// # Safety
/// As C `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes; volatile reads
        // keep the compiler from recognising this loop as a call to memcmp itself.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality (zero when equal).
///
/// # Safety
/// As C `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
