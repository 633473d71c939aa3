//! Traces a native C library live: `demo.c`, built with a patchable entry on every function and
//! linked into this example, runs on several threads while a clang-compiled fentry/fexit pair
//! (`trace.bpf.c`: call counts per thread in a hash map, a latency histogram) is attached to
//! `demo_hash` and detached again, a few thousand times. Every call's result is checked, the
//! tracers' counts are checked exactly at the end, and every trampoline image must be freed.
//!
//! `cargo run --release --example native [-- CYCLES]` (default 2000). Ends with one line,
//! `native: calls=N fentry=N fexit=N errors=0 live_images=0`, and exits non-zero on any wrong
//! result or leak.

#[cfg(livebpf_native_demo)]
mod demo {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use livebpf::native::NativeSite;
    use livebpf::reclaim;
    use livebpf::runtime::{LoadOptions, Loaded};
    use livebpf::trampoline::{AttachKind, attach_native, live_images};

    unsafe extern "C" {
        fn demo_hash(key: i64, seed: i64) -> i64;
        fn demo_batch(first: i64, count: i64, seed: i64) -> i64;
    }

    /// `demo_hash` in Rust: what every call must return.
    fn mix(key: i64, seed: i64) -> i64 {
        let mut z = (key as u64).wrapping_add((seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as i64
    }

    const THREADS: i64 = 4;
    const BATCH: i64 = 16;

    fn u64_of(bytes: Option<Vec<u8>>) -> u64 {
        bytes
            .and_then(|b| {
                b.get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            })
            .unwrap_or(0)
    }

    pub fn run(cycles: u32) -> Result<bool, Box<dyn std::error::Error>> {
        let opts = LoadOptions {
            // demo_hash(key, seed): fexit finds its result after two arguments.
            target_params: BTreeMap::from([("demo_hash".to_string(), 2)]),
            ..LoadOptions::default()
        };
        let object = Loaded::from_file(concat!(env!("OUT_DIR"), "/native_trace.bpf.o"), &opts)?;
        let on_entry = object.program("on_entry")?.jit()?;
        let on_exit = object.program("on_exit")?.jit()?;
        let map = |name: &str| object.map(name).ok_or(format!("no map `{name}`"));
        let (calls_map, totals, latency) = (map("calls")?, map("totals")?, map("latency_ns")?);
        let total = |i: u32| totals.lookup(&i.to_le_bytes()).map(u64_of);

        let site = NativeSite::find("demo_hash")?;
        let original = site.original().to_vec();
        let stop = AtomicBool::new(false);
        let (calls, wrong) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
            for t in 0..THREADS {
                let (stop, calls, wrong) = (&stop, &calls, &wrong);
                s.spawn(move || {
                    let mut first = t << 40;
                    while !stop.load(Ordering::Relaxed) {
                        // SAFETY: the library's own functions, linked in.
                        let got = unsafe { demo_batch(first, BATCH, t) };
                        let expect = (first..first + BATCH).fold(0, |acc, k| acc ^ mix(k, t));
                        if got != expect {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        calls.fetch_add(BATCH as u64, Ordering::Relaxed);
                        first += BATCH;
                    }
                });
            }
            let churn = (|| {
                for cycle in 0..cycles {
                    // SAFETY: demo_hash takes and returns integers in registers, and is linked
                    // into this executable (never unloaded).
                    let entry = unsafe { attach_native(AttachKind::Fentry, &site, &on_entry, 0) }?;
                    let exit = unsafe { attach_native(AttachKind::Fexit, &site, &on_exit, 0) }?;
                    std::thread::yield_now();
                    if cycle % 2 == 0 {
                        exit.detach()?;
                        entry.detach()?;
                    } else {
                        entry.detach()?;
                        exit.detach()?;
                    }
                }
                Ok::<(), Box<dyn std::error::Error>>(())
            })();
            stop.store(true, Ordering::Relaxed);
            churn
        })?;

        // Exact counts: with both attached and only this thread calling, each call runs both.
        let (entries, exits) = (total(0)?, total(1)?);
        // SAFETY: as above.
        let entry = unsafe { attach_native(AttachKind::Fentry, &site, &on_entry, 0) }?;
        let exit = unsafe { attach_native(AttachKind::Fexit, &site, &on_exit, 0) }?;
        const EXACT: i64 = 1000;
        for k in 0..EXACT {
            // SAFETY: as above.
            if unsafe { demo_hash(k, 99) } != mix(k, 99) {
                wrong.fetch_add(1, Ordering::Relaxed);
            }
        }
        calls.fetch_add(EXACT as u64, Ordering::Relaxed);
        drop((entry, exit));
        let mut errors = wrong.load(Ordering::Relaxed);
        let (fentry, fexit) = (total(0)?, total(1)?);
        if (fentry - entries, fexit - exits) != (EXACT as u64, EXACT as u64) {
            eprintln!(
                "native: {} fentry and {} fexit runs for {EXACT} traced calls",
                fentry - entries,
                fexit - exits
            );
            errors += 1;
        }
        // The tracers' own view: results they found wrong, runs that faulted, and the per-thread
        // hash map agreeing with the total.
        errors += total(2)?;
        errors += on_entry.stats().errors + on_exit.stats().errors;
        let mut per_thread = 0;
        for key in calls_map.keys() {
            per_thread += u64_of(calls_map.lookup(&key)?);
        }
        if per_thread != fentry {
            eprintln!("native: the calls map counts {per_thread}, fentry ran {fentry} times");
            errors += 1;
        }
        // SAFETY: the site's bytes, in this executable's text.
        let now = unsafe { std::slice::from_raw_parts(site.site() as *const u8, original.len()) };
        if now != original.as_slice() {
            eprintln!("native: the site's original bytes are not back");
            errors += 1;
        }
        reclaim::flush()?;
        let live = live_images();

        println!("demo_hash latency under tracing (fexit − fentry):");
        for slot in 0..32u32 {
            let n = u64_of(latency.lookup(&slot.to_le_bytes())?);
            if n > 0 {
                println!("  [{:>8} ns, {:>8} ns)  {n}", 1u64 << slot, 2u64 << slot);
            }
        }
        println!(
            "native: calls={} fentry={fentry} fexit={fexit} errors={errors} live_images={live}",
            calls.load(Ordering::Relaxed)
        );
        Ok(errors == 0 && live == 0)
    }
}

fn main() -> std::process::ExitCode {
    let cycles = match std::env::args().nth(1).map(|a| a.parse::<u32>()) {
        None => 2000,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("usage: native [CYCLES]  (attach/detach cycles, default 2000)");
            return std::process::ExitCode::from(2);
        }
    };
    #[cfg(livebpf_native_demo)]
    match demo::run(cycles) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("native: {e}");
            std::process::ExitCode::FAILURE
        }
    }
    #[cfg(not(livebpf_native_demo))]
    {
        let _ = cycles;
        eprintln!(
            "native: this example was built without its C library or tracers (build.rs needs a C compiler and clang-19 with libbpf's headers: Debian clang-19 libbpf-dev); rebuild after installing them"
        );
        std::process::ExitCode::FAILURE
    }
}
