//! Memory the map types share: copies into and out of map memory, and deferred frees through
//! [`crate::reclaim`], batched per thread.

use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

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

/// One hash map's retire accounting (shared by the map and its retired elements).
#[derive(Default)]
pub(crate) struct ElemCounters {
    retired: AtomicU64,
    freed: AtomicU64,
}

impl ElemCounters {
    pub(crate) fn retired(&self) -> u64 {
        self.retired.load(Ordering::Acquire)
    }
    pub(crate) fn freed(&self) -> u64 {
        self.freed.load(Ordering::Acquire)
    }
}

/// An unlinked hash element: its allocation.
#[derive(Clone, Copy)]
struct Elem {
    ptr: NonNull<u8>,
    size: usize,
}

/// Alignment of every hash element allocation.
pub(crate) const ELEM_ALIGN: usize = 8;

/// Bytes of a freed element overwritten with a poison pattern first, so that a use after free
/// reads garbage deterministically (the stress test checks values are never garbage).
const POISON_BYTES: usize = 4096;
const POISON: u64 = 0xa5a5_a5a5_a5a5_a5a5;

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

/// Elements of one map, in a batch.
struct Group {
    counters: Arc<ElemCounters>,
    elems: Vec<Elem>,
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
            for e in group.elems {
                // SAFETY: unlinked before retirement, and a grace period has passed since.
                unsafe { free_elem(e.ptr.as_ptr(), e.size) };
            }
            group.counters.freed.fetch_add(n, Ordering::AcqRel);
        }
    }
}

#[derive(Default)]
struct Batch {
    groups: Vec<Group>,
    len: usize,
}

impl Batch {
    fn take(&mut self) -> Option<RetiredElems> {
        if self.len == 0 {
            return None;
        }
        self.len = 0;
        Some(RetiredElems(std::mem::take(&mut self.groups)))
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(items) = self.take() {
            send(items);
        }
    }
}

fn send(items: RetiredElems) {
    for g in &items.0 {
        g.counters
            .retired
            .fetch_add(g.elems.len() as u64, Ordering::AcqRel);
    }
    retire(Box::new(items));
}

thread_local! {
    static BATCH: RefCell<Batch> = RefCell::new(Batch::default());
}

static RETIRE_BATCH: AtomicUsize = AtomicUsize::new(64);

/// Sets how many unlinked hash elements a thread gathers before retiring them as one
/// [`crate::reclaim`] item (at least 1; 64 by default). 1 retires each element at once.
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
    let items = BATCH
        .try_with(|b| b.try_borrow_mut().ok().and_then(|mut b| b.take()))
        .ok()
        .flatten();
    if let Some(items) = items {
        send(items);
    }
}

/// Hands an unlinked element to the calling thread's batch.
///
/// # Safety
/// `ptr` was allocated with `Layout(size, ELEM_ALIGN)`, is unlinked, and is retired only once.
pub(crate) unsafe fn retire_elem(counters: &Arc<ElemCounters>, ptr: *mut u8, size: usize) {
    let elem = Elem {
        // SAFETY: element pointers are never null.
        ptr: unsafe { NonNull::new_unchecked(ptr) },
        size,
    };
    let limit = retire_batch();
    let full = BATCH.try_with(|b| {
        let Ok(mut b) = b.try_borrow_mut() else {
            return Err(());
        };
        match b.groups.last_mut() {
            Some(g) if Arc::ptr_eq(&g.counters, counters) => g.elems.push(elem),
            _ => b.groups.push(Group {
                counters: counters.clone(),
                elems: vec![elem],
            }),
        }
        b.len += 1;
        Ok(if b.len >= limit { b.take() } else { None })
    });
    match full {
        Ok(Ok(Some(items))) => send(items),
        Ok(Ok(None)) => {}
        // The thread-local is gone (a thread-local destructor) or busy: retire on its own.
        _ => send(RetiredElems(vec![Group {
            counters: counters.clone(),
            elems: vec![elem],
        }])),
    }
}
