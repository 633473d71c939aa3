//! Tracing programs attached to native functions (`livebpf::trampoline::attach_native`): C
//! functions with patchable entries, in shared objects compiled and loaded here
//! (`common/native.rs`), traced and replaced while threads call them, with the limits and errors
//! of program targets, and their original bytes back after the last detach.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

#[path = "common/native.rs"]
mod native_lib;

use native_lib::call2;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::native::NativeSite;
use livebpf::reclaim;
use livebpf::trampoline::{
    AttachError, AttachKind, MAX_TRAMP_LINKS, Prog, attach, attach_native, live_images,
};

/// Tests here count live images: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const SOURCE: &str = r#"
long na_target(long a, long b) { return a * 3 + b; }
long na_churn(long a, long b) { return a * 3 + b; }
/* Every integer argument register: six on x86-64 (then the stack), eight on arm64. */
#ifdef __aarch64__
long na_many(long a, long b, long c, long d, long e, long f, long g, long h)
{
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h;
}
#else
long na_many(long a, long b, long c, long d, long e, long f)
{
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}
#endif
"#;

fn lib() -> Option<&'static native_lib::Lib> {
    static LIB: std::sync::OnceLock<Option<native_lib::Lib>> = std::sync::OnceLock::new();
    LIB.get_or_init(|| native_lib::build("native_attach", SOURCE, native_lib::CC))
        .as_ref()
}

#[cfg(target_arch = "aarch64")]
type Many = extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64) -> i64;
#[cfg(target_arch = "x86_64")]
type Many = extern "C" fn(i64, i64, i64, i64, i64, i64) -> i64;
/// Integer argument registers.
const REGS: i64 = if cfg!(target_arch = "x86_64") { 6 } else { 8 };

fn load(src: &str, helpers: &Helpers) -> Prog {
    Prog::load(
        &assemble_program(src).unwrap(),
        helpers,
        JitOptions::checked(),
    )
    .unwrap()
}

static ENTRY_CALLS: AtomicU64 = AtomicU64::new(0);
static ENTRY_SUM: AtomicU64 = AtomicU64::new(0);
static EXIT_CALLS: AtomicU64 = AtomicU64::new(0);
static EXIT_SUM: AtomicU64 = AtomicU64::new(0);

extern "C" fn record_entry(a: u64, b: u64, _: u64, _: u64, _: u64) -> u64 {
    ENTRY_CALLS.fetch_add(1, Ordering::Relaxed);
    ENTRY_SUM.fetch_add(a.wrapping_add(b), Ordering::Relaxed);
    0
}

extern "C" fn record_exit(ret: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    EXIT_CALLS.fetch_add(1, Ordering::Relaxed);
    EXIT_SUM.fetch_add(ret, Ordering::Relaxed);
    0
}

/// fentry: helper 1000(args[0], args[1]); fexit: helper 1001(return value).
fn tracers() -> (Prog, Prog) {
    let mut helpers = Helpers::new();
    helpers.register(1000, record_entry);
    helpers.register(1001, record_exit);
    let fentry = load(
        "ldxdw %r2, [%r1+8]\nldxdw %r1, [%r1+0]\ncall 1000\nmov %r0, 0\nexit",
        &helpers,
    );
    let fexit = load("ldxdw %r1, [%r1+40]\ncall 1001\nmov %r0, 0\nexit", &helpers);
    (fentry, fexit)
}

fn counts() -> (u64, u64, u64, u64) {
    (
        ENTRY_CALLS.load(Ordering::Relaxed),
        ENTRY_SUM.load(Ordering::Relaxed),
        EXIT_CALLS.load(Ordering::Relaxed),
        EXIT_SUM.load(Ordering::Relaxed),
    )
}

fn site_bytes(site: &NativeSite) -> Vec<u8> {
    // SAFETY: the site's bytes, in the loaded object's text.
    unsafe { std::slice::from_raw_parts(site.site() as *const u8, site.original().len()) }.to_vec()
}

#[test]
fn native_functions_are_traced_and_replaced() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lib) = lib() else { return };
    let f = lib.sym("na_target");
    let site = NativeSite::find("na_target").unwrap();
    assert_eq!(site.function(), f);
    reclaim::flush().unwrap();
    let baseline = live_images();
    let (fentry, fexit) = tracers();
    let start = counts();
    let delta =
        |c: (u64, u64, u64, u64)| (c.0 - start.0, c.1 - start.1, c.2 - start.2, c.3 - start.3);

    // SAFETY (every attach_native here): na_target takes and returns integers, and the library
    // is never unloaded.
    let entry = unsafe { attach_native(AttachKind::Fentry, &site, &fentry, 0) }.unwrap();
    assert_ne!(
        site_bytes(&site),
        site.original(),
        "the site jumps to its stub"
    );
    assert_eq!(call2(f, 2, 3), 9);
    assert_eq!(delta(counts()), (1, 5, 0, 0));
    let exit = unsafe { attach_native(AttachKind::Fexit, &site, &fexit, 0) }.unwrap();
    assert_eq!(entry.image(), exit.image());
    assert_eq!(call2(f, 4, 1), 13);
    assert_eq!(delta(counts()), (2, 10, 1, 13));

    // fmod_ret: a non-zero result is returned instead of calling the function (fexit sees it).
    let veto = load(
        "ldxdw %r2, [%r1+0]\nmov %r0, 0\njne %r2, 7, +1\nmov %r0, 100\nexit",
        &Helpers::new(),
    );
    let modret = unsafe { attach_native(AttachKind::FmodRet, &site, &veto, 0) }.unwrap();
    assert_eq!(call2(f, 7, 1), 100);
    assert_eq!(call2(f, 1, 1), 4);
    assert_eq!(delta(counts()), (4, 20, 3, 117));

    // freplace excludes the other kinds, both ways.
    let replacement = load("mov %r0, %r1\nadd %r0, %r2\nexit", &Helpers::new());
    match unsafe { attach_native(AttachKind::Freplace, &site, &replacement, 0) } {
        Err(AttachError::Conflict {
            existing: AttachKind::Fentry,
            requested: AttachKind::Freplace,
        }) => {}
        other => panic!("{other:?}"),
    }
    drop((entry, modret));
    exit.detach().unwrap();
    assert_eq!(
        site_bytes(&site),
        site.original(),
        "the original bytes are back"
    );
    assert_eq!(call2(f, 2, 3), 9);
    assert_eq!(
        delta(counts()),
        (4, 20, 3, 117),
        "nothing runs once detached"
    );

    let replaced = unsafe { attach_native(AttachKind::Freplace, &site, &replacement, 0) }.unwrap();
    assert_eq!(call2(f, 2, 3), 5, "the replacement's r1 + r2");
    assert!(replacement.is_replacement());
    match unsafe { attach_native(AttachKind::Fentry, &site, &fentry, 0) } {
        Err(AttachError::Conflict {
            existing: AttachKind::Freplace,
            requested: AttachKind::Fentry,
        }) => {}
        other => panic!("{other:?}"),
    }
    // A replacement replaces one function.
    let other = NativeSite::find("na_churn").unwrap();
    assert!(matches!(
        unsafe { attach_native(AttachKind::Freplace, &other, &replacement, 0) },
        Err(AttachError::Recursive(_))
    ));
    // A program that is a target of links cannot become a replacement.
    let traced_target = load("mov %r0, 1\nexit", &Helpers::new());
    let on_target = attach(AttachKind::Fentry, &traced_target, &fentry, 0).unwrap();
    assert!(matches!(
        unsafe { attach_native(AttachKind::Freplace, &other, &traced_target, 0) },
        Err(AttachError::Recursive(_))
    ));
    drop(on_target);
    replaced.detach().unwrap();
    assert!(!replacement.is_replacement());
    assert_eq!(call2(f, 2, 3), 9);
    assert_eq!(site_bytes(&site), site.original());

    // The trampoline's limit.
    let links: Vec<_> = (0..MAX_TRAMP_LINKS)
        .map(|i| unsafe { attach_native(AttachKind::Fentry, &site, &fentry, i as u64) }.unwrap())
        .collect();
    match unsafe { attach_native(AttachKind::Fexit, &site, &fexit, 0) } {
        Err(AttachError::TooManyLinks { max }) => assert_eq!(max, MAX_TRAMP_LINKS),
        other => panic!("{other:?}"),
    }
    let before = counts().0;
    assert_eq!(call2(f, 1, 2), 5);
    assert_eq!(counts().0 - before, MAX_TRAMP_LINKS as u64);
    drop(links);
    assert_eq!(site_bytes(&site), site.original());
    assert_eq!(fentry.stats().errors + fexit.stats().errors, 0);
    reclaim::flush().unwrap();
    assert_eq!(live_images(), baseline, "every image was freed");
}

#[test]
fn every_integer_argument_register_reaches_the_function() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lib) = lib() else { return };
    // SAFETY: the library's signature.
    let many: Many = unsafe { std::mem::transmute(lib.sym("na_many")) };
    let expect = (1..=REGS).map(|i| i * (100 + i)).sum::<i64>();
    let args = |i: i64| 100 + i;
    #[cfg(target_arch = "aarch64")]
    let run = || {
        many(
            args(1),
            args(2),
            args(3),
            args(4),
            args(5),
            args(6),
            args(7),
            args(8),
        )
    };
    #[cfg(target_arch = "x86_64")]
    let run = || many(args(1), args(2), args(3), args(4), args(5), args(6));
    assert_eq!(run(), expect);
    let site = NativeSite::find("na_many").unwrap();
    let (fentry, fexit) = tracers();
    // SAFETY: integer arguments, all in registers; the library stays loaded.
    let links = unsafe {
        [
            attach_native(AttachKind::Fentry, &site, &fentry, 0).unwrap(),
            attach_native(AttachKind::Fexit, &site, &fexit, 0).unwrap(),
        ]
    };
    let before = counts();
    assert_eq!(run(), expect);
    let after = counts();
    assert_eq!(
        after.1 - before.1,
        203,
        "fentry saw the first two arguments"
    );
    assert_eq!(after.3 - before.3, expect as u64, "fexit saw the result");
    drop(links);
    assert_eq!(run(), expect);
}

/// Callers on three threads never see a wrong result while tracers are attached and detached
/// as fast as possible, and every image is freed at the end.
#[test]
fn attach_churn_under_running_callers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lib) = lib() else { return };
    let f = lib.sym("na_churn");
    let site = NativeSite::at(f).unwrap();
    reclaim::flush().unwrap();
    let baseline = live_images();
    let (fentry, fexit) = tracers();
    let stop = AtomicBool::new(false);
    let (calls, wrong) = (AtomicU64::new(0), AtomicU64::new(0));
    let exits_before = counts().2;
    std::thread::scope(|s| {
        for t in 0..3 {
            let (stop, calls, wrong) = (&stop, &calls, &wrong);
            s.spawn(move || {
                let mut a = t;
                while !stop.load(Ordering::Relaxed) {
                    if call2(f, a, 1) != a * 3 + 1 {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    a = (a + 1) % 1_000_000;
                }
            });
        }
        for i in 0..300 {
            // SAFETY: na_churn takes and returns integers; the library stays loaded.
            let e = unsafe { attach_native(AttachKind::Fentry, &site, &fentry, 0) }.unwrap();
            let x = unsafe { attach_native(AttachKind::Fexit, &site, &fexit, 0) }.unwrap();
            std::thread::yield_now();
            if i % 2 == 0 {
                drop(e);
                drop(x);
            } else {
                x.detach().unwrap();
                e.detach().unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a call returned a wrong result"
    );
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert!(counts().2 > exits_before, "fexit ran at least once");
    assert_eq!(site_bytes(&site), site.original());
    assert_eq!(fentry.stats().errors + fexit.stats().errors, 0);
    reclaim::flush().unwrap();
    assert_eq!(live_images(), baseline);
}

/// The other builds of a site: x86-64 with `endbr64` before the nop (`-fcf-protection`) and
/// gcc's fentry nop; arm64 without branch protection (no `bti c`). Each is traced (fentry and
/// fexit), replaced, and restored.
#[test]
fn every_site_build_is_traced_and_replaced() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    #[cfg(target_arch = "x86_64")]
    let builds: [(&str, &[&str], bool); 2] = [
        (
            "na_cet",
            &[
                "clang-19",
                "-fpatchable-function-entry=5",
                "-fcf-protection=full",
            ],
            true,
        ),
        ("na_gcc", &["gcc", "-pg", "-mfentry", "-mnop-mcount"], false),
    ];
    #[cfg(target_arch = "aarch64")]
    let builds: [(&str, &[&str], bool); 1] = [(
        "na_nobti",
        &["aarch64-linux-gnu-gcc", "-fpatchable-function-entry=2"],
        false,
    )];
    let (fentry, fexit) = tracers();
    let replacement = load("mov %r0, %r1\nadd %r0, %r2\nexit", &Helpers::new());
    for (name, cc, pad) in builds {
        let source = "long FN(long a, long b) { return a * 3 + b; }\n".replace("FN", name);
        let Some(lib) = native_lib::build(name, &source, cc) else {
            continue;
        };
        let f = lib.sym(name);
        let site = NativeSite::at(f).unwrap();
        assert_eq!(site.has_landing_pad(), pad, "{name}");
        let before = counts();
        // SAFETY: an integer function; the library stays loaded.
        let links = unsafe {
            [
                attach_native(AttachKind::Fentry, &site, &fentry, 0).unwrap(),
                attach_native(AttachKind::Fexit, &site, &fexit, 0).unwrap(),
            ]
        };
        assert_eq!(call2(f, 5, 2), 17, "{name}");
        let after = counts();
        assert_eq!((after.1 - before.1, after.3 - before.3), (7, 17), "{name}");
        drop(links);
        let replaced = unsafe { attach_native(AttachKind::Freplace, &site, &replacement, 0) };
        assert_eq!(call2(f, 5, 2), 7, "{name}");
        drop(replaced);
        assert_eq!(call2(f, 5, 2), 17, "{name}");
        assert_eq!(site_bytes(&site), site.original(), "{name}");
    }
}

/// Any thread may call a native function, not only those that ran JIT code: a thread that blocks
/// SIGTRAP (which would kill the process if it met the int3 of a poke) stops the poke, and
/// nothing is written.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_thread_blocking_sigtrap_stops_a_native_poke() {
    use livebpf::text::poke::PokeError;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lib) = lib() else { return };
    let site = NativeSite::at(lib.sym("na_target")).unwrap();
    let (fentry, _) = tracers();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        // SAFETY: a valid signal set, for this thread's own mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTRAP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        ready_tx.send(unsafe { libc::gettid() }).unwrap();
        done_rx.recv().unwrap();
    });
    let tid = ready_rx.recv().unwrap();
    // SAFETY: an integer function; the library stays loaded.
    match unsafe { attach_native(AttachKind::Fentry, &site, &fentry, 0) } {
        Err(AttachError::Poke(PokeError::SigtrapBlocked { tid: t })) => assert_eq!(t, tid),
        other => panic!("{other:?}"),
    }
    assert_eq!(site_bytes(&site), site.original(), "nothing was written");
    done_tx.send(()).unwrap();
    blocker.join().unwrap();
    // SAFETY: as above.
    let link = unsafe { attach_native(AttachKind::Fentry, &site, &fentry, 0) }.unwrap();
    drop(link);
}

/// The function `reenter` calls (`na_target`'s address), for the replacement below.
static REENTER_TARGET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn reenter(a: u64, b: u64, _: u64, _: u64, _: u64) -> u64 {
    call2(REENTER_TARGET.load(Ordering::Relaxed), a as i64, b as i64) as u64
}

#[test]
fn a_replacement_that_calls_its_function_reaches_the_original() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lib) = lib() else { return };
    let f = lib.sym("na_target");
    REENTER_TARGET.store(f, Ordering::Relaxed);
    let site = NativeSite::find("na_target").unwrap();
    let mut helpers = Helpers::new();
    helpers.register(1002, reenter);
    // r0 = na_target(r1, r2) + 100, through the helper: the inner call finds the replacement
    // already running on this thread, so the function itself runs (a miss).
    let replacement = load("call 1002\nadd %r0, 100\nexit", &helpers);
    let replaced = unsafe { attach_native(AttachKind::Freplace, &site, &replacement, 0) }.unwrap();
    for (a, b) in [(2, 3), (7, -1), (0, 0)] {
        assert_eq!(call2(f, a, b), a * 3 + b + 100);
    }
    let stats = replacement.stats();
    assert_eq!((stats.misses, stats.errors), (3, 0));
    replaced.detach().unwrap();
    assert_eq!(call2(f, 2, 3), 9);
}
