//! JIT vs interpreter vs rbpf (JIT and interpreter) on the same programs, in one run, plus JIT
//! compile time per instruction. Criterion reports each engine; a ratio table follows at the end.
//!
//! Every program gets `mov %r2, N` prepended (N = input length), because rbpf's raw VM passes only
//! the memory address in r1.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use livebpf::asm::assemble_program;
#[cfg(target_arch = "x86_64")]
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::Program;
#[cfg(target_arch = "x86_64")]
use livebpf::jit::{JitOptions, JitProgram};

struct Case {
    name: &'static str,
    program: Program,
    input: Vec<u8>,
}

fn case(name: &'static str, src: &str, input: Vec<u8>) -> Case {
    let src = format!("mov %r2, {}\n{src}", input.len());
    let program = assemble_program(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
    Case {
        name,
        program,
        input,
    }
}

fn cases() -> Vec<Case> {
    let n = 16 * 1024;
    let mut copy = vec![0u8; n];
    for (i, b) in copy[..n / 2].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let mut strings = vec![b'a'; n];
    strings[n / 2 - 1] = 0;
    strings[n - 1] = 0;
    vec![
        case("sieve", include_str!("../examples/sieve.s"), vec![0; n]),
        case("memcpy", include_str!("programs/memcpy.s"), copy),
        case("strcmp", include_str!("programs/strcmp.s"), strings),
        case("switch", include_str!("programs/switch.s"), vec![0; n]),
    ]
}

/// One engine, ready to run a case's program on a fresh copy of its input.
type Runner = Box<dyn FnMut(&mut [u8]) -> u64>;

fn engines(case: &Case) -> Vec<(&'static str, Runner)> {
    let bytes = case.program.encode();
    let mut out: Vec<(&'static str, Runner)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let helpers = Helpers::new();
        let checked = JitProgram::compile(&case.program, &helpers, JitOptions::checked())
            .expect("JIT compiles");
        out.push((
            "livebpf-jit-checked",
            Box::new(move |mem| checked.run(mem).expect("runs")),
        ));
        // SAFETY: the benchmark programs only touch their input memory, within bounds (their
        // results match the checked engines, which the assertion in `bench_case` verifies).
        let trusted_opts = unsafe { JitOptions::trusted() };
        let trusted =
            JitProgram::compile(&case.program, &helpers, trusted_opts).expect("JIT compiles");
        out.push((
            "livebpf-jit-trusted",
            Box::new(move |mem| trusted.run(mem).expect("runs")),
        ));
    }
    let program = case.program.clone();
    out.push((
        "livebpf-interp",
        Box::new(move |mem| Interpreter::new(&program).run(mem).expect("runs")),
    ));
    let rbpf_bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    let vm = rbpf::EbpfVmRaw::new(Some(rbpf_bytes)).expect("rbpf accepts the program");
    out.push((
        "rbpf-interp",
        Box::new(move |mem| vm.execute_program(mem).expect("rbpf runs")),
    ));
    #[cfg(target_arch = "x86_64")]
    {
        let mut vm = rbpf::EbpfVmRaw::new(Some(rbpf_bytes)).expect("rbpf accepts the program");
        vm.jit_compile().expect("rbpf JIT compiles");
        out.push((
            "rbpf-jit",
            // SAFETY: rbpf's JIT runs the same in-bounds programs; see above.
            Box::new(move |mem| unsafe { vm.execute_program_jit(mem) }.expect("rbpf runs")),
        ));
    }
    out
}

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

/// A quick independent timing for the ratio table (criterion keeps its estimates to itself).
fn ns_per_run(run: &mut Runner, input: &[u8]) -> f64 {
    let mut mem = input.to_vec();
    let budget = Duration::from_millis(300);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < budget {
        mem.copy_from_slice(input);
        black_box(run(&mut mem));
        runs += 1;
    }
    start.elapsed().as_nanos() as f64 / runs as f64
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
