//! Safe retirement of live code: a userspace grace period plus per-image references.
//!
//! # The question
//! A thread may have fetched the branch at a patch site into a trampoline image and then been
//! preempted before doing anything else. When the site is poked away and the image retired, how do
//! we know that thread is not (or will not be) inside the image we free?
//!
//! # The answer, in three parts (the kernel's `bpf_tramp_image_put`)
//! 1. **Grace period 1** ([`synchronize`]). Every thread that runs JIT code is *online* for the
//!    whole run (`JitProgram::run` brackets the call with a [`ReadGuard`]); a
//!    thread is *quiescent* outside runs and inside [`blocking`] sections. A grace period waits
//!    until every thread that was online when it started has been quiescent at least once. The
//!    poke that unlinked the image happened before the grace period started, and the poke ended
//!    with a core-serialising membarrier, so a thread that is online later than that can only
//!    fetch the new instruction. A thread that fetched the *old* branch was online before it and
//!    stays online (there is no quiescent point between a site and the trampoline's reference),
//!    so the grace period waits for it: it either left the run, or took the image's reference.
//! 2. **The image reference** (`image_enter` / `image_exit`). Trampoline code takes it right
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
//! Going online and offline ([`ReadGuard`]) are a thread-local load and a relaxed store each, with only
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

mod core;

use self::core::{Domain, DomainHold, Reader, Retiring, Worker};
pub use self::core::{MAX_NESTED_IMAGES, RetireState};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, OnceLock};
use std::time::Duration;

/// What [`core`] is built on in the library: std's primitives, and a compiler fence on the read
/// side (the writer's membarrier supplies the hardware ordering; see the module docs).
mod shim {
    pub use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    pub use std::sync::{Arc, Mutex, MutexGuard};

    #[inline(always)]
    pub fn reader_fence() {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    }

    pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The process's retirement domain.
static DOMAIN: LazyLock<Domain> = LazyLock::new(Domain::new);

/// The calling thread's registration, made on first use and undone when the thread exits.
struct Local {
    domain: &'static Domain,
    reader: Reader,
}

impl Local {
    fn new() -> Local {
        register_fork_hooks();
        REGISTERED.set(true);
        let domain: &'static Domain = &DOMAIN;
        Local {
            reader: domain.register(current_tid()),
            domain,
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Before anything of `self` goes: from here on `with_local` takes the slow path, which
        // finds `LOCAL` destroyed.
        LOCAL_PTR.set(std::ptr::null());
        self.domain.unregister(&self.reader);
    }
}

thread_local! {
    static LOCAL: Local = Local::new();
    /// Whether `LOCAL` was made on this thread (readable without creating it).
    static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// `LOCAL`'s address while it lives, else null. A `const` cell without a destructor is read
    /// with one thread-pointer-relative load, where `LOCAL` (lazily made, with a destructor)
    /// costs a state check and a call on every access: this is the run path's way in.
    static LOCAL_PTR: std::cell::Cell<*const Local> = const { std::cell::Cell::new(std::ptr::null()) };
    /// What the fork prepare handler holds until the parent or child handler.
    static FORK_HELD: std::cell::RefCell<Option<ForkHeld>> = const { std::cell::RefCell::new(None) };
}

struct ForkHeld {
    domain: DomainHold<'static>,
    queue: Option<std::sync::MutexGuard<'static, Vec<Retiring<Item>>>>,
    status: Option<std::sync::MutexGuard<'static, BTreeMap<u64, PendingRetirement>>>,
}

fn register_fork_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::text::fork::register_inner(crate::text::fork::Hooks {
            prepare: fork_prepare,
            parent: fork_parent,
            child: fork_child,
        })
    });
}

fn fork_prepare() {
    let reclaimer = RECLAIMER.get();
    let held = ForkHeld {
        domain: DOMAIN.hold(),
        queue: reclaimer.map(|r| lock(&r.queue)),
        status: reclaimer.map(|r| lock(&r.status)),
    };
    FORK_HELD.with(|h| *h.borrow_mut() = Some(held));
}

fn fork_parent() {
    FORK_HELD.with(|h| h.borrow_mut().take());
}

/// The child has only the forking thread: forget the others (their records would hold grace
/// periods forever), and restart the reclaimer, whose thread did not survive. Items it was
/// draining are lost with it (their memory leaks in the child; nothing unsafe); queued ones are
/// retired by the new thread.
fn fork_child() {
    let Some(mut held) = FORK_HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    let keep = if REGISTERED.get() {
        LOCAL
            .try_with(|l| held.domain.retain_only(Some(&l.reader)))
            .is_ok()
    } else {
        false
    };
    if !keep {
        held.domain.retain_only(None);
    }
    if let (Some(r), Some(queue), Some(status)) =
        (RECLAIMER.get(), held.queue.as_ref(), held.status.as_mut())
    {
        status.retain(|id, _| queue.iter().any(|item| item.id == *id));
        r.pending.store(queue.len(), Ordering::Release);
        r.started.store(false, Ordering::Release);
        // The child has neither the reclaimer nor any thread waiting in `flush`.
        r.collecting.store(false, Ordering::Release);
        r.flushing.store(0, Ordering::Release);
    }
    // The next `retire` or `flush` starts a new reclaimer thread.
    drop(held);
}

fn current_tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// Runs `f` on this thread's registration; `None` once the thread-local is destroyed (code
/// running in another thread-local's destructor).
#[inline]
fn with_local<R>(f: impl FnOnce(&Local) -> R) -> Option<R> {
    let local = LOCAL_PTR.get();
    if !local.is_null() {
        // SAFETY: non-null only between `LOCAL`'s first access below and the start of its
        // destructor; meanwhile it lives in this thread's storage, which does not move, and is
        // only ever shared (`&Local`).
        return Some(f(unsafe { &*local }));
    }
    with_local_slow(f)
}

/// [`with_local`]'s first access on a thread (which makes `LOCAL` and publishes its address),
/// and every access once it is destroyed.
#[cold]
#[inline(never)]
fn with_local_slow<R>(f: impl FnOnce(&Local) -> R) -> Option<R> {
    LOCAL
        .try_with(|l| {
            LOCAL_PTR.set(l as *const Local);
            f(l)
        })
        .ok()
}

/// A read-side section: while it lives, this thread may execute JIT code and patch sites, and
/// retired images wait for it. Every JIT run holds one; nesting is allowed.
///
/// Leaking a guard (`mem::forget`) keeps the thread online: grace periods, and so retirement,
/// then wait forever. Nothing unsound happens. A guard is its thread's section, so it is neither
/// `Send` nor `Sync`.
pub struct ReadGuard {
    /// Null, or a registration of its own (a leaked `Box`, freed by `drop`) when the thread's
    /// thread-local is already destroyed. A raw pointer, so the guard has no drop glue besides
    /// `Drop::drop`, whose common case inlines.
    fallback: *mut Reader,
}

impl ReadGuard {
    /// Goes online (or deeper, when already online). The common case inlines into the run path:
    /// one thread-local load and the section's plain stores (`with_local`'s fast path).
    #[inline(always)]
    pub fn new() -> ReadGuard {
        if with_local(|l| l.reader.read_lock(l.domain)).is_some() {
            return ReadGuard {
                fallback: std::ptr::null_mut(),
            };
        }
        ReadGuard::new_fallback()
    }

    /// A section run from a thread-local destructor: a registration for its length.
    #[cold]
    #[inline(never)]
    fn new_fallback() -> ReadGuard {
        let reader = DOMAIN.register(current_tid());
        reader.read_lock(&DOMAIN);
        ReadGuard {
            fallback: Box::into_raw(Box::new(reader)),
        }
    }

    #[cold]
    #[inline(never)]
    fn drop_fallback(reader: *mut Reader) {
        // SAFETY: made by `Box::into_raw` in `new_fallback`, freed only here, once.
        let reader = unsafe { Box::from_raw(reader) };
        reader.read_unlock();
        DOMAIN.unregister(&reader);
    }
}

impl Default for ReadGuard {
    fn default() -> Self {
        ReadGuard::new()
    }
}

impl Drop for ReadGuard {
    #[inline(always)]
    fn drop(&mut self) {
        if self.fallback.is_null() {
            with_local(|l| l.reader.read_unlock());
        } else {
            ReadGuard::drop_fallback(self.fallback);
        }
    }
}

/// Runs `f` with this thread quiescent, for helpers that block (sleep, wait on a lock or I/O), so
/// that grace periods do not wait for them.
///
/// # Safety
/// While `f` runs, retirement may free any image whose reference this thread does not hold.
/// The caller must be where every image it will return into is referenced: a helper called by
/// a traced program or by a tracer is (the trampoline image holds the reference; a program's
/// own image is only freed after its last run). A helper called by a program installed with
/// freplace is not: nothing references the replacement, so it must not block this way.
pub unsafe fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let saved = with_local(|l| l.reader.quiesce());
    let result = f();
    if let Some(saved) = saved {
        with_local(|l| l.reader.resume(l.domain, saved));
    }
    result
}

/// Whether this thread is in a read-side section.
pub fn is_online() -> bool {
    with_local(|l| l.reader.is_online()).unwrap_or(false)
}

/// A native function's entry stub, whose caller is not inside a run, in one thread-local access:
/// opens a read-side section, *then* calls `pick` for the image to enter, and takes that image's
/// reference; when `pick` gives 0 (nothing attached) the section is closed again. Returns the
/// image, or 0 — also when this thread's registration is already destroyed (a native call from
/// a thread-local destructor), which then runs untraced.
#[inline]
pub(crate) fn enter_native(pick: impl FnOnce() -> usize) -> usize {
    with_local(|l| {
        l.reader.read_lock(l.domain);
        let image = pick();
        if image == 0 {
            l.reader.read_unlock();
        } else {
            l.reader.image_enter(l.domain, image);
        }
        image
    })
    .unwrap_or(0)
}

/// The stub's exit after [`enter_native`] gave `image`: drops the reference, closes the section.
#[inline]
pub(crate) fn exit_native(image: usize) {
    with_local(|l| {
        l.reader.image_exit(l.domain, image);
        l.reader.read_unlock();
    });
}

/// Opens a read-side section without a guard (a native image, back from the function's body).
pub(crate) fn enter_section() {
    with_local(|l| l.reader.read_lock(l.domain));
}

/// Closes a section opened by [`enter_section`] or [`enter_native`] (a native image, before the
/// function's body).
pub(crate) fn leave_section() {
    with_local(|l| l.reader.read_unlock());
}

/// Takes this thread's reference on `image` (trampoline code, on entry). `image` is non-zero.
#[inline]
pub(crate) fn image_enter(image: usize) {
    if with_local(|l| l.reader.image_enter(l.domain, image)).is_none() {
        DOMAIN.enter_shared(image);
    }
}

/// Drops the reference taken by the matching [`image_enter`].
#[inline]
pub(crate) fn image_exit(image: usize) {
    if with_local(|l| l.reader.image_exit(l.domain, image)).is_none() {
        DOMAIN.exit_shared(image);
    }
}

/// Kernel thread ids of the threads that have run JIT code and not exited: the threads that may
/// execute a patch site.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn registered_thread_ids() -> Vec<i32> {
    DOMAIN.thread_ids()
}

/// Makes every thread of the process execute a full memory barrier (retrying: a registered
/// membarrier does not fail in practice, and retirement must not give up).
pub(crate) fn barrier_all_threads() {
    while crate::text::sync_all_threads().is_err() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn backoff(spins: u32) {
    if spins < 64 {
        std::hint::spin_loop();
    } else if spins < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Waits for a grace period: every thread that was in a read-side section when this was called
/// has left it (or gone quiescent in [`blocking`]) at least once. The wait depends only on the
/// threads' state, never on a time-out. Called from a read-side section it would wait for the
/// caller itself, so it refuses with [`ReclaimError::Online`].
pub fn synchronize() -> Result<(), ReclaimError> {
    if is_online() {
        return Err(ReclaimError::Online);
    }
    DOMAIN.synchronize(&mut barrier_all_threads, &mut backoff);
    Ok(())
}

/// Errors of the reclaim API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReclaimError {
    /// A wait for retirement was asked for from inside a JIT run.
    #[error(
        "cannot wait for a grace period from inside a JIT run (a helper or tracer): it would wait for itself; wait from outside the run"
    )]
    Online,
}

/// What to free once retirement completes (the trampoline layer's images and programs).
pub trait Retirable: Send {
    /// The address whose references trampoline code takes, or `None` when nothing takes
    /// references on it (then only the grace periods protect it).
    fn image_addr(&self) -> Option<usize>;
    /// Called on the reclaimer thread after both grace periods and the reference drain.
    fn free(self: Box<Self>);
}

/// Test hook: observes each state change of each retired item (its image address, 0 for items
/// without one, and the new state).
pub type RetireObserver = fn(usize, RetireState);

/// One retired item not yet freed, for [`pending_retirements`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingRetirement {
    /// The image whose references must drain, if the item has one.
    pub image: Option<usize>,
    /// What the item waits for.
    pub state: RetireState,
}

type Item = Box<dyn Retirable>;

struct Reclaimer {
    queue: Mutex<Vec<Retiring<Item>>>,
    wake: Condvar,
    /// Items retired and not yet freed.
    pending: AtomicUsize,
    /// What each item waits for, by id.
    status: Mutex<BTreeMap<u64, PendingRetirement>>,
    next_id: AtomicU64,
    idle: Condvar,
    idle_lock: Mutex<()>,
    observer: Mutex<Option<RetireObserver>>,
    /// Whether the reclaimer thread runs (cleared in a forked child, which has none).
    started: AtomicBool,
    /// Whether the reclaimer is collecting a batch ([`COALESCE`]): `retire` need not wake it.
    collecting: AtomicBool,
    /// Callers of [`flush`] waiting: the reclaimer works at once, without collecting.
    flushing: AtomicUsize,
}

/// How long the reclaimer collects retirements before one grace period serves them all, and how
/// often it polls items whose references drain. A grace period's membarriers interrupt every
/// thread of the process and contend, in the kernel, with the membarriers of the next poke: run
/// one per retirement and an attach right after a detach waits for them (attach 6–10 µs, detach
/// 2–10 µs here, against 1.4–3.4 µs and 0.8–1.2 µs collecting). A retired image is freed up to
/// this much later; [`flush`] does not wait for the window.
const COALESCE: Duration = Duration::from_millis(1);
/// The drain poll while a [`flush`] waits.
const FLUSH_POLL: Duration = Duration::from_micros(200);

static RECLAIMER: OnceLock<Reclaimer> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shim::lock(m)
}

fn reclaimer() -> &'static Reclaimer {
    let r = RECLAIMER.get_or_init(|| Reclaimer {
        queue: Mutex::new(Vec::new()),
        wake: Condvar::new(),
        pending: AtomicUsize::new(0),
        status: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(1),
        idle: Condvar::new(),
        idle_lock: Mutex::new(()),
        observer: Mutex::new(None),
        started: AtomicBool::new(false),
        collecting: AtomicBool::new(false),
        flushing: AtomicUsize::new(0),
    });
    if !r.started.swap(true, Ordering::AcqRel) {
        let spawned = std::thread::Builder::new()
            .name("livebpf-reclaim".into())
            .spawn(move || reclaim_loop(r));
        if spawned.is_err() {
            // Items stay queued; the next `retire` tries again.
            r.started.store(false, Ordering::Release);
        }
    }
    r
}

fn set_state(r: &Reclaimer, item: &Retiring<Item>, state: RetireState) {
    lock(&r.status).insert(
        item.id,
        PendingRetirement {
            image: item.image,
            state,
        },
    );
    let observer = *lock(&r.observer);
    if let Some(f) = observer {
        f(item.image.unwrap_or(0), state);
    }
}

fn reclaim_loop(r: &'static Reclaimer) {
    let mut worker: Worker<Item> = Worker::default();
    loop {
        let fresh = {
            let mut q = lock(&r.queue);
            if q.is_empty() {
                if worker.is_draining() {
                    // Poll the drains, but wake at once for new work.
                    let poll = if r.flushing.load(Ordering::Acquire) == 0 {
                        COALESCE
                    } else {
                        FLUSH_POLL
                    };
                    q = r
                        .wake
                        .wait_timeout(q, poll)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                } else {
                    while q.is_empty() {
                        q = r.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            // Collect a batch: retirements of the next `COALESCE` share this one's grace
            // period. A `flush` ends the window (it notifies under the queue lock, after raising
            // `flushing`).
            if !q.is_empty() && r.flushing.load(Ordering::Acquire) == 0 {
                r.collecting.store(true, Ordering::Release);
                let deadline = std::time::Instant::now() + COALESCE;
                loop {
                    let now = std::time::Instant::now();
                    if now >= deadline || r.flushing.load(Ordering::Acquire) != 0 {
                        break;
                    }
                    q = r
                        .wake
                        .wait_timeout(q, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                r.collecting.store(false, Ordering::Release);
            }
            std::mem::take(&mut *q)
        };
        let freed = worker.step(
            &DOMAIN,
            fresh,
            &mut barrier_all_threads,
            &mut backoff,
            &mut |item, state| set_state(r, item, state),
        );
        if freed.is_empty() {
            continue;
        }
        let n = freed.len();
        {
            let mut status = lock(&r.status);
            for item in &freed {
                status.remove(&item.id);
            }
        }
        for item in freed {
            item.item.free();
        }
        r.pending.fetch_sub(n, Ordering::AcqRel);
        let _guard = lock(&r.idle_lock);
        r.idle.notify_all();
    }
}

/// Hands an unlinked item to the reclaimer thread, which frees it after grace period 1, the drain
/// of its image's references and grace period 2. Retirements are independent: one whose
/// references do not drain (a thread blocked inside the image) holds up no other. The caller
/// must already have poked every site that could branch into the image (and, for images with
/// fexit, its `ip_after_call`).
pub fn retire(item: Box<dyn Retirable>) {
    let r = reclaimer();
    let item = Retiring {
        image: item.image_addr().filter(|&a| a != 0),
        item,
        id: r.next_id.fetch_add(1, Ordering::Relaxed),
    };
    r.pending.fetch_add(1, Ordering::AcqRel);
    set_state(r, &item, RetireState::Gp1);
    let mut q = lock(&r.queue);
    q.push(item);
    // A collecting reclaimer takes it at its deadline: waking it would only cost a system call.
    // (`collecting` changes only under the queue lock, held here.)
    if !r.collecting.load(Ordering::Acquire) {
        r.wake.notify_one();
    }
}

/// Items retired and not yet freed.
pub fn pending() -> usize {
    RECLAIMER
        .get()
        .map_or(0, |r| r.pending.load(Ordering::Acquire))
}

/// Every item retired and not yet freed, with what it waits for (a `Draining` item that stays
/// is held by a thread inside its image, e.g. blocked in a helper).
pub fn pending_retirements() -> Vec<PendingRetirement> {
    RECLAIMER
        .get()
        .map_or_else(Vec::new, |r| lock(&r.status).values().copied().collect())
}

/// Blocks until every item retired so far has been freed. From inside a JIT run it would wait
/// for itself, so there it returns [`ReclaimError::Online`] at once.
pub fn flush() -> Result<(), ReclaimError> {
    if is_online() {
        return Err(ReclaimError::Online);
    }
    if RECLAIMER.get().is_none() {
        return Ok(());
    }
    // Starts the reclaimer thread if it is not running (in a forked child).
    let r = reclaimer();
    r.flushing.fetch_add(1, Ordering::AcqRel);
    {
        // Under the queue lock: the reclaimer is either waiting (and woken) or about to read
        // `flushing`.
        let _q = lock(&r.queue);
        r.wake.notify_one();
    }
    let mut guard = lock(&r.idle_lock);
    while r.pending.load(Ordering::Acquire) != 0 {
        guard = r
            .idle
            .wait_timeout(guard, Duration::from_millis(10))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    drop(guard);
    r.flushing.fetch_sub(1, Ordering::AcqRel);
    Ok(())
}

/// Installs a test observer of retirement state changes.
pub fn set_observer(observer: Option<RetireObserver>) {
    *lock(&reclaimer().observer) = observer;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn no_barrier() {}

    #[test]
    fn grace_period_waits_for_online_threads_only() {
        let domain = Arc::new(Domain::new());
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let d = domain.clone();
        let reader = std::thread::spawn(move || {
            let r = d.register(1);
            r.read_lock(&d);
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            assert!(r.read_unlock());
            d.unregister(&r);
        });
        entered_rx.recv().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (d, flag) = (domain.clone(), done.clone());
        let writer = std::thread::spawn(move || {
            d.synchronize(&mut no_barrier, &mut backoff);
            flag.store(true, Ordering::SeqCst);
        });
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(1));
            assert!(!done.load(Ordering::SeqCst), "grace period ended early");
        }
        release_tx.send(()).unwrap();
        writer.join().unwrap();
        reader.join().unwrap();
        // With no reader online a grace period completes on its own.
        domain.synchronize(&mut no_barrier, &mut backoff);
    }

    #[test]
    fn quiescing_inside_a_section_lets_grace_periods_pass_and_references_hold() {
        let domain = Arc::new(Domain::new());
        let r = domain.register(1);
        r.read_lock(&domain);
        assert!(r.is_online());
        r.image_enter(&domain, 0x1234);
        assert!(domain.referenced(0x1234));
        let saved = r.quiesce();
        assert!(!r.is_online());
        let d = domain.clone();
        std::thread::spawn(move || d.synchronize(&mut no_barrier, &mut backoff))
            .join()
            .unwrap();
        r.resume(&domain, saved);
        assert!(r.is_online());
        r.image_exit(&domain, 0x1234);
        assert!(!domain.referenced(0x1234));
        assert!(r.read_unlock());
        assert!(!r.is_online());
        assert!(!r.read_unlock(), "an unbalanced unlock is refused");
    }

    #[test]
    fn empty_slots_are_no_reference() {
        // The fault behind "one freplace detach wedges all reclamation": a drain of address 0
        // matched every empty slot.
        let domain = Domain::new();
        let _r = domain.register(1);
        assert!(!domain.referenced(0x40));
    }

    #[test]
    fn overflowing_the_reference_stack_still_tracks() {
        let domain = Domain::new();
        let r = domain.register(1);
        for i in 0..MAX_NESTED_IMAGES + 3 {
            r.image_enter(&domain, 0x10_000 + i);
        }
        assert!(domain.referenced(0x10_000 + MAX_NESTED_IMAGES + 2));
        for i in (0..MAX_NESTED_IMAGES + 3).rev() {
            r.image_exit(&domain, 0x10_000 + i);
        }
        for i in 0..MAX_NESTED_IMAGES + 3 {
            assert!(!domain.referenced(0x10_000 + i));
        }
    }

    #[test]
    fn a_stuck_drain_does_not_hold_up_other_retirements() {
        let domain = Domain::new();
        let holder = domain.register(1);
        holder.image_enter(&domain, 0xaaa0);
        let mut worker: Worker<&'static str> = Worker::default();
        let item = |image, name: &'static str, id| Retiring {
            image: Some(image),
            item: name,
            id,
        };
        let step = |w: &mut Worker<&'static str>, fresh: Vec<Retiring<&'static str>>| {
            w.step(
                &domain,
                fresh,
                &mut no_barrier,
                &mut backoff,
                &mut |_, _| {},
            )
            .into_iter()
            .map(|r| r.item)
            .collect::<Vec<_>>()
        };
        assert!(step(&mut worker, vec![item(0xaaa0, "held", 1)]).is_empty());
        assert!(step(&mut worker, vec![item(0xbbb0, "free", 2)]).is_empty());
        // "free" drained at once; "held" stays while its reference does.
        assert_eq!(step(&mut worker, vec![]), vec!["free"]);
        assert!(step(&mut worker, vec![]).is_empty());
        assert!(worker.is_draining());
        holder.image_exit(&domain, 0xaaa0);
        assert_eq!(step(&mut worker, vec![]), vec!["held"]);
        assert!(!worker.is_draining());
    }
}
