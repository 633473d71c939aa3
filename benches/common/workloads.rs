//! The loop workloads every JIT comparison runs (`benches/jit.rs`, `benches/fastpath.rs`):
//! programs, inputs, and each engine that runs them — livebpf's JIT (checked and trusted) and
//! interpreter, rbpf's JIT and interpreter.
//!
//! Every program gets `mov %r2, N` prepended (N = input length), because rbpf's raw VM passes only
//! the memory address in r1.
// Each benchmark that includes this module uses only part of it.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use livebpf::asm::assemble_program;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::Program;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use livebpf::jit::{JitOptions, JitProgram};

/// A program and the input it runs on.
pub struct Case {
    pub name: &'static str,
    pub program: Program,
    pub input: Vec<u8>,
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

/// The workloads: prime sieve, 512-byte copies, string compare, switch, Collatz, a stack histogram.
pub fn cases() -> Vec<Case> {
    let n = 16 * 1024;
    let mut copy = vec![0u8; n];
    for (i, b) in copy[..n / 2].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let mut strings = vec![b'a'; n];
    strings[n / 2 - 1] = 0;
    strings[n - 1] = 0;
    let histogram: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
    vec![
        case("sieve", include_str!("../../examples/sieve.s"), vec![0; n]),
        case("memcpy", include_str!("../programs/memcpy.s"), copy),
        case("strcmp", include_str!("../programs/strcmp.s"), strings),
        case("switch", include_str!("../programs/switch.s"), vec![0; n]),
        case("collatz", include_str!("../programs/collatz.s"), vec![0; n]),
        case(
            "histogram",
            include_str!("../programs/histogram.s"),
            histogram,
        ),
    ]
}

/// One engine, ready to run a case's program on a fresh copy of its input.
pub type Runner = Box<dyn FnMut(&mut [u8]) -> u64>;

/// Every engine that can run `case` on this host.
pub fn engines(case: &Case) -> Vec<(&'static str, Runner)> {
    let bytes = case.program.encode();
    let mut out: Vec<(&'static str, Runner)> = Vec::new();
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
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
    // Built once, as a user keeps an interpreter per program.
    let program: &'static Program = Box::leak(Box::new(case.program.clone()));
    let interp = Interpreter::new(program);
    out.push((
        "livebpf-interp",
        Box::new(move |mem| interp.run(mem).expect("runs")),
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

/// A quick independent timing for the ratio table (criterion keeps its estimates to itself).
pub fn ns_per_run(run: &mut Runner, input: &[u8]) -> f64 {
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
