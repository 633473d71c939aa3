//! Cost of tracing (x86-64), side by side in one run: a bare call of a JIT program, the same call
//! with an empty fentry, an empty fexit, both; attach latency; the read-side cost of livebpf's
//! grace periods against crossbeam-epoch's pin; and runner throughput while another thread
//! attaches and detaches in a loop, as a fraction of the undisturbed throughput.

#[path = "common/tracing.rs"]
mod tracing;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, attach};
use tracing::{empty, ns_per_call, target, throughput};

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
        let ns = tracing::criterion_median_ns("call", name).unwrap_or_else(|| ns_per_call(&prog));
        table.push((name, ns));
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

fn main() {
    tracing::run_started();
    let mut c = Criterion::default().configure_from_args();
    let table = calls(&mut c);
    read_side(&mut c);
    attach_latency(&mut c);
    c.final_summary();
    let bare = table[0].1;
    println!("\nper-call cost (ns, criterion's medians; overhead over the bare call):");
    for (name, ns) in &table {
        println!("  {name:24} {ns:7.2} ns  (+{:.2} ns)", ns - bare);
    }
    // One runner: this machine has two cores, one of them attaching.
    let window = Duration::from_secs(2);
    let (calm, _) = throughput(1, window, Some(0));
    let (busy, cycles) = throughput(1, window, None);
    println!(
        "runner throughput: {:.1} M runs/s undisturbed, {:.1} M runs/s during {:.0} attach/detach cycles/s: {:.1}% of undisturbed",
        calm / 1e6,
        busy / 1e6,
        cycles,
        100.0 * busy / calm
    );
}
