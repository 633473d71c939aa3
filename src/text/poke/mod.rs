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
use arm64::text_poke as arch_text_poke;
#[cfg(target_arch = "aarch64")]
pub use arm64::{
    A64_NOP, DUMMY_TRAMPOLINE, PATCH_SITE_LEN, PATCH_SITE_OFFSET, ProgramSite, decode_a64,
    dummy_trampoline, encode_a64, plt_quiesced, register_program_site, unregister_program_site,
};
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::X86_NOP5_HEAD;
#[cfg(target_arch = "x86_64")]
use x86_64::text_poke as arch_text_poke;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    PATCH_SITE_LEN, PATCH_SITE_OFFSET, X86_NOP5, declare_chaining_trap_handler, decode_x86,
    encode_x86, reinstall_trap_handler, traps_handled,
};

#[cfg(target_arch = "aarch64")]
pub(crate) use arm64::native_text_poke;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::native_text_poke;

/// Fills `buf` with this process's memory at `addr` through `/proc/self/mem`; false where it is
/// not mapped. Unlike a pointer read, memory another thread unmaps meanwhile (a shared object
/// being unloaded) makes this fail instead of faulting.
pub(crate) fn read_own_memory(addr: usize, buf: &mut [u8]) -> bool {
    use std::os::unix::fs::FileExt;
    std::fs::File::open("/proc/self/mem")
        .is_ok_and(|mem| mem.read_exact_at(buf, addr as u64).is_ok())
}

/// Drops what the poker remembers about the sites in `[start, end)`, whose image is leaving the
/// global registry (x86-64: the SIGTRAP handler's recent sites).
pub(crate) fn forget_sites(start: usize, end: usize) {
    #[cfg(target_arch = "x86_64")]
    x86_64::forget_sites(start, end);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, end);
}

/// Serialises all pokes (the kernel's `text_mutex`); `fork` holds it across the fork.
pub(crate) static TEXT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A patch site: the address of an instruction its owner made to be rewritten while threads run
/// it (a program's prologue site, a trampoline's `ip_after_call`). Obtained from the owner —
/// [`crate::jit::JitProgram::patch_site`] — or checked against the registry's record of sites
/// with [`PatchSite::at`]; never assumed from an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatchSite {
    ip: usize,
}

impl PatchSite {
    /// The site at `ip`, if `ip` is a recorded patch site ([`crate::text::Registry::add_site`]).
    pub fn at(ip: usize) -> Result<PatchSite, PokeError> {
        check_site(ip)?;
        Ok(PatchSite { ip })
    }

    /// A site its owner recorded.
    pub(crate) fn recorded(ip: usize) -> PatchSite {
        PatchSite { ip }
    }

    /// The site's address.
    pub fn ip(&self) -> usize {
        self.ip
    }
}

/// `ip` must be a recorded site: not in JIT text → `NotText`; in text but not a site →
/// `NotASite`, with the bytes found there.
fn check_site(ip: usize) -> Result<(), PokeError> {
    let registry = crate::text::Registry::global();
    if registry.is_site(ip) {
        return Ok(());
    }
    let sym = registry.lookup(ip).ok_or(PokeError::NotText { ip })?;
    let len = PATCH_SITE_LEN.min(sym.start + sym.len - ip);
    let bytes = crate::text::CodeArena::global()
        .ok()
        .filter(|a| a.contains(ip + len - 1))
        .and_then(|a| a.rw_alias(ip))
        // SAFETY: `ip .. ip + len` is inside a registered image of the arena (checked above),
        // whose RW view is mapped; reading it races only with pokers' single-byte/word stores.
        .map(|rw| unsafe { std::slice::from_raw_parts(rw, len) }.to_vec())
        .unwrap_or_default();
    Err(PokeError::NotASite { ip, bytes })
}

/// Rewrites the patch site at `ip` from `old` to `new` (see the module docs for the contract).
/// `ip` must be a recorded patch site ([`PatchSite`]); no offset is re-interpreted.
///
/// # Safety
/// `new` must be valid for every thread that executes the site from now on: a `Call`/`Jump`
/// target is complete code that stays mapped while the site can branch there, and behaves as
/// the site's owner expects (for a program's site: a trampoline image or a program with the
/// program ABI). The safe way to change a program's site is [`crate::trampoline::attach`].
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub unsafe fn text_poke(ip: usize, old: PokeInsn, new: PokeInsn) -> Result<PokeOutcome, PokeError> {
    check_site(ip)?;
    arch_text_poke(ip, old, new)
}

/// [`text_poke`] on a typed site.
///
/// # Safety
/// As for [`text_poke`].
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub unsafe fn poke_site(
    site: PatchSite,
    old: PokeInsn,
    new: PokeInsn,
) -> Result<PokeOutcome, PokeError> {
    // SAFETY: forwarded.
    unsafe { text_poke(site.ip, old, new) }
}

/// What a patch site holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PokeInsn {
    /// The site's nop: execution goes on after it.
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

/// Why a poke did not happen. In every case nothing was written.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PokeError {
    #[error(
        "{ip:#x} is not inside livebpf JIT text; only program and trampoline images registered in the text registry can be poked"
    )]
    /// The address is in no registered JIT image.
    NotText {
        /// The address given.
        ip: usize,
    },
    #[error(
        "target {target:#x} is out of range of the instruction at {ip:#x}; allocate the target from the same code arena"
    )]
    /// The target is beyond the site's reach.
    OutOfRange {
        /// The site.
        ip: usize,
        /// The target that does not fit.
        target: usize,
    },
    #[error(
        "the patch site at {ip:#x} holds {found:?}, not the expected {expected:?}; nothing was written (did another attach change it?)"
    )]
    /// The site does not hold `old`.
    Mismatch {
        /// The site.
        ip: usize,
        /// The `old` instruction the caller expected.
        expected: PokeInsn,
        /// What the site holds.
        found: PokeInsn,
    },
    #[error(
        "the bytes at {ip:#x} ({bytes:02x?}) are not a patch site (nop, call or jump); pass a program entry or a trampoline site"
    )]
    /// The address is in JIT text but is not a recorded patch site.
    NotASite {
        /// The address given.
        ip: usize,
        /// The bytes found there (empty when they could not be read).
        bytes: Vec<u8>,
    },
    #[error(
        "the PLT of the site at {ip:#x} last served a far {} and a thread may still load its literal; wait for a grace period (reclaim::synchronize), declare it with plt_quiesced, and retry",
        if *was_call { "call" } else { "jump" }
    )]
    /// arm64: the PLT literal must change between a far call and a far jump.
    PltKindChange {
        /// The site.
        ip: usize,
        /// Whether the literal last served a call (else a jump).
        was_call: bool,
    },
    #[error("installing the SIGTRAP handler text_poke needs failed: {0}")]
    /// `sigaction(2)` failed; the message says how.
    Signal(String),
    /// x86-64: SIGTRAP no longer reaches livebpf's handler (`installed` is the `sa_sigaction`
    /// now installed: `SIG_DFL` = 0, `SIG_IGN` = 1, or a handler's address).
    #[error(
        "livebpf's SIGTRAP handler was replaced: SIGTRAP is now handled by {}; nothing was written. A thread reaching the patch site during the poke would die or resume inside the instruction being rewritten. If you installed a SIGTRAP handler, call livebpf::text::poke::reinstall_trap_handler() (livebpf then passes the SIGTRAPs that are not its own to yours), or, if your handler passes them to livebpf's, declare it with declare_chaining_trap_handler(); never reset SIGTRAP to SIG_DFL or SIG_IGN while livebpf is used",
        describe_disposition(*installed)
    )]
    TrapHandlerReplaced {
        /// The disposition found instead (`SIG_DFL`, `SIG_IGN` or a handler's address).
        installed: usize,
    },
    /// x86-64: a thread that may execute JIT text blocks SIGTRAP (kernel thread id `tid`).
    #[error(
        "thread {tid} may reach the patch site (it has run livebpf JIT code, or the site is a native function's, which any thread may call) and blocks SIGTRAP; nothing was written: if it reached the site during the poke, the kernel would kill the process. Keep SIGTRAP unblocked (pthread_sigmask) in every thread that runs livebpf programs or calls traced native functions, or poke after that thread has exited"
    )]
    SigtrapBlocked {
        /// The kernel id of the thread.
        tid: i32,
    },
    /// x86-64: writing a native function's site through `/proc/self/mem` failed.
    #[error(
        "writing the native site at {ip:#x} failed: {reason}; livebpf writes native text through /proc/self/mem, which needs a kernel that allows it (proc_mem.force_override) and no seccomp rule against it"
    )]
    NativeWrite {
        /// The site.
        ip: usize,
        /// What failed.
        reason: String,
    },
    #[error(transparent)]
    /// The code arena failed.
    Text(#[from] TextError),
}
