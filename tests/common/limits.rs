//! Run limits shared by the backends' test binaries: the instruction budget and a read-only
//! input, each checked in every JIT mode the binary passes in.

use livebpf::exec::{Access, ExecError, MemRegion};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::jit::{JitFn, JitOptions, JitProgram, JitStack, RunContext};

use super::progen::asm;

fn compile(src: &str, h: &Helpers, opts: JitOptions) -> JitProgram {
    JitProgram::compile(&asm(src), h, opts).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

fn exhausted(pc: usize, budget: u64) -> Result<u64, ExecError> {
    Err(ExecError::BudgetExhausted { pc, budget })
}

/// Runaway loops and recursion end with the interpreter's error at the counted instruction;
/// programs within their budget return their result; helper calls are not counted; every run
/// starts with the whole budget. `modes` may include trusted ones: the budget needs no checks.
pub fn budget_in_every_mode(modes: &[(String, JitOptions)], h: &Helpers) {
    for (mode, base) in modes {
        let run =
            |src: &str, budget: u64| compile(src, h, base.with_budget(Some(budget))).run(&mut []);
        // `ja -1`, as a label and as `ja32`: the same error as the interpreter's.
        for src in ["l:\nja l", "ja32 -1"] {
            let want = Interpreter::new(&asm(src))
                .with_budget(Some(1000))
                .run(&mut []);
            assert_eq!(want, exhausted(0, 1000));
            assert_eq!(run(src, 1000), want, "{mode}: {src}");
        }
        // A conditional back edge that is always taken (r0 >= 0 unsigned).
        let cond = "mov r0, 0\nl:\nadd r0, 1\njge r0, 0, l\nexit";
        assert_eq!(run(cond, 1 << 16), exhausted(2, 1 << 16), "{mode}");
        // Recursion: the budget runs out before the depth limit (8 frames) would.
        let recurse = "call local f\nexit\nf:\ncall local f\nexit";
        assert_eq!(run(recurse, 5), exhausted(2, 5), "{mode}");
        // Exactly `budget` events pass: ten executions of the (conditional) back edge, the last
        // one not taken.
        let ten = "mov r0, 0\nl:\nadd r0, 1\njlt r0, 10, l\nexit";
        assert_eq!(run(ten, 10), Ok(10), "{mode}");
        assert_eq!(run(ten, 9), exhausted(2, 9), "{mode}");
        // Local calls count too: three calls and three back edges.
        let calls = "mov r6, 0\nl:\ncall local f\nadd r6, 1\njlt r6, 3, l\nmov r0, r6\nexit\n\
                     f:\nmov r0, 1\nexit";
        assert_eq!(run(calls, 6), Ok(3), "{mode}");
        assert_eq!(run(calls, 5), exhausted(3, 5), "{mode}");
        assert_eq!(
            run("call local f\nexit\nf:\nmov r0, 4\nexit", 0),
            exhausted(0, 0)
        );
        // Helper calls and forward jumps are not counted.
        let straight = "mov r1, 7\ncall 5\ncall 5\nja +0\ncall 5\nexit";
        assert_eq!(run(straight, 0), Ok(7), "{mode}");
        // Each run (and `call`) starts with the whole budget.
        let jit = compile(ten, h, base.with_budget(Some(10)));
        assert_eq!(jit.budget(), Some(10));
        for _ in 0..3 {
            assert_eq!(jit.run(&mut []), Ok(10), "{mode}");
            assert_eq!(jit.call([0; 5]), Ok(10), "{mode}");
        }
        // Without a budget nothing is counted: the depth limit ends the recursion.
        let jit = compile(recurse, h, *base);
        assert_eq!(jit.budget(), None);
        assert_eq!(
            jit.run(&mut []),
            Err(ExecError::CallDepthExceeded { pc: 2 })
        );
    }
}

/// Runs `jit` through a context made by [`RunContext::init_raw`] (as a trampoline runs a
/// tracer) over `words`, read-only unless `writable`, with r1 = their address and r2 = their
/// length in bytes.
pub fn run_raw(
    jit: &JitProgram,
    h: &Helpers,
    words: &mut [u64],
    writable: bool,
) -> Result<u64, ExecError> {
    let region = MemRegion::new(words.as_mut_ptr() as u64, 8 * words.len() as u64, writable);
    let mut stack = Box::new(JitStack::new());
    let mut ctx = std::mem::MaybeUninit::<RunContext<'static>>::uninit();
    // SAFETY: `ctx` is space for a context; `words`, the stack and `h` outlive the run, and
    // nothing else touches them meanwhile.
    unsafe { RunContext::init_raw(ctx.as_mut_ptr(), region, &mut *stack, h, jit.budget()) };
    // SAFETY: the entry of a live image generated for the `JitFn` ABI; checked code only
    // touches the region and the stack (the callers compile checked programs only).
    let r0 = unsafe {
        let f = std::mem::transmute::<usize, JitFn>(jit.entry());
        f(region.start, region.len, 0, 0, 0, ctx.as_mut_ptr())
    };
    // SAFETY: initialised above, the run is over and the context is not used again.
    match unsafe { RunContext::take_raw(ctx.as_mut_ptr()) } {
        Some(e) => Err(e),
        None => Ok(r0),
    }
}

/// Checked code may read a read-only input but neither store to it (any size, any offset, also
/// store-release) nor apply atomics to it; the same programs may write a writable one.
pub fn read_only_input_in_every_mode(modes: &[(String, JitOptions)], h: &Helpers) {
    let writes = [
        ("stxb [r1+0], r2", 1, 0, Access::Store),
        ("stxh [r1+2], r2", 2, 2, Access::Store),
        ("stxw [r1+4], r2", 4, 4, Access::Store),
        ("stxdw [r1+40], r2", 8, 40, Access::Store),
        ("stdw [r1+0], 77", 8, 0, Access::Store),
        ("streldw [r1+8], r2", 8, 8, Access::Store),
        ("lock add [r1+40], r2", 8, 40, Access::Atomic),
        ("lock add32 [r1+0], r2", 4, 0, Access::Atomic),
        ("lock fetch or [r1+16], r2", 8, 16, Access::Atomic),
        ("lock xchg [r1+8], r2", 8, 8, Access::Atomic),
        ("lock cmpxchg [r1+0], r2", 8, 0, Access::Atomic),
    ];
    for (mode, opts) in modes.iter().filter(|(_, o)| o.is_checked()) {
        for &(insn, size, off, access) in &writes {
            let src = format!("mov r2, 1234\n{insn}\nmov r0, 1\nexit");
            let jit = compile(&src, h, *opts);
            // words[0] = 0 = r0, so that cmpxchg writes.
            let mut words = [0u64, 2, 3, 4, 5, 6];
            let addr = words.as_ptr() as u64 + off;
            assert_eq!(
                run_raw(&jit, h, &mut words, false),
                Err(ExecError::OutOfBounds {
                    pc: 1,
                    addr,
                    size,
                    access,
                }),
                "{mode}: {insn}"
            );
            assert_eq!(words, [0, 2, 3, 4, 5, 6], "{mode}: {insn} wrote");
            assert_eq!(run_raw(&jit, h, &mut words, true), Ok(1), "{mode}: {insn}");
            assert_ne!(words, [0, 2, 3, 4, 5, 6], "{mode}: {insn} did not write");
        }
        // Loads of every size and a load-acquire still work.
        let src = "ldxb r0, [r1+40]\nldxh r3, [r1+32]\nadd r0, r3\nldxw r3, [r1+0]\nadd r0, r3\n\
                   ldxdw r3, [r1+8]\nadd r0, r3\nldacqdw r3, [r1+16]\nadd r0, r3\nexit";
        let jit = compile(src, h, *opts);
        let mut words = [1u64, 20, 300, 4, 5000, 60];
        assert_eq!(
            run_raw(&jit, h, &mut words, false),
            Ok(1 + 20 + 300 + 5000 + 60)
        );
        // The stack stays writable.
        let jit = compile(
            "mov r2, 5\nstxdw [r10-8], r2\nldxdw r0, [r10-8]\nexit",
            h,
            *opts,
        );
        assert_eq!(run_raw(&jit, h, &mut words, false), Ok(5), "{mode}");
    }
}
