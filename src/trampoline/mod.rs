//! BPF trampolines: fentry / fexit / fmod_ret / freplace programs attached to a program — or,
//! with [`attach_native`], to a native function of the process — that other threads are running.
//!
//! [`Prog`] is a loaded (JIT-compiled, registered) program. [`attach`] links a tracing program to a
//! target `Prog` and returns a [`Link`]; dropping the link (or [`Link::detach`]) detaches it. Every
//! change builds a new trampoline image for the target's current set of links, pokes the target's
//! patch site over to it (or back to the nop), and retires the old image through
//! [`crate::reclaim`]: its `ip_after_call` is first poked to jump to `ip_epilogue` (so threads still
//! inside the original skip the old fexit programs), then it is freed after grace period 1, its
//! references draining and grace period 2.
//!
//! An image, for the current links (the kernel's layout, in userspace; on x86-64 the site jumps to
//! the image, on arm64 it branches with link as in the seed):
//! ```text
//!   save the target's arguments (r1..r5) and its run context
//!   image_enter(image)                     take the reference (test hook runs before it)
//!   for each fentry:   enter → program(ctx = &args, cookie) → exit
//!   if fexit or fmod_ret:
//!     for each fmod_ret: enter → program → exit; non-zero result → retval, skip the original
//!     call the target's body (just after its patch site) with the saved arguments
//!     store the return value
//!     ip_after_call: nop                   (poked to `jmp ip_epilogue` on retirement)
//!     for each fexit:    enter → program(ctx = &args with retval at ctx[5]) → exit
//!   ip_epilogue:
//!   image_exit(image)                      drop the reference
//!   restore; return to the target's caller (with retval), or into the body (fentry only)
//! ```
//! A tracing program sees r1 = a pointer to six u64s (the target's r1..r5, then the return value,
//! 0 before the original ran), r2 = the link's cookie, and may read that memory (checked mode).
//!
//! Per-program `enter`/`exit` keep a recursion guard (a program already running on this thread
//! is skipped and its `misses` counted) and, when [`set_stats_enabled`] is on, `run_cnt` and
//! `run_time_ns`.

// The runtime functions below are only reachable from generated images, which exist for x86-64
// and arm64.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]

#[cfg(target_arch = "aarch64")]
mod arm64;
mod clock;
mod native;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub use native::attach_native;

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::exec::context::TracerTemplate;
use crate::exec::{DirectTailCall, ExecError, MemRegion, RunEnv, TailCaller, TailTarget};
use crate::helpers::Helpers;
use crate::isa::Program;
use crate::jit::{JitError, JitOptions, JitProgram, JitStack, RunContext};
use crate::reclaim::{self, Retirable};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::text::ImageKind;
use crate::text::poke::{PatchSite, PokeError, PokeInsn};
use crate::text::{Allocation, CodeArena, Registry, TextError};

/// Most fentry + fexit + fmod_ret links on one target (the kernel's `BPF_MAX_TRAMP_LINKS`).
pub const MAX_TRAMP_LINKS: usize = 38;

/// How a tracing program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachKind {
    /// Runs before the target, sees its arguments.
    Fentry,
    /// Runs after the target, sees its arguments and return value.
    Fexit,
    /// Runs before the target; a non-zero result skips the target and becomes its return value.
    FmodRet,
    /// Replaces the target: its entry jumps to the program, which has the same signature.
    Freplace,
}

/// Why an attach or detach did not happen. In every case the target is unchanged.
#[derive(Debug, Error)]
pub enum AttachError {
    #[error(
        "the target already has {max} fentry/fexit/fmod_ret links, the most one trampoline holds; detach one first"
    )]
    /// The target has the most links one trampoline holds.
    TooManyLinks {
        /// The limit ([`MAX_TRAMP_LINKS`]).
        max: usize,
    },
    #[error(
        "cannot attach {requested:?}: the target has {existing:?} links, and freplace excludes every other kind on one target"
    )]
    /// freplace and the other kinds exclude each other on one target.
    Conflict {
        /// A kind already attached.
        existing: AttachKind,
        /// The kind asked for.
        requested: AttachKind,
    },
    #[error("a program cannot be attached to itself")]
    /// The tracer and the target are the same program.
    SelfAttach,
    #[error(
        "cannot attach: {0}; Linux refuses this too (a replacement chain or cycle would loop forever), so attach to the original program instead"
    )]
    /// An freplace that would chain or cycle; the text says which rule.
    Recursive(&'static str),
    #[error("patching the target failed: {0}")]
    /// Rewriting the patch site failed.
    Poke(#[from] PokeError),
    #[error("building the trampoline failed: {0}")]
    /// Generating the trampoline failed.
    Jit(#[from] JitError),
    #[error("placing the trampoline failed: {0}")]
    /// Placing the trampoline in the code arena failed.
    Text(#[from] TextError),
    #[error(
        "cannot attach or detach from inside a JIT run (a helper or tracer) when a grace period is needed; do it from outside the run"
    )]
    /// A grace period was needed and the caller is inside a JIT run.
    InsideRun,
    #[error("trampolines are not implemented for this {0} host yet")]
    /// This architecture (named) has no trampolines.
    UnsupportedHost(&'static str),
    #[error("native site: {0}")]
    /// The native function's site could not be used.
    Native(#[from] crate::native::NativeError),
    #[error("the trampoline image could not be generated: {0} (a livebpf bug; please report it)")]
    /// The image generator found an inconsistency (a bug).
    Image(&'static str),
}

/// Run statistics of a program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// Runs counted while statistics were on.
    pub run_cnt: u64,
    /// Their total time.
    pub run_time_ns: u64,
    /// Times the program was skipped because it was already running on the same thread.
    pub misses: u64,
    /// Runs as a tracer that ended with an error (e.g. an out-of-bounds access).
    pub errors: u64,
}

static STATS_ENABLED: AtomicBool = AtomicBool::new(false);

/// Switches run statistics on or off for all programs (the kernel's `bpf_stats_enabled`). Off, a
/// run pays one relaxed load.
pub fn set_stats_enabled(on: bool) {
    if on {
        clock::calibrate();
    }
    STATS_ENABLED.store(on, Ordering::Relaxed);
}

/// Whether run statistics are on ([`set_stats_enabled`]).
pub fn stats_enabled() -> bool {
    STATS_ENABLED.load(Ordering::Relaxed)
}

/// Recursion-guard slots: each program gets a small index into a per-thread table.
static FREE_SLOTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

fn alloc_slot() -> usize {
    FREE_SLOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_else(|| NEXT_SLOT.fetch_add(1, Ordering::Relaxed))
}

struct ProgInner {
    jit: JitProgram,
    helpers: Helpers,
    /// What the program may use besides its input when it runs as a tracer (kept alive for
    /// `env_regions` and `env_maps`).
    _env: ProgEnv,
    /// `env`'s global data regions and map addresses, as runs take them.
    env_regions: Vec<MemRegion>,
    env_maps: Vec<*const crate::maps::RawMap>,
    slot: usize,
    run_cnt: AtomicU64,
    /// Total time of counted runs, in [`clock`] ticks.
    run_time_ticks: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    /// The error of the latest failed run as a tracer.
    last_error: Mutex<Option<ExecError>>,
    /// Links attached to this program as a target.
    attach: Mutex<AttachState>,
    /// How many targets this program replaces through freplace (changed under `ATTACH_LOCK`).
    replaces: AtomicUsize,
}

// SAFETY: the map addresses point at maps `env` keeps alive, and are only read.
unsafe impl Send for ProgInner {}
// SAFETY: as above.
unsafe impl Sync for ProgInner {}

/// What a program may use besides its context when it runs as a tracer: the maps its helpers
/// accept, and global data maps (`.bss`, `.data`, `.rodata`, …) whose single value it may
/// access (read-only when the map has `BPF_F_RDONLY_PROG`). The loader of an object gives its
/// programs their object's maps.
#[derive(Clone, Debug, Default)]
pub struct ProgEnv {
    /// Maps the program's helpers accept (and keeps alive).
    pub maps: Vec<crate::maps::Map>,
    /// Single-value array maps whose value the program may access directly.
    pub global_data: Vec<crate::maps::Map>,
}

impl ProgEnv {
    fn regions(&self) -> Vec<MemRegion> {
        let _run = crate::reclaim::ReadGuard::new();
        self.global_data
            .iter()
            .filter(|m| m.map_type() == crate::maps::MapType::Array)
            .filter_map(|m| {
                // SAFETY: the key is 4 readable bytes; array values never move while the map
                // lives, and `self` keeps it alive.
                let value = unsafe { m.lookup_ptr(0u32.to_le_bytes().as_ptr()) };
                let writable = m.spec().flags & crate::maps::BPF_F_RDONLY_PROG == 0;
                (!value.is_null())
                    .then(|| MemRegion::new(value as u64, m.spec().value_size as u64, writable))
            })
            .collect()
    }
}

impl Drop for ProgInner {
    fn drop(&mut self) {
        FREE_SLOTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.slot);
    }
}

/// A loaded program: JIT-compiled, registered, runnable from many threads, attachable.
#[derive(Clone)]
pub struct Prog(Arc<ProgInner>);

impl From<&Prog> for TailTarget {
    fn from(prog: &Prog) -> TailTarget {
        prog.tail_target()
    }
}

impl std::fmt::Debug for Prog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prog({:#x})", self.0.jit.entry())
    }
}

impl Prog {
    /// Compiles and registers `program`.
    pub fn load(program: &Program, helpers: &Helpers, opts: JitOptions) -> Result<Prog, JitError> {
        Prog::load_full(program, helpers, opts, ProgEnv::default(), &[])
    }

    /// As [`Prog::load`], with what the program may use when it runs as a tracer ([`ProgEnv`]).
    pub fn load_with_env(
        program: &Program,
        helpers: &Helpers,
        opts: JitOptions,
        env: ProgEnv,
    ) -> Result<Prog, JitError> {
        Prog::load_full(program, helpers, opts, env, &[])
    }

    /// [`Prog::load`] with direct tail calls ([`JitProgram::compile_with`]).
    pub fn load_with(
        program: &Program,
        helpers: &Helpers,
        opts: JitOptions,
        direct: &[DirectTailCall],
    ) -> Result<Prog, JitError> {
        Prog::load_full(program, helpers, opts, ProgEnv::default(), direct)
    }

    /// [`Prog::load_with_env`] and [`Prog::load_with`] together: an environment for tracer runs
    /// and direct tail calls.
    pub fn load_full(
        program: &Program,
        helpers: &Helpers,
        opts: JitOptions,
        env: ProgEnv,
        direct: &[DirectTailCall],
    ) -> Result<Prog, JitError> {
        let jit = JitProgram::compile_with(program, helpers, opts, direct)?;
        let env_regions = env.regions();
        let env_maps = env.maps.iter().map(crate::maps::Map::as_raw).collect();
        Ok(Prog(Arc::new(ProgInner {
            jit,
            helpers: helpers.clone(),
            _env: env,
            env_regions,
            env_maps,
            slot: alloc_slot(),
            run_cnt: AtomicU64::new(0),
            run_time_ticks: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            attach: Mutex::new(AttachState::default()),
            replaces: AtomicUsize::new(0),
        })))
    }

    /// Runs the program on `mem` (r1 = its address, r2 = its length), through whatever is
    /// attached to it.
    pub fn run(&self, mem: &mut [u8]) -> Result<u64, ExecError> {
        let start = stats_enabled().then(clock::ticks);
        let result = self.0.jit.run(mem);
        self.account(start);
        result
    }

    /// Runs the program with `args` in r1..r5 and no input memory.
    pub fn call(&self, args: [u64; 5]) -> Result<u64, ExecError> {
        let start = stats_enabled().then(clock::ticks);
        let result = self.0.jit.call(args);
        self.account(start);
        result
    }

    /// Runs the program in `env` (see [`RunEnv`]) on a fresh stack, through whatever is
    /// attached to it, counting it in the statistics as [`Prog::run`] does.
    ///
    /// # Safety
    /// As for [`JitProgram::run_env`]: the regions of `env` are valid as marked for the whole
    /// run and not aliased by Rust references, its maps alive, and `env.user` valid for what
    /// the registered context helpers do with it.
    pub unsafe fn run_env(&self, env: &RunEnv<'_>) -> Result<u64, ExecError> {
        let start = stats_enabled().then(clock::ticks);
        let mut stack = std::mem::MaybeUninit::<JitStack>::uninit();
        // SAFETY: forwarded from the caller; the stack is this run's own (the run zeroes what
        // it reaches).
        let result = unsafe { self.0.jit.run_env_on(env, stack.as_mut_ptr()) };
        self.account(start);
        result
    }

    /// What this program needs from tail-call targets ([`crate::maps::Map::prog_array_bind`]).
    pub fn tail_caller(&self) -> TailCaller {
        self.0.jit.tail_caller()
    }

    /// A program array target running this program (its JIT code for JIT callers, its program
    /// for the interpreter); it keeps the program alive. A tail call enters after the patch
    /// site, so what is attached to the program does not run on that path (as in Linux).
    pub fn tail_target(&self) -> TailTarget {
        let owner: Arc<dyn std::any::Any + Send + Sync> = self.0.clone();
        self.0.jit.tail_target(owner)
    }

    fn account(&self, start: Option<u64>) {
        if let Some(start) = start {
            self.0.run_cnt.fetch_add(1, Ordering::Relaxed);
            self.0
                .run_time_ticks
                .fetch_add(clock::since(start), Ordering::Relaxed);
        }
    }

    /// The program's run statistics so far.
    pub fn stats(&self) -> ProgStats {
        ProgStats {
            run_cnt: self.0.run_cnt.load(Ordering::Relaxed),
            run_time_ns: clock::ticks_to_ns(self.0.run_time_ticks.load(Ordering::Relaxed)),
            misses: self.0.misses.load(Ordering::Relaxed),
            errors: self.0.errors.load(Ordering::Relaxed),
        }
    }

    /// The error the latest failed run of this program as a tracer ended with (those counted in
    /// [`ProgStats::errors`]).
    pub fn last_error(&self) -> Option<ExecError> {
        self.0
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The compiled program.
    pub fn jit(&self) -> &JitProgram {
        &self.0.jit
    }

    /// Address of the trampoline image currently attached, if any (for tests and `dump`).
    pub fn trampoline_image(&self) -> Option<usize> {
        let state = self.0.attach.lock().unwrap_or_else(|e| e.into_inner());
        state.image.as_ref().map(|i| i.addr())
    }

    /// Whether this program currently replaces another one (freplace).
    pub fn is_replacement(&self) -> bool {
        self.0.replaces.load(Ordering::Relaxed) != 0
    }

    /// Links currently attached to this program as a target.
    pub fn link_count(&self) -> usize {
        let state = self.0.attach.lock().unwrap_or_else(|e| e.into_inner());
        state.links.len() + usize::from(state.freplace.is_some())
    }
}

/// What generated code points at for one link; images hold an `Arc` so the tracer program and
/// this record outlive every image that can still call them.
pub(crate) struct LinkShared {
    prog: Prog,
    cookie: u64,
    /// The context every run of this tracer starts from (it names `prog`'s helpers and
    /// environment, which `prog` keeps alive).
    template: TracerTemplate,
}

impl LinkShared {
    fn new(prog: &Prog, cookie: u64, func_ip: u64) -> LinkShared {
        let p = &prog.0;
        // SAFETY: the helpers, regions and maps live in the program, which the record keeps
        // alive as long as the template.
        let template = unsafe {
            TracerTemplate::new(
                (TRACE_CTX_WORDS * 8) as u64,
                &p.helpers,
                p.jit.budget(),
                p.jit.is_checked(),
                &p.env_regions,
                &p.env_maps,
                cookie,
                func_ip,
                p.jit.program().stack_reach(0),
            )
        };
        LinkShared {
            prog: prog.clone(),
            cookie,
            template,
        }
    }
}

struct LinkEntry {
    id: u64,
    kind: AttachKind,
    shared: Arc<LinkShared>,
}

#[derive(Default)]
struct AttachState {
    links: Vec<LinkEntry>,
    image: Option<TrampImage>,
    freplace: Option<(u64, Prog)>,
    next_id: u64,
}

/// A trampoline image in the code arena.
pub(crate) struct TrampImage {
    alloc: Option<Allocation>,
    ip_after_call: Option<PatchSite>,
    ip_epilogue: Option<usize>,
    /// Keeps the tracers this image calls alive.
    _links: Vec<Arc<LinkShared>>,
}

impl TrampImage {
    fn addr(&self) -> usize {
        self.alloc.as_ref().map_or(0, |a| a.rx())
    }
}

static LIVE_IMAGES: AtomicUsize = AtomicUsize::new(0);

/// Trampoline images built and not yet freed (attached or waiting in retirement).
pub fn live_images() -> usize {
    LIVE_IMAGES.load(Ordering::Acquire)
}

impl Retirable for TrampImage {
    fn image_addr(&self) -> Option<usize> {
        self.alloc.as_ref().map(Allocation::rx)
    }

    fn free(mut self: Box<Self>) {
        if let Some(alloc) = self.alloc.take() {
            let _ = Registry::global().unregister(alloc.rx());
            if let Ok(arena) = CodeArena::global() {
                // SAFETY: the reclaimer calls `free` only after grace period 1, the reference
                // drain and grace period 2, so no thread is or can get inside the image.
                let _ = unsafe { arena.free(alloc) };
            }
            LIVE_IMAGES.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A retired freplace program: kept alive until no thread can still be running it.
struct RetiredProg(#[allow(dead_code)] Prog);

impl Retirable for RetiredProg {
    fn image_addr(&self) -> Option<usize> {
        // Nothing takes references on a replacement; only the grace periods matter.
        None
    }

    fn free(self: Box<Self>) {}
}

/// What a link is attached to.
#[derive(Debug)]
enum Target {
    Prog(Prog),
    Native(Arc<native::NativeTarget>),
}

impl Target {
    fn detach(&self, id: u64, kind: AttachKind) -> Result<(), AttachError> {
        match self {
            Target::Prog(prog) => detach(prog, id, kind),
            Target::Native(native) => native::detach(native, id),
        }
    }
}

/// A tracing program attached to a target (a program, or a native function). Dropping it
/// detaches.
pub struct Link {
    target: Target,
    id: u64,
    kind: AttachKind,
    attached: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.target)
            .field("kind", &self.kind)
            .finish()
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Link>();
    assert_send_sync::<Prog>();
};

impl Link {
    /// How the link attaches.
    pub fn kind(&self) -> AttachKind {
        self.kind
    }

    /// The trampoline image the link's target enters now (shared by all its links; none for
    /// freplace of a program, whose site jumps to the replacement itself).
    pub fn image(&self) -> Option<usize> {
        match &self.target {
            Target::Prog(prog) => prog.trampoline_image(),
            Target::Native(native) => native.image_addr(),
        }
    }

    /// Detaches now. On failure nothing changed: the error gives the link back, still
    /// attached, to retry or keep (dropping a link detaches and ignores errors).
    pub fn detach(mut self) -> Result<(), DetachError> {
        match self.target.detach(self.id, self.kind) {
            Ok(()) => {
                self.attached = false;
                Ok(())
            }
            Err(error) => Err(DetachError { link: self, error }),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.attached {
            let _ = self.target.detach(self.id, self.kind);
        }
    }
}

/// A failed [`Link::detach`]: the link, still attached, and why.
#[derive(Debug, Error)]
#[error("detaching failed: {error}; the link is still attached (retry, or keep it)")]
pub struct DetachError {
    /// The link, unchanged.
    pub link: Link,
    /// What went wrong.
    pub error: AttachError,
}

/// Serialises attach and detach across targets, so rules that involve two programs (freplace
/// chains) are checked against a stable state, and so `fork` never copies a half-made change.
pub(crate) static ATTACH_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    /// `ATTACH_LOCK`, held by the fork prepare handler until the parent or child handler.
    static FORK_HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, ()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Takes `ATTACH_LOCK` across `fork` so that no attach is half-done in the child.
fn serialise_attach() -> std::sync::MutexGuard<'static, ()> {
    static HOOKS: std::sync::Once = std::sync::Once::new();
    HOOKS.call_once(|| {
        crate::text::fork::register_outer(crate::text::fork::Hooks {
            prepare: || {
                let guard = ATTACH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                FORK_HELD.with(|h| *h.borrow_mut() = Some(guard));
            },
            parent: || drop(FORK_HELD.with(|h| h.borrow_mut().take())),
            child: || drop(FORK_HELD.with(|h| h.borrow_mut().take())),
        })
    });
    ATTACH_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rules on a replacement, whatever it replaces: it replaces one target only (`already` says
/// so when it does), and it is not itself a target of links (a chain would loop).
fn may_replace(prog: &Prog, already: &'static str) -> Result<(), AttachError> {
    if prog.is_replacement() {
        return Err(AttachError::Recursive(already));
    }
    if prog.link_count() != 0 {
        return Err(AttachError::Recursive(
            "the replacement is itself a target of attached programs",
        ));
    }
    Ok(())
}

/// `text_poke` where trampolines are supported; a typed error elsewhere.
fn poke(site: PatchSite, old: PokeInsn, new: PokeInsn) -> Result<(), AttachError> {
    let ip = site.ip();
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        // SAFETY: every caller in this module pokes a site it owns (a target's prologue site,
        // an image's `ip_after_call`) to a trampoline image, a loaded program or the image's
        // own epilogue, all kept alive until no thread can branch there.
        match unsafe { crate::text::poke::text_poke(ip, old, new) } {
            #[cfg(target_arch = "aarch64")]
            Err(PokeError::PltKindChange { .. }) if old == PokeInsn::Nop => {
                // The site's PLT last served the other kind (a far fentry, now a far
                // freplace, or back). The site holds the nop, so after a grace period no
                // thread can still load the literal.
                reclaim::synchronize().map_err(|_| AttachError::InsideRun)?;
                if let Some(sym) = crate::text::Registry::global().lookup(ip) {
                    // SAFETY: the grace period began after the site left the PLT (it holds
                    // the nop), so every thread that executed the old branch has finished.
                    unsafe { crate::text::poke::plt_quiesced(sym.start) };
                }
                // SAFETY: as above.
                unsafe { crate::text::poke::text_poke(ip, old, new) }?;
                Ok(())
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (ip, old, new);
        Err(AttachError::UnsupportedHost(std::env::consts::ARCH))
    }
}

/// What the target's patch site holds for `image`. x86-64 jumps to the image, which calls the body
/// and returns to the target's caller itself, so calls and returns stay paired for the CPU's
/// return-stack predictor; arm64 keeps the seed's `bl` (x30 carries the body's address).
fn site_insn(image: Option<&TrampImage>) -> PokeInsn {
    match image {
        None => PokeInsn::Nop,
        Some(i) if cfg!(target_arch = "x86_64") => PokeInsn::Jump(i.addr()),
        Some(i) => PokeInsn::Call(i.addr()),
    }
}

/// Attaches `prog` to `target` as `kind`, with `cookie` passed to it in r2.
pub fn attach(
    kind: AttachKind,
    target: &Prog,
    prog: &Prog,
    cookie: u64,
) -> Result<Link, AttachError> {
    if Arc::ptr_eq(&target.0, &prog.0) {
        return Err(AttachError::SelfAttach);
    }
    let _serial = serialise_attach();
    if kind == AttachKind::Freplace {
        if target.is_replacement() {
            return Err(AttachError::Recursive(
                "the target is itself a replacement (freplace of an freplace program)",
            ));
        }
        may_replace(prog, "the replacement already replaces another program")?;
    }
    let mut state = target.0.attach.lock().unwrap_or_else(|e| e.into_inner());
    let id = state.next_id;
    if kind == AttachKind::Freplace {
        if let Some(existing) = state.links.first() {
            return Err(AttachError::Conflict {
                existing: existing.kind,
                requested: kind,
            });
        }
        if state.freplace.is_some() {
            return Err(AttachError::Conflict {
                existing: AttachKind::Freplace,
                requested: kind,
            });
        }
        poke(
            target.0.jit.patch_site(),
            PokeInsn::Nop,
            PokeInsn::Jump(prog.0.jit.entry()),
        )?;
        state.freplace = Some((id, prog.clone()));
        prog.0.replaces.fetch_add(1, Ordering::Relaxed);
    } else {
        if state.freplace.is_some() {
            return Err(AttachError::Conflict {
                existing: AttachKind::Freplace,
                requested: kind,
            });
        }
        if state.links.len() >= MAX_TRAMP_LINKS {
            return Err(AttachError::TooManyLinks {
                max: MAX_TRAMP_LINKS,
            });
        }
        state.links.push(LinkEntry {
            id,
            kind,
            shared: Arc::new(LinkShared::new(prog, cookie, target.jit().entry() as u64)),
        });
        if let Err(e) = update_image(target, &mut state) {
            state.links.pop();
            return Err(e);
        }
    }
    state.next_id += 1;
    Ok(Link {
        target: Target::Prog(target.clone()),
        id,
        kind,
        attached: true,
    })
}

fn detach(target: &Prog, id: u64, kind: AttachKind) -> Result<(), AttachError> {
    let _serial = serialise_attach();
    let mut state = target.0.attach.lock().unwrap_or_else(|e| e.into_inner());
    if kind == AttachKind::Freplace {
        let Some((fid, prog)) = state.freplace.take() else {
            return Ok(());
        };
        if fid != id {
            state.freplace = Some((fid, prog));
            return Ok(());
        }
        if let Err(e) = poke(
            target.0.jit.patch_site(),
            PokeInsn::Jump(prog.0.jit.entry()),
            PokeInsn::Nop,
        ) {
            state.freplace = Some((fid, prog));
            return Err(e);
        }
        prog.0.replaces.fetch_sub(1, Ordering::Relaxed);
        reclaim::retire(Box::new(RetiredProg(prog)));
        return Ok(());
    }
    let Some(pos) = state.links.iter().position(|l| l.id == id) else {
        return Ok(());
    };
    let removed = state.links.remove(pos);
    if let Err(e) = update_image(target, &mut state) {
        state.links.insert(pos, removed);
        return Err(e);
    }
    Ok(())
}

/// Builds the image for the current links, switches the site to it and retires the old one.
/// On error nothing has changed.
fn update_image(target: &Prog, state: &mut AttachState) -> Result<(), AttachError> {
    let new_image = if state.links.is_empty() {
        None
    } else {
        Some(build_image(
            ImageTarget::Prog {
                body: target.0.jit.entry() + target.0.jit.body_offset(),
            },
            &state.links,
        )?)
    };
    let old_insn = site_insn(state.image.as_ref());
    let new_insn = site_insn(new_image.as_ref());
    if let Err(e) = poke(target.0.jit.patch_site(), old_insn, new_insn) {
        if let Some(img) = new_image {
            // Never published, so free it through the normal path (cheap when nobody is inside).
            reclaim::retire(Box::new(img));
        }
        return Err(e);
    }
    let old = std::mem::replace(&mut state.image, new_image);
    if let Some(old) = old {
        retire_image(old);
    }
    Ok(())
}

/// Skips the old fexit programs for threads still inside the original, then hands the image to
/// the reclaimer.
fn retire_image(image: TrampImage) {
    if let (Some(after), Some(epilogue)) = (image.ip_after_call, image.ip_epilogue) {
        // A failure here only means those threads still run the old fexit programs, which stay
        // alive with the image; retirement is safe either way.
        let _ = poke(after, PokeInsn::Nop, PokeInsn::Jump(epilogue));
    }
    reclaim::retire(Box::new(image));
}

/// What an image is built for, and where the code it calls as "the original" starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ImageTarget {
    /// A loaded program, whose patch site enters the image (the body follows the site).
    Prog {
        /// The program's body (x86-64; arm64 images find it in the link register).
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        body: usize,
    },
    /// A native function, whose site's stub calls the image with its reference taken.
    Native {
        /// The function's body, after its site.
        body: usize,
    },
}

fn build_image(target: ImageTarget, links: &[LinkEntry]) -> Result<TrampImage, AttachError> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        #[cfg(target_arch = "x86_64")]
        let layout = x86_64::generate(links, target)?;
        #[cfg(target_arch = "aarch64")]
        let layout = arm64::generate(links, target)?;
        let arena = CodeArena::global()?;
        let alloc = arena.alloc(layout.code.len(), 16)?;
        let registry = Registry::global();
        let placed = arena.write(&alloc, 0, &layout.code).and_then(|()| {
            // SAFETY: the image is ours, in the global arena, unregistered before it is freed;
            // `ip_after_call` is the image's nop, poked only to jump to `ip_epilogue`.
            unsafe {
                registry.register(alloc.rx(), alloc.len(), ImageKind::Trampoline, 0)?;
                match layout.ip_after_call {
                    Some(offset) => registry.add_site(alloc.rx() + offset),
                    None => Ok(()),
                }
            }
        });
        if let Err(e) = placed {
            // SAFETY: never published.
            let _ = unsafe { arena.free(alloc) };
            return Err(e.into());
        }
        LIVE_IMAGES.fetch_add(1, Ordering::AcqRel);
        let base = alloc.rx();
        Ok(TrampImage {
            alloc: Some(alloc),
            ip_after_call: layout.ip_after_call.map(|o| PatchSite::recorded(base + o)),
            ip_epilogue: layout.ip_epilogue.map(|o| base + o),
            _links: links.iter().map(|l| l.shared.clone()).collect(),
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (target, links);
        Err(AttachError::UnsupportedHost(std::env::consts::ARCH))
    }
}

// ---------------------------------------------------------------------------------------------
// Functions trampoline code calls.

/// Test hook run by the image's entry code before the reference is taken: the window between a
/// thread's branch into the image and its reference, which grace period 1 must cover. A native
/// function's stub runs it twice: with 0 on entry, before its read-side section opens (the window
/// no grace period covers, where only the stub may be executing), and with the image it read,
/// before taking the reference.
pub type EnterHook = fn(image: usize);
static ENTER_HOOK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Installs (or clears) the enter hook. For tests of the retirement protocol.
pub fn set_enter_hook(hook: Option<EnterHook>) {
    let p = hook.map_or(std::ptr::null_mut(), |f| f as *mut ());
    ENTER_HOOK.store(p, Ordering::Release);
}

#[inline]
fn run_enter_hook(image: usize) {
    let hook = ENTER_HOOK.load(Ordering::Acquire);
    if !hook.is_null() {
        // SAFETY: only `set_enter_hook` stores here, always an `EnterHook`.
        let f: EnterHook = unsafe { std::mem::transmute::<*mut (), EnterHook>(hook) };
        f(image);
    }
}

pub(crate) extern "C" fn tramp_image_enter(image: usize) {
    run_enter_hook(image);
    reclaim::image_enter(image);
}

pub(crate) extern "C" fn tramp_image_exit(image: usize) {
    reclaim::image_exit(image);
}

/// Size of the saved-arguments block a tracer sees: r1..r5 and the return value.
pub(crate) const TRACE_CTX_WORDS: usize = 6;

/// Per-thread state of tracer runs, in one thread-local so a run looks it up once.
struct TraceLocal {
    /// Recursion guard, indexed by program slot.
    active: Vec<bool>,
    /// Stacks for tracer runs, one per nesting level (a tracer can run a traced program).
    stacks: Vec<Box<JitStack>>,
    depth: usize,
}

impl TraceLocal {
    /// Claims `slot`'s guard and this level's stack: `None` when the program is already running
    /// on this thread. The first run of a program or level on a thread grows the tables, out of
    /// line.
    #[inline]
    fn claim(&mut self, slot: usize) -> Option<*mut JitStack> {
        loop {
            if let (Some(active), Some(stack)) =
                (self.active.get_mut(slot), self.stacks.get_mut(self.depth))
            {
                if std::mem::replace(active, true) {
                    return None;
                }
                let stack = &mut **stack as *mut JitStack;
                self.depth += 1;
                return Some(stack);
            }
            self.grow(slot);
        }
    }

    /// Makes room for `slot`'s guard and this level's stack.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, slot: usize) {
        if self.active.len() <= slot {
            self.active.resize(slot + 1, false);
        }
        while self.stacks.len() <= self.depth {
            self.stacks.push(Box::new(JitStack::new()));
        }
    }

    /// Undoes [`TraceLocal::claim`] for `slot`.
    #[inline]
    fn release(&mut self, slot: usize) {
        self.depth = self.depth.saturating_sub(1);
        if let Some(active) = self.active.get_mut(slot) {
            *active = false;
        }
    }
}

thread_local! {
    static TRACE: UnsafeCell<TraceLocal> = const {
        UnsafeCell::new(TraceLocal {
            active: Vec::new(),
            stacks: Vec::new(),
            depth: 0,
        })
    };
    /// `TRACE`'s contents while they live, else null: one thread-pointer-relative load on the
    /// tracer path, where `TRACE` itself (it has a destructor) costs a state check per access.
    static TRACE_PTR: std::cell::Cell<*mut TraceLocal> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

impl Drop for TraceLocal {
    fn drop(&mut self) {
        // Before the stacks go: from here on `with_trace` takes the slow path, which finds
        // `TRACE` destroyed.
        TRACE_PTR.set(std::ptr::null_mut());
    }
}

/// Runs `f` on this thread's tracer state; `None` once the thread-local is destroyed (a traced
/// program run from another thread-local's destructor: its tracers are skipped as misses).
#[inline]
fn with_trace<R>(f: impl FnOnce(&mut TraceLocal) -> R) -> Option<R> {
    let trace = TRACE_PTR.get();
    if !trace.is_null() {
        // SAFETY: non-null only while `TRACE` lives (set below on its first access, cleared
        // when its destructor starts), in this thread's storage, which does not move; the state
        // is this thread's own and `f` never re-enters `with_trace` (its callers only touch
        // plain fields), so this is the only reference.
        return Some(f(unsafe { &mut *trace }));
    }
    with_trace_slow(f)
}

#[cold]
#[inline(never)]
fn with_trace_slow<R>(f: impl FnOnce(&mut TraceLocal) -> R) -> Option<R> {
    TRACE
        .try_with(|t| {
            TRACE_PTR.set(t.get());
            // SAFETY: as in `with_trace`.
            f(unsafe { &mut *t.get() })
        })
        .ok()
}

/// Starts one tracer run: recursion guard, run context, stats. Returns 0 to skip the program,
/// else 1, or the start time in ns + 1 when stats are on.
///
/// # Safety
/// `link` is an `Arc<LinkShared>` held by the calling image; `ctx` points at uninitialised space
/// for a `RunContext` in the trampoline's frame; `args` at the `TRACE_CTX_WORDS` saved words.
pub(crate) unsafe extern "C" fn tramp_prog_enter(
    link: *const LinkShared,
    ctx: *mut RunContext<'static>,
    args: *mut u64,
) -> u64 {
    // SAFETY: per the contract, the image keeps the link alive while it runs.
    let link = unsafe { &*link };
    let prog = &link.prog.0;
    let Some(stack) = with_trace(|t| t.claim(prog.slot)).flatten() else {
        prog.misses.fetch_add(1, Ordering::Relaxed);
        return 0;
    };
    // SAFETY: `ctx` is trampoline frame space for one RunContext; `args` are the saved
    // argument words in the same frame; the stack is this thread's for this nesting level and
    // stays allocated while the thread lives (reused by every tracer run at this level: the
    // run zeroes what the tracer reaches).
    unsafe { link.template.start(ctx, args as u64, stack) };
    if stats_enabled() {
        clock::ticks() + 1
    } else {
        1
    }
}

/// Ends a tracer run started by [`tramp_prog_enter`] (`start` is what it returned).
///
/// # Safety
/// As for `tramp_prog_enter`; `ctx` was initialised by it when `start != 0`.
pub(crate) unsafe extern "C" fn tramp_prog_exit(
    link: *const LinkShared,
    start: u64,
    ctx: *mut RunContext<'static>,
) {
    if start == 0 {
        return;
    }
    // SAFETY: see `tramp_prog_enter`.
    let link = unsafe { &*link };
    let prog = &link.prog.0;
    // SAFETY: initialised by the matching enter; dropped exactly once here.
    let error = unsafe { RunContext::take_raw(ctx) };
    if let Some(error) = error {
        prog.errors.fetch_add(1, Ordering::Relaxed);
        *prog.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
    if start > 1 {
        prog.run_cnt.fetch_add(1, Ordering::Relaxed);
        prog.run_time_ticks
            .fetch_add(clock::since(start - 1), Ordering::Relaxed);
    }
    with_trace(|t| t.release(prog.slot));
}
