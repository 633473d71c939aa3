//! livebpf: a userspace eBPF runtime whose JIT code can be traced and replaced while other threads
//! run it. See `docs/ARCHITECTURE.md` for the layers.
#![warn(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("livebpf supports little-endian hosts only (x86-64, arm64)");

pub mod asm;
// The `livebpf` binary's command-line implementation, not library API.
#[doc(hidden)]
pub mod cli;
pub mod conformance;
pub mod exec;
pub mod helpers;
pub mod interp;
pub mod isa;
pub mod jit;
pub mod loader;
pub mod maps;
pub mod native;
pub mod reclaim;
pub mod runtime;
pub mod text;
pub mod trampoline;

pub use asm::assemble_program;
pub use exec::{ExecError, RunEnv, TailTarget};
pub use helpers::Helpers;
pub use interp::Interpreter;
pub use isa::Program;
pub use jit::{JitOptions, JitProgram};
pub use native::NativeSite;
pub use trampoline::{AttachError, AttachKind, Link, Prog, ProgStats, attach, attach_native};

/// The README's examples, compiled and run as doctests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
