//! The stack contract: a run never sees another run's stack data, although no engine clears the
//! whole stack per run any more. Each function zeroes what it can reach (its proven
//! `StackReach`) when it is entered; what lies below that window is out of bounds for checked
//! runs, identically in the interpreter and the JITs.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use livebpf::asm::assemble_program;
use livebpf::exec::{Access, ExecError, TOTAL_STACK};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::{Program, StackReach};
use livebpf::jit::{JitOptions, JitProgram, JitStack};
use livebpf::trampoline::{AttachKind, Prog, attach};

fn program(src: &str) -> Program {
    assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

extern "C" fn identity(a: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    a
}

fn helpers() -> Helpers {
    let mut h = Helpers::new();
    h.register(5, identity);
    h
}

fn modes() -> Vec<(&'static str, JitOptions)> {
    // SAFETY: the trusted programs below touch only their own stack.
    vec![
        ("checked", JitOptions::checked()),
        ("trusted", unsafe { JitOptions::trusted() }),
    ]
}

/// Writes 0x55.. over `bytes` of its frame, deepest first, then returns.
fn dirty(bytes: usize) -> Program {
    let mut src = String::new();
    for off in (8..=bytes).step_by(8) {
        src += &format!("lddw r1, 0x5555555555555555\nstxdw [r10-{off}], r1\n");
    }
    src += "mov r0, 0\nexit";
    program(&src)
}

/// Sums every 8-byte word of the top `bytes` of its frame without writing any.
fn sum(bytes: usize) -> Program {
    let mut src = "mov r0, 0\n".to_string();
    for off in (8..=bytes).step_by(8) {
        src += &format!("ldxdw r1, [r10-{off}]\nadd r0, r1\n");
    }
    src += "exit";
    program(&src)
}

#[test]
fn reads_of_unwritten_stack_are_zero_after_another_run_dirtied_it() {
    let (dirty, sum) = (dirty(512), sum(512));
    assert_eq!(sum.stack_reach(0), StackReach::Bytes(512));
    let h = helpers();
    for (name, opts) in modes() {
        let d = JitProgram::compile(&dirty, &h, opts).unwrap();
        let s = JitProgram::compile(&sum, &h, opts).unwrap();
        let mut stack = Box::new(JitStack::new());
        assert_eq!(d.run_with_stack(&mut [], &mut stack), Ok(0));
        assert_eq!(s.run_with_stack(&mut [], &mut stack), Ok(0), "{name}");
        // Fresh stacks (what `call` and `run` use) too, after dirty runs on this thread.
        assert_eq!(d.call([0; 5]), Ok(0));
        assert_eq!(s.call([0; 5]), Ok(0), "{name}");
    }
    let mut stack = [0x5555_5555_5555_5555u64; TOTAL_STACK / 8];
    let s = Interpreter::new(&sum);
    assert_eq!(s.run_with_stack(&mut [], &mut stack), Ok(0));
}

#[test]
fn a_bounded_index_keeps_the_window_and_reads_zero() {
    // Reads bucket (input byte & 63) of a 64-word array at r10 - 512 before any write: the
    // index is bounded, so the reach is the array, not the whole stack, and still zeroed.
    let read = program(
        "ldxb r2, [r1+0]\nand r2, 63\nlsh r2, 3\nmov r3, r10\nadd r3, -512\nadd r3, r2\n\
         ldxdw r0, [r3+0]\nexit",
    );
    assert_eq!(read.stack_reach(0), StackReach::Bytes(512));
    let h = helpers();
    for (name, opts) in modes() {
        let d = JitProgram::compile(&dirty(512), &h, opts).unwrap();
        let r = JitProgram::compile(&read, &h, opts).unwrap();
        let mut stack = Box::new(JitStack::new());
        for byte in [0u8, 1, 17, 63, 64, 255] {
            assert_eq!(d.run_with_stack(&mut [], &mut stack), Ok(0));
            assert_eq!(
                r.run_with_stack(&mut [byte], &mut stack),
                Ok(0),
                "{name}, {byte}"
            );
        }
    }
    let mut stack = [0x5555_5555_5555_5555u64; TOTAL_STACK / 8];
    assert_eq!(
        Interpreter::new(&read).run_with_stack(&mut [9], &mut stack),
        Ok(0)
    );
}

#[test]
fn callee_frames_start_zeroed() {
    // The first call dirties the callee's frame; the second callee reads it.
    let src = "call local dirty\ncall local read\nexit\n\
               dirty:\nlddw r1, 0x7777\nstxdw [r10-16], r1\nmov r0, 0\nexit\n\
               read:\nldxdw r0, [r10-16]\nexit";
    let p = program(src);
    let h = helpers();
    // The frame of `read` is the frame `dirty` used, in the same run: the interpreter's
    // semantics (frames are not cleared between calls) are what every engine keeps.
    let expected = Interpreter::new(&p).with_helpers(h.clone()).run(&mut []);
    assert_eq!(expected, Ok(0x7777));
    for (name, opts) in modes() {
        let j = JitProgram::compile(&p, &h, opts).unwrap();
        let mut stack = Box::new(JitStack::new());
        assert_eq!(j.run_with_stack(&mut [], &mut stack), expected, "{name}");
    }
    // A different run on the same stack starts over: nothing of the earlier run is visible.
    let read_only = program("call local read\nexit\nread:\nldxdw r0, [r10-16]\nexit");
    for (name, opts) in modes() {
        let w = JitProgram::compile(&p, &h, opts).unwrap();
        let r = JitProgram::compile(&read_only, &h, opts).unwrap();
        let mut stack = Box::new(JitStack::new());
        assert_eq!(w.run_with_stack(&mut [], &mut stack), Ok(0x7777));
        assert_eq!(r.run_with_stack(&mut [], &mut stack), Ok(0), "{name}");
    }
}

#[test]
fn checked_access_below_the_window_is_out_of_bounds_in_every_engine() {
    // The analysis sees a helper argument 8 bytes down; the helper hands the address back,
    // and the program reads 600 bytes below it, where it never proved it would reach.
    let p = program("mov r1, r10\nadd r1, -8\ncall 5\nldxdw r0, [r0-600]\nexit");
    assert_eq!(p.stack_reach(0), StackReach::Bytes(8));
    let h = helpers();
    let interp = Interpreter::new(&p).with_helpers(h.clone()).run(&mut []);
    let Err(ExecError::OutOfBounds {
        pc: 3,
        size: 8,
        access: Access::Load,
        addr,
    }) = interp
    else {
        panic!("{interp:?}");
    };
    assert_eq!(addr % 8, 0, "{addr:#x}");
    let j = JitProgram::compile(&p, &h, JitOptions::checked()).unwrap();
    let got = j.run(&mut []);
    assert!(
        matches!(
            got,
            Err(ExecError::OutOfBounds {
                pc: 3,
                size: 8,
                access: Access::Load,
                ..
            })
        ),
        "{got:?}"
    );
    // Within the window it is fine.
    let p = program("mov r1, r10\nadd r1, -8\ncall 5\nldxdw r0, [r0]\nexit");
    assert_eq!(
        Interpreter::new(&p).with_helpers(h.clone()).run(&mut []),
        Ok(0)
    );
    let j = JitProgram::compile(&p, &h, JitOptions::checked()).unwrap();
    assert_eq!(j.run(&mut []), Ok(0));
}

#[test]
fn unbounded_programs_get_the_whole_stack() {
    // A variable offset from r10: the whole stack is zeroed and accessible.
    let p = program("mov r1, r10\nsub r1, r2\nldxdw r0, [r1]\nexit");
    assert_eq!(p.stack_reach(0), StackReach::Unbounded);
    let h = helpers();
    let dirty = dirty(512);
    for (name, opts) in modes() {
        let j = JitProgram::compile(&p, &h, opts).unwrap();
        let d = JitProgram::compile(&dirty, &h, opts).unwrap();
        let mut stack = Box::new(JitStack::new());
        assert_eq!(d.run_with_stack(&mut [], &mut stack), Ok(0));
        for depth in [8u64, 512, 4096] {
            assert_eq!(j.call([0, depth, 0, 0, 0]), Ok(0), "{name} {depth}");
        }
    }
}

#[test]
fn every_tracer_run_starts_with_a_clean_stack() {
    // fmod_ret returns what it finds at r10-8, then leaves 7 there: a reused tracer stack that
    // was not cleaned would make the second call return 7 instead of running the target.
    let target = Prog::load(
        &program("mov r0, 1\nexit"),
        &Helpers::new(),
        JitOptions::checked(),
    )
    .unwrap();
    let tracer = Prog::load(
        &program("ldxdw r0, [r10-8]\nstdw [r10-8], 7\nexit"),
        &Helpers::new(),
        JitOptions::checked(),
    )
    .unwrap();
    let _link = attach(AttachKind::FmodRet, &target, &tracer, 0).unwrap();
    for _ in 0..3 {
        assert_eq!(target.call([0; 5]), Ok(1));
    }
}
