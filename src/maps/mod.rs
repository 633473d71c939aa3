//! eBPF maps with Linux semantics: arrays, hash tables (plain, per-CPU, LRU), the ring buffer and
//! the program array, usable from many threads at once.
//!
//! # Two faces
//! * **BPF side** — [`RawMap`]: raw pointers in, raw pointers or negative errnos out, exactly what
//!   the kernel's helpers return (`bpf_map_lookup_elem` → [`RawMap::lookup_ptr`],
//!   `bpf_map_update_elem` → [`RawMap::update_elem`], `bpf_ringbuf_reserve` →
//!   [`RawMap::ringbuf_reserve`], …). The loader puts [`Map::as_raw`] where a program's `lddw`
//!   names the map; [`helpers`] has the `extern "C"` helpers built on it.
//! * **Host side** — [`Map`] (`lookup`/`update`/`delete`/`get_next_key`/`keys` on byte slices, as
//!   `bpf(2)` does from userspace) and the typed handles [`HashMap`], [`Array`], [`PerCpuArray`],
//!   [`PerCpuHashMap`] and [`RingBufConsumer`], in the style of aya. Errors are [`MapError`], each
//!   with the kernel's errno ([`MapError::errno`]).
//!
//! # The value-pointer invariant
//! A *run* is a read-side section of [`crate::reclaim`]: the time a thread holds a
//! [`ReadGuard`]. Every JIT run holds one, so a program's whole
//! execution, helpers included, is a run. **A value pointer that [`RawMap::lookup_ptr`] returns in a
//! run stays valid — readable, writable, never handed to another element — until that run ends,
//! whatever other threads do to the map meanwhile:**
//! * array values never move; their storage lives as long as the map (and a grace period more);
//! * a hash element is never freed or reused while linked. Deleting unlinks it; updating an
//!   existing key of a (non-per-CPU) hash map links a **new** element in the old one's place, as
//!   the kernel does for `BPF_F_NO_PREALLOC` maps, so a reader keeps seeing the old value,
//!   unchanged. An unlinked element is handed to [`crate::reclaim::retire`] (no image address:
//!   only the grace periods protect it); after every run that could have seen it has ended, the
//!   reclaimer thread gives it back to the map's pool, from which later updates of that map take
//!   their elements (the kernel's free list of preallocated elements, filled lazily and capped;
//!   the rest is freed);
//! * per-CPU hash maps update an existing element in place (the kernel's `pcpu_copy_value`): the
//!   pointer stays valid, and the value it points at changes.
//!
//! Retirement is batched: each thread gathers the elements it unlinks and retires them as one item
//! once it holds [`set_retire_batch`] elements (64 by default) and 200 µs have passed since its
//! previous retirement, so that grace periods (each interrupts every running thread with a
//! membarrier) stay rare under heavy update loads. Host-side mutations ([`Map::update`],
//! [`Map::delete`] and the typed wrappers) and [`flush_retired`] retire the calling thread's batch
//! at once, and so does a thread's exit; only a thread that mutates a map from the BPF side and
//! then stays idle keeps its last gathered elements, not reusable, until it does one of those.
//! Calling [`RawMap::lookup_ptr`] outside a run is undefined behaviour for hash maps (the element
//! may be reused while it is being read).
//!
//! # What a "CPU" is
//! Per-CPU maps are indexed by [`current_cpu`], a per-thread slot in `0..`[`possible_cpus`]; see
//! there for what happens when more threads than slots run BPF code.
//!
//! # Not modelled
//! `BPF_F_LOCK` (no BTF, so no `bpf_spin_lock` in values: refused with `EINVAL`, as the kernel
//! refuses it for values without one), `BPF_F_RDONLY_PROG`/`BPF_F_WRONLY_PROG` enforcement (the
//! verifier's job: the flags are accepted and recorded), NUMA placement (`BPF_F_NUMA_NODE` is
//! accepted where the kernel accepts it, and ignored), preallocation (`BPF_F_NO_PREALLOC` is
//! accepted; elements are always allocated on update, so a full map fails only on the count; LRU
//! maps do preallocate their LRU nodes, and evict exactly as the kernel does), and
//! a map shared across `fork` (a ring buffer's pages are shared with the child, its positions are
//! not: use a ring buffer on one side of a fork only).

mod array;
mod cpu;
mod hash;
pub mod helpers;
mod lru;
mod mem;
mod ringbuf;
mod typed;

pub use cpu::{current_cpu, possible_cpus};
pub use mem::{flush_retired, retire_batch, set_retire_batch};
pub use ringbuf::{RingBufConsumer, ringbuf_discard, ringbuf_submit};
pub use typed::{Array, HashMap, Keys, PerCpuArray, PerCpuHashMap, Pod};

use std::ops::Deref;
use std::sync::Arc;

pub(crate) use self::array::DirectSites;
use self::array::{ArrayStore, ProgArrayStore};
use self::hash::HashTable;
use self::mem::{Deferred, round8};
use self::ringbuf::RingBuf;
use crate::exec::tail::{TailCaller, TailTarget};
use crate::reclaim::ReadGuard;

/// Update flag: create a new element or update an existing one.
pub const BPF_ANY: u64 = 0;
/// Update flag: create a new element only if it does not exist (`EEXIST` otherwise).
pub const BPF_NOEXIST: u64 = 1;
/// Update flag: update an existing element only (`ENOENT` otherwise).
pub const BPF_EXIST: u64 = 2;
/// Update flag: take the value's `bpf_spin_lock`. Values here never have one: refused (`EINVAL`).
pub const BPF_F_LOCK: u64 = 4;

/// Map flag: do not preallocate hash elements (accepted; elements are always allocated on update).
pub const BPF_F_NO_PREALLOC: u32 = 1 << 0;
/// Map flag: one LRU list per CPU (LRU hash maps): each CPU evicts among its share of the entries.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// Map flag: a NUMA node is given (accepted where the kernel accepts it, ignored).
pub const BPF_F_NUMA_NODE: u32 = 1 << 2;
/// Map flag: read-only from the host side (host updates and deletes fail with `EPERM`).
pub const BPF_F_RDONLY: u32 = 1 << 3;
/// Map flag: write-only from the host side (host lookups fail with `EPERM`).
pub const BPF_F_WRONLY: u32 = 1 << 4;
/// Map flag: hash with a zero seed (deterministic bucket order; the kernel needs `CAP_SYS_ADMIN`).
pub const BPF_F_ZERO_SEED: u32 = 1 << 6;
/// Map flag: read-only for programs (the verifier's rule: recorded, not enforced here).
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;
/// Map flag: write-only for programs (the verifier's rule: recorded, not enforced here).
pub const BPF_F_WRONLY_PROG: u32 = 1 << 8;
/// Map flag: the array may be mmap-ed (plain arrays only; accepted).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Map flag: keep perf-event-array elements (that map type only: `EINVAL` for every type here).
pub const BPF_F_PRESERVE_ELEMS: u32 = 1 << 11;
/// Map flag: an inner map of a map-in-map (plain arrays only; accepted).
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// The access flags (`BPF_F_ACCESS_MASK`).
pub const BPF_F_ACCESS_MASK: u32 =
    BPF_F_RDONLY | BPF_F_RDONLY_PROG | BPF_F_WRONLY | BPF_F_WRONLY_PROG;

/// `bpf_ringbuf_output`/`submit`/`discard` flag: do not wake the consumer.
pub const BPF_RB_NO_WAKEUP: u64 = 1;
/// `bpf_ringbuf_output`/`submit`/`discard` flag: wake the consumer whatever its position.
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query`: bytes produced and not yet consumed.
pub const BPF_RB_AVAIL_DATA: u64 = 0;
/// `bpf_ringbuf_query`: the size of the data area.
pub const BPF_RB_RING_SIZE: u64 = 1;
/// `bpf_ringbuf_query`: the consumer position.
pub const BPF_RB_CONS_POS: u64 = 2;
/// `bpf_ringbuf_query`: the producer position.
pub const BPF_RB_PROD_POS: u64 = 3;
/// Ring buffer record header bit: reserved, not yet submitted or discarded.
pub const BPF_RINGBUF_BUSY_BIT: u32 = 1 << 31;
/// Ring buffer record header bit: discarded (the consumer skips it).
pub const BPF_RINGBUF_DISCARD_BIT: u32 = 1 << 30;
/// Ring buffer record header size: `u32 len` (with the two bits above), `u32 pg_off`.
pub const BPF_RINGBUF_HDR_SZ: u32 = 8;

/// The kernel's `KMALLOC_MAX_SIZE` on x86-64 with 4 KiB pages (`PAGE_SIZE << MAX_PAGE_ORDER`,
/// order 10). Other configurations differ; this is the common one.
pub const KMALLOC_MAX_SIZE: u64 = 4 << 20;
/// The kernel's `PCPU_MIN_UNIT_SIZE`: a per-CPU value (rounded up to 8) may not be larger.
pub const PCPU_MIN_UNIT_SIZE: u32 = 32 << 10;
/// `sizeof(struct htab_elem)` on 64-bit kernels without lockdep, used in the size limit of hash
/// maps (`key_size + value_size < KMALLOC_MAX_SIZE - sizeof(struct htab_elem)`); an estimate.
const HTAB_ELEM_SIZE: u64 = 48;
/// The kernel's `ENOTSUPP` (524, kernel-internal, but returned by `bpf(2)`).
pub const ENOTSUPP: i32 = 524;

/// The map types livebpf implements, numbered as in `enum bpf_map_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MapType {
    /// `BPF_MAP_TYPE_HASH`.
    Hash = 1,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array = 2,
    /// `BPF_MAP_TYPE_PROG_ARRAY`: tail-call targets ([`TailTarget`]).
    ProgArray = 3,
    /// `BPF_MAP_TYPE_PERCPU_HASH`.
    PercpuHash = 5,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PercpuArray = 6,
    /// `BPF_MAP_TYPE_LRU_HASH`: evicts (the kernel's approximation of) the least recently used
    /// elements instead of failing.
    LruHash = 9,
    /// `BPF_MAP_TYPE_LRU_PERCPU_HASH`.
    LruPercpuHash = 10,
    /// `BPF_MAP_TYPE_RINGBUF`.
    Ringbuf = 27,
}

impl std::fmt::Display for MapType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl MapType {
    /// The type for a kernel `bpf_map_type` number (from an ELF object's map definition).
    pub fn from_kernel(id: u32) -> Option<MapType> {
        Some(match id {
            1 => MapType::Hash,
            2 => MapType::Array,
            3 => MapType::ProgArray,
            5 => MapType::PercpuHash,
            6 => MapType::PercpuArray,
            9 => MapType::LruHash,
            10 => MapType::LruPercpuHash,
            27 => MapType::Ringbuf,
            _ => return None,
        })
    }

    /// The kernel's `bpf_map_type` number.
    pub fn kernel_id(self) -> u32 {
        self as u32
    }

    /// The name libbpf and bpftool print: `hash`, `array`, `prog_array`, `percpu_hash`,
    /// `percpu_array`, `lru_hash`, `lru_percpu_hash`, `ringbuf`.
    pub const fn name(self) -> &'static str {
        match self {
            MapType::Hash => "hash",
            MapType::Array => "array",
            MapType::ProgArray => "prog_array",
            MapType::PercpuHash => "percpu_hash",
            MapType::PercpuArray => "percpu_array",
            MapType::LruHash => "lru_hash",
            MapType::LruPercpuHash => "lru_percpu_hash",
            MapType::Ringbuf => "ringbuf",
        }
    }

    /// Whether values are per CPU (host buffers then hold [`possible_cpus`] values).
    pub fn is_percpu(self) -> bool {
        matches!(
            self,
            MapType::PercpuArray | MapType::PercpuHash | MapType::LruPercpuHash
        )
    }
}

/// What `BPF_MAP_CREATE` is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// At most 15 bytes of `[A-Za-z0-9_.]` (the kernel's `BPF_OBJ_NAME_LEN`).
    pub name: String,
    /// The map type.
    pub map_type: MapType,
    /// Key size in bytes (4 for arrays, 0 for ring buffers).
    pub key_size: u32,
    /// Value size in bytes (4 for program arrays, 0 for ring buffers).
    pub value_size: u32,
    /// Entries; for a ring buffer, the data size in bytes (a power of 2, a multiple of the page).
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub flags: u32,
}

impl MapSpec {
    /// A spec with no flags.
    pub fn new(
        name: &str,
        map_type: MapType,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> MapSpec {
        MapSpec {
            name: name.to_string(),
            map_type,
            key_size,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    /// The same spec with `flags`.
    pub fn with_flags(mut self, flags: u32) -> MapSpec {
        self.flags = flags;
        self
    }
}

/// A failed map operation, with the errno the kernel returns for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// `ENOENT`: no element with this key.
    #[error("no such element (ENOENT): {0}")]
    NotFound(&'static str),
    /// `EEXIST`: the element exists and `BPF_NOEXIST` was asked for.
    #[error("element already exists (EEXIST): {0}")]
    Exists(&'static str),
    /// `E2BIG`: the map is full, an index is out of range, or a size is over the kernel's limit.
    #[error("too big (E2BIG): {0}")]
    TooBig(&'static str),
    /// `EINVAL`: a size, a flag or an operation the map type does not allow.
    #[error("invalid argument (EINVAL): {0}")]
    Invalid(&'static str),
    /// `EINVAL`: a host buffer of the wrong length.
    #[error(
        "invalid argument (EINVAL): the {what} is {got} bytes, the map needs exactly {expected}"
    )]
    WrongSize {
        /// "key" or "value".
        what: &'static str,
        /// What the map needs (a per-CPU value: `possible_cpus() * round_up(value_size, 8)`).
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// `ENOMEM`: an allocation failed.
    #[error("out of memory (ENOMEM): {0}")]
    NoMemory(&'static str),
    /// `EBUSY`: the resource is held by someone else.
    #[error("busy (EBUSY): {0}")]
    Busy(&'static str),
    /// `ENOTSUPP` (524): the map type has no such operation.
    #[error("not supported (ENOTSUPP): {0}")]
    NotSupported(&'static str),
    /// `EPERM`: the map's access flags forbid this host-side operation.
    #[error("operation not permitted (EPERM): {0}")]
    PermissionDenied(&'static str),
    /// `EAGAIN`: no room now (a full ring buffer); retry after the consumer caught up.
    #[error("try again (EAGAIN): {0}")]
    Again(&'static str),
    /// `EINVAL`: a program array target that the programs tail-calling through the array could
    /// not run ([`Map::prog_array_bind`]).
    #[error("incompatible program (EINVAL): {0}")]
    IncompatibleProgram(&'static str),
}

impl MapError {
    /// The negative errno, as a helper returns it in r0 (`-ENOENT`, `-E2BIG`, …).
    pub fn errno(&self) -> i32 {
        -match self {
            MapError::NotFound(_) => libc::ENOENT,
            MapError::Exists(_) => libc::EEXIST,
            MapError::TooBig(_) => libc::E2BIG,
            MapError::Invalid(_)
            | MapError::WrongSize { .. }
            | MapError::IncompatibleProgram(_) => libc::EINVAL,
            MapError::NoMemory(_) => libc::ENOMEM,
            MapError::Busy(_) => libc::EBUSY,
            MapError::NotSupported(_) => ENOTSUPP,
            MapError::PermissionDenied(_) => libc::EPERM,
            MapError::Again(_) => libc::EAGAIN,
        }
    }
}

/// A helper's r0 for a result: 0, or the negative errno.
fn ret(r: Result<(), MapError>) -> i64 {
    match r {
        Ok(()) => 0,
        Err(e) => e.errno() as i64,
    }
}

/// The element-update flags check every map type shares: unknown flags and `BPF_F_LOCK` are
/// `EINVAL` (the kernel's `(flags & ~BPF_F_LOCK) > BPF_EXIST`, then the missing spin lock).
fn check_update_flags(flags: u64) -> Result<(), MapError> {
    if flags & !BPF_F_LOCK > BPF_EXIST {
        return Err(MapError::Invalid(
            "unknown update flags: pass BPF_ANY, BPF_NOEXIST or BPF_EXIST",
        ));
    }
    if flags & BPF_F_LOCK != 0 {
        return Err(MapError::Invalid(
            "BPF_F_LOCK needs a bpf_spin_lock in the value, which livebpf maps never have: drop the flag",
        ));
    }
    Ok(())
}

pub(crate) enum Kind {
    Array(ArrayStore),
    Hash(HashTable),
    Ringbuf(RingBuf),
    ProgArray(ProgArrayStore),
    /// Moved out when the map is dropped.
    Gone,
}

/// A map's shared state, at a stable address: what a program's `lddw` loads ([`Map::as_raw`]) and
/// what helpers receive in r1. Its methods are the BPF side of the map; [`Map`] derefs to it.
pub struct RawMap {
    spec: MapSpec,
    /// The host buffer size of a value (per-CPU: all CPUs' values, each rounded up to 8).
    value_len: usize,
    kind: Kind,
}

// SAFETY: the raw pointers inside the stores point at memory the map owns; every access that
// can race goes through atomics or the stores' locks (see each store).
unsafe impl Send for RawMap {}
// SAFETY: as above.
unsafe impl Sync for RawMap {}

impl Drop for RawMap {
    fn drop(&mut self) {
        // A program that loaded the map's address keeps a `Map` clone, so no run can still use the
        // memory; retiring it anyway costs a grace period and makes a stray pointer harmless.
        let kind = std::mem::replace(&mut self.kind, Kind::Gone);
        if !matches!(kind, Kind::Gone) {
            crate::reclaim::retire(Box::new(Deferred(kind)));
        }
    }
}

impl RawMap {
    /// The spec the map was created with, with `max_entries` as the kernel sets it (an LRU map
    /// with `BPF_F_NO_COMMON_LRU` rounds it up to a multiple of the machine's possible CPUs, see
    /// the `lru` notes in the hash map docs).
    pub fn spec(&self) -> &MapSpec {
        &self.spec
    }

    /// `bpf_map_lookup_elem`: the address of the value for `key`, null when there is none. For
    /// per-CPU maps, the calling thread's slot's value ([`current_cpu`]). A BPF-side lookup of an
    /// LRU map marks the element as used (a host lookup does not, as in the kernel). Ring buffers
    /// and program arrays have no lookup for programs: null.
    ///
    /// # Safety
    /// `key` points at `key_size` readable bytes, and the caller is in a run (holds a
    /// [`ReadGuard`]); the pointer is valid until the run ends (module docs).
    #[inline]
    pub unsafe fn lookup_ptr(&self, key: *const u8) -> *mut u8 {
        match &self.kind {
            // SAFETY: forwarded contract.
            Kind::Hash(h) => unsafe { h.lookup_ptr(key, None) },
            // SAFETY: forwarded contract.
            Kind::Array(a) => unsafe { a.lookup_ptr(key, None) },
            _ => std::ptr::null_mut(),
        }
    }

    /// `bpf_map_lookup_percpu_elem`: like [`lookup_ptr`](Self::lookup_ptr) for the value of slot
    /// `cpu`; null for a non-per-CPU map or `cpu >= possible_cpus()`.
    ///
    /// # Safety
    /// As for [`lookup_ptr`](Self::lookup_ptr).
    #[inline]
    pub unsafe fn lookup_percpu_ptr(&self, key: *const u8, cpu: u32) -> *mut u8 {
        if !self.spec.map_type.is_percpu() || cpu >= possible_cpus() {
            return std::ptr::null_mut();
        }
        match &self.kind {
            // SAFETY: forwarded contract.
            Kind::Hash(h) => unsafe { h.lookup_ptr(key, Some(cpu)) },
            // SAFETY: forwarded contract.
            Kind::Array(a) => unsafe { a.lookup_ptr(key, Some(cpu)) },
            _ => std::ptr::null_mut(),
        }
    }

    /// `bpf_map_update_elem` from a program: 0 or a negative errno (`-EINVAL` bad flags,
    /// `-EEXIST`/`-ENOENT` against `BPF_NOEXIST`/`BPF_EXIST`, `-E2BIG` full map or index out of
    /// range, `-ENOMEM`). Per-CPU maps update the calling slot's value only. Does not need a run.
    ///
    /// # Safety
    /// `key` and `value` point at `key_size` and `value_size` readable bytes.
    #[inline]
    pub unsafe fn update_elem(&self, key: *const u8, value: *const u8, flags: u64) -> i64 {
        // SAFETY: forwarded contract.
        ret(unsafe { self.update_inner(key, value, flags, false) })
    }

    /// `bpf_map_delete_elem` from a program: 0, `-ENOENT` (no such key), `-EINVAL` (arrays).
    /// Does not need a run.
    ///
    /// # Safety
    /// `key` points at `key_size` readable bytes.
    #[inline]
    pub unsafe fn delete_elem(&self, key: *const u8) -> i64 {
        // SAFETY: forwarded contract.
        ret(unsafe { self.delete_inner(key) })
    }

    /// `bpf_ringbuf_output`: copies `size` bytes into a new record and submits it. 0, `-EINVAL`
    /// (flags other than `BPF_RB_NO_WAKEUP`/`BPF_RB_FORCE_WAKEUP`, or not a ring buffer) or
    /// `-EAGAIN` (no room).
    ///
    /// # Safety
    /// `data` points at `size` readable bytes.
    pub unsafe fn ringbuf_output(&self, data: *const u8, size: u64, flags: u64) -> i64 {
        match &self.kind {
            // SAFETY: forwarded contract.
            Kind::Ringbuf(rb) => ret(unsafe { rb.output(data, size, flags) }),
            _ => -(libc::EINVAL as i64),
        }
    }

    /// `bpf_ringbuf_reserve`: room for a `size`-byte record (8-byte aligned), or null when there
    /// is none, `flags` is not 0, or this is not a ring buffer. The record must be passed to
    /// [`ringbuf_submit`] or [`ringbuf_discard`] before the run ends (the verifier's rule); until
    /// then the consumer stops at it.
    pub fn ringbuf_reserve(&self, size: u64, flags: u64) -> *mut u8 {
        match &self.kind {
            Kind::Ringbuf(rb) if flags == 0 => rb.reserve(size),
            _ => std::ptr::null_mut(),
        }
    }

    /// `bpf_ringbuf_query`: `BPF_RB_AVAIL_DATA`, `BPF_RB_RING_SIZE`, `BPF_RB_CONS_POS`,
    /// `BPF_RB_PROD_POS`; 0 for other flags or maps.
    pub fn ringbuf_query(&self, flags: u64) -> u64 {
        match &self.kind {
            Kind::Ringbuf(rb) => rb.query(flags),
            _ => 0,
        }
    }

    /// The program array store, for `bpf_tail_call`.
    #[inline]
    pub(crate) fn prog_array(&self) -> Option<&ProgArrayStore> {
        match &self.kind {
            Kind::ProgArray(p) => Some(p),
            _ => None,
        }
    }

    /// # Safety
    /// `key`/`value` readable for the key size and (`all_cpus`: host buffer, else BPF) value size.
    unsafe fn update_inner(
        &self,
        key: *const u8,
        value: *const u8,
        flags: u64,
        all_cpus: bool,
    ) -> Result<(), MapError> {
        match &self.kind {
            // SAFETY: forwarded contract.
            Kind::Hash(h) => unsafe { h.update(key, value, flags, all_cpus) },
            // SAFETY: forwarded contract.
            Kind::Array(a) => unsafe { a.update(key, value, flags, all_cpus) },
            Kind::Ringbuf(_) => Err(MapError::NotSupported(
                "ring buffers have no elements: write records with bpf_ringbuf_output",
            )),
            // The verifier lets programs use a program array only through bpf_tail_call.
            Kind::ProgArray(_) => Err(MapError::Invalid(
                "program array slots are set from the host with Map::prog_array_set",
            )),
            Kind::Gone => Err(MapError::Invalid("the map is being freed")),
        }
    }

    /// # Safety
    /// `key` readable for the key size.
    unsafe fn delete_inner(&self, key: *const u8) -> Result<(), MapError> {
        match &self.kind {
            // SAFETY: forwarded contract.
            Kind::Hash(h) => unsafe { h.delete(key) },
            Kind::Array(_) => Err(MapError::Invalid(
                "array elements cannot be deleted: write zeroes with update instead",
            )),
            Kind::Ringbuf(_) => Err(MapError::NotSupported(
                "ring buffers have no elements to delete",
            )),
            Kind::ProgArray(p) => {
                // SAFETY: the key is 4 readable bytes.
                let index = unsafe { (key as *const u32).read_unaligned() };
                p.clear(index)
            }
            Kind::Gone => Err(MapError::Invalid("the map is being freed")),
        }
    }
}

/// A map: a cheap, clonable handle (`Arc` inside) usable from any number of threads. Host-side
/// operations are its methods; BPF-side ones are [`RawMap`]'s, reached through `Deref`.
#[derive(Clone)]
pub struct Map {
    inner: Arc<RawMap>,
}

impl Deref for Map {
    type Target = RawMap;
    fn deref(&self) -> &RawMap {
        &self.inner
    }
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").field("spec", &self.spec).finish()
    }
}

fn validate_name(name: &str) -> Result<(), MapError> {
    // The kernel's bpf_obj_name_cpy: at most BPF_OBJ_NAME_LEN - 1 = 15 bytes of [A-Za-z0-9_.].
    if name.len() > 15 {
        return Err(MapError::Invalid(
            "map names are at most 15 bytes: truncate it (libbpf does)",
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return Err(MapError::Invalid(
            "map names may only hold letters, digits, '_' and '.'",
        ));
    }
    Ok(())
}

/// `max_entries` as the kernel sets it: an LRU map with `BPF_F_NO_COMMON_LRU` has it rounded up to
/// a multiple of the machine's possible CPUs, so that each CPU's list has the same share.
fn entries(spec: &MapSpec) -> u32 {
    let lru = matches!(spec.map_type, MapType::LruHash | MapType::LruPercpuHash);
    lru::entries(
        spec.max_entries,
        lru && spec.flags & BPF_F_NO_COMMON_LRU != 0,
        cpu::kernel_possible_cpus(),
    )
}

/// The checks of `map_create` and each type's `map_alloc_check`, in the kernel's order where two
/// errnos could apply.
fn validate(spec: &MapSpec) -> Result<(), MapError> {
    validate_name(&spec.name)?;
    let f = spec.flags;
    // bpf_get_file_flag: RDONLY together with WRONLY is EINVAL.
    if f & BPF_F_RDONLY != 0 && f & BPF_F_WRONLY != 0 {
        return Err(MapError::Invalid(
            "BPF_F_RDONLY and BPF_F_WRONLY together: pick one",
        ));
    }
    // bpf_map_flags_access_ok.
    if f & (BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG) == BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG {
        return Err(MapError::Invalid(
            "BPF_F_RDONLY_PROG and BPF_F_WRONLY_PROG together: pick one",
        ));
    }
    let t = spec.map_type;
    match t {
        MapType::Array | MapType::PercpuArray | MapType::ProgArray => {
            let percpu = t == MapType::PercpuArray;
            if t == MapType::ProgArray {
                // fd_array_map_alloc_check, before array_map_alloc_check.
                if spec.value_size != 4 {
                    return Err(MapError::Invalid(
                        "program array values are 4 bytes (a program fd in the kernel): set value_size to 4",
                    ));
                }
            }
            const ARRAY_FLAGS: u32 = BPF_F_NUMA_NODE
                | BPF_F_MMAPABLE
                | BPF_F_ACCESS_MASK
                | BPF_F_PRESERVE_ELEMS
                | BPF_F_INNER_MAP;
            if spec.max_entries == 0 {
                return Err(MapError::Invalid(
                    "max_entries is 0: an array needs at least one element",
                ));
            }
            if spec.key_size != 4 {
                return Err(MapError::Invalid(
                    "array keys are u32 indices: set key_size to 4",
                ));
            }
            if spec.value_size == 0 {
                return Err(MapError::Invalid("value_size is 0: give the value's size"));
            }
            if f & !ARRAY_FLAGS != 0 {
                return Err(MapError::Invalid(
                    "a flag arrays do not take: drop it (arrays take NUMA_NODE, MMAPABLE, INNER_MAP and the access flags)",
                ));
            }
            if percpu && f & BPF_F_NUMA_NODE != 0 {
                return Err(MapError::Invalid(
                    "per-CPU maps cannot be placed on a NUMA node: drop BPF_F_NUMA_NODE",
                ));
            }
            if t != MapType::Array && f & (BPF_F_MMAPABLE | BPF_F_INNER_MAP) != 0 {
                return Err(MapError::Invalid(
                    "BPF_F_MMAPABLE and BPF_F_INNER_MAP are for plain arrays only: drop them",
                ));
            }
            if f & BPF_F_PRESERVE_ELEMS != 0 {
                return Err(MapError::Invalid(
                    "BPF_F_PRESERVE_ELEMS is for perf event arrays only: drop it",
                ));
            }
            if spec.value_size as u64 > KMALLOC_MAX_SIZE {
                return Err(MapError::TooBig(
                    "value_size is over KMALLOC_MAX_SIZE (4 MiB): use a smaller value or more entries",
                ));
            }
            if percpu && round8(spec.value_size as usize) > PCPU_MIN_UNIT_SIZE as usize {
                return Err(MapError::TooBig(
                    "a per-CPU value is at most 32 KiB (PCPU_MIN_UNIT_SIZE): use a smaller value",
                ));
            }
        }
        MapType::Hash | MapType::PercpuHash | MapType::LruHash | MapType::LruPercpuHash => {
            let percpu = t.is_percpu();
            let lru = matches!(t, MapType::LruHash | MapType::LruPercpuHash);
            const HTAB_FLAGS: u32 = BPF_F_NO_PREALLOC
                | BPF_F_NO_COMMON_LRU
                | BPF_F_NUMA_NODE
                | BPF_F_ACCESS_MASK
                | BPF_F_ZERO_SEED;
            if f & !HTAB_FLAGS != 0 {
                return Err(MapError::Invalid(
                    "a flag hash maps do not take: drop it (they take NO_PREALLOC, NO_COMMON_LRU, NUMA_NODE, ZERO_SEED and the access flags)",
                ));
            }
            if !lru && f & BPF_F_NO_COMMON_LRU != 0 {
                return Err(MapError::Invalid(
                    "BPF_F_NO_COMMON_LRU is for LRU maps only: drop it",
                ));
            }
            if lru && f & BPF_F_NO_PREALLOC != 0 {
                return Err(MapError::NotSupported(
                    "LRU maps are always preallocated: drop BPF_F_NO_PREALLOC",
                ));
            }
            if f & BPF_F_NUMA_NODE != 0 && (percpu || f & BPF_F_NO_COMMON_LRU != 0) {
                return Err(MapError::Invalid(
                    "per-CPU maps cannot be placed on a NUMA node: drop BPF_F_NUMA_NODE",
                ));
            }
            if spec.max_entries == 0 || spec.key_size == 0 || spec.value_size == 0 {
                return Err(MapError::Invalid(
                    "max_entries, key_size and value_size must all be non-zero",
                ));
            }
            // Unsure: old kernels also refused key_size > MAX_BPF_STACK (512) with E2BIG; recent
            // ones only have the kmalloc limit below, which is what is checked here.
            if spec.key_size as u64 + spec.value_size as u64 >= KMALLOC_MAX_SIZE - HTAB_ELEM_SIZE {
                return Err(MapError::TooBig(
                    "key_size + value_size is over KMALLOC_MAX_SIZE (4 MiB): use smaller elements",
                ));
            }
            if percpu && round8(spec.value_size as usize) > PCPU_MIN_UNIT_SIZE as usize {
                return Err(MapError::TooBig(
                    "a per-CPU value is at most 32 KiB (PCPU_MIN_UNIT_SIZE): use a smaller value",
                ));
            }
            // htab_map_alloc: n_buckets = roundup_pow_of_two(max_entries) may not exceed
            // U32_MAX / sizeof(struct bucket) (16 bytes); max_entries as adjusted for per-CPU
            // LRU lists.
            let n_buckets = (entries(spec) as u64).next_power_of_two();
            if n_buckets > (u32::MAX / 16) as u64 {
                return Err(MapError::TooBig(
                    "max_entries is over 2^27: the bucket array would overflow; use fewer entries",
                ));
            }
        }
        MapType::Ringbuf => {
            if f & !BPF_F_NUMA_NODE != 0 {
                return Err(MapError::Invalid(
                    "ring buffers take no flags but BPF_F_NUMA_NODE: drop them",
                ));
            }
            if spec.key_size != 0 || spec.value_size != 0 {
                return Err(MapError::Invalid(
                    "ring buffers have no keys or values: set key_size and value_size to 0",
                ));
            }
            let size = spec.max_entries as usize;
            if !size.is_power_of_two() || !size.is_multiple_of(ringbuf::page_size()) {
                return Err(MapError::Invalid(
                    "a ring buffer's max_entries is its size in bytes: a power of 2 and a multiple of the page size",
                ));
            }
            // RINGBUF_MAX_DATA_SZ (~64 GiB with 4 KiB pages) is above any u32 size: no E2BIG.
        }
    }
    Ok(())
}

impl Map {
    /// `BPF_MAP_CREATE`: validates `spec` as the kernel does (see [`MapError`] for the errnos)
    /// and allocates the map. Arrays are zeroed; hash maps start empty.
    pub fn create(spec: &MapSpec) -> Result<Map, MapError> {
        validate(spec)?;
        let spec = &MapSpec {
            max_entries: entries(spec),
            ..spec.clone()
        };
        let ncpus = possible_cpus() as usize;
        let t = spec.map_type;
        let value_len = if t.is_percpu() {
            ncpus * round8(spec.value_size as usize)
        } else {
            spec.value_size as usize
        };
        let kind = match t {
            MapType::Array | MapType::PercpuArray => {
                Kind::Array(ArrayStore::new(spec, t.is_percpu(), ncpus)?)
            }
            MapType::ProgArray => Kind::ProgArray(ProgArrayStore::new(spec.max_entries)?),
            MapType::Ringbuf => Kind::Ringbuf(RingBuf::new(spec.max_entries as usize)?),
            _ => Kind::Hash(HashTable::new(spec, ncpus)?),
        };
        let inner = Arc::new(RawMap {
            spec: spec.clone(),
            value_len,
            kind,
        });
        if let Kind::Ringbuf(rb) = &inner.kind {
            // The ring is at its final address now: records can find it from their header.
            rb.publish_address();
        }
        Ok(Map { inner })
    }

    /// The map's address for a program (`lddw rX, map`) and for helpers' r1. Valid while any
    /// clone of this `Map` lives: the program that embeds it should hold one.
    pub fn as_raw(&self) -> *const RawMap {
        Arc::as_ptr(&self.inner)
    }

    /// A new handle from an address [`as_raw`](Self::as_raw) returned.
    ///
    /// # Safety
    /// `raw` came from `as_raw` of a map that is still alive (some `Map` clone exists).
    pub unsafe fn clone_from_raw(raw: *const RawMap) -> Map {
        // SAFETY: `raw` is an `Arc<RawMap>`'s pointer with a live strong reference.
        unsafe {
            Arc::increment_strong_count(raw);
            Map {
                inner: Arc::from_raw(raw),
            }
        }
    }

    /// The map type.
    pub fn map_type(&self) -> MapType {
        self.spec.map_type
    }

    /// The size of a host value buffer: `value_size`, or for per-CPU maps
    /// `possible_cpus() * round_up(value_size, 8)` (one value per slot, in slot order).
    pub fn value_len(&self) -> usize {
        self.value_len
    }

    fn check_key(&self, key: &[u8]) -> Result<(), MapError> {
        if key.len() != self.spec.key_size as usize {
            return Err(MapError::WrongSize {
                what: "key",
                expected: self.spec.key_size as usize,
                got: key.len(),
            });
        }
        Ok(())
    }

    fn check_readable(&self) -> Result<(), MapError> {
        if self.spec.flags & BPF_F_WRONLY != 0 {
            return Err(MapError::PermissionDenied(
                "the map was created BPF_F_WRONLY: the host may not read it",
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), MapError> {
        if self.spec.flags & BPF_F_RDONLY != 0 {
            return Err(MapError::PermissionDenied(
                "the map was created BPF_F_RDONLY: the host may not change it",
            ));
        }
        Ok(())
    }

    /// `BPF_MAP_LOOKUP_ELEM` from the host: a copy of the value (per-CPU maps: every slot's, each
    /// rounded up to 8 bytes), `None` when there is none (the syscall's `ENOENT`). Errors:
    /// wrong key length (`EINVAL`), `BPF_F_WRONLY` (`EPERM`), ring buffers (`ENOTSUPP`), program
    /// arrays (`ENOTSUPP`: their values are program handles, see [`prog_array_get`](Self::prog_array_get)).
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MapError> {
        self.check_readable()?;
        self.check_key(key)?;
        let _run = ReadGuard::new();
        match &self.kind {
            // SAFETY: the key has key_size bytes; we are in a run.
            Kind::Hash(h) => Ok(unsafe { h.copy_value(key.as_ptr()) }),
            // SAFETY: as above.
            Kind::Array(a) => Ok(unsafe { a.copy_value(key.as_ptr()) }),
            Kind::Ringbuf(_) => Err(MapError::NotSupported(
                "ring buffers have no elements: read records with RingBufConsumer",
            )),
            Kind::ProgArray(_) => Err(MapError::NotSupported(
                "program array values are program handles: use Map::prog_array_get",
            )),
            Kind::Gone => Err(MapError::Invalid("the map is being freed")),
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` from the host, with `BPF_ANY`/`BPF_NOEXIST`/`BPF_EXIST`. Per-CPU
    /// maps take [`value_len`](Self::value_len) bytes: every slot's value. Errors as for
    /// [`RawMap::update_elem`], plus wrong buffer lengths (`EINVAL`) and `BPF_F_RDONLY` (`EPERM`).
    /// Retires the calling thread's batch of unlinked elements before returning.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), MapError> {
        self.check_writable()?;
        self.check_key(key)?;
        if let Kind::ProgArray(_) = &self.kind {
            return Err(MapError::NotSupported(
                "program array values are program handles, not fds: use Map::prog_array_set",
            ));
        }
        if value.len() != self.value_len {
            return Err(MapError::WrongSize {
                what: "value",
                expected: self.value_len,
                got: value.len(),
            });
        }
        // SAFETY: both buffers have the map's sizes.
        let r = unsafe { self.update_inner(key.as_ptr(), value.as_ptr(), flags, true) };
        flush_retired();
        r
    }

    /// `BPF_MAP_DELETE_ELEM` from the host: `ENOENT` when absent, `EINVAL` for arrays, `E2BIG`
    /// for a program array index out of range. Retires the calling thread's batch before
    /// returning.
    pub fn delete(&self, key: &[u8]) -> Result<(), MapError> {
        self.check_writable()?;
        self.check_key(key)?;
        // SAFETY: the key has key_size bytes.
        let r = unsafe { self.delete_inner(key.as_ptr()) };
        flush_retired();
        r
    }

    /// `BPF_MAP_GET_NEXT_KEY`: the key after `key` in the map's order, the first key when `key`
    /// is `None` **or not in the map** (the kernel's rule, which restarts an iteration whose key
    /// was deleted), `None` after the last (the syscall's `ENOENT`). Arrays: index + 1, and 0 for
    /// an index out of range.
    pub fn get_next_key(&self, key: Option<&[u8]>) -> Result<Option<Vec<u8>>, MapError> {
        self.check_readable()?;
        if let Some(k) = key {
            self.check_key(k)?;
        }
        let _run = ReadGuard::new();
        match &self.kind {
            // SAFETY: the key has key_size bytes; we are in a run.
            Kind::Hash(h) => Ok(unsafe { h.next_key(key.map(|k| k.as_ptr())) }),
            Kind::Array(_) | Kind::ProgArray(_) => {
                let index = key.map(|k| u32::from_ne_bytes(k.try_into().expect("4-byte key")));
                Ok(array::next_index(index, self.spec.max_entries)
                    .map(|i| i.to_ne_bytes().to_vec()))
            }
            Kind::Ringbuf(_) => Err(MapError::NotSupported("ring buffers have no keys")),
            Kind::Gone => Err(MapError::Invalid("the map is being freed")),
        }
    }

    /// Every key, by [`get_next_key`](Self::get_next_key) (a key deleted under the iteration
    /// restarts it from the first key, as with the syscall; keys may then repeat). Stops at the
    /// first error.
    pub fn keys(&self) -> Keys<'_, Vec<u8>> {
        Keys::new(self, |k: &[u8]| k.to_vec())
    }

    /// Elements of a hash map unlinked and handed to [`crate::reclaim`] so far (diagnostics).
    pub fn retired_elements(&self) -> u64 {
        match &self.kind {
            Kind::Hash(h) => h.pool().retired(),
            _ => 0,
        }
    }

    /// Retired elements of a hash map whose grace period is over (pooled for reuse, or freed) so
    /// far: diagnostics; tests use it to see that a value stays alive while a run may hold it.
    pub fn freed_elements(&self) -> u64 {
        match &self.kind {
            Kind::Hash(h) => h.pool().freed(),
            _ => 0,
        }
    }

    /// Puts `target` into slot `index` of a program array (the kernel's update with a program
    /// fd): from now on `bpf_tail_call` through the slot runs it. Only `BPF_ANY` is allowed,
    /// else `EINVAL`; `E2BIG` out of range; [`MapError::IncompatibleProgram`] (`EINVAL`) when the
    /// callers bound with [`prog_array_bind`](Self::prog_array_bind) could not run the target.
    /// The target replaced, if any, is dropped after a grace period: a run that loaded it may
    /// still be running it.
    pub fn prog_array_set(
        &self,
        index: u32,
        target: TailTarget,
        flags: u64,
    ) -> Result<(), MapError> {
        self.check_writable()?;
        match &self.kind {
            Kind::ProgArray(p) => p.set(index, target, flags),
            _ => Err(MapError::Invalid("not a program array")),
        }
    }

    /// Declares that programs with `caller`'s needs tail-call through this program array (the
    /// kernel binds a program array to the first program using it): every later
    /// [`prog_array_set`](Self::prog_array_set) must then put a target they can run, e.g.
    /// checked JIT code for a checked JIT caller. Needs accumulate over calls. Fails with
    /// [`MapError::IncompatibleProgram`], changing nothing, if a current target does not meet
    /// them. Without a binding, a slot a caller cannot run falls through at the call.
    pub fn prog_array_bind(&self, caller: TailCaller) -> Result<(), MapError> {
        match &self.kind {
            Kind::ProgArray(p) => p.bind(caller),
            _ => Err(MapError::Invalid("not a program array")),
        }
    }

    /// Empties slot `index` of a program array: `ENOENT` if empty, `E2BIG` out of range.
    pub fn prog_array_clear(&self, index: u32) -> Result<(), MapError> {
        self.check_writable()?;
        match &self.kind {
            Kind::ProgArray(p) => p.clear(index),
            _ => Err(MapError::Invalid("not a program array")),
        }
    }

    /// How many direct tail-call sites of compiled programs this program array keeps pointed at
    /// its slots' targets ([`DirectTailCall`](crate::exec::DirectTailCall)); 0 for other maps.
    pub fn prog_array_direct_sites(&self) -> usize {
        match &self.kind {
            Kind::ProgArray(p) => p.direct_sites(),
            _ => 0,
        }
    }

    /// The target in slot `index` of a program array, if any.
    pub fn prog_array_get(&self, index: u32) -> Option<TailTarget> {
        match &self.kind {
            Kind::ProgArray(p) => p.get(index),
            _ => None,
        }
    }

    /// Host-side `bpf_ringbuf_output` (for tests and host producers): 0, or the errors of
    /// [`RawMap::ringbuf_output`] as a `MapError`.
    pub fn ringbuf_write(&self, data: &[u8], flags: u64) -> Result<(), MapError> {
        match &self.kind {
            // SAFETY: the slice is readable.
            Kind::Ringbuf(rb) => unsafe { rb.output(data.as_ptr(), data.len() as u64, flags) },
            _ => Err(MapError::Invalid("not a ring buffer")),
        }
    }
}
