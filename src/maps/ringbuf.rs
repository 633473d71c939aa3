//! `BPF_MAP_TYPE_RINGBUF` (the kernel's `ringbuf.c`): a multi-producer, single-consumer ring of
//! variable-length records.
//!
//! # Layout
//! One address-space region: a metadata page (holding the ring's address, so that
//! [`ringbuf_submit`] finds the ring from a record, like the kernel's `pg_off`), then the data
//! area **mapped twice** back to back (one memfd, two `MAP_SHARED` mappings), so that a record
//! that wraps past the end is still contiguous for the program and the consumer.
//!
//! # Records
//! Each record is an 8-byte header — `u32 len` with [`BPF_RINGBUF_BUSY_BIT`] (reserved, not yet
//! committed) and [`BPF_RINGBUF_DISCARD_BIT`], then `u32 pg_off` (the header's page offset from the
//! region start) — and the data, the whole rounded up to 8 bytes. Producers reserve under a lock
//! (the kernel's spinlock), which advances `producer_pos` with a release store; they commit
//! without it, by an atomic exchange of `len` that clears the busy bit. The consumer reads
//! records in order, stops at the first busy one, skips discarded ones, and advances
//! `consumer_pos` with a release store after it is done with a record. As in the kernel the
//! producer position never runs more than `size - 1` bytes ahead of the consumer position, nor of
//! the oldest record still busy (`pending_pos`), so the largest record holds `size - 16` bytes.
//!
//! # Wake-ups
//! A commit wakes a waiting consumer when `BPF_RB_FORCE_WAKEUP` is given, or when the consumer is
//! at this very record and `BPF_RB_NO_WAKEUP` is not given (the kernel's adaptive notification);
//! a commit with no waiter costs one load. [`RingBufConsumer::wait`] also re-checks every 50 ms,
//! so a record committed with `BPF_RB_NO_WAKEUP` is seen late, not never.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
use rustix::mm::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};

use super::mem::round8;
use super::{
    BPF_RB_AVAIL_DATA, BPF_RB_CONS_POS, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_PROD_POS,
    BPF_RB_RING_SIZE, BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT, BPF_RINGBUF_HDR_SZ, Kind, Map,
    MapError,
};

/// The kernel's `RINGBUF_MAX_RECORD_SZ`.
const MAX_RECORD: u64 = (u32::MAX / 4) as u64;
const HDR: u64 = BPF_RINGBUF_HDR_SZ as u64;
const POLL: Duration = Duration::from_millis(50);

/// The host's page size.
pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

#[repr(align(64))]
struct Padded<T>(T);

pub(crate) struct RingBuf {
    region: *mut u8,
    region_len: usize,
    data: *mut u8,
    mask: u64,
    consumer_pos: Padded<AtomicU64>,
    producer_pos: Padded<AtomicU64>,
    /// The producers' lock, guarding `pending_pos`.
    producer: Mutex<u64>,
    waiters: AtomicU32,
    wait_lock: Mutex<()>,
    wake: Condvar,
    consumer_taken: AtomicBool,
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        // SAFETY: the region was mapped in `new`; nothing uses it any more.
        let _ = unsafe { munmap(self.region as *mut c_void, self.region_len) };
    }
}

fn oom(_: rustix::io::Errno) -> MapError {
    MapError::NoMemory("could not map the ring buffer: use a smaller max_entries")
}

impl RingBuf {
    pub(crate) fn new(size: usize) -> Result<RingBuf, MapError> {
        let page = page_size();
        let fd = memfd_create("livebpf-ringbuf", MemfdFlags::CLOEXEC).map_err(oom)?;
        ftruncate(&fd, size as u64).map_err(oom)?;
        let region_len = page + 2 * size;
        // SAFETY: a fresh reservation, then fixed mappings inside it only.
        unsafe {
            let region = mmap_anonymous(
                std::ptr::null_mut(),
                region_len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
            .map_err(oom)? as *mut u8;
            let undo = |e| {
                let _ = munmap(region as *mut c_void, region_len);
                oom(e)
            };
            mmap_anonymous(
                region as *mut c_void,
                page,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED,
            )
            .map_err(undo)?;
            for copy in 0..2 {
                mmap(
                    region.add(page + copy * size) as *mut c_void,
                    size,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::FIXED,
                    &fd,
                    0,
                )
                .map_err(undo)?;
            }
            Ok(RingBuf {
                region,
                region_len,
                data: region.add(page),
                mask: size as u64 - 1,
                consumer_pos: Padded(AtomicU64::new(0)),
                producer_pos: Padded(AtomicU64::new(0)),
                producer: Mutex::new(0),
                waiters: AtomicU32::new(0),
                wait_lock: Mutex::new(()),
                wake: Condvar::new(),
                consumer_taken: AtomicBool::new(false),
            })
        }
    }

    /// Writes the ring's (final) address into the metadata page.
    pub(crate) fn publish_address(&self) {
        // SAFETY: the metadata page is ours, writable and aligned.
        unsafe { (self.region as *mut *const RingBuf).write(self) };
    }

    fn size(&self) -> u64 {
        self.mask + 1
    }

    /// The `len` word of the header at ring offset `pos`.
    fn len_at(&self, pos: u64) -> &AtomicU32 {
        // SAFETY: headers are 8-aligned inside the (first copy of the) data area.
        unsafe { AtomicU32::from_ptr(self.data.add((pos & self.mask) as usize) as *mut u32) }
    }

    /// `__bpf_ringbuf_reserve`.
    pub(crate) fn reserve(&self, size: u64) -> *mut u8 {
        if size > MAX_RECORD {
            return std::ptr::null_mut();
        }
        let len = round8(size as usize + HDR as usize) as u64;
        if len > self.size() {
            return std::ptr::null_mut();
        }
        let mut pending = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        let cons = self.consumer_pos.0.load(Ordering::Acquire);
        let prod = self.producer_pos.0.load(Ordering::Relaxed);
        // Move pending_pos past records committed since.
        while *pending < prod {
            let l = self.len_at(*pending).load(Ordering::Acquire);
            if l & BPF_RINGBUF_BUSY_BIT != 0 {
                break;
            }
            *pending += round8((l & !BPF_RINGBUF_DISCARD_BIT) as usize + HDR as usize) as u64;
        }
        let new_prod = prod + len;
        if new_prod - cons > self.mask || new_prod - *pending > self.mask {
            return std::ptr::null_mut();
        }
        let off = (prod & self.mask) as usize;
        // SAFETY: the header lies in the first copy; the record's bytes in the two copies.
        let hdr = unsafe { self.data.add(off) };
        let pg_off = ((hdr as usize & !(page_size() - 1)) - self.region as usize) / page_size();
        self.len_at(prod)
            .store(size as u32 | BPF_RINGBUF_BUSY_BIT, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe {
            AtomicU32::from_ptr(hdr.add(4) as *mut u32).store(pg_off as u32, Ordering::Relaxed)
        };
        self.producer_pos.0.store(new_prod, Ordering::Release);
        drop(pending);
        // SAFETY: the data follows the header.
        unsafe { hdr.add(HDR as usize) }
    }

    /// `bpf_ringbuf_output`.
    ///
    /// # Safety
    /// `data` readable for `size` bytes.
    pub(crate) unsafe fn output(
        &self,
        data: *const u8,
        size: u64,
        flags: u64,
    ) -> Result<(), MapError> {
        if flags & !(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP) != 0 {
            return Err(MapError::Invalid(
                "ring buffer output takes only BPF_RB_NO_WAKEUP or BPF_RB_FORCE_WAKEUP",
            ));
        }
        let rec = self.reserve(size);
        if rec.is_null() {
            return Err(MapError::Again(
                "the ring buffer has no room for the record: consume records, or use a bigger ring",
            ));
        }
        // SAFETY: `rec` has room for `size` bytes; `data` is readable.
        unsafe {
            std::ptr::copy_nonoverlapping(data, rec, size as usize);
            commit(rec, flags, false);
        }
        Ok(())
    }

    fn after_commit(&self, hdr: *mut u8, flags: u64) {
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let rec_pos = hdr as u64 - self.data as u64;
        let cons = self.consumer_pos.0.load(Ordering::Acquire) & self.mask;
        if flags & BPF_RB_FORCE_WAKEUP != 0 || (cons == rec_pos && flags & BPF_RB_NO_WAKEUP == 0) {
            let _l = self.wait_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    /// `bpf_ringbuf_query`.
    pub(crate) fn query(&self, flags: u64) -> u64 {
        match flags {
            BPF_RB_AVAIL_DATA => {
                let cons = self.consumer_pos.0.load(Ordering::Acquire);
                self.producer_pos.0.load(Ordering::Acquire) - cons
            }
            BPF_RB_RING_SIZE => self.size(),
            BPF_RB_CONS_POS => self.consumer_pos.0.load(Ordering::Acquire),
            BPF_RB_PROD_POS => self.producer_pos.0.load(Ordering::Acquire),
            _ => 0,
        }
    }
}

/// Clears the busy bit (sets the discard bit) of the record at `sample` and wakes the consumer
/// as the flags say.
///
/// # Safety
/// `sample` came from `reserve` and was not committed yet.
unsafe fn commit(sample: *mut u8, flags: u64, discard: bool) {
    let page = page_size();
    // SAFETY: the caller's contract: a header precedes `sample`; its pg_off leads to the region,
    // whose first word is the ring's address.
    unsafe {
        let hdr = sample.sub(HDR as usize);
        let pg_off = AtomicU32::from_ptr(hdr.add(4) as *mut u32).load(Ordering::Relaxed) as usize;
        let region = (hdr as usize & !(page - 1)) - pg_off * page;
        let rb = &*(region as *const *const RingBuf).read();
        let len = AtomicU32::from_ptr(hdr as *mut u32);
        let mut new_len = len.load(Ordering::Relaxed) ^ BPF_RINGBUF_BUSY_BIT;
        if discard {
            new_len |= BPF_RINGBUF_DISCARD_BIT;
        }
        len.swap(new_len, Ordering::SeqCst);
        rb.after_commit(hdr, flags);
    }
}

/// `bpf_ringbuf_submit`: makes the reserved record at `sample` visible to the consumer. `flags`:
/// `BPF_RB_NO_WAKEUP`, `BPF_RB_FORCE_WAKEUP` (others are ignored, as in the kernel).
///
/// # Safety
/// `sample` was returned by [`RawMap::ringbuf_reserve`](super::RawMap::ringbuf_reserve) of a live
/// ring and was neither submitted nor discarded yet.
pub unsafe fn ringbuf_submit(sample: *mut u8, flags: u64) {
    // SAFETY: the caller's contract.
    unsafe { commit(sample, flags, false) }
}

/// `bpf_ringbuf_discard`: releases the reserved record at `sample`; the consumer skips it.
///
/// # Safety
/// As for [`ringbuf_submit`].
pub unsafe fn ringbuf_discard(sample: *mut u8, flags: u64) {
    // SAFETY: the caller's contract.
    unsafe { commit(sample, flags, true) }
}

/// The host-side consumer of a ring buffer map, like aya's `RingBuf`: records come out in
/// order, as `Vec<u8>` ([`Iterator::next`]) or as slices into the ring ([`consume`](Self::consume)).
/// One consumer per ring at a time (a second gets `EBUSY`).
pub struct RingBufConsumer {
    map: Map,
}

impl std::fmt::Debug for RingBufConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingBufConsumer")
            .field("map", &self.map)
            .finish()
    }
}

impl RingBufConsumer {
    /// Takes the consumer side of `map`: `EINVAL` if it is not a ring buffer, `EBUSY` if another
    /// consumer exists (drop it first).
    pub fn new(map: &Map) -> Result<RingBufConsumer, MapError> {
        let Kind::Ringbuf(rb) = &map.kind else {
            return Err(MapError::Invalid("not a ring buffer map"));
        };
        if rb.consumer_taken.swap(true, Ordering::AcqRel) {
            return Err(MapError::Busy(
                "the ring buffer already has a consumer: drop it first",
            ));
        }
        Ok(RingBufConsumer { map: map.clone() })
    }

    fn rb(&self) -> &RingBuf {
        match &self.map.kind {
            Kind::Ringbuf(rb) => rb,
            _ => unreachable!("checked in new"),
        }
    }

    /// The next committed record at the consumer position: its data and total length, after
    /// skipping (and consuming) discarded records. `None` when the ring is empty or the next
    /// record is still busy.
    fn peek(&self) -> Option<(*const u8, usize, u64)> {
        let rb = self.rb();
        loop {
            let cons = rb.consumer_pos.0.load(Ordering::Relaxed);
            let prod = rb.producer_pos.0.load(Ordering::SeqCst);
            if cons >= prod {
                return None;
            }
            let l = rb.len_at(cons).load(Ordering::SeqCst);
            if l & BPF_RINGBUF_BUSY_BIT != 0 {
                return None;
            }
            let size = (l & !BPF_RINGBUF_DISCARD_BIT) as usize;
            let total = round8(size + HDR as usize) as u64;
            if l & BPF_RINGBUF_DISCARD_BIT != 0 {
                rb.consumer_pos.0.store(cons + total, Ordering::SeqCst);
                continue;
            }
            // SAFETY: the record's data follows its header, contiguous thanks to the double map.
            let data = unsafe { rb.data.add((cons & rb.mask) as usize + HDR as usize) };
            return Some((data, size, cons + total));
        }
    }

    /// Calls `f` with each available record's data (a slice into the ring, valid during the
    /// call), in order, consuming it; returns how many.
    pub fn consume(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while let Some((data, size, next)) = self.peek() {
            // SAFETY: committed records are not written again until consumed.
            f(unsafe { std::slice::from_raw_parts(data, size) });
            self.rb().consumer_pos.0.store(next, Ordering::SeqCst);
            n += 1;
        }
        n
    }

    /// Waits until a record is available (`true`) or `timeout` passes (`false`; `None` waits
    /// without limit).
    pub fn wait(&mut self, timeout: Option<Duration>) -> bool {
        if self.peek().is_some() {
            return true;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let rb = self.rb();
        let mut guard = rb.wait_lock.lock().unwrap_or_else(|e| e.into_inner());
        rb.waiters.fetch_add(1, Ordering::SeqCst);
        let ready = loop {
            if self.peek().is_some() {
                break true;
            }
            let slice = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break false;
                    }
                    (d - now).min(POLL)
                }
                None => POLL,
            };
            guard = rb
                .wake
                .wait_timeout(guard, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        rb.waiters.fetch_sub(1, Ordering::SeqCst);
        ready
    }

    /// Bytes produced and not yet consumed (`BPF_RB_AVAIL_DATA`).
    pub fn avail_data(&self) -> u64 {
        self.rb().query(BPF_RB_AVAIL_DATA)
    }
}

impl Iterator for RingBufConsumer {
    type Item = Vec<u8>;

    /// The next record's data, `None` when none is available now (use
    /// [`wait`](RingBufConsumer::wait) to block).
    fn next(&mut self) -> Option<Vec<u8>> {
        let (data, size, next) = self.peek()?;
        // SAFETY: committed records are not written again until consumed.
        let v = unsafe { std::slice::from_raw_parts(data, size) }.to_vec();
        self.rb().consumer_pos.0.store(next, Ordering::SeqCst);
        Some(v)
    }
}

impl Drop for RingBufConsumer {
    fn drop(&mut self) {
        self.rb().consumer_taken.store(false, Ordering::Release);
    }
}
