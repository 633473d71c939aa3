//! Checked JIT code skips the bounds test of accesses the range analysis proves inside their
//! function's frame (`Program::in_frame`): stack arrays indexed by a loop counter bounded by a
//! comparison, by a masked or reduced value, at constant offsets. These tests prove that an
//! elided check never hides a fault: every program runs on the interpreter (which checks every
//! access) and on checked JIT code, over a grid of bases, bounds, strides and sizes placed right
//! at the frame's edges, and over random ones; results, errors and memory must agree. They also
//! check that the analysis does elide (the code is shorter than with the check) so the comparison
//! covers elided accesses.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use common::progen;
use livebpf::exec::ExecError;
use livebpf::helpers::Helpers;
use livebpf::isa::Program;
use livebpf::jit::{JitOptions, JitProgram};
use proptest::prelude::*;

/// The comparison that ends the loop over `i = 0, 1, ...`: every form runs `bound` iterations.
#[derive(Clone, Copy, Debug)]
enum Exit {
    /// `jge i, bound, done`
    Ge,
    /// `jgt i, bound - 1, done` (`jeq i, 0, done` for no iterations)
    Gt,
    /// `jsge i, bound, done` (a signed test of a counter known non-negative)
    SignedGe,
    /// `jlt i, bound, body` then `ja done`
    Lt,
}

/// One stack-array loop: `for i in 0..bound { p = r10 + base + (i << shift); access p + off }`
/// with `size`-byte accesses, storing `i + 1` then loading it back into a running sum.
#[derive(Clone, Copy, Debug)]
struct Shape {
    base: i32,
    off: i16,
    shift: u8,
    bound: i32,
    size: u8,
    exit: Exit,
    /// Index through `and i, mask` instead of `i` itself (then `i` only counts).
    mask: Option<i32>,
}

fn suffix(size: u8) -> &'static str {
    match size {
        1 => "b",
        2 => "h",
        4 => "w",
        _ => "dw",
    }
}

fn source(s: &Shape) -> String {
    let sz = suffix(s.size);
    let test = match s.exit {
        Exit::Ge => format!("jge r4, {}, done", s.bound),
        // `jgt i, -1` never exits (-1 is u64::MAX unsigned): with no iterations to run, the
        // test is `jeq i, 0` (true at once) instead.
        Exit::Gt if s.bound == 0 => "jeq r4, 0, done".to_string(),
        Exit::Gt => format!("jgt r4, {}, done", s.bound - 1),
        Exit::SignedGe => format!("jsge r4, {}, done", s.bound),
        Exit::Lt => format!("jlt r4, {}, body\nja done\nbody:", s.bound),
    };
    let index = match s.mask {
        Some(m) => format!("mov r5, r4\nand r5, {m}"),
        None => "mov r5, r4".to_string(),
    };
    format!(
        "mov r6, 0
mov r4, 0
loop:
{test}
{index}
lsh r5, {shift}
mov r3, r10
add r3, {base}
add r3, r5
mov r7, r4
add r7, 1
stx{sz} [r3{off:+}], r7
ldx{sz} r7, [r3{off:+}]
add r6, r7
add r4, 1
ja loop
done:
mov r0, r6
exit",
        shift = s.shift,
        base = s.base,
        off = s.off,
    )
}

fn program(s: &Shape) -> Program {
    progen::asm(&source(s))
}

/// Whether every access of `s` stays in `[r10 - 512, r10)`, worked out directly.
fn stays_in_frame(s: &Shape) -> bool {
    if s.bound <= 0 {
        return true;
    }
    let index_max = match s.mask {
        Some(m) => (s.bound as i64 - 1).min(m as i64),
        None => s.bound as i64 - 1,
    };
    let low = s.base as i64 + s.off as i64;
    let high = s.base as i64 + (index_max << s.shift) + s.off as i64 + s.size as i64;
    low >= -512 && high <= 0
}

fn checked_modes() -> Vec<(String, JitOptions)> {
    vec![("checked".to_string(), JitOptions::checked())]
}

/// The program's accesses the analysis proves in frame.
fn proven(p: &Program) -> usize {
    (0..p.insns().len()).filter(|&i| p.in_frame(i)).count()
}

/// Runs `s` on the interpreter and the checked JIT (comparing everything); returns the
/// interpreter's result.
fn compare(s: &Shape) -> Result<u64, ExecError> {
    let p = program(s);
    if proven(&p) > 0 {
        assert!(
            stays_in_frame(s),
            "proved out-of-frame accesses in frame: {s:?}"
        );
    }
    progen::differential(&p, &[0u8; 16], &Helpers::new(), &checked_modes())
}

#[test]
fn a_grid_at_the_frame_edges() {
    let (mut elided, mut faulted) = (0, 0);
    for size in [1u8, 2, 4, 8] {
        for shift in [0u8, 1, 3] {
            for bound in [0, 1, 2, 63, 64, 65] {
                // Bases where the array's top end lands just inside or just past r10, and where
                // its bottom end lands at or past the frame's floor.
                let span = ((bound.max(1) as i64 - 1) << shift) + size as i64;
                for base in [-span - 1, -span, -span + 1, -512, -513, -8] {
                    for exit in [Exit::Ge, Exit::Gt, Exit::SignedGe, Exit::Lt] {
                        let s = Shape {
                            base: base as i32,
                            off: 0,
                            shift,
                            bound,
                            size,
                            exit,
                            mask: None,
                        };
                        let p = program(&s);
                        elided += (proven(&p) > 0) as usize;
                        faulted += compare(&s).is_err() as usize;
                    }
                }
            }
        }
    }
    // The grid covers both sides of the edge.
    assert!(elided > 100, "only {elided} shapes were elided");
    assert!(faulted > 100, "only {faulted} shapes faulted");
}

#[test]
fn a_proven_loop_has_no_bounds_test_and_an_unproven_one_faults_alike() {
    let inside = Shape {
        base: -512,
        off: 0,
        shift: 3,
        bound: 64,
        size: 8,
        exit: Exit::Ge,
        mask: None,
    };
    let past = Shape {
        bound: 65,
        ..inside
    };
    let (pi, pp) = (program(&inside), program(&past));
    assert_eq!(proven(&pi), 2, "the store and the load");
    assert_eq!(proven(&pp), 0);
    let code = |p: &Program| {
        JitProgram::compile(p, &Helpers::new(), JitOptions::checked())
            .unwrap()
            .code()
            .len()
    };
    assert!(
        code(&pi) < code(&pp),
        "the proven loop's code ({}) is not shorter than the checked one's ({})",
        code(&pi),
        code(&pp)
    );
    assert_eq!(compare(&inside), Ok((1..=64).sum()));
    assert!(matches!(compare(&past), Err(ExecError::OutOfBounds { .. })));
}

#[test]
fn every_exit_form_runs_no_iterations_for_a_zero_bound() {
    // A masked index never leaves the frame, so only the loop's test can end the loop.
    for exit in [Exit::Ge, Exit::Gt, Exit::SignedGe, Exit::Lt] {
        let s = Shape {
            base: -64,
            off: 0,
            shift: 0,
            bound: 0,
            size: 1,
            exit,
            mask: Some(7),
        };
        assert_eq!(compare(&s), Ok(0), "{exit:?}");
    }
}

#[test]
fn masks_bound_an_index_the_loop_does_not() {
    for (mask, base) in [(63, -512), (63, -511), (15, -128), (15, -127)] {
        let s = Shape {
            base,
            off: 0,
            shift: 3,
            bound: 200,
            size: 8,
            exit: Exit::Ge,
            mask: Some(mask),
        };
        let p = program(&s);
        assert_eq!(proven(&p) > 0, stays_in_frame(&s), "{s:?}");
        compare(&s).ok();
    }
}

proptest! {
    #![proptest_config(progen::proptest_config("LIVEBPF_PROPTEST_CASES", 256))]

    #[test]
    fn random_stack_loops_agree_with_the_interpreter(
        base in -700i32..40,
        off in -64i16..64,
        shift in 0u8..4,
        bound in 0i32..140,
        size in prop::sample::select(vec![1u8, 2, 4, 8]),
        exit in prop::sample::select(vec![Exit::Ge, Exit::Gt, Exit::SignedGe, Exit::Lt]),
        mask in prop::option::of(prop::sample::select(vec![0i32, 1, 7, 31, 63, 127])),
    ) {
        let s = Shape { base, off, shift, bound, size, exit, mask };
        let _ = compare(&s);
    }
}
