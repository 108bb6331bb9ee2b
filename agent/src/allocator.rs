//! The agent's allocator: mimalloc. The proxy allocates and frees a few small buffers per request, from one
//! thread; glibc's malloc spent twice its time on them.
//!
//! Allocations go to mimalloc's plain entry points whenever the block they get is aligned enough anyway, and to
//! its aligned ones only otherwise. (Sent to the aligned entry points, as a `GlobalAlloc` that passes every layout
//! on does, mimalloc 3 takes a plain path only for power-of-two sizes; any other size, and every allocation when
//! a page's free list runs out, goes through its over-allocating path: more instructions, and larger blocks.)

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has when its size is a multiple of it, up to this (`MI_MAX_ALIGN_SIZE`):
/// size classes are multiples of 8 (of 16 above 16 bytes), laid out from 16-byte aligned page starts.
const NATURAL_ALIGN: usize = 16;

/// Whether a plain allocation of `size` bytes is aligned to `align`.
fn naturally_aligned(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && size % align == 0
}

pub struct Allocator;

/// mimalloc's plain and aligned forms of one allocation function.
type Plain = unsafe extern "C" fn(usize) -> *mut c_void;
type Aligned = unsafe extern "C" fn(usize, usize) -> *mut c_void;

/// A block for `layout` from `plain` when its blocks are aligned enough anyway, else from `aligned`.
///
/// # Safety
/// `layout` has a non-zero size (as `GlobalAlloc` requires of its callers).
#[inline]
unsafe fn allocate(layout: Layout, plain: Plain, aligned: Aligned) -> *mut u8 {
    // SAFETY: mimalloc's allocation functions take any size and a power-of-two alignment (a Layout's).
    unsafe {
        if naturally_aligned(layout.size(), layout.align()) {
            plain(layout.size()).cast()
        } else {
            aligned(layout.size(), layout.align()).cast()
        }
    }
}

// SAFETY: every block comes from mimalloc, aligned as its layout asks (plain blocks only where they are aligned
// so by construction, see `naturally_aligned`), and goes back to it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: a block mimalloc returned (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: a block mimalloc returned, resized keeping its layout's alignment.
        unsafe {
            if naturally_aligned(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (libmimalloc-sys names it only for mimalloc 2): how long freed memory
/// stays resident before it is returned to the system, in milliseconds.
const PURGE_DELAY: mi::mi_option_t = 15;

/// Sets mimalloc's options for the agent, before it allocates much: freed memory is returned to the system
/// after 10 ms (mimalloc 2's delay) rather than mimalloc 3's second. With the longer delay, much of what a
/// reload frees stays resident for good (with 10,000 ServiceEntries and as many VirtualServices: ~4 MiB, about
/// a quarter of what the policy itself takes).
pub fn configure() {
    // SAFETY: options are atomics, which any thread may set at any time.
    unsafe { mi::mi_option_set(PURGE_DELAY, 10) }
}

/// Returns to the system what the calling thread's heap has freed (the control loop calls it after a reload:
/// the documents read and the typed configuration are several times the size of what is kept, and mimalloc
/// returns a thread's free pages only as that thread allocates again), and what C libraries freed through the C
/// allocator (zstd's compression context for the store: megabytes, which glibc keeps otherwise).
pub fn release_freed_memory() {
    // SAFETY: mi_collect only walks the allocator's own structures, and any thread may call it at any time;
    // malloc_trim only walks glibc's, under its own locks.
    unsafe {
        mi::mi_collect(true);
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_is_aligned_as_its_layout_asks() {
        let mut blocks = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 3, 8, 12, 24, 40, 48, 100, 1000, 1040, 8192, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is freed below with its layout.
                let block = unsafe { Allocator.alloc(layout) };
                assert!(!block.is_null());
                assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                // SAFETY: the block was just allocated with `layout`.
                let grown = unsafe { Allocator.realloc(block, layout, size * 3) };
                assert_eq!(grown as usize % align, 0, "grown to {}, align {align}", size * 3);
                // SAFETY: as above.
                let zeroed = unsafe { Allocator.alloc_zeroed(layout) };
                assert_eq!(zeroed as usize % align, 0, "zeroed: size {size}, align {align}");
                // SAFETY: `layout.size()` bytes were allocated zeroed.
                assert!(unsafe { std::slice::from_raw_parts(zeroed, size) }.iter().all(|&b| b == 0));
                blocks.push((grown, Layout::from_size_align(size * 3, align).unwrap()));
                blocks.push((zeroed, layout));
            }
        }
        for (block, layout) in blocks {
            // SAFETY: each block with the layout it has now.
            unsafe { Allocator.dealloc(block, layout) };
        }
    }
}
