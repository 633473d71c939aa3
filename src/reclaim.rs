//! Safe retirement of live code: a userspace grace period plus per-image references.
//!
//! # The question
//! A thread may have fetched the branch at a patch site into a trampoline image and then been
//! preempted before doing anything else. When the site is poked away and the image retired, how do
//! we know that thread is not (or will not be) inside the image we free?
//!
//! # The answer, in three parts (the kernel's `bpf_tramp_image_put`)
//! 1. **Grace period 1** ([`synchronize`]). Every thread that runs JIT code is *online* for the
//!    whole run (`JitProgram::run` brackets the call with [`read_lock`] / [`read_unlock`]); a
//!    thread is *quiescent* outside runs and inside [`blocking`] sections. A grace period waits
//!    until every thread that was online when it started has been quiescent at least once. The
//!    poke that unlinked the image happened before the grace period started, and the poke ended
//!    with a core-serialising membarrier, so a thread that is online later than that can only
//!    fetch the new instruction. A thread that fetched the *old* branch was online before it and
//!    stays online (there is no quiescent point between a site and the trampoline's reference),
//!    so the grace period waits for it: it either left the run, or took the image's reference.
//! 2. **The image reference** ([`image_enter`] / [`image_exit`]). Trampoline code takes it right
//!    after entry and drops it just before its epilogue. It covers everything in between —
//!    tracer programs and the call of the original — including time spent quiescent in a
//!    blocking helper, which the grace period deliberately does not wait for. After grace
//!    period 1 no thread can take a new reference (nobody can still be on the way in), so the
//!    count only falls; we wait for it to reach zero.
//! 3. **Grace period 2.** A thread that dropped the reference still executes the image's last
//!    few instructions (restore registers, return). It is online while doing so, so a second grace
//!    period covers them. Then the image is freed.
//!
//! # Costs on the run path
//! [`read_lock`] and [`read_unlock`] are a thread-local load and a relaxed store each, with only
//! a compiler fence: no atomic read-modify-write and no hardware fence. References are a push and
//! a pop on a per-thread stack of image addresses, again plain relaxed stores. The writer pays:
//! `membarrier(PRIVATE_EXPEDITED)` makes every thread of the process execute a full memory barrier
//! (this is userspace RCU's "memb" flavour), which is what turns the readers' plain stores into
//! ordered ones from the writer's point of view.
//!
//! # Memory ordering
//! Reader: `epoch = GLOBAL` (relaxed load), `record.epoch = epoch` (relaxed store), compiler
//! fence, run; compiler fence, `record.epoch = 0` (relaxed store). Writer ([`synchronize`]):
//! `target = GLOBAL += 1`; membarrier (M1); wait for each record `epoch == 0 || epoch >= target`;
//! membarrier (M2). M1 splits every reader into "before" and "after" its barrier point. A reader
//! section whose `record.epoch` store preceded M1 is seen by the scan and waited for. A section
//! that started after its M1 point performs all its loads and instruction fetches after the
//! unlink (which precedes M1), so it cannot reach the retired image and need not be waited for.
//! M2 orders the readers' last accesses (before their `epoch = 0` store, which the scan saw)
//! before whatever the writer does next (freeing), since the barrier completes their earlier loads.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, compiler_fence};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::text::TextError;

/// How many images one thread can be inside at once (nested trampolines).
pub const MAX_NESTED_IMAGES: usize = 16;

/// The epoch readers copy when they go online; 0 means quiescent, so it starts at 1.
static GLOBAL_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Per-thread state the writer scans.
struct ThreadRecord {
    /// The kernel's id of the thread (for diagnostics and signal-mask checks by the poker).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    tid: i32,
    /// 0 when quiescent, else the global epoch when the outermost section began.
    epoch: AtomicU64,
    /// Images this thread holds a reference to, innermost last; unused slots are 0.
    inside: [AtomicUsize; MAX_NESTED_IMAGES],
}

impl ThreadRecord {
    fn new() -> ThreadRecord {
        ThreadRecord {
            tid: rustix::thread::gettid().as_raw_nonzero().get(),
            epoch: AtomicU64::new(0),
            inside: std::array::from_fn(|_| AtomicUsize::new(0)),
        }
    }
}

/// All live thread records. Threads register on first use and unregister when they exit.
static THREADS: Mutex<Vec<Arc<ThreadRecord>>> = Mutex::new(Vec::new());
/// References taken by threads whose per-thread stack was full; rare, so an atomic is fine.
static OVERFLOW_REFS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The owning thread's handle: its record plus state only it touches.
struct Local {
    record: Arc<ThreadRecord>,
    /// Read-side nesting depth (a program may run another one through a helper).
    nest: Cell<u32>,
    /// Number of used `inside` slots.
    depth: Cell<usize>,
    /// Depth beyond `MAX_NESTED_IMAGES`, counted in `OVERFLOW_REFS`.
    overflow: Cell<usize>,
}

impl Local {
    fn new() -> Local {
        let record = Arc::new(ThreadRecord::new());
        THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record.clone());
        Local {
            record,
            nest: Cell::new(0),
            depth: Cell::new(0),
            overflow: Cell::new(0),
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let mut threads = THREADS.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|r| !Arc::ptr_eq(r, &self.record));
    }
}

thread_local! {
    static LOCAL: Local = Local::new();
}

/// Starts a read-side section: this thread may now execute JIT code and patch sites. Nestable.
#[inline]
pub fn read_lock() {
    LOCAL.with(|l| {
        let n = l.nest.get();
        if n == 0 {
            let epoch = GLOBAL_EPOCH.load(Ordering::Relaxed);
            l.record.epoch.store(epoch, Ordering::Relaxed);
            // Keep the compiler from moving code of the section above the store; the CPU is
            // ordered by the writer's membarrier (see the module docs).
            compiler_fence(Ordering::SeqCst);
        }
        l.nest.set(n + 1);
    })
}

/// Ends a read-side section started by [`read_lock`].
#[inline]
pub fn read_unlock() {
    LOCAL.with(|l| {
        let n = l.nest.get();
        debug_assert!(n > 0, "read_unlock without read_lock");
        if n == 1 {
            compiler_fence(Ordering::SeqCst);
            l.record.epoch.store(0, Ordering::Relaxed);
        }
        l.nest.set(n.saturating_sub(1));
    })
}

/// A read-side section as a guard.
pub struct ReadGuard(());

impl ReadGuard {
    pub fn new() -> ReadGuard {
        read_lock();
        ReadGuard(())
    }
}

impl Default for ReadGuard {
    fn default() -> Self {
        ReadGuard::new()
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        read_unlock();
    }
}

/// Runs `f` with this thread quiescent, for helpers that block (sleep, wait on a lock or I/O), so
/// grace periods do not wait for them. Only correct where the code around the helper is protected
/// otherwise: the original program called by a trampoline, and tracer programs, are covered by the
/// trampoline image's reference. Do not block this way in a program installed with freplace.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    // Nesting restarts from zero inside `f`, so a run that `f` starts goes online properly.
    let (saved, nest) = LOCAL.with(|l| {
        compiler_fence(Ordering::SeqCst);
        let saved = l.record.epoch.load(Ordering::Relaxed);
        l.record.epoch.store(0, Ordering::Relaxed);
        (saved, l.nest.replace(0))
    });
    let result = f();
    LOCAL.with(|l| {
        l.nest.set(nest);
        if saved != 0 {
            // Re-enter with the current epoch: grace periods that started meanwhile need not
            // wait for us, as we hold references for everything we are inside.
            let epoch = GLOBAL_EPOCH.load(Ordering::Relaxed);
            l.record.epoch.store(epoch, Ordering::Relaxed);
        }
        compiler_fence(Ordering::SeqCst);
    });
    result
}

/// Whether this thread is currently in a read-side section (for assertions and tests).
pub fn is_online() -> bool {
    LOCAL.with(|l| l.record.epoch.load(Ordering::Relaxed) != 0)
}

/// Takes this thread's reference on the image at `image` (called by trampoline code on entry).
pub fn image_enter(image: usize) {
    LOCAL.with(|l| {
        let d = l.depth.get();
        if d < MAX_NESTED_IMAGES && l.overflow.get() == 0 {
            l.record.inside[d].store(image, Ordering::Relaxed);
            compiler_fence(Ordering::SeqCst);
            l.depth.set(d + 1);
        } else {
            OVERFLOW_REFS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(image);
            l.overflow.set(l.overflow.get() + 1);
        }
    })
}

/// Drops the reference taken by the matching [`image_enter`].
pub fn image_exit(image: usize) {
    LOCAL.with(|l| {
        if l.overflow.get() > 0 {
            let mut refs = OVERFLOW_REFS.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = refs.iter().rposition(|&a| a == image) {
                refs.swap_remove(i);
            }
            l.overflow.set(l.overflow.get() - 1);
            return;
        }
        let d = l.depth.get();
        if d == 0 {
            return;
        }
        compiler_fence(Ordering::SeqCst);
        l.record.inside[d - 1].store(0, Ordering::Relaxed);
        l.depth.set(d - 1);
    })
}

/// Whether any thread holds a reference on `image`. Meaningful once no thread can take a new one.
pub fn image_referenced(image: usize) -> bool {
    let threads = THREADS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let in_stacks = threads.iter().any(|r| {
        r.inside
            .iter()
            .any(|slot| slot.load(Ordering::Acquire) == image)
    });
    in_stacks
        || OVERFLOW_REFS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&image)
}

/// Kernel thread ids of the threads that have run JIT code and not exited: the threads that may
/// execute a patch site.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn registered_thread_ids() -> Vec<i32> {
    let threads = THREADS.lock().unwrap_or_else(|e| e.into_inner());
    threads.iter().map(|r| r.tid).collect()
}

/// Makes every thread of the process execute a full memory barrier.
fn barrier_all_threads() -> Result<(), TextError> {
    crate::text::sync_all_threads().map(|_| ())
}

/// Waits for a grace period: every thread that was in a read-side section when this was called
/// has left it (or gone quiescent in [`blocking`]) at least once. Threads are polled with a short
/// back-off; the wait depends only on their state, never on a time-out.
pub fn synchronize() -> Result<(), TextError> {
    let target = GLOBAL_EPOCH.fetch_add(1, Ordering::SeqCst) + 1;
    barrier_all_threads()?;
    let threads = THREADS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for record in &threads {
        let mut spins = 0u32;
        loop {
            let e = record.epoch.load(Ordering::Acquire);
            if e == 0 || e >= target {
                break;
            }
            backoff(&mut spins);
        }
    }
    barrier_all_threads()
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// What to free once retirement completes (the trampoline layer's image).
pub trait Retirable: Send {
    /// Address whose references [`image_enter`] tracks.
    fn image_addr(&self) -> usize;
    /// Called on the reclaimer thread after both grace periods and the reference drain.
    fn free(self: Box<Self>);
}

/// Where a retired image is in its retirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetireState {
    /// Waiting for grace period 1.
    Gp1,
    /// Waiting for the references to drain.
    Draining,
    /// Waiting for grace period 2.
    Gp2,
}

/// Test hook: observes each state transition of each retired image (address, new state).
pub type RetireObserver = fn(usize, RetireState);

struct Reclaimer {
    queue: Mutex<VecDeque<Box<dyn Retirable>>>,
    wake: Condvar,
    /// Images retired and not yet freed.
    pending: AtomicUsize,
    idle: Condvar,
    idle_lock: Mutex<()>,
    observer: Mutex<Option<RetireObserver>>,
    started: AtomicBool,
}

static RECLAIMER: OnceLock<Reclaimer> = OnceLock::new();

fn reclaimer() -> &'static Reclaimer {
    let r = RECLAIMER.get_or_init(|| Reclaimer {
        queue: Mutex::new(VecDeque::new()),
        wake: Condvar::new(),
        pending: AtomicUsize::new(0),
        idle: Condvar::new(),
        idle_lock: Mutex::new(()),
        observer: Mutex::new(None),
        started: AtomicBool::new(false),
    });
    if !r.started.swap(true, Ordering::AcqRel) {
        std::thread::Builder::new()
            .name("livebpf-reclaim".into())
            .spawn(move || reclaim_loop(r))
            .expect("spawning the reclaimer thread");
    }
    r
}

fn observe(r: &Reclaimer, addr: usize, state: RetireState) {
    let observer = *r.observer.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = observer {
        f(addr, state);
    }
}

fn reclaim_loop(r: &'static Reclaimer) {
    loop {
        let batch: Vec<Box<dyn Retirable>> = {
            let mut q = r.queue.lock().unwrap_or_else(|e| e.into_inner());
            while q.is_empty() {
                q = r.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            q.drain(..).collect()
        };
        // One grace period serves the whole batch: all of it was unlinked before it started.
        for img in &batch {
            observe(r, img.image_addr(), RetireState::Gp1);
        }
        while synchronize().is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for img in &batch {
            observe(r, img.image_addr(), RetireState::Draining);
            let mut spins = 0;
            while image_referenced(img.image_addr()) {
                backoff(&mut spins);
            }
            observe(r, img.image_addr(), RetireState::Gp2);
        }
        while synchronize().is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let n = batch.len();
        for img in batch {
            img.free();
        }
        r.pending.fetch_sub(n, Ordering::AcqRel);
        let _guard = r.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
        r.idle.notify_all();
    }
}

/// Hands an unlinked image to the reclaimer thread, which frees it after grace period 1, the
/// reference drain and grace period 2. The caller must already have poked every site that could
/// branch into it (and, for images with fexit, its `ip_after_call`).
pub fn retire(image: Box<dyn Retirable>) {
    let r = reclaimer();
    r.pending.fetch_add(1, Ordering::AcqRel);
    r.queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_back(image);
    r.wake.notify_one();
}

/// Images retired and not yet freed.
pub fn pending() -> usize {
    RECLAIMER
        .get()
        .map_or(0, |r| r.pending.load(Ordering::Acquire))
}

/// Blocks until every image retired so far has been freed. Must not be called from a read-side
/// section (the grace period would wait for the caller).
pub fn flush() {
    let Some(r) = RECLAIMER.get() else {
        return;
    };
    let mut guard = r.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
    while r.pending.load(Ordering::Acquire) != 0 {
        guard = r
            .idle
            .wait_timeout(guard, Duration::from_millis(10))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Installs a test observer of retirement state transitions.
pub fn set_observer(observer: Option<RetireObserver>) {
    *reclaimer()
        .observer
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = observer;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn grace_period_waits_for_online_threads_only() {
        static RELEASE: AtomicBool = AtomicBool::new(false);
        static ENTERED: AtomicBool = AtomicBool::new(false);
        let reader = std::thread::spawn(|| {
            read_lock();
            ENTERED.store(true, Ordering::SeqCst);
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            read_unlock();
        });
        while !ENTERED.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let writer = std::thread::spawn(move || {
            synchronize().unwrap();
            d.store(true, Ordering::SeqCst);
        });
        // The writer cannot finish while the reader is online; check a few times, then release.
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(1));
            assert!(!done.load(Ordering::SeqCst), "grace period ended early");
        }
        RELEASE.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        reader.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // With no reader online a grace period completes on its own.
        synchronize().unwrap();
    }

    #[test]
    fn blocking_sections_are_quiescent_and_references_are_tracked() {
        read_lock();
        assert!(is_online());
        image_enter(0x1234);
        assert!(image_referenced(0x1234));
        blocking(|| {
            assert!(!is_online());
            // A grace period completes while this thread blocks inside a run.
            std::thread::spawn(|| synchronize().unwrap())
                .join()
                .unwrap();
        });
        assert!(is_online());
        image_exit(0x1234);
        assert!(!image_referenced(0x1234));
        read_unlock();
        assert!(!is_online());
    }

    #[test]
    fn overflowing_the_reference_stack_still_tracks() {
        for i in 0..MAX_NESTED_IMAGES + 3 {
            image_enter(0x10_000 + i);
        }
        assert!(image_referenced(0x10_000 + MAX_NESTED_IMAGES + 2));
        for i in (0..MAX_NESTED_IMAGES + 3).rev() {
            image_exit(0x10_000 + i);
        }
        for i in 0..MAX_NESTED_IMAGES + 3 {
            assert!(!image_referenced(0x10_000 + i));
        }
    }
}
