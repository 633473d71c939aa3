//! Retirement faults found by review: each test failed before its fix.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use std::sync::mpsc;
use std::time::Duration;

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, Prog, attach, live_images};

fn load(src: &str) -> Prog {
    let program = assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Prog::load(&program, &Helpers::new(), JitOptions::checked()).unwrap()
}

/// Runs `f` on another thread and fails the test if it does not return within `secs`.
fn within<R: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

#[test]
fn a_freplace_detach_does_not_wedge_later_retirements() {
    let target = load("mov %r0, %r1\nadd %r0, %r2\nexit");
    let replacement = load("mov %r0, 99\nexit");
    let link = attach(AttachKind::Freplace, &target, &replacement, 0).unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(99));
    link.detach().unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    within(30, "flush after a freplace detach", reclaim::flush).unwrap();

    // A trampoline retired afterwards is freed too.
    let tracer = load("mov %r0, 0\nexit");
    let link = attach(AttachKind::Fentry, &target, &tracer, 0).unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    let image = target.trampoline_image().unwrap();
    link.detach().unwrap();
    within(30, "flush after an fentry detach", reclaim::flush).unwrap();
    assert!(
        !reclaim::pending_retirements()
            .iter()
            .any(|p| p.image == Some(image)),
        "the fentry image is still pending"
    );
    let _ = live_images();
}

static HELPER_ENTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn block_until_released(r1: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    use std::sync::atomic::Ordering::SeqCst;
    // SAFETY: called by the traced original, whose trampoline image holds the reference that
    // keeps the code this thread returns into alive.
    unsafe {
        reclaim::blocking(|| {
            HELPER_ENTERED.store(true, SeqCst);
            while !RELEASE.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    r1
}

#[test]
fn a_stuck_drain_holds_up_no_other_retirement() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut helpers = Helpers::new();
    helpers.register(30, block_until_released);
    let program = assemble_program("call 30\nexit").unwrap();
    let blocked = Prog::load(&program, &helpers, JitOptions::checked()).unwrap();
    let tracer = load("mov %r0, 0\nexit");
    // fexit: the image calls the original, so it holds its reference while the original blocks.
    let link = attach(AttachKind::Fexit, &blocked, &tracer, 0).unwrap();
    let held_image = blocked.trampoline_image().unwrap();
    let runner = {
        let blocked = blocked.clone();
        std::thread::spawn(move || blocked.call([5, 0, 0, 0, 0]))
    };
    while !HELPER_ENTERED.load(SeqCst) {
        std::thread::yield_now();
    }
    // The runner is inside `held_image` (blocked in the original): its retirement cannot end.
    link.detach().unwrap();

    let other = load("mov %r0, %r1\nexit");
    let link = attach(AttachKind::Fexit, &other, &tracer, 0).unwrap();
    assert_eq!(other.call([9, 0, 0, 0, 0]), Ok(9));
    let free_image = other.trampoline_image().unwrap();
    link.detach().unwrap();
    let pending_of = |image| {
        reclaim::pending_retirements()
            .into_iter()
            .find(|p| p.image == Some(image))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pending_of(free_image).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "an independent retirement waited for a stuck drain"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        pending_of(held_image).map(|p| p.state),
        Some(reclaim::RetireState::Draining),
        "the held image must wait for its reference"
    );
    RELEASE.store(true, SeqCst);
    assert_eq!(runner.join().unwrap(), Ok(5));
    within(30, "flush after the release", reclaim::flush).unwrap();
}
