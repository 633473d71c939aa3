//! x86-64 `text_poke`: the int3 protocol (the argument is in the parent module's docs).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};

use super::{PokeError, PokeInsn, PokeOutcome, TEXT_LOCK};
use crate::text::{CodeArena, Registry, sync_all_threads};

/// Offset of the patch site from a program's entry: the 5-byte nop is the first instruction.
pub const PATCH_SITE_OFFSET: usize = 0;
/// Length of the patch site.
pub const PATCH_SITE_LEN: usize = 5;

/// The 5-byte nop (`nop dword [rax + rax*1 + 0]`) every program starts with.
pub const X86_NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Its first four bytes, `nopl disp8(%rax,%rax,1)` with any displacement: what native sites hold
/// (gcc writes displacement 0, clang 8).
pub(crate) const X86_NOP5_HEAD: [u8; 4] = [0x0f, 0x1f, 0x44, 0x00];
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

/// Where a site's bytes are written: the arena's RW alias, or (a native function's entry in
/// file-backed text, which has no writable alias) `/proc/self/mem`, which writes through the
/// read-only mapping as a debugger's writes do.
enum Text<'a> {
    Arena(&'a CodeArena),
    Native(std::fs::File),
}

impl Text<'_> {
    /// Stores `bytes` at `site + at` one byte at a time, then makes every thread serialise.
    fn write_and_sync(&self, site: usize, at: usize, bytes: &[u8]) -> Result<(), PokeError> {
        match self {
            Text::Arena(arena) => {
                let rw = rw_alias(arena, site)?;
                for (i, b) in bytes.iter().enumerate() {
                    // SAFETY: as in `read_site`; a single-byte store cannot tear, so a
                    // concurrent instruction fetch sees the old or the new byte.
                    unsafe { AtomicU8::from_ptr(rw.add(at + i)) }.store(*b, Ordering::Release);
                }
                arena.sync_text(site + at, bytes.len())?;
            }
            Text::Native(mem) => {
                use std::os::unix::fs::FileExt;
                for (i, b) in bytes.iter().enumerate() {
                    // One byte per write: the kernel's copy cannot tear it.
                    let addr = (site + at + i) as u64;
                    mem.write_all_at(std::slice::from_ref(b), addr)
                        .map_err(|e| PokeError::NativeWrite {
                            ip: site,
                            reason: e.to_string(),
                        })?;
                }
            }
        }
        sync_all_threads()?;
        Ok(())
    }
}

/// Runs the int3 protocol on `site` (the caller holds `TEXT_LOCK` and has checked that it holds
/// `old_bytes`): int3, the tail of `new_bytes`, its first byte, each followed by a sync.
fn rewrite(
    text: &Text<'_>,
    site: usize,
    new: PokeInsn,
    new_bytes: [u8; 5],
) -> Result<(), PokeError> {
    check_trap_delivery(matches!(text, Text::Native(_)))?;
    let (kind, target) = match new {
        PokeInsn::Nop => (KIND_NOP, 0),
        PokeInsn::Call(t) => (KIND_CALL, t),
        PokeInsn::Jump(t) => (KIND_JUMP, t),
    };
    remember_site(site);
    publish_active(site, kind, target);
    let result = text
        .write_and_sync(site, 0, &[X86_INT3])
        .and_then(|()| text.write_and_sync(site, 1, &new_bytes[1..]))
        .and_then(|()| text.write_and_sync(site, 0, &new_bytes[..1]));
    publish_active(0, KIND_NOP, 0);
    result
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
    // Before anything is written (in `rewrite`): could a thread reaching the site take our trap?
    rewrite(&Text::Arena(arena), site, new, new_bytes).map(|()| PokeOutcome::Applied)
}

/// Native sites pokes may rewrite (the entries of the host's own functions, outside the arena),
/// for the SIGTRAP handler, which otherwise only recognises arena text. Written under
/// `TEXT_LOCK`; a slot holds a site address or 0.
static NATIVE_SITES: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];

/// Whether `addr` is a registered native site. Async-signal-safe.
fn is_native_site(addr: usize) -> bool {
    NATIVE_SITES
        .iter()
        .any(|s| s.load(Ordering::Acquire) == addr)
}

/// Rewrites the native site at `site` from `old_bytes` to `new_bytes` (a 5-byte nop, `call` or
/// `jmp` each; `new` says which the handler emulates) with the int3 protocol, writing through
/// `/proc/self/mem`. The site stays known to the SIGTRAP handler for the process's lifetime: a
/// thread whose trap is handled late (after the poke) must still be recognised, and a native
/// caller is in no read-side section that would tell when none is left.
///
/// # Safety
/// `site` is the entry site of a native function whose object is never unloaded afterwards,
/// and every state written is valid code for threads executing the function.
pub(crate) unsafe fn native_text_poke(
    site: usize,
    old_bytes: [u8; 5],
    new: PokeInsn,
    new_bytes: [u8; 5],
) -> Result<PokeOutcome, PokeError> {
    install_trap_handler()?;
    let _guard = TEXT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| PokeError::NativeWrite {
            ip: site,
            reason: e.to_string(),
        })?;
    let mut current = [0u8; 5];
    {
        use std::os::unix::fs::FileExt;
        mem.read_exact_at(&mut current, site as u64)
            .map_err(|_| PokeError::NotText { ip: site })?;
    }
    if current == new_bytes {
        return Ok(PokeOutcome::AlreadyApplied);
    }
    if current != old_bytes {
        return Err(PokeError::NotASite {
            ip: site,
            bytes: current.to_vec(),
        });
    }
    if !is_native_site(site) {
        let free = NATIVE_SITES
            .iter()
            .find(|s| s.load(Ordering::Relaxed) == 0)
            .ok_or(PokeError::NativeWrite {
                ip: site,
                reason: "64 native sites are patched already; detach one first".into(),
            })?;
        free.store(site, Ordering::Release);
    }
    rewrite(&Text::Native(mem), site, new, new_bytes).map(|()| PokeOutcome::Applied)
}

// ---- SIGTRAP: livebpf's handler, chaining, installation, checks before a poke ----------------
//
// The contract an embedding application and a debugger must keep is in docs/ARCHITECTURE.md,
// "Signals: what an embedding application and a debugger must do".

/// SIGTRAP's bit in a kernel signal mask (signal n is bit n - 1).
const TRAP_BIT: u64 = 1 << (libc::SIGTRAP - 1);
/// The kernel's `sigset_t` is 8 bytes on x86-64: the `sigsetsize` argument of the `rt_*` calls.
const KERNEL_SIGSET_SIZE: usize = 8;

/// The kernel's `struct sigaction` for `rt_sigaction(2)` on x86-64 (glibc's differs).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// A system call made with the `syscall` instruction itself: no libc, no errno (a signal handler
/// must not change the errno of the code it interrupted). Returns the kernel's result, a negative
/// errno on failure.
///
/// # Safety
/// The arguments must be what system call `nr` expects; memory they point to must be valid for
/// what the call reads and writes.
#[inline(always)]
unsafe fn raw_syscall4(nr: libc::c_long, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call convention: number in rax, arguments in rdi, rsi, rdx,
    // r10; the kernel returns in rax, clobbers rcx and r11 and nothing else, and does not touch
    // this thread's stack. Memory the arguments point to is the caller's contract, and the asm
    // block is not marked `nomem`, so the compiler assumes the kernel may read and write it.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Whether a SIGTRAP with this `si_code` was forced on the thread by the kernel for an instruction
/// it executed: an int3 (`SI_KERNEL`, `do_int3_user` → `force_sig`), a single step, branch trap or
/// hardware breakpoint (`TRAP_*`, `do_debug` → `force_sig_fault`). The kernel does not let such a
/// trap be ignored or blocked: it resets the disposition to SIG_DFL and kills the process. Everything
/// else (`kill`, `tgkill`, `sigqueue`: `SI_USER`, `SI_TKILL`, `SI_QUEUE`; perf's `TRAP_PERF`, sent
/// with `send_sig_info`) is asynchronous and may be ignored.
fn is_forced_trap(code: libc::c_int) -> bool {
    code == libc::SI_KERNEL || (libc::TRAP_BRKPT..=libc::TRAP_UNK).contains(&code)
}

/// The disposition SIGTRAP had before livebpf's handler replaced it: where the traps that are not
/// ours go. A seqlock like `ACTIVE_*`: odd while an install is under way. It starts odd, "not
/// published": no handler of ours can run before the first install, and one that runs between the
/// install's `sigaction` call and the publication (a few stores later) waits for it, so no
/// signal is chained to a stale disposition. The installer blocks SIGTRAP in its own thread
/// meanwhile, so it never waits for itself.
static PREV_SEQ: AtomicUsize = AtomicUsize::new(1);
static PREV_ACTION: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_FLAGS: AtomicUsize = AtomicUsize::new(0);
/// The previous handler's `sa_mask`, as a kernel mask.
static PREV_MASK: AtomicU64 = AtomicU64::new(0);
/// The `PREV_SEQ` whose SA_RESETHAND handler has been called (from then on it is SIG_DFL).
static PREV_ONESHOT_USED: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy)]
struct Previous {
    seq: usize,
    action: usize,
    flags: libc::c_int,
    mask: u64,
}

/// A consistent snapshot of the previous disposition. Async-signal-safe.
fn read_previous() -> Previous {
    let mut spins = 0u32;
    loop {
        let seq = PREV_SEQ.load(Ordering::Acquire);
        if seq % 2 == 1 {
            // An install is between its sigaction and its publication. The installer may have
            // been preempted: yield now and then instead of spinning against it.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                // SAFETY: sched_yield(2) takes no arguments.
                unsafe { raw_syscall4(libc::SYS_sched_yield, 0, 0, 0, 0) };
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        let snapshot = Previous {
            seq,
            action: PREV_ACTION.load(Ordering::Relaxed),
            flags: PREV_FLAGS.load(Ordering::Relaxed) as libc::c_int,
            mask: PREV_MASK.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        if PREV_SEQ.load(Ordering::Relaxed) == seq {
            return snapshot;
        }
    }
}

/// Serialises installs (the first one and [`reinstall_trap_handler`]).
static INSTALL_LOCK: Mutex<()> = Mutex::new(());
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// A handler the application declared to pass livebpf's traps on to livebpf's handler; 0: none.
static CHAINING_HANDLER: AtomicUsize = AtomicUsize::new(0);

fn our_handler() -> usize {
    on_sigtrap as *const () as usize
}

/// The first word of a glibc `sigset_t`: the kernel's mask of signals 1..=64.
fn kernel_mask(set: &libc::sigset_t) -> u64 {
    // SAFETY: glibc's sigset_t is 128 bytes, 8-aligned, and starts with the kernel's 64-bit mask.
    unsafe { (set as *const libc::sigset_t).cast::<u64>().read() }
}

/// Installs livebpf's handler with one `sigaction(SIGTRAP, &new, &old)` — an installer racing with
/// us is either replaced and chained to, or installs over us and is seen by the next poke's check;
/// it is never lost — and publishes `old` as the disposition to chain to. Caller holds
/// `INSTALL_LOCK`, and the code arena exists (the handler only looks it up).
fn swap_in_handler() -> Result<(), PokeError> {
    // SAFETY: zeroed sigaction and sigset_t values are valid ("no handler, empty mask") and are
    // filled in before use; sigaction(2) and pthread_sigmask(3) read `new`/`trap` and write
    // `old`/`saved`, all live locals.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = our_handler();
        new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        libc::sigaddset(&mut new.sa_mask, MARK_SIGNAL);
        let mut trap: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut trap);
        libc::sigaddset(&mut trap, libc::SIGTRAP);
        let mut saved: libc::sigset_t = std::mem::zeroed();
        // A handler invocation on this thread between the sigaction and the publication would
        // wait for this thread: keep SIGTRAP blocked here until the publication is done.
        let blocked = libc::pthread_sigmask(libc::SIG_BLOCK, &trap, &mut saved);
        if blocked != 0 {
            return Err(PokeError::Signal(format!(
                "pthread_sigmask: {}",
                std::io::Error::from_raw_os_error(blocked)
            )));
        }
        if PREV_SEQ.load(Ordering::Relaxed).is_multiple_of(2) {
            PREV_SEQ.fetch_add(1, Ordering::Relaxed);
            fence(Ordering::Release);
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        let result = if libc::sigaction(libc::SIGTRAP, &new, &mut old) == 0 {
            // Chaining to ourselves, or to a declared handler that chains to us, would loop: keep
            // the disposition published before.
            let chaining = CHAINING_HANDLER.load(Ordering::Acquire);
            if old.sa_sigaction != our_handler() && (chaining == 0 || old.sa_sigaction != chaining)
            {
                PREV_ACTION.store(old.sa_sigaction, Ordering::Relaxed);
                PREV_FLAGS.store(old.sa_flags as usize, Ordering::Relaxed);
                PREV_MASK.store(kernel_mask(&old.sa_mask), Ordering::Relaxed);
            }
            Ok(())
        } else {
            Err(PokeError::Signal(format!(
                "sigaction(SIGTRAP): {}",
                std::io::Error::last_os_error()
            )))
        };
        // Publish (or, on failure, end the update with the fields unchanged).
        PREV_SEQ.fetch_add(1, Ordering::Release);
        libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut());
        result
    }
}

fn install_trap_handler() -> Result<(), PokeError> {
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !INSTALLED.load(Ordering::Relaxed) {
        swap_in_handler()?;
        INSTALLED.store(true, Ordering::Release);
    }
    Ok(())
}

/// SIGTRAP's current disposition, read without changing it.
fn installed_trap_action() -> Result<libc::sigaction, PokeError> {
    // SAFETY: a null `act` makes sigaction(2) only write the current disposition to `cur`.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) != 0 {
            return Err(PokeError::Signal(format!(
                "sigaction(SIGTRAP, NULL, &cur): {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(cur)
    }
}

/// Whether `cur` lets livebpf's handler see every SIGTRAP: it is livebpf's handler, or the handler
/// declared with [`declare_chaining_trap_handler`].
fn reaches_our_handler(cur: &libc::sigaction) -> bool {
    let chaining = CHAINING_HANDLER.load(Ordering::Acquire);
    cur.sa_flags & libc::SA_SIGINFO != 0
        && (cur.sa_sigaction == our_handler() || (chaining != 0 && cur.sa_sigaction == chaining))
}

/// Installs livebpf's SIGTRAP handler again after the application replaced it (the error
/// [`PokeError::TrapHandlerReplaced`]). livebpf then passes the SIGTRAPs that are not its own to
/// the disposition it replaces now — the application's handler — with that disposition's
/// semantics. Returns `Ok(false)` and changes nothing when SIGTRAP already reaches livebpf's
/// handler (it is installed, or the installed handler was declared with
/// [`declare_chaining_trap_handler`]: reinstalling over it would make the two call each other).
pub fn reinstall_trap_handler() -> Result<bool, PokeError> {
    // The handler looks the arena up; create it here, not in the handler.
    CodeArena::global()?;
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if INSTALLED.load(Ordering::Relaxed) && reaches_our_handler(&installed_trap_action()?) {
        return Ok(false);
    }
    swap_in_handler()?;
    INSTALLED.store(true, Ordering::Release);
    Ok(true)
}

/// Declares that `handler` (an `sa_sigaction` address), which the application installed for
/// SIGTRAP over livebpf's handler, passes livebpf's traps on: `text_poke` then accepts it as the
/// installed disposition instead of failing with [`PokeError::TrapHandlerReplaced`]. Pass 0 to
/// withdraw the declaration.
///
/// # Safety
/// `handler` must be installed with `SA_SIGINFO` and must call livebpf's handler (the
/// `sa_sigaction` that `sigaction(2)` returned as the old disposition when `handler` was
/// installed) with the kernel's `(sig, info, ctx)`, on the same thread, before returning, for
/// every SIGTRAP it does not own — at least every one with `si_code == SI_KERNEL` that is not from
/// one of its own int3s. Otherwise a thread that reaches a site under poke resumes inside the
/// instruction being rewritten. Put signal 64 (`SIGRTMAX`) in its `sa_mask`: a thread inside (or
/// preempted on its way into) a SIGTRAP handler has SIGTRAP blocked, and livebpf recognises its
/// own handler's threads by that signal being blocked too; otherwise a poke while a thread spends
/// more than ~2 ms in the handler fails with [`PokeError::SigtrapBlocked`].
pub unsafe fn declare_chaining_trap_handler(handler: usize) {
    CHAINING_HANDLER.store(handler, Ordering::Release);
}

/// Checks, before a poke writes anything, that a thread reaching the site can take livebpf's trap:
/// SIGTRAP reaches livebpf's handler, and no thread that may execute JIT text blocks SIGTRAP (the
/// kernel kills a process whose int3 trap is blocked). Both can change right after the check; it
/// catches a configuration that is wrong, not a race with one that changes.
///
/// Threads that may execute JIT text are the ones that have run a program and not exited
/// ([`crate::reclaim`] records them with their kernel tid); a native function's site
/// (`all_threads`) may be executed by any thread of the process (`/proc/self/task`). Their masks
/// are only visible in `/proc/self/task/TID/status` (`SigBlk:`); a tid whose file is gone has
/// exited, and without `/proc` the mask check is skipped.
///
/// Cost, measured with `cargo test --release --lib trap_delivery_check_cost -- --nocapture` on
/// the 2-core development VM (kernel 6.18, shared with three other builds, so ±2x): the
/// `sigaction` query ~0.35 µs; one status file read (open, read, close: procfs formats the whole
/// file) 20-60 µs per thread, against ~5 µs for each of a poke's three `membarrier(SYNC_CORE)`
/// calls. Reading every runner's mask on every poke would make a poke several times slower, so a
/// thread found not blocking SIGTRAP is read again only after `UNBLOCKED_FRESH` (100 ms): a burst
/// of pokes reads each thread once, and a thread that starts blocking SIGTRAP is caught by the
/// pokes from 100 ms later on. A new thread, and one found blocking, is read every time. Pokes
/// that write nothing (`Mismatch`, `AlreadyApplied`) skip the check.
fn check_trap_delivery(all_threads: bool) -> Result<(), PokeError> {
    let cur = installed_trap_action()?;
    if !reaches_our_handler(&cur) {
        return Err(PokeError::TrapHandlerReplaced {
            installed: cur.sa_sigaction,
        });
    }
    let tids = if all_threads {
        process_thread_ids()
    } else {
        crate::reclaim::registered_thread_ids()
    };
    let mut seen = SEEN_UNBLOCKED.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    seen.retain(|(tid, at)| tids.contains(tid) && now.duration_since(*at) < UNBLOCKED_FRESH);
    for tid in tids {
        if seen.iter().any(|(t, _)| *t == tid) {
            continue;
        }
        if persistently_blocks_trap(tid) {
            return Err(PokeError::SigtrapBlocked { tid });
        }
        seen.push((tid, std::time::Instant::now()));
    }
    Ok(())
}

/// Every thread of this process (empty without `/proc`).
fn process_thread_ids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Threads found not blocking SIGTRAP, and when (see `check_trap_delivery`).
static SEEN_UNBLOCKED: Mutex<Vec<(i32, std::time::Instant)>> = Mutex::new(Vec::new());
const UNBLOCKED_FRESH: std::time::Duration = std::time::Duration::from_millis(100);

/// The signal livebpf's handler blocks besides SIGTRAP, as a mark: signal 64 (`SIGRTMAX` with
/// glibc and musl). Every SIGTRAP handler runs with SIGTRAP blocked, livebpf's included (without
/// SA_NODEFER, which would let a SIGTRAP storm nest handler frames until the stack overflows), and
/// a thread may sit preempted for milliseconds between the kernel's signal setup and the handler's
/// first instruction. The kernel sets the handler's whole mask at once, so SIGTRAP blocked
/// *with* the mark is (almost always) a thread inside livebpf's handler or a handler it chains to,
/// which is not executing JIT text; SIGTRAP blocked without it is the application's doing. Cost:
/// signal 64 waits while a SIGTRAP handler runs.
const MARK_SIGNAL: libc::c_int = 64;
const MARK_BIT: u64 = 1 << (MARK_SIGNAL - 1);

/// Reads of SIGTRAP blocked without the mark, `BLOCKED_PAUSE` apart, before a thread is reported;
/// and how long a thread may show SIGTRAP blocked with the mark before it is reported anyway.
const PLAIN_READS: u32 = 10;
const BLOCKED_PAUSE: std::time::Duration = std::time::Duration::from_micros(200);
const BLOCKED_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether thread `tid` blocks SIGTRAP for good, not just while a SIGTRAP handler runs (see
/// `MARK_SIGNAL`): blocked without the mark on `PLAIN_READS` consecutive reads (~2 ms; a handler
/// of another signal whose `sa_mask` has SIGTRAP is transient too, if shorter than that), or
/// blocked for `BLOCKED_MAX_WAIT` in all (a thread that blocks every signal, mark included).
fn persistently_blocks_trap(tid: i32) -> bool {
    let start = std::time::Instant::now();
    let mut plain = 0;
    loop {
        let Some(mask) = blocked_signals(tid) else {
            return false;
        };
        if mask & TRAP_BIT == 0 {
            return false;
        }
        if mask & MARK_BIT == 0 {
            plain += 1;
        } else {
            plain = 0;
        }
        if plain >= PLAIN_READS || start.elapsed() >= BLOCKED_MAX_WAIT {
            return true;
        }
        std::thread::sleep(BLOCKED_PAUSE);
    }
}

/// The `SigBlk:` mask of thread `tid` of this process; `None` if its status file is gone (the
/// thread exited) or unreadable.
fn blocked_signals(tid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// SIGTRAP handler: emulates the new instruction of the poke in progress for an int3 at its site,
/// and passes every other SIGTRAP on to the previous disposition. Async-signal-safe: atomics,
/// raw system calls and loads of JIT text; no allocation, no lock, errno untouched.
extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes this thread's siginfo and ucontext to an SA_SIGINFO handler (a
    // declared chaining handler passes the kernel's, by the contract of
    // `declare_chaining_trap_handler`).
    match unsafe { handle_site_trap(info, ctx as *mut libc::ucontext_t) } {
        Trap::Ours => {
            TRAPS_HANDLED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Trap::Merged => {
            TRAPS_HANDLED.fetch_add(1, Ordering::Relaxed);
        }
        Trap::Foreign => {}
    }
    // SAFETY: as above.
    unsafe { chain(sig, info, ctx) };
}

/// What a SIGTRAP was.
enum Trap {
    /// The int3 of a poke: emulated (or the site re-executed); nothing else to do.
    Ours,
    /// An asynchronous SIGTRAP that also carries the int3 of a poke (see `handle_site_trap`): the
    /// int3 was handled, the signal itself goes on to the previous disposition.
    Merged,
    /// Not ours at all.
    Foreign,
}

/// Sites of the last few pokes, for an asynchronous SIGTRAP that carries a poke's int3 and is
/// handled after the poke finished (`handle_site_trap`). Written under `TEXT_LOCK`, before the
/// poke publishes itself.
static RECENT_SITES: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];
static RECENT_NEXT: AtomicUsize = AtomicUsize::new(0);

/// Caller holds `TEXT_LOCK`.
fn remember_site(site: usize) {
    if RECENT_SITES
        .iter()
        .any(|s| s.load(Ordering::Relaxed) == site)
    {
        return;
    }
    let slot = RECENT_NEXT.fetch_add(1, Ordering::Relaxed) % RECENT_SITES.len();
    RECENT_SITES[slot].store(site, Ordering::Release);
}

/// Forgets the recent sites in `[start, end)`: their image leaves the registry, and once it is
/// freed its bytes may become another image's code, where an old site address can be the return
/// address of a foreign `int3` or the middle of an instruction. Called by
/// [`Registry::unregister`]; no thread can still be trapped in the image then (its owner
/// unregisters it only when nothing runs it), so no late handler needs the entry.
pub(crate) fn forget_sites(start: usize, end: usize) {
    for slot in &RECENT_SITES {
        let site = slot.load(Ordering::Relaxed);
        if (start..end).contains(&site) {
            // Only this value: a poke under `TEXT_LOCK` may have reused the slot meanwhile.
            let _ = slot.compare_exchange(site, 0, Ordering::Release, Ordering::Relaxed);
        }
    }
}

/// Whether `addr` is the site of the poke in progress or of a recent one. Async-signal-safe.
fn is_poked_site(addr: usize) -> bool {
    ACTIVE_SITE.load(Ordering::Acquire) == addr
        || RECENT_SITES
            .iter()
            .any(|s| s.load(Ordering::Acquire) == addr)
}

/// Whether the five bytes at `site` are a complete site instruction, what a finished poke leaves
/// behind: in the arena, a nop or a call/jump into JIT text; at a native site, the function's own
/// 5-byte nop (any displacement: clang writes 8) or a call/jump (to its stub, outside the arena).
fn is_finished_site(arena: &CodeArena, site: usize) -> bool {
    let native = is_native_site(site);
    if !native && !arena.contains(site + PATCH_SITE_LEN - 1) {
        return false;
    }
    let mut bytes = [0u8; PATCH_SITE_LEN];
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: [site, site + 5) lies in the arena's RX view (checked), which is always
        // readable, or is a registered native site's instruction, whose function stays loaded.
        *b = unsafe { AtomicU8::from_ptr((site + i) as *mut u8) }.load(Ordering::Relaxed);
    }
    if native {
        return bytes[..4] == X86_NOP5_HEAD
            || matches!(
                decode_x86(site, bytes),
                Some(PokeInsn::Call(_) | PokeInsn::Jump(_))
            );
    }
    match decode_x86(site, bytes) {
        Some(PokeInsn::Nop) => true,
        Some(PokeInsn::Call(t) | PokeInsn::Jump(t)) => arena.contains(t),
        None => false,
    }
}

/// Points the interrupted thread at what the site's new instruction does.
fn emulate(gregs: &mut [libc::greg_t; 23], site: usize, kind: u8, target: usize) {
    match kind {
        KIND_CALL => {
            let rsp = (gregs[libc::REG_RSP as usize] as usize).wrapping_sub(8);
            // SAFETY: emulating `call` pushes the return address exactly where the thread's own
            // `call` would have: its stack, just below the stack pointer. The kernel put the
            // signal frame below the 128-byte red zone, so this slot is not part of it.
            unsafe { (rsp as *mut u64).write(site as u64 + 5) };
            gregs[libc::REG_RSP as usize] = rsp as i64;
            gregs[libc::REG_RIP as usize] = target as i64;
        }
        KIND_JUMP => gregs[libc::REG_RIP as usize] = target as i64,
        _ => gregs[libc::REG_RIP as usize] = (site + PATCH_SITE_LEN) as i64,
    }
}

/// Recognises the int3 of a poke and moves the thread on.
///
/// Only an int3 can be ours, and the kernel delivers an int3's SIGTRAP with si_code SI_KERNEL
/// (x86 `do_int3_user` → `do_trap` → `force_sig`; tests/signals.rs checks it on the running
/// kernel). kill/tgkill/sigqueue, single steps, hardware breakpoints and perf events carry other
/// codes, and their RIP says nothing about a trap byte: taking one for an int3 would move RIP
/// back into the middle of an instruction. One exception: standard signals do not queue, so when
/// a thread executes a poke's int3 while a thread-directed SIGTRAP (tgkill) is already pending
/// for it, the kernel drops the int3's trap and delivers only the pending signal — with RIP at
/// site + 1 (measured here: a few int3s in 10^5 under a tgkill storm). RIP = site + 1 of a poked
/// site proves the int3 ran (it is inside the 5-byte instruction, never a boundary), so such a
/// signal is handled as the int3 *and* passed on ([`Trap::Merged`]). The opposite merge — a
/// tgkill'd SIGTRAP sent while the int3's trap is pending — is dropped by the kernel unseen.
/// (A process can also queue itself a forged SI_KERNEL SIGTRAP with rt_tgsigqueueinfo(2); that
/// is not told apart.)
///
/// # Safety
/// `info` and `uc` must be the siginfo and ucontext the kernel passed to this thread's handler.
unsafe fn handle_site_trap(info: *const libc::siginfo_t, uc: *mut libc::ucontext_t) -> Trap {
    if info.is_null() || uc.is_null() {
        return Trap::Foreign;
    }
    // SAFETY: per the function's contract.
    let int3 = unsafe { (*info).si_code } == libc::SI_KERNEL;
    // SAFETY: per the function's contract; we only touch the saved registers of this thread.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    // int3 reports the address after the trap byte.
    let site = rip.wrapping_sub(1);
    let Ok(arena) = CodeArena::global() else {
        return Trap::Foreign;
    };
    if int3 && is_poked_site(rip) {
        // RIP *at* a poked site: a debugger moved it back over the int3 before passing the
        // SIGTRAP on (gdb does for every SI_KERNEL trap it collects while stopping the other
        // threads, taking it for one of its breakpoints). The site is an instruction boundary;
        // executing it again traps again or runs a complete instruction.
        return Trap::Ours;
    }
    if !arena.contains(site) && !is_native_site(site) {
        return Trap::Foreign;
    }
    let (handled, recent) = if int3 {
        (Trap::Ours, true)
    } else {
        (Trap::Merged, is_poked_site(site))
    };
    // A late handler may race with later pokes: retry while the published poke changes.
    loop {
        let (seq, active_site, kind, target) = read_active();
        if active_site == site {
            emulate(gregs, site, kind, target);
            return handled;
        }
        if !recent {
            return Trap::Foreign;
        }
        // The poke this thread trapped on finished before the handler ran: if the int3 is gone,
        // re-execute the site. For a merged signal, RIP = site + 1 of a recent site that holds a
        // complete site instruction again is the proof that this thread ran the int3.
        // SAFETY: `site` lies in the arena's RX view, which is always readable, or is a
        // registered native site, whose function stays loaded while registered (checked above).
        let byte = unsafe { AtomicU8::from_ptr(site as *mut u8) }.load(Ordering::Acquire);
        if byte != X86_INT3 {
            if !int3 && !is_finished_site(arena, site) {
                return Trap::Foreign;
            }
            gregs[libc::REG_RIP as usize] = site as i64;
            return handled;
        }
        // An int3 is there again. If a new poke was published meanwhile it may be that poke's
        // (a poke publishes before it writes its int3, and the acquire load above orders this
        // check after that publication): look again. Otherwise the int3 is not a poke's.
        if ACTIVE_SEQ.load(Ordering::Acquire) == seq {
            return Trap::Foreign;
        }
    }
}

/// Passes a SIGTRAP that is not ours on to the disposition livebpf's install replaced, with that
/// disposition's semantics as far as a handler can reproduce them:
/// * a handler is called with the kernel's `(sig, info, ctx)` (a plain one with `sig` only),
///   with the mask the kernel would have set for it: the thread's mask at delivery, its
///   `sa_mask`, and SIGTRAP unless `SA_NODEFER`; with `SA_RESETHAND` only the first foreign trap
///   reaches it, later ones get the default action (livebpf's handler stays installed);
/// * `SIG_IGN`: an asynchronous SIGTRAP is dropped; a forced one (an int3, a single step) kills
///   the process, as the kernel does when such a trap is ignored;
/// * `SIG_DFL`: the process terminates with a core dump.
///
/// Not reproduced: `SA_ONSTACK` (the previous handler runs on the stack livebpf's handler runs
/// on: the interrupted thread's); `SA_RESTART` (livebpf's handler has it, so a system call
/// interrupted by a foreign SIGTRAP is restarted even when the previous handler lacked it); and
/// signal 64 (`MARK_SIGNAL`) is blocked while the previous handler runs, though its `sa_mask`
/// may not have it.
///
/// # Safety
/// `info` and `ctx` must be the siginfo and ucontext the kernel passed to this handler invocation.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let code = if info.is_null() {
        libc::SI_USER
    } else {
        // SAFETY: per the function's contract.
        unsafe { (*info).si_code }
    };
    let prev = read_previous();
    let mut action = prev.action;
    let is_handler = action != libc::SIG_DFL && action != libc::SIG_IGN;
    if is_handler
        && prev.flags & libc::SA_RESETHAND != 0
        && PREV_ONESHOT_USED.swap(prev.seq, Ordering::AcqRel) == prev.seq
    {
        action = libc::SIG_DFL;
    }
    if action == libc::SIG_IGN && !is_forced_trap(code) {
        return;
    }
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: per the function's contract.
        unsafe { die_of(sig, info) };
        return;
    }
    let bit = 1u64 << (sig - 1);
    let mut saved = 0u64;
    let mut restore = false;
    if !ctx.is_null() {
        // SAFETY: `ctx` is the kernel's ucontext (contract); its uc_sigmask is the thread's mask
        // at delivery, which sigreturn will restore.
        let at_delivery = kernel_mask(unsafe { &(*(ctx as *const libc::ucontext_t)).uc_sigmask });
        // Plus the mark, so that the poker does not take this thread for one that blocks SIGTRAP.
        let mut mask = at_delivery | prev.mask | MARK_BIT;
        if prev.flags & libc::SA_NODEFER != 0 {
            mask &= !bit;
        } else {
            mask |= bit;
        }
        // SAFETY: rt_sigprocmask(SIG_SETMASK, &mask, &saved, 8) on live locals.
        restore = unsafe {
            raw_syscall4(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK as usize,
                &mask as *const u64 as usize,
                &mut saved as *mut u64 as usize,
                KERNEL_SIGSET_SIZE,
            )
        } == 0;
    }
    if prev.flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature;
        // it gets the kernel's arguments.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the handler takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
        f(sig);
    }
    if restore {
        // SAFETY: rt_sigprocmask(SIG_SETMASK, &saved, NULL, 8) on a live local.
        unsafe {
            raw_syscall4(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK as usize,
                &saved as *const u64 as usize,
                0,
                KERNEL_SIGSET_SIZE,
            )
        };
    }
}

/// Ends the process with `sig`'s default action (for SIGTRAP: terminate with a core dump): sets
/// SIG_DFL, queues `sig` to this thread again with the original siginfo (so a core file records
/// it; plain `tgkill` if that fails), and unblocks it, which delivers it before the unblocking
/// call returns. Should another thread install a handler in between, that handler gets it.
///
/// # Safety
/// `info` must be null or the siginfo the kernel passed to this handler invocation.
unsafe fn die_of(sig: libc::c_int, info: *const libc::siginfo_t) {
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let bit = 1u64 << (sig - 1);
    // SAFETY: rt_sigaction, getpid, gettid, rt_tgsigqueueinfo, tgkill and rt_sigprocmask with
    // valid arguments: live locals and the kernel's siginfo, which rt_tgsigqueueinfo only reads.
    // Queueing to our own thread is allowed for every si_code.
    unsafe {
        raw_syscall4(
            libc::SYS_rt_sigaction,
            sig as usize,
            &default as *const KernelSigaction as usize,
            0,
            KERNEL_SIGSET_SIZE,
        );
        let pid = raw_syscall4(libc::SYS_getpid, 0, 0, 0, 0) as usize;
        let tid = raw_syscall4(libc::SYS_gettid, 0, 0, 0, 0) as usize;
        let queued = !info.is_null()
            && raw_syscall4(
                libc::SYS_rt_tgsigqueueinfo,
                pid,
                tid,
                sig as usize,
                info as usize,
            ) == 0;
        if !queued {
            raw_syscall4(libc::SYS_tgkill, pid, tid, sig as usize, 0);
        }
        raw_syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK as usize,
            &bit as *const u64 as usize,
            0,
            KERNEL_SIGSET_SIZE,
        );
    }
}

#[cfg(test)]
mod tests {
    /// A merged SIGTRAP (a tgkill'd one that carried a poke's int3) at a native site is ours only
    /// if the site holds a complete instruction again: the function's own nop (any
    /// displacement) or a jump/call to wherever its stub is — not arena text.
    #[test]
    fn a_native_site_with_a_complete_instruction_is_finished() {
        let arena = super::CodeArena::global().unwrap();
        // Stands in for a native function's text: readable, registered as a native site.
        static TEXT: [std::sync::atomic::AtomicU8; 16] =
            [const { std::sync::atomic::AtomicU8::new(0) }; 16];
        let site = TEXT.as_ptr() as usize;
        let set = |bytes: &[u8]| {
            for (b, v) in TEXT.iter().zip(bytes) {
                b.store(*v, super::Ordering::Relaxed);
            }
        };
        let slot = super::NATIVE_SITES
            .iter()
            .find(|s| {
                s.compare_exchange(0, site, super::Ordering::AcqRel, super::Ordering::Relaxed)
                    .is_ok()
            })
            .expect("a free native site slot");
        let far_jump = super::encode_x86(site, super::PokeInsn::Jump(site + 0x1000)).unwrap();
        for (bytes, finished) in [
            (&[0x0f, 0x1f, 0x44, 0x00, 0x08][..], true),
            (&[0x0f, 0x1f, 0x44, 0x00, 0x00][..], true),
            (&far_jump[..], true),
            (&[0xcc, 0x1f, 0x44, 0x00, 0x08][..], false),
            (&[0x48, 0x89, 0xe5, 0x55, 0x90][..], false),
        ] {
            set(bytes);
            assert_eq!(
                super::is_finished_site(arena, site),
                finished,
                "{bytes:02x?}"
            );
        }
        slot.store(0, super::Ordering::Release);
    }

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

    /// Prints what `check_trap_delivery` costs per poke (the figures in its doc comment):
    /// `cargo test --release --lib trap_delivery_check_cost -- --nocapture`.
    #[test]
    fn trap_delivery_check_cost() {
        use std::time::Instant;
        CodeArena::global().unwrap();
        install_trap_handler().unwrap();
        const ROUNDS: u32 = 2000;
        let time = |f: &dyn Fn()| {
            let start = Instant::now();
            for _ in 0..ROUNDS {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(ROUNDS)
        };
        let query = time(&|| {
            installed_trap_action().unwrap();
        });
        // Four threads that have run "JIT code" (a read-side section registers them) and wait.
        const THREADS: usize = 4;
        let done = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
        let ready = std::sync::Arc::new(std::sync::Barrier::new(THREADS + 1));
        let tid = std::sync::Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (ready, done, tid) = (ready.clone(), done.clone(), tid.clone());
                std::thread::spawn(move || {
                    drop(crate::reclaim::ReadGuard::new());
                    let me = rustix::thread::gettid().as_raw_nonzero().get();
                    tid.store(me as usize, Ordering::Relaxed);
                    ready.wait();
                    done.wait();
                })
            })
            .collect();
        ready.wait();
        // Other unit tests register (and exit) threads meanwhile: read one of ours.
        let registered = crate::reclaim::registered_thread_ids();
        let ours = tid.load(Ordering::Relaxed) as i32;
        let read = time(&|| {
            blocked_signals(ours).unwrap();
        });
        let cached = time(&|| check_trap_delivery(false).unwrap());
        let membarrier = time(&|| {
            crate::text::sync_all_threads().unwrap();
        });
        done.wait();
        for t in threads {
            t.join().unwrap();
        }
        println!(
            "sigaction query {query:.0} ns; one thread's status read {read:.0} ns; whole check with {} registered threads, masks fresh, {cached:.0} ns; one membarrier(SYNC_CORE) {membarrier:.0} ns (a poke makes three)",
            registered.len()
        );
    }
}
