//! The README's library example: run a program in the interpreter and the JIT, attach an fexit
//! tracer to it live, and show that the tracer ran. `cargo run --release --example library`.
use std::sync::atomic::{AtomicU64, Ordering};

use livebpf::trampoline::set_stats_enabled;
use livebpf::{AttachKind, Helpers, Interpreter, JitOptions, Prog, assemble_program, attach};

/// How often the tracer saw the target return 42 (a helper the tracer calls).
static SAW_42: AtomicU64 = AtomicU64::new(0);

extern "C" fn saw_42(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    SAW_42.fetch_add(1, Ordering::Relaxed);
    0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The interpreter, the oracle: r0 = r1 + r2 over an 8-byte input (r1 = its address).
    let program = assemble_program("mov %r0, %r2\nadd %r0, 34\nexit\n")?;
    let r0 = Interpreter::new(&program)
        .with_budget(Some(1_000_000))
        .run(&mut [0u8; 8])?;
    assert_eq!(r0, 42); // r2 = 8, the input's length

    // A JIT-compiled program other threads may call, and a tracer attached to it while they do.
    let target = Prog::load(
        &assemble_program("mov %r0, %r1\nadd %r0, %r2\nexit\n")?,
        &Helpers::new(),
        JitOptions::checked(),
    )?;
    // The fexit tracer sees the target's arguments and return value in its read-only context
    // (six u64s: r1..r5, then r0) and calls helper 1000 when the result was 42.
    let mut helpers = Helpers::new();
    helpers.register(1000, saw_42);
    let tracer = Prog::load(
        &assemble_program("ldxdw %r2, [%r1+40]\njne %r2, 42, +1\ncall 1000\nmov %r0, 0\nexit\n")?,
        &helpers,
        JitOptions::checked(),
    )?;
    set_stats_enabled(true);
    let link = attach(AttachKind::Fexit, &target, &tracer, /* cookie */ 7)?;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || {
                (0..1000).all(|i| target.call([i, 42 - i, 0, 0, 0]) == Ok(42))
            })
        })
        .collect();
    for h in handles {
        assert!(
            h.join().expect("runner thread"),
            "a run returned a wrong result"
        );
    }
    link.detach()?; // the old trampoline is retired once no thread can be inside it
    let stats = tracer.stats();
    let saw = SAW_42.load(Ordering::Relaxed);
    println!(
        "target ran 4000 times; the fexit tracer ran {} times, saw 42 returned {saw} times, {} errors",
        stats.run_cnt, stats.errors
    );
    assert_eq!((stats.run_cnt, saw, stats.errors), (4000, 4000, 0));
    Ok(())
}
