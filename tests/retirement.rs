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
