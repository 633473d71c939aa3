//! Trampolines on native functions: fentry / fexit / fmod_ret / freplace programs attached to a
//! function of the host process that has a patchable entry ([`NativeSite`]).
//!
//! # The entry stub
//! A native caller is not inside a livebpf run: nothing marked it online before it executed the
//! site, so it cannot jump straight into an image (a grace period would not wait for a thread
//! that fetched the old jump and was preempted before any bookkeeping). Each site therefore
//! jumps to a small **stub** of its own, mapped within the site's branch reach and never freed
//! (nor changed) once the site has used it, with a record holding the image to enter:
//! ```text
//!   site:  jmp stub                 (x86-64; arm64: b stub — x30 untouched)
//!   stub:  save the argument registers
//!          image = native_stub_enter(record)
//!              open a read-side section          ← from here grace periods wait for the thread
//!              image = record.image              ← read only after that
//!              none: close the section, → 0
//!              take the image's reference
//!          restore the argument registers
//!          image == 0: jmp body                  (the function, untraced)
//!          call image                            (tracers, then the body, then fexit tracers)
//!          native_stub_exit(image)               drop the reference, close the section
//!          ret                                   (with the function's return value)
//! ```
//! The image runs its tracers inside the section (their map lookups are protected as in any run)
//! and calls the body outside it (`native_body_enter` / `native_body_exit`): a native function may
//! block, and grace periods must not wait for it. The image's reference covers the whole call,
//! including the body, so a retired native image is freed only once every call that entered it
//! has returned into the stub — which is never freed, so nothing remains to execute in the image
//! once the reference is dropped.
//!
//! # Why a retired image is never entered
//! A writer stores the new `record.image` (0 when the last link goes) and then makes every thread
//! execute a full barrier — the closing membarrier of the site's poke, or one of its own when only
//! the record changes — *before* it retires the old image. That barrier matters: the stub's load
//! of the record may be satisfied before its section's epoch is stored (arm64 reorders loads; the
//! reader has only compiler fences), and grace period 1 first advances the epoch, so without it a
//! caller could pair the new epoch (not waited for) with the old image. After it:
//! * a caller whose section began before the barrier is seen by grace period 1 and waited for:
//!   when it leaves the section it holds the old image's reference (or ran untraced), and the
//!   drain waits for that reference;
//! * a caller whose section began after it loads the record after the barrier: the new value;
//! * a caller anywhere between the site and its section's start is executing the stub, which
//!   stays.
//!
//! `tests/native_race.rs` holds a caller exactly between the record's load and the reference, at
//! the stub's entry, and inside the body; `models/retire.pml` (`-DNATIVE`) checks the path in
//! every interleaving, including the early load, and fails without the barrier
//! (`-DNO_UNLINK_MB`) or with the load before the section (`-DNATIVE_READ_EARLY`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{
    AttachError, AttachKind, AttachState, ImageTarget, Link, LinkEntry, LinkShared,
    MAX_TRAMP_LINKS, Prog, Target, TrampImage, build_image, may_replace, retire_image,
    serialise_attach,
};
use crate::native::{NativeError, NativeInsn, NativeSite};
use crate::reclaim;

/// What a site's stub reads: the image to enter, 0 for none.
pub(crate) struct StubRecord {
    image: AtomicUsize,
}

/// A site's entry stub: code mapped near the site (one page of its own, never unmapped) and its
/// record (leaked: the stub's code points at it).
struct Stub {
    addr: usize,
    record: &'static StubRecord,
}

/// A native function as an attach target: its site, stub and links.
pub(crate) struct NativeTarget {
    site: NativeSite,
    stub: Stub,
    state: Mutex<AttachState>,
}

impl std::fmt::Debug for NativeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Native({:#x})", self.site.function())
    }
}

impl NativeTarget {
    /// Where the function's own code starts: after the site (and, on arm64, the second nop).
    fn body(&self) -> usize {
        self.site.site() + SITE_SPAN
    }

    pub(crate) fn image_addr(&self) -> Option<usize> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.image.as_ref().map(TrampImage::addr)
    }
}

/// Bytes from the site to the body.
#[cfg(target_arch = "x86_64")]
const SITE_SPAN: usize = 5;
#[cfg(not(target_arch = "x86_64"))]
const SITE_SPAN: usize = 8;

/// Every native site attached so far (its stub stays while the process lives).
static TARGETS: Mutex<Vec<Arc<NativeTarget>>> = Mutex::new(Vec::new());

fn target_for(site: &NativeSite) -> Result<Arc<NativeTarget>, AttachError> {
    let mut targets = TARGETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = targets.iter().find(|t| t.site.site() == site.site()) {
        return Ok(t.clone());
    }
    let stub = Stub::new(site)?;
    let target = Arc::new(NativeTarget {
        site: site.clone(),
        stub,
        state: Mutex::new(AttachState::default()),
    });
    targets.push(target.clone());
    Ok(target)
}

/// Attaches `prog` to the native function of `site` as `kind`, with `cookie` in r2, while other
/// threads may be calling the function. The program sees the function's first five integer
/// arguments (r1 = a pointer to six u64s: the arguments, then the return value for fexit, as on
/// a program target); fmod_ret's non-zero result is returned instead of calling the function;
/// freplace runs `prog` instead of the function, with the arguments in r1..r5, and returns its
/// r0. The limits and errors of [`super::attach`] apply. Dropping the link (or
/// [`Link::detach`]) detaches; the last detach restores the site's original bytes exactly.
///
/// A traced call holds its image's reference until the function returns, so a retired image is
/// freed only once calls in flight have returned (a function that never returns keeps it).
///
/// # Safety
/// * The function takes only integer or pointer arguments in registers (at most six on x86-64,
///   eight on arm64; none on the stack, not variadic) and returns an integer or nothing: the
///   trampoline preserves exactly those (floating-point argument registers are not).
/// * For freplace, the program computes what the function's callers may rely on.
/// * livebpf's own code never calls the function (an allocator, a lock or a libc routine
///   livebpf uses): a call from inside the stub's or a tracer's bookkeeping would re-enter
///   state that is not re-entrant. The same holds for a call from a signal handler that
///   interrupted that bookkeeping on the same thread.
/// * The function's object is never unloaded while the process lives once it was attached (its
///   site keeps pointing at the stub's code until detached, and other threads may be calling).
pub unsafe fn attach_native(
    kind: AttachKind,
    site: &NativeSite,
    prog: &Prog,
    cookie: u64,
) -> Result<Link, AttachError> {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return Err(AttachError::UnsupportedHost(std::env::consts::ARCH));
    }
    let _serial = serialise_attach();
    if kind == AttachKind::Freplace {
        may_replace(prog, "the replacement already replaces another function")?;
    }
    let target = target_for(site)?;
    let mut state = target.state.lock().unwrap_or_else(|e| e.into_inner());
    let replaced = state.links.iter().any(|l| l.kind == AttachKind::Freplace);
    if let Some(existing) = state.links.first()
        && (kind == AttachKind::Freplace || replaced)
    {
        return Err(AttachError::Conflict {
            existing: existing.kind,
            requested: kind,
        });
    }
    if state.links.len() >= MAX_TRAMP_LINKS {
        return Err(AttachError::TooManyLinks {
            max: MAX_TRAMP_LINKS,
        });
    }
    let id = state.next_id;
    state.links.push(LinkEntry {
        id,
        kind,
        shared: Arc::new(LinkShared::new(prog, cookie, site.function() as u64)),
    });
    if let Err(e) = update(&target, &mut state) {
        state.links.pop();
        return Err(e);
    }
    if kind == AttachKind::Freplace {
        prog.0.replaces.fetch_add(1, Ordering::Relaxed);
    }
    state.next_id += 1;
    drop(state);
    Ok(Link {
        target: Target::Native(target),
        id,
        kind,
        attached: true,
    })
}

pub(super) fn detach(target: &NativeTarget, id: u64) -> Result<(), AttachError> {
    let _serial = serialise_attach();
    let mut state = target.state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pos) = state.links.iter().position(|l| l.id == id) else {
        return Ok(());
    };
    let removed = state.links.remove(pos);
    if let Err(e) = update(target, &mut state) {
        state.links.insert(pos, removed);
        return Err(e);
    }
    if removed.kind == AttachKind::Freplace {
        removed
            .shared
            .prog
            .0
            .replaces
            .fetch_sub(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Builds the image for the current links and switches the stub (and, from or to no links, the
/// site) to it; the old image is retired. On error nothing has changed.
fn update(target: &NativeTarget, state: &mut AttachState) -> Result<(), AttachError> {
    let new_image = if state.links.is_empty() {
        None
    } else {
        Some(build_image(
            ImageTarget::Native {
                body: target.body(),
            },
            &state.links,
        )?)
    };
    let record = &target.stub.record.image;
    let new_addr = new_image.as_ref().map_or(0, TrampImage::addr);
    let stub = NativeInsn::Jump(target.stub.addr);
    let poked = match (state.image.is_some(), new_image.is_some()) {
        (false, true) => {
            // The record first: the first caller through the new jump finds the image.
            record.store(new_addr, Ordering::Release);
            // SAFETY: the stub returns to the caller with the function's ABI (see the module
            // docs), is within reach (placed so), and is never unmapped; the function's object
            // stays loaded per `attach_native`'s contract.
            let r = unsafe { target.site.poke(NativeInsn::Original, stub) };
            if r.is_err() {
                record.store(0, Ordering::Release);
            }
            r
        }
        (true, false) => {
            // The record first, so that the poke's closing membarrier also orders it: callers
            // that took the jump before the poke read it in their section (see below).
            let old = record.swap(0, Ordering::AcqRel);
            // SAFETY: restores the function's own nop.
            let r = unsafe { target.site.poke(stub, NativeInsn::Original) };
            if r.is_err() {
                record.store(old, Ordering::Release);
            }
            r
        }
        _ => {
            record.store(new_addr, Ordering::Release);
            // See "Why a retired image is never entered": the membarrier between this store
            // and grace period 1's epoch advance.
            reclaim::barrier_all_threads();
            Ok(crate::text::poke::PokeOutcome::Applied)
        }
    };
    if let Err(e) = poked {
        if let Some(img) = new_image {
            reclaim::retire(Box::new(img));
        }
        return Err(e.into());
    }
    if let Some(old) = std::mem::replace(&mut state.image, new_image) {
        retire_image(old);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Functions the stub and native images call.

/// The stub's entry: opens the section, then reads which image to enter and takes its
/// reference. Returns the image, or 0 (section closed) to run the function untraced.
extern "C" fn native_stub_enter(record: *const StubRecord) -> usize {
    super::run_enter_hook(0);
    // SAFETY: the record is leaked with its stub, which passes its own.
    let record = unsafe { &*record };
    reclaim::enter_native(|| {
        // Relaxed: inside the section; the writer's barrier orders its store before this load
        // for every section it does not wait for (the module docs). The image's code and links
        // were published before the store that made them reachable (Release there, and the same
        // barrier).
        let image = record.image.load(Ordering::Relaxed);
        if image != 0 {
            // The test hook, as on a program target's image entry: before the reference.
            super::run_enter_hook(image);
        }
        image
    })
}

/// The stub's exit, after the image returned: drops the reference, closes the section.
extern "C" fn native_stub_exit(image: usize) {
    reclaim::exit_native(image);
}

/// A native image leaves the section before calling the body (which may block)...
pub(super) extern "C" fn native_body_enter() {
    reclaim::leave_section();
}

/// ...and opens it again for the fexit programs. Its reference kept the image alive meanwhile.
pub(super) extern "C" fn native_body_exit() {
    reclaim::enter_section();
}

// ---------------------------------------------------------------------------------------------
// Stubs.

/// How far the site's branch reaches, less a margin for the stub's own length.
#[cfg(target_arch = "x86_64")]
const REACH: usize = (1 << 31) - (1 << 20);
#[cfg(not(target_arch = "x86_64"))]
const REACH: usize = (1 << 27) - (1 << 20);

const PAGE: usize = 4096;

impl Stub {
    fn new(site: &NativeSite) -> Result<Stub, AttachError> {
        let page = map_near(site.site()).ok_or(NativeError::NoStubSpace { site: site.site() })?;
        let record: &'static StubRecord = Box::leak(Box::new(StubRecord {
            image: AtomicUsize::new(0),
        }));
        let body = site.site() + SITE_SPAN;
        let code = stub_code(page, record as *const StubRecord as u64, body)?;
        // SAFETY: `page` is our own fresh RW mapping of one page, and the code fits it.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), page as *mut u8, code.len());
            crate::text::sync_icache(page, code.len());
        }
        // SAFETY: our own mapping; from now on read and executed only.
        let sealed = unsafe {
            libc::mprotect(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if sealed != 0 {
            let reason = std::io::Error::last_os_error().to_string();
            // SAFETY: never published.
            unsafe { libc::munmap(page as *mut libc::c_void, PAGE) };
            return Err(AttachError::Native(NativeError::StubProtect { reason }));
        }
        Ok(Stub { addr: page, record })
    }
}

/// Maps one RW page within the site's branch reach, trying addresses ever farther away (below
/// first: shared objects are mapped top-down, so there is usually room just below).
fn map_near(site: usize) -> Option<usize> {
    const STEP: usize = 1 << 20;
    let base = site & !(PAGE - 1);
    for i in 1..REACH / STEP {
        for hint in [base.checked_sub(i * STEP), base.checked_add(i * STEP)] {
            let Some(hint) = hint.filter(|&h| h >= 1 << 16) else {
                continue;
            };
            // SAFETY: an anonymous mapping that replaces nothing (FIXED_NOREPLACE).
            let p = unsafe {
                libc::mmap(
                    hint as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                continue;
            }
            let got = p as usize;
            if got.abs_diff(site) < REACH {
                return Some(got);
            }
            // A kernel without FIXED_NOREPLACE took the hint as a hint and put it elsewhere.
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(p, PAGE) };
        }
    }
    None
}

/// The stub's code at `at`, for `record`, falling through to `body` when there is no image.
#[cfg(target_arch = "x86_64")]
fn stub_code(at: usize, record: u64, body: usize) -> Result<Vec<u8>, AttachError> {
    use crate::jit::x86_64::asm::{AluOp, Asm, Cond, Gpr};
    const ARGS: [Gpr; 6] = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9];
    let mut a = Asm::new();
    let untraced = a.new_label();
    // Entered by the site's jmp: rsp ≡ 8 (mod 16). Six pushes and 8 more align it.
    for r in ARGS {
        a.push(r);
    }
    a.alu_ri(AluOp::Sub, true, Gpr::Rsp, 8);
    a.movabs(Gpr::Rdi, record);
    a.movabs(Gpr::Rax, native_stub_enter as *const () as u64);
    a.call_r(Gpr::Rax);
    a.alu_ri(AluOp::Add, true, Gpr::Rsp, 8);
    for r in ARGS.iter().rev() {
        a.pop(*r);
    }
    a.test_rr(true, Gpr::Rax, Gpr::Rax);
    a.jcc(Cond::E, untraced);
    // The image, kept for the exit; the call then enters it with rsp ≡ 8, as any function.
    a.push(Gpr::Rax);
    a.call_r(Gpr::Rax);
    a.pop(Gpr::Rdi);
    a.push(Gpr::Rax);
    a.push(Gpr::Rdx);
    a.alu_ri(AluOp::Sub, true, Gpr::Rsp, 8);
    a.movabs(Gpr::Rax, native_stub_exit as *const () as u64);
    a.call_r(Gpr::Rax);
    a.alu_ri(AluOp::Add, true, Gpr::Rsp, 8);
    a.pop(Gpr::Rdx);
    a.pop(Gpr::Rax);
    a.ret();
    a.bind(untraced);
    let mut code = a.finish().map_err(crate::jit::JitError::from)?;
    // jmp rel32 to the body (the stub is within ±2 GiB of the site).
    let from = at + code.len() + 5;
    let rel = i32::try_from(body as i64 - from as i64)
        .map_err(|_| AttachError::Image("a native stub out of its site's reach"))?;
    code.push(0xe9);
    code.extend_from_slice(&rel.to_le_bytes());
    if code.len() > PAGE {
        return Err(AttachError::Image("a native stub larger than its page"));
    }
    Ok(code)
}

/// The stub's code at `at`, for `record`, falling through to `body` when there is no image.
#[cfg(target_arch = "aarch64")]
fn stub_code(at: usize, record: u64, body: usize) -> Result<Vec<u8>, AttachError> {
    use crate::jit::arm64::enc::{self, FP, Gpr, LR, LdSt, PairMode, SP, X0};
    let bad = || AttachError::Image("a native stub instruction does not encode");
    let x = Gpr::new;
    let x16 = x(16);
    let mut w: Vec<u32> = Vec::new();
    // Entered by the site's `b`: x30 is the caller's return address.
    w.push(enc::stp(PairMode::Pre, FP, LR, SP, -96).ok_or_else(bad)?);
    w.push(enc::mov_sp(FP, SP));
    let save = |w: &mut Vec<u32>, load: bool| -> Result<(), AttachError> {
        for (i, pair) in [(0, 1), (2, 3), (4, 5), (6, 7)].iter().enumerate() {
            let off = 16 + 16 * i as i64;
            let insn = if load {
                enc::ldp(PairMode::Offset, x(pair.0), x(pair.1), SP, off)
            } else {
                enc::stp(PairMode::Offset, x(pair.0), x(pair.1), SP, off)
            };
            w.push(insn.ok_or_else(bad)?);
        }
        let op = if load { LdSt::Ldr } else { LdSt::Str };
        w.push(enc::ldst_uimm(op, crate::isa::Size::DW, x(8), SP, 80).ok_or_else(bad)?);
        Ok(())
    };
    save(&mut w, false)?;
    w.extend(enc::mov_imm(true, X0, record));
    w.extend(enc::mov_imm(
        true,
        x16,
        native_stub_enter as *const () as u64,
    ));
    w.push(enc::blr(x16));
    w.push(enc::mov_reg(true, x16, X0));
    save(&mut w, true)?;
    let cbz_at = w.len();
    w.push(enc::NOP); // cbz x16, untraced (fixed below)
    w.push(enc::ldst_uimm(LdSt::Str, crate::isa::Size::DW, x16, SP, 88).ok_or_else(bad)?);
    w.push(enc::blr(x16));
    w.push(enc::stp(PairMode::Offset, X0, x(1), SP, 16).ok_or_else(bad)?);
    w.push(enc::ldst_uimm(LdSt::Ldr, crate::isa::Size::DW, X0, SP, 88).ok_or_else(bad)?);
    w.extend(enc::mov_imm(
        true,
        x16,
        native_stub_exit as *const () as u64,
    ));
    w.push(enc::blr(x16));
    w.push(enc::ldp(PairMode::Offset, X0, x(1), SP, 16).ok_or_else(bad)?);
    w.push(enc::ldp(PairMode::Post, FP, LR, SP, 96).ok_or_else(bad)?);
    w.push(enc::ret(LR));
    let untraced = w.len();
    w[cbz_at] = enc::cbz(true, x16, 4 * (untraced - cbz_at) as i64).ok_or_else(bad)?;
    w.push(enc::ldp(PairMode::Post, FP, LR, SP, 96).ok_or_else(bad)?);
    // b body: the stub is within the site's ±128 MiB.
    let from = at + 4 * w.len();
    w.push(enc::b(body as i64 - from as i64).ok_or_else(bad)?);
    Ok(w.iter().flat_map(|w| w.to_le_bytes()).collect())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn stub_code(_at: usize, _record: u64, _body: usize) -> Result<Vec<u8>, AttachError> {
    Err(AttachError::UnsupportedHost(std::env::consts::ARCH))
}
