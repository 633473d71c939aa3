//! fentry / fexit / fmod_ret / freplace attached to running programs.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use livebpf::asm::assemble_program;
use livebpf::exec::{Access, ExecError};
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::trampoline::{
    AttachError, AttachKind, MAX_TRAMP_LINKS, Prog, attach, set_stats_enabled,
};

fn load(src: &str, helpers: &Helpers) -> Prog {
    let program = assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Prog::load(&program, helpers, JitOptions::checked()).unwrap()
}

/// The target: r0 = r1 + r2.
fn adder() -> Prog {
    load("mov %r0, %r1\nadd %r0, %r2\nexit", &Helpers::new())
}

/// Records what a tracer saw, per test (each test owns one recorder id).
struct Seen {
    arg0: AtomicU64,
    arg1: AtomicU64,
    retval: AtomicU64,
    cookie: AtomicU64,
    calls: AtomicU64,
}

impl Seen {
    const fn new() -> Seen {
        Seen {
            arg0: AtomicU64::new(0),
            arg1: AtomicU64::new(0),
            retval: AtomicU64::new(0),
            cookie: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    fn record(&self, a: u64, b: u64, ret: u64, cookie: u64) {
        self.arg0.store(a, Ordering::SeqCst);
        self.arg1.store(b, Ordering::SeqCst);
        self.retval.store(ret, Ordering::SeqCst);
        self.cookie.store(cookie, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

static SEEN: [Seen; 5] = [const { Seen::new() }; 5];

extern "C" fn record(which: u64, a: u64, b: u64, ret: u64, cookie: u64) -> u64 {
    SEEN[which as usize].record(a, b, ret, cookie);
    0
}

/// A tracer that reports ctx[0], ctx[1], ctx[5] (the return value) and its cookie to SEEN[which],
/// then returns `result`.
fn recorder(which: usize, result: i32) -> Prog {
    let mut helpers = Helpers::new();
    helpers.register(10, record);
    let src = format!(
        "mov %r6, %r1\nmov %r7, %r2\nmov %r1, {which}\nldxdw %r2, [%r6+0]\nldxdw %r3, [%r6+8]\n\
         ldxdw %r4, [%r6+40]\nmov %r5, %r7\ncall 10\nmov %r0, {result}\nexit"
    );
    load(&src, &helpers)
}

#[test]
fn fentry_sees_arguments_and_cookie() {
    let target = adder();
    let tracer = recorder(0, 0);
    assert_eq!(target.call([3, 4, 0, 0, 0]), Ok(7));
    let link = attach(AttachKind::Fentry, &target, &tracer, 0xc00c1e).unwrap();
    assert_eq!(target.call([30, 12, 0, 0, 0]), Ok(42));
    let s = &SEEN[0];
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    assert_eq!(s.arg0.load(Ordering::SeqCst), 30);
    assert_eq!(s.arg1.load(Ordering::SeqCst), 12);
    assert_eq!(s.retval.load(Ordering::SeqCst), 0);
    assert_eq!(s.cookie.load(Ordering::SeqCst), 0xc00c1e);
    link.detach().unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    assert_eq!(s.calls.load(Ordering::SeqCst), 1, "detached tracer ran");
    assert!(target.trampoline_image().is_none());
}

#[test]
fn fexit_sees_the_return_value_and_fmod_ret_overrides() {
    let target = adder();
    let fexit = recorder(1, 0);
    let _fexit_link = attach(AttachKind::Fexit, &target, &fexit, 1).unwrap();
    assert_eq!(target.call([5, 6, 0, 0, 0]), Ok(11));
    let s = &SEEN[1];
    assert_eq!(s.retval.load(Ordering::SeqCst), 11);
    assert_eq!(s.arg0.load(Ordering::SeqCst), 5);

    // fmod_ret returning 0 lets the target run.
    let pass = recorder(2, 0);
    let pass_link = attach(AttachKind::FmodRet, &target, &pass, 2).unwrap();
    assert_eq!(target.call([1, 1, 0, 0, 0]), Ok(2));
    assert_eq!(s.retval.load(Ordering::SeqCst), 2);
    drop(pass_link);

    // Non-zero skips the target and becomes its return value; fexit still runs and sees it.
    let veto = recorder(3, 99);
    let veto_link = attach(AttachKind::FmodRet, &target, &veto, 3).unwrap();
    assert_eq!(target.call([1, 1, 0, 0, 0]), Ok(99));
    assert_eq!(s.retval.load(Ordering::SeqCst), 99);
    assert_eq!(SEEN[3].arg0.load(Ordering::SeqCst), 1);
    drop(veto_link);
    assert_eq!(target.call([2, 2, 0, 0, 0]), Ok(4));
}

#[test]
fn freplace_swaps_behaviour_and_restores_it() {
    let target = adder();
    let multiplier = load("mov %r0, %r1\nmul %r0, %r2\nexit", &Helpers::new());
    assert_eq!(target.call([6, 7, 0, 0, 0]), Ok(13));
    let link = attach(AttachKind::Freplace, &target, &multiplier, 0).unwrap();
    assert_eq!(target.call([6, 7, 0, 0, 0]), Ok(42));
    // freplace and the tracing kinds exclude each other.
    let tracer = recorder(0, 0);
    assert!(matches!(
        attach(AttachKind::Fentry, &target, &tracer, 0),
        Err(AttachError::Conflict { .. })
    ));
    assert!(matches!(
        attach(AttachKind::Freplace, &target, &tracer, 0),
        Err(AttachError::Conflict { .. })
    ));
    link.detach().unwrap();
    assert_eq!(target.call([6, 7, 0, 0, 0]), Ok(13));
    let fentry = attach(AttachKind::Fentry, &target, &tracer, 0).unwrap();
    assert!(matches!(
        attach(AttachKind::Freplace, &target, &multiplier, 0),
        Err(AttachError::Conflict { .. })
    ));
    drop(fentry);
    assert!(matches!(
        attach(AttachKind::Fentry, &target, &target, 0),
        Err(AttachError::SelfAttach)
    ));
}

#[test]
fn at_most_38_links_and_the_39th_leaves_the_image_alone() {
    let target = adder();
    let tracer = load("mov %r0, 0\nexit", &Helpers::new());
    let mut links = Vec::new();
    for i in 0..MAX_TRAMP_LINKS {
        let kind = [AttachKind::Fentry, AttachKind::Fexit, AttachKind::FmodRet][i % 3];
        links.push(attach(kind, &target, &tracer, i as u64).unwrap());
    }
    let image = target.trampoline_image();
    assert!(image.is_some());
    let err = attach(AttachKind::Fentry, &target, &tracer, 99).unwrap_err();
    assert!(
        matches!(err, AttachError::TooManyLinks { max: 38 }),
        "{err}"
    );
    assert_eq!(target.trampoline_image(), image);
    assert_eq!(target.link_count(), MAX_TRAMP_LINKS);
    assert_eq!(target.call([20, 22, 0, 0, 0]), Ok(42));
    links.clear();
    assert_eq!(target.link_count(), 0);
    assert_eq!(target.call([20, 22, 0, 0, 0]), Ok(42));
}

static RECURSION_TARGET: OnceLock<Prog> = OnceLock::new();

extern "C" fn run_target_again(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    RECURSION_TARGET
        .get()
        .map_or(u64::MAX, |t| t.call([100, 1, 0, 0, 0]).unwrap_or(u64::MAX))
}

#[test]
fn recursion_is_skipped_and_counted() {
    let target = RECURSION_TARGET.get_or_init(adder);
    let mut helpers = Helpers::new();
    helpers.register(11, run_target_again);
    // The tracer runs the target again, which would re-enter the tracer on this thread.
    let tracer = load("call 11\nmov %r0, 0\nexit", &helpers);
    let _link = attach(AttachKind::Fentry, target, &tracer, 0).unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    assert_eq!(tracer.stats().misses, 1);
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    assert_eq!(tracer.stats().misses, 2);
}

#[test]
fn stats_count_only_when_enabled() {
    static STATS: Mutex<()> = Mutex::new(());
    let _serial = STATS.lock().unwrap();
    let target = adder();
    let tracer = load("mov %r0, 0\nexit", &Helpers::new());
    let _link = attach(AttachKind::Fexit, &target, &tracer, 0).unwrap();
    set_stats_enabled(false);
    target.call([1, 1, 0, 0, 0]).unwrap();
    assert_eq!(tracer.stats().run_cnt, 0);
    set_stats_enabled(true);
    for _ in 0..5 {
        target.call([1, 1, 0, 0, 0]).unwrap();
    }
    set_stats_enabled(false);
    target.call([1, 1, 0, 0, 0]).unwrap();
    let stats = tracer.stats();
    assert_eq!(stats.run_cnt, 5);
    assert!(stats.run_time_ns > 0);
    assert_eq!(target.stats().run_cnt, 5);
}

#[test]
fn tracer_errors_are_counted_not_propagated() {
    let target = adder();
    // Reads past the 48-byte context: an out-of-bounds load in checked mode.
    let bad = load("ldxdw %r0, [%r1+48]\nexit", &Helpers::new());
    let _link = attach(AttachKind::Fentry, &target, &bad, 0).unwrap();
    assert_eq!(target.call([2, 3, 0, 0, 0]), Ok(5));
    assert_eq!(bad.stats().errors, 1);
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn fail_if_checked(
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut livebpf::exec::HelperContext,
) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    if ctx.is_checked() {
        ctx.fail_helper("a checked tracer");
    }
    0
}

#[test]
fn tracers_get_their_own_run_context_in_context_helpers() {
    let target = adder();
    let mut h = Helpers::new();
    h.register_with_context(7, fail_if_checked);
    let program = assemble_program("call 7\nmov %r0, 0\nexit").unwrap();
    let checked = Prog::load(&program, &h, JitOptions::checked()).unwrap();
    // SAFETY: the tracer touches no memory.
    let trusted = Prog::load(&program, &h, unsafe { JitOptions::trusted() }).unwrap();
    let _links = [
        attach(AttachKind::Fentry, &target, &checked, 0).unwrap(),
        attach(AttachKind::Fentry, &target, &trusted, 0).unwrap(),
    ];
    assert_eq!(target.call([2, 3, 0, 0, 0]), Ok(5));
    // The checked tracer's run failed at its call (slot 0); the trusted one's did not.
    assert_eq!(checked.stats().errors, 1);
    assert!(matches!(
        checked.last_error(),
        Some(ExecError::HelperFault {
            pc: 0,
            helper: 7,
            ..
        })
    ));
    assert_eq!(trusted.stats().errors, 0);
}

#[test]
fn the_tracer_context_is_read_only() {
    let target = adder();
    // fentry overwrites the first argument, fexit the return value (a store and an atomic).
    let fentry = load(
        "mov %r2, 1000\nstxdw [%r1+0], %r2\nmov %r0, 0\nexit",
        &Helpers::new(),
    );
    let store = load(
        "mov %r2, 1234\nstxdw [%r1+40], %r2\nmov %r0, 0\nexit",
        &Helpers::new(),
    );
    let atomic = load(
        "mov %r2, 1\nlock add [%r1+40], %r2\nmov %r0, 0\nexit",
        &Helpers::new(),
    );
    let links = [
        attach(AttachKind::Fentry, &target, &fentry, 0).unwrap(),
        attach(AttachKind::Fexit, &target, &store, 0).unwrap(),
        attach(AttachKind::Fexit, &target, &atomic, 0).unwrap(),
    ];
    for n in 1..=3 {
        assert_eq!(target.call([20, 22, 0, 0, 0]), Ok(42));
        for (tracer, access) in [
            (&fentry, Access::Store),
            (&store, Access::Store),
            (&atomic, Access::Atomic),
        ] {
            assert_eq!(tracer.stats().errors, n);
            assert!(
                matches!(
                    tracer.last_error(),
                    Some(ExecError::OutOfBounds { pc: 1, size: 8, access: a, .. }) if a == access
                ),
                "{:?}",
                tracer.last_error()
            );
        }
    }
    drop(links);
    // Loads keep working: the recorder reads the arguments and the return value.
    let fexit = recorder(4, 0);
    let _link = attach(AttachKind::Fexit, &target, &fexit, 7).unwrap();
    assert_eq!(target.call([5, 6, 0, 0, 0]), Ok(11));
    let s = &SEEN[4];
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        [&s.arg0, &s.arg1, &s.retval, &s.cookie].map(|v| v.load(Ordering::SeqCst)),
        [5, 6, 11, 7]
    );
    assert_eq!(fexit.stats().errors, 0);
    assert_eq!(fexit.last_error(), None);
}

#[test]
fn a_runaway_tracer_ends_at_its_budget() {
    let target = adder();
    let program = assemble_program("l:\nja l").unwrap();
    let opts = JitOptions::checked().with_budget(Some(1 << 12));
    let looping = Prog::load(&program, &Helpers::new(), opts).unwrap();
    let _link = attach(AttachKind::Fentry, &target, &looping, 0).unwrap();
    assert_eq!(target.call([1, 2, 0, 0, 0]), Ok(3));
    assert_eq!(target.call([3, 4, 0, 0, 0]), Ok(7));
    assert_eq!(looping.stats().errors, 2);
    assert_eq!(
        looping.last_error(),
        Some(ExecError::BudgetExhausted {
            pc: 0,
            budget: 1 << 12
        })
    );
}

#[test]
fn attach_and_detach_while_four_threads_run_the_target() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    extern "C" fn count(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
        COUNT.fetch_add(1, Ordering::Relaxed);
        0
    }
    let target = adder();
    let mut helpers = Helpers::new();
    helpers.register(12, count);
    let fentry = load("call 12\nmov %r0, 0\nexit", &helpers);
    let fexit = load("call 12\nmov %r0, 0\nexit", &helpers);
    let stop = Arc::new(AtomicBool::new(false));
    let runners: Vec<_> = (0..4u64)
        .map(|t| {
            let (target, stop) = (target.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(target.call([t, n, 0, 0, 0]), Ok(t + n));
                    n += 1;
                }
                n
            })
        })
        .collect();
    for i in 0..500 {
        let a = attach(AttachKind::Fentry, &target, &fentry, i).unwrap();
        let b = attach(AttachKind::Fexit, &target, &fexit, i).unwrap();
        drop(a);
        b.detach().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let runs: u64 = runners.into_iter().map(|r| r.join().unwrap()).sum();
    let counted = COUNT.load(Ordering::Relaxed);
    assert!(runs > 0);
    assert!(
        counted <= 2 * runs,
        "{counted} tracer runs for {runs} target runs"
    );
}
