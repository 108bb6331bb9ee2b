//! The agent's allocator: mimalloc. The proxy allocates and frees a few small buffers per request, from one
//! thread, where glibc's malloc costs more (bench/README.md has the figures).
//!
//! Allocations go to mimalloc's plain entry points whenever the block they get is aligned enough anyway, and to
//! its aligned ones only otherwise. (Sent to the aligned entry points, as a `GlobalAlloc` that passes every layout
//! on does, mimalloc 3 takes a plain path only for power-of-two sizes; any other size, and every allocation when
//! a page's free list runs out, goes through its over-allocating path: more instructions, and larger blocks.)
#![expect(
    unsafe_code,
    reason = "a global allocator over mimalloc is unsafe by contract: every call is argued where it is made"
)]

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

thread_local! {
    /// The heap the thread allocates from while it runs under `transient`; null otherwise (the default heap).
    static TRANSIENT_HEAP: std::cell::Cell<*mut mi::mi_heap_t> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// mimalloc's plain and aligned forms of one allocation function, from the thread's default heap and from a
/// given one.
struct Functions {
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
    plain_in: unsafe extern "C" fn(*mut mi::mi_heap_t, usize) -> *mut c_void,
    aligned_in: unsafe extern "C" fn(*mut mi::mi_heap_t, usize, usize) -> *mut c_void,
}

const MALLOC: Functions = Functions {
    plain: mi::mi_malloc,
    aligned: mi::mi_malloc_aligned,
    plain_in: mi::mi_heap_malloc,
    aligned_in: mi::mi_heap_malloc_aligned,
};

const ZALLOC: Functions = Functions {
    plain: mi::mi_zalloc,
    aligned: mi::mi_zalloc_aligned,
    plain_in: mi::mi_heap_zalloc,
    aligned_in: mi::mi_heap_zalloc_aligned,
};

/// A block for `layout` from the plain form when its blocks are aligned enough anyway, else from the aligned
/// one; from the transient heap while the thread runs under `transient`.
///
/// # Safety
/// `layout` has a non-zero size (as `GlobalAlloc` requires of its callers).
#[inline]
unsafe fn allocate(layout: Layout, functions: Functions) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    let heap = TRANSIENT_HEAP.get();
    // SAFETY: mimalloc's allocation functions take any size and a power-of-two alignment (a Layout's); a
    // transient heap is never deleted.
    unsafe {
        match (heap.is_null(), naturally_aligned(size, align)) {
            (true, true) => (functions.plain)(size),
            (true, false) => (functions.aligned)(size, align),
            (false, true) => (functions.plain_in)(heap, size),
            (false, false) => (functions.aligned_in)(heap, size, align),
        }
        .cast()
    }
}

// SAFETY: every block comes from mimalloc, aligned as its layout asks (plain blocks only where they are aligned
// so by construction, see `naturally_aligned`), and goes back to it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout.
        unsafe { allocate(layout, MALLOC) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout.
        unsafe { allocate(layout, ZALLOC) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: a block mimalloc returned (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: a block mimalloc returned, and a new layout with the old one's alignment and a non-zero size (as
        // `GlobalAlloc::realloc` requires of its callers).
        unsafe {
            if shrinks_in_place_wastefully(ptr, layout, new_size) {
                return moved(ptr, Layout::from_size_align_unchecked(new_size, layout.align()));
            }
        }
        let heap = TRANSIENT_HEAP.get();
        let ptr = ptr.cast::<c_void>();
        // SAFETY: a block mimalloc returned, resized keeping its layout's alignment (moved, into the transient
        // heap while there is one).
        unsafe {
            match (heap.is_null(), naturally_aligned(new_size, layout.align())) {
                (true, true) => mi::mi_realloc(ptr, new_size).cast(),
                (true, false) => mi::mi_realloc_aligned(ptr, new_size, layout.align()).cast(),
                (false, true) => mi::mi_heap_realloc(heap, ptr, new_size).cast(),
                (false, false) => mi::mi_heap_realloc_aligned(heap, ptr, new_size, layout.align()).cast(),
            }
        }
    }
}

/// Whether shrinking the block at `ptr` to `new_size` would leave it in a larger size class than `new_size`
/// needs. mimalloc shrinks in place while the new size is at least half the block: a `Vec` grown to 4 elements
/// and shrunk to 3 (`into_boxed_slice`, as compiled policies hold their lists) would keep the 4's block for as
/// long as the policy lives (bench/README.md has the figures). Shrinking is rare outside compiling, so moving
/// costs nothing where requests are served.
///
/// # Safety
/// `ptr` is a block mimalloc returned.
#[inline]
unsafe fn shrinks_in_place_wastefully(ptr: *mut u8, layout: Layout, new_size: usize) -> bool {
    // SAFETY: a live block of mimalloc's (the caller's contract); mi_good_size only computes.
    new_size < layout.size() && unsafe { mi::mi_usable_size(ptr.cast()) > mi::mi_good_size(new_size) }
}

/// The block at `ptr` moved to a new one for `layout` (its first `layout.size()` bytes copied), the old one
/// freed; null, and the old one kept, when no block could be had.
///
/// # Safety
/// `ptr` is a block mimalloc returned, holding at least `layout.size()` bytes; `layout` has a non-zero size.
unsafe fn moved(ptr: *mut u8, layout: Layout) -> *mut u8 {
    // SAFETY: the caller's layout; the new block is distinct from the old one, both at least `layout.size()`
    // bytes long.
    unsafe {
        let new = allocate(layout, MALLOC);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size());
            mi::mi_free(ptr.cast());
        }
        new
    }
}

/// The mimalloc major version this file is written for: its option numbers (`PURGE_DELAY`), its size classes
/// (`NATURAL_ALIGN`) and `mi_heap_of` are mimalloc 3's. libmimalloc-sys builds mimalloc 2 or 3 by feature, so
/// `configure` checks which one is linked.
const MIMALLOC_MAJOR: i32 = 3;

/// mimalloc's `mi_option_purge_delay` (libmimalloc-sys names it only for mimalloc 2): how long freed memory
/// stays resident before it is returned to the system, in milliseconds.
const PURGE_DELAY: mi::mi_option_t = 15;

/// The linked mimalloc's version, as `major * 10_000 + minor * 100 + patch`.
fn mimalloc_version() -> i32 {
    // SAFETY: reads a constant; no state.
    unsafe { mi::mi_version() }
}

/// Sets mimalloc's options for the agent, before it allocates much: freed memory is returned to the system
/// after 10 ms (mimalloc 2's delay) rather than mimalloc 3's second. With the longer delay, much of what a
/// reload frees stays resident for good (bench/README.md has the figures).
///
/// Panics when the linked mimalloc is not the major version this file is written for: the option set here
/// would be another option, and the alignment this allocator assumes might not hold.
pub fn configure() {
    let version = mimalloc_version();
    assert_eq!(
        version / 10_000,
        MIMALLOC_MAJOR,
        "mimalloc {version} is linked; the allocator is written for mimalloc {MIMALLOC_MAJOR}.x"
    );
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
        if let Some(&heap) = TRANSIENT.get() {
            mi::mi_heap_collect(heap as *mut mi::mi_heap_t, true);
        }
        libc::malloc_trim(0);
    }
}

/// The heap of `transient` allocations (its address), once one is made.
static TRANSIENT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Runs `f` with what the calling thread allocates taken from a heap of its own: for what is read and dropped
/// again (the documents read, the typed configuration compiled from). Kept in pages apart from what stays (the
/// compiled policy, the store), it leaves none of their pages partly used once it is freed, and its own pages go
/// back to the system whole. (A block freed from any thread returns to its own heap.)
pub fn transient<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a new heap, never deleted: every thread's transient allocations come from it.
    let heap = *TRANSIENT.get_or_init(|| unsafe { mi::mi_heap_new() } as usize) as *mut mi::mi_heap_t;
    let previous = TRANSIENT_HEAP.replace(heap);
    // Set back also when `f` unwinds.
    struct Restore(*mut mi::mi_heap_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            TRANSIENT_HEAP.set(self.0);
        }
    }
    let _restore = Restore(previous);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        /// The heap a block belongs to (mimalloc 3; not bound by libmimalloc-sys).
        fn mi_heap_of(p: *const c_void) -> *mut mi::mi_heap_t;
    }

    #[test]
    fn the_linked_mimalloc_is_the_major_version_the_allocator_is_written_for() {
        assert_eq!(mimalloc_version() / 10_000, MIMALLOC_MAJOR, "linked: {}", mimalloc_version());
        configure();
    }

    #[test]
    fn what_is_allocated_under_transient_comes_from_its_own_heap_and_nothing_else_does() {
        let layout = Layout::from_size_align(48, 8).unwrap();
        let aligned = Layout::from_size_align(40, 64).unwrap();
        // SAFETY: non-zero sizes; every block is freed below with its layout.
        let (small, grown, zeroed, over_aligned) = transient(|| unsafe {
            let small = Allocator.alloc(layout);
            let grown = Allocator.realloc(Allocator.alloc(layout), layout, 70_000);
            (small, grown, Allocator.alloc_zeroed(layout), Allocator.alloc(aligned))
        });
        // SAFETY: as above.
        let after = unsafe { Allocator.alloc(layout) };
        let heap = *TRANSIENT.get().expect("made by the first transient call") as *mut mi::mi_heap_t;
        // SAFETY: blocks mimalloc returned.
        let heap_of = |block: *mut u8| unsafe { mi_heap_of(block.cast()) };
        for (what, block) in
            [("allocated", small), ("reallocated", grown), ("zeroed", zeroed), ("aligned", over_aligned)]
        {
            assert_eq!(heap_of(block), heap, "{what} under transient");
        }
        assert_ne!(heap_of(after), heap, "allocated after transient returned");
        // SAFETY: each block with the layout it has.
        unsafe {
            Allocator.dealloc(small, layout);
            Allocator.dealloc(grown, Layout::from_size_align(70_000, 8).unwrap());
            Allocator.dealloc(zeroed, layout);
            Allocator.dealloc(over_aligned, aligned);
            Allocator.dealloc(after, layout);
        }
    }

    #[test]
    fn a_block_shrunk_into_a_smaller_size_class_moves_to_a_block_of_that_class() {
        let layout = Layout::from_size_align(384, 8).unwrap();
        // SAFETY: non-zero sizes, the layouts each block has; every block is freed with its own.
        unsafe {
            let block = Allocator.alloc(layout);
            for i in 0..384 {
                *block.add(i) = i as u8;
            }
            // As a Vec of 4 elements of 96 bytes shrunk to 3 (`into_boxed_slice`): mimalloc alone keeps the block.
            let shrunk = Allocator.realloc(block, layout, 288);
            assert_eq!(mi::mi_usable_size(shrunk.cast()), mi::mi_good_size(288), "not the 384-byte block");
            assert!((0..288).all(|i| *shrunk.add(i) == i as u8), "the bytes kept");
            // Within its size class, a block shrinks in place.
            let usable = mi::mi_usable_size(shrunk.cast());
            let same = Allocator.realloc(shrunk, Layout::from_size_align(288, 8).unwrap(), usable - 8);
            assert_eq!(same, shrunk);
            Allocator.dealloc(same, Layout::from_size_align(usable - 8, 8).unwrap());
        }
    }

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
