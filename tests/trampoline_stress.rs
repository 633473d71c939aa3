//! Attach/detach cycles while runner threads call the target (its own binary, so the live-image
//! count belongs to this test alone).
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, Prog, attach, live_images};

static FENTRY: AtomicU64 = AtomicU64::new(0);
static FEXIT: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_fentry(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    FENTRY.fetch_add(1, Ordering::Relaxed);
    0
}

extern "C" fn count_fexit(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    FEXIT.fetch_add(1, Ordering::Relaxed);
    0
}

fn load(src: &str, helpers: &Helpers) -> Prog {
    Prog::load(
        &assemble_program(src).unwrap(),
        helpers,
        JitOptions::checked(),
    )
    .unwrap()
}

#[test]
fn twenty_thousand_cycles_under_four_runners() {
    const CYCLES: u64 = 20_000;
    const RUNNERS: u64 = 4;
    let baseline = live_images();
    let target = load(
        "mov %r0, %r1\nmul %r0, 3\nadd %r0, %r2\nexit",
        &Helpers::new(),
    );
    let mut helpers = Helpers::new();
    helpers.register(20, count_fentry).register(21, count_fexit);
    let fentry = load("call 20\nmov %r0, 0\nexit", &helpers);
    let fexit = load("call 21\nmov %r0, 0\nexit", &helpers);
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let runners: Vec<_> = (0..RUNNERS)
        .map(|t| {
            let (target, stop, wrong) = (target.clone(), stop.clone(), wrong.clone());
            std::thread::spawn(move || {
                let mut runs = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (a, b) = (runs, t);
                    if target.call([a, b, 0, 0, 0]) != Ok(a.wrapping_mul(3).wrapping_add(b)) {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    let mut main_runs = 0u64;
    for i in 0..CYCLES {
        let kinds: &[(AttachKind, &Prog)] = match i % 3 {
            0 => &[(AttachKind::Fentry, &fentry)],
            1 => &[(AttachKind::Fexit, &fexit)],
            _ => &[(AttachKind::Fentry, &fentry), (AttachKind::Fexit, &fexit)],
        };
        let links: Vec<_> = kinds
            .iter()
            .map(|(kind, prog)| attach(*kind, &target, prog, i).unwrap())
            .collect();
        // While attached, a run on this thread must go through every tracer.
        let (before_entry, before_exit) = (
            FENTRY.load(Ordering::Relaxed),
            FEXIT.load(Ordering::Relaxed),
        );
        assert_eq!(target.call([i, 1, 0, 0, 0]), Ok(i * 3 + 1));
        main_runs += 1;
        for (kind, _) in kinds {
            let counter = if *kind == AttachKind::Fentry {
                &FENTRY
            } else {
                &FEXIT
            };
            let before = if *kind == AttachKind::Fentry {
                before_entry
            } else {
                before_exit
            };
            assert!(
                counter.load(Ordering::Relaxed) > before,
                "cycle {i}: {kind:?} did not run"
            );
        }
        drop(links);
    }
    stop.store(true, Ordering::Relaxed);
    let runner_runs: u64 = runners.into_iter().map(|r| r.join().unwrap()).sum();
    let runs = runner_runs + main_runs;
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "runs with a wrong result");
    let (entries, exits) = (
        FENTRY.load(Ordering::Relaxed),
        FEXIT.load(Ordering::Relaxed),
    );
    assert!(
        entries >= CYCLES * 2 / 3 && entries <= runs,
        "fentry ran {entries} times in {runs} runs"
    );
    assert!(
        exits >= CYCLES * 2 / 3 && exits <= runs,
        "fexit ran {exits} times in {runs} runs"
    );
    // Detached: no tracer runs any more.
    target.call([1, 1, 0, 0, 0]).unwrap();
    assert_eq!(FENTRY.load(Ordering::Relaxed), entries);
    assert_eq!(FEXIT.load(Ordering::Relaxed), exits);
    reclaim::flush().expect("flush outside a run");
    assert_eq!(live_images(), baseline, "retired images were not all freed");
    println!(
        "stress: {CYCLES} cycles, {RUNNERS} runners, {runs} runs, fentry={entries} fexit={exits}, live_images={}",
        live_images()
    );
}
