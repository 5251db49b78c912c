//! glibc's allocator settings for this library's work, which a program sets once, before it
//! starts threads. `lat` does so for every command; a program using the library calls
//! [`configure`] itself (elsewhere than Linux with glibc it does nothing).

/// What a program mostly does, which decides the settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Passes over whole sequences: training, evaluation, forward passes.
    WholeSequences,
    /// Decoding steps (generation, serving).
    Decoding,
}

/// Keeps freed memory in the heap for reuse instead of returning it to the kernel: a training
/// step frees and allocates the same large tensors every step, and by default glibc serves them
/// with fresh mappings and unmaps them again, so every step faults (and zeroes) its memory back
/// in; keeping it makes steps up to 25 % faster.
///
/// For [`Work::WholeSequences`] also one heap for all threads: with glibc's heap per thread,
/// the large tensors that the pool's workers allocate came and went in heaps the other threads
/// could not reuse, and a forward pass at 4 k tokens took 4-8x the page faults and a training
/// step up to 15 % longer. And that heap serves every size: glibc maps blocks of 32 MiB and
/// more (the most its threshold can be set to) afresh each time, and at 8 k tokens the seed
/// model's projections and feed-forward outputs are that large, so its training step faulted
/// about 450 MiB back in (115 000 pages, ~3 µs each here); from the heap it reuses them, at
/// the same peak. Decoding steps instead allocate many small buffers on every thread at once,
/// which one heap makes wait on its lock (a 32-stream step 15 % longer), so
/// [`Work::Decoding`] keeps a heap per thread.
pub fn configure(work: Work) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's settings, which it reads under its own locks.
    unsafe {
        if work == Work::WholeSequences {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = work;
}

/// Returns the heap's free pages to the system, which [`configure`] otherwise keeps: for a
/// server that has gone idle after its streams finished.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
