//! Which memory accesses provably stay inside their function's stack frame: the accesses a
//! checked engine may run without a bounds check.
//!
//! A must-analysis per function (the program's entry and every local call target), over
//! intervals: a register is either a small non-negative scalar `[lo, hi]` (below 2^31, so its
//! 32- and 64-bit, signed and unsigned readings agree), the function's r10 moved by an offset in
//! `[lo, hi]`, or unknown. Moves, constant and scalar `add`/`sub`, `and`/`mod`/`rsh`/`lsh`/`mul`
//! by constants and byte/half-word loads produce intervals; a conditional jump against a
//! constant, or a scalar register, narrows its `dst` on each edge (`jlt r4, 64` makes r4 `[0,
//! 63]` where it is taken, whatever r4 was). Loops converge by widening what still grows to
//! unknown after a few rounds; the narrowing at the loop's own test then bounds the induction
//! variable again. Calls clobber r0–r9 (a callee's r6–r9 are not trusted to be preserved).
//!
//! An access through `r10 + [lo, hi]` with displacement `off` and size `n` is *in frame* when
//! `lo + off >= -floor` and `hi + off + n <= 0`, where `floor` is the smaller of a frame's 512
//! bytes and the function's [`StackReach`]: every engine's stack window covers
//! `[r10 - floor, r10)` once the function is entered (its reach was reserved; a frame's 512 bytes
//! always lie inside the stack). Such an access cannot fault on bounds, so checked code may skip
//! the test; the interpreter checks every access anyway, and the differential tests compare.
//! Alignment checks are not affected.

use super::dataflow::memory_access;
use super::reach::FRAME_SIZE;
use super::{AluOp, AtomicOp, Insn, JmpCond, Program, Size, Source, StackReach, Width};

/// Scalars are tracked only in `[0, SCALAR_END)`.
const SCALAR_END: i64 = 1 << 31;
/// Offsets from r10 are tracked only within `±FP_LIMIT`.
const FP_LIMIT: i64 = 1 << 20;
/// How often an instruction's state may change before what still grows becomes unknown.
const WIDEN_AFTER: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Val {
    Unknown,
    /// A value in `[lo, hi]`, `0 <= lo <= hi < SCALAR_END`.
    Scalar(i64, i64),
    /// The function's r10 plus an offset in `[lo, hi]`.
    Fp(i64, i64),
}

use Val::{Fp, Scalar, Unknown};

fn scalar(lo: i64, hi: i64) -> Val {
    if 0 <= lo && lo <= hi && hi < SCALAR_END {
        Scalar(lo, hi)
    } else {
        Unknown
    }
}

fn fp(lo: i64, hi: i64) -> Val {
    if -FP_LIMIT <= lo && lo <= hi && hi <= FP_LIMIT {
        Fp(lo, hi)
    } else {
        Unknown
    }
}

impl Val {
    fn join(self, other: Val) -> Val {
        match (self, other) {
            (Scalar(a, b), Scalar(c, d)) => Scalar(a.min(c), b.max(d)),
            (Fp(a, b), Fp(c, d)) => Fp(a.min(c), b.max(d)),
            _ => Unknown,
        }
    }

    /// The value as an unsigned interval (`None`: anything).
    fn range(self) -> Option<(i64, i64)> {
        match self {
            Scalar(lo, hi) => Some((lo, hi)),
            _ => None,
        }
    }
}

/// The constant of an immediate operand as the 64-bit (sign-extended) or 32-bit value it is.
fn imm_value(width: Width, k: i32) -> i64 {
    match width {
        Width::W64 => k as i64,
        Width::W32 => k as u32 as i64,
    }
}

/// `dst op src` on intervals.
fn alu(width: Width, op: AluOp, d: Val, s: Val) -> Val {
    let w64 = width == Width::W64;
    match (op, d, s) {
        (AluOp::Mov, _, Scalar(..)) => s,
        (AluOp::Mov, _, Fp(..)) if w64 => s,
        (AluOp::Add, Scalar(a, b), Scalar(c, e)) => scalar(a + c, b + e),
        (AluOp::Add, Fp(a, b), Scalar(c, e)) | (AluOp::Add, Scalar(c, e), Fp(a, b)) if w64 => {
            fp(a + c, b + e)
        }
        (AluOp::Sub, Scalar(a, b), Scalar(c, e)) => scalar(a - e, b - c),
        (AluOp::Sub, Fp(a, b), Scalar(c, e)) if w64 => fp(a - e, b - c),
        (AluOp::Mul, Scalar(a, b), Scalar(c, e)) => scalar(a * c, b * e),
        (AluOp::And, _, Scalar(_, e)) => match d {
            Scalar(_, b) => scalar(0, b.min(e)),
            Fp(..) => Unknown,
            Unknown => scalar(0, e),
        },
        (AluOp::Mod, _, Scalar(c, e)) if c > 0 => match d {
            Scalar(_, b) => scalar(0, b.min(e - 1)),
            Fp(..) => Unknown,
            Unknown => scalar(0, e - 1),
        },
        (AluOp::Div, Scalar(a, b), Scalar(c, e)) if c > 0 => scalar(a / e, b / c),
        (AluOp::Rsh, _, Scalar(k, k2)) if k == k2 => {
            let bits = if w64 { 64 } else { 32 };
            let k = k % bits;
            match d {
                Scalar(a, b) => scalar(a >> k, b >> k),
                Fp(..) => Unknown,
                // The most a `bits`-wide value shifted right by k can be.
                Unknown if k > 0 => scalar(0, (u64::MAX >> (64 - bits + k)) as i64),
                Unknown => Unknown,
            }
        }
        (AluOp::Lsh, Scalar(a, b), Scalar(k, k2)) if k == k2 && k < 31 => scalar(a << k, b << k),
        _ => Unknown,
    }
}

/// `dst op k`: constants of either sign move an interval; the rest is [`alu`]'s.
fn alu_imm(width: Width, op: AluOp, d: Val, k: i64) -> Val {
    let w64 = width == Width::W64;
    match (op, d) {
        (AluOp::Add, Scalar(a, b)) => scalar(a + k, b + k),
        (AluOp::Sub, Scalar(a, b)) => scalar(a - k, b - k),
        (AluOp::Add, Fp(a, b)) if w64 => fp(a + k, b + k),
        (AluOp::Sub, Fp(a, b)) if w64 => fp(a - k, b - k),
        _ => alu(width, op, d, scalar(k, k)),
    }
}

/// Narrows `d` to the values for which `d cond s` is `taken`, comparing as unsigned (both are
/// non-negative below 2^31 when signed compares get here). `None`: no such value.
fn narrow(cond: JmpCond, taken: bool, d: Val, s: (i64, i64)) -> Option<Val> {
    use JmpCond::*;
    // Normalise to `d < bound` / `d <= bound` / `d > bound` / `d >= bound` on this edge.
    let (slo, shi) = s;
    let cond = match (cond, taken) {
        (c, true) => c,
        (Lt | Slt, false) => Ge,
        (Le | Sle, false) => Gt,
        (Gt | Sgt, false) => Le,
        (Ge | Sge, false) => Lt,
        (Eq, false) => Ne,
        (Ne, false) => Eq,
        (c, false) => c,
    };
    let (lo, hi) = match d {
        Scalar(a, b) => (a, b),
        Fp(..) => return Some(d),
        Unknown => (0, i64::MAX),
    };
    let (lo, hi) = match cond {
        Lt | Slt => (lo, hi.min(shi - 1)),
        Le | Sle => (lo, hi.min(shi)),
        Gt | Sgt => (lo.max(slo + 1), hi),
        Ge | Sge => (lo.max(slo), hi),
        Eq if slo == shi => (lo.max(slo), hi.min(shi)),
        _ => return Some(d),
    };
    if lo > hi {
        return None;
    }
    Some(if hi < SCALAR_END { Scalar(lo, hi) } else { d })
}

/// The two successors' states of a conditional jump: (taken, fallthrough); `None` where the
/// edge cannot be taken.
fn branch(
    width: Width,
    cond: JmpCond,
    regs: &[Val; 11],
    dst: usize,
    src: Source,
) -> [Option<[Val; 11]>; 2] {
    let d = regs[dst];
    let s = match src {
        Source::Imm(k) => {
            let v = imm_value(width, k);
            (0..SCALAR_END).contains(&v).then_some((v, v))
        }
        Source::Reg(r) => regs[r.index()].range(),
    };
    let signed = matches!(
        cond,
        JmpCond::Sgt | JmpCond::Sge | JmpCond::Slt | JmpCond::Sle
    );
    // A 32-bit compare reads the low half, which is the value only for a tracked scalar; a
    // signed compare agrees with the unsigned one when both sides are small scalars.
    let usable = match (s, d) {
        (None, _) | (_, Fp(..)) => false,
        (Some(_), Unknown) => width == Width::W64 && !signed,
        (Some(_), Scalar(..)) => true,
    };
    let edge = |taken: bool| {
        let mut out = *regs;
        if usable && cond != JmpCond::Set {
            out[dst] = narrow(cond, taken, d, s.expect("usable"))?;
        }
        Some(out)
    };
    [edge(true), edge(false)]
}

/// The state before each instruction of one function (`None`: not reached), computed once per
/// function and shared by the reach analysis (scalar ranges) and [`analyse`] (the verdicts).
pub(super) struct FunctionStates(Vec<Option<[Val; 11]>>);

impl FunctionStates {
    /// The states of the function entered at `entry`.
    pub(super) fn of(program: &Program, entry: usize) -> FunctionStates {
        FunctionStates(function(program, entry))
    }

    /// The range of register `r` before instruction `i`, where it holds a tracked scalar on
    /// every path (`None` otherwise, and where `i` is not reached). For the reach analysis,
    /// which can then follow `r10 + index` instead of giving up on it.
    pub(super) fn range(&self, i: usize, r: usize) -> Option<(i64, i64)> {
        self.0
            .get(i)
            .copied()
            .flatten()
            .and_then(|regs| regs[r].range())
    }
}

/// Per instruction: whether the access there is in frame in every function that reaches it.
/// `states[k]` are the states of the function `entries[k]` enters.
pub(super) fn analyse(
    program: &Program,
    entries: &[(usize, StackReach)],
    states: &[FunctionStates],
) -> Vec<bool> {
    let n = program.insns().len();
    let mut verdict: Vec<Option<bool>> = vec![None; n];
    for (&(_, reach), states) in entries.iter().zip(states) {
        let floor = match reach {
            StackReach::Bytes(r) => (r as i64).min(FRAME_SIZE),
            StackReach::Unbounded => FRAME_SIZE,
        };
        for (i, state) in states.0.iter().enumerate() {
            let Some(regs) = state else { continue };
            let ok = in_frame(&program.insns()[i], regs, floor);
            let v = verdict[i].get_or_insert(true);
            *v &= ok;
        }
    }
    verdict.into_iter().map(|v| v == Some(true)).collect()
}

/// Whether the access `insn` (false for any other instruction) lies in `[r10 - floor, r10)`.
fn in_frame(insn: &Insn, regs: &[Val; 11], floor: i64) -> bool {
    let Some((size, base, off)) = memory_access(insn) else {
        return false;
    };
    match regs[base.index()] {
        Fp(lo, hi) => lo + off >= -floor && hi + off + size.bytes() as i64 <= 0,
        _ => false,
    }
}

/// The state before each instruction of the function entered at `entry` (`None`: not reached).
fn function(program: &Program, entry: usize) -> Vec<Option<[Val; 11]>> {
    let insns = program.insns();
    let mut states: Vec<Option<[Val; 11]>> = vec![None; insns.len()];
    let mut changes = vec![0u32; insns.len()];
    let mut head = vec![false; insns.len()];
    let mut start = [Unknown; 11];
    start[10] = Fp(0, 0);
    states[entry] = Some(start);
    let mut work = vec![entry];
    while let Some(i) = work.pop() {
        let Some(mut regs) = states[i] else { continue };
        let mut out: [Option<(usize, [Val; 11])>; 2] = [None, None];
        let next = |regs| Some((i + 1, regs));
        match insns[i] {
            Insn::Alu {
                width,
                op,
                dst,
                src,
            } => {
                let d = regs[dst.index()];
                regs[dst.index()] = match src {
                    Source::Imm(k) => alu_imm(width, op, d, imm_value(width, k)),
                    Source::Reg(r) => alu(width, op, d, regs[r.index()]),
                };
                out[0] = next(regs);
            }
            Insn::Neg { dst, .. } | Insn::Endian { dst, .. } => {
                regs[dst.index()] = Unknown;
                out[0] = next(regs);
            }
            Insn::LoadImm64 { dst, imm } => {
                regs[dst.index()] = i64::try_from(imm).map_or(Unknown, |v| scalar(v, v));
                out[0] = next(regs);
            }
            Insn::Load {
                size, signed, dst, ..
            } => {
                regs[dst.index()] = match (size, signed) {
                    (Size::B, false) => Scalar(0, 0xff),
                    (Size::H, false) => Scalar(0, 0xffff),
                    _ => Unknown,
                };
                out[0] = next(regs);
            }
            Insn::LoadAcquire { dst, .. } => {
                regs[dst.index()] = Unknown;
                out[0] = next(regs);
            }
            Insn::Store { .. } | Insn::StoreRelease { .. } => out[0] = next(regs),
            Insn::Atomic { op, src, .. } => {
                match op {
                    AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => {}
                    AtomicOp::CmpXchg => regs[0] = Unknown,
                    _ => regs[src.index()] = Unknown,
                }
                out[0] = next(regs);
            }
            Insn::Ja { .. } | Insn::Ja32 { .. } => {
                out[0] = program.target_of(i).map(|t| (t, regs));
            }
            Insn::Jump {
                width,
                cond,
                dst,
                src,
                ..
            } => {
                let [taken, fall] = branch(width, cond, &regs, dst.index(), src);
                out[0] = fall.map(|r| (i + 1, r));
                out[1] = taken.and_then(|r| program.target_of(i).map(|t| (t, r)));
            }
            Insn::Call { .. } | Insn::CallX { .. } => {
                regs[..6].fill(Unknown);
                out[0] = next(regs);
            }
            Insn::CallLocal { .. } => {
                regs[..10].fill(Unknown);
                out[0] = next(regs);
            }
            Insn::Exit => {}
        }
        for (next, regs) in out.into_iter().flatten() {
            if next >= insns.len() {
                continue;
            }
            // Widening only at loop heads: elsewhere it would lose the bound a head's test
            // gives before the head itself has converged. Every cycle has an edge to an
            // earlier (or the same) instruction, so this terminates.
            if next <= i {
                head[next] = true;
            }
            let changed = super::dataflow::merge(
                &mut states[next],
                regs,
                &mut changes[next],
                head[next],
                WIDEN_AFTER,
                Val::join,
                |_| Unknown,
            );
            if changed {
                work.push(next);
            }
        }
    }
    states
}

#[cfg(test)]
mod tests {
    use crate::asm::assemble_program;

    /// The in-frame verdict of every instruction of `src`.
    fn verdicts(src: &str) -> Vec<bool> {
        let p = assemble_program(src).unwrap();
        (0..p.insns().len()).map(|i| p.in_frame(i)).collect()
    }

    fn accesses(src: &str) -> Vec<bool> {
        let p = assemble_program(src).unwrap();
        (0..p.insns().len())
            .filter(|&i| super::memory_access(&p.insns()[i]).is_some())
            .map(|i| p.in_frame(i))
            .collect()
    }

    #[test]
    fn constant_offsets_from_r10() {
        assert_eq!(
            accesses("stxdw [r10-8], r1\nldxdw r0, [r10-8]\nstxb [r10-512], r1\nexit"),
            [true, true, true]
        );
        // Above the frame, or below it.
        assert_eq!(
            accesses("stxdw [r10-4], r1\nstxb [r10-513], r1\nstxb [r10+0], r1\nmov r0, 0\nexit"),
            [false, false, false]
        );
    }

    #[test]
    fn a_bounded_induction_variable() {
        let src = "mov r4, 0
loop:
jge r4, 64, done
mov r5, r10
add r5, -512
lsh r4, 3
add r5, r4
rsh r4, 3
stxdw [r5+0], r4
add r4, 1
ja loop
done:
mov r0, 0
exit";
        assert_eq!(accesses(src), [true]);
        // One more iteration reaches r10 itself.
        assert_eq!(accesses(&src.replace("jge r4, 64", "jgt r4, 64")), [false]);
    }

    #[test]
    fn masks_and_byte_loads_bound_an_index() {
        let src = "ldxb r2, [r1+0]
mov r3, r10
add r3, -256
add r3, r2
stxb [r3+0], r2
ldxdw r4, [r1+0]
and r4, 127
mov r3, r10
add r3, -128
add r3, r4
ldxb r0, [r3+0]
ldxdw r4, [r1+0]
mod r4, 200
mov r3, r10
add r3, -128
add r3, r4
ldxb r0, [r3+0]
exit";
        // The input accesses are not stack accesses; the third index can reach 199.
        assert_eq!(accesses(src), [false, true, false, true, false, false]);
    }

    #[test]
    fn unknown_bounds_and_joins_stay_checked() {
        // r4 is the input's r2: no bound.
        let src = "mov r5, r10\nadd r5, -64\nadd r5, r2\nstxb [r5+0], r1\nexit";
        assert_eq!(accesses(src), [false]);
        // r5 is r10 - 8 on one path and the input pointer on the other.
        let src = "mov r5, r1\njeq r2, 0, +2\nmov r5, r10\nadd r5, -8\nstxdw [r5+0], r1\nexit";
        assert_eq!(accesses(src), [false]);
        // A signed test says nothing about an unknown value's lower bound.
        let src = "jsge r2, 64, +4\nmov r5, r10\nadd r5, -64\nadd r5, r2\nstxb [r5+0], r1\nexit";
        assert_eq!(accesses(src), [false]);
    }

    #[test]
    fn calls_forget_registers_and_callees_have_their_own_frame() {
        let src = "mov r6, r10
add r6, -8
call local sub
stxdw [r6+0], r0
stxdw [r10-8], r0
exit
sub:
stxdw [r10-16], r1
mov r0, 0
exit";
        assert_eq!(accesses(src), [false, true, true]);
        assert!(!verdicts("mov r0, 0\nexit").contains(&true));
    }
}
