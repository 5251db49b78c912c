//! A global allocator that counts the heap in use and its peak, for the memory tests. A test
//! binary that includes it (`#[path = "common/counting.rs"] mod counting;`) measures every
//! allocation of its process, so such a binary runs its cases one after another.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(l.size(), SeqCst) + l.size();
        PEAK.fetch_max(now, SeqCst);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CURRENT.fetch_sub(l.size(), SeqCst);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The peak heap of `f`, above what was allocated before it.
pub fn peak_of(f: impl FnOnce()) -> u64 {
    let before = CURRENT.load(SeqCst);
    PEAK.store(before, SeqCst);
    f();
    (PEAK.load(SeqCst) - before) as u64
}
