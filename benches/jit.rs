//! JIT vs interpreter vs rbpf (JIT and interpreter) on the same programs, in one run, plus JIT
//! compile time per instruction. Criterion reports each engine; a ratio table follows at the end.
//! The workloads and engines are `common/workloads.rs`.

#[path = "common/workloads.rs"]
mod workloads;

use std::hint::black_box;

use criterion::{Criterion, Throughput};
#[cfg(target_arch = "x86_64")]
use livebpf::asm::assemble_program;
#[cfg(target_arch = "x86_64")]
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
#[cfg(target_arch = "x86_64")]
use livebpf::jit::{JitOptions, JitProgram};
use workloads::{Case, cases, engines, ns_per_run};

fn bench_case(c: &mut Criterion, case: &Case, table: &mut Vec<(String, Vec<(&'static str, f64)>)>) {
    let (expected, executed) = Interpreter::new(&case.program)
        .run_counted(&mut case.input.clone())
        .expect("interpreter runs");
    let mut group = c.benchmark_group(case.name);
    group.throughput(Throughput::Elements(executed));
    let mut row = Vec::new();
    for (name, mut run) in engines(case) {
        let mut mem = case.input.clone();
        assert_eq!(run(&mut mem), expected, "{name} disagrees on {}", case.name);
        group.bench_function(name, |b| {
            b.iter(|| {
                mem.copy_from_slice(&case.input);
                black_box(run(&mut mem))
            })
        });
        row.push((name, ns_per_run(&mut run, &case.input)));
    }
    group.finish();
    table.push((format!("{} ({executed} insns)", case.name), row));
}

#[cfg(target_arch = "x86_64")]
fn bench_compile(c: &mut Criterion) {
    // A long straight-line program: the sieve's body repeated, so compile time dominates.
    let body = include_str!("../examples/sieve.s");
    let program = assemble_program(body).expect("sieve assembles");
    let insns = program.insns().len() as u64;
    let helpers = Helpers::new();
    let mut group = c.benchmark_group("compile");
    group.throughput(Throughput::Elements(insns));
    group.bench_function("livebpf-jit (per program)", |b| {
        b.iter(|| JitProgram::compile(&program, &helpers, JitOptions::checked()).expect("compiles"))
    });
    let bytes: &'static [u8] = Box::leak(program.encode().into_boxed_slice());
    group.bench_function("rbpf-jit (per program)", |b| {
        b.iter(|| {
            let mut vm = rbpf::EbpfVmRaw::new(Some(bytes)).expect("rbpf accepts");
            vm.jit_compile().expect("compiles");
            vm
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut table = Vec::new();
    for case in cases() {
        bench_case(&mut c, &case, &mut table);
    }
    #[cfg(target_arch = "x86_64")]
    bench_compile(&mut c);
    c.final_summary();
    println!("\nratios (time per run relative to livebpf-interp; lower is faster):");
    for (name, row) in &table {
        let base = row
            .iter()
            .find(|(n, _)| *n == "livebpf-interp")
            .map(|(_, t)| *t)
            .unwrap_or(1.0);
        let cells: Vec<String> = row
            .iter()
            .map(|(n, t)| format!("{n} {:.0} ns ({:.3}x)", t, t / base))
            .collect();
        println!("  {name}: {}", cells.join(", "));
    }
}
