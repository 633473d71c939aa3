//! `BPF_MAP_TYPE_HASH`, `PERCPU_HASH`, `LRU_HASH` and `LRU_PERCPU_HASH` (the kernel's
//! `hashtab.c`, with the update semantics of its non-preallocated maps, and for LRU maps the
//! eviction of its preallocated ones).
//!
//! # Structure
//! `roundup_pow_of_two(max_entries)` buckets, each one word: the address of the first element of
//! a singly linked list, with bit 0 as the bucket's spin lock. Readers (lookups, inside a run)
//! walk lists with acquire loads and never lock; writers lock the bucket, allocate and link or
//! unlink, and unlock with the release store that publishes the new head. An element is one
//! allocation: a 16-byte header (`next`, `hash`, the LRU word), the key (padded to 8 bytes), then
//! the value (per-CPU: one 8-byte-rounded value per slot). An element is immutable while linked
//! except for its `next` link, its LRU reference bit and its value bytes (which programs own); an
//! update of a non-per-CPU map links a new element in the old one's place, in the list position
//! it had, and retires the old one (see the module docs of `maps`).
//!
//! # Count
//! Plain and per-CPU maps: `count` is exact: a new element is only linked after a
//! compare-and-swap raised the count while it was below `max_entries` (the kernel's percpu
//! counter may overshoot by a little under contention; this does not). LRU maps have no count:
//! their `max_entries` LRU nodes bound the elements, as the kernel's preallocated ones do.
//!
//! # LRU (the kernel's, exactly)
//! LRU maps evict with the kernel's `bpf_lru_list` algorithm, re-implemented in `maps::lru`
//! (its module docs describe it): second-chance active and inactive lists, per-CPU free and
//! pending lists refilled in batches, and stealing from other CPUs; with `BPF_F_NO_COMMON_LRU`,
//! one set of lists per CPU, each with its share of the entries. The same operations from the
//! same CPUs leave the same contents as in Linux. What the hash table adds:
//! * an element's LRU word holds its node's index and the *reference bit*; a **BPF-side** lookup
//!   sets the bit (a relaxed load and, only when unset, a relaxed store: a hot element's line is
//!   not written again and again; no lock). Host lookups do not, as in the kernel;
//! * an update takes a node (the LRU may evict to free one) *before* it locks the bucket and
//!   checks the flags, so a full map evicts even when the update replaces a key or its flags
//!   refuse it, as in the kernel. An LRU_HASH update always links a fresh element with a fresh
//!   node, referenced when it replaces a key, and frees the old one's node; an LRU_PERCPU_HASH
//!   update of an existing key writes the value in place, sets the reference bit and frees the
//!   node it took (with `BPF_EXIST` it takes none). A delete frees the element's node;
//! * the LRU evicts through [`unlink_elem`](HashTable::unlink_elem) (the kernel's
//!   `htab_lru_map_delete_node`), which locks the element's bucket while the LRU holds its list
//!   lock: locks nest LRU lists → bucket, and no bucket lock is held while calling the LRU;
//! * nodes are reused at once (as the kernel reuses preallocated elements) but elements are not:
//!   an evicted, deleted or replaced element is retired only after its node is free again, and
//!   goes through reclaim's grace period like any other, so the value-pointer invariant holds.
//!
//! The kernel sizes the batches by its possible CPUs (`/sys/devices/system/cpu/possible`), not
//! by the CPUs the process may use, so the LRU does too (`cpu::kernel_possible_cpus`); CPU slots
//! ([`current_cpu`]) pick the per-CPU lists.

use std::alloc::Layout;
use std::hash::{BuildHasher, RandomState};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::cpu::kernel_possible_cpus;
use super::lru::{self, Lru};
use super::mem::{
    ElemPool, alloc_elem as pool_alloc, copy_from_map, copy_to_map, free_elem, retire_elem, round8,
    unused_elem,
};
use super::{
    BPF_EXIST, BPF_F_NO_COMMON_LRU, BPF_F_ZERO_SEED, BPF_NOEXIST, MapError, MapSpec, MapType,
    check_update_flags, current_cpu,
};

/// Bit 0 of a bucket word: locked.
const LOCKED: usize = 1;

/// Attempts of an LRU update to find a node while other threads hold them all (see `lru_pop`).
const LRU_POP_TRIES: u32 = 256;

#[repr(C)]
struct Elem {
    next: AtomicUsize,
    hash: u32,
    /// LRU maps: the element's node and reference bit (see `lru`); 0 otherwise.
    lru: AtomicU32,
}

const HDR: usize = std::mem::size_of::<Elem>();

#[repr(align(64))]
struct Padded<T>(T);

/// A hash table; see the module docs.
pub(crate) struct HashTable {
    buckets: NonNull<AtomicUsize>,
    buckets_layout: Layout,
    mask: usize,
    key_size: usize,
    value_size: usize,
    value_off: usize,
    stride: usize,
    ncpus: usize,
    percpu: bool,
    elem_size: usize,
    max_entries: u32,
    seed: u64,
    /// Elements linked (non-LRU maps; an LRU map's nodes bound its elements).
    count: Padded<AtomicU32>,
    lru: Option<Lru>,
    pool: Arc<ElemPool>,
}

/// The elements one LRU pop evicted, to retire once the LRU's locks are released: usually a
/// few (a batch is at most 128), so without an allocation per eviction.
struct Evicted {
    inline: [*mut Elem; 16],
    len: usize,
    more: Vec<*mut Elem>,
}

impl Default for Evicted {
    fn default() -> Evicted {
        Evicted {
            inline: [std::ptr::null_mut(); 16],
            len: 0,
            more: Vec::new(),
        }
    }
}

impl Evicted {
    fn push(&mut self, e: *mut Elem) {
        if self.len < self.inline.len() {
            self.inline[self.len] = e;
            self.len += 1;
        } else {
            if self.more.is_empty() {
                self.more.reserve(128);
            }
            self.more.push(e);
        }
    }
}

/// Where the link to an element is: the bucket word or the previous element's `next`.
#[derive(Clone, Copy)]
enum Link {
    Head,
    Next(*const AtomicUsize),
}

/// A locked bucket. `first` is the head it will publish on unlock.
struct Locked<'a> {
    head: &'a AtomicUsize,
    first: usize,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.head.store(self.first, Ordering::Release);
    }
}

#[inline]
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xd6e8_feb8_6659_fd93;

#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A seeded multiply-fold hash (the kernel uses jhash; only the distribution matters).
///
/// # Safety
/// `key` readable for `len` bytes.
#[inline(always)]
unsafe fn hash_bytes(seed: u64, key: *const u8, len: usize) -> u32 {
    // SAFETY: reads stay within `len` bytes.
    let h = unsafe {
        match len {
            4 => fold_mul(seed ^ (key as *const u32).read_unaligned() as u64, K1),
            8 => fold_mul(seed ^ (key as *const u64).read_unaligned(), K1),
            _ => {
                let mut h = seed ^ (len as u64).wrapping_mul(K2);
                let mut i = 0;
                while i + 8 <= len {
                    h = fold_mul(h ^ (key.add(i) as *const u64).read_unaligned(), K1);
                    i += 8;
                }
                if i < len {
                    let mut tail = 0u64;
                    for j in 0..len - i {
                        tail |= (*key.add(i + j) as u64) << (8 * j);
                    }
                    h = fold_mul(h ^ tail, K2);
                }
                h
            }
        }
    };
    (h ^ (h >> 32)) as u32
}

/// # Safety
/// Both readable for `len` bytes.
#[inline(always)]
unsafe fn keys_eq(a: *const u8, b: *const u8, len: usize) -> bool {
    // SAFETY: reads stay within `len` bytes.
    unsafe {
        match len {
            4 => (a as *const u32).read_unaligned() == (b as *const u32).read_unaligned(),
            8 => (a as *const u64).read_unaligned() == (b as *const u64).read_unaligned(),
            _ => std::slice::from_raw_parts(a, len) == std::slice::from_raw_parts(b, len),
        }
    }
}

impl HashTable {
    pub(crate) fn new(spec: &MapSpec, ncpus: usize) -> Result<HashTable, MapError> {
        let percpu = spec.map_type.is_percpu();
        let is_lru = matches!(spec.map_type, MapType::LruHash | MapType::LruPercpuHash);
        let n_buckets = (spec.max_entries as usize).next_power_of_two();
        let oom = MapError::NoMemory("the bucket array does not fit in memory: use fewer entries");
        let buckets_layout = Layout::array::<AtomicUsize>(n_buckets).map_err(|_| oom)?;
        // SAFETY: non-zero size; an all-zero AtomicUsize is a valid empty, unlocked bucket.
        let buckets =
            NonNull::new(unsafe { std::alloc::alloc_zeroed(buckets_layout) } as *mut AtomicUsize)
                .ok_or(oom)?;
        let key_size = spec.key_size as usize;
        let value_size = spec.value_size as usize;
        let stride = round8(value_size);
        let value_off = HDR + round8(key_size);
        let value_area = if percpu { stride * ncpus } else { stride };
        let lru = if is_lru {
            // `spec.max_entries` is already what `lru::entries` makes of it.
            let per_cpu_lists = spec.flags & BPF_F_NO_COMMON_LRU != 0;
            let lru = Lru::new(
                spec.max_entries,
                kernel_possible_cpus() as usize,
                per_cpu_lists,
                std::mem::offset_of!(Elem, lru),
            );
            match lru {
                Ok(l) => Some(l),
                Err(e) => {
                    // SAFETY: allocated above with this layout, not shared.
                    unsafe { std::alloc::dealloc(buckets.as_ptr() as *mut u8, buckets_layout) };
                    return Err(e);
                }
            }
        } else {
            None
        };
        let seed = if spec.flags & BPF_F_ZERO_SEED != 0 {
            0
        } else {
            RandomState::new().hash_one(buckets.as_ptr() as usize)
        };
        Ok(HashTable {
            buckets,
            buckets_layout,
            mask: n_buckets - 1,
            key_size,
            value_size,
            value_off,
            stride,
            ncpus,
            percpu,
            elem_size: value_off + value_area,
            max_entries: spec.max_entries,
            seed,
            count: Padded(AtomicU32::new(0)),
            lru,
            pool: ElemPool::new(value_off + value_area, spec.max_entries),
        })
    }

    pub(crate) fn pool(&self) -> &ElemPool {
        &self.pool
    }

    #[inline(always)]
    fn bucket_at(&self, index: usize) -> &AtomicUsize {
        // SAFETY: index <= mask, within the bucket array.
        unsafe { &*self.buckets.as_ptr().add(index & self.mask) }
    }

    #[inline(always)]
    fn bucket(&self, hash: u32) -> &AtomicUsize {
        self.bucket_at(hash as usize)
    }

    /// # Safety
    /// `key` readable for `key_size` bytes.
    #[inline(always)]
    unsafe fn hash(&self, key: *const u8) -> u32 {
        // SAFETY: forwarded contract.
        unsafe { hash_bytes(self.seed, key, self.key_size) }
    }

    #[inline(always)]
    fn key_of(e: *const Elem) -> *mut u8 {
        (e as *mut u8).wrapping_add(HDR)
    }

    #[inline(always)]
    fn value_of(&self, e: *const Elem) -> *mut u8 {
        (e as *mut u8).wrapping_add(self.value_off)
    }

    /// Walks a list from `e` for `key`, without the lock.
    ///
    /// # Safety
    /// The caller is in a run (or holds the bucket lock); `key` readable for `key_size` bytes.
    #[inline(always)]
    unsafe fn find(&self, mut e: usize, hash: u32, key: *const u8) -> *mut Elem {
        while e != 0 {
            let p = e as *mut Elem;
            // SAFETY: a reachable element is not freed before the caller's run ends.
            unsafe {
                if (*p).hash == hash && keys_eq(Self::key_of(p), key, self.key_size) {
                    return p;
                }
                e = (*p).next.load(Ordering::Acquire);
            }
        }
        std::ptr::null_mut()
    }

    #[inline(always)]
    fn head(&self, hash: u32) -> usize {
        self.bucket(hash).load(Ordering::Acquire) & !LOCKED
    }

    fn lock(&self, hash: u32) -> Locked<'_> {
        let head = self.bucket(hash);
        let mut spins = 0;
        loop {
            let h = head.load(Ordering::Relaxed);
            if h & LOCKED == 0
                && head
                    .compare_exchange_weak(h, h | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Locked { head, first: h };
            }
            backoff(&mut spins);
        }
    }

    /// Finds `key` in a locked bucket, with the link that points at it.
    ///
    /// # Safety
    /// `key` readable for `key_size` bytes.
    unsafe fn find_link(
        &self,
        b: &Locked<'_>,
        hash: u32,
        key: *const u8,
    ) -> Option<(Link, *mut Elem)> {
        let mut link = Link::Head;
        let mut e = b.first;
        while e != 0 {
            let p = e as *mut Elem;
            // SAFETY: linked elements of a locked bucket are alive.
            unsafe {
                if (*p).hash == hash && keys_eq(Self::key_of(p), key, self.key_size) {
                    return Some((link, p));
                }
                link = Link::Next(&(*p).next);
                e = (*p).next.load(Ordering::Relaxed);
            }
        }
        None
    }

    /// Finds element `target` (by address) in a locked bucket.
    fn find_elem(&self, b: &Locked<'_>, target: *mut Elem) -> Option<Link> {
        let mut link = Link::Head;
        let mut e = b.first;
        while e != 0 {
            let p = e as *mut Elem;
            if p == target {
                return Some(link);
            }
            // SAFETY: linked elements of a locked bucket are alive.
            unsafe {
                link = Link::Next(&(*p).next);
                e = (*p).next.load(Ordering::Relaxed);
            }
        }
        None
    }

    fn set_link(b: &mut Locked<'_>, link: Link, to: usize) {
        match link {
            Link::Head => b.first = to,
            // SAFETY: the link is the `next` of an element linked in this locked bucket.
            Link::Next(next) => unsafe { (*next).store(to, Ordering::Release) },
        }
    }

    /// A new, unlinked element holding `key` and `value`.
    ///
    /// # Safety
    /// `key` readable for `key_size` bytes; `value` for `value_size`, or with `all_cpus` on a
    /// per-CPU map for `ncpus * stride`.
    unsafe fn alloc_elem(
        &self,
        key: *const u8,
        hash: u32,
        value: *const u8,
        all_cpus: bool,
    ) -> Result<*mut Elem, MapError> {
        let Some((p, zeroed)) = pool_alloc(&self.pool) else {
            return Err(MapError::NoMemory(
                "no memory for a new hash element: delete elements or free memory",
            ));
        };
        let e = p as *mut Elem;
        // SAFETY: an unused element of elem_size bytes; the sources have the sizes above.
        unsafe {
            e.write(Elem {
                next: AtomicUsize::new(0),
                hash,
                lru: AtomicU32::new(0),
            });
            std::ptr::copy_nonoverlapping(key, Self::key_of(e), self.key_size);
            let v = self.value_of(e);
            if self.percpu && all_cpus {
                std::ptr::copy_nonoverlapping(value, v, self.ncpus * self.stride);
            } else if self.percpu {
                // pcpu_init_value: this slot's value, the others zero.
                if !zeroed {
                    std::ptr::write_bytes(v, 0, self.ncpus * self.stride);
                }
                let cpu = current_cpu() as usize;
                std::ptr::copy_nonoverlapping(value, v.add(cpu * self.stride), self.value_size);
            } else {
                std::ptr::copy_nonoverlapping(value, v, self.value_size);
            }
        }
        Ok(e)
    }

    /// Raises the count if it is below `max_entries`.
    fn reserve_count(&self) -> bool {
        let count = &self.count.0;
        let mut c = count.load(Ordering::Relaxed);
        loop {
            if c >= self.max_entries {
                return false;
            }
            match count.compare_exchange_weak(c, c + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
    }

    fn unreserve(&self) {
        self.count.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Unlinks element `e` if it is linked (the LRU evicting its node), collecting it in
    /// `evicted` for retirement.
    ///
    /// # Safety
    /// `e` is alive (the LRU passes only elements whose nodes it holds: lru module docs).
    unsafe fn unlink_elem(&self, e: usize, evicted: &mut Evicted) -> bool {
        let p = e as *mut Elem;
        // SAFETY: the caller's contract; `hash` is immutable.
        let hash = unsafe { (*p).hash };
        let mut b = self.lock(hash);
        match self.find_elem(&b, p) {
            Some(link) => {
                // SAFETY: linked, so alive.
                let next = unsafe { (*p).next.load(Ordering::Relaxed) };
                Self::set_link(&mut b, link, next);
                evicted.push(p);
                true
            }
            None => false,
        }
    }

    /// Takes an LRU node for unpublished element `e`, retiring what that evicted.
    ///
    /// # Safety
    /// `e` came from [`alloc_elem`](Self::alloc_elem); it is given back or retired only after
    /// its node was given back with [`lru_push`](Self::lru_push).
    unsafe fn lru_pop(&self, lru: &Lru, e: *mut Elem) -> Result<u32, MapError> {
        let cpu = current_cpu();
        let mut evicted = Evicted::default();
        // A pop finds nothing only while the nodes it could take are in flight in other threads
        // (being inserted, or deleted and not yet given back): always so briefly, so it retries
        // before failing. Threads sharing a CPU slot make this likelier than in the kernel, where
        // a CPU runs one program at a time; one thread alone never gets here.
        let mut spins = 0;
        let node = loop {
            // SAFETY: `e` has its LRU word at the offset the LRU was made with and outlives its
            // node's use (our contract; every element of the map follows the same rule).
            let node = unsafe {
                lru.pop(cpu, e as usize, |victim| {
                    // SAFETY: the LRU passes elements it holds nodes of: alive.
                    self.unlink_elem(victim, &mut evicted)
                })
            };
            if node.is_some() || spins == LRU_POP_TRIES {
                break node;
            }
            backoff(&mut spins);
        };
        for &v in evicted.inline[..evicted.len].iter().chain(&evicted.more) {
            // SAFETY: unlinked by us, and its node is on a free list.
            unsafe { retire_elem(&self.pool, v as *mut u8) };
        }
        node.ok_or(MapError::NoMemory(
            "no free LRU node: every entry is being inserted or deleted by other threads right now; retry",
        ))
    }

    /// Gives back the LRU node of element `e`.
    ///
    /// # Safety
    /// `e` got its node from [`lru_pop`](Self::lru_pop), and the caller alone unlinked it from
    /// its bucket (or never linked it); it is retired or given back only after this.
    unsafe fn lru_push(lru: &Lru, e: *mut Elem) {
        // SAFETY: the caller's contract: `e` is alive and its word names its node, which is ours
        // to give back.
        unsafe { lru.push(lru::node_of((*e).lru.load(Ordering::Relaxed))) };
    }

    /// `bpf_map_lookup_elem` (and `bpf_map_lookup_percpu_elem` with `cpu`).
    ///
    /// # Safety
    /// In a run; `key` readable for `key_size` bytes.
    #[inline]
    pub(crate) unsafe fn lookup_ptr(&self, key: *const u8, cpu: Option<u32>) -> *mut u8 {
        // SAFETY: forwarded contract.
        let e = unsafe {
            let hash = self.hash(key);
            self.find(self.head(hash), hash, key)
        };
        if e.is_null() {
            return std::ptr::null_mut();
        }
        if self.lru.is_some() {
            // SAFETY: found in our run, so alive until it ends.
            lru::touch(unsafe { &(*e).lru });
        }
        let v = self.value_of(e);
        if self.percpu {
            let cpu = cpu.unwrap_or_else(current_cpu) as usize;
            v.wrapping_add(cpu * self.stride)
        } else {
            v
        }
    }

    /// The host lookup: a copy of the value (per-CPU: every slot's).
    ///
    /// # Safety
    /// In a run; `key` readable for `key_size` bytes.
    pub(crate) unsafe fn copy_value(&self, key: *const u8) -> Option<Vec<u8>> {
        // SAFETY: forwarded contract.
        let e = unsafe {
            let hash = self.hash(key);
            self.find(self.head(hash), hash, key)
        };
        if e.is_null() {
            return None;
        }
        let len = if self.percpu {
            self.ncpus * self.stride
        } else {
            self.value_size
        };
        let mut out = vec![0u8; len];
        // SAFETY: the element holds `len` value bytes and is alive during the run.
        unsafe { copy_from_map(out.as_mut_ptr(), self.value_of(e), len) };
        Some(out)
    }

    /// `htab_map_update_elem` and its per-CPU and LRU variants.
    ///
    /// # Safety
    /// As for [`alloc_elem`](Self::alloc_elem).
    pub(crate) unsafe fn update(
        &self,
        key: *const u8,
        value: *const u8,
        flags: u64,
        all_cpus: bool,
    ) -> Result<(), MapError> {
        check_update_flags(flags)?;
        // SAFETY: forwarded contract.
        let hash = unsafe { self.hash(key) };
        // SAFETY: forwarded contract.
        unsafe {
            match &self.lru {
                Some(lru) if self.percpu => {
                    self.update_lru_percpu(lru, key, hash, value, flags, all_cpus)
                }
                Some(lru) => self.update_lru(lru, key, hash, value, flags),
                None => self.update_plain(key, hash, value, flags, all_cpus),
            }
        }
    }

    /// The flags' verdict on a bucket lookup.
    fn check_flags(found: bool, flags: u64) -> Result<(), MapError> {
        match (found, flags) {
            (true, BPF_NOEXIST) => Err(MapError::Exists(
                "the key exists and BPF_NOEXIST was given: use BPF_ANY or BPF_EXIST to replace it",
            )),
            (false, BPF_EXIST) => Err(MapError::NotFound(
                "the key does not exist and BPF_EXIST was given: use BPF_ANY or BPF_NOEXIST to create it",
            )),
            _ => Ok(()),
        }
    }

    /// Writes a per-CPU value in place (`pcpu_copy_value`).
    ///
    /// # Safety
    /// `e` is linked in a bucket we hold locked; `value` as for [`alloc_elem`](Self::alloc_elem).
    unsafe fn copy_percpu(&self, e: *mut Elem, value: *const u8, all_cpus: bool) {
        let v = self.value_of(e);
        // SAFETY: the caller's contract.
        unsafe {
            if all_cpus {
                copy_to_map(v, value, self.ncpus * self.stride);
            } else {
                let cpu = current_cpu() as usize;
                copy_to_map(v.add(cpu * self.stride), value, self.value_size);
            }
        }
    }

    /// Plain and per-CPU hash maps.
    ///
    /// # Safety
    /// As for [`alloc_elem`](Self::alloc_elem).
    unsafe fn update_plain(
        &self,
        key: *const u8,
        hash: u32,
        value: *const u8,
        flags: u64,
        all_cpus: bool,
    ) -> Result<(), MapError> {
        // A non-per-CPU update always links a new element: allocate it outside the lock.
        let mut new = std::ptr::null_mut::<Elem>();
        if !self.percpu {
            // SAFETY: forwarded contract.
            new = unsafe { self.alloc_elem(key, hash, value, all_cpus) }?;
        }
        let mut linked = false;
        let mut old = std::ptr::null_mut::<Elem>();
        let result = {
            let mut b = self.lock(hash);
            // SAFETY: forwarded contract.
            let found = unsafe { self.find_link(&b, hash, key) };
            match found {
                _ if Self::check_flags(found.is_some(), flags).is_err() => {
                    Self::check_flags(found.is_some(), flags)
                }
                Some((_, e)) if self.percpu => {
                    // SAFETY: linked in our locked bucket; forwarded contract.
                    unsafe { self.copy_percpu(e, value, all_cpus) };
                    Ok(())
                }
                Some((link, e)) => {
                    // SAFETY: `new` is ours and unpublished; `e` is linked.
                    unsafe {
                        (*new)
                            .next
                            .store((*e).next.load(Ordering::Relaxed), Ordering::Relaxed)
                    };
                    Self::set_link(&mut b, link, new as usize);
                    linked = true;
                    old = e;
                    Ok(())
                }
                None if !self.reserve_count() => Err(MapError::TooBig(
                    "the hash map is full (max_entries elements): delete some, or use an LRU map to evict",
                )),
                None => {
                    if self.percpu {
                        // SAFETY: forwarded contract.
                        match unsafe { self.alloc_elem(key, hash, value, all_cpus) } {
                            Ok(e) => new = e,
                            Err(err) => {
                                self.unreserve();
                                return Err(err);
                            }
                        }
                    }
                    // SAFETY: `new` is ours and unpublished.
                    unsafe { (*new).next.store(b.first, Ordering::Relaxed) };
                    b.first = new as usize;
                    linked = true;
                    Ok(())
                }
            }
            // Unlocked here, publishing a new head.
        };
        if !new.is_null() && !linked {
            // SAFETY: never published.
            unsafe { unused_elem(&self.pool, new as *mut u8) };
        }
        if !old.is_null() {
            // SAFETY: unlinked just now, by us.
            unsafe { retire_elem(&self.pool, old as *mut u8) };
        }
        result
    }

    /// `htab_lru_map_update_elem`: a new element with a fresh node, always (taken before the
    /// bucket is locked, so a full map evicts even when the flags then refuse the update); it
    /// replaces an existing element with the reference bit set, and the old node is freed.
    ///
    /// # Safety
    /// As for [`alloc_elem`](Self::alloc_elem).
    unsafe fn update_lru(
        &self,
        lru: &Lru,
        key: *const u8,
        hash: u32,
        value: *const u8,
        flags: u64,
    ) -> Result<(), MapError> {
        // SAFETY: forwarded contract.
        let new = unsafe { self.alloc_elem(key, hash, value, false) }?;
        // SAFETY: `new` is fresh; it is given back or retired below only after its node.
        if let Err(e) = unsafe { self.lru_pop(lru, new) } {
            // SAFETY: never published.
            unsafe { unused_elem(&self.pool, new as *mut u8) };
            return Err(e);
        }
        let mut old = std::ptr::null_mut::<Elem>();
        let result = {
            let mut b = self.lock(hash);
            // SAFETY: forwarded contract.
            let found = unsafe { self.find_link(&b, hash, key) };
            let r = Self::check_flags(found.is_some(), flags);
            if r.is_ok() {
                match found {
                    Some((link, e)) => {
                        // SAFETY: `new` is ours and unpublished (its node names it, but the
                        // LRU only reads its word meanwhile); `e` is linked.
                        unsafe {
                            lru::touch(&(*new).lru);
                            (*new)
                                .next
                                .store((*e).next.load(Ordering::Relaxed), Ordering::Relaxed);
                        }
                        Self::set_link(&mut b, link, new as usize);
                        old = e;
                    }
                    None => {
                        // SAFETY: as above.
                        unsafe { (*new).next.store(b.first, Ordering::Relaxed) };
                        b.first = new as usize;
                    }
                }
            }
            r
            // Unlocked here (before the LRU's locks: they nest outside bucket locks).
        };
        if result.is_err() {
            // SAFETY: `new` was never linked; given back only after its node.
            unsafe {
                Self::lru_push(lru, new);
                unused_elem(&self.pool, new as *mut u8);
            }
        }
        if !old.is_null() {
            // SAFETY: we unlinked `old` just now; retired only after its node is free.
            unsafe {
                Self::lru_push(lru, old);
                retire_elem(&self.pool, old as *mut u8);
            }
        }
        result
    }

    /// `__htab_lru_percpu_map_update_elem`: takes a node first unless the flag is `BPF_EXIST`
    /// (evicting as needed), then updates an existing element in place (setting its reference
    /// bit, and freeing the node taken) or links a new one.
    ///
    /// # Safety
    /// As for [`alloc_elem`](Self::alloc_elem).
    unsafe fn update_lru_percpu(
        &self,
        lru: &Lru,
        key: *const u8,
        hash: u32,
        value: *const u8,
        flags: u64,
        all_cpus: bool,
    ) -> Result<(), MapError> {
        let mut new = std::ptr::null_mut::<Elem>();
        if flags != BPF_EXIST {
            // SAFETY: forwarded contract.
            new = unsafe { self.alloc_elem(key, hash, value, all_cpus) }?;
            // SAFETY: `new` is fresh; it is given back below only after its node.
            if let Err(e) = unsafe { self.lru_pop(lru, new) } {
                // SAFETY: never published.
                unsafe { unused_elem(&self.pool, new as *mut u8) };
                return Err(e);
            }
        }
        let mut linked = false;
        let result = {
            let mut b = self.lock(hash);
            // SAFETY: forwarded contract.
            let found = unsafe { self.find_link(&b, hash, key) };
            let r = Self::check_flags(found.is_some(), flags);
            if r.is_ok() {
                match found {
                    Some((_, e)) => {
                        // SAFETY: linked in our locked bucket; forwarded contract.
                        unsafe {
                            lru::touch(&(*e).lru);
                            self.copy_percpu(e, value, all_cpus);
                        }
                    }
                    None => {
                        // SAFETY: `new` is ours and unpublished (allocated: the flags let a
                        // missing key through, so they are not BPF_EXIST).
                        unsafe { (*new).next.store(b.first, Ordering::Relaxed) };
                        b.first = new as usize;
                        linked = true;
                    }
                }
            }
            r
        };
        if !new.is_null() && !linked {
            // SAFETY: `new` was never linked; given back only after its node.
            unsafe {
                Self::lru_push(lru, new);
                unused_elem(&self.pool, new as *mut u8);
            }
        }
        result
    }

    /// `htab_map_delete_elem` (and the LRU's, which frees the element's node).
    ///
    /// # Safety
    /// `key` readable for `key_size` bytes.
    pub(crate) unsafe fn delete(&self, key: *const u8) -> Result<(), MapError> {
        // SAFETY: forwarded contract.
        let hash = unsafe { self.hash(key) };
        let old = {
            let mut b = self.lock(hash);
            // SAFETY: forwarded contract.
            match unsafe { self.find_link(&b, hash, key) } {
                Some((link, e)) => {
                    // SAFETY: linked, so alive.
                    let next = unsafe { (*e).next.load(Ordering::Relaxed) };
                    Self::set_link(&mut b, link, next);
                    e
                }
                None => {
                    return Err(MapError::NotFound(
                        "no element with this key: nothing to delete",
                    ));
                }
            }
        };
        match &self.lru {
            // SAFETY: we unlinked `old` just now; it is retired below, after its node is free.
            Some(lru) => unsafe { Self::lru_push(lru, old) },
            None => self.unreserve(),
        }
        // SAFETY: unlinked just now, by us (and its node, if any, is free).
        unsafe { retire_elem(&self.pool, old as *mut u8) };
        Ok(())
    }

    /// `htab_map_get_next_key`: the key after `key` (its next element in the bucket, else the
    /// first element of a later bucket), or the first key when `key` is `None` or absent.
    ///
    /// # Safety
    /// In a run; `key` readable for `key_size` bytes.
    pub(crate) unsafe fn next_key(&self, key: Option<*const u8>) -> Option<Vec<u8>> {
        let copy_key = |e: usize| {
            let mut k = vec![0u8; self.key_size];
            // SAFETY: keys are immutable while the element is alive (in our run).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    Self::key_of(e as *const Elem),
                    k.as_mut_ptr(),
                    self.key_size,
                )
            };
            k
        };
        let mut start = 0;
        if let Some(key) = key {
            // SAFETY: forwarded contract.
            let (hash, e) = unsafe {
                let hash = self.hash(key);
                (hash, self.find(self.head(hash), hash, key))
            };
            if !e.is_null() {
                // SAFETY: alive during the run.
                let next = unsafe { (*e).next.load(Ordering::Acquire) };
                if next != 0 {
                    return Some(copy_key(next));
                }
                start = (hash as usize & self.mask) + 1;
            }
        }
        for i in start..=self.mask {
            let e = self.bucket_at(i).load(Ordering::Acquire) & !LOCKED;
            if e != 0 {
                return Some(copy_key(e));
            }
        }
        None
    }
}

impl Drop for HashTable {
    fn drop(&mut self) {
        // Dropped after a grace period with the map unreachable: no reader, no writer.
        for i in 0..=self.mask {
            let mut e = self.bucket_at(i).load(Ordering::Relaxed) & !LOCKED;
            while e != 0 {
                // SAFETY: linked elements are alive and owned by the table.
                unsafe {
                    let next = (*(e as *const Elem)).next.load(Ordering::Relaxed);
                    free_elem(e as *mut u8, self.elem_size);
                    e = next;
                }
            }
        }
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.buckets.as_ptr() as *mut u8, self.buckets_layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sequential and strided keys spread over the buckets (a bad hash would chain them).
    #[test]
    fn hash_spreads_keys_over_buckets() {
        for seed in [0, 0x1234_5678_9abc_def0] {
            for (len, stride) in [(4usize, 1u64), (4, 1024), (8, 1 << 32), (12, 1), (3, 1)] {
                let mut used = std::collections::HashSet::new();
                for i in 0..1024u64 {
                    let k = (i * stride).to_le_bytes();
                    let mut key = [0u8; 16];
                    key[..8].copy_from_slice(&k);
                    // SAFETY: 16 readable bytes.
                    used.insert(unsafe { hash_bytes(seed, key.as_ptr(), len) } & 1023);
                }
                assert!(
                    used.len() > 550,
                    "len {len} stride {stride}: {} buckets",
                    used.len()
                );
            }
        }
    }
}
