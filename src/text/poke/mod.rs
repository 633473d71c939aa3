//! `text_poke`: rewrite a patch site in JIT text while other threads may be executing it.
//!
//! A patch site is one instruction that is a nop, a call or a jump: the site at every program's
//! entry, or a site inside a trampoline image (`ip_after_call`). The contract follows the kernel's
//! `bpf_arch_text_poke`:
//! * `ip` not inside registered JIT text → [`PokeError::NotText`], nothing written;
//! * `ip` at a program's entry means that program's patch site;
//! * a target the instruction cannot reach → [`PokeError::OutOfRange`];
//! * under one text lock, current instruction ≠ `old` → [`PokeError::Mismatch`], nothing written;
//!   current == `new` → [`PokeOutcome::AlreadyApplied`];
//! * otherwise a thread executing the site meanwhile runs either the old or the new instruction,
//!   never a torn one, and every thread runs the new one once `text_poke` returns.
//!
//! # x86-64: the int3 protocol
//! The Intel SDM (vol. 3A, §9.1.3 / §8.1.3 in older editions, "Handling Self- and Cross-Modifying
//! Code") only promises defined behaviour for code another processor may be executing when the
//! modifying processor writes it and every executing processor then runs a serialising instruction
//! before it runs the new code; otherwise the outcome is implementation-specific (several CPUs have
//! errata for unsynchronised cross-modifying code). A 5-byte instruction cannot be swapped under that
//! rule in one step, so livebpf uses the sequence Linux uses (`text_poke_bp`), with
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` in place of the kernel's IPIs — it makes
//! every thread of the process execute a core-serialising instruction before it returns:
//! 1. write `int3` (`0xcc`) over the first byte; sync all threads;
//! 2. write bytes 1..5 of the new instruction; sync;
//! 3. write the new first byte; sync.
//!
//! A single-byte store is atomic and byte 0 is where every thread starts decoding the site, so from
//! step 1 until step 3 every thread that reaches the site traps on the `int3` instead of decoding a
//! mix of old and new bytes. The `SIGTRAP` handler installed here recognises the site of the poke
//! in progress and emulates the *new* instruction (nop: skip it; call: push the return address and go
//! to the target; jump: go to the target). A thread whose trap is handled only after the poke
//! finished finds no `int3` under its program counter any more and re-executes the now-final
//! instruction. Only an int3 (`si_code == SI_KERNEL`) at the site of a poke is ours; every other
//! SIGTRAP goes to the disposition livebpf's handler replaced, with that disposition's semantics
//! (a handler with its `sa_mask`, `SIG_IGN`, `SIG_DFL`). Before writing anything `text_poke` checks
//! that SIGTRAP still reaches livebpf's handler (`PokeError::TrapHandlerReplaced`,
//! `reinstall_trap_handler`) and that no thread that has run JIT code blocks it
//! (`PokeError::SigtrapBlocked`). What an embedding application and a debugger must do is in
//! docs/ARCHITECTURE.md, "Signals: what an embedding application and a debugger must do".
//! After step 3's sync no thread can still hold the old bytes or the `int3` in its pipeline, so
//! every thread runs the new instruction once `text_poke` returns.
//!
//! # arm64: one word, and a PLT for far targets
//! The Arm ARM (DDI 0487, B2.2.5, "concurrent modification and execution of instructions")
//! allows a word another core may be executing to be replaced with one aligned 32-bit store when
//! both the old and the new instruction are among `B`, `BL`, `NOP`, `BRK`, `ISB`, `SVC`, `HVC`,
//! `SMC`: the other core then executes either the old or the new one, never a mix. The site is
//! therefore always `nop`, `b` or `bl` (±128 MiB). A program-entry site whose target is further
//! away branches to the program's PLT (`ldr x10, #8; br x10; .quad target`) after its literal was
//! set with one aligned 64-bit store; leaving a far target resets the literal to the shared dummy
//! trampoline first, which behaves like the nop. After the store: `dc cvau`/`ic ivau` on the line
//! (`CodeArena::sync_text`), then `membarrier(SYNC_CORE)` so that every thread context-
//! synchronises and runs the new word once `text_poke` returns. See `arm64.rs` for how the
//! poker finds a program's PLT.

use thiserror::Error;

use super::TextError;

#[cfg(target_arch = "aarch64")]
mod arm64;
#[cfg(target_arch = "aarch64")]
pub use arm64::{
    A64_NOP, DUMMY_TRAMPOLINE, PATCH_SITE_LEN, PATCH_SITE_OFFSET, ProgramSite, decode_a64,
    dummy_trampoline, encode_a64, register_program_site, text_poke, unregister_program_site,
};
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    PATCH_SITE_LEN, PATCH_SITE_OFFSET, X86_NOP5, declare_chaining_trap_handler, decode_x86,
    encode_x86, reinstall_trap_handler, text_poke, traps_handled,
};

/// What a patch site holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PokeInsn {
    Nop,
    /// A call to an absolute address.
    Call(usize),
    /// A jump to an absolute address.
    Jump(usize),
}

/// A successful poke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PokeOutcome {
    /// The site now holds `new`.
    Applied,
    /// The site already held `new`; nothing was written (the kernel returns 1 here).
    AlreadyApplied,
}

/// Names a SIGTRAP disposition for [`PokeError::TrapHandlerReplaced`].
fn describe_disposition(action: usize) -> String {
    match action {
        libc::SIG_DFL => "SIG_DFL (the default action)".to_string(),
        libc::SIG_IGN => "SIG_IGN".to_string(),
        handler => format!("the handler at {handler:#x}"),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PokeError {
    #[error(
        "{ip:#x} is not inside livebpf JIT text; only program and trampoline images registered in the text registry can be poked"
    )]
    NotText { ip: usize },
    #[error(
        "target {target:#x} is out of range of the instruction at {ip:#x}; allocate the target from the same code arena"
    )]
    OutOfRange { ip: usize, target: usize },
    #[error(
        "the patch site at {ip:#x} holds {found:?}, not the expected {expected:?}; nothing was written (did another attach change it?)"
    )]
    Mismatch {
        ip: usize,
        expected: PokeInsn,
        found: PokeInsn,
    },
    #[error(
        "the bytes at {ip:#x} ({bytes:02x?}) are not a patch site (nop, call or jump); pass a program entry or a trampoline site"
    )]
    NotASite { ip: usize, bytes: Vec<u8> },
    #[error("installing the SIGTRAP handler text_poke needs failed: {0}")]
    Signal(String),
    /// x86-64: SIGTRAP no longer reaches livebpf's handler (`installed` is the `sa_sigaction`
    /// now installed: `SIG_DFL` = 0, `SIG_IGN` = 1, or a handler's address).
    #[error(
        "livebpf's SIGTRAP handler was replaced: SIGTRAP is now handled by {}; nothing was written. A thread reaching the patch site during the poke would die or resume inside the instruction being rewritten. If you installed a SIGTRAP handler, call livebpf::text::poke::reinstall_trap_handler() (livebpf then passes the SIGTRAPs that are not its own to yours), or, if your handler passes them to livebpf's, declare it with declare_chaining_trap_handler(); never reset SIGTRAP to SIG_DFL or SIG_IGN while livebpf is used",
        describe_disposition(*installed)
    )]
    TrapHandlerReplaced { installed: usize },
    /// x86-64: a thread that may execute JIT text blocks SIGTRAP (kernel thread id `tid`).
    #[error(
        "thread {tid} has run livebpf JIT code and blocks SIGTRAP; nothing was written: if it reached the patch site during the poke, the kernel would kill the process. Keep SIGTRAP unblocked (pthread_sigmask) in every thread that runs livebpf programs, or poke after that thread has exited"
    )]
    SigtrapBlocked { tid: i32 },
    #[error(transparent)]
    Text(#[from] TextError),
}
