//! Code arena: W^X executable memory for JIT images.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags, mmap, mmap_anonymous, mprotect, munmap};

use super::TextError;
use super::sync::sync_icache;

/// The largest page size of the supported architectures (arm64 with 64 KiB pages). The
/// reservations' bases and every chunk are aligned to it, so page-rounded ranges are valid
/// `mprotect` arguments whatever the real page size is.
pub const MAX_PAGE_SIZE: usize = 64 * 1024;

/// Byte that fills unwritten and freed text: `int3` on x86-64; on arm64 four zero bytes are
/// `udf #0`, which is permanently undefined.
#[cfg(target_arch = "x86_64")]
pub const TRAP_FILL_BYTE: u8 = 0xcc;
/// Byte that fills unwritten and freed text: `int3` on x86-64; on arm64 four zero bytes are
/// `udf #0`, which is permanently undefined.
#[cfg(not(target_arch = "x86_64"))]
pub const TRAP_FILL_BYTE: u8 = 0x00;

/// Allocation granule: block sizes and offsets are multiples of it.
const GRANULE: usize = 16;
/// Upper bound for `max_size`, so that offset arithmetic cannot overflow.
const MAX_RESERVATION: usize = 1 << 40;
/// Linux `PROT_BTI` (arm64): indirect branches into the page must land on a `bti` instruction.
#[cfg(target_arch = "aarch64")]
const PROT_BTI: u32 = 0x10;

/// Configuration of a [`CodeArena`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaOptions {
    /// arm64: map the RX view with `PROT_BTI` (the kernel refuses it with `EINVAL` on CPUs
    /// without BTI). Ignored on other architectures.
    pub bti: bool,
    /// After every write, `mprotect` the touched RX pages to their unchanged protection. Needed
    /// where writes through the RW alias are not seen by instruction fetch until the RX page's
    /// protection changes: qemu-user caches translated code per page and invalidates it on
    /// `mprotect`, not on stores through another mapping. Cheap; off by default. On arm64 an
    /// arena created without it runs a self-test and turns it on by itself when instruction
    /// fetch is found to miss such writes (see [`CodeArena::stale_alias_workaround_active`]).
    /// On arm64 the workaround makes the touched RX pages RWX for the duration of two
    /// `mprotect` calls (what qemu needs to notice): do not force it on real hardware.
    pub stale_alias_workaround: bool,
    /// Bytes added per growth step (rounded up to [`MAX_PAGE_SIZE`]); a larger image grows the
    /// arena by as much as it needs.
    pub chunk_size: usize,
    /// Size of the address-space reservation of each view: the most text the arena can hold, and
    /// a bound on the distance between any two arena addresses (keep it ≤ 2 GiB for x86-64
    /// rel32 reach, ≤ 128 MiB for arm64 `B`/`BL` reach without PLTs).
    pub max_size: usize,
}

impl Default for ArenaOptions {
    /// x86-64: 1 GiB, so every `rel32` between images fits. arm64: 128 MiB, so every `B`/`BL`
    /// between images fits and the PLT is only needed for targets outside the arena; pages are
    /// guarded with `PROT_BTI` when the CPU implements BTI.
    fn default() -> Self {
        Self {
            bti: host_has_bti(),
            stale_alias_workaround: false,
            chunk_size: 2 << 20,
            max_size: if cfg!(target_arch = "aarch64") {
                128 << 20
            } else {
                1 << 30
            },
        }
    }
}

/// Whether the CPU implements BTI (`HWCAP2_BTI` in the auxiliary vector).
fn host_has_bti() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        const HWCAP2_BTI: u64 = 1 << 17;
        // SAFETY: getauxval only reads the auxiliary vector; unknown keys return 0.
        (unsafe { libc::getauxval(libc::AT_HWCAP2) }) & HWCAP2_BTI != 0
    }
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// A block of executable memory handed out by [`CodeArena::alloc`].
///
/// Not `Clone`: [`CodeArena::free`] consumes it, so it cannot be freed twice. Fields are private
/// so that the bounds [`CodeArena::write`] checks cannot be tampered with.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an Allocation that is dropped instead of freed leaks its code memory"]
pub struct Allocation {
    rx: usize,
    rw: usize,
    len: usize,
    /// Reserved bytes: `len` rounded up to the granule.
    size: usize,
    arena_id: u64,
}

impl Allocation {
    /// Address to execute (inside the RX view), aligned as requested.
    pub fn rx(&self) -> usize {
        self.rx
    }

    /// [`Self::rx`] as a pointer, for building function pointers.
    pub fn rx_ptr(&self) -> *const u8 {
        self.rx as *const u8
    }

    /// The writable alias of [`Self::rx`]. Writing through it is `unsafe`: the caller must make
    /// sure no other thread accesses those bytes concurrently (the poker's job) and must call
    /// [`CodeArena::sync_text`] afterwards.
    pub fn rw_ptr(&self) -> *mut u8 {
        self.rw as *mut u8
    }

    /// Length in bytes as requested (the usable, bounds-checked size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-byte allocations are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The RX address range `rx .. rx + len`.
    pub fn rx_range(&self) -> Range<usize> {
        self.rx..self.rx + self.len
    }
}

/// One `PROT_NONE` address-space reservation, unmapped on drop unless leaked.
#[derive(Debug)]
struct Reservation {
    raw: usize,
    raw_len: usize,
    /// `raw` rounded up to `MAX_PAGE_SIZE`.
    base: usize,
}

impl Reservation {
    fn new(len: usize) -> Result<Self, TextError> {
        // `len` ≤ MAX_RESERVATION, so this cannot overflow.
        let raw_len = len + MAX_PAGE_SIZE;
        // SAFETY: a new private PROT_NONE mapping at an address the kernel chooses cannot alias
        // or replace any existing memory.
        let raw = unsafe {
            mmap_anonymous(
                ptr::null_mut(),
                raw_len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|errno| TextError::Reserve {
            bytes: raw_len,
            errno,
        })? as usize;
        Ok(Self {
            raw,
            raw_len,
            base: raw.next_multiple_of(MAX_PAGE_SIZE),
        })
    }

    /// Give the range back to `PROT_NONE` after a failed growth (best effort).
    fn unmap_to_none(&self, offset: usize, len: usize) {
        // SAFETY: `base + offset .. + len` lies inside this reservation, which only this arena
        // uses, and the range was never handed out (growth failed), so nothing references it.
        let _ = unsafe {
            mmap_anonymous(
                (self.base + offset) as *mut c_void,
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
            )
        };
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.raw_len != 0 {
            // SAFETY: the range is this reservation's own mapping; the owning arena only drops
            // it when no allocation is live (see `CodeArena::drop`).
            let _ = unsafe { munmap(self.raw as *mut c_void, self.raw_len) };
        }
    }
}

/// Allocator state, guarded by `CodeArena::state`.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// The memfd behind both views (replaced by a private copy in a forked child).
    fd: Option<OwnedFd>,
    /// Free blocks: offset → length. Never two adjacent entries (coalesced on insert).
    free: BTreeMap<usize, usize>,
    /// Live blocks: offset → reserved size.
    live: BTreeMap<usize, usize>,
}

impl State {
    /// Insert `[off, off + len)` into the free list, merging with free neighbours.
    fn insert_free(&mut self, mut off: usize, mut len: usize) {
        if let Some((&prev, &prev_len)) = self.free.range(..off).next_back()
            && prev + prev_len == off
        {
            self.free.remove(&prev);
            off = prev;
            len += prev_len;
        }
        if let Some(next_len) = self.free.remove(&(off + len)) {
            len += next_len;
        }
        self.free.insert(off, len);
    }

    /// First fit: the lowest block that holds `size` bytes at an RX address aligned to `align`.
    /// Returns the aligned offset and takes it out of the free list.
    fn take_fit(&mut self, rx_base: usize, size: usize, align: usize) -> Option<usize> {
        let (off, len, pad) = self.free.iter().find_map(|(&off, &len)| {
            let addr = rx_base + off;
            let pad = addr.checked_next_multiple_of(align)? - addr;
            (pad.checked_add(size)? <= len).then_some((off, len, pad))
        })?;
        self.free.remove(&off);
        if pad > 0 {
            self.free.insert(off, pad);
        }
        let tail = len - pad - size;
        if tail > 0 {
            self.free.insert(off + pad + size, tail);
        }
        self.live.insert(off + pad, size);
        Some(off + pad)
    }
}

static NEXT_ARENA_ID: AtomicU64 = AtomicU64::new(1);

/// The process-wide arena ([`CodeArena::global`]).
static GLOBAL_ARENA: OnceLock<CodeArena> = OnceLock::new();

/// W^X executable memory for JIT images. `Send + Sync`.
///
/// ## Layout
/// One memfd backs the whole arena and is mapped twice: an RW view (livebpf writes through it)
/// and an RX view (threads execute it). No address is ever writable and executable at once.
/// Each view is a single address-space reservation of [`ArenaOptions::max_size`] bytes
/// (`PROT_NONE`, costs no memory); the arena grows by `ftruncate`-ing the memfd and mapping the
/// new chunk over the next part of both reservations. Hence:
/// * `rw = rx - rx_base + rw_base` for every arena address ([`CodeArena::rw_alias`] is O(1) and
///   lock-free), and free space coalesces across chunk boundaries;
/// * any two arena addresses are less than `max_size` apart: with the default 1 GiB, an x86-64
///   `call rel32` / `jmp rel32` from one image always reaches any other (trampolines!).
///
/// ## Allocation
/// First-fit over a free list ordered by offset, coalescing on free. Blocks are multiples of
/// 16 bytes; alignment is applied to the RX *address*, so any power of two works (8, 16, 64,
/// [`page_size`], 2 MiB, ...). New and freed blocks are filled with [`TRAP_FILL_BYTE`] so that a
/// jump into unwritten or freed text traps instead of running stale code.
/// Freed memory stays mapped for reuse; the arena never shrinks.
///
/// ## Visibility of written code
/// [`CodeArena::write`] copies through the RW view, then calls [`CodeArena::sync_text`], which
/// makes the bytes visible to *this* thread's instruction fetch ([`sync_icache`]) and applies the
/// stale-alias workaround if enabled. Before other threads may run code that was written while
/// they could have fetched that address, call [`super::sync_all_threads`].
#[derive(Debug)]
pub struct CodeArena {
    id: u64,
    opts: ArenaOptions,
    rx: Reservation,
    rw: Reservation,
    /// Bytes of both views that are mapped (a multiple of `MAX_PAGE_SIZE`). Only grows, only
    /// under `state`'s lock, stored with `Release` after the new chunk is mapped so that a
    /// lock-free `Acquire` reader never computes an alias into an unmapped range.
    committed: AtomicUsize,
    state: Mutex<State>,
    /// The fork generation this arena's text belongs to (see [`super::fork`]): an arena made
    /// before a `fork` still maps the parent's text in the child, so the child must not use it.
    generation: AtomicU64,
    /// Whether the arm64 self-test at creation saw stale code (and so enabled the workaround).
    stale_alias_detected: bool,
}

impl CodeArena {
    /// Create an arena: a memfd and two address-space reservations; no text is mapped until the
    /// first allocation. `chunk_size` and `max_size` are rounded up to [`MAX_PAGE_SIZE`] (and
    /// `max_size` capped at 1 TiB).
    pub fn new(opts: ArenaOptions) -> Result<Self, TextError> {
        let max_size = opts
            .max_size
            .clamp(MAX_PAGE_SIZE, MAX_RESERVATION)
            .next_multiple_of(MAX_PAGE_SIZE);
        let chunk_size = opts
            .chunk_size
            .clamp(MAX_PAGE_SIZE, max_size)
            .next_multiple_of(MAX_PAGE_SIZE);
        let opts = ArenaOptions {
            chunk_size,
            max_size,
            ..opts
        };
        super::fork::ensure_registered();
        let fd =
            memfd_create("livebpf-text", MemfdFlags::CLOEXEC).map_err(TextError::MemfdCreate)?;
        let rx = Reservation::new(max_size)?;
        let rw = Reservation::new(max_size)?;
        #[allow(unused_mut)] // only changed on arm64
        let mut arena = Self {
            id: NEXT_ARENA_ID.fetch_add(1, Ordering::Relaxed),
            opts,
            rx,
            rw,
            committed: AtomicUsize::new(0),
            state: Mutex::new(State {
                fd: Some(fd),
                ..State::default()
            }),
            generation: AtomicU64::new(super::fork::generation()),
            stale_alias_detected: false,
        };
        #[cfg(target_arch = "aarch64")]
        if !arena.opts.stale_alias_workaround && arena.probe_stale_alias()? {
            arena.opts.stale_alias_workaround = true;
            arena.stale_alias_detected = true;
        }
        Ok(arena)
    }

    /// arm64 self-test for instruction fetch that misses writes through the RW alias: write a
    /// function through the alias, run it, rewrite it, sync exactly as every write does, and
    /// run it again. Real hardware runs the new code (the cache maintenance in `sync_icache`
    /// is what the architecture requires); qemu-user keeps its translation of the RX page until
    /// the page's protection changes, so it returns the old result, and then the arena enables
    /// [`ArenaOptions::stale_alias_workaround`]. The workaround only re-applies the RX view's
    /// own protection, so W^X holds either way.
    #[cfg(target_arch = "aarch64")]
    fn probe_stale_alias(&self) -> Result<bool, TextError> {
        // bti c; movz w0, #n; ret — `bti c` (a hint elsewhere) lets it run on PROT_BTI pages.
        let function = |n: u32| -> [u8; 12] {
            let words = [0xd503_245f_u32, 0x5280_0000 | n << 5, 0xd65f_03c0];
            let mut bytes = [0u8; 12];
            for (chunk, w) in bytes.chunks_exact_mut(4).zip(words) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            bytes
        };
        let a = self.alloc(12, 16)?;
        let run = |n: u32| -> Result<u32, TextError> {
            self.write(&a, 0, &function(n))?;
            // SAFETY: `a` holds the complete `extern "C" fn() -> u32` just written and synced
            // by `write`; only this thread knows the allocation.
            Ok(unsafe {
                let f: extern "C" fn() -> u32 = std::mem::transmute(a.rx_ptr());
                f()
            })
        };
        let result = run(1).and_then(|first| Ok((first, run(2)?)));
        // SAFETY: the probe function has returned and its address never left this function.
        unsafe { self.free(a)? };
        let (first, second) = result?;
        Ok(first == 1 && second == 1)
    }

    /// Whether [`ArenaOptions::stale_alias_workaround`] is in force: requested in the options,
    /// or enabled because the arm64 self-test at creation saw stale code (under qemu-user).
    pub fn stale_alias_workaround_active(&self) -> bool {
        self.opts.stale_alias_workaround
    }

    /// Whether the workaround was enabled by the arm64 self-test rather than by the options.
    /// Always false on other architectures and when the options already asked for it.
    pub fn stale_alias_detected(&self) -> bool {
        self.stale_alias_detected
    }

    /// The process-wide arena, created with [`ArenaOptions::default`] on first use unless
    /// [`Self::init_global`] configured it first.
    pub fn global() -> Result<&'static CodeArena, TextError> {
        Self::global_with(ArenaOptions::default(), false)
    }

    /// Create the process-wide arena with `opts` (e.g. `bti` on arm64). Fails with
    /// [`TextError::GlobalAlreadyInitialized`] if it already exists.
    pub fn init_global(opts: ArenaOptions) -> Result<&'static CodeArena, TextError> {
        Self::global_with(opts, true)
    }

    /// The process-wide arena if it was created (never creates it).
    pub(crate) fn existing_global() -> Option<&'static CodeArena> {
        GLOBAL_ARENA.get()
    }

    fn global_with(opts: ArenaOptions, must_create: bool) -> Result<&'static Self, TextError> {
        const GLOBAL: &OnceLock<CodeArena> = &GLOBAL_ARENA;
        // Serialises creation: `OnceLock::get_or_try_init` is unstable, and an arena must not be
        // created twice (the loser's reservations would be wasted).
        static INIT: Mutex<()> = Mutex::new(());
        let existing = |arena: &'static CodeArena| {
            if must_create {
                Err(TextError::GlobalAlreadyInitialized)
            } else {
                Ok(arena)
            }
        };
        if let Some(arena) = GLOBAL.get() {
            return existing(arena);
        }
        let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(arena) = GLOBAL.get() {
            return existing(arena);
        }
        let arena = Self::new(opts)?;
        Ok(GLOBAL.get_or_init(|| arena))
    }

    /// The options in force (after rounding).
    pub fn options(&self) -> ArenaOptions {
        self.opts
    }

    /// The RX reservation: every address this arena ever hands out lies inside it.
    pub fn rx_range(&self) -> Range<usize> {
        self.rx.base..self.rx.base + self.opts.max_size
    }

    /// Bytes currently mapped (grows in chunks, never shrinks).
    pub fn committed_bytes(&self) -> usize {
        self.committed.load(Ordering::Acquire)
    }

    /// Number of allocations not yet freed (for leak checks).
    pub fn live_allocations(&self) -> usize {
        self.lock().live.len()
    }

    /// Allocate `len` bytes of text whose RX address is a multiple of `align` (a power of two;
    /// values below 16 act as 16). The block is filled with [`TRAP_FILL_BYTE`].
    pub fn alloc(&self, len: usize, align: usize) -> Result<Allocation, TextError> {
        let max_size = self.opts.max_size;
        if len == 0 {
            return Err(TextError::ZeroLength);
        }
        if !align.is_power_of_two() || align > max_size {
            return Err(TextError::BadAlignment { align, max_size });
        }
        let full = TextError::ArenaFull {
            requested: len,
            align,
            max_size,
        };
        let align = align.max(GRANULE);
        let size = match len.checked_next_multiple_of(GRANULE) {
            Some(size) if size <= max_size => size,
            _ => return Err(full),
        };

        self.check_generation()?;
        let mut state = self.lock();
        let off = match state.take_fit(self.rx.base, size, align) {
            Some(off) => off,
            None => {
                // A fresh region of `size + align` bytes holds the block whatever its alignment.
                let committed = self.committed.load(Ordering::Relaxed);
                let want = (size + align)
                    .max(self.opts.chunk_size)
                    .next_multiple_of(MAX_PAGE_SIZE)
                    .min(max_size - committed);
                if want == 0 {
                    return Err(full);
                }
                self.grow(&mut state, committed, want)?;
                state.take_fit(self.rx.base, size, align).ok_or(full)?
            }
        };
        let rw = self.rw.base + off;
        // SAFETY: `off .. off + size` is inside the committed RW view and was just taken out of
        // the free list under the lock, so no other allocation or thread uses these bytes.
        unsafe { ptr::write_bytes(rw as *mut u8, TRAP_FILL_BYTE, size) };
        drop(state);
        let rx = self.rx.base + off;
        // SAFETY: the range is mapped readable in the RX view.
        unsafe { sync_icache(rx, size) };
        Ok(Allocation {
            rx,
            rw,
            len,
            size,
            arena_id: self.id,
        })
    }

    /// Map `bytes` more of the memfd at offset `committed` into both views.
    fn grow(&self, state: &mut State, committed: usize, bytes: usize) -> Result<(), TextError> {
        let new_len = committed + bytes;
        let Some(fd) = state.fd.as_ref() else {
            return Err(TextError::Forked);
        };
        ftruncate(fd, new_len as u64).map_err(|errno| TextError::Grow {
            bytes: new_len,
            errno,
        })?;
        let undo = |mapped_rw: bool| {
            if mapped_rw {
                self.rw.unmap_to_none(committed, bytes);
            }
            let _ = ftruncate(fd, committed as u64);
        };
        // SAFETY: the target range lies inside this arena's own RW reservation beyond the
        // committed part, so MAP_FIXED replaces only PROT_NONE pages nobody references; the
        // memfd is at least `new_len` bytes long, so no access can hit SIGBUS.
        let rw = unsafe {
            mmap(
                (self.rw.base + committed) as *mut c_void,
                bytes,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                committed as u64,
            )
        };
        if let Err(errno) = rw {
            undo(false);
            return Err(TextError::Map { view: "RW", errno });
        }
        // SAFETY: as above, for the RX reservation.
        let rx = unsafe {
            mmap(
                (self.rx.base + committed) as *mut c_void,
                bytes,
                self.rx_prot(),
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                committed as u64,
            )
        };
        if let Err(errno) = rx {
            undo(true);
            return Err(TextError::Map { view: "RX", errno });
        }
        self.committed.store(new_len, Ordering::Release);
        state.insert_free(committed, bytes);
        Ok(())
    }

    fn rx_prot(&self) -> ProtFlags {
        #[allow(unused_mut)] // only mutated on arm64
        let mut prot = ProtFlags::READ | ProtFlags::EXEC;
        #[cfg(target_arch = "aarch64")]
        if self.opts.bti {
            prot |= ProtFlags::from_bits_retain(PROT_BTI);
        }
        prot
    }

    /// Return an allocation to the arena. Its bytes are refilled with [`TRAP_FILL_BYTE`] and may
    /// be handed out again.
    ///
    /// # Safety
    /// No thread executes, or will jump into, the allocation any more (for an image that was
    /// published to other threads this needs a grace period, e.g. RCU-tasks-like quiescence).
    pub unsafe fn free(&self, a: Allocation) -> Result<(), TextError> {
        if a.arena_id != self.id {
            return Err(TextError::ForeignAllocation { rx: a.rx });
        }
        let not_live = TextError::NotArenaText {
            addr: a.rx,
            len: a.size,
        };
        let off = a.rx.checked_sub(self.rx.base).ok_or(not_live.clone())?;
        self.check_generation()?;
        let mut state = self.lock();
        // Always true for genuine allocations (not Clone, consumed here); checked anyway so a
        // forged one cannot corrupt the free list.
        if state.live.get(&off) != Some(&a.size) {
            return Err(not_live);
        }
        state.live.remove(&off);
        // SAFETY: the block is live and owned by `a`, which we consume; the caller guarantees no
        // thread runs it, and the lock keeps it from being reallocated while we fill it.
        unsafe { ptr::write_bytes(a.rw as *mut u8, TRAP_FILL_BYTE, a.size) };
        // SAFETY: the range is mapped readable in the RX view.
        unsafe { sync_icache(a.rx, a.size) };
        state.insert_free(off, a.size);
        Ok(())
    }

    /// Copy `bytes` into the allocation at `offset` through the RW view, then
    /// [`Self::sync_text`] them. Writes are serialised by the arena's lock, so concurrent calls
    /// never race; do not use it on code other threads may be executing (that is the poker's
    /// job: see [`Self::rw_alias`]).
    pub fn write(&self, a: &Allocation, offset: usize, bytes: &[u8]) -> Result<(), TextError> {
        self.check_access(a, offset, bytes.len())?;
        self.check_generation()?;
        if bytes.is_empty() {
            return Ok(());
        }
        {
            let _state = self.lock();
            // SAFETY: `check_access` proved the destination is inside the live allocation `a`,
            // mapped RW; the lock serialises all `write`/`read`/`free` copies, and `bytes` (a
            // Rust slice) cannot overlap the arena's RW view, which is never exposed as a slice.
            unsafe {
                ptr::copy_nonoverlapping(bytes.as_ptr(), (a.rw + offset) as *mut u8, bytes.len())
            };
        }
        self.sync_text(a.rx + offset, bytes.len())
    }

    /// Copy bytes of the allocation at `offset` into `buf` (through the RW view).
    pub fn read(&self, a: &Allocation, offset: usize, buf: &mut [u8]) -> Result<(), TextError> {
        self.check_access(a, offset, buf.len())?;
        let _state = self.lock();
        // SAFETY: as in `write`, with source and destination swapped.
        unsafe {
            ptr::copy_nonoverlapping((a.rw + offset) as *const u8, buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn check_access(&self, a: &Allocation, offset: usize, len: usize) -> Result<(), TextError> {
        if a.arena_id != self.id {
            return Err(TextError::ForeignAllocation { rx: a.rx });
        }
        match offset.checked_add(len) {
            Some(end) if end <= a.len => Ok(()),
            _ => Err(TextError::OutOfBounds {
                offset,
                len,
                alloc_len: a.len,
            }),
        }
    }

    /// The writable alias of the executable address `rx_addr`, or `None` if it is not mapped
    /// text of this arena. Lock-free, O(1).
    pub fn rw_alias(&self, rx_addr: usize) -> Option<*mut u8> {
        let off = rx_addr.checked_sub(self.rx.base)?;
        (off < self.committed.load(Ordering::Acquire)).then_some((self.rw.base + off) as *mut u8)
    }

    /// Whether `rx_addr` is mapped text of this arena.
    pub fn contains(&self, rx_addr: usize) -> bool {
        self.rw_alias(rx_addr).is_some()
    }

    /// Make bytes written through the RW alias of `rx_addr .. rx_addr + len` visible to this
    /// thread's instruction fetch ([`sync_icache`]), and with
    /// [`ArenaOptions::stale_alias_workaround`] `mprotect` the covering RX pages to their
    /// current protection. Other threads additionally need [`super::sync_all_threads`].
    pub fn sync_text(&self, rx_addr: usize, len: usize) -> Result<(), TextError> {
        let not_text = TextError::NotArenaText { addr: rx_addr, len };
        let off = rx_addr.checked_sub(self.rx.base).ok_or(not_text.clone())?;
        let committed = self.committed.load(Ordering::Acquire);
        match off.checked_add(len) {
            Some(end) if end <= committed => {}
            _ => return Err(not_text),
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range was just checked to be inside the mapped RX view, which is never
        // unmapped while `self` is alive.
        unsafe { sync_icache(rx_addr, len) };
        if self.opts.stale_alias_workaround {
            // `committed` and the base are MAX_PAGE_SIZE-aligned, so the rounded range stays
            // inside the mapped view and is page aligned for any page size ≤ 64 KiB.
            let start = (off / MAX_PAGE_SIZE) * MAX_PAGE_SIZE;
            let end = (off + len).next_multiple_of(MAX_PAGE_SIZE);
            let addr = self.rx.base + start;
            let protect = |prot: ProtFlags| {
                // SAFETY: the range is our own RX mapping; every protection applied here keeps
                // it readable and executable, so no thread executing or reading it is affected.
                unsafe {
                    mprotect(
                        addr as *mut c_void,
                        end - start,
                        MprotectFlags::from_bits_retain(prot.bits()),
                    )
                }
                .map_err(|errno| TextError::Mprotect { addr, errno })
            };
            // qemu-user (checked with 7.2) drops its translations of a page only when the page
            // *becomes writable* (`page_set_flags`); re-applying RX does nothing there. So on
            // arm64 the pages are made RWX for the two system calls' duration. That briefly
            // weakens W^X, which is why the workaround is only enabled where the creation-time
            // self-test proves it necessary (an emulator), never on real hardware.
            #[cfg(target_arch = "aarch64")]
            protect(self.rx_prot() | ProtFlags::WRITE)?;
            protect(self.rx_prot())?;
        }
        Ok(())
    }

    /// Refuses use of an arena whose text is the parent's, in a forked child.
    fn check_generation(&self) -> Result<(), TextError> {
        if self.generation.load(Ordering::Acquire) == super::fork::generation() {
            Ok(())
        } else {
            Err(TextError::Forked)
        }
    }

    /// In a forked child, with `state` locked since before the fork: gives this arena a private
    /// copy of its text at the same addresses (a new memfd mapped over both views), so that the
    /// child and the parent never write each other's code. Only system calls and copies: it
    /// runs in the child's `atfork` handler, where the process has a single thread.
    pub(crate) fn privatize_after_fork(&self, state: &mut State) -> Result<(), TextError> {
        let committed = self.committed.load(Ordering::Acquire);
        let fd =
            memfd_create("livebpf-text", MemfdFlags::CLOEXEC).map_err(TextError::MemfdCreate)?;
        ftruncate(&fd, committed as u64).map_err(|errno| TextError::Grow {
            bytes: committed,
            errno,
        })?;
        let mut done = 0;
        while done < committed {
            // SAFETY: `rw.base .. + committed` is the mapped RW view; the parent cannot change it
            // meanwhile (it holds the text locks until this child reports, see `fork`).
            let chunk = unsafe {
                std::slice::from_raw_parts((self.rw.base + done) as *const u8, committed - done)
            };
            match rustix::io::pwrite(&fd, chunk, done as u64) {
                Ok(0) => return Err(TextError::Forked),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(errno) => {
                    return Err(TextError::Grow {
                        bytes: committed,
                        errno,
                    });
                }
            }
        }
        if committed != 0 {
            for (base, prot, view) in [
                (self.rw.base, ProtFlags::READ | ProtFlags::WRITE, "RW"),
                (self.rx.base, self.rx_prot(), "RX"),
            ] {
                // SAFETY: the range is this arena's own committed view, replaced in place by a
                // mapping of identical contents; the child's only thread is in this handler, so
                // nothing executes or writes the text meanwhile.
                unsafe {
                    mmap(
                        base as *mut c_void,
                        committed,
                        prot,
                        MapFlags::SHARED | MapFlags::FIXED,
                        &fd,
                        0,
                    )
                }
                .map_err(|errno| TextError::Map { view, errno })?;
            }
            // SAFETY: the RX view was just mapped readable over this range.
            unsafe { sync_icache(self.rx.base, committed) };
        }
        state.fd = Some(fd);
        self.generation
            .store(super::fork::generation(), Ordering::Release);
        Ok(())
    }

    /// Locks the allocator state (for `fork`, which holds it across the fork).
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for CodeArena {
    fn drop(&mut self) {
        let live = self
            .state
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .len();
        if live != 0 {
            // Someone may still run leaked images: keep the text mapped rather than turn a leak
            // into a crash. Zero `raw_len` makes the reservations' Drop skip the munmap.
            self.rx.raw_len = 0;
            self.rw.raw_len = 0;
        }
    }
}

/// The system page size (from the auxiliary vector), or [`MAX_PAGE_SIZE`] if it cannot be read,
/// which is a multiple of every supported page size and so still a valid page alignment.
pub fn page_size() -> usize {
    static PAGE_SIZE: OnceLock<usize> = OnceLock::new();
    *PAGE_SIZE.get_or_init(|| auxv_page_size().unwrap_or(MAX_PAGE_SIZE))
}

fn auxv_page_size() -> Option<usize> {
    const AT_NULL: usize = 0;
    const AT_PAGESZ: usize = 6;
    const W: usize = size_of::<usize>();
    let auxv = std::fs::read("/proc/self/auxv").ok()?;
    for pair in auxv.chunks_exact(2 * W) {
        let key = usize::from_ne_bytes(pair[..W].try_into().ok()?);
        let value = usize::from_ne_bytes(pair[W..].try_into().ok()?);
        match key {
            AT_PAGESZ => {
                return (value.is_power_of_two() && value <= MAX_PAGE_SIZE).then_some(value);
            }
            AT_NULL => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<CodeArena>();
        send_sync::<Allocation>();
    };

    #[test]
    fn free_list_coalesces_both_sides() {
        let mut s = State::default();
        s.insert_free(0, 16);
        s.insert_free(32, 16);
        s.insert_free(16, 16);
        assert_eq!(s.free.iter().collect::<Vec<_>>(), [(&0, &48)]);
    }

    #[test]
    fn take_fit_splits_padding_and_tail() {
        let mut s = State::default();
        s.insert_free(16, 256);
        // base 0x10000: address 0x10010 must be padded to 0x10040 for 64-byte alignment.
        let off = s.take_fit(0x10000, 32, 64).unwrap();
        assert_eq!(off, 64);
        assert_eq!(s.free.get(&16), Some(&48));
        assert_eq!(s.free.get(&96), Some(&176));
        assert_eq!(s.live.get(&64), Some(&32));
        assert!(s.take_fit(0x10000, 512, 16).is_none());
    }

    #[test]
    fn page_size_is_sane() {
        let ps = page_size();
        assert!(ps.is_power_of_two() && (4096..=MAX_PAGE_SIZE).contains(&ps));
    }
}
