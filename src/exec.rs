//! The execution contract every engine (interpreter, JITs) follows, and the errors a run can end with.
//!
//! On entry r1 holds the address of the input memory (0 when there is none), r2 its length and r10
//! the top of a fresh stack frame of [`STACK_SIZE`] bytes. Each BPF-to-BPF call gets a fresh frame; at
//! most [`MAX_CALL_DEPTH`] frames are live. The program may touch its input memory, the stack and any
//! extra [`MemRegion`]s it was given; anything else ends the run with [`ExecError::OutOfBounds`].

use thiserror::Error;

/// Bytes of stack per call frame (RFC 9669 / Linux `MAX_BPF_STACK`).
pub const STACK_SIZE: usize = 512;
/// Maximum number of live frames, the entry frame included (Linux `MAX_CALL_FRAMES`).
pub const MAX_CALL_DEPTH: usize = 8;
/// Total stack a run needs.
pub const TOTAL_STACK: usize = STACK_SIZE * MAX_CALL_DEPTH;

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
