//! Native patch sites (`livebpf::native`): C functions built with the flags the module documents
//! are found by symbol name and by address in shared objects loaded into the test process, and
//! the builds whose entries cannot be rewritten under running threads are refused with the
//! error that names the flags to use. The shared objects are compiled here, with the host's
//! compilers (clang-19 and gcc on x86-64; Debian's aarch64 cross gcc for arm64 under qemu).
//! Without a compiler a case is skipped loudly, unless `LIVEBPF_REQUIRE_CLANG=1` (CI).
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

#[path = "common/native.rs"]
mod native_lib;

use livebpf::native::{NativeError, NativeSite};

const SOURCE: &str = "long FN(long a, long b) { return a * 3 + b; }\n";

/// Builds `SOURCE` (for `ns_live`, with a replacement beside it) with the function named `name`
/// into a shared object with `compile` (the compiler and its flags), loads it, checks that the
/// function runs as built, and returns its address; `None` without the compiler.
fn build_and_load(name: &str, compile: &[&str]) -> Option<usize> {
    // `ns_live` comes with a replacement in the same object (so a jump reaches it on arm64).
    let body = if name == "ns_live" {
        "long FN(long a, long b) { return a * 3 + b; }\n\
         long FN_alt(long a, long b) { return a * 3 + b + 1; }\n"
    } else {
        SOURCE
    };
    let lib = native_lib::build(name, &body.replace("FN", name), compile)?;
    let addr = lib.sym(name);
    // SAFETY: the symbol is `long FN(long, long)`.
    let f: extern "C" fn(i64, i64) -> i64 = unsafe { std::mem::transmute(addr) };
    assert_eq!(f(5, 1), 16);
    Some(addr)
}

/// A build that gives a site: found by name and by address alike, at `offset` after the entry,
/// with the site's instruction recorded.
fn assert_site(name: &str, compile: &[&str], offset: usize, pad: bool) {
    let Some(addr) = build_and_load(name, compile) else {
        return;
    };
    let by_name = NativeSite::find(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let by_addr = NativeSite::at(addr).unwrap();
    assert_eq!(by_name, by_addr);
    assert_eq!(by_addr.function(), addr);
    assert_eq!(by_addr.site(), addr + offset, "{name}");
    assert_eq!(by_addr.has_landing_pad(), pad, "{name}");
    assert!(
        by_addr.object().ends_with(format!("lib{name}.so")),
        "{:?}",
        by_addr.object()
    );
    // SAFETY: the site's bytes, in the loaded object's text.
    let now = unsafe { std::slice::from_raw_parts(by_addr.site() as *const u8, 5) };
    assert_eq!(by_addr.original(), &now[..by_addr.original().len()]);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn x86_builds_with_one_nop5_are_sites() {
    let clang = ["clang-19", "-fpatchable-function-entry=5"];
    assert_site("ns_clang", &clang, 0, false);
    let cet = [
        "clang-19",
        "-fpatchable-function-entry=5",
        "-fcf-protection=full",
    ];
    assert_site("ns_clang_cet", &cet, 4, true);
    let fentry = ["gcc", "-pg", "-mfentry", "-mnop-mcount"];
    assert_site("ns_gcc_fentry", &fentry, 0, false);
}

/// The site is switched between its nop and a jump to another function while threads call it:
/// every call returns one of the two functions' results, each poke is seen by the next call,
/// and the original bytes come back exactly.
#[test]
fn a_native_site_is_rewritten_under_running_callers() {
    use livebpf::native::NativeInsn;
    use livebpf::text::poke::{PokeError, PokeOutcome};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[cfg(target_arch = "x86_64")]
    let cc = ["clang-19", "-fpatchable-function-entry=5"];
    #[cfg(target_arch = "aarch64")]
    let cc = [
        "aarch64-linux-gnu-gcc",
        "-fpatchable-function-entry=2",
        "-mbranch-protection=standard",
    ];
    let Some(live) = build_and_load("ns_live", &cc) else {
        return;
    };
    let site = NativeSite::at(live).unwrap();
    let original = site.original().to_vec();
    // The replacement, in the same object (a jump reaches it on arm64 too), returns one more.
    let alt = NativeSite::find("ns_live_alt").unwrap().function();
    // SAFETY: both are `long f(long, long)`.
    let call = |f: usize, a: i64| unsafe {
        std::mem::transmute::<usize, extern "C" fn(i64, i64) -> i64>(f)(a, 1)
    };
    let stop = AtomicBool::new(false);
    let (plain, replaced, bad) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let mut a = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    match call(live, a) - a * 3 {
                        1 => plain.fetch_add(1, Ordering::Relaxed),
                        2 => replaced.fetch_add(1, Ordering::Relaxed),
                        _ => bad.fetch_add(1, Ordering::Relaxed),
                    };
                    a = (a + 1) % 1000;
                }
            });
        }
        for _ in 0..200 {
            // SAFETY: `alt` has `live`'s ABI, is in the same object and, like `live`, is never
            // unloaded.
            let on = unsafe { site.poke(NativeInsn::Original, NativeInsn::Jump(alt)) };
            assert_eq!(on, Ok(PokeOutcome::Applied));
            assert_eq!(call(live, 7), 23, "the jump is seen once the poke returns");
            // SAFETY: as above.
            let off = unsafe { site.poke(NativeInsn::Jump(alt), NativeInsn::Original) };
            assert_eq!(off, Ok(PokeOutcome::Applied));
            assert_eq!(call(live, 7), 22);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let bad = bad.load(Ordering::Relaxed);
    assert_eq!(bad, 0, "a call returned neither result");
    assert!(plain.load(Ordering::Relaxed) > 0 && replaced.load(Ordering::Relaxed) > 0);
    // SAFETY: the site's bytes, in the loaded object's text.
    let now = unsafe { std::slice::from_raw_parts(site.site() as *const u8, original.len()) };
    assert_eq!(now, &original[..], "the original bytes are back exactly");
    // Asking for what the site holds already writes nothing.
    // SAFETY: nothing is written (the site holds its nop already).
    let same = unsafe { site.poke(NativeInsn::Jump(alt), NativeInsn::Original) };
    assert_eq!(same, Ok(PokeOutcome::AlreadyApplied));
    // A wrong `old` writes nothing either.
    // SAFETY: nothing is written: the site does not hold this jump.
    let wrong = unsafe { site.poke(NativeInsn::Jump(live), NativeInsn::Jump(alt)) };
    assert!(
        matches!(wrong, Err(PokeError::NotASite { .. })),
        "{wrong:?}"
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn gccs_one_byte_nops_are_refused_with_the_flags_to_use() {
    let Some(addr) = build_and_load("ns_gcc_nops", &["gcc", "-fpatchable-function-entry=5"]) else {
        return;
    };
    let err = NativeSite::find("ns_gcc_nops").unwrap_err();
    assert_eq!(err, NativeError::OneByteNops { addr });
    let message = err.to_string();
    assert!(
        message.contains("clang -fpatchable-function-entry=5"),
        "{message}"
    );
    assert!(message.contains("-pg -mfentry -mnop-mcount"), "{message}");
}

#[cfg(target_arch = "aarch64")]
#[test]
fn arm64_builds_with_two_nops_are_sites() {
    let gcc = ["aarch64-linux-gnu-gcc", "-fpatchable-function-entry=2"];
    assert_site("ns_a64", &gcc, 0, false);
    let bti = [
        "aarch64-linux-gnu-gcc",
        "-fpatchable-function-entry=2",
        "-mbranch-protection=standard",
    ];
    assert_site("ns_a64_bti", &bti, 4, true);
}

#[test]
fn a_build_without_patchable_entry_is_refused() {
    #[cfg(target_arch = "x86_64")]
    let cc = ["gcc"];
    #[cfg(target_arch = "aarch64")]
    let cc = ["aarch64-linux-gnu-gcc"];
    let Some(addr) = build_and_load("ns_plain", &cc) else {
        return;
    };
    match NativeSite::find("ns_plain") {
        Err(NativeError::NoPatchableEntry { addr: a, bytes, .. }) => {
            assert_eq!(a, addr);
            assert!(!bytes.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

/// A function of the test executable itself is found through the executable's symbol table.
#[unsafe(no_mangle)]
pub extern "C" fn native_sites_in_the_executable(a: u64) -> u64 {
    a.wrapping_mul(7)
}

#[test]
fn the_executables_own_functions_are_found() {
    let addr = native_sites_in_the_executable as *const () as usize;
    assert_eq!(native_sites_in_the_executable(6), 42);
    // rustc emits no patchable entries: found, then refused for its bytes.
    match NativeSite::find("native_sites_in_the_executable") {
        Err(NativeError::NoPatchableEntry { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("{other:?}"),
    }
}
