//! The reference interpreter: the oracle the JITs are checked against.
//!
//! It follows RFC 9669 to the letter (division by zero gives 0, modulo by zero leaves `dst`, signed
//! overflow wraps), checks every memory access with the run's [`HelperContext`] — the decision
//! checked JIT code makes too — and can stop runaway programs with an instruction budget.
//! Pointers are real host addresses, so helpers and programs share memory as they do under the
//! JIT. Context helpers get the run's context as under the JIT, and `bpf_tail_call` follows
//! [`crate::exec::tail`]. Every run is a read-side section of [`crate::reclaim`], as a JIT run
//! is: map values a lookup returns and tail-call targets stay valid until it ends.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::exec::tail::{self, TailCode};
use crate::exec::{
    Access, ExecError, HelperContext, MAX_CALL_DEPTH, MemRegion, RunEnv, STACK_SIZE, TOTAL_STACK,
};
use crate::helpers::{Helper, Helpers};
use crate::isa::{AluOp, AtomicOp, Endian, Insn, Program, Reg, Size, Source, Width};

/// The code a function runs in: a program with its jump table and helpers (the entry program,
/// or a tail call's target).
#[derive(Clone, Copy)]
struct Code<'c> {
    program: &'c Program,
    targets: &'c [usize],
    helpers: &'c Helpers,
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
    /// For each instruction, the instruction index its jump or call lands on.
    targets: Box<[usize]>,
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
            targets: jump_targets(program),
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
            executed: 0,
        };
        m.ctx.set_env(env);
        m.regs[1..6].copy_from_slice(&env.args);
        m.regs[10] = stack_base + TOTAL_STACK as u64;
        m.ctx
            .enter_function(m.regs[10], self.program.stack_reach(0));
        let code = Code {
            program: self.program,
            targets: &self.targets,
            helpers: &self.helpers,
        };
        let _run = crate::reclaim::ReadGuard::new();
        let r0 = self.execute(&mut m, code)?;
        Ok((r0, m.executed))
    }

    fn execute<'c>(&self, m: &mut Machine, entry: Code<'c>) -> Result<u64, ExecError> {
        let mut code = entry;
        let mut frames: Vec<Frame<'c>> = Vec::new();
        let mut i = 0usize;
        let budget = self.budget.unwrap_or(u64::MAX);
        loop {
            let insns = code.program.insns();
            if m.executed >= budget {
                let pc = code.program.slot_of(i);
                return Err(ExecError::BudgetExhausted { pc, budget });
            }
            m.executed += 1;
            let pc = code.program.slot_of(i);
            let mut next = i + 1;
            match insns[i] {
                Insn::Alu {
                    width,
                    op,
                    dst,
                    src,
                } => {
                    let s = match (src, width) {
                        (Source::Reg(r), _) => m.regs[r.index()],
                        (Source::Imm(v), Width::W64) => v as i64 as u64,
                        (Source::Imm(v), Width::W32) => v as u32 as u64,
                    };
                    let d = m.regs[dst.index()];
                    m.regs[dst.index()] = match width {
                        Width::W64 => alu64(op, d, s),
                        Width::W32 => alu32(op, d as u32, s as u32) as u64,
                    };
                }
                Insn::Neg { width, dst } => {
                    let d = m.regs[dst.index()];
                    m.regs[dst.index()] = match width {
                        Width::W64 => d.wrapping_neg(),
                        Width::W32 => (d as u32).wrapping_neg() as u64,
                    };
                }
                Insn::Endian { kind, bits, dst } => {
                    let d = m.regs[dst.index()];
                    m.regs[dst.index()] = endian(kind, bits, d);
                }
                Insn::LoadImm64 { dst, imm } => m.regs[dst.index()] = imm,
                Insn::Load {
                    size,
                    signed,
                    dst,
                    base,
                    off,
                } => {
                    let addr = m.address(base, off);
                    let v = m.load(pc, addr, size)?;
                    m.regs[dst.index()] = if signed { sign_extend(v, size) } else { v };
                }
                Insn::Store {
                    size,
                    base,
                    off,
                    src,
                } => {
                    let addr = m.address(base, off);
                    let v = match src {
                        Source::Reg(r) => m.regs[r.index()],
                        Source::Imm(v) => v as i64 as u64,
                    };
                    m.store(pc, addr, size, v)?;
                }
                Insn::Atomic {
                    size,
                    op,
                    base,
                    off,
                    src,
                } => {
                    let addr = m.address(base, off);
                    m.atomic(pc, addr, size, op, src)?;
                }
                Insn::LoadAcquire {
                    size,
                    dst,
                    base,
                    off,
                } => {
                    let addr = m.address(base, off);
                    m.regs[dst.index()] = m.load_acquire(pc, addr, size)?;
                }
                Insn::StoreRelease {
                    size,
                    base,
                    off,
                    src,
                } => {
                    let addr = m.address(base, off);
                    let v = m.regs[src.index()];
                    m.store_release(pc, addr, size, v)?;
                }
                Insn::Ja { .. } | Insn::Ja32 { .. } => next = code.targets[i],
                Insn::Jump {
                    width,
                    cond,
                    dst,
                    src,
                    ..
                } => {
                    let d = m.regs[dst.index()];
                    let taken = match (width, src) {
                        (Width::W64, Source::Reg(r)) => cond.eval64(d, m.regs[r.index()]),
                        (Width::W64, Source::Imm(v)) => cond.eval64(d, v as i64 as u64),
                        (Width::W32, Source::Reg(r)) => {
                            cond.eval32(d as u32, m.regs[r.index()] as u32)
                        }
                        (Width::W32, Source::Imm(v)) => cond.eval32(d as u32, v as u32),
                    };
                    if taken {
                        next = code.targets[i];
                    }
                }
                Insn::Call { id } => match code.helpers.lookup(id as u64) {
                    Some(Helper::TailCall) => {
                        if let Some(target) = m.tail_call(pc)? {
                            // SAFETY: the entry stays valid until the run ends: we are in a
                            // read-side section and replaced entries wait a grace period.
                            let target: &'c TailCode = unsafe { &*target.as_ptr() };
                            code = Code {
                                program: &target.program,
                                targets: &target.targets,
                                helpers: &target.helpers,
                            };
                            m.enter_tail_call();
                            let fp = m.regs[10];
                            m.ctx.enter_tail_call(fp, m.regs[1]);
                            m.ctx.enter_function(fp, code.program.stack_reach(0));
                            next = 0;
                        }
                    }
                    helper => m.call_helper(helper, pc, id as u64)?,
                },
                Insn::CallX { reg } => {
                    let id = m.regs[reg.index()];
                    let helper = code.helpers.lookup(id);
                    m.call_helper(helper, pc, id)?;
                }
                Insn::CallLocal { .. } => {
                    if frames.len() + 1 >= MAX_CALL_DEPTH {
                        return Err(ExecError::CallDepthExceeded { pc });
                    }
                    frames.push(Frame {
                        code,
                        return_to: i + 1,
                        callee_saved: [m.regs[6], m.regs[7], m.regs[8], m.regs[9]],
                        frame_pointer: m.regs[10],
                    });
                    m.regs[10] -= STACK_SIZE as u64;
                    next = code.targets[i];
                    let reach = code.program.stack_reach(next);
                    m.ctx.enter_function(m.regs[10], reach);
                }
                Insn::Exit => match frames.pop() {
                    None => return Ok(m.regs[0]),
                    Some(frame) => {
                        m.regs[6..10].copy_from_slice(&frame.callee_saved);
                        m.regs[10] = frame.frame_pointer;
                        code = frame.code;
                        next = frame.return_to;
                    }
                },
            }
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

struct Machine {
    regs: [u64; 11],
    /// The run's context: its regions, grants, maps, user pointer and tail-call count.
    ctx: HelperContext,
    /// Instructions executed so far.
    executed: u64,
}

impl Machine {
    fn address(&self, base: Reg, off: i16) -> u64 {
        self.regs[base.index()].wrapping_add(off as i64 as u64)
    }

    /// Checks that `[addr, addr + size)` is inside a region that allows `access`.
    fn check(&self, pc: usize, addr: u64, size: Size, access: Access) -> Result<(), ExecError> {
        let size = size.bytes() as u64;
        if self.ctx.permits(addr, size, access) {
            Ok(())
        } else {
            Err(ExecError::OutOfBounds {
                pc,
                addr,
                size,
                access,
            })
        }
    }

    fn check_atomic(
        &self,
        pc: usize,
        addr: u64,
        size: Size,
        access: Access,
    ) -> Result<(), ExecError> {
        self.check(pc, addr, size, access)?;
        let bytes = size.bytes() as u64;
        if !addr.is_multiple_of(bytes) {
            return Err(ExecError::MisalignedAtomic {
                pc,
                addr,
                size: bytes,
            });
        }
        Ok(())
    }

    fn load(&self, pc: usize, addr: u64, size: Size) -> Result<u64, ExecError> {
        self.check(pc, addr, size, Access::Load)?;
        let p = addr as *const u8;
        // SAFETY: `check` proved [addr, addr + size) lies inside a live region: the caller's input
        // slice, the part of the run's stack it has zeroed (hence initialised), or a region the
        // embedder vouched for. Unaligned reads are used because eBPF allows unaligned access.
        let v = unsafe {
            match size {
                Size::B => p.read() as u64,
                Size::H => (p as *const u16).read_unaligned() as u64,
                Size::W => (p as *const u32).read_unaligned() as u64,
                Size::DW => (p as *const u64).read_unaligned(),
            }
        };
        Ok(v)
    }

    fn store(&self, pc: usize, addr: u64, size: Size, v: u64) -> Result<(), ExecError> {
        self.check(pc, addr, size, Access::Store)?;
        let p = addr as *mut u8;
        // SAFETY: as in `load`, and `check` also proved the region writable.
        unsafe {
            match size {
                Size::B => p.write(v as u8),
                Size::H => (p as *mut u16).write_unaligned(v as u16),
                Size::W => (p as *mut u32).write_unaligned(v as u32),
                Size::DW => (p as *mut u64).write_unaligned(v),
            }
        }
        Ok(())
    }

    fn atomic(
        &mut self,
        pc: usize,
        addr: u64,
        size: Size,
        op: AtomicOp,
        src: Reg,
    ) -> Result<(), ExecError> {
        self.check_atomic(pc, addr, size, Access::Atomic)?;
        let s = self.regs[src.index()];
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
    fn write_back(&mut self, op: AtomicOp, src: Reg, old: u64) {
        match op {
            AtomicOp::CmpXchg => self.regs[0] = old,
            AtomicOp::FetchAdd
            | AtomicOp::FetchOr
            | AtomicOp::FetchAnd
            | AtomicOp::FetchXor
            | AtomicOp::Xchg => self.regs[src.index()] = old,
            AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => {}
        }
    }

    fn load_acquire(&self, pc: usize, addr: u64, size: Size) -> Result<u64, ExecError> {
        self.check_atomic(pc, addr, size, Access::Load)?;
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

    fn store_release(&self, pc: usize, addr: u64, size: Size, v: u64) -> Result<(), ExecError> {
        self.check_atomic(pc, addr, size, Access::Store)?;
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
    fn call_helper(&mut self, helper: Option<Helper>, pc: usize, id: u64) -> Result<(), ExecError> {
        let r = self.regs;
        self.regs[0] = match helper {
            Some(Helper::Plain(f)) => f(r[1], r[2], r[3], r[4], r[5]),
            Some(Helper::Context(f)) => {
                self.ctx.set_call(pc, id as u32);
                // SAFETY: the run's own context, referenced by nothing else during the call.
                let r0 = unsafe { f(r[1], r[2], r[3], r[4], r[5], &mut self.ctx) };
                if let Some(e) = self.ctx.take_error() {
                    return Err(e);
                }
                r0
            }
            Some(Helper::TailCall) | None => return Err(ExecError::UnknownHelper { pc, id }),
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
