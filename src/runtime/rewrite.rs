//! What the kernel's verifier does to a program before it runs, as far as livebpf needs it:
//! a path-insensitive dataflow pass that follows the context pointer and callback addresses
//! through registers and stack spills, then
//! * the **context conversion** (`convert_ctx_accesses`): each load of a `struct xdp_md` field
//!   becomes a load of the real field of livebpf's [`XdpContext`](super::xdp::XdpContext);
//! * the **`bpf_loop` inlining** (`inline_bpf_loop`): a `call bpf_loop` whose callback is a known
//!   function becomes a BPF-to-BPF call of a loop stub appended to the program, so that every
//!   engine runs callbacks as ordinary subprograms.
//!
//! The pass is path-insensitive where the verifier is path-sensitive: a register that holds the
//! context on one path and something else on another is "mixed", and dereferencing a mixed
//! register is refused (the verifier refuses it too: one instruction cannot access two pointer
//! types). Stores through pointers other than r10 are assumed not to overwrite a spilled context
//! pointer (the verifier tracks that; clang never emits it for the context).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::isa::{AluOp, AtomicOp, Insn, Program, Reg, Size, Source, Width};
use crate::loader::ProgType;

use super::RuntimeError;
use super::xdp;

/// `BPF_FUNC_bpf_loop`.
pub(crate) const BPF_LOOP: u32 = 181;
/// `BPF_FUNC_tail_call`.
const TAIL_CALL: u32 = 12;
/// The kernel's `BPF_MAX_LOOPS`.
pub(crate) const BPF_MAX_LOOPS: i32 = 1 << 23;

/// What the pass knows about a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Val {
    /// A scalar, or a pointer that is not the context.
    Other,
    /// The program's context pointer, unmodified.
    Ctx,
    /// The address of the function starting at this instruction index.
    Func(usize),
    /// A known 64-bit constant (a map's address, a tail call's index).
    Const(u64),
    /// Different things on different paths, or a modified context pointer.
    Mixed,
}

impl Val {
    fn merge(self, other: Val) -> Val {
        match (self, other) {
            (a, b) if a == b => a,
            // Two scalars that differ are just a scalar: only pointers the pass follows mix.
            (Val::Other | Val::Const(_), Val::Other | Val::Const(_)) => Val::Other,
            _ => Val::Mixed,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    regs: [Val; 11],
    /// 8-byte spills at r10 + offset (absent: `Other`).
    stack: BTreeMap<i16, Val>,
}

impl State {
    fn entry(r1: Val) -> State {
        let mut regs = [Val::Other; 11];
        regs[1] = r1;
        State {
            regs,
            stack: BTreeMap::new(),
        }
    }

    /// Merges `other` in; whether anything changed.
    fn merge(&mut self, other: &State) -> bool {
        let before = self.clone();
        for (a, b) in self.regs.iter_mut().zip(other.regs) {
            *a = a.merge(b);
        }
        let keys: BTreeSet<i16> = self
            .stack
            .keys()
            .chain(other.stack.keys())
            .copied()
            .collect();
        for k in keys {
            let a = self.stack.get(&k).copied().unwrap_or(Val::Other);
            let b = other.stack.get(&k).copied().unwrap_or(Val::Other);
            match a.merge(b) {
                Val::Other => self.stack.remove(&k),
                v => self.stack.insert(k, v),
            };
        }
        *self != before
    }

    fn reg(&self, r: Reg) -> Val {
        self.regs[r.index()]
    }

    fn set(&mut self, r: Reg, v: Val) {
        self.regs[r.index()] = v;
    }

    /// Forgets spills overlapping `[off, off + size)`.
    fn clobber_stack(&mut self, off: i16, size: usize) {
        let lo = off as i32 - 7;
        let hi = off as i32 + size as i32;
        self.stack
            .retain(|&k, _| (k as i32) < lo || (k as i32) >= hi);
    }
}

/// A memory access whose base is the context pointer.
#[derive(Clone, Copy, Debug)]
struct CtxAccess {
    insn: usize,
}

/// What the pass found.
struct Facts {
    ctx_accesses: Vec<CtxAccess>,
    /// `call bpf_loop` instruction → callback's first instruction.
    loops: BTreeMap<usize, usize>,
    /// `call bpf_tail_call` instruction → its map address and index, when both are constants.
    tail_calls: BTreeMap<usize, Option<(u64, u64)>>,
}

fn helper_name(id: u32) -> String {
    super::helpers::name(id)
        .map(|n| format!("{n} ({id})"))
        .unwrap_or_else(|| format!("{id}"))
}

/// Runs the dataflow pass. `funcs` maps each `lddw` instruction index that loads a function
/// address to that function's first instruction index.
fn analyse(
    program: &Program,
    prog_type: &ProgType,
    funcs: &BTreeMap<usize, usize>,
    err: &dyn Fn(usize, String) -> RuntimeError,
) -> Result<Facts, RuntimeError> {
    let insns = program.insns();
    let mut states: Vec<Option<State>> = vec![None; insns.len()];
    let mut work: VecDeque<usize> = VecDeque::new();
    let entry_r1 = match prog_type {
        ProgType::Raw => Val::Other,
        _ => Val::Ctx,
    };
    states[0] = Some(State::entry(entry_r1));
    work.push_back(0);
    let mut facts = Facts {
        ctx_accesses: Vec::new(),
        loops: BTreeMap::new(),
        tail_calls: BTreeMap::new(),
    };
    let flow =
        |states: &mut Vec<Option<State>>, work: &mut VecDeque<usize>, to: usize, s: &State| {
            let changed = match &mut states[to] {
                Some(old) => old.merge(s),
                slot @ None => {
                    *slot = Some(s.clone());
                    true
                }
            };
            if changed && !work.contains(&to) {
                work.push_back(to);
            }
        };
    while let Some(i) = work.pop_front() {
        let mut s = states[i].clone().expect("queued instructions have a state");
        let insn = insns[i];
        let mut falls_through = true;
        match insn {
            Insn::Alu {
                width,
                op,
                dst,
                src,
            } => {
                let v = match (width, op, src) {
                    (Width::W64, AluOp::Mov, Source::Reg(r)) => s.reg(r),
                    (Width::W64, AluOp::Mov, Source::Imm(i)) => Val::Const(i as i64 as u64),
                    (Width::W32, AluOp::Mov, Source::Imm(i)) => Val::Const(i as u32 as u64),
                    _ if matches!(s.reg(dst), Val::Ctx | Val::Func(_)) => Val::Mixed,
                    _ => Val::Other,
                };
                s.set(dst, v);
            }
            Insn::Neg { dst, .. } | Insn::Endian { dst, .. } => s.set(dst, Val::Other),
            Insn::LoadImm64 { dst, imm } => {
                s.set(
                    dst,
                    funcs.get(&i).map_or(Val::Const(imm), |&t| Val::Func(t)),
                );
            }
            Insn::Load {
                size,
                dst,
                base,
                off,
                ..
            } => {
                check_base(&s, base, i, &mut facts, err)?;
                let v = if base == Reg::R10 && size == Size::DW {
                    s.stack.get(&off).copied().unwrap_or(Val::Other)
                } else {
                    Val::Other
                };
                s.set(dst, v);
            }
            Insn::LoadAcquire { dst, base, .. } => {
                check_base(&s, base, i, &mut facts, err)?;
                s.set(dst, Val::Other);
            }
            Insn::Store {
                size,
                base,
                off,
                src,
            } => {
                check_base(&s, base, i, &mut facts, err)?;
                if base == Reg::R10 {
                    s.clobber_stack(off, size.bytes());
                    if let (Size::DW, Source::Reg(r)) = (size, src)
                        && s.reg(r) != Val::Other
                    {
                        s.stack.insert(off, s.reg(r));
                    }
                }
            }
            Insn::StoreRelease {
                size, base, off, ..
            } => {
                check_base(&s, base, i, &mut facts, err)?;
                if base == Reg::R10 {
                    s.clobber_stack(off, size.bytes());
                }
            }
            Insn::Atomic {
                size,
                op,
                base,
                off,
                src,
            } => {
                check_base(&s, base, i, &mut facts, err)?;
                if base == Reg::R10 {
                    s.clobber_stack(off, size.bytes());
                }
                match op {
                    AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => {}
                    AtomicOp::CmpXchg => s.set(Reg::R0, Val::Other),
                    _ => s.set(src, Val::Other),
                }
            }
            Insn::Call { id } => {
                if id == TAIL_CALL {
                    // The last visit sees the merged state of every path.
                    let known = match (s.regs[2], s.regs[3]) {
                        (Val::Const(map), Val::Const(index)) => Some((map, index)),
                        _ => None,
                    };
                    facts.tail_calls.insert(i, known);
                }
                for arg in 1..=5u8 {
                    let v = s.regs[arg as usize];
                    let is_loop_callback = id == BPF_LOOP && arg == 2;
                    match v {
                        Val::Func(t) if is_loop_callback => {
                            facts.loops.insert(i, t);
                            flow(&mut states, &mut work, t, &State::entry(Val::Other));
                        }
                        Val::Func(_) => {
                            return Err(err(
                                i,
                                format!(
                                    "a callback is passed to helper {} in r{arg}; livebpf runs callbacks for bpf_loop only",
                                    helper_name(id)
                                ),
                            ));
                        }
                        Val::Mixed if is_loop_callback => {
                            return Err(err(
                                i,
                                "the bpf_loop callback in r2 is not one known function on every path".into(),
                            ));
                        }
                        _ if is_loop_callback => {
                            return Err(err(
                                i,
                                "r2 of bpf_loop is not a function address (an lddw of a static function)".into(),
                            ));
                        }
                        _ => {}
                    }
                }
                for r in 0..=5 {
                    s.regs[r] = Val::Other;
                }
            }
            Insn::CallX { .. } => {
                if s.regs[1..=5].iter().any(|v| matches!(v, Val::Func(_))) {
                    return Err(err(
                        i,
                        "a callback is passed to a helper called through callx; livebpf runs callbacks for bpf_loop only".into(),
                    ));
                }
                for r in 0..=5 {
                    s.regs[r] = Val::Other;
                }
            }
            Insn::CallLocal { .. } => {
                let target = program.target_of(i).expect("validated call target");
                let mut callee = State::entry(Val::Other);
                callee.regs[1..=5].copy_from_slice(&s.regs[1..=5]);
                flow(&mut states, &mut work, target, &callee);
                for r in 0..=5 {
                    s.regs[r] = Val::Other;
                }
            }
            Insn::Ja { .. } | Insn::Ja32 { .. } => {
                falls_through = false;
                let target = program.target_of(i).expect("validated jump target");
                flow(&mut states, &mut work, target, &s);
            }
            Insn::Jump { .. } => {
                let target = program.target_of(i).expect("validated jump target");
                flow(&mut states, &mut work, target, &s);
            }
            Insn::Exit => falls_through = false,
        }
        if falls_through {
            if i + 1 >= insns.len() {
                return Err(err(i, "execution falls off the end".into()));
            }
            flow(&mut states, &mut work, i + 1, &s);
        }
    }
    Ok(facts)
}

/// Records a context access; refuses a dereference of a mixed or function value.
fn check_base(
    s: &State,
    base: Reg,
    insn: usize,
    facts: &mut Facts,
    err: &dyn Fn(usize, String) -> RuntimeError,
) -> Result<(), RuntimeError> {
    match s.reg(base) {
        Val::Ctx => {
            facts.ctx_accesses.push(CtxAccess { insn });
            Ok(())
        }
        Val::Mixed => Err(err(
            insn,
            format!(
                "{base} may be the context pointer on one path and another value (or a modified context pointer) on another; the kernel's verifier refuses such an access too"
            ),
        )),
        Val::Func(_) => Err(err(
            insn,
            format!("{base} holds a function address and is dereferenced"),
        )),
        Val::Other | Val::Const(_) => Ok(()),
    }
}

/// The rewritten program and what it needs.
pub(crate) struct Rewritten {
    pub(crate) program: Program,
    /// `bpf_tail_call`s with a constant map and index: (slot of the call, map address, index).
    pub(crate) constant_tail_calls: Vec<(usize, u64, u64)>,
}

/// Converts context accesses and inlines `bpf_loop` (see the module docs). `funcs`: as for
/// `analyse`, in instruction indices of `program`.
pub(crate) fn rewrite(
    program: Program,
    prog_type: &ProgType,
    ret_index: Option<u32>,
    funcs: &BTreeMap<usize, usize>,
    err: &dyn Fn(usize, String) -> RuntimeError,
) -> Result<Rewritten, RuntimeError> {
    let facts = analyse(&program, prog_type, funcs, err)?;
    let mut insns = program.insns().to_vec();
    // Context conversion: one instruction for one, so no offset changes.
    // Accesses reached on several paths are recorded once per visit: dedupe.
    let accesses: BTreeSet<usize> = facts.ctx_accesses.iter().map(|a| a.insn).collect();
    for &i in &accesses {
        insns[i] = convert_ctx_access(insns[i], prog_type, ret_index).map_err(|m| err(i, m))?;
    }
    // The loop stubs go after the last instruction; a call is one slot, like the helper call.
    let mut stub_slots: BTreeMap<usize, usize> = BTreeMap::new(); // callback insn → stub slot
    let mut tail: Vec<Insn> = Vec::new();
    let mut slots = program.slot_count();
    for (&call, &callback) in &facts.loops {
        let stub_slot = *stub_slots.entry(callback).or_insert_with(|| {
            let at = slots;
            let code = loop_stub(program.slot_of(callback) as i64 - at as i64);
            slots += code.iter().map(|i| i.slots()).sum::<usize>();
            tail.extend(code);
            at
        });
        insns[call] = Insn::CallLocal {
            off: (stub_slot as i64 - program.slot_of(call) as i64 - 1) as i32,
        };
    }
    insns.extend(tail);
    let program = Program::new(insns).map_err(|e| err(0, format!("rewritten program: {e}")))?;
    debug_assert_eq!(program.slot_count(), slots);
    // Instructions before the appended stubs keep their slots.
    let constant_tail_calls = facts
        .tail_calls
        .iter()
        .filter_map(|(&i, &known)| known.map(|(map, index)| (program.slot_of(i), map, index)))
        .collect();
    Ok(Rewritten {
        program,
        constant_tail_calls,
    })
}

/// The kernel's `bpf_loop` as a subprogram: r1 = nr_loops, r3 = ctx, r4 = flags (r2, the
/// callback, is built in). `callback_rel` = callback slot − stub slot.
fn loop_stub(callback_rel: i64) -> Vec<Insn> {
    use crate::isa::JmpCond;
    let mov = |dst, src| Insn::Alu {
        width: Width::W64,
        op: AluOp::Mov,
        dst,
        src,
    };
    let r = |n: u8| Reg::new(n).expect("r0-r10");
    // Layout (slots = instructions here: no lddw).
    //  0: if r4 != 0 goto einval (+12)
    //  1: if w1 > BPF_MAX_LOOPS goto e2big (+13)
    //  2: w6 = w1
    //  3: r7 = 0
    //  4: r8 = r3
    //  5: loop: if r7 >= r6 goto done (+6)
    //  6: r1 = r7
    //  7: r2 = r8
    //  8: call callback
    //  9: r7 += 1
    // 10: if r0 == 0 goto loop (-6)
    // 11: done: r0 = r7
    // 12: exit
    // 13: einval: r0 = -EINVAL
    // 14: exit
    // 15: e2big: r0 = -E2BIG
    // 16: exit
    vec![
        Insn::Jump {
            width: Width::W64,
            cond: JmpCond::Ne,
            dst: r(4),
            src: Source::Imm(0),
            off: 12,
        },
        Insn::Jump {
            width: Width::W32,
            cond: JmpCond::Gt,
            dst: r(1),
            src: Source::Imm(BPF_MAX_LOOPS),
            off: 13,
        },
        Insn::Alu {
            width: Width::W32,
            op: AluOp::Mov,
            dst: r(6),
            src: Source::Reg(r(1)),
        },
        mov(r(7), Source::Imm(0)),
        mov(r(8), Source::Reg(r(3))),
        Insn::Jump {
            width: Width::W64,
            cond: JmpCond::Ge,
            dst: r(7),
            src: Source::Reg(r(6)),
            off: 5,
        },
        mov(r(1), Source::Reg(r(7))),
        mov(r(2), Source::Reg(r(8))),
        Insn::CallLocal {
            off: (callback_rel - 9) as i32,
        },
        Insn::Alu {
            width: Width::W64,
            op: AluOp::Add,
            dst: r(7),
            src: Source::Imm(1),
        },
        Insn::Jump {
            width: Width::W64,
            cond: JmpCond::Eq,
            dst: r(0),
            src: Source::Imm(0),
            off: -6,
        },
        mov(r(0), Source::Reg(r(7))),
        Insn::Exit,
        mov(r(0), Source::Imm(-libc::EINVAL)),
        Insn::Exit,
        mov(r(0), Source::Imm(-libc::E2BIG)),
        Insn::Exit,
    ]
}

/// Word of the trampoline's saved block that holds the return value (after r1..r5).
const TRACE_RET_WORD: i16 = 5;

/// The converted form of one context access, or why it is refused.
fn convert_ctx_access(
    insn: Insn,
    prog_type: &ProgType,
    ret_index: Option<u32>,
) -> Result<Insn, String> {
    match prog_type {
        ProgType::Xdp => xdp::convert_access(insn),
        // A tracing program's context is the trampoline's saved words: r1..r5, then the return
        // value. Linux puts the return value right after the target's arguments, so a fexit
        // (or fmod_ret) program's load of word `nargs` reads word 5 here.
        ProgType::Fexit { .. } | ProgType::FmodRet { .. } => match (insn, ret_index) {
            (
                Insn::Load {
                    size,
                    signed,
                    dst,
                    base,
                    off,
                },
                Some(n),
            ) if n < TRACE_RET_WORD as u32 && off == 8 * n as i16 => Ok(Insn::Load {
                size,
                signed,
                dst,
                base,
                off: 8 * TRACE_RET_WORD,
            }),
            (Insn::Load { off, .. }, Some(n))
                if off >= 8 * n as i16 && n < TRACE_RET_WORD as u32 =>
            {
                Err(format!(
                    "a load of context word {} of a tracer whose target takes {n} arguments: words 0..{n} are the arguments, word {n} the return value",
                    off / 8
                ))
            }
            (Insn::Load { .. }, _) => Ok(insn),
            _ => Err("a tracing program's context is read-only".into()),
        },
        ProgType::Fentry { .. } | ProgType::Freplace { .. } => match insn {
            Insn::Load { .. } => Ok(insn),
            _ => Err("a tracing program's context is read-only".into()),
        },
        ProgType::SocketFilter | ProgType::SchedCls => Err(format!(
            "{} programs read `struct __sk_buff`, which livebpf does not provide yet; run XDP programs, or give the program another type with --type",
            prog_type.name()
        )),
        ProgType::Raw => Ok(insn),
    }
}
