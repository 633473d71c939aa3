//! Memory the map types share: copies into and out of map memory, and deferred frees through
//! [`crate::reclaim`], batched per thread.

use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::reclaim::{Retirable, retire};

/// `round_up(n, 8)`.
pub(crate) const fn round8(n: usize) -> usize {
    (n + 7) & !7
}

/// Copies `len` bytes from private memory into map memory that other threads may read at the
/// same time: relaxed atomic 8-byte stores (plain `mov`s), then bytes. A concurrent reader sees
/// each word old or new — like the kernel's `memcpy`, a multi-word value can be seen half
/// updated.
///
/// # Safety
/// `dst` is 8-aligned and writable for `len` bytes, `src` readable for `len` bytes.
pub(crate) unsafe fn copy_to_map(dst: *mut u8, src: *const u8, len: usize) {
    let words = len / 8;
    for i in 0..words {
        // SAFETY: in bounds; dst words are aligned.
        unsafe {
            let w = (src.add(i * 8) as *const u64).read_unaligned();
            AtomicU64::from_ptr(dst.add(i * 8) as *mut u64).store(w, Ordering::Relaxed);
        }
    }
    for i in words * 8..len {
        // SAFETY: in bounds.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(*src.add(i), Ordering::Relaxed) };
    }
}

/// Copies `len` bytes out of map memory that other threads (or programs) may write meanwhile.
///
/// # Safety
/// `src` is 8-aligned and readable for `len` bytes, `dst` writable for `len` bytes.
pub(crate) unsafe fn copy_from_map(dst: *mut u8, src: *const u8, len: usize) {
    let words = len / 8;
    for i in 0..words {
        // SAFETY: in bounds; src words are aligned.
        unsafe {
            let w = AtomicU64::from_ptr(src.add(i * 8) as *mut u64).load(Ordering::Relaxed);
            (dst.add(i * 8) as *mut u64).write_unaligned(w);
        }
    }
    for i in words * 8..len {
        // SAFETY: in bounds.
        unsafe { *dst.add(i) = AtomicU8::from_ptr(src.add(i) as *mut u8).load(Ordering::Relaxed) };
    }
}

/// Anything that must outlive a grace period, dropped by the reclaimer.
pub(crate) struct Deferred<T: Send>(pub T);

impl<T: Send> Retirable for Deferred<T> {
    fn image_addr(&self) -> Option<usize> {
        None
    }
    fn free(self: Box<Self>) {
        drop(self);
    }
}

// SAFETY: a map's storage is only touched through atomics, or by its owner once no run can see
// it (the reclaimer, after a grace period).
unsafe impl Send for super::Kind {}

/// Alignment of every hash element allocation.
pub(crate) const ELEM_ALIGN: usize = 8;

/// Bytes of a freed element overwritten with a poison pattern first, so that a use after free
/// reads garbage deterministically (the stress test checks values are never garbage).
const POISON_BYTES: usize = 4096;
const POISON: u64 = 0xa5a5_a5a5_a5a5_a5a5;

/// Elements a thread takes from a pool at once, and keeps per map at most.
const CACHE_CHUNK: usize = 64;
/// Maps a thread keeps element caches for.
const CACHE_MAPS: usize = 8;
/// How long a thread gathers unlinked elements (beyond the batch size) before retiring them.
const RETIRE_INTERVAL: Duration = Duration::from_micros(200);

/// Frees an element's memory.
///
/// # Safety
/// `ptr` was allocated with `Layout(size, ELEM_ALIGN)` and nothing uses it any more.
pub(crate) unsafe fn free_elem(ptr: *mut u8, size: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        // Volatile: plain stores just before a free would be optimised away.
        for i in 0..size.min(POISON_BYTES) / 8 {
            (ptr as *mut u64).add(i).write_volatile(POISON);
        }
        std::alloc::dealloc(ptr, Layout::from_size_align_unchecked(size, ELEM_ALIGN));
    }
}

/// One hash map's elements past their grace period, kept for reuse (the kernel's preallocated
/// free list, filled lazily), and its retirement accounting. Shared by the map, the batches of
/// its retired elements and the threads' caches; the last one frees what is left.
pub(crate) struct ElemPool {
    size: usize,
    cap: usize,
    free: Mutex<Vec<NonNull<u8>>>,
    retired: AtomicU64,
    freed: AtomicU64,
}

// SAFETY: the pointers are unreachable elements owned by the pool, handed out under its lock.
unsafe impl Send for ElemPool {}
// SAFETY: as above.
unsafe impl Sync for ElemPool {}

impl Drop for ElemPool {
    fn drop(&mut self) {
        for p in self
            .free
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: pooled elements are unused and were allocated with this size.
            unsafe { free_elem(p.as_ptr(), self.size) };
        }
    }
}

impl ElemPool {
    /// A pool for elements of `size` bytes, keeping at most `max(max_entries, 4096)` of them,
    /// and no more than 8 MiB (but at least 64).
    pub(crate) fn new(size: usize, max_entries: u32) -> Arc<ElemPool> {
        let cap = (max_entries as usize)
            .max(4096)
            .min(((8 << 20) / size).max(CACHE_CHUNK));
        Arc::new(ElemPool {
            size,
            cap,
            free: Mutex::new(Vec::new()),
            retired: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        })
    }

    /// Elements unlinked and handed to [`crate::reclaim`] so far.
    pub(crate) fn retired(&self) -> u64 {
        self.retired.load(Ordering::Acquire)
    }

    /// Retired elements whose grace period is over (pooled for reuse or freed).
    pub(crate) fn freed(&self) -> u64 {
        self.freed.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<NonNull<u8>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes unused elements back, freeing those beyond the cap.
    fn give_back(&self, mut elems: Vec<NonNull<u8>>) {
        {
            let mut free = self.lock();
            let room = self.cap.saturating_sub(free.len()).min(elems.len());
            free.extend(elems.drain(..room));
        }
        for p in elems {
            // SAFETY: unused, allocated with this size.
            unsafe { free_elem(p.as_ptr(), self.size) };
        }
    }

    fn refill(&self, out: &mut Vec<NonNull<u8>>) {
        let mut free = self.lock();
        let keep = free.len().saturating_sub(CACHE_CHUNK);
        out.extend(free.drain(keep..));
    }
}

/// Elements of one map, in a batch.
struct Group {
    pool: Arc<ElemPool>,
    elems: Vec<NonNull<u8>>,
}

/// A batch of unlinked elements, retired as one item.
struct RetiredElems(Vec<Group>);

// SAFETY: the elements are unlinked: only the reclaimer touches them, once.
unsafe impl Send for RetiredElems {}

impl Retirable for RetiredElems {
    fn image_addr(&self) -> Option<usize> {
        None
    }
    fn free(self: Box<Self>) {
        for group in self.0 {
            let n = group.elems.len() as u64;
            // A grace period has passed since they were unlinked: they may be reused.
            group.pool.give_back(group.elems);
            group.pool.freed.fetch_add(n, Ordering::AcqRel);
        }
    }
}

/// A thread's unused elements of one map.
struct Cache {
    pool: Arc<ElemPool>,
    elems: Vec<NonNull<u8>>,
}

/// A thread's gathered unlinked elements and element caches.
#[derive(Default)]
struct Local {
    groups: Vec<Group>,
    len: usize,
    last_send: Option<Instant>,
    caches: Vec<Cache>,
}

impl Local {
    fn take(&mut self) -> Option<RetiredElems> {
        if self.len == 0 {
            return None;
        }
        self.len = 0;
        Some(RetiredElems(std::mem::take(&mut self.groups)))
    }

    fn cache_for(&mut self, pool: &Arc<ElemPool>) -> &mut Cache {
        let i = match self.caches.iter().position(|c| Arc::ptr_eq(&c.pool, pool)) {
            Some(i) => i,
            None => {
                if self.caches.len() >= CACHE_MAPS {
                    let old = self.caches.remove(0);
                    old.pool.give_back(old.elems);
                }
                self.caches.push(Cache {
                    pool: pool.clone(),
                    elems: Vec::new(),
                });
                self.caches.len() - 1
            }
        };
        &mut self.caches[i]
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some(items) = self.take() {
            send(items);
        }
        for c in self.caches.drain(..) {
            c.pool.give_back(c.elems);
        }
    }
}

fn send(items: RetiredElems) {
    for g in &items.0 {
        g.pool
            .retired
            .fetch_add(g.elems.len() as u64, Ordering::AcqRel);
    }
    retire(Box::new(items));
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
}

static RETIRE_BATCH: AtomicUsize = AtomicUsize::new(64);

/// Sets how many unlinked hash elements a thread gathers before retiring them as one
/// [`crate::reclaim`] item (64 by default). Beyond that a thread keeps gathering until 200 µs
/// passed since its previous retirement (or it holds 64 times the batch), so that grace periods,
/// each of which interrupts every running thread of the process, stay rare under heavy update
/// loads. 1 retires each element at once (tests, measurements).
pub fn set_retire_batch(n: usize) {
    RETIRE_BATCH.store(n.max(1), Ordering::Relaxed);
}

/// The current [`set_retire_batch`] size.
pub fn retire_batch() -> usize {
    RETIRE_BATCH.load(Ordering::Relaxed)
}

/// Retires the calling thread's gathered unlinked elements now (host-side mutations do this
/// themselves; a thread that only mutates maps from the BPF side may call it when it goes idle).
pub fn flush_retired() {
    let items = LOCAL
        .try_with(|l| {
            l.try_borrow_mut().ok().and_then(|mut l| {
                let items = l.take();
                if items.is_some() {
                    l.last_send = Some(Instant::now());
                }
                items
            })
        })
        .ok()
        .flatten();
    if let Some(items) = items {
        send(items);
    }
}

/// Memory for a new element of `pool`'s map: a reused one (contents left over) from this thread's
/// cache or the pool, else a fresh zeroed allocation (`true`). `None` when out of memory.
pub(crate) fn alloc_elem(pool: &Arc<ElemPool>) -> Option<(*mut u8, bool)> {
    let reused = LOCAL
        .try_with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let cache = l.cache_for(pool);
            if cache.elems.is_empty() {
                pool.refill(&mut cache.elems);
            }
            cache.elems.pop()
        })
        .ok()
        .flatten();
    if let Some(p) = reused {
        return Some((p.as_ptr(), false));
    }
    // SAFETY: non-zero size, ELEM_ALIGN a power of two.
    let p = unsafe {
        std::alloc::alloc_zeroed(Layout::from_size_align_unchecked(pool.size, ELEM_ALIGN))
    };
    (!p.is_null()).then_some((p, true))
}

/// Takes back an element from [`alloc_elem`] that was never published.
///
/// # Safety
/// `ptr` came from `alloc_elem(pool)` and nothing else has it.
pub(crate) unsafe fn unused_elem(pool: &Arc<ElemPool>, ptr: *mut u8) {
    // SAFETY: element pointers are never null.
    let p = unsafe { NonNull::new_unchecked(ptr) };
    let kept = LOCAL
        .try_with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let cache = l.cache_for(pool);
            (cache.elems.len() < CACHE_CHUNK).then(|| cache.elems.push(p))
        })
        .ok()
        .flatten();
    if kept.is_none() {
        pool.give_back(vec![p]);
    }
}

/// Hands an unlinked element to the calling thread's batch.
///
/// # Safety
/// `ptr` came from `alloc_elem(pool)`, is unlinked, and is retired only once.
pub(crate) unsafe fn retire_elem(pool: &Arc<ElemPool>, ptr: *mut u8) {
    // SAFETY: element pointers are never null.
    let elem = unsafe { NonNull::new_unchecked(ptr) };
    let limit = retire_batch();
    let full = LOCAL.try_with(|l| {
        let Ok(mut l) = l.try_borrow_mut() else {
            return Err(());
        };
        match l.groups.last_mut() {
            Some(g) if Arc::ptr_eq(&g.pool, pool) => g.elems.push(elem),
            _ => l.groups.push(Group {
                pool: pool.clone(),
                elems: vec![elem],
            }),
        }
        l.len += 1;
        if l.len < limit || l.len % limit != 0 {
            return Ok(None);
        }
        let now = Instant::now();
        let due = limit == 1
            || l.len >= 64 * limit
            || l.last_send
                .is_none_or(|t| now.duration_since(t) >= RETIRE_INTERVAL);
        if !due {
            return Ok(None);
        }
        l.last_send = Some(now);
        Ok(l.take())
    });
    match full {
        Ok(Ok(Some(items))) => send(items),
        Ok(Ok(None)) => {}
        // The thread-local is gone (a thread-local destructor) or busy: retire on its own.
        _ => send(RetiredElems(vec![Group {
            pool: pool.clone(),
            elems: vec![elem],
        }])),
    }
}
