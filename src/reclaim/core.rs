//! The retirement protocol's state and steps, apart from process globals, thread-locals and
//! system calls, so that the model checker (`tests/loom_reclaim.rs`, loom) runs this very code.
//!
//! The parent module supplies `shim`: std's atomics, `Arc` and `Mutex` in the library, loom's in
//! the model, plus `reader_fence` (a compiler fence in the library; a `SeqCst` fence in the
//! model, which is what the writer's `membarrier` turns the readers' compiler fences into).

use std::cell::Cell;

use super::shim::{Arc, AtomicU64, AtomicUsize, Mutex, Ordering, reader_fence};

/// How many images one thread can be inside at once (nested trampolines) before references go
/// to the shared overflow list.
pub const MAX_NESTED_IMAGES: usize = 16;

/// Where a retired item is in its retirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetireState {
    /// Waiting for grace period 1.
    Gp1,
    /// Waiting for the references to the image to drain.
    Draining,
    /// Waiting for grace period 2.
    Gp2,
}

/// Per-thread state that grace periods and drains scan.
pub struct ThreadRecord {
    /// The kernel's id of the thread (diagnostics, the poker's signal-mask check).
    pub tid: i32,
    /// 0 when quiescent, else the domain's epoch when the outermost section began.
    epoch: AtomicU64,
    /// Images this thread holds a reference to, innermost last; unused slots are 0, and 0 is
    /// never an image address.
    inside: [AtomicUsize; MAX_NESTED_IMAGES],
}

/// The threads, the epoch and the references of one retirement domain (the library has one).
pub struct Domain {
    /// The epoch readers copy when they go online; 0 means quiescent, so it starts at 1.
    epoch: AtomicU64,
    threads: Mutex<Vec<Arc<ThreadRecord>>>,
    /// References taken by threads whose own slots were full.
    overflow: Mutex<Vec<usize>>,
}

impl Default for Domain {
    fn default() -> Self {
        Self::new()
    }
}

impl Domain {
    /// An empty domain.
    pub fn new() -> Domain {
        Domain {
            epoch: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            overflow: Mutex::new(Vec::new()),
        }
    }

    /// Registers the calling thread (kernel id `tid`); its `Reader` is what it uses from now on.
    pub fn register(&self, tid: i32) -> Reader {
        let record = Arc::new(ThreadRecord {
            tid,
            epoch: AtomicU64::new(0),
            inside: std::array::from_fn(|_| AtomicUsize::new(0)),
        });
        lock(&self.threads).push(record.clone());
        Reader {
            record,
            nest: Cell::new(0),
            depth: Cell::new(0),
            overflow: Cell::new(0),
        }
    }

    /// Forgets a thread that is exiting. It must hold no reference and be quiescent.
    pub fn unregister(&self, reader: &Reader) {
        lock(&self.threads).retain(|r| !Arc::ptr_eq(r, &reader.record));
    }

    /// Holds the domain's locks until the guard drops (across `fork`).
    pub fn hold(&self) -> DomainHold<'_> {
        DomainHold {
            threads: lock(&self.threads),
            overflow: lock(&self.overflow),
        }
    }

    /// Kernel ids of the registered threads.
    pub fn thread_ids(&self) -> Vec<i32> {
        lock(&self.threads).iter().map(|r| r.tid).collect()
    }

    /// A grace period: returns once every thread that was online when it began has been
    /// quiescent at least once. `barrier` must make every thread execute a full memory barrier
    /// (membarrier); it runs before and after the epoch advances and again at the end. `wait` is called
    /// while a thread is still online (back off, or yield in the model).
    pub fn synchronize(&self, barrier: &mut dyn FnMut(), wait: &mut dyn FnMut(u32)) {
        // A barrier first, as userspace RCU's memb flavour does: without it a reader could load
        // the new epoch and still the old pointer of an unlink made by a plain store (loom found
        // this: `synchronize_after_a_plain_store_is_a_grace_period`). Pokes end with a
        // membarrier anyway; map deletes do not.
        barrier();
        let target = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        barrier();
        let threads = lock(&self.threads).clone();
        for record in &threads {
            let mut spins = 0u32;
            loop {
                let e = record.epoch.load(Ordering::Acquire);
                if e == 0 || e >= target {
                    break;
                }
                spins = spins.saturating_add(1);
                wait(spins);
            }
        }
        barrier();
    }

    /// Takes a reference on `image` for a thread without a [`Reader`] (one running in a
    /// thread-local destructor).
    pub fn enter_shared(&self, image: usize) {
        lock(&self.overflow).push(image);
    }

    /// Drops a reference taken by [`Domain::enter_shared`].
    pub fn exit_shared(&self, image: usize) {
        let mut refs = lock(&self.overflow);
        if let Some(i) = refs.iter().rposition(|&a| a == image) {
            refs.swap_remove(i);
        }
    }

    /// Whether any thread holds a reference on `image`. Meaningful once no thread can take a
    /// new one (after grace period 1). `image` is never 0, the empty-slot value.
    pub fn referenced(&self, image: usize) -> bool {
        debug_assert_ne!(image, 0, "0 is the empty slot, never an image");
        if image == 0 {
            return false;
        }
        let threads = lock(&self.threads).clone();
        threads.iter().any(|r| {
            r.inside
                .iter()
                .any(|slot| slot.load(Ordering::Acquire) == image)
        }) || lock(&self.overflow).contains(&image)
    }
}

/// The domain's locks, held by [`Domain::hold`].
pub struct DomainHold<'a> {
    threads: super::shim::MutexGuard<'a, Vec<Arc<ThreadRecord>>>,
    overflow: super::shim::MutexGuard<'a, Vec<usize>>,
}

impl DomainHold<'_> {
    /// Forgets every thread but `keep` and every shared reference (in a forked child, where
    /// only the forking thread exists).
    pub fn retain_only(&mut self, keep: Option<&Reader>) {
        self.threads
            .retain(|r| keep.is_some_and(|k| Arc::ptr_eq(r, &k.record)));
        self.overflow.clear();
    }
}

/// A registered thread's handle: its record plus state only that thread touches.
pub struct Reader {
    record: Arc<ThreadRecord>,
    /// Read-side nesting depth (a program may run another one through a helper).
    nest: Cell<u32>,
    /// Used `inside` slots.
    depth: Cell<usize>,
    /// References beyond `MAX_NESTED_IMAGES`, kept in the domain's overflow list.
    overflow: Cell<usize>,
}

/// What [`Reader::quiesce`] saved, for [`Reader::resume`].
pub struct Quiesced {
    was_online: bool,
    nest: u32,
}

impl Reader {
    /// Starts a read-side section (nestable). Plain stores: the writer's barrier orders them.
    #[inline]
    pub fn read_lock(&self, domain: &Domain) {
        let n = self.nest.get();
        if n == 0 {
            let epoch = domain.epoch.load(Ordering::Relaxed);
            self.record.epoch.store(epoch, Ordering::Relaxed);
            // Nothing of the section may move above the store (compiler; the CPU is ordered by
            // the writer's membarrier).
            reader_fence();
        }
        self.nest.set(n + 1);
    }

    /// Ends a read-side section. Returns false (and does nothing) when none is open.
    #[inline]
    pub fn read_unlock(&self) -> bool {
        let n = self.nest.get();
        if n == 0 {
            return false;
        }
        if n == 1 {
            reader_fence();
            self.record.epoch.store(0, Ordering::Relaxed);
        }
        self.nest.set(n - 1);
        true
    }

    /// Whether the thread is in a read-side section.
    pub fn is_online(&self) -> bool {
        self.record.epoch.load(Ordering::Relaxed) != 0
    }

    /// Goes quiescent inside a section (a helper that blocks); nesting restarts from zero so a
    /// run started meanwhile goes online properly.
    pub fn quiesce(&self) -> Quiesced {
        reader_fence();
        let was_online = self.record.epoch.load(Ordering::Relaxed) != 0;
        self.record.epoch.store(0, Ordering::Relaxed);
        Quiesced {
            was_online,
            nest: self.nest.replace(0),
        }
    }

    /// Comes back from [`Reader::quiesce`], online with the current epoch: grace periods that
    /// began meanwhile need not wait, since the thread holds references for what it is inside.
    pub fn resume(&self, domain: &Domain, saved: Quiesced) {
        self.nest.set(saved.nest);
        if saved.was_online {
            let epoch = domain.epoch.load(Ordering::Relaxed);
            self.record.epoch.store(epoch, Ordering::Relaxed);
        }
        reader_fence();
    }

    /// Takes a reference on `image` (non-zero).
    #[inline]
    pub fn image_enter(&self, domain: &Domain, image: usize) {
        let d = self.depth.get();
        if d < MAX_NESTED_IMAGES && self.overflow.get() == 0 {
            self.record.inside[d].store(image, Ordering::Relaxed);
            // The slot is stored before anything the image does next; the writer reads it only
            // after grace period 1, whose barrier orders it.
            reader_fence();
            self.depth.set(d + 1);
        } else {
            self.image_enter_overflow(domain, image);
        }
    }

    /// [`Reader::image_enter`] with every slot in use: the reference goes to the shared list.
    #[cold]
    #[inline(never)]
    fn image_enter_overflow(&self, domain: &Domain, image: usize) {
        lock(&domain.overflow).push(image);
        self.overflow.set(self.overflow.get() + 1);
    }

    /// Drops the reference taken by the matching [`Reader::image_enter`].
    #[inline]
    pub fn image_exit(&self, domain: &Domain, image: usize) {
        if self.overflow.get() > 0 {
            self.image_exit_overflow(domain, image);
            return;
        }
        let d = self.depth.get();
        if d == 0 {
            return;
        }
        // Release: every load the thread made under the reference (the image's link records)
        // is complete before a drain can see the slot empty. Grace period 2 covers the
        // image's last instructions after this store.
        self.record.inside[d - 1].store(0, Ordering::Release);
        self.depth.set(d - 1);
    }

    /// [`Reader::image_exit`] of a reference in the shared list.
    #[cold]
    #[inline(never)]
    fn image_exit_overflow(&self, domain: &Domain, image: usize) {
        let mut refs = lock(&domain.overflow);
        if let Some(i) = refs.iter().rposition(|&a| a == image) {
            refs.swap_remove(i);
        }
        self.overflow.set(self.overflow.get() - 1);
    }
}

/// One retired item on its way to being freed.
pub struct Retiring<T> {
    /// The image whose references must drain; `None` when nothing takes references on it (a
    /// replaced program, covered by the grace periods alone).
    pub image: Option<usize>,
    /// What is freed at the end.
    pub item: T,
    /// Unique id, for status reports.
    pub id: u64,
}

/// The reclaimer's own state between steps: items past grace period 1 whose references drain.
pub struct Worker<T> {
    draining: Vec<Retiring<T>>,
}

impl<T> Default for Worker<T> {
    fn default() -> Self {
        Worker {
            draining: Vec::new(),
        }
    }
}

impl<T> Worker<T> {
    /// Whether items wait for their references to drain.
    pub fn is_draining(&self) -> bool {
        !self.draining.is_empty()
    }

    /// One step of retirement. `fresh` were unlinked before this call. Drained items (every
    /// reference gone, checked after their grace period 1) and `fresh` share one grace period:
    /// it is grace period 2 of the former, which are then returned to be freed, and grace
    /// period 1 of the latter, which then drain. Items whose references do not drain wait
    /// without holding up the others. `observe` sees each state change.
    pub fn step(
        &mut self,
        domain: &Domain,
        fresh: Vec<Retiring<T>>,
        barrier: &mut dyn FnMut(),
        wait: &mut dyn FnMut(u32),
        observe: &mut dyn FnMut(&Retiring<T>, RetireState),
    ) -> Vec<Retiring<T>> {
        let mut drained = Vec::new();
        let mut i = 0;
        while i < self.draining.len() {
            let referenced = self.draining[i]
                .image
                .is_some_and(|image| domain.referenced(image));
            if referenced {
                i += 1;
            } else {
                let item = self.draining.swap_remove(i);
                observe(&item, RetireState::Gp2);
                drained.push(item);
            }
        }
        if drained.is_empty() && fresh.is_empty() {
            return drained;
        }
        domain.synchronize(barrier, wait);
        for item in fresh {
            observe(&item, RetireState::Draining);
            self.draining.push(item);
        }
        drained
    }
}

/// Locks `m`, ignoring poisoning: nothing panics while holding these locks.
fn lock<T>(m: &Mutex<T>) -> super::shim::MutexGuard<'_, T> {
    super::shim::lock(m)
}
