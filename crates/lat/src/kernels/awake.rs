//! Keeping the thread pool's workers at hand through a run of short parallel loops.
//!
//! A decoding step is some forty parallel loops of 50-300 µs each (a layer's products, its
//! attention, its feed-forward layer), with short serial pieces between them. A rayon worker
//! that finds no work for a few dozen rounds goes to sleep, and waking it for the next loop
//! takes tens of microseconds: by then the thread that started the loop has done most of it
//! alone. [`with_workers_awake`] keeps the other workers looking for work for as long as a step
//! runs, so each loop is shared from its start.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::Yield;

/// Pause instructions between two looks for work (a few hundred nanoseconds).
const PAUSES: usize = 64;

thread_local! {
    /// Whether this thread is inside [`with_workers_awake`] already.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on this thread while every other worker of the pool polls for work instead of
/// sleeping; they go back to rayon's usual waiting when `f` returns (or panics). Outside a
/// rayon pool, with one thread, or nested, it only runs `f`.
pub fn with_workers_awake<R>(f: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else { return f() };
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0 || INSIDE.get() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        for _ in 0..others {
            scope.spawn(|_| {
                // This thread has `f` to finish, and a poller here would wait for itself.
                if rayon::current_thread_index() == Some(me) {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(Yield::Executed) {
                        // A pause between looks: each look touches the other deques' atomics.
                        (0..PAUSES).for_each(|_| std::hint::spin_loop());
                    }
                }
            });
        }
        // Set on the way out however `f` ends: the scope waits for the pollers.
        struct Finish<'a>(&'a AtomicBool);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
                INSIDE.set(false);
            }
        }
        let _finish = Finish(&done);
        INSIDE.set(true);
        f()
    })
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::with_workers_awake;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    #[test]
    fn loops_inside_give_what_they_give_outside() {
        let work = || (0..64u64).map(|i| (0..1000u64).into_par_iter().map(|j| i * j % 7).sum::<u64>()).collect::<Vec<_>>();
        let plain = work();
        for threads in [1, 2, 4] {
            assert_eq!(pool(threads).install(|| with_workers_awake(work)), plain, "{threads} threads");
            assert_eq!(pool(threads).install(|| with_workers_awake(|| with_workers_awake(work))), plain, "nested, {threads} threads");
        }
        // Outside any pool: just runs.
        assert_eq!(with_workers_awake(|| 7), 7);
    }

    #[test]
    fn a_panic_inside_reaches_the_caller_and_the_pool_goes_on() {
        let pool = pool(2);
        let caught = pool.install(|| std::panic::catch_unwind(|| with_workers_awake(|| (0..100).into_par_iter().for_each(|i| assert!(i < 50, "stop")))));
        assert!(caught.is_err());
        // The pollers stopped: the pool still runs work, and a new call starts afresh.
        assert_eq!(pool.install(|| with_workers_awake(|| (0..100u32).into_par_iter().sum::<u32>())), 4950);
    }
}
