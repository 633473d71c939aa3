//! `fork`: the child gets its own copy of the JIT text; neither process affects the other.
//! One test in its own binary, so no other test thread is running when it forks.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, Prog, attach, live_images};

static PARENT_TRACER: AtomicU64 = AtomicU64::new(0);
static CHILD_TRACER: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_parent(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    PARENT_TRACER.fetch_add(1, Ordering::Relaxed);
    0
}

extern "C" fn count_child(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    CHILD_TRACER.fetch_add(1, Ordering::Relaxed);
    0
}

fn load(src: &str, helpers: &Helpers) -> Prog {
    let program = assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Prog::load(&program, helpers, JitOptions::checked()).unwrap()
}

fn tracer(f: extern "C" fn(u64, u64, u64, u64, u64) -> u64) -> Prog {
    let mut helpers = Helpers::new();
    helpers.register(20, f);
    load("call 20\nmov %r0, 0\nexit", &helpers)
}

/// Whether this runs under qemu-user, whose emulation aborts when a forked child of a
/// multi-threaded process starts a thread (an assertion in its vCPU setup).
fn under_qemu() -> bool {
    livebpf::text::CodeArena::global().is_ok_and(|a| a.stale_alias_detected())
}

/// What the child checks; returns the exit code (0: all good).
fn child_main(target: &Prog, parent_link_tracer_count: u64) -> i32 {
    // Inherited programs and trampolines still work...
    if target.call([40, 2, 0, 0, 0]) != Ok(42) {
        return 10;
    }
    // ...and the parent's fentry is still attached here, in the child's own copy.
    if PARENT_TRACER.load(Ordering::Relaxed) != parent_link_tracer_count + 1 {
        return 11;
    }
    // New programs can be compiled in the child too.
    let fresh = load("mov %r0, 5\nexit", &Helpers::new());
    if fresh.call([0; 5]) != Ok(5) {
        return 17;
    }
    if under_qemu() {
        // Retiring needs the reclaimer thread, which qemu-user cannot start in this child.
        return 0;
    }
    // The child attaches, runs and detaches on its own copy while the parent keeps patching
    // the same addresses in its own.
    let mine = tracer(count_child);
    for i in 0..200u64 {
        let link = match attach(AttachKind::Fentry, target, &mine, 0) {
            Ok(link) => link,
            Err(_) => return 12,
        };
        for j in 0..50 {
            if target.call([i, j, 0, 0, 0]) != Ok(i + j) {
                return 13;
            }
        }
        if link.detach().is_err() {
            return 14;
        }
    }
    if CHILD_TRACER.load(Ordering::Relaxed) != 200 * 50 {
        return 15;
    }
    if reclaim::flush().is_err() {
        return 16;
    }
    0
}

#[test]
fn a_forked_child_has_its_own_text_and_the_parent_is_unaffected() {
    let target = load("mov %r0, %r1\nadd %r0, %r2\nexit", &Helpers::new());
    let parents = tracer(count_parent);
    let link = attach(AttachKind::Fentry, &target, &parents, 0).unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    let before = PARENT_TRACER.load(Ordering::Relaxed);

    // While the child runs, the parent attaches and detaches a second tracer on the same
    // target as fast as it can: with shared text, its pokes would land in the child's code.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (target, stop) = (target.clone(), stop.clone());
        let other = load("mov %r0, 0\nexit", &Helpers::new());
        std::thread::spawn(move || {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let l = attach(AttachKind::Fexit, &target, &other, 0).unwrap();
                l.detach().unwrap();
                cycles += 1;
            }
            cycles
        })
    };
    // SAFETY: the child only runs code that is safe after fork in a multi-threaded process
    // under glibc (no locks another thread could hold: livebpf's are handled by its atfork
    // handlers), then `_exit`s without running destructors or atexit handlers.
    if under_qemu() {
        eprintln!(
            "!! qemu-user: the forked child skips attach/detach (qemu cannot start threads there)"
        );
    }
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // A panic must not unwind into the test harness's copy in the child.
        let code =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child_main(&target, before)))
                .unwrap_or(50);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    stop.store(true, Ordering::Relaxed);
    let cycles = churn.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status:#x} (exit code {}, signal {})",
        libc::WEXITSTATUS(status),
        libc::WTERMSIG(status)
    );
    assert!(cycles > 0);

    // The parent: its tracer saw only its own calls, the child never touched its text.
    assert_eq!(target.call([20, 22, 0, 0, 0]), Ok(42));
    assert_eq!(PARENT_TRACER.load(Ordering::Relaxed), before + 1);
    assert_eq!(CHILD_TRACER.load(Ordering::Relaxed), 0);
    link.detach().unwrap();
    reclaim::flush().unwrap();
    assert_eq!(live_images(), 0);
}
