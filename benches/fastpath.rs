//! The fast paths of issue 10 in one table, side by side with their baselines in the same run,
//! as ratios (these machines are noisy; only ratios within one run mean anything):
//! - a program run against a native call `N` (a non-inlined Rust function doing the same
//!   arithmetic), and what an empty fentry, an empty fexit and run statistics add;
//! - a runner's throughput while another thread attaches and detaches at 100, 1,000 and 10,000
//!   cycles per second and as fast as it can, against the undisturbed throughput; attach latency;
//! - the loop workloads (`common/workloads.rs`) on livebpf's JIT (trusted, checked) against the
//!   best peer JIT in the run (rbpf's; ubpf is not a crate: compare by hand), and livebpf's
//!   interpreter against rbpf's.
//!
//! Criterion measures the per-call paths (group `fastpath`), and the table uses its medians (a
//! quick timing where criterion measured nothing, e.g. under a filter).

#[path = "common/tracing.rs"]
mod tracing;
#[path = "common/workloads.rs"]
mod workloads;

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use livebpf::trampoline::{AttachKind, attach, set_stats_enabled};
use tracing::{
    attach_detach_us, criterion_median_ns, empty, native_add, ns_per_call, ns_per_native_call,
    target, throughput,
};

/// Per-call cost of each path, in ns: native, bare, +fentry, +fexit, +fentry with stats.
fn per_call(c: &mut Criterion) -> [f64; 5] {
    tracing::run_started();
    let mut group = c.benchmark_group("fastpath");
    let f: fn(u64, u64) -> u64 = black_box(native_add);
    group.bench_function("native call", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            f(black_box(i), 1)
        })
    });
    let native = criterion_median_ns("fastpath", "native call").unwrap_or_else(ns_per_native_call);
    let tracer = empty();
    let mut out = [native, 0.0, 0.0, 0.0, 0.0];
    let setups: [(&str, Option<AttachKind>, bool); 4] = [
        ("bare run", None, false),
        ("fentry-empty", Some(AttachKind::Fentry), false),
        ("fexit-empty", Some(AttachKind::Fexit), false),
        ("fentry-empty, stats on", Some(AttachKind::Fentry), true),
    ];
    for (k, (name, kind, stats)) in setups.into_iter().enumerate() {
        set_stats_enabled(stats);
        let prog = target();
        let _link = kind.map(|kind| attach(kind, &prog, &tracer, 0).expect("attaches"));
        group.bench_function(name, |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                prog.call(black_box([i, 1, 0, 0, 0])).expect("runs")
            })
        });
        out[k + 1] = criterion_median_ns("fastpath", name).unwrap_or_else(|| ns_per_call(&prog));
    }
    set_stats_enabled(false);
    group.finish();
    out
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let [native, bare, fentry, fexit, stats] = per_call(&mut c);
    c.final_summary();

    let n = |ns: f64| ns / native;
    println!("\n| path | measured | as native calls N | goal |");
    println!("|---|---|---|---|");
    println!("| native call N (baseline) | {native:.2} ns | 1 N | |");
    println!(
        "| `Prog::call`, 3-instruction program | {bare:.1} ns | {:.1} N | ≤ 3 N |",
        n(bare)
    );
    let over = |name: &str, ns: f64, goal: &str| {
        println!(
            "| added by {name} | +{:.1} ns | +{:.1} N | {goal} |",
            ns - bare,
            n(ns - bare)
        )
    };
    over("an empty fentry", fentry, "≤ 2.5 N");
    over("an empty fexit", fexit, "≤ 3.5 N");
    over("fentry with run statistics on", stats, "≤ +10 N");

    let window = Duration::from_secs(2);
    let (calm, _) = throughput(1, window, Some(0));
    for rate in [Some(100), Some(1_000), Some(10_000), None] {
        let (busy, achieved) = throughput(1, window, rate);
        let label = match rate {
            Some(r) => format!("{r}/s"),
            None => "as fast as possible".to_string(),
        };
        println!(
            "| runner throughput, attach/detach {label} ({achieved:.0} cycles/s reached) | {:.1} M runs/s of {:.1} | {:.1} % | ≥ 90 % |",
            busy / 1e6,
            calm / 1e6,
            100.0 * busy / calm
        );
    }
    let (attach_us, detach_us) = attach_detach_us(2_000);
    println!("| attach latency (build image + poke) | {attach_us:.1} µs | | ≤ 10 µs |");
    println!("| detach latency (poke + retire) | {detach_us:.1} µs | | |");

    println!("\n| workload | engine | time per run | against | ratio | goal |");
    println!("|---|---|---|---|---|---|");
    for case in workloads::cases() {
        let timed: Vec<(&str, f64)> = workloads::engines(&case)
            .into_iter()
            .map(|(name, mut run)| (name, workloads::ns_per_run(&mut run, &case.input)))
            .collect();
        let time = |name: &str| timed.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
        let rows = [
            ("livebpf-jit-trusted", "rbpf-jit", "≤ 0.8"),
            ("livebpf-jit-checked", "rbpf-jit", "≤ 1.0"),
            ("livebpf-interp", "rbpf-interp", "≤ 0.5"),
        ];
        for (engine, peer, goal) in rows {
            match (time(engine), time(peer)) {
                (Some(t), Some(p)) => println!(
                    "| {} | {engine} | {:.1} µs | {peer} {:.1} µs | {:.2} | {goal} |",
                    case.name,
                    t / 1e3,
                    p / 1e3,
                    t / p
                ),
                // rbpf has no JIT for this architecture: compare with ubpf's by hand.
                (Some(t), None) => println!(
                    "| {} | {engine} | {:.1} µs | no {peer} here | | {goal} |",
                    case.name,
                    t / 1e3
                ),
                _ => {}
            }
        }
    }
}
