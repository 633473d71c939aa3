//! The reference interpreter: the oracle the JITs are checked against.
//!
//! It follows RFC 9669 to the letter (division by zero gives 0, modulo by zero leaves `dst`, signed
//! overflow wraps), checks every memory access against the regions of [`crate::exec`], and can stop
//! runaway programs with an instruction budget. Pointers are real host addresses, so helpers and
//! programs share memory as they do under the JIT.

use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::exec::{Access, ExecError, MAX_CALL_DEPTH, MemRegion, STACK_SIZE, TOTAL_STACK};
use crate::helpers::Helpers;
use crate::isa::{AluOp, AtomicOp, Endian, Insn, Program, Reg, Size, Source, Width};

/// A saved caller frame of a BPF-to-BPF call.
struct Frame {
    return_to: usize,
    callee_saved: [u64; 4],
    frame_pointer: u64,
}

/// Runs programs one instruction at a time.
pub struct Interpreter<'p> {
    program: &'p Program,
    /// For each instruction, the instruction index its jump or call lands on.
    targets: Vec<usize>,
    helpers: Helpers,
    budget: Option<u64>,
    extra_regions: Vec<MemRegion>,
}

impl<'p> Interpreter<'p> {
    /// An interpreter for `program` with no helpers, no budget and no extra regions.
    pub fn new(program: &'p Program) -> Interpreter<'p> {
        let targets = (0..program.insns().len())
            .map(|i| program.target_of(i).unwrap_or(usize::MAX))
            .collect();
        Interpreter {
            program,
            targets,
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

    /// Lets the program access `region` too (e.g. a map value).
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
        // u64 elements keep the stack 8-byte aligned, as atomics on it need.
        let mut stack: Box<[u64; TOTAL_STACK / 8]> = vec![0; TOTAL_STACK / 8]
            .try_into()
            .expect("exactly TOTAL_STACK bytes");
        self.run_on(mem, &mut stack)
    }

    /// As [`Interpreter::run`], with `stack` as the run's stack (zeroed first): for callers that
    /// need to know where it lies, e.g. to recognise a result that points into it.
    pub fn run_with_stack(
        &self,
        mem: &mut [u8],
        stack: &mut [u64; TOTAL_STACK / 8],
    ) -> Result<u64, ExecError> {
        stack.fill(0);
        self.run_on(mem, stack).map(|(r0, _)| r0)
    }

    /// Runs on a zeroed `stack`, counting instructions.
    fn run_on(
        &self,
        mem: &mut [u8],
        stack: &mut [u64; TOTAL_STACK / 8],
    ) -> Result<(u64, u64), ExecError> {
        let mem_addr = if mem.is_empty() {
            0
        } else {
            mem.as_mut_ptr() as u64
        };
        let mut regions = Vec::with_capacity(2 + self.extra_regions.len());
        if !mem.is_empty() {
            regions.push(MemRegion::of_slice(mem));
        }
        let stack_base = stack.as_mut_ptr() as u64;
        regions.push(MemRegion::new(stack_base, TOTAL_STACK as u64, true));
        regions.extend_from_slice(&self.extra_regions);
        let mut m = Machine {
            regs: [0; 11],
            regions,
            executed: 0,
        };
        m.regs[1] = mem_addr;
        m.regs[2] = mem.len() as u64;
        m.regs[10] = stack_base + TOTAL_STACK as u64;
        let r0 = self.execute(&mut m)?;
        Ok((r0, m.executed))
    }

    fn execute(&self, m: &mut Machine) -> Result<u64, ExecError> {
        let insns = self.program.insns();
        let mut frames: Vec<Frame> = Vec::new();
        let mut i = 0usize;
        let budget = self.budget.unwrap_or(u64::MAX);
        loop {
            if m.executed >= budget {
                let pc = self.program.slot_of(i);
                return Err(ExecError::BudgetExhausted { pc, budget });
            }
            m.executed += 1;
            let pc = self.program.slot_of(i);
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
                Insn::Ja { .. } | Insn::Ja32 { .. } => next = self.targets[i],
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
                        next = self.targets[i];
                    }
                }
                Insn::Call { id } => m.call_helper(&self.helpers, pc, id as u64)?,
                Insn::CallX { reg } => {
                    let id = m.regs[reg.index()];
                    m.call_helper(&self.helpers, pc, id)?;
                }
                Insn::CallLocal { .. } => {
                    if frames.len() + 1 >= MAX_CALL_DEPTH {
                        return Err(ExecError::CallDepthExceeded { pc });
                    }
                    frames.push(Frame {
                        return_to: i + 1,
                        callee_saved: [m.regs[6], m.regs[7], m.regs[8], m.regs[9]],
                        frame_pointer: m.regs[10],
                    });
                    m.regs[10] -= STACK_SIZE as u64;
                    next = self.targets[i];
                }
                Insn::Exit => match frames.pop() {
                    None => return Ok(m.regs[0]),
                    Some(frame) => {
                        m.regs[6..10].copy_from_slice(&frame.callee_saved);
                        m.regs[10] = frame.frame_pointer;
                        next = frame.return_to;
                    }
                },
            }
            i = next;
        }
    }
}

/// Runs `program` once on `mem` with the given helpers and no budget.
pub fn run(program: &Program, mem: &mut [u8], helpers: &Helpers) -> Result<u64, ExecError> {
    Interpreter::new(program)
        .with_helpers(helpers.clone())
        .run(mem)
}

struct Machine {
    regs: [u64; 11],
    regions: Vec<MemRegion>,
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
        let ok = self
            .regions
            .iter()
            .any(|r| r.contains(addr, size) && (access == Access::Load || r.writable));
        if ok {
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
        // slice, the stack vector owned by `run`, or a region the embedder vouched for. Unaligned
        // reads are used because eBPF allows unaligned access.
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

    fn call_helper(&mut self, helpers: &Helpers, pc: usize, id: u64) -> Result<(), ExecError> {
        let f = helpers.get(id).ok_or(ExecError::UnknownHelper { pc, id })?;
        let r = &self.regs;
        self.regs[0] = f(r[1], r[2], r[3], r[4], r[5]);
        Ok(())
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
