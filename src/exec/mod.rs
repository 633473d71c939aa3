//! The execution contract every engine (interpreter, JITs) follows, the state of a run, and the
//! errors a run can end with.
//!
//! A run starts from a [`RunEnv`]: r1–r5 are [`RunEnv::args`] and r10 is the top of a stack
//! frame of [`STACK_SIZE`] bytes (the older entry points, `run(mem)`, make r1 the address of the
//! input memory, 0 when there is none, and r2 its length). Each BPF-to-BPF call moves r10 down
//! one frame; at most [`MAX_CALL_DEPTH`] frames are live. The program may touch the run's
//! regions, its stack window and the regions helpers grant it ([`HelperContext::grant`]);
//! anything else ends a checked run with [`ExecError::OutOfBounds`]. The per-run state every
//! engine keeps is a [`HelperContext`] (see [`context`]).
//!
//! # The stack window
//!
//! No engine clears the [`TOTAL_STACK`] bytes per run. Instead, every function — the entry,
//! each BPF-to-BPF callee, a tail call's target, a freplace program — extends the run's *stack
//! window* down to `r10 - reach` when it is entered, zeroing what it adds, where `reach` is
//! the function's [`StackReach`](crate::isa::StackReach) (proven statically; the whole stack
//! when it cannot be). The rule every engine keeps identically:
//! - a run can read only its window: bytes that are zero or that the run itself wrote, never an
//!   earlier run's or another program's data;
//! - every access through an address the program derived from r10 lies inside the window (the
//!   analysis proves it; tail calls whose context points into the stack, or made from a
//!   subprogram, get the whole stack);
//! - anything else that lands in the stack below the window — an address a helper handed back
//!   — is out of bounds for a checked run, as Linux's verifier sizes each frame to what the
//!   program uses. Trusted code is not checked: a helper that returns stack addresses to it
//!   must not exist (none of livebpf's does).
//!
//! Within one run frames are not cleared between calls: a callee sees what an earlier callee
//! at the same depth left (as in the interpreter since the beginning).

pub mod context;
pub mod tail;

use std::borrow::Cow;
use std::ffi::c_void;

use thiserror::Error;

pub use context::{HelperContext, INLINE_GRANTS, JitStack, MAX_GRANTS, RunContext};
pub use tail::{DirectTailCall, TailCaller, TailTarget};

use crate::maps::RawMap;

/// Bytes of stack per call frame (RFC 9669 / Linux `MAX_BPF_STACK`).
pub const STACK_SIZE: usize = 512;
/// Maximum number of live frames, the entry frame included (Linux `MAX_CALL_FRAMES`).
pub const MAX_CALL_DEPTH: usize = 8;
/// Total stack a run needs.
pub const TOTAL_STACK: usize = STACK_SIZE * MAX_CALL_DEPTH;

/// Most tail calls one run may make (Linux `MAX_TAIL_CALL_CNT`): the 34th falls through.
pub const MAX_TAIL_CALL_CNT: u32 = 33;

/// What one run starts from, the same for every engine.
///
/// Build it with a struct literal, starting from [`RunEnv::default`] for the fields you do not
/// need: `RunEnv { args, regions: &regions, ..RunEnv::default() }`.
#[derive(Clone, Copy, Debug)]
pub struct RunEnv<'a> {
    /// r1..r5 on entry.
    pub args: [u64; 5],
    /// Memory the program may access besides its stack (what checked runs allow). JIT code
    /// checks `regions[0]` inline and the others out of line, so put the most accessed first
    /// (e.g. the packet).
    pub regions: &'a [MemRegion],
    /// Opaque per-run state for context helpers ([`HelperContext::user`]); null if none.
    pub user: *mut c_void,
    /// The maps the program may name: helpers taking a map argument accept only these
    /// ([`HelperContext::map`]) in checked runs, and in trusted runs when the list is not empty.
    pub maps: &'a [*const RawMap],
}

impl Default for RunEnv<'_> {
    fn default() -> Self {
        RunEnv {
            args: [0; 5],
            regions: &[],
            user: std::ptr::null_mut(),
            maps: &[],
        }
    }
}

impl<'a> RunEnv<'a> {
    /// An environment with `args` and `regions`, no user pointer and no maps.
    pub fn new(args: [u64; 5], regions: &'a [MemRegion]) -> RunEnv<'a> {
        RunEnv {
            args,
            regions,
            ..RunEnv::default()
        }
    }
}

/// A range of memory a program may access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// Address of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether stores and atomics may touch it (loads always may).
    pub writable: bool,
}

impl MemRegion {
    /// The region `[start, start + len)`.
    pub fn new(start: u64, len: u64, writable: bool) -> MemRegion {
        MemRegion {
            start,
            len,
            writable,
        }
    }

    /// A region covering `slice`, writable.
    pub fn of_slice(slice: &mut [u8]) -> MemRegion {
        MemRegion::new(slice.as_mut_ptr() as u64, slice.len() as u64, true)
    }

    /// Whether `[addr, addr + size)` lies wholly inside this region (no wrap-around).
    pub fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.start
            && addr
                .checked_add(size)
                .is_some_and(|end| end <= self.start + self.len)
    }
}

/// Why a run stopped without returning a value.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ExecError {
    /// A memory access fell outside every region that allows it.
    #[error(
        "out-of-bounds {access} of {size} bytes at address {addr:#x} (instruction {pc}); a program may only touch its input memory, its stack and the regions it was given"
    )]
    OutOfBounds {
        /// Slot index of the accessing instruction.
        pc: usize,
        /// First byte accessed.
        addr: u64,
        /// Access width in bytes.
        size: u64,
        /// What the instruction tried to do.
        access: Access,
    },
    /// An atomic, load-acquire or store-release address is not a multiple of its width.
    #[error(
        "misaligned atomic access of {size} bytes at address {addr:#x} (instruction {pc}); atomics need naturally aligned addresses"
    )]
    MisalignedAtomic {
        /// Slot index of the accessing instruction.
        pc: usize,
        /// The misaligned address.
        addr: u64,
        /// Access width in bytes.
        size: u64,
    },
    /// A `call` or `callx` named a helper id that is not registered.
    #[error("call to unknown helper {id} (instruction {pc}); register it in `Helpers` first")]
    UnknownHelper {
        /// Slot index of the call.
        pc: usize,
        /// The id called (for `callx`, the full 64-bit register value).
        id: u64,
    },
    /// A BPF-to-BPF call would make more than [`MAX_CALL_DEPTH`] frames live.
    #[error(
        "BPF-to-BPF call depth exceeds {MAX_CALL_DEPTH} frames (instruction {pc}); is the program recursing without end?"
    )]
    CallDepthExceeded {
        /// Slot index of the call.
        pc: usize,
    },
    /// The run used up its instruction budget (see the engine for what it counts).
    #[error(
        "instruction budget of {budget} exhausted at instruction {pc}; the program may loop forever, or needs a larger budget"
    )]
    BudgetExhausted {
        /// Slot index of the instruction at which the budget ran out.
        pc: usize,
        /// The budget the run was given.
        budget: u64,
    },
    /// A helper ended the run ([`HelperContext::fail_helper`]): e.g. a map argument that is not
    /// one of the run's maps, or more granted regions than a run may hold.
    #[error("helper {helper} failed at instruction {pc}: {reason}")]
    HelperFault {
        /// Slot index of the call.
        pc: usize,
        /// The helper's id.
        helper: u32,
        /// What went wrong.
        reason: Cow<'static, str>,
    },
    /// The requested execution engine cannot run on this host.
    #[error("engine `{engine}` is not available: {reason}")]
    EngineUnavailable {
        /// The engine's name, e.g. `"jit"`.
        engine: &'static str,
        /// Why it is unavailable.
        reason: String,
    },
}

/// The kind of a memory access, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A load, or a load-acquire.
    Load,
    /// A store, or a store-release.
    Store,
    /// An atomic read-modify-write.
    Atomic,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Load => "load",
            Access::Store => "store",
            Access::Atomic => "atomic access",
        })
    }
}
