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
    pub start: u64,
    pub len: u64,
    pub writable: bool,
}

impl MemRegion {
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
    #[error(
        "out-of-bounds {access} of {size} bytes at address {addr:#x} (instruction {pc}); a program may only touch its input memory, its stack and the regions it was given"
    )]
    OutOfBounds {
        pc: usize,
        addr: u64,
        size: u64,
        access: Access,
    },
    #[error(
        "misaligned atomic access of {size} bytes at address {addr:#x} (instruction {pc}); atomics need naturally aligned addresses"
    )]
    MisalignedAtomic { pc: usize, addr: u64, size: u64 },
    #[error("call to unknown helper {id} (instruction {pc}); register it in `Helpers` first")]
    UnknownHelper { pc: usize, id: u64 },
    #[error(
        "BPF-to-BPF call depth exceeds {MAX_CALL_DEPTH} frames (instruction {pc}); is the program recursing without end?"
    )]
    CallDepthExceeded { pc: usize },
    #[error(
        "instruction budget of {budget} exhausted at instruction {pc}; the program may loop forever, or needs a larger budget"
    )]
    BudgetExhausted { pc: usize, budget: u64 },
    #[error("engine `{engine}` is not available: {reason}")]
    EngineUnavailable {
        engine: &'static str,
        reason: String,
    },
}

/// The kind of a memory access, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Load,
    Store,
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
