//! What the tracing benchmarks share (`benches/trampoline.rs`, `benches/fastpath.rs`): the target
//! and tracer programs, a quick per-call timing, and runner throughput under attach churn.
// Each benchmark that includes this module uses only part of it.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, Prog, attach};

pub fn load(src: &str) -> Prog {
    Prog::load(
        &assemble_program(src).expect("assembles"),
        &Helpers::new(),
        JitOptions::checked(),
    )
    .expect("loads")
}

/// The traced program: r0 = r1 + r2 (what `native_add` does natively).
pub fn target() -> Prog {
    load("mov %r0, %r1\nadd %r0, %r2\nexit")
}

/// An empty tracer.
pub fn empty() -> Prog {
    load("mov %r0, 0\nexit")
}

/// The native baseline: the target's arithmetic as a Rust function that is never inlined.
#[inline(never)]
pub fn native_add(a: u64, b: u64) -> u64 {
    a.wrapping_add(b)
}

/// When this benchmark process started measuring (the first call), for
/// [`criterion_median_ns`] to tell this run's estimates from an earlier run's.
pub fn run_started() -> std::time::SystemTime {
    static START: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::SystemTime::now)
}

/// Criterion's median time per iteration, in ns, of `bench` in `group` as this run measured it
/// (read back from its `estimates.json`, written since [`run_started`]); `None` when criterion
/// did not measure it in this run (a filter left it out, or `--profile-time`). Tables prefer it to a quick timing: it is the estimate
/// criterion prints, with outliers handled, where a quick loop catches whatever the machine did
/// at that moment.
pub fn criterion_median_ns(group: &str, bench: &str) -> Option<f64> {
    let home = std::env::var_os("CRITERION_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .map_or_else(|| "target".into(), |t| t.to_path_buf())
                .join("criterion")
        });
    let file = home.join(group).join(bench).join("new/estimates.json");
    if std::fs::metadata(&file).ok()?.modified().ok()? < run_started() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

/// Quick time per `prog.call`, in ns (criterion keeps its estimates to itself).
pub fn ns_per_call(prog: &Prog) -> f64 {
    let n = 2_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        black_box(prog.call([i, 1, 0, 0, 0]).expect("runs"));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Quick time per call of [`native_add`] through an opaque function pointer, in ns.
pub fn ns_per_native_call() -> f64 {
    let f: fn(u64, u64) -> u64 = black_box(native_add);
    let n = 20_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        black_box(f(black_box(i), 1));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Runs per second of `threads` runners for `window`, while this thread attaches and detaches
/// an empty fentry `rate` times per second (`Some(0)`: not at all; `None`: as fast as it can).
/// Returns the runs per second and the attach/detach cycles per second achieved.
pub fn throughput(threads: usize, window: Duration, rate: Option<u32>) -> (f64, f64) {
    let prog = target();
    let tracer = empty();
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let runners: Vec<_> = (0..threads)
        .map(|_| {
            let (prog, stop, total) = (prog.clone(), stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    black_box(prog.call([n, 1, 0, 0, 0]).expect("runs"));
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let start = Instant::now();
    let mut cycles = 0u64;
    while start.elapsed() < window {
        match rate {
            Some(0) => std::thread::sleep(Duration::from_millis(10)),
            Some(r) => {
                // Paced: cycle k starts at k / r seconds; sleep (not spin) in between, so the
                // churning thread leaves its core to the runner as a real attacher would.
                let due = Duration::from_secs_f64(cycles as f64 / r as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                drop(attach(AttachKind::Fentry, &prog, &tracer, 0).expect("attaches"));
                cycles += 1;
            }
            None => {
                drop(attach(AttachKind::Fentry, &prog, &tracer, 0).expect("attaches"));
                cycles += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in runners {
        r.join().expect("runner");
    }
    let secs = start.elapsed().as_secs_f64();
    reclaim::flush().expect("flush outside a run");
    (
        total.load(Ordering::Relaxed) as f64 / secs,
        cycles as f64 / secs,
    )
}

/// Mean time of one attach (image built, site poked) and of one detach, in µs.
pub fn attach_detach_us(samples: u32) -> (f64, f64) {
    let prog = target();
    let tracer = empty();
    let (mut attach_t, mut detach_t) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..samples {
        let start = Instant::now();
        let link = attach(AttachKind::Fentry, &prog, &tracer, 0).expect("attaches");
        attach_t += start.elapsed();
        let start = Instant::now();
        link.detach().expect("detaches");
        detach_t += start.elapsed();
    }
    reclaim::flush().expect("flush outside a run");
    let n = samples as f64;
    (
        attach_t.as_secs_f64() * 1e6 / n,
        detach_t.as_secs_f64() * 1e6 / n,
    )
}
