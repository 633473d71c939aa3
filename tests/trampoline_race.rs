//! Deterministic races of image retirement (its own test binary: it installs global hooks).
//!
//! 1. A thread has taken the branch into a trampoline image but not yet its reference; the image
//!    is retired. It must stay allocated until the thread goes on, and the thread must finish with
//!    the right result.
//! 2. A thread holds the reference and is blocked (quiescent) in a helper inside the original: the
//!    grace period passes, but the reference keeps the image alive until the helper returns.
//! 3. and 4. The same two in an fentry-only image (blocked in the fentry program's helper).
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

#[path = "common/retire.rs"]
mod retire;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::reclaim::{self, RetireState};
use livebpf::trampoline::{AttachKind, Prog, attach, live_images, set_enter_hook};

fn load(src: &str, helpers: &Helpers) -> Prog {
    let program = assemble_program(src).unwrap();
    Prog::load(&program, helpers, JitOptions::checked()).unwrap()
}

thread_local! {
    static HOLD_ME: Cell<bool> = const { Cell::new(false) };
}
static HELD_IMAGE: AtomicUsize = AtomicUsize::new(0);
static RELEASE_ENTRY: AtomicBool = AtomicBool::new(false);

fn hold_before_reference(image: usize) {
    if HOLD_ME.with(|h| h.replace(false)) {
        HELD_IMAGE.store(image, Ordering::SeqCst);
        while !RELEASE_ENTRY.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    }
}

static HELPER_ENTERED: AtomicBool = AtomicBool::new(false);
static RELEASE_HELPER: AtomicBool = AtomicBool::new(false);

extern "C" fn block_quiescent(r1: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: this helper is called by the traced original, whose trampoline image holds the
    // reference that keeps the code this thread returns into alive.
    unsafe {
        reclaim::blocking(|| {
            HELPER_ENTERED.store(true, Ordering::SeqCst);
            while !RELEASE_HELPER.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        })
    };
    r1
}

/// A runner of `target` (attached `kind` by `tracer`) is held between the branch into the image
/// and the image's reference; the link is detached meanwhile. The image must stay through grace
/// period 1 until the runner goes on, which must then finish with 42 (it calls with 20, 22).
fn held_before_reference(kind: AttachKind, target: &Prog, tracer: &Prog, baseline: usize) {
    retire::clear();
    HELD_IMAGE.store(0, Ordering::SeqCst);
    RELEASE_ENTRY.store(false, Ordering::SeqCst);
    let link = attach(kind, target, tracer, 0).unwrap();
    let image = target.trampoline_image().unwrap();
    let runner = {
        let target = target.clone();
        std::thread::spawn(move || {
            HOLD_ME.with(|h| h.set(true));
            target.call([20, 22, 0, 0, 0])
        })
    };
    while HELD_IMAGE.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    assert_eq!(HELD_IMAGE.load(Ordering::SeqCst), image);
    link.detach().unwrap();
    assert_eq!(live_images(), baseline + 1);
    retire::assert_stays_retired(image, baseline + 1, RetireState::Gp1);
    RELEASE_ENTRY.store(true, Ordering::SeqCst);
    assert_eq!(runner.join().unwrap(), Ok(42));
    finished(image, baseline);
}

/// A runner of `target` (attached `kind` by `tracer`) with `args` holds the image's reference and
/// is blocked, quiescent, in helper 13 (`block_quiescent`); the link is detached meanwhile.
/// Grace period 1 passes, the reference keeps the image until the helper returns, and the run
/// ends with 42.
fn blocked_in_helper(
    kind: AttachKind,
    target: &Prog,
    tracer: &Prog,
    args: [u64; 5],
    baseline: usize,
) {
    retire::clear();
    HELPER_ENTERED.store(false, Ordering::SeqCst);
    RELEASE_HELPER.store(false, Ordering::SeqCst);
    let link = attach(kind, target, tracer, 0).unwrap();
    let image = target.trampoline_image().unwrap();
    let runner = {
        let target = target.clone();
        std::thread::spawn(move || target.call(args))
    };
    while !HELPER_ENTERED.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    link.detach().unwrap();
    // Grace period 1 completes (the thread is quiescent), the reference holds the image.
    retire::wait_for_state(image, RetireState::Draining, "grace period 1 never ended");
    retire::assert_stays_retired(image, baseline + 1, RetireState::Draining);
    RELEASE_HELPER.store(true, Ordering::SeqCst);
    assert_eq!(runner.join().unwrap(), Ok(42));
    finished(image, baseline);
}

/// After a scenario: the image is freed, having gone through the three steps in order.
fn finished(image: usize, baseline: usize) {
    reclaim::flush().expect("flush outside a run");
    assert_eq!(live_images(), baseline);
    assert_eq!(
        retire::states_of(image),
        [RetireState::Gp1, RetireState::Draining, RetireState::Gp2]
    );
}

/// The scenarios in one test: they share the process-wide hook and observer.
#[test]
fn retired_images_outlive_every_thread_that_can_be_inside() {
    reclaim::set_observer(Some(retire::observe));
    set_enter_hook(Some(hold_before_reference));
    let tracer = load("mov %r0, 0\nexit", &Helpers::new());
    let adder = load("mov %r0, %r1\nadd %r0, %r2\nexit", &Helpers::new());
    let mut helpers = Helpers::new();
    helpers.register(13, block_quiescent);
    let baseline = live_images();

    // 1: held between the branch and the reference.
    held_before_reference(AttachKind::Fexit, &adder, &tracer, baseline);
    // 2: blocked in a helper inside the original, holding the reference.
    let blocking_target = load("call 13\nadd %r0, 1\nexit", &helpers);
    blocked_in_helper(
        AttachKind::Fexit,
        &blocking_target,
        &tracer,
        [41, 0, 0, 0, 0],
        baseline,
    );
    // 3 and 4, in an fentry-only image (which returns into the body rather than calling it):
    // held before the reference; blocked in a helper of the fentry program.
    held_before_reference(AttachKind::Fentry, &adder, &tracer, baseline);
    let blocking_tracer = load("mov %r1, 7\ncall 13\nmov %r0, 0\nexit", &helpers);
    blocked_in_helper(
        AttachKind::Fentry,
        &adder,
        &blocking_tracer,
        [40, 2, 0, 0, 0],
        baseline,
    );
    set_enter_hook(None);
    reclaim::set_observer(None);
}
