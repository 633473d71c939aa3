//! Interpreter throughput: the baseline the JITs are compared with.
//!
//! Reports instructions per second (criterion's "elements") on a loop-heavy prime sieve.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use livebpf::asm::assemble_program;
use livebpf::interp::Interpreter;

const SIEVE: &str = include_str!("../examples/sieve.s");
const SIEVE_N: usize = 16 * 1024;

fn interp(c: &mut Criterion) {
    let program = assemble_program(SIEVE).expect("sieve assembles");
    let interp = Interpreter::new(&program);
    let mut mem = vec![0u8; SIEVE_N];
    let (primes, executed) = interp.run_counted(&mut mem).expect("sieve runs");
    assert_eq!(primes, 1900, "primes below 16384");
    let mut group = c.benchmark_group("sieve");
    group.throughput(Throughput::Elements(executed));
    group.bench_function("interp", |b| {
        b.iter(|| {
            mem.fill(0);
            interp.run(&mut mem).expect("sieve runs")
        })
    });
    group.finish();
}

criterion_group!(benches, interp);
criterion_main!(benches);
