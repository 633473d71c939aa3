//! Attach rules and failure paths found by review: each test failed before its fix.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::trampoline::{AttachError, AttachKind, Prog, attach};

fn load(src: &str) -> Prog {
    let program = assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Prog::load(&program, &Helpers::new(), JitOptions::checked()).unwrap()
}

fn adder() -> Prog {
    load("mov %r0, %r1\nadd %r0, %r2\nexit")
}

#[test]
fn freplace_cycles_and_chains_are_refused() {
    let (a, b) = (adder(), load("mov %r0, 7\nexit"));
    let link = attach(AttachKind::Freplace, &a, &b, 0).unwrap();
    // B -> A would make a run of A loop forever.
    let err = attach(AttachKind::Freplace, &b, &a, 0).unwrap_err();
    assert!(matches!(err, AttachError::Recursive(_)), "{err}");
    // Replacing the replacement (a chain) is refused as in Linux, and so is using a
    // replacement twice.
    let c = load("mov %r0, 8\nexit");
    let err = attach(AttachKind::Freplace, &b, &c, 0).unwrap_err();
    assert!(matches!(err, AttachError::Recursive(_)), "{err}");
    let d = adder();
    let err = attach(AttachKind::Freplace, &d, &b, 0).unwrap_err();
    assert!(matches!(err, AttachError::Recursive(_)), "{err}");
    assert_eq!(a.call([1, 2, 0, 0, 0]), Ok(7));
    assert_eq!(b.call([1, 2, 0, 0, 0]), Ok(7));
    link.detach().unwrap();
    assert_eq!(a.call([1, 2, 0, 0, 0]), Ok(3));
    // Once detached, the former replacement is an ordinary program again.
    let link = attach(AttachKind::Freplace, &d, &b, 0).unwrap();
    assert_eq!(d.call([1, 2, 0, 0, 0]), Ok(7));
    link.detach().unwrap();
}

#[test]
fn a_replacement_that_is_a_target_is_refused() {
    let (a, b, tracer) = (adder(), adder(), load("mov %r0, 0\nexit"));
    let fentry = attach(AttachKind::Fentry, &b, &tracer, 0).unwrap();
    let err = attach(AttachKind::Freplace, &a, &b, 0).unwrap_err();
    assert!(matches!(err, AttachError::Recursive(_)), "{err}");
    drop(fentry);
    attach(AttachKind::Freplace, &a, &b, 0)
        .unwrap()
        .detach()
        .unwrap();
}

thread_local! {
    static RUN_AT_EXIT: RunAtExit = const { RunAtExit(std::cell::Cell::new(None)) };
}

/// Runs the traced target from a thread-local destructor.
struct RunAtExit(std::cell::Cell<Option<(Prog, std::sync::mpsc::Sender<u64>)>>);

impl Drop for RunAtExit {
    fn drop(&mut self) {
        if let Some((prog, tx)) = self.0.take() {
            let _ = tx.send(prog.call([40, 2, 0, 0, 0]).unwrap_or(u64::MAX));
        }
    }
}

#[test]
fn a_program_runs_from_a_thread_local_destructor() {
    let target = adder();
    let tracer = load("mov %r0, 0\nexit");
    let _link = attach(AttachKind::Fentry, &target, &tracer, 0).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = target.clone();
    std::thread::spawn(move || {
        // Ours is registered first, so it is destroyed after the runtime's own thread-locals,
        // which the first run creates.
        RUN_AT_EXIT.with(|_| {});
        assert_eq!(t.call([1, 1, 0, 0, 0]), Ok(2));
        RUN_AT_EXIT.with(|r| r.0.set(Some((t, tx))));
    })
    .join()
    .expect("running a program from a thread-local destructor must not panic");
    assert_eq!(rx.recv().unwrap(), 42);
}

#[test]
fn only_recorded_patch_sites_can_be_poked() {
    use livebpf::text::poke::{PatchSite, PokeError, PokeInsn, text_poke};
    let target = adder();
    let site = target.jit().patch_site();
    assert_eq!(PatchSite::at(site.ip()), Ok(site));
    let inside = site.ip() + 4;
    assert!(matches!(
        PatchSite::at(inside),
        Err(PokeError::NotASite { .. })
    ));
    // The entry is not taken to mean the site (on arm64 the site follows `[bti jc] mov x9, x30`).
    if target.jit().patch_site_offset() != 0 {
        assert!(matches!(
            PatchSite::at(target.jit().entry()),
            Err(PokeError::NotASite { .. })
        ));
    }
    // SAFETY: refused before anything is written (the point of the test).
    let refused = unsafe { text_poke(inside, PokeInsn::Nop, PokeInsn::Jump(inside + 4)) };
    assert!(
        matches!(refused, Err(PokeError::NotASite { .. })),
        "{refused:?}"
    );
    assert_eq!(target.call([40, 2, 0, 0, 0]), Ok(42));
    // A trampoline image's start is not a site either; its sites go with it.
    let tracer = load("mov %r0, 0\nexit");
    let link = attach(AttachKind::Fexit, &target, &tracer, 0).unwrap();
    let image = target.trampoline_image().unwrap();
    assert!(matches!(
        PatchSite::at(image),
        Err(PokeError::NotASite { .. })
    ));
    link.detach().unwrap();
}

#[test]
fn a_failed_detach_hands_the_link_back_still_attached() {
    use livebpf::text::poke::{PokeInsn, text_poke};
    let target = adder();
    let (t1, t2) = (load("mov %r0, 0\nexit"), load("mov %r0, 0\nexit"));
    let first = attach(AttachKind::Fentry, &target, &t1, 0).unwrap();
    let _second = attach(AttachKind::Fentry, &target, &t2, 0).unwrap();
    let image = target.trampoline_image().unwrap();
    let site = target.jit().patch_site().ip();
    let to_image = if cfg!(target_arch = "x86_64") {
        PokeInsn::Jump(image)
    } else {
        PokeInsn::Call(image)
    };
    // Someone else rewrote the site behind the trampoline layer's back: the detach's poke finds
    // a mismatch and must change nothing.
    // SAFETY: the nop is always a valid state of a program's site.
    unsafe { text_poke(site, to_image, PokeInsn::Nop) }.unwrap();
    let err = first.detach().unwrap_err();
    assert!(matches!(err.error, AttachError::Poke(_)), "{}", err.error);
    assert_eq!(target.link_count(), 2, "the failed detach lost its entry");
    // SAFETY: back to the image the trampoline layer published, which is still alive.
    unsafe { text_poke(site, PokeInsn::Nop, to_image) }.unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    // The link handed back detaches normally.
    err.link.detach().unwrap();
    assert_eq!(target.link_count(), 1);
}
