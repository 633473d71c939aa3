//! x86-64 `text_poke`: the int3 protocol (the argument is in the parent module's docs).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering, fence};

use super::{PokeError, PokeInsn, PokeOutcome, TEXT_LOCK};
use crate::text::{CodeArena, Registry, sync_all_threads};

/// Offset of the patch site from a program's entry: the 5-byte nop is the first instruction.
pub const PATCH_SITE_OFFSET: usize = 0;
/// Length of the patch site.
pub const PATCH_SITE_LEN: usize = 5;

/// The 5-byte nop (`nop dword [rax + rax*1 + 0]`) every program starts with.
pub const X86_NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const X86_CALL: u8 = 0xe8;
const X86_JMP: u8 = 0xe9;
const X86_INT3: u8 = 0xcc;

/// Encodes a site instruction at `ip` (`call`/`jmp rel32` or the 5-byte nop).
pub fn encode_x86(ip: usize, insn: PokeInsn) -> Result<[u8; 5], PokeError> {
    let (opcode, target) = match insn {
        PokeInsn::Nop => return Ok(X86_NOP5),
        PokeInsn::Call(t) => (X86_CALL, t),
        PokeInsn::Jump(t) => (X86_JMP, t),
    };
    let rel = (target as i64).wrapping_sub(ip as i64 + 5);
    let rel = i32::try_from(rel).map_err(|_| PokeError::OutOfRange { ip, target })?;
    let r = rel.to_le_bytes();
    Ok([opcode, r[0], r[1], r[2], r[3]])
}

/// Decodes the site instruction at `ip`, if the bytes are one.
pub fn decode_x86(ip: usize, bytes: [u8; 5]) -> Option<PokeInsn> {
    let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as i64;
    let target = (ip as i64 + 5).wrapping_add(rel) as usize;
    match bytes[0] {
        _ if bytes == X86_NOP5 => Some(PokeInsn::Nop),
        X86_CALL => Some(PokeInsn::Call(target)),
        X86_JMP => Some(PokeInsn::Jump(target)),
        _ => None,
    }
}

/// The poke in progress, read by the SIGTRAP handler, as a seqlock: written only under
/// `TEXT_LOCK` (sequence odd while the three fields change), read by handlers that retry until they
/// see an even, unchanged sequence. A handler can run late — after the poke it trapped on has
/// finished and another one has begun — so it must never combine the site of one poke with the
/// kind or target of the next. The membarrier after writing the `int3` orders these stores before
/// any thread can trap on it.
static ACTIVE_SEQ: AtomicUsize = AtomicUsize::new(0);
static ACTIVE_SITE: AtomicUsize = AtomicUsize::new(0);
static ACTIVE_KIND: AtomicU8 = AtomicU8::new(0);
static ACTIVE_TARGET: AtomicUsize = AtomicUsize::new(0);

/// Publishes (site, kind, target); site 0 means no poke in progress. Caller holds `TEXT_LOCK`.
fn publish_active(site: usize, kind: u8, target: usize) {
    ACTIVE_SEQ.fetch_add(1, Ordering::Relaxed);
    fence(Ordering::Release);
    ACTIVE_KIND.store(kind, Ordering::Relaxed);
    ACTIVE_TARGET.store(target, Ordering::Relaxed);
    ACTIVE_SITE.store(site, Ordering::Relaxed);
    ACTIVE_SEQ.fetch_add(1, Ordering::Release);
}

/// A consistent snapshot of the poke in progress: (sequence, site, kind, target).
/// Async-signal-safe.
fn read_active() -> (usize, usize, u8, usize) {
    loop {
        let before = ACTIVE_SEQ.load(Ordering::Acquire);
        if before % 2 == 1 {
            // The poker is between two stores; it never blocks there.
            std::hint::spin_loop();
            continue;
        }
        let snapshot = (
            before,
            ACTIVE_SITE.load(Ordering::Relaxed),
            ACTIVE_KIND.load(Ordering::Relaxed),
            ACTIVE_TARGET.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        if ACTIVE_SEQ.load(Ordering::Relaxed) == before {
            return snapshot;
        }
    }
}

/// Traps on a site under poke that the handler emulated or retried (statistics only).
static TRAPS_HANDLED: AtomicUsize = AtomicUsize::new(0);

/// How many threads have hit a patch site's temporary `int3` so far (and were sent on).
pub fn traps_handled() -> usize {
    TRAPS_HANDLED.load(Ordering::Relaxed)
}

const KIND_NOP: u8 = 0;
const KIND_CALL: u8 = 1;
const KIND_JUMP: u8 = 2;

/// Checks that the site at `ip` (a recorded patch site) lies wholly inside its image.
fn resolve_site(ip: usize) -> Result<usize, PokeError> {
    let sym = Registry::global()
        .lookup(ip)
        .ok_or(PokeError::NotText { ip })?;
    let site = ip;
    if site + PATCH_SITE_LEN > sym.start + sym.len {
        return Err(PokeError::NotText { ip });
    }
    Ok(site)
}

fn rw_alias(arena: &CodeArena, site: usize) -> Result<*mut u8, PokeError> {
    // The whole site must be in the arena, not only its first byte.
    match (
        arena.rw_alias(site),
        arena.rw_alias(site + PATCH_SITE_LEN - 1),
    ) {
        (Some(rw), Some(_)) => Ok(rw),
        _ => Err(PokeError::NotText { ip: site }),
    }
}

fn read_site(arena: &CodeArena, site: usize) -> Result<[u8; 5], PokeError> {
    let rw = rw_alias(arena, site)?;
    let mut bytes = [0u8; 5];
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: `rw` is the writable alias of [site, site + 5), inside a registered image of the
        // arena (checked by `resolve_site` and `rw_alias`); arena mappings are never unmapped.
        *b = unsafe { AtomicU8::from_ptr(rw.add(i)) }.load(Ordering::Relaxed);
    }
    Ok(bytes)
}

/// Stores `bytes` at `site + at` one atomic byte at a time, then makes every thread serialise.
fn write_and_sync(
    arena: &CodeArena,
    site: usize,
    at: usize,
    bytes: &[u8],
) -> Result<(), PokeError> {
    let rw = rw_alias(arena, site)?;
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: as in `read_site`; a single-byte store cannot tear, so a concurrent instruction
        // fetch sees the old or the new byte.
        unsafe { AtomicU8::from_ptr(rw.add(at + i)) }.store(*b, Ordering::Release);
    }
    arena.sync_text(site + at, bytes.len())?;
    sync_all_threads()?;
    Ok(())
}

/// Rewrites the patch site at `ip` from `old` to `new`. See the module docs for the contract.
pub(super) fn text_poke(ip: usize, old: PokeInsn, new: PokeInsn) -> Result<PokeOutcome, PokeError> {
    let site = resolve_site(ip)?;
    let old_bytes = encode_x86(site, old)?;
    let new_bytes = encode_x86(site, new)?;
    // The arena must exist before the handler can run: the handler only looks it up.
    let arena = CodeArena::global()?;
    install_trap_handler()?;
    let _guard = TEXT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let current = read_site(arena, site)?;
    if current == new_bytes {
        return Ok(PokeOutcome::AlreadyApplied);
    }
    if current != old_bytes {
        return Err(match decode_x86(site, current) {
            Some(found) => PokeError::Mismatch {
                ip: site,
                expected: old,
                found,
            },
            None => PokeError::NotASite {
                ip: site,
                bytes: current.to_vec(),
            },
        });
    }
    let (kind, target) = match new {
        PokeInsn::Nop => (KIND_NOP, 0),
        PokeInsn::Call(t) => (KIND_CALL, t),
        PokeInsn::Jump(t) => (KIND_JUMP, t),
    };
    publish_active(site, kind, target);
    let result = write_and_sync(arena, site, 0, &[X86_INT3])
        .and_then(|()| write_and_sync(arena, site, 1, &new_bytes[1..]))
        .and_then(|()| write_and_sync(arena, site, 0, &new_bytes[..1]));
    publish_active(0, KIND_NOP, 0);
    result.map(|()| PokeOutcome::Applied)
}

/// The disposition SIGTRAP had before ours, to chain traps that are not ours to.
static PREVIOUS_ACTION: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

fn install_trap_handler() -> Result<(), PokeError> {
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value that we then fill
        // in; sigaction(2) only reads `new` and writes `old`.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigtrap as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            // Publish the previous disposition before ours can run.
            if libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut old) != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            PREVIOUS_ACTION.store(old.sa_sigaction, Ordering::Release);
            PREVIOUS_FLAGS.store(old.sa_flags as usize, Ordering::Release);
            if libc::sigaction(libc::SIGTRAP, &new, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
        }
        Ok(())
    });
    result.clone().map_err(PokeError::Signal)
}

/// SIGTRAP handler: emulates the new instruction of the poke in progress. Async-signal-safe: it only
/// uses atomics and reads the byte under the trapping program counter.
extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to SA_SIGINFO handlers.
    if unsafe { handle_site_trap(ctx as *mut libc::ucontext_t) } {
        TRAPS_HANDLED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    chain(sig, info, ctx);
}

/// # Safety
/// `uc` must be the ucontext the kernel passed to this thread's signal handler.
unsafe fn handle_site_trap(uc: *mut libc::ucontext_t) -> bool {
    // SAFETY: per the function's contract; we only touch the saved registers of this thread.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    // int3 reports the address after the trap byte.
    let site = rip.wrapping_sub(1);
    let Ok(arena) = CodeArena::global() else {
        return false;
    };
    if !arena.contains(site) {
        return false;
    }
    // A late handler may race with later pokes: retry while the published poke changes.
    loop {
        let (seq, active_site, kind, target) = read_active();
        if active_site == site {
            match kind {
                KIND_CALL => {
                    let rsp = (gregs[libc::REG_RSP as usize] as usize).wrapping_sub(8);
                    // SAFETY: emulating `call` pushes the return address exactly where the
                    // thread's own `call` would have: its stack, just below the stack pointer. The
                    // kernel put the signal frame below the 128-byte red zone, so this slot is not
                    // part of it.
                    unsafe { (rsp as *mut u64).write(site as u64 + 5) };
                    gregs[libc::REG_RSP as usize] = rsp as i64;
                    gregs[libc::REG_RIP as usize] = target as i64;
                }
                KIND_JUMP => gregs[libc::REG_RIP as usize] = target as i64,
                _ => gregs[libc::REG_RIP as usize] = (site + PATCH_SITE_LEN) as i64,
            }
            return true;
        }
        // The poke this thread trapped on finished before the handler ran: if the int3 is gone,
        // re-execute the site.
        // SAFETY: `site` lies in the arena's RX view (checked above), which is always readable.
        let byte = unsafe { AtomicU8::from_ptr(site as *mut u8) }.load(Ordering::Acquire);
        if byte != X86_INT3 {
            gregs[libc::REG_RIP as usize] = site as i64;
            return true;
        }
        // An int3 is there again. If a new poke was published meanwhile it may be that poke's
        // (a poke publishes before it writes its int3, and the acquire load above orders this
        // check after that publication): look again. Otherwise the int3 is not a poke's.
        if ACTIVE_SEQ.load(Ordering::Acquire) == seq {
            return false;
        }
    }
}

/// Passes a trap that is not ours to the previous handler, or to the default action.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let action = PREVIOUS_ACTION.load(Ordering::Acquire);
    let flags = PREVIOUS_FLAGS.load(Ordering::Acquire) as libc::c_int;
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: restoring the default disposition and re-raising makes the process die of the
        // trap as it would have without livebpf; signal() and raise() are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the handler takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_sites() {
        let ip = 0x1000;
        assert_eq!(encode_x86(ip, PokeInsn::Nop).unwrap(), X86_NOP5);
        let call = encode_x86(ip, PokeInsn::Call(0x2000)).unwrap();
        assert_eq!(call, [0xe8, 0xfb, 0x0f, 0, 0]);
        assert_eq!(decode_x86(ip, call), Some(PokeInsn::Call(0x2000)));
        let jmp = encode_x86(ip, PokeInsn::Jump(0x1000)).unwrap();
        assert_eq!(jmp, [0xe9, 0xfb, 0xff, 0xff, 0xff]);
        assert_eq!(decode_x86(ip, jmp), Some(PokeInsn::Jump(0x1000)));
        assert!(matches!(
            encode_x86(ip, PokeInsn::Call(0x1_0000_1000)),
            Err(PokeError::OutOfRange { .. })
        ));
        assert_eq!(decode_x86(ip, [0x90; 5]), None);
    }
}
