//! Executable memory: code arena, program registry and the synchronisation primitives that
//! text_poke builds on.
//!
//! * [`CodeArena`] hands out executable memory that is never writable and executable through the
//!   same mapping (W^X): one memfd is mapped twice, an RW view that livebpf writes through and an
//!   RX view that threads execute. [`CodeArena::rw_alias`] gives the writable alias of an
//!   executable address, which is what a poker needs to patch live code.
//! * [`Registry`] answers "which JIT image is this address in?" (the kernel's
//!   `bpf_address_lookup`) in O(log n), for concurrent lookups.
//! * [`sync_icache`] makes freshly written code visible to this thread's instruction fetch;
//!   [`sync_all_threads`] makes every thread of the process serialise its instruction stream
//!   (`membarrier(2)`), which cross-modifying code needs before and after a patch.
//!
//! Typical use by a JIT:
//!
//! ```no_run
//! use livebpf::text::{CodeArena, ImageKind, Registry};
//! # fn main() -> Result<(), livebpf::text::TextError> {
//! let arena = CodeArena::global()?;
//! let code = [0xb8, 0x2a, 0, 0, 0, 0xc3]; // x86-64: mov eax, 42; ret
//! let image = arena.alloc(code.len(), 16)?;
//! arena.write(&image, 0, &code)?;
//! // SAFETY (of the example): the image is our own code in the global arena, unregistered
//! // below before it is freed.
//! unsafe { Registry::global().register(image.rx(), image.len(), ImageKind::Program, 7)? };
//! // ... publish image.rx() to other threads, run it ...
//! Registry::global().unregister(image.rx())?;
//! // SAFETY (of the example): nothing runs the image any more.
//! unsafe { arena.free(image)? };
//! # Ok(())
//! # }
//! ```

mod arena;
pub(crate) mod fork;
pub mod poke;
mod registry;
mod sync;

pub use arena::{Allocation, ArenaOptions, CodeArena, MAX_PAGE_SIZE, TRAP_FILL_BYTE, page_size};
pub use registry::{ImageKind, Registry, Symbol};
pub use sync::{SyncMode, sync_all_threads, sync_icache, sync_mode};

use rustix::io::Errno;

/// Errors of the `text` layer. Each message says what failed and what to check or change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// `memfd_create(2)` failed.
    #[error(
        "memfd_create failed: {0}; livebpf needs Linux ≥ 3.17 (memfd) and a seccomp policy that allows memfd_create"
    )]
    MemfdCreate(Errno),

    /// Reserving the arena's address space failed.
    #[error(
        "reserving {bytes} bytes of address space for the code arena failed: {errno}; lower ArenaOptions::max_size or raise RLIMIT_AS"
    )]
    Reserve {
        /// Bytes asked for.
        bytes: usize,
        /// The `mmap(2)` error.
        errno: Errno,
    },

    /// Growing the memfd with `ftruncate(2)` failed.
    #[error(
        "growing the code arena's memfd to {bytes} bytes failed: {errno}; check RLIMIT_FSIZE and the memory cgroup limit"
    )]
    Grow {
        /// The memfd size asked for.
        bytes: usize,
        /// The `ftruncate(2)` error.
        errno: Errno,
    },

    /// Mapping one of the two views failed.
    #[error(
        "mapping the code arena's {view} view failed: {errno}; an SELinux execmem/execmod denial, PaX MPROTECT or a seccomp filter can forbid executable shared mappings"
    )]
    Map {
        /// `"RW"` or `"RX"`.
        view: &'static str,
        /// The `mmap(2)` error.
        errno: Errno,
    },

    /// `mprotect(2)` of the RX view (stale-alias workaround) failed.
    #[error(
        "mprotect of code arena text at {addr:#x} failed: {errno}; disable ArenaOptions::stale_alias_workaround if the platform does not need it"
    )]
    Mprotect {
        /// Start of the pages.
        addr: usize,
        /// The `mprotect(2)` error.
        errno: Errno,
    },

    /// Zero-byte allocation.
    #[error("cannot allocate a zero-byte code image; pass the image's length in bytes")]
    ZeroLength,

    /// Alignment is not a power of two or larger than the arena.
    #[error(
        "alignment {align} is not a power of two no larger than the arena ({max_size} bytes); use 8, 16, 64 or page_size()"
    )]
    BadAlignment {
        /// The alignment asked for.
        align: usize,
        /// The arena's reservation size.
        max_size: usize,
    },

    /// The arena's reserved address space is used up.
    #[error(
        "code arena exhausted: {requested} bytes (aligned to {align}) do not fit in its {max_size}-byte reservation; free unused images or raise ArenaOptions::max_size"
    )]
    ArenaFull {
        /// Bytes asked for.
        requested: usize,
        /// Their alignment.
        align: usize,
        /// The arena's reservation size.
        max_size: usize,
    },

    /// The allocation was made by another arena.
    #[error(
        "allocation at {rx:#x} does not belong to this code arena; write or free it through the arena that allocated it"
    )]
    ForeignAllocation {
        /// The allocation's executable address.
        rx: usize,
    },

    /// A write or read beyond the end of an allocation.
    #[error(
        "access of {len} bytes at offset {offset} exceeds the {alloc_len}-byte code image; allocate a bigger image"
    )]
    OutOfBounds {
        /// Offset of the access in the image.
        offset: usize,
        /// Its length.
        len: usize,
        /// The image's length.
        alloc_len: usize,
    },

    /// An address range that is not mapped text of this arena.
    #[error(
        "address range {addr:#x}+{len} is not inside this code arena's mapped text; pass an address returned by CodeArena::alloc"
    )]
    NotArenaText {
        /// Start of the range.
        addr: usize,
        /// Its length.
        len: usize,
    },

    /// `CodeArena::init_global` after the global arena was already created.
    #[error(
        "the global code arena already exists; call CodeArena::init_global once, before any CodeArena::global()"
    )]
    GlobalAlreadyInitialized,

    /// Neither flavour of private expedited `membarrier(2)` could be registered.
    #[error(
        "membarrier(2) private expedited commands are unavailable; livebpf needs Linux ≥ 4.14 (≥ 4.16 for SYNC_CORE) with CONFIG_MEMBARRIER and a seccomp policy that allows membarrier"
    )]
    MembarrierUnavailable,

    /// A registered `membarrier(2)` command failed.
    #[error(
        "membarrier({mode:?}) failed: {errno}; this should not happen after a successful registration"
    )]
    Membarrier {
        /// The flavour that was registered.
        mode: SyncMode,
        /// The `membarrier(2)` error.
        errno: Errno,
    },

    /// An empty or wrapping range given to the registry.
    #[error(
        "invalid text range {start:#x}+{len}: it must be non-empty and not wrap the address space"
    )]
    InvalidRange {
        /// Start of the range.
        start: usize,
        /// Its length.
        len: usize,
    },

    /// A registry range overlapping an existing one.
    #[error(
        "text range {start:#x}+{len} overlaps registered {existing_kind:?} image {existing_start:#x}+{existing_len}; unregister it first"
    )]
    Overlap {
        /// Start of the new range.
        start: usize,
        /// Its length.
        len: usize,
        /// Start of the registered range it overlaps.
        existing_start: usize,
        /// That range's length.
        existing_len: usize,
        /// That range's kind.
        existing_kind: ImageKind,
    },

    /// An arena made before `fork`, used in the child.
    #[error(
        "this code arena belongs to the parent process (it was created before fork); the child cannot use it — use CodeArena::global(), which the child gets a private copy of, or create a new arena"
    )]
    Forked,

    /// `unregister` of a start address that is not registered.
    #[error("no image is registered at {start:#x}; pass the start address given to register")]
    NotRegistered {
        /// The address given.
        start: usize,
    },
}
