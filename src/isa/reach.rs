//! How far below its frame pointer each function of a program can touch the stack: what an
//! engine must zero when the function is entered, instead of the whole stack on every run.
//!
//! The analysis follows, per function (the program's first instruction and every local call
//! target), the registers that may hold an address derived from r10 (`fp`) or from a register
//! the function was entered with (`incoming`: a caller's pointer, maybe into the caller's frame),
//! as an interval of constant offsets. Copies and `add`/`sub` of immediates move the interval;
//! any other use of such a value — stored to memory, combined with another register, truncated,
//! called through — *escapes*: the function's reach becomes [`StackReach::Unbounded`] (or, for
//! an incoming pointer, every caller passing a stack address to it becomes unbounded). Loads,
//! stores and atomics through a tracked address extend the reach; a helper argument extends it
//! to the argument's address (helpers access memory at and above the pointers they are given).
//! A local call passes the caller's pointers on: the callee's summary says how far below an
//! incoming pointer it accesses, and which pointers it may leave in r0–r5 for the caller. A
//! fixed point over the call graph covers recursion; a
//! function whose intervals keep growing (a pointer induction variable) is unbounded.
//!
//! What the engines rely on: every access a function makes through an address derived from its
//! own r10, and every access its callees make through pointers it passed them, lies at or above
//! `r10 - reach`. Addresses from anywhere else (a helper's return value, the input) are not
//! stack addresses unless a helper hands one out, which none does; checked runs bound them
//! anyway.

use super::bounds::FunctionStates;
use super::{AluOp, AtomicOp, Insn, Program, Source, Width};

/// How far below r10 a function can reach, from [`Program::stack_reach`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackReach {
    /// At most this many bytes below r10 (its callees' own frames not included).
    Bytes(u32),
    /// No bound could be proven: the whole stack.
    Unbounded,
}

/// Bytes of stack per call frame (RFC 9669): a callee's r10 is its caller's minus this.
pub(crate) const FRAME_SIZE: i64 = 512;
/// Offsets below this bound (or intervals this wide) are given up on.
const LIMIT: i64 = 1 << 20;
/// How often an instruction's state may change before its growing intervals are widened.
const WIDEN_AFTER: u32 = 16;
/// Rounds of the call-graph fixed point before every function is declared unbounded.
const MAX_ROUNDS: usize = 64;

/// A set of offsets from one base: `None` when the value cannot derive from that base.
type Interval = Option<(i64, i64)>;

/// What a register may hold: an address derived from the function's r10, from a register it
/// was entered with, both, or neither (a plain scalar).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Val {
    fp: Interval,
    incoming: Interval,
}

const SCALAR: Val = Val {
    fp: None,
    incoming: None,
};

fn hull(a: Interval, b: Interval) -> Interval {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some((l1, h1)), Some((l2, h2))) => Some((l1.min(l2), h1.max(h2))),
    }
}

fn shift(i: Interval, by: i64) -> Interval {
    shift_by(i, (by, by))
}

/// `i` moved by any offset in `by`.
fn shift_by(i: Interval, (lo, hi): (i64, i64)) -> Interval {
    i.map(|(l, h)| (l.saturating_add(lo), h.saturating_add(hi)))
}

impl Val {
    fn join(self, other: Val) -> Val {
        Val {
            fp: hull(self.fp, other.fp),
            incoming: hull(self.incoming, other.incoming),
        }
    }
}

/// What a function does with the stack, as its callers need to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Summary {
    /// Bytes below its own r10 it reaches; `None` = unbounded.
    reach: Option<i64>,
    /// The lowest offset it accesses relative to a pointer it was entered with (0 when none is
    /// below); `None` = it lets such a pointer escape.
    incoming_min: Option<i64>,
    /// Offsets from pointers it was entered with that it may leave in r0–r5 when it returns.
    returns: Interval,
    /// Offsets from its own r10 it may leave in r0–r5 when it returns.
    returns_fp: Interval,
}

const NOTHING: Summary = Summary {
    reach: Some(0),
    incoming_min: Some(0),
    returns: None,
    returns_fp: None,
};

const UNBOUNDED: Summary = Summary {
    reach: None,
    incoming_min: None,
    returns: None,
    returns_fp: None,
};

/// The running result of analysing one function.
struct Acc {
    reach: Option<i64>,
    incoming_min: Option<i64>,
    returns: Interval,
    returns_fp: Interval,
}

impl Acc {
    fn escape(&mut self, v: Val) {
        if v.fp.is_some() {
            self.reach = None;
        }
        if v.incoming.is_some() {
            self.incoming_min = None;
        }
    }

    /// Something accesses memory from `v + off` upwards.
    fn touch(&mut self, v: Val, off: i64) {
        if let Some((lo, _)) = v.fp {
            let low = lo.saturating_add(off);
            match self.reach {
                _ if low <= -LIMIT => self.reach = None,
                Some(r) if low < 0 => self.reach = Some(r.max(-low)),
                _ => {}
            }
        }
        if let Some((lo, _)) = v.incoming {
            let low = lo.saturating_add(off);
            match self.incoming_min {
                _ if low <= -LIMIT => self.incoming_min = None,
                Some(m) => self.incoming_min = Some(m.min(low)),
                None => {}
            }
        }
    }

    /// A callee with `summary` is entered with `v` in one of its registers.
    fn pass(&mut self, v: Val, summary: Summary) {
        match summary.incoming_min {
            Some(m) => self.touch(v, m.min(0)),
            None => self.escape(v),
        }
    }
}

/// What the analysis finds: each function's reach, and which accesses may use an address
/// derived from their function's r10.
pub(super) struct Analysis {
    /// Sorted `(entry instruction, reach)` pairs.
    pub reach: Vec<(usize, StackReach)>,
    /// Per instruction: a load, store or atomic whose base may derive from r10.
    pub stack_based: Vec<bool>,
    /// Each function's bounds-analysis states, in the order of `reach`.
    pub bounds: Vec<FunctionStates>,
}

/// Analyses every function of `program`.
pub(super) fn analyse(program: &Program) -> Analysis {
    let insns = program.insns();
    let mut entries: Vec<usize> = std::iter::once(0)
        .chain(
            (0..insns.len())
                .filter(|&i| matches!(insns[i], Insn::CallLocal { .. }))
                .filter_map(|i| program.target_of(i)),
        )
        .collect();
    entries.sort_unstable();
    entries.dedup();
    // The scalar ranges do not depend on the summaries: computed once, not per round.
    let bounds: Vec<FunctionStates> = entries
        .iter()
        .map(|&e| FunctionStates::of(program, e))
        .collect();
    let mut summaries = vec![NOTHING; entries.len()];
    // Rounds only add to it, so after the last it covers the fixed point.
    let mut stack_based = vec![false; insns.len()];
    let mut stable = false;
    for _ in 0..MAX_ROUNDS {
        let next: Vec<Summary> = entries
            .iter()
            .zip(&bounds)
            .map(|(&e, scalars)| {
                function(program, e, scalars, &entries, &summaries, &mut stack_based)
            })
            .collect();
        if next == summaries {
            stable = true;
            break;
        }
        summaries = next;
    }
    if !stable {
        summaries = vec![UNBOUNDED; entries.len()];
        stack_based = vec![true; insns.len()];
    }
    let reach = entries
        .into_iter()
        .zip(summaries)
        .map(|(e, s)| {
            let reach = match s.reach {
                Some(r) if r < LIMIT => StackReach::Bytes(r as u32),
                _ => StackReach::Unbounded,
            };
            (e, reach)
        })
        .collect();
    Analysis {
        reach,
        stack_based,
        bounds,
    }
}

/// One function's summary, given the current summaries of the functions it calls.
fn function(
    program: &Program,
    entry: usize,
    scalars: &FunctionStates,
    entries: &[usize],
    summaries: &[Summary],
    stack_based: &mut [bool],
) -> Summary {
    let insns = program.insns();
    let mut states: Vec<Option<[Val; 11]>> = vec![None; insns.len()];
    let mut changes = vec![0u32; insns.len()];
    let mut acc = Acc {
        reach: Some(0),
        incoming_min: Some(0),
        returns: None,
        returns_fp: None,
    };
    // Every register the function is entered with may be a caller's pointer (r6–r9 too: the
    // interpreter and the JITs leave them visible to the callee).
    let mut start = [Val {
        fp: None,
        incoming: Some((0, 0)),
    }; 11];
    start[10] = Val {
        fp: Some((0, 0)),
        incoming: None,
    };
    states[entry] = Some(start);
    let mut work = vec![entry];
    // What the bounds analysis proves about scalars, per instruction: a register it gives a
    // range holds a value within it on every path. Used only for registers this analysis also
    // finds derived from no pointer.
    let known = |i: usize, r: usize| scalars.range(i, r);
    let summary_of = |target: usize| {
        entries
            .binary_search(&target)
            .map(|k| summaries[k])
            .unwrap_or(UNBOUNDED)
    };
    while let Some(i) = work.pop() {
        let Some(mut regs) = states[i] else { continue };
        let mut successors: [Option<usize>; 2] = [Some(i + 1), None];
        if let Some((_, base, _)) = super::dataflow::memory_access(&insns[i]) {
            stack_based[i] |= regs[base.index()].fp.is_some();
        }
        match insns[i] {
            Insn::Alu {
                width,
                op,
                dst,
                src,
            } => {
                let d = regs[dst.index()];
                let result = match (width, op, src) {
                    (Width::W64, AluOp::Mov, Source::Reg(s)) => regs[s.index()],
                    (_, AluOp::Mov, Source::Imm(_)) => SCALAR,
                    // A pointer moved by a scalar whose range the bounds analysis knows here.
                    (Width::W64, AluOp::Add | AluOp::Sub, Source::Reg(s))
                        if regs[s.index()] == SCALAR
                            && let Some((lo, hi)) = known(i, s.index()) =>
                    {
                        let by = if op == AluOp::Add {
                            (lo, hi)
                        } else {
                            (-hi, -lo)
                        };
                        Val {
                            fp: shift_by(d.fp, by),
                            incoming: shift_by(d.incoming, by),
                        }
                    }
                    (Width::W64, AluOp::Add, Source::Reg(s))
                        if d == SCALAR
                            && let Some(range) = known(i, dst.index()) =>
                    {
                        let v = regs[s.index()];
                        Val {
                            fp: shift_by(v.fp, range),
                            incoming: shift_by(v.incoming, range),
                        }
                    }
                    (Width::W64, AluOp::Add | AluOp::Sub, Source::Imm(k)) => {
                        let k = if op == AluOp::Add {
                            k as i64
                        } else {
                            -(k as i64)
                        };
                        Val {
                            fp: shift(d.fp, k),
                            incoming: shift(d.incoming, k),
                        }
                    }
                    (_, op, src) => {
                        // A move only reads its source; anything else also reads dst.
                        if !matches!(
                            op,
                            AluOp::Mov | AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32
                        ) {
                            acc.escape(d);
                        }
                        if let Source::Reg(s) = src {
                            acc.escape(regs[s.index()]);
                        }
                        SCALAR
                    }
                };
                regs[dst.index()] = result;
            }
            Insn::Neg { dst, .. } | Insn::Endian { dst, .. } => {
                acc.escape(regs[dst.index()]);
                regs[dst.index()] = SCALAR;
            }
            Insn::LoadImm64 { dst, .. } => regs[dst.index()] = SCALAR,
            Insn::Load { dst, base, off, .. } | Insn::LoadAcquire { dst, base, off, .. } => {
                acc.touch(regs[base.index()], off as i64);
                regs[dst.index()] = SCALAR;
            }
            Insn::Store { base, off, src, .. } => {
                acc.touch(regs[base.index()], off as i64);
                if let Source::Reg(s) = src {
                    acc.escape(regs[s.index()]);
                }
            }
            Insn::StoreRelease { base, off, src, .. } => {
                acc.touch(regs[base.index()], off as i64);
                acc.escape(regs[src.index()]);
            }
            Insn::Atomic {
                op, base, off, src, ..
            } => {
                acc.touch(regs[base.index()], off as i64);
                acc.escape(regs[src.index()]);
                match op {
                    AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => {}
                    AtomicOp::CmpXchg => regs[0] = SCALAR,
                    _ => regs[src.index()] = SCALAR,
                }
            }
            Insn::Ja { .. } | Insn::Ja32 { .. } => successors = [program.target_of(i), None],
            Insn::Jump { .. } => successors[1] = program.target_of(i),
            Insn::Call { .. } | Insn::CallX { .. } => {
                if let Insn::CallX { reg } = insns[i] {
                    acc.escape(regs[reg.index()]);
                }
                for v in &regs[1..6] {
                    acc.touch(*v, 0);
                }
                regs[..6].fill(SCALAR);
            }
            Insn::CallLocal { .. } => {
                let callee = program.target_of(i).map_or(UNBOUNDED, summary_of);
                for v in &regs[..10] {
                    acc.pass(*v, callee);
                }
                // What the callee leaves in r0–r5 is one of the values it was entered with,
                // moved by `returns`, an address in its frame (one frame below this one's), or
                // a scalar.
                let mut returned = Val {
                    fp: shift(callee.returns_fp, -FRAME_SIZE),
                    incoming: None,
                };
                if let Some(by) = callee.returns {
                    for v in &regs[..10] {
                        returned = returned.join(Val {
                            fp: shift_by(v.fp, by),
                            incoming: shift_by(v.incoming, by),
                        });
                    }
                }
                regs[..6].fill(returned);
            }
            Insn::Exit => {
                // A caller may dereference what is left in r0–r5: it follows them.
                for v in &regs[..6] {
                    acc.returns = hull(acc.returns, v.incoming);
                    acc.returns_fp = hull(acc.returns_fp, v.fp);
                }
                successors = [None, None];
            }
        }
        for next in successors.into_iter().flatten() {
            if next >= insns.len() {
                continue;
            }
            // Still growing after a while: a pointer moves in a loop. Give up on what grew.
            let changed = super::dataflow::merge(
                &mut states[next],
                regs,
                &mut changes[next],
                true,
                WIDEN_AFTER,
                Val::join,
                |v| {
                    acc.escape(v);
                    SCALAR
                },
            );
            if changed {
                work.push(next);
            }
        }
    }
    Summary {
        reach: acc.reach,
        incoming_min: acc.incoming_min,
        returns: acc.returns,
        returns_fp: acc.returns_fp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;

    fn reach(src: &str) -> Vec<StackReach> {
        let program = Program::new(assemble(src).expect("assembles")).expect("valid");
        analyse(&program)
            .reach
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    #[test]
    fn no_stack_use_reaches_nothing() {
        assert_eq!(reach("mov r0, r1\nadd r0, 2\nexit"), [StackReach::Bytes(0)]);
    }

    #[test]
    fn direct_and_copied_frame_pointers() {
        let src = "stxdw [r10-8], r1\nmov r2, r10\nadd r2, -24\nldxw r0, [r2+4]\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(20)]);
    }

    #[test]
    fn helper_arguments_reach_their_address() {
        let src = "mov r2, r10\nadd r2, -40\ncall 1\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(40)]);
    }

    #[test]
    fn a_pointer_moved_by_a_bounded_index_stays_bounded() {
        // r10 - 512 + (byte & 63) * 8: at most 512 below r10, either operand order.
        let src = "ldxb r2, [r1+0]\nand r2, 63\nlsh r2, 3\nmov r3, r10\nadd r3, -512\n\
                   add r3, r2\nstxdw [r3+0], r2\nmov r4, r2\nmov r5, r10\nadd r5, -520\n\
                   add r4, r5\nldxdw r0, [r4+0]\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(520)]);
        // A loop counter bounded by its test.
        let src = "mov r2, 0\nloop:\njge r2, 16, done\nmov r3, r10\nadd r3, -64\nadd r3, r2\n\
                   stxb [r3+0], r2\nadd r2, 1\nja loop\ndone:\nmov r0, 0\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(64)]);
        // Subtracting an index moves the pointer down.
        let src = "ldxb r2, [r1+0]\nand r2, 15\nmov r3, r10\nadd r3, -8\nsub r3, r2\n\
                   stxb [r3+0], r2\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(23)]);
        // An unbounded index still escapes.
        let src = "ldxdw r2, [r1+0]\nmov r3, r10\nadd r3, -8\nadd r3, r2\nstxb [r3+0], r2\nexit";
        assert_eq!(reach(src), [StackReach::Unbounded]);
    }

    #[test]
    fn escapes_are_unbounded() {
        for src in [
            // stored to memory
            "stxdw [r10-8], r10\nmov r0, 0\nexit",
            // combined with a variable
            "mov r1, r10\nadd r1, r2\nldxb r0, [r1]\nexit",
            // truncated
            "mov32 r1, r10\nmov r0, 0\nexit",
            // sign-extended
            "movsx3264 r1, r10\nmov r0, 0\nexit",
        ] {
            assert_eq!(reach(src), [StackReach::Unbounded], "{src}");
        }
    }

    #[test]
    fn overwriting_a_pointer_is_not_an_escape() {
        let src = "mov r1, r10\nstb [r1-4], 0\nmov32 r1, r2\nmovsx864 r1, r2\nmov r0, 0\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(4)]);
    }

    #[test]
    fn pointer_induction_variables_are_unbounded() {
        let src =
            "mov r1, r10\nadd r1, -8\nstdw [r1], 0\nadd r1, -8\njne r1, r2, -3\nmov r0, 0\nexit";
        assert_eq!(reach(src), [StackReach::Unbounded]);
    }

    #[test]
    fn branches_join_their_offsets() {
        let src =
            "mov r1, r10\nadd r1, -8\njeq r2, 0, +1\nadd r1, -64\nstb [r1], 1\nmov r0, 0\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(72)]);
    }

    #[test]
    fn callees_account_for_pointers_they_are_passed() {
        // main passes r10-16; the callee reads 8 bytes below it and uses 4 bytes of its own.
        let src = "mov r1, r10\nadd r1, -16\ncall local f\nmov r0, 0\nexit\n\
                   f:\nldxdw r0, [r1-8]\nstw [r10-4], 0\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(24), StackReach::Bytes(4)]);
        // A callee that lets the pointer escape makes its caller unbounded, not itself.
        let src = "mov r1, r10\nadd r1, -16\ncall local f\nmov r0, 0\nexit\n\
                   f:\nstxdw [r10-8], r1\nmov r0, 0\nexit";
        assert_eq!(reach(src), [StackReach::Unbounded, StackReach::Bytes(8)]);
    }

    #[test]
    fn a_local_call_names_its_callee_reach() {
        let src = "call local f\nexit\nf:\nstw [r10-12], 0\nexit";
        let program = Program::new(assemble(src).expect("assembles")).expect("valid");
        assert_eq!(program.callee_reach(0), StackReach::Bytes(12));
        assert_eq!(program.callee_reach(1), StackReach::Unbounded, "not a call");
    }

    #[test]
    fn pointers_handed_back_by_a_callee_are_followed() {
        // The callee returns its argument moved down by 32; the caller stores through it.
        let src = "mov r1, r10\nadd r1, -8\ncall local f\nstb [r0], 1\nmov r0, 0\nexit\n\
                   f:\nmov r0, r1\nadd r0, -32\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(40), StackReach::Bytes(0)]);
        // The callee returns an address in its own frame; the caller reads through it.
        let src = "call local f\nldxb r0, [r0]\nexit\nf:\nmov r0, r10\nadd r0, -8\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(520), StackReach::Bytes(0)]);
    }

    #[test]
    fn accesses_know_whether_their_base_may_be_the_stack() {
        let src = "mov r3, r10\nadd r3, -8\njeq r2, 0, +1\nmov r3, r1\nstb [r3], 1\n\
                   ldxb r0, [r1]\nldxb r0, [r10-1]\nexit";
        let program = Program::new(assemble(src).expect("assembles")).expect("valid");
        let based = analyse(&program).stack_based;
        assert_eq!(
            based,
            [false, false, false, false, true, false, true, false]
        );
    }

    #[test]
    fn recursion_reaches_a_fixed_point() {
        let src = "mov r1, r10\nadd r1, -8\ncall local f\nmov r0, 0\nexit\n\
                   f:\nldxdw r0, [r1]\njeq r0, 0, +1\ncall local f\nmov r0, 0\nexit";
        assert_eq!(reach(src), [StackReach::Bytes(8), StackReach::Bytes(0)]);
    }
}
