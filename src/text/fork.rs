//! `fork`: the child gets a private copy of all JIT text, and the parent is never affected.
//!
//! The code arena is a `MAP_SHARED` memfd, so without care a forked child and its parent would
//! execute — and patch — the same pages: one's attach would rewrite the other's sites, and one's
//! `int3` would kill the other's threads. `pthread_atfork` handlers, registered when the first
//! arena is created, make fork a clean cut:
//!
//! * **prepare** (parent, before the fork): take, in lock order, the upper layers' locks
//!   (attach/detach), the poke lock, the registry and the global arena's allocator, then the
//!   retirement domain's locks. So no poke, attach, allocation or registration is half-done
//!   when the address space is copied, and the child inherits no lock held by a thread it does
//!   not have. A pipe is opened for the handshake below.
//! * **child**: remap the global arena onto a new memfd holding a copy of its text (same
//!   addresses, so every program, trampoline and pointer stays valid), re-register
//!   `membarrier` (its registration belongs to the parent's address space), bump the fork
//!   generation (arenas other than the global one now refuse use with `TextError::Forked`),
//!   let the upper layers forget the parent's threads and restart the reclaimer, then release
//!   the locks and tell the parent through the pipe.
//! * **parent**: wait until the child has copied the text (or died: the pipe then reads EOF),
//!   so the parent cannot poke while the child copies; release the locks.
//!
//! The handlers only make system calls and touch memory, as the child of a multi-threaded
//! process may (malloc is safe there under glibc, which resets its own locks). Forking from
//! inside a JIT run, or while another thread is inside a blocking attach, is not supported.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{MutexGuard, Once, OnceLock, PoisonError};

use super::registry::RegistryHold;
use super::{CodeArena, Registry};

/// Incremented in every forked child; arenas remember the generation they were made in.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The fork generation of this process (0 until the first fork in its ancestry).
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Fork handlers of a layer above `text` (it cannot be called directly from here).
#[derive(Clone, Copy)]
pub(crate) struct Hooks {
    /// Takes the layer's locks.
    pub prepare: fn(),
    /// Releases them in the parent.
    pub parent: fn(),
    /// Repairs the layer's state in the child and releases the locks.
    pub child: fn(),
}

/// Layers whose locks are taken before the text locks (attach/detach).
static OUTER: OnceLock<Hooks> = OnceLock::new();
/// Layers whose locks are taken after the text locks (the retirement domain).
static INNER: OnceLock<Hooks> = OnceLock::new();

/// Registers the hooks of the layer that takes its locks before the poke lock.
pub(crate) fn register_outer(hooks: Hooks) {
    let _ = OUTER.set(hooks);
}

/// Registers the hooks of the layer whose locks are leaves (taken under the poke lock).
pub(crate) fn register_inner(hooks: Hooks) {
    let _ = INNER.set(hooks);
}

/// What prepare holds until the parent or child handler releases it.
struct Held {
    _text: MutexGuard<'static, ()>,
    _registry: RegistryHold,
    arena: Option<(&'static CodeArena, MutexGuard<'static, super::arena::State>)>,
    /// (read end, write end) of the parent–child handshake.
    pipe: Option<(OwnedFd, OwnedFd)>,
}

thread_local! {
    /// Prepare, parent and child handlers run on the forking thread (in the child, its copy).
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Registers the handlers once per process.
pub(crate) fn ensure_registered() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the three handlers are `extern "C" fn()` that stay valid for the life of the
        // process; pthread_atfork only records them.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        debug_assert_eq!(rc, 0, "pthread_atfork failed");
    });
}

extern "C" fn prepare() {
    if let Some(h) = OUTER.get() {
        (h.prepare)();
    }
    let text = super::poke::TEXT_LOCK
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let registry = Registry::global().hold();
    let arena = CodeArena::existing_global().map(|a| (a, a.lock_state()));
    let pipe = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).ok();
    HELD.with(|h| {
        *h.borrow_mut() = Some(Held {
            _text: text,
            _registry: registry,
            arena,
            pipe,
        })
    });
    if let Some(h) = INNER.get() {
        (h.prepare)();
    }
}

extern "C" fn parent() {
    if let Some(h) = INNER.get() {
        (h.parent)();
    }
    if let Some(held) = HELD.with(|h| h.borrow_mut().take()) {
        if let Some((read, write)) = held.pipe {
            drop(write);
            let mut byte = [0u8; 1];
            // One byte from the child once it copied the text, or EOF if it died first.
            while let Err(rustix::io::Errno::INTR) = rustix::io::read(&read, &mut byte) {}
        }
        drop(held.arena);
    }
    if let Some(h) = OUTER.get() {
        (h.parent)();
    }
}

extern "C" fn child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    if let Some(mut held) = HELD.with(|h| h.borrow_mut().take()) {
        if let Some((arena, state)) = held.arena.as_mut() {
            // A failure leaves the arena on the parent's generation: every later use in the
            // child then fails with `TextError::Forked` instead of touching the parent's text.
            let _ = arena.privatize_after_fork(state);
        }
        super::sync::reregister_after_fork();
        if let Some((read, write)) = held.pipe.take() {
            drop(read);
            let _ = rustix::io::write(&write, &[1]);
        }
        drop(held);
    }
    if let Some(h) = INNER.get() {
        (h.child)();
    }
    if let Some(h) = OUTER.get() {
        (h.child)();
    }
}
