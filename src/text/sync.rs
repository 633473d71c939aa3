//! Making written code visible to instruction fetch: on this thread ([`sync_icache`]) and on
//! every thread of the process ([`sync_all_threads`]).
//!
//! Cross-modifying code needs both: x86-64 keeps instruction caches coherent with stores, but a
//! thread that may already have fetched or decoded the old bytes must execute a serialising
//! instruction before it is guaranteed to run the new ones (Intel SDM, "cross-modifying code");
//! arm64 additionally needs explicit cache maintenance to the point of unification and a context
//! synchronisation event (`isb`) on every core that runs the code.

use std::sync::OnceLock;
use std::sync::atomic::{Ordering, compiler_fence};

use rustix::thread::{MembarrierCommand, membarrier, membarrier_query};

use super::TextError;

/// Make code written to `rx_addr .. rx_addr + len` (through any alias) visible to the calling
/// thread's instruction fetch.
///
/// * x86-64: nothing per range (caches are coherent, and the jump that enters the code orders
///   it); only a compiler fence so the stores are not moved past this call.
/// * arm64: `dc cvau` over the D-cache lines, `dsb ish`, `ic ivau` over the I-cache lines,
///   `dsb ish`, `isb` (each step skipped where `CTR_EL0.IDC`/`DIC` say the hardware does it).
///   `ic ivau` is broadcast to the inner-shareable domain, so other cores' I-caches are
///   invalidated too; their pipelines still need [`sync_all_threads`].
///
/// # Safety
/// The whole range must be mapped readable (arm64 cache maintenance on an unmapped address
/// faults with SIGSEGV).
pub unsafe fn sync_icache(rx_addr: usize, len: usize) {
    compiler_fence(Ordering::SeqCst);
    #[cfg(target_arch = "aarch64")]
    // SAFETY: forwarded from this function's contract.
    unsafe {
        aarch64::sync_icache(rx_addr, len)
    };
    #[cfg(not(target_arch = "aarch64"))]
    let _ = (rx_addr, len);
}

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::arch::asm;

    const CTR_IDC: u64 = 1 << 28;
    const CTR_DIC: u64 = 1 << 29;

    pub(super) unsafe fn sync_icache(start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let ctr: u64;
        // SAFETY: Linux lets EL0 read CTR_EL0 (directly or by trap-and-emulate); it has no
        // memory effects.
        unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
        // Line sizes are log2(words): DminLine bits 19:16, IminLine bits 3:0.
        let dline = 4usize << ((ctr >> 16) & 0xf);
        let iline = 4usize << (ctr & 0xf);
        let end = start.saturating_add(len);
        if ctr & CTR_IDC == 0 {
            // Rounding down stays in the same page (lines never cross pages), so every address
            // is mapped per the caller's contract.
            let mut line = start & !(dline - 1);
            while line < end {
                // SAFETY: `line` is in a readable page (see above); Linux enables EL0 cache
                // maintenance (SCTLR_EL1.UCI). It only cleans the cache; memory is unchanged.
                unsafe { asm!("dc cvau, {}", in(reg) line, options(nostack, preserves_flags)) };
                line = line.saturating_add(dline);
            }
        }
        // SAFETY: barrier only; orders the cleans (or the stores, with IDC) before the
        // invalidations below.
        unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
        if ctr & CTR_DIC == 0 {
            let mut line = start & !(iline - 1);
            while line < end {
                // SAFETY: as for `dc cvau`: a readable address, EL0 maintenance enabled.
                unsafe { asm!("ic ivau, {}", in(reg) line, options(nostack, preserves_flags)) };
                line = line.saturating_add(iline);
            }
            // SAFETY: barrier only; waits for the invalidations to complete.
            unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
        }
        // SAFETY: context synchronisation of this core only; discards prefetched instructions.
        unsafe { asm!("isb", options(nostack, preserves_flags)) };
    }
}

/// Which `membarrier(2)` flavour [`sync_all_threads`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE` (Linux ≥ 4.16): every running thread of the
    /// process executes a full memory barrier *and* a core-serialising instruction before the
    /// call returns; the others serialise before they run again. What cross-modifying code needs.
    SyncCore,
    /// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (Linux ≥ 4.14): memory barrier on every running thread.
    /// Core serialisation is not promised, only incidental (the IPI's return to user space is
    /// serialising on x86-64 and a context synchronisation event on arm64 in practice).
    Expedited,
    /// Neither could be registered (old kernel, CONFIG_MEMBARRIER off, or seccomp).
    Unavailable,
}

/// The flavour [`sync_all_threads`] uses. The first call registers the process for it
/// (`MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE`, falling back to
/// `..._REGISTER_PRIVATE_EXPEDITED`); later calls return the cached answer.
pub fn sync_mode() -> SyncMode {
    static MODE: OnceLock<SyncMode> = OnceLock::new();
    *MODE.get_or_init(|| {
        let supported = membarrier_query();
        let try_register = |register, run| {
            supported.contains_command(register)
                && supported.contains_command(run)
                && membarrier(register).is_ok()
        };
        if try_register(
            MembarrierCommand::RegisterPrivateExpeditedSyncCore,
            MembarrierCommand::PrivateExpeditedSyncCore,
        ) {
            SyncMode::SyncCore
        } else if try_register(
            MembarrierCommand::RegisterPrivateExpedited,
            MembarrierCommand::PrivateExpedited,
        ) {
            SyncMode::Expedited
        } else {
            SyncMode::Unavailable
        }
    })
}

/// In a forked child: registers the flavour [`sync_mode`] chose again, since a `membarrier`
/// registration belongs to the address space and the child has a new one.
pub(crate) fn reregister_after_fork() {
    let register = match sync_mode() {
        SyncMode::SyncCore => MembarrierCommand::RegisterPrivateExpeditedSyncCore,
        SyncMode::Expedited => MembarrierCommand::RegisterPrivateExpedited,
        SyncMode::Unavailable => return,
    };
    let _ = membarrier(register);
}

/// Make every thread of the process see all memory (and code) written by the caller before this
/// call, and — in [`SyncMode::SyncCore`] — serialise its instruction stream, so that none keeps
/// executing instructions it fetched before the call. Returns the mode used.
///
/// Memory ordering: `membarrier` acts as a `SeqCst` fence on the caller paired with a full
/// barrier on each other running thread, so plain stores made before the call are visible to
/// every thread's subsequent loads and instruction fetches without any fence on their side.
pub fn sync_all_threads() -> Result<SyncMode, TextError> {
    let mode = sync_mode();
    let cmd = match mode {
        SyncMode::SyncCore => MembarrierCommand::PrivateExpeditedSyncCore,
        SyncMode::Expedited => MembarrierCommand::PrivateExpedited,
        SyncMode::Unavailable => return Err(TextError::MembarrierUnavailable),
    };
    membarrier(cmd).map_err(|errno| TextError::Membarrier { mode, errno })?;
    Ok(mode)
}
