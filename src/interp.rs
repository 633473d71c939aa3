//! The reference interpreter: the oracle the JITs are checked against.
//!
//! It follows RFC 9669 to the letter (division by zero gives 0, modulo by zero leaves `dst`, signed
//! overflow wraps), checks every memory access with the run's [`HelperContext`] — the decision
//! checked JIT code makes too — and can stop runaway programs with an instruction budget.
//! Pointers are real host addresses, so helpers and programs share memory as they do under the
//! JIT. Context helpers get the run's context as under the JIT, and `bpf_tail_call` follows
//! [`crate::exec::tail`]. Every run is a read-side section of [`crate::reclaim`], as a JIT run
//! is: map values a lookup returns and tail-call targets stay valid until it ends.
//!
//! Each program is decoded once, when its [`Interpreter`] is made (a tail call's target when
//! its [`TailTarget`](crate::exec::tail::TailTarget) is), into a dense form (`Op`) that one
//! `match` dispatches on.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::exec::tail::{self, TailCode};
use crate::exec::{
    Access, ExecError, HelperContext, MAX_CALL_DEPTH, MemRegion, RunEnv, STACK_SIZE, TOTAL_STACK,
};
use crate::helpers::{Helper, Helpers};
use crate::isa::{
    AluOp, AtomicOp, Endian, Insn, JmpCond, Program, Reg, Size, Source, StackReach, Width,
};

/// An interpreter register: the index of one of r0–r10. Being an enum, the compiler knows it is
/// below 11, so indexing the register file with it needs no bounds check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum R {
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
}

impl R {
    const ALL: [R; 11] = [
        R::R0,
        R::R1,
        R::R2,
        R::R3,
        R::R4,
        R::R5,
        R::R6,
        R::R7,
        R::R8,
        R::R9,
        R::R10,
    ];

    fn of(r: Reg) -> R {
        R::ALL[r.index()]
    }
}

/// The ALU operations and jump conditions, each with the names of its four decoded forms
/// (64-bit register, 64-bit immediate, 32-bit register, 32-bit immediate), handed to macro `$m`
/// after `$args`: the decoded enum, the decoder and the dispatch loop are written once for all.
macro_rules! with_op_table {
    ($m:ident ! ($($args:tt)*)) => {
        $m! {
            $($args)*
            alu [
                (Add Add64R Add64I Add32R Add32I)
                (Sub Sub64R Sub64I Sub32R Sub32I)
                (Mul Mul64R Mul64I Mul32R Mul32I)
                (Div Div64R Div64I Div32R Div32I)
                (SDiv SDiv64R SDiv64I SDiv32R SDiv32I)
                (Mod Mod64R Mod64I Mod32R Mod32I)
                (SMod SMod64R SMod64I SMod32R SMod32I)
                (Or Or64R Or64I Or32R Or32I)
                (And And64R And64I And32R And32I)
                (Xor Xor64R Xor64I Xor32R Xor32I)
                (Lsh Lsh64R Lsh64I Lsh32R Lsh32I)
                (Rsh Rsh64R Rsh64I Rsh32R Rsh32I)
                (Arsh Arsh64R Arsh64I Arsh32R Arsh32I)
                (Mov Mov64R Mov64I Mov32R Mov32I)
                (MovSx8 MovSx8_64R MovSx8_64I MovSx8_32R MovSx8_32I)
                (MovSx16 MovSx16_64R MovSx16_64I MovSx16_32R MovSx16_32I)
                (MovSx32 MovSx32_64R MovSx32_64I MovSx32_32R MovSx32_32I)
            ]
            jmp [
                (Eq Jeq64R Jeq64I Jeq32R Jeq32I)
                (Gt Jgt64R Jgt64I Jgt32R Jgt32I)
                (Ge Jge64R Jge64I Jge32R Jge32I)
                (Set Jset64R Jset64I Jset32R Jset32I)
                (Ne Jne64R Jne64I Jne32R Jne32I)
                (Sgt Jsgt64R Jsgt64I Jsgt32R Jsgt32I)
                (Sge Jsge64R Jsge64I Jsge32R Jsge32I)
                (Lt Jlt64R Jlt64I Jlt32R Jlt32I)
                (Le Jle64R Jle64I Jle32R Jle32I)
                (Slt Jslt64R Jslt64I Jslt32R Jslt32I)
                (Sle Jsle64R Jsle64I Jsle32R Jsle32I)
            ]
        }
    };
}

macro_rules! define_ops {
    (
        alu [$(($aop:ident $a64r:ident $a64i:ident $a32r:ident $a32i:ident))*]
        jmp [$(($cond:ident $j64r:ident $j64i:ident $j32r:ident $j32i:ident))*]
    ) => {
        /// One instruction, decoded for the interpreter: width, source and size folded into the
        /// variant, immediates extended as the instruction uses them, jump targets resolved to
        /// instruction indices (`t`).
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Op {
            $(
                $a64r { d: R, s: R },
                $a64i { d: R, imm: u64 },
                $a32r { d: R, s: R },
                $a32i { d: R, imm: u32 },
            )*
            $(
                $j64r { d: R, s: R, t: u32 },
                $j64i { d: R, imm: u64, t: u32 },
                $j32r { d: R, s: R, t: u32 },
                $j32i { d: R, imm: u32, t: u32 },
            )*
            Neg64 { d: R },
            Neg32 { d: R },
            /// `le64`: leaves the register as it is.
            Nop,
            Le16 { d: R },
            Le32 { d: R },
            Be16 { d: R },
            Be32 { d: R },
            Be64 { d: R },
            LoadImm64 { d: R, imm: u64 },
            LdxB { d: R, b: R, off: i16 },
            LdxH { d: R, b: R, off: i16 },
            LdxW { d: R, b: R, off: i16 },
            LdxDW { d: R, b: R, off: i16 },
            LdxSB { d: R, b: R, off: i16 },
            LdxSH { d: R, b: R, off: i16 },
            LdxSW { d: R, b: R, off: i16 },
            StxB { b: R, off: i16, s: R },
            StxH { b: R, off: i16, s: R },
            StxW { b: R, off: i16, s: R },
            StxDW { b: R, off: i16, s: R },
            StB { b: R, off: i16, imm: u64 },
            StH { b: R, off: i16, imm: u64 },
            StW { b: R, off: i16, imm: u64 },
            StDW { b: R, off: i16, imm: u64 },
            Atomic { size: Size, op: AtomicOp, b: R, off: i16, s: R },
            LoadAcquire { size: Size, d: R, b: R, off: i16 },
            StoreRelease { size: Size, b: R, off: i16, s: R },
            Ja { t: u32 },
            Call { id: u32 },
            CallX { r: R },
            /// A BPF-to-BPF call to instruction `t`, whose stack reach is `reach`.
            CallLocal { t: u32, reach: StackReach },
            Exit,
        }

        fn decode_alu(width: Width, op: AluOp, d: R, src: Source) -> Op {
            match (op, width, src) {
                $(
                    (AluOp::$aop, Width::W64, Source::Reg(s)) => Op::$a64r { d, s: R::of(s) },
                    (AluOp::$aop, Width::W64, Source::Imm(v)) => {
                        Op::$a64i { d, imm: v as i64 as u64 }
                    }
                    (AluOp::$aop, Width::W32, Source::Reg(s)) => Op::$a32r { d, s: R::of(s) },
                    (AluOp::$aop, Width::W32, Source::Imm(v)) => Op::$a32i { d, imm: v as u32 },
                )*
            }
        }

        fn decode_jump(width: Width, cond: JmpCond, d: R, src: Source, t: u32) -> Op {
            match (cond, width, src) {
                $(
                    (JmpCond::$cond, Width::W64, Source::Reg(s)) => Op::$j64r { d, s: R::of(s), t },
                    (JmpCond::$cond, Width::W64, Source::Imm(v)) => {
                        Op::$j64i { d, imm: v as i64 as u64, t }
                    }
                    (JmpCond::$cond, Width::W32, Source::Reg(s)) => Op::$j32r { d, s: R::of(s), t },
                    (JmpCond::$cond, Width::W32, Source::Imm(v)) => {
                        Op::$j32i { d, imm: v as u32, t }
                    }
                )*
            }
        }
    };
}

with_op_table!(define_ops!());

/// The interpreter's dispatch: one `match` on `$op` with an arm per decoded ALU operation and
/// conditional jump (taken: `$next` = the target), followed by `$arms`.
macro_rules! dispatch {
    (
        $op:expr, $regs:expr, $next:ident, { $($arms:tt)* }
        alu [$(($aop:ident $a64r:ident $a64i:ident $a32r:ident $a32i:ident))*]
        jmp [$(($cond:ident $j64r:ident $j64i:ident $j32r:ident $j32i:ident))*]
    ) => {
        match $op {
            $(
                Op::$a64r { d, s } => {
                    $regs[d as usize] = alu64(AluOp::$aop, $regs[d as usize], $regs[s as usize]);
                }
                Op::$a64i { d, imm } => {
                    $regs[d as usize] = alu64(AluOp::$aop, $regs[d as usize], imm);
                }
                Op::$a32r { d, s } => {
                    let (a, b) = ($regs[d as usize] as u32, $regs[s as usize] as u32);
                    $regs[d as usize] = alu32(AluOp::$aop, a, b) as u64;
                }
                Op::$a32i { d, imm } => {
                    $regs[d as usize] = alu32(AluOp::$aop, $regs[d as usize] as u32, imm) as u64;
                }
            )*
            $(
                Op::$j64r { d, s, t } => {
                    if JmpCond::$cond.eval64($regs[d as usize], $regs[s as usize]) {
                        $next = taken(t);
                    }
                }
                Op::$j64i { d, imm, t } => {
                    if JmpCond::$cond.eval64($regs[d as usize], imm) {
                        $next = taken(t);
                    }
                }
                Op::$j32r { d, s, t } => {
                    if JmpCond::$cond.eval32($regs[d as usize] as u32, $regs[s as usize] as u32) {
                        $next = taken(t);
                    }
                }
                Op::$j32i { d, imm, t } => {
                    if JmpCond::$cond.eval32($regs[d as usize] as u32, imm) {
                        $next = taken(t);
                    }
                }
            )*
            $($arms)*
        }
    };
}

/// The index a taken conditional jump continues at. Kept a real branch, not a conditional
/// move: a branch is predicted and the next instruction fetched before the condition is
/// known, while a conditional move would make every jump wait for its operands.
#[inline(always)]
fn taken(t: u32) -> usize {
    // SAFETY: an empty assembly block does nothing; being opaque, it cannot be executed
    // unconditionally, so the path that reaches it stays a branch.
    unsafe { std::arch::asm!("", options(nomem, nostack, preserves_flags)) };
    t as usize
}

/// A program decoded for the interpreter ([`Op`]s, one per instruction), built once per
/// [`Interpreter`] and per tail-call target.
pub(crate) struct Decoded(Box<[Op]>);

impl Decoded {
    /// Decodes `program`.
    ///
    /// # Panics
    /// If the program has more than `u32::MAX` instructions (jump targets are kept in 32 bits).
    pub(crate) fn new(program: &Program) -> Decoded {
        let targets = jump_targets(program);
        let target = |i: usize| {
            u32::try_from(targets[i]).expect("programs have fewer than 2^32 instructions")
        };
        let ops = program
            .insns()
            .iter()
            .enumerate()
            .map(|(i, insn)| decode(program, insn, || target(i)))
            .collect();
        Decoded(ops)
    }

    fn ops(&self) -> &[Op] {
        &self.0
    }
}

/// The decoded form of `insn`; `target` gives its jump or call target.
fn decode(program: &Program, insn: &Insn, target: impl Fn() -> u32) -> Op {
    match *insn {
        Insn::Alu {
            width,
            op,
            dst,
            src,
        } => decode_alu(width, op, R::of(dst), src),
        Insn::Neg { width, dst } => match width {
            Width::W64 => Op::Neg64 { d: R::of(dst) },
            Width::W32 => Op::Neg32 { d: R::of(dst) },
        },
        // As `endian`: a width other than 16 or 32 converts all 64 bits.
        Insn::Endian { kind, bits, dst } => {
            let d = R::of(dst);
            match (kind, bits) {
                (Endian::Le, 16) => Op::Le16 { d },
                (Endian::Le, 32) => Op::Le32 { d },
                (Endian::Le, _) => Op::Nop,
                (Endian::Be | Endian::Swap, 16) => Op::Be16 { d },
                (Endian::Be | Endian::Swap, 32) => Op::Be32 { d },
                (Endian::Be | Endian::Swap, _) => Op::Be64 { d },
            }
        }
        Insn::LoadImm64 { dst, imm } => Op::LoadImm64 { d: R::of(dst), imm },
        Insn::Load {
            size,
            signed,
            dst,
            base,
            off,
        } => {
            let (d, b) = (R::of(dst), R::of(base));
            match (size, signed) {
                (Size::B, false) => Op::LdxB { d, b, off },
                (Size::H, false) => Op::LdxH { d, b, off },
                (Size::W, false) => Op::LdxW { d, b, off },
                (Size::B, true) => Op::LdxSB { d, b, off },
                (Size::H, true) => Op::LdxSH { d, b, off },
                (Size::W, true) => Op::LdxSW { d, b, off },
                // Sign-extending all 64 bits changes nothing.
                (Size::DW, _) => Op::LdxDW { d, b, off },
            }
        }
        Insn::Store {
            size,
            base,
            off,
            src,
        } => {
            let b = R::of(base);
            match src {
                Source::Reg(s) => {
                    let s = R::of(s);
                    match size {
                        Size::B => Op::StxB { b, off, s },
                        Size::H => Op::StxH { b, off, s },
                        Size::W => Op::StxW { b, off, s },
                        Size::DW => Op::StxDW { b, off, s },
                    }
                }
                Source::Imm(v) => {
                    let imm = v as i64 as u64;
                    match size {
                        Size::B => Op::StB { b, off, imm },
                        Size::H => Op::StH { b, off, imm },
                        Size::W => Op::StW { b, off, imm },
                        Size::DW => Op::StDW { b, off, imm },
                    }
                }
            }
        }
        Insn::Atomic {
            size,
            op,
            base,
            off,
            src,
        } => Op::Atomic {
            size,
            op,
            b: R::of(base),
            off,
            s: R::of(src),
        },
        Insn::LoadAcquire {
            size,
            dst,
            base,
            off,
        } => Op::LoadAcquire {
            size,
            d: R::of(dst),
            b: R::of(base),
            off,
        },
        Insn::StoreRelease {
            size,
            base,
            off,
            src,
        } => Op::StoreRelease {
            size,
            b: R::of(base),
            off,
            s: R::of(src),
        },
        Insn::Ja { .. } | Insn::Ja32 { .. } => Op::Ja { t: target() },
        Insn::Jump {
            width,
            cond,
            dst,
            src,
            ..
        } => decode_jump(width, cond, R::of(dst), src, target()),
        Insn::Call { id } => Op::Call { id },
        Insn::CallX { reg } => Op::CallX { r: R::of(reg) },
        Insn::CallLocal { .. } => {
            let t = target();
            Op::CallLocal {
                t,
                reach: program.stack_reach(t as usize),
            }
        }
        Insn::Exit => Op::Exit,
    }
}

/// The code a function runs in: a program with its decoded form and helpers (the entry program,
/// or a tail call's target).
#[derive(Clone, Copy)]
struct Code<'c> {
    program: &'c Program,
    ops: &'c [Op],
    helpers: &'c Helpers,
}

/// Where an instruction is, for errors: its slot index is only looked up when one is reported.
#[derive(Clone, Copy)]
struct At<'c> {
    program: &'c Program,
    /// Instruction index.
    i: usize,
}

impl At<'_> {
    /// The slot index errors report.
    fn pc(self) -> usize {
        self.program.slot_of(self.i)
    }
}

/// A saved caller frame of a BPF-to-BPF call.
struct Frame<'c> {
    code: Code<'c>,
    return_to: usize,
    callee_saved: [u64; 4],
    frame_pointer: u64,
}

/// For each instruction of `program`, the index its jump or call lands on (`usize::MAX` for
/// the others).
pub(crate) fn jump_targets(program: &Program) -> Box<[usize]> {
    (0..program.insns().len())
        .map(|i| program.target_of(i).unwrap_or(usize::MAX))
        .collect()
}

/// Runs programs one instruction at a time.
pub struct Interpreter<'p> {
    program: &'p Program,
    /// The program decoded for dispatch.
    decoded: Decoded,
    helpers: Helpers,
    budget: Option<u64>,
    extra_regions: Vec<MemRegion>,
}

/// A stack for one interpreter run (u64 elements keep it 8-byte aligned, as atomics need).
type Stack = [u64; TOTAL_STACK / 8];

impl<'p> Interpreter<'p> {
    /// An interpreter for `program` with no helpers, no budget and no extra regions.
    pub fn new(program: &'p Program) -> Interpreter<'p> {
        Interpreter {
            program,
            decoded: Decoded::new(program),
            helpers: Helpers::new(),
            budget: None,
            extra_regions: Vec::new(),
        }
    }

    /// Replaces the helpers `call` and `callx` can reach.
    pub fn with_helpers(mut self, helpers: Helpers) -> Self {
        self.helpers = helpers;
        self
    }

    /// Stops a run with [`ExecError::BudgetExhausted`] after `budget` instructions.
    pub fn with_budget(mut self, budget: Option<u64>) -> Self {
        self.budget = budget;
        self
    }

    /// Lets the program access `region` too (e.g. a map value), in every run.
    ///
    /// # Safety
    /// The region must be valid for reads, and for writes if marked writable, during every run,
    /// and must not overlap memory Rust code holds references to (as for
    /// `JitProgram::run_with_regions`): the interpreter dereferences it.
    pub unsafe fn with_region(mut self, region: MemRegion) -> Self {
        self.extra_regions.push(region);
        self
    }

    /// Runs the program on `mem` (r1 = its address or 0 when empty, r2 = its length).
    pub fn run(&self, mem: &mut [u8]) -> Result<u64, ExecError> {
        self.run_counted(mem).map(|(r0, _)| r0)
    }

    /// As [`Interpreter::run`], and also returns how many instructions were executed.
    pub fn run_counted(&self, mem: &mut [u8]) -> Result<(u64, u64), ExecError> {
        let mut stack = new_stack();
        self.run_on(mem, stack.as_mut_ptr() as u64)
    }

    /// As [`Interpreter::run`], with `stack` as the run's stack (whatever it holds: the run
    /// zeroes what it can reach): for callers that need to know where it lies, e.g. to
    /// recognise a result that points into it.
    pub fn run_with_stack(&self, mem: &mut [u8], stack: &mut Stack) -> Result<u64, ExecError> {
        self.run_on(mem, stack.as_mut_ptr() as u64)
            .map(|(r0, _)| r0)
    }

    /// Runs the program in `env` (see [`RunEnv`]), as [`crate::jit::JitProgram::run_env`] does:
    /// r1..r5 = `env.args`, a zeroed stack, the regions of `env` (and those of
    /// [`Interpreter::with_region`]), its user pointer and maps.
    ///
    /// # Safety
    /// As for [`crate::jit::JitProgram::run_env`]: every region of `env` is valid for reads,
    /// and for writes if marked writable, for the whole run, and not aliased by Rust references
    /// meanwhile; every map of `env.maps` is alive for the whole run; `env.user` is valid for
    /// whatever the registered context helpers do with it.
    pub unsafe fn run_env(&self, env: &RunEnv<'_>) -> Result<u64, ExecError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.run_env_counted(env) }.map(|(r0, _)| r0)
    }

    /// As [`Interpreter::run_env`], and also returns how many instructions were executed.
    ///
    /// # Safety
    /// As for [`Interpreter::run_env`].
    pub unsafe fn run_env_counted(&self, env: &RunEnv<'_>) -> Result<(u64, u64), ExecError> {
        let mut stack = new_stack();
        // SAFETY: forwarded from the caller; the stack is the run's own.
        unsafe { self.run_env_on(env, stack.as_mut_ptr() as u64) }
    }

    /// Runs on `mem` with the stack at `stack_base`, counting instructions.
    fn run_on(&self, mem: &mut [u8], stack_base: u64) -> Result<(u64, u64), ExecError> {
        let (addr, len) = (mem.as_mut_ptr() as u64, mem.len() as u64);
        let input = [MemRegion::new(addr, len, true)];
        let regions: &[MemRegion] = if mem.is_empty() { &[] } else { &input };
        let env = RunEnv::new(
            [if mem.is_empty() { 0 } else { addr }, len, 0, 0, 0],
            regions,
        );
        // SAFETY: the only region is `mem`, borrowed exclusively for the run; the extra regions
        // were vouched for by `with_region`'s callers; there are no maps and no user pointer;
        // the stack is the caller's, borrowed exclusively for the run.
        unsafe { self.run_env_on(&env, stack_base) }
    }

    /// Runs in `env` on the stack at `stack_base`, counting instructions.
    ///
    /// # Safety
    /// As for [`Interpreter::run_env`], and `stack_base` is the start of `TOTAL_STACK` bytes,
    /// 8-aligned, writable and used by nothing else during the run (their contents do not
    /// matter).
    unsafe fn run_env_on(
        &self,
        env: &RunEnv<'_>,
        stack_base: u64,
    ) -> Result<(u64, u64), ExecError> {
        let first = env.regions.first().copied();
        let rest = env.regions.get(1..).unwrap_or(&[]);
        let joined: Vec<MemRegion>;
        let extra: &[MemRegion] = if self.extra_regions.is_empty() {
            rest
        } else {
            joined = rest.iter().chain(&self.extra_regions).copied().collect();
            &joined
        };
        let mut m = Machine {
            regs: [0; 11],
            // The context only records these addresses; `extra` and `self.helpers` outlive it.
            ctx: HelperContext::new(
                first.unwrap_or(MemRegion::new(0, 0, true)),
                stack_base,
                extra,
                &self.helpers,
                None,
            ),
        };
        m.ctx.set_env(env);
        m.regs[1..6].copy_from_slice(&env.args);
        m.regs[10] = stack_base + TOTAL_STACK as u64;
        m.ctx
            .enter_function(m.regs[10], self.program.stack_reach(0));
        let code = Code {
            program: self.program,
            ops: self.decoded.ops(),
            helpers: &self.helpers,
        };
        let _run = crate::reclaim::ReadGuard::new();
        self.execute(&mut m, code)
    }

    /// Runs `entry` to its exit: r0 and the number of instructions executed.
    fn execute<'c>(&self, m: &mut Machine, entry: Code<'c>) -> Result<(u64, u64), ExecError> {
        let mut code = entry;
        let mut frames: Vec<Frame<'c>> = Vec::new();
        let mut i = 0usize;
        let budget = self.budget.unwrap_or(u64::MAX);
        // Instructions the run may still execute; `budget - left` have been.
        let mut left = budget;
        loop {
            if left == 0 {
                let pc = code.program.slot_of(i);
                return Err(ExecError::BudgetExhausted { pc, budget });
            }
            left -= 1;
            let at = At {
                program: code.program,
                i,
            };
            let mut next = i + 1;
            with_op_table!(dispatch!(code.ops[i], m.regs, next, {
                Op::Neg64 { d } => m.regs[d as usize] = m.regs[d as usize].wrapping_neg(),
                Op::Neg32 { d } => {
                    m.regs[d as usize] = (m.regs[d as usize] as u32).wrapping_neg() as u64;
                }
                Op::Nop => {}
                Op::Le16 { d } => {
                    m.regs[d as usize] = endian(Endian::Le, 16, m.regs[d as usize]);
                }
                Op::Le32 { d } => {
                    m.regs[d as usize] = endian(Endian::Le, 32, m.regs[d as usize]);
                }
                Op::Be16 { d } => {
                    m.regs[d as usize] = endian(Endian::Be, 16, m.regs[d as usize]);
                }
                Op::Be32 { d } => {
                    m.regs[d as usize] = endian(Endian::Be, 32, m.regs[d as usize]);
                }
                Op::Be64 { d } => {
                    m.regs[d as usize] = endian(Endian::Be, 64, m.regs[d as usize]);
                }
                Op::LoadImm64 { d, imm } => m.regs[d as usize] = imm,
                Op::LdxB { d, b, off } => m.regs[d as usize] = m.load::<u8>(at, b, off)?,
                Op::LdxH { d, b, off } => m.regs[d as usize] = m.load::<u16>(at, b, off)?,
                Op::LdxW { d, b, off } => m.regs[d as usize] = m.load::<u32>(at, b, off)?,
                Op::LdxDW { d, b, off } => m.regs[d as usize] = m.load::<u64>(at, b, off)?,
                Op::LdxSB { d, b, off } => {
                    m.regs[d as usize] = sign_extend(m.load::<u8>(at, b, off)?, Size::B);
                }
                Op::LdxSH { d, b, off } => {
                    m.regs[d as usize] = sign_extend(m.load::<u16>(at, b, off)?, Size::H);
                }
                Op::LdxSW { d, b, off } => {
                    m.regs[d as usize] = sign_extend(m.load::<u32>(at, b, off)?, Size::W);
                }
                Op::StxB { b, off, s } => m.store::<u8>(at, b, off, m.regs[s as usize])?,
                Op::StxH { b, off, s } => m.store::<u16>(at, b, off, m.regs[s as usize])?,
                Op::StxW { b, off, s } => m.store::<u32>(at, b, off, m.regs[s as usize])?,
                Op::StxDW { b, off, s } => m.store::<u64>(at, b, off, m.regs[s as usize])?,
                Op::StB { b, off, imm } => m.store::<u8>(at, b, off, imm)?,
                Op::StH { b, off, imm } => m.store::<u16>(at, b, off, imm)?,
                Op::StW { b, off, imm } => m.store::<u32>(at, b, off, imm)?,
                Op::StDW { b, off, imm } => m.store::<u64>(at, b, off, imm)?,
                Op::Atomic {
                    size,
                    op,
                    b,
                    off,
                    s,
                } => {
                    let addr = m.address(b, off);
                    m.atomic(at, addr, size, op, s)?;
                }
                Op::LoadAcquire { size, d, b, off } => {
                    let addr = m.address(b, off);
                    m.regs[d as usize] = m.load_acquire(at, addr, size)?;
                }
                Op::StoreRelease { size, b, off, s } => {
                    let addr = m.address(b, off);
                    let v = m.regs[s as usize];
                    m.store_release(at, addr, size, v)?;
                }
                Op::Ja { t } => next = t as usize,
                Op::Call { id } => match code.helpers.lookup(id as u64) {
                    Some(Helper::TailCall) => {
                        if let Some(target) = m.tail_call(at.pc())? {
                            // SAFETY: the entry stays valid until the run ends: we are in a
                            // read-side section and replaced entries wait a grace period.
                            let target: &'c TailCode = unsafe { &*target.as_ptr() };
                            code = Code {
                                program: &target.program,
                                ops: target.decoded.ops(),
                                helpers: &target.helpers,
                            };
                            m.enter_tail_call();
                            let fp = m.regs[10];
                            m.ctx.enter_tail_call(fp, m.regs[1]);
                            m.ctx.enter_function(fp, code.program.stack_reach(0));
                            next = 0;
                        }
                    }
                    helper => m.call_helper(helper, at, id as u64)?,
                },
                Op::CallX { r } => {
                    let id = m.regs[r as usize];
                    let helper = code.helpers.lookup(id);
                    m.call_helper(helper, at, id)?;
                }
                Op::CallLocal { t, reach } => {
                    if frames.len() + 1 >= MAX_CALL_DEPTH {
                        return Err(ExecError::CallDepthExceeded { pc: at.pc() });
                    }
                    frames.push(Frame {
                        code,
                        return_to: i + 1,
                        callee_saved: [m.regs[6], m.regs[7], m.regs[8], m.regs[9]],
                        frame_pointer: m.regs[10],
                    });
                    m.regs[10] -= STACK_SIZE as u64;
                    next = t as usize;
                    m.ctx.enter_function(m.regs[10], reach);
                }
                Op::Exit => match frames.pop() {
                    None => return Ok((m.regs[0], budget - left)),
                    Some(frame) => {
                        m.regs[6..10].copy_from_slice(&frame.callee_saved);
                        m.regs[10] = frame.frame_pointer;
                        code = frame.code;
                        next = frame.return_to;
                    }
                },
            }));
            i = next;
        }
    }
}

/// A stack for one run, not zeroed: the run zeroes what it can reach.
fn new_stack() -> Box<std::mem::MaybeUninit<Stack>> {
    Box::new_uninit()
}

/// Runs `program` once on `mem` with the given helpers and no budget.
pub fn run(program: &Program, mem: &mut [u8], helpers: &Helpers) -> Result<u64, ExecError> {
    Interpreter::new(program)
        .with_helpers(helpers.clone())
        .run(mem)
}

/// The unsigned integers loads and stores move.
trait Word: Copy {
    const SIZE: Size;
    fn widen(self) -> u64;
    fn narrow(v: u64) -> Self;
}

macro_rules! word {
    ($($t:ty: $size:ident;)*) => {
        $(impl Word for $t {
            const SIZE: Size = Size::$size;
            fn widen(self) -> u64 {
                self as u64
            }
            fn narrow(v: u64) -> Self {
                v as $t
            }
        })*
    };
}

word! {
    u8: B;
    u16: H;
    u32: W;
    u64: DW;
}

struct Machine {
    regs: [u64; 11],
    /// The run's context: its regions, grants, maps, user pointer and tail-call count.
    ctx: HelperContext,
}

impl Machine {
    fn address(&self, base: R, off: i16) -> u64 {
        self.regs[base as usize].wrapping_add(off as i64 as u64)
    }

    /// Checks that `[addr, addr + size)` is inside a region that allows `access`.
    #[inline(always)]
    fn check(&self, at: At<'_>, addr: u64, size: Size, access: Access) -> Result<(), ExecError> {
        let log2 = size.bytes().trailing_zeros() as usize;
        // The inline test accepts only what `permits` accepts; for the rest `permits` decides.
        if self.ctx.permits_inline(addr, log2, access != Access::Load) {
            Ok(())
        } else {
            self.check_slow(at, addr, size, access)
        }
    }

    #[cold]
    #[inline(never)]
    fn check_slow(
        &self,
        at: At<'_>,
        addr: u64,
        size: Size,
        access: Access,
    ) -> Result<(), ExecError> {
        let size = size.bytes() as u64;
        if self.ctx.permits(addr, size, access) {
            Ok(())
        } else {
            Err(ExecError::OutOfBounds {
                pc: at.pc(),
                addr,
                size,
                access,
            })
        }
    }

    fn check_atomic(
        &self,
        at: At<'_>,
        addr: u64,
        size: Size,
        access: Access,
    ) -> Result<(), ExecError> {
        self.check(at, addr, size, access)?;
        let bytes = size.bytes() as u64;
        if !addr.is_multiple_of(bytes) {
            return Err(ExecError::MisalignedAtomic {
                pc: at.pc(),
                addr,
                size: bytes,
            });
        }
        Ok(())
    }

    /// `*(T *)(base + off)`, zero-extended.
    #[inline(always)]
    fn load<T: Word>(&self, at: At<'_>, base: R, off: i16) -> Result<u64, ExecError> {
        let addr = self.address(base, off);
        self.check(at, addr, T::SIZE, Access::Load)?;
        // SAFETY: `check` proved [addr, addr + size) lies inside a live region: the caller's input
        // slice, the part of the run's stack it has zeroed (hence initialised), or a region the
        // embedder vouched for. Unaligned reads are used because eBPF allows unaligned access.
        let v = unsafe { (addr as *const T).read_unaligned() };
        Ok(v.widen())
    }

    /// `*(T *)(base + off) = v` (its low bytes).
    #[inline(always)]
    fn store<T: Word>(&self, at: At<'_>, base: R, off: i16, v: u64) -> Result<(), ExecError> {
        let addr = self.address(base, off);
        self.check(at, addr, T::SIZE, Access::Store)?;
        // SAFETY: as in `load`, and `check` also proved the region writable.
        unsafe { (addr as *mut T).write_unaligned(T::narrow(v)) };
        Ok(())
    }

    fn atomic(
        &mut self,
        at: At<'_>,
        addr: u64,
        size: Size,
        op: AtomicOp,
        src: R,
    ) -> Result<(), ExecError> {
        self.check_atomic(at, addr, size, Access::Atomic)?;
        let s = self.regs[src as usize];
        // Other threads (or helpers) may share this memory, so the operation is a real atomic with
        // sequential consistency, as the kernel's fetching atomics are fully ordered.
        let seq = Ordering::SeqCst;
        match size {
            Size::W => {
                // SAFETY: checked in bounds, writable and 4-byte aligned above; the memory lives
                // for the whole run.
                let a = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
                let v = s as u32;
                let old = match op {
                    AtomicOp::Add | AtomicOp::FetchAdd => a.fetch_add(v, seq),
                    AtomicOp::Or | AtomicOp::FetchOr => a.fetch_or(v, seq),
                    AtomicOp::And | AtomicOp::FetchAnd => a.fetch_and(v, seq),
                    AtomicOp::Xor | AtomicOp::FetchXor => a.fetch_xor(v, seq),
                    AtomicOp::Xchg => a.swap(v, seq),
                    AtomicOp::CmpXchg => {
                        let expected = self.regs[0] as u32;
                        match a.compare_exchange(expected, v, seq, seq) {
                            Ok(old) | Err(old) => old,
                        }
                    }
                };
                self.write_back(op, src, old as u64);
            }
            _ => {
                // SAFETY: as above, 8-byte aligned.
                let a = unsafe { AtomicU64::from_ptr(addr as *mut u64) };
                let old = match op {
                    AtomicOp::Add | AtomicOp::FetchAdd => a.fetch_add(s, seq),
                    AtomicOp::Or | AtomicOp::FetchOr => a.fetch_or(s, seq),
                    AtomicOp::And | AtomicOp::FetchAnd => a.fetch_and(s, seq),
                    AtomicOp::Xor | AtomicOp::FetchXor => a.fetch_xor(s, seq),
                    AtomicOp::Xchg => a.swap(s, seq),
                    AtomicOp::CmpXchg => match a.compare_exchange(self.regs[0], s, seq, seq) {
                        Ok(old) | Err(old) => old,
                    },
                };
                self.write_back(op, src, old);
            }
        }
        Ok(())
    }

    /// Where a fetching atomic puts the old value.
    fn write_back(&mut self, op: AtomicOp, src: R, old: u64) {
        match op {
            AtomicOp::CmpXchg => self.regs[0] = old,
            AtomicOp::FetchAdd
            | AtomicOp::FetchOr
            | AtomicOp::FetchAnd
            | AtomicOp::FetchXor
            | AtomicOp::Xchg => self.regs[src as usize] = old,
            AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => {}
        }
    }

    fn load_acquire(&self, at: At<'_>, addr: u64, size: Size) -> Result<u64, ExecError> {
        self.check_atomic(at, addr, size, Access::Load)?;
        let acq = Ordering::Acquire;
        // SAFETY: checked in bounds and naturally aligned; the memory lives for the whole run.
        let v = unsafe {
            match size {
                Size::B => AtomicU8::from_ptr(addr as *mut u8).load(acq) as u64,
                Size::H => AtomicU16::from_ptr(addr as *mut u16).load(acq) as u64,
                Size::W => AtomicU32::from_ptr(addr as *mut u32).load(acq) as u64,
                Size::DW => AtomicU64::from_ptr(addr as *mut u64).load(acq),
            }
        };
        Ok(v)
    }

    fn store_release(&self, at: At<'_>, addr: u64, size: Size, v: u64) -> Result<(), ExecError> {
        self.check_atomic(at, addr, size, Access::Store)?;
        let rel = Ordering::Release;
        // SAFETY: checked in bounds, writable and naturally aligned.
        unsafe {
            match size {
                Size::B => AtomicU8::from_ptr(addr as *mut u8).store(v as u8, rel),
                Size::H => AtomicU16::from_ptr(addr as *mut u16).store(v as u16, rel),
                Size::W => AtomicU32::from_ptr(addr as *mut u32).store(v as u32, rel),
                Size::DW => AtomicU64::from_ptr(addr as *mut u64).store(v, rel),
            }
        }
        Ok(())
    }

    /// Calls `helper` (what `id` is bound to) with r1–r5, and the context for a context helper;
    /// r0 = its result. The tail call is not reachable this way (`callx`): unknown.
    fn call_helper(
        &mut self,
        helper: Option<Helper>,
        at: At<'_>,
        id: u64,
    ) -> Result<(), ExecError> {
        let r = self.regs;
        self.regs[0] = match helper {
            Some(Helper::Plain(f)) => f(r[1], r[2], r[3], r[4], r[5]),
            Some(Helper::Context(f)) => {
                self.ctx.set_call(at.pc(), id as u32);
                // SAFETY: the run's own context, referenced by nothing else during the call.
                let r0 = unsafe { f(r[1], r[2], r[3], r[4], r[5], &mut self.ctx) };
                if let Some(e) = self.ctx.take_error() {
                    return Err(e);
                }
                r0
            }
            Some(Helper::TailCall) | None => {
                return Err(ExecError::UnknownHelper { pc: at.pc(), id });
            }
        };
        Ok(())
    }

    /// `bpf_tail_call(r1, r2 = map, r3 = index)`: the target, or `None` to fall through.
    fn tail_call(&mut self, pc: usize) -> Result<Option<NonNull<TailCode>>, ExecError> {
        let (map, index) = (self.regs[2], self.regs[3] as u32);
        tail::lookup(&mut self.ctx, pc, map, index)
    }

    /// The registers a tail call's target starts with: r1 and r10 kept, the rest zero.
    fn enter_tail_call(&mut self) {
        let (r1, r10) = (self.regs[1], self.regs[10]);
        self.regs = [0; 11];
        self.regs[1] = r1;
        self.regs[10] = r10;
    }
}

/// A 64-bit ALU operation with RFC 9669's edge cases.
pub fn alu64(op: AluOp, d: u64, s: u64) -> u64 {
    match op {
        AluOp::Add => d.wrapping_add(s),
        AluOp::Sub => d.wrapping_sub(s),
        AluOp::Mul => d.wrapping_mul(s),
        AluOp::Div => d.checked_div(s).unwrap_or(0),
        AluOp::SDiv => {
            if s == 0 {
                0
            } else {
                (d as i64).wrapping_div(s as i64) as u64
            }
        }
        AluOp::Mod => d.checked_rem(s).unwrap_or(d),
        AluOp::SMod => {
            if s == 0 {
                d
            } else {
                (d as i64).wrapping_rem(s as i64) as u64
            }
        }
        AluOp::Or => d | s,
        AluOp::And => d & s,
        AluOp::Xor => d ^ s,
        AluOp::Lsh => d.wrapping_shl(s as u32 & 63),
        AluOp::Rsh => d.wrapping_shr(s as u32 & 63),
        AluOp::Arsh => (d as i64).wrapping_shr(s as u32 & 63) as u64,
        AluOp::Mov => s,
        AluOp::MovSx8 => s as i8 as i64 as u64,
        AluOp::MovSx16 => s as i16 as i64 as u64,
        AluOp::MovSx32 => s as i32 as i64 as u64,
    }
}

/// A 32-bit ALU operation; the caller zero-extends the result.
pub fn alu32(op: AluOp, d: u32, s: u32) -> u32 {
    match op {
        AluOp::Add => d.wrapping_add(s),
        AluOp::Sub => d.wrapping_sub(s),
        AluOp::Mul => d.wrapping_mul(s),
        AluOp::Div => d.checked_div(s).unwrap_or(0),
        AluOp::SDiv => {
            if s == 0 {
                0
            } else {
                (d as i32).wrapping_div(s as i32) as u32
            }
        }
        AluOp::Mod => d.checked_rem(s).unwrap_or(d),
        AluOp::SMod => {
            if s == 0 {
                d
            } else {
                (d as i32).wrapping_rem(s as i32) as u32
            }
        }
        AluOp::Or => d | s,
        AluOp::And => d & s,
        AluOp::Xor => d ^ s,
        AluOp::Lsh => d.wrapping_shl(s & 31),
        AluOp::Rsh => d.wrapping_shr(s & 31),
        AluOp::Arsh => (d as i32).wrapping_shr(s & 31) as u32,
        AluOp::Mov => s,
        AluOp::MovSx8 => s as i8 as i32 as u32,
        AluOp::MovSx16 => s as i16 as i32 as u32,
        // Not encodable for 32-bit (rejected by the decoder); keep the low half.
        AluOp::MovSx32 => s,
    }
}

/// Byte-order conversion on a little-endian host.
pub fn endian(kind: Endian, bits: u8, d: u64) -> u64 {
    match (kind, bits) {
        (Endian::Le, 16) => d as u16 as u64,
        (Endian::Le, 32) => d as u32 as u64,
        (Endian::Le, _) => d,
        (Endian::Be | Endian::Swap, 16) => (d as u16).swap_bytes() as u64,
        (Endian::Be | Endian::Swap, 32) => (d as u32).swap_bytes() as u64,
        (Endian::Be | Endian::Swap, _) => d.swap_bytes(),
    }
}

/// Sign-extends the low `size` bytes of `v`.
pub fn sign_extend(v: u64, size: Size) -> u64 {
    match size {
        Size::B => v as i8 as i64 as u64,
        Size::H => v as i16 as i64 as u64,
        Size::W => v as i32 as i64 as u64,
        Size::DW => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::JmpCond;

    const fn r(n: u8) -> Reg {
        match Reg::new(n) {
            Some(r) => r,
            None => panic!("no such register"),
        }
    }

    fn alu(width: Width, op: AluOp, dst: u8, src: Source) -> Insn {
        Insn::Alu {
            width,
            op,
            dst: r(dst),
            src,
        }
    }

    fn mov(dst: u8, v: i32) -> Insn {
        alu(Width::W64, AluOp::Mov, dst, Source::Imm(v))
    }

    fn ld(size: Size, signed: bool, dst: u8, base: u8, off: i16) -> Insn {
        Insn::Load {
            size,
            signed,
            dst: r(dst),
            base: r(base),
            off,
        }
    }

    fn st(size: Size, base: u8, off: i16, src: Source) -> Insn {
        Insn::Store {
            size,
            base: r(base),
            off,
            src,
        }
    }

    fn lddw(dst: u8, imm: u64) -> Insn {
        Insn::LoadImm64 { dst: r(dst), imm }
    }

    fn run_insns(insns: Vec<Insn>, helpers: &Helpers) -> Result<(u64, u64), ExecError> {
        let program = Program::new(insns).expect("valid program");
        let mut mem = [0u8; 64];
        Interpreter::new(&program)
            .with_helpers(helpers.clone())
            .run_counted(&mut mem)
    }

    fn r0_of(insns: Vec<Insn>) -> u64 {
        run_insns(insns, &Helpers::new()).expect("runs").0
    }

    const VALUES: [u64; 12] = [
        0,
        1,
        2,
        7,
        31,
        32,
        63,
        64,
        0x8000_0000,
        0xffff_ffff,
        0x8000_0000_0000_0000,
        u64::MAX,
    ];

    #[test]
    fn decoded_ops_stay_compact() {
        assert!(std::mem::size_of::<Op>() <= 16);
    }

    #[test]
    fn every_alu_op_width_and_source() {
        for op in AluOp::ALL {
            for width in [Width::W64, Width::W32] {
                for &a in &VALUES {
                    for &b in &VALUES {
                        let imm = b as i32;
                        for src in [Source::Reg(r(7)), Source::Imm(imm)] {
                            // The operand as RFC 9669 gives it: an immediate is sign-extended
                            // for 64-bit operations, taken as is for 32-bit ones.
                            let s = match (src, width) {
                                (Source::Reg(_), _) => b,
                                (Source::Imm(v), Width::W64) => v as i64 as u64,
                                (Source::Imm(v), Width::W32) => v as u32 as u64,
                            };
                            let want = match width {
                                Width::W64 => alu64(op, a, s),
                                Width::W32 => alu32(op, a as u32, s as u32) as u64,
                            };
                            let got = r0_of(vec![
                                lddw(3, a),
                                lddw(7, b),
                                alu(width, op, 3, src),
                                alu(Width::W64, AluOp::Mov, 0, Source::Reg(r(3))),
                                Insn::Exit,
                            ]);
                            assert_eq!(got, want, "{op:?} {width:?} {a:#x}, {src:?} (r7 = {b:#x})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_jump_condition_width_and_source() {
        for cond in JmpCond::ALL {
            for width in [Width::W64, Width::W32] {
                for &a in &VALUES {
                    for &b in &VALUES {
                        for src in [Source::Reg(r(9)), Source::Imm(b as i32)] {
                            let taken = match (width, src) {
                                (Width::W64, Source::Reg(_)) => cond.eval64(a, b),
                                (Width::W64, Source::Imm(v)) => cond.eval64(a, v as i64 as u64),
                                (Width::W32, Source::Reg(_)) => cond.eval32(a as u32, b as u32),
                                (Width::W32, Source::Imm(v)) => cond.eval32(a as u32, v as u32),
                            };
                            let got = r0_of(vec![
                                lddw(4, a),
                                lddw(9, b),
                                mov(0, 1),
                                Insn::Jump {
                                    width,
                                    cond,
                                    dst: r(4),
                                    src,
                                    off: 1,
                                },
                                mov(0, 0),
                                Insn::Exit,
                            ]);
                            assert_eq!(got, taken as u64, "{cond:?} {width:?} {a:#x}, {src:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn neg_and_byte_order() {
        let v = 0x0123_4567_89ab_cdefu64;
        let neg = |width| r0_of(vec![lddw(0, v), Insn::Neg { width, dst: r(0) }, Insn::Exit]);
        assert_eq!(neg(Width::W64), v.wrapping_neg());
        assert_eq!(neg(Width::W32), 0x89ab_cdefu32.wrapping_neg() as u64);
        let cases = [
            (Endian::Le, 16, 0xcdef),
            (Endian::Le, 32, 0x89ab_cdef),
            (Endian::Le, 64, v),
            (Endian::Be, 16, 0xefcd),
            (Endian::Be, 32, 0xefcd_ab89),
            (Endian::Be, 64, 0xefcd_ab89_6745_2301),
            (Endian::Swap, 16, 0xefcd),
            (Endian::Swap, 32, 0xefcd_ab89),
            (Endian::Swap, 64, 0xefcd_ab89_6745_2301),
        ];
        for (kind, bits, want) in cases {
            let got = r0_of(vec![
                lddw(0, v),
                Insn::Endian {
                    kind,
                    bits,
                    dst: r(0),
                },
                Insn::Exit,
            ]);
            assert_eq!(got, want, "{kind:?} {bits}");
        }
    }

    #[test]
    fn loads_and_stores_of_every_size() {
        let v = 0x0123_4567_89ab_cdefu64;
        // r1 + 8 as the base, so that offsets are negative too.
        let base = |insns: &mut Vec<Insn>| {
            insns.push(lddw(2, v));
            insns.push(st(Size::DW, 1, 0, Source::Reg(r(2))));
            insns.push(alu(Width::W64, AluOp::Add, 1, Source::Imm(8)));
        };
        let loads = [
            (Size::B, false, 0xef),
            (Size::H, false, 0xcdef),
            (Size::W, false, 0x89ab_cdef),
            (Size::DW, false, v),
            (Size::B, true, 0xffff_ffff_ffff_ffef),
            (Size::H, true, 0xffff_ffff_ffff_cdef),
            (Size::W, true, 0xffff_ffff_89ab_cdef),
            (Size::DW, true, v),
        ];
        for (size, signed, want) in loads {
            let mut insns = Vec::new();
            base(&mut insns);
            insns.extend([ld(size, signed, 0, 1, -8), Insn::Exit]);
            assert_eq!(r0_of(insns), want, "{size:?} signed {signed}");
        }
        let stores = [
            (Size::B, 0xef, 0xff),
            (Size::H, 0xcdef, 0xfffe),
            (Size::W, 0x89ab_cdef, 0xffff_fffd),
            (Size::DW, v, 0xffff_ffff_ffff_fffc),
        ];
        for (k, (size, from_reg, from_imm)) in stores.into_iter().enumerate() {
            for (src, want) in [
                (Source::Reg(r(2)), from_reg),
                (Source::Imm(-(k as i32) - 1), from_imm),
            ] {
                // Over a zero word, read back whole: only the low `size` bytes are written.
                let mut insns = Vec::new();
                base(&mut insns);
                insns.extend([
                    lddw(3, 0),
                    st(Size::DW, 1, 0, Source::Reg(r(3))),
                    st(size, 1, 0, src),
                    ld(Size::DW, false, 0, 1, 0),
                    Insn::Exit,
                ]);
                assert_eq!(r0_of(insns), want, "{size:?} {src:?}");
            }
        }
    }

    #[test]
    fn every_atomic_op_and_size() {
        let (old, operand, expected) = (0x0f0f_0000_ffff_0003u64, 0x1234_5678_0000_0005u64, 3);
        for size in [Size::W, Size::DW] {
            for op in AtomicOp::ALL {
                for r0 in [expected, 7] {
                    // Reference: the new memory word, the new src register, the new r0.
                    let mask = if size == Size::W {
                        0xffff_ffff
                    } else {
                        u64::MAX
                    };
                    let (m, s) = (old & mask, operand & mask);
                    let new = match op {
                        AtomicOp::Add | AtomicOp::FetchAdd => m.wrapping_add(s) & mask,
                        AtomicOp::Or | AtomicOp::FetchOr => m | s,
                        AtomicOp::And | AtomicOp::FetchAnd => m & s,
                        AtomicOp::Xor | AtomicOp::FetchXor => m ^ s,
                        AtomicOp::Xchg => s,
                        AtomicOp::CmpXchg if r0 & mask == m => s,
                        AtomicOp::CmpXchg => m,
                    };
                    let fetches = !matches!(
                        op,
                        AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor
                    );
                    let want_src = if fetches && op != AtomicOp::CmpXchg {
                        m
                    } else {
                        operand
                    };
                    let want_r0 = if op == AtomicOp::CmpXchg { m } else { r0 };
                    let want_mem = (old & !mask) | new;
                    let program = Program::new(vec![
                        lddw(2, old),
                        st(Size::DW, 10, -8, Source::Reg(r(2))),
                        lddw(3, operand),
                        lddw(0, r0),
                        Insn::Atomic {
                            size,
                            op,
                            base: r(10),
                            off: -8,
                            src: r(3),
                        },
                        st(Size::DW, 1, 0, Source::Reg(r(0))),
                        st(Size::DW, 1, 8, Source::Reg(r(3))),
                        ld(Size::DW, false, 4, 10, -8),
                        st(Size::DW, 1, 16, Source::Reg(r(4))),
                        Insn::Exit,
                    ])
                    .expect("valid");
                    let mut mem = [0u8; 24];
                    Interpreter::new(&program).run(&mut mem).expect("runs");
                    let word = |k: usize| u64::from_le_bytes(mem[k..k + 8].try_into().unwrap());
                    let what = format!("{op:?} {size:?} r0 = {r0}");
                    assert_eq!(word(0), want_r0, "r0 after {what}");
                    assert_eq!(word(8), want_src, "src after {what}");
                    assert_eq!(word(16), want_mem, "memory after {what}");
                }
            }
        }
    }

    #[test]
    fn load_acquire_and_store_release_of_every_size() {
        let v = 0x0123_4567_89ab_cdefu64;
        for (size, want) in [
            (Size::B, 0xef),
            (Size::H, 0xcdef),
            (Size::W, 0x89ab_cdef),
            (Size::DW, v),
        ] {
            let got = r0_of(vec![
                lddw(2, v),
                lddw(3, u64::MAX),
                st(Size::DW, 10, -8, Source::Reg(r(3))),
                Insn::StoreRelease {
                    size,
                    base: r(10),
                    off: -8,
                    src: r(2),
                },
                Insn::LoadAcquire {
                    size,
                    dst: r(0),
                    base: r(10),
                    off: -8,
                },
                Insn::Exit,
            ]);
            assert_eq!(got, want, "{size:?}");
        }
        // Misaligned: reported with the slot index (the lddw before takes two).
        let err = run_insns(
            vec![
                lddw(2, 0),
                Insn::LoadAcquire {
                    size: Size::H,
                    dst: r(0),
                    base: r(10),
                    off: -3,
                },
                Insn::Exit,
            ],
            &Helpers::new(),
        );
        assert!(
            matches!(err, Err(ExecError::MisalignedAtomic { pc: 2, size: 2, .. })),
            "{err:?}"
        );
    }

    extern "C" fn sum(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
        a + 2 * b + 3 * c + 4 * d + 5 * e
    }

    #[test]
    fn jumps_and_calls() {
        let mut helpers = Helpers::new();
        helpers.register(7, sum);
        let program = vec![
            mov(0, 0),
            // Both unconditional forms skip a poison.
            Insn::Ja { off: 1 },
            mov(0, 99),
            Insn::Ja32 { off: 1 },
            mov(0, 99),
            mov(1, 1),
            mov(2, 1),
            mov(3, 1),
            mov(4, 1),
            mov(5, 1),
            Insn::Call { id: 7 },
            alu(Width::W64, AluOp::Mov, 6, Source::Reg(r(0))), // r6 = 15
            mov(9, 7),
            mov(1, 2),
            Insn::CallX { reg: r(9) }, // r0 = 2 + 2 + 3 + 4 + 5 = 16
            alu(Width::W64, AluOp::Add, 6, Source::Reg(r(0))), // r6 = 31
            mov(1, 100),
            Insn::CallLocal { off: 3 },
            alu(Width::W64, AluOp::Add, 0, Source::Reg(r(6))), // callee-saved r6 kept
            alu(Width::W64, AluOp::Add, 0, Source::Reg(r(10))), // r10 restored
            Insn::Exit,
            // The subprogram: r0 = r1 * 2, clobbering r6.
            mov(6, 0),
            alu(Width::W64, AluOp::Mov, 0, Source::Reg(r(1))),
            alu(Width::W64, AluOp::Mul, 0, Source::Imm(2)),
            Insn::Exit,
        ];
        let program = Program::new(program).expect("valid");
        let mut stack = Box::new([0u64; TOTAL_STACK / 8]);
        let top = stack.as_ptr() as u64 + TOTAL_STACK as u64;
        let got = Interpreter::new(&program)
            .with_helpers(helpers)
            .run_with_stack(&mut [], &mut stack)
            .expect("runs");
        assert_eq!(got, (200 + 31u64).wrapping_add(top));
    }

    #[test]
    fn budgets_count_every_instruction_and_report_slots() {
        let insns = vec![lddw(0, 5), mov(1, 0), lddw(2, 1), Insn::Exit];
        let program = Program::new(insns).expect("valid");
        let run = |budget| {
            Interpreter::new(&program)
                .with_budget(budget)
                .run_counted(&mut [])
        };
        assert_eq!(run(None), Ok((5, 4)));
        assert_eq!(run(Some(4)), Ok((5, 4)));
        // The fourth instruction (exit) starts at slot 5.
        assert_eq!(
            run(Some(3)),
            Err(ExecError::BudgetExhausted { pc: 5, budget: 3 })
        );
        assert_eq!(
            run(Some(0)),
            Err(ExecError::BudgetExhausted { pc: 0, budget: 0 })
        );
    }

    #[test]
    fn out_of_bounds_reports_slot_address_size_and_access() {
        for (insn, access, size) in [
            (ld(Size::W, false, 0, 1, 62), Access::Load, 4),
            (ld(Size::H, true, 0, 1, 63), Access::Load, 2),
            (st(Size::DW, 1, 60, Source::Imm(1)), Access::Store, 8),
            (st(Size::B, 1, 64, Source::Reg(r(1))), Access::Store, 1),
        ] {
            let program = Program::new(vec![lddw(2, 0), insn, Insn::Exit]).expect("valid");
            let mut mem = [0u8; 64];
            let base = mem.as_ptr() as u64;
            let off = match insn {
                Insn::Load { off, .. } | Insn::Store { off, .. } => off as u64,
                _ => unreachable!(),
            };
            let err = Interpreter::new(&program).run(&mut mem);
            assert_eq!(
                err,
                Err(ExecError::OutOfBounds {
                    pc: 2,
                    addr: base + off,
                    size,
                    access
                }),
                "{insn:?}"
            );
        }
    }

    #[test]
    fn decoding_folds_operands() {
        let program = Program::new(vec![
            alu(Width::W64, AluOp::Add, 1, Source::Imm(-1)),
            alu(Width::W32, AluOp::Add, 1, Source::Imm(-1)),
            Insn::Jump {
                width: Width::W64,
                cond: JmpCond::Sgt,
                dst: r(2),
                src: Source::Imm(-2),
                off: 1,
            },
            Insn::Jump {
                width: Width::W32,
                cond: JmpCond::Lt,
                dst: r(2),
                src: Source::Reg(r(3)),
                off: -1,
            },
            st(Size::H, 10, -2, Source::Imm(-3)),
            ld(Size::DW, true, 4, 10, -8),
            Insn::Exit,
        ])
        .expect("valid");
        assert_eq!(
            Decoded::new(&program).ops(),
            [
                Op::Add64I {
                    d: R::R1,
                    imm: u64::MAX
                },
                Op::Add32I {
                    d: R::R1,
                    imm: u32::MAX
                },
                Op::Jsgt64I {
                    d: R::R2,
                    imm: -2i64 as u64,
                    t: 4
                },
                Op::Jlt32R {
                    d: R::R2,
                    s: R::R3,
                    t: 3
                },
                Op::StH {
                    b: R::R10,
                    off: -2,
                    imm: -3i64 as u64
                },
                Op::LdxDW {
                    d: R::R4,
                    b: R::R10,
                    off: -8
                },
                Op::Exit,
            ]
        );
    }
}
