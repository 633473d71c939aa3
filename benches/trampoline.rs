//! Cost of tracing (x86-64), side by side in one run: a bare call of a JIT program, the same call
//! with an empty fentry, an empty fexit, both; attach latency; the read-side cost of livebpf's
//! grace periods against crossbeam-epoch's pin; and runner throughput while another thread
//! attaches and detaches in a loop, as a fraction of the undisturbed throughput.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, Prog, attach};

fn load(src: &str) -> Prog {
    Prog::load(
        &assemble_program(src).expect("assembles"),
        &Helpers::new(),
        JitOptions::checked(),
    )
    .expect("loads")
}

fn target() -> Prog {
    load("mov %r0, %r1\nadd %r0, %r2\nexit")
}

fn empty() -> Prog {
    load("mov %r0, 0\nexit")
}

fn ns_per_call(prog: &Prog) -> f64 {
    let n = 2_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        black_box(prog.call([i, 1, 0, 0, 0]).expect("runs"));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn calls(c: &mut Criterion) -> Vec<(&'static str, f64)> {
    let tracer = empty();
    let mut group = c.benchmark_group("call");
    let mut table = Vec::new();
    // (name, links, run statistics on)
    let setups: [(&'static str, &[AttachKind], bool); 5] = [
        ("bare", &[], false),
        ("fentry-empty", &[AttachKind::Fentry], false),
        ("fentry-empty, stats on", &[AttachKind::Fentry], true),
        ("fexit-empty", &[AttachKind::Fexit], false),
        (
            "fentry+fexit",
            &[AttachKind::Fentry, AttachKind::Fexit],
            false,
        ),
    ];
    for (name, kinds, stats) in setups {
        livebpf::trampoline::set_stats_enabled(stats);
        let prog = target();
        let _links: Vec<_> = kinds
            .iter()
            .map(|k| attach(*k, &prog, &tracer, 0).expect("attaches"))
            .collect();
        group.bench_function(name, |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                prog.call(black_box([i, 1, 0, 0, 0])).expect("runs")
            })
        });
        table.push((name, ns_per_call(&prog)));
    }
    livebpf::trampoline::set_stats_enabled(false);
    group.finish();
    table
}

fn read_side(c: &mut Criterion) {
    let mut group = c.benchmark_group("read-side");
    group.bench_function("livebpf ReadGuard", |b| {
        b.iter(|| {
            let guard = reclaim::ReadGuard::new();
            black_box(&guard);
        })
    });
    group.bench_function("crossbeam-epoch pin", |b| {
        b.iter(|| {
            let guard = crossbeam_epoch::pin();
            black_box(&guard);
        })
    });
    group.bench_function("nothing", |b| b.iter(|| black_box(())));
    group.finish();
}

fn attach_latency(c: &mut Criterion) {
    let prog = target();
    let tracer = empty();
    c.bench_function("attach fentry (build image + poke)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let link = attach(AttachKind::Fentry, &prog, &tracer, 0).expect("attaches");
                total += start.elapsed();
                drop(link);
            }
            total
        })
    });
    reclaim::flush().expect("flush outside a run");
}

/// Runs per second of `threads` runners for `window`, optionally while this thread attaches
/// and detaches an empty fentry in a loop.
fn throughput(threads: usize, window: Duration, churn: bool) -> (f64, u64) {
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
        if churn {
            drop(attach(AttachKind::Fentry, &prog, &tracer, 0).expect("attaches"));
            cycles += 1;
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in runners {
        r.join().expect("runner");
    }
    let secs = start.elapsed().as_secs_f64();
    reclaim::flush().expect("flush outside a run");
    (total.load(Ordering::Relaxed) as f64 / secs, cycles)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let table = calls(&mut c);
    read_side(&mut c);
    attach_latency(&mut c);
    c.final_summary();
    let bare = table[0].1;
    println!("\nper-call cost (ns, quick timing; overhead over the bare call):");
    for (name, ns) in &table {
        println!("  {name:24} {ns:7.2} ns  (+{:.2} ns)", ns - bare);
    }
    // One runner: this machine has two cores, one of them attaching.
    let window = Duration::from_secs(2);
    let (calm, _) = throughput(1, window, false);
    let (busy, cycles) = throughput(1, window, true);
    println!(
        "runner throughput: {:.1} M runs/s undisturbed, {:.1} M runs/s during {} attach/detach cycles: {:.1}% of undisturbed",
        calm / 1e6,
        busy / 1e6,
        cycles,
        100.0 * busy / calm
    );
}
