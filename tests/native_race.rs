//! Deterministic races of retiring a native function's trampoline image (its own test binary:
//! it installs the process-wide enter hook and retirement observer). A native caller is in no
//! livebpf run, so the only thing between the site's jump and the image is the site's entry
//! stub; these hold a caller at each point of that path while the image is retired.
//!
//! 1. Held after the stub read which image to enter, before its reference: the image must stay
//!    allocated until the caller goes on, and the call must run the image (its fentry; a
//!    retired image skips its fexit programs, as in Linux) and return the right value.
//! 2. Held at the stub's entry, before its read-side section: nothing waits for it, the image is
//!    freed while it is held, and it then runs the function untraced — the stub, never freed, is
//!    all it executes.
//! 3. Blocked inside the function's body, holding the reference: grace period 1 passes (the body
//!    runs outside the section), and the reference keeps the image until the body returns.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

#[path = "common/retire.rs"]
mod retire;

#[path = "common/native.rs"]
mod native_lib;

use native_lib::call2;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::native::NativeSite;
use livebpf::reclaim::{self, RetireState};
use livebpf::trampoline::{AttachKind, Prog, attach_native, live_images, set_enter_hook};

const SOURCE: &str = r#"
long nr_add(long a, long b) { return a + b; }
long nr_block(long (*wait)(long), long x) { return wait(x) + 1; }
"#;

#[derive(Clone, Copy, PartialEq)]
enum Hold {
    No,
    /// At the stub's entry (the hook's image is 0).
    StubEntry,
    /// After the stub read a non-zero image, before the reference.
    BeforeReference,
}

thread_local! {
    static HOLD_ME: Cell<Hold> = const { Cell::new(Hold::No) };
}
static HELD: AtomicUsize = AtomicUsize::new(usize::MAX);
static RELEASE: AtomicBool = AtomicBool::new(false);

fn hold(image: usize) {
    let at = HOLD_ME.with(Cell::get);
    let here = match at {
        Hold::StubEntry => image == 0,
        Hold::BeforeReference => image != 0,
        Hold::No => false,
    };
    if here {
        HOLD_ME.with(|h| h.set(Hold::No));
        HELD.store(image, Ordering::SeqCst);
        while !RELEASE.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    }
}

fn wait_held() -> usize {
    loop {
        let h = HELD.load(Ordering::SeqCst);
        if h != usize::MAX {
            return h;
        }
        std::thread::yield_now();
    }
}

/// Before each scenario (an image's address may be reused by the next).
fn reset() {
    retire::clear();
    HELD.store(usize::MAX, Ordering::SeqCst);
    RELEASE.store(false, Ordering::SeqCst);
}

static RUNS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_run(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    0
}

static IN_BODY: AtomicBool = AtomicBool::new(false);

/// Called by `nr_block`'s body: blocks until released.
extern "C" fn wait_in_body(x: i64) -> i64 {
    IN_BODY.store(true, Ordering::SeqCst);
    while !RELEASE.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    x
}

/// All three in one test: they share the process-wide hook and observer.
#[test]
fn retired_native_images_outlive_every_caller_that_can_be_inside() {
    let Some(lib) = native_lib::build("native_race", SOURCE, native_lib::CC) else {
        return;
    };
    reclaim::set_observer(Some(retire::observe));
    set_enter_hook(Some(hold));
    let mut helpers = Helpers::new();
    helpers.register(1000, count_run);
    let tracer = Prog::load(
        &assemble_program("call 1000\nmov %r0, 0\nexit").unwrap(),
        &helpers,
        JitOptions::checked(),
    )
    .unwrap();
    let add = lib.sym("nr_add");
    let site = NativeSite::at(add).unwrap();
    let baseline = live_images();

    // 1. Between the record's load and the reference.
    // SAFETY (every attach_native here): integer functions; the library stays loaded.
    let link = unsafe { attach_native(AttachKind::Fentry, &site, &tracer, 0) }.unwrap();
    let image = link.image().unwrap();
    let runs = RUNS.load(Ordering::SeqCst);
    reset();
    let caller = std::thread::spawn(move || {
        HOLD_ME.with(|h| h.set(Hold::BeforeReference));
        call2(add, 20, 22)
    });
    assert_eq!(wait_held(), image);
    link.detach().unwrap();
    assert_eq!(live_images(), baseline + 1);
    retire::assert_stays_retired(image, baseline + 1, RetireState::Gp1);
    RELEASE.store(true, Ordering::SeqCst);
    assert_eq!(caller.join().unwrap(), 42);
    assert_eq!(
        RUNS.load(Ordering::SeqCst),
        runs + 1,
        "the held call ran the old image"
    );
    reclaim::flush().unwrap();
    assert_eq!(live_images(), baseline);
    assert_eq!(
        retire::states_of(image),
        [RetireState::Gp1, RetireState::Draining, RetireState::Gp2]
    );

    // 2. At the stub's entry, before the section: the image need not wait, and is not entered.
    let link = unsafe { attach_native(AttachKind::Fentry, &site, &tracer, 0) }.unwrap();
    let image = link.image().unwrap();
    let runs = RUNS.load(Ordering::SeqCst);
    reset();
    let caller = std::thread::spawn(move || {
        HOLD_ME.with(|h| h.set(Hold::StubEntry));
        call2(add, 40, 2)
    });
    assert_eq!(wait_held(), 0);
    link.detach().unwrap();
    reclaim::flush().unwrap();
    assert_eq!(
        live_images(),
        baseline,
        "freed while the caller is held in the stub"
    );
    assert_eq!(
        retire::states_of(image),
        [RetireState::Gp1, RetireState::Draining, RetireState::Gp2]
    );
    RELEASE.store(true, Ordering::SeqCst);
    assert_eq!(caller.join().unwrap(), 42);
    assert_eq!(RUNS.load(Ordering::SeqCst), runs, "the caller ran untraced");

    // 3. Blocked in the body, holding the reference.
    set_enter_hook(None);
    let block = lib.sym("nr_block");
    let site = NativeSite::at(block).unwrap();
    let link = unsafe { attach_native(AttachKind::Fexit, &site, &tracer, 0) }.unwrap();
    let image = link.image().unwrap();
    reset();
    let caller = std::thread::spawn(move || call2(block, wait_in_body as *const () as i64, 41));
    while !IN_BODY.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    link.detach().unwrap();
    retire::wait_for_state(
        image,
        RetireState::Draining,
        "grace period 1 waited for a caller inside the body",
    );
    retire::assert_stays_retired(image, baseline + 1, RetireState::Draining);
    RELEASE.store(true, Ordering::SeqCst);
    assert_eq!(caller.join().unwrap(), 42);
    reclaim::flush().unwrap();
    assert_eq!(live_images(), baseline);
    reclaim::set_observer(None);
}
