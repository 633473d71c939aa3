//! livebpf: a userspace eBPF runtime whose JIT code can be traced and replaced while other threads
//! run it. See `docs/ARCHITECTURE.md` for the layers.

pub mod asm;
pub mod isa;
pub mod text;
