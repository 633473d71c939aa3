//! x86-64 code generation for eBPF programs.
//!
//! # Image layout
//!
//! ```text
//!  entry+0  0f 1f 44 00 00    nop5            <- PATCH_SITE_OFFSET, PATCH_SITE_LEN bytes: a
//!                                                text_poke turns it into `call/jmp rel32`
//!  entry+5  55                push rbp        <- BODY_OFFSET: where a trampoline calls the body
//!           48 89 e5          mov rbp, rsp
//!           push rbx, r12, r13, r14, r15      (callee-saved registers the code uses)
//!           mov r12, r9                       ctx
//!           mov r9, [r12+stack_base]; add r9, TOTAL_STACK     eBPF r10
//!           xor eax/ebx/r13d/r14d/r15d        r0, r6-r9 start at 0, as in the interpreter
//!           call body                         the main program is a "subprogram" too, so
//!  epilogue: lea rsp, [rbp-40]                `exit` is always `ret`
//!           pop r15 .. rbx; pop rbp; ret
//!  fault:   xor eax, eax; jmp epilogue        error unwinding: rbp is the entry frame's
//!  thunk:   saves registers, calls runtime_call(ctx, r11, r10), restores them; on 0 -> fault
//!  tail:    [whole stack if r1 points into it or r10 is not the top]   tail entry: r1 and
//!           xor eax/esi/edx/ecx/r8d/ebx/r13d/r14d/r15d                 r10 are kept
//!  body:    [lea r11, [r9-reach]; cmp r11, [r12+stack_low]; jae ok; runtime STACK]
//!           one block per eBPF instruction
//! ```
//!
//! The entry is [`IMAGE_ALIGN`]-aligned, so the nop never crosses an 8-byte boundary and a
//! poker can replace it with one atomic 8-byte store. All internal branches are relative and
//! helper addresses are `movabs` immediates, so the bytes can live at any address.
//!
//! # Registers
//!
//! | eBPF | r0  | r1  | r2  | r3  | r4  | r5 | r6  | r7  | r8  | r9  | r10 |
//! |------|-----|-----|-----|-----|-----|----|-----|-----|-----|-----|-----|
//! | x86  | rax | rdi | rsi | rdx | rcx | r8 | rbx | r13 | r14 | r15 | r9  |
//!
//! r1–r5 are the System V argument registers, so a helper call needs no shuffling; r6–r9 are
//! callee-saved, so helpers preserve them. r12 holds the [`super::RunContext`]; r10 and r11 are
//! scratch (r11 holds the address of a checked access). Helper calls save and restore r1–r5 and
//! r10 around the call because the interpreter leaves them unchanged. Between instructions rsp is
//! 16-byte aligned, so helpers and the runtime can be called directly.
//!
//! # Helper calls
//!
//! ```text
//!  [mov dword [r12+call_pc], pc; mov dword [r12+call_id], id]   context helpers only
//!  push rdi, rsi, rdx, rcx, r8, r9; mov r9, r12                 the context: 6th argument
//!  movabs rax, helper; call rax                                 (callx: call r10)
//!  pop r9, r8, rcx, rdx, rsi, rdi
//!  [cmp qword [r12+failed], 0; jne fault]                       context helpers and callx
//! ```
//! `callx` first stores the image's own `Helpers` address in the context (a tail call may have
//! brought another image's code into this run), then asks the runtime for the helper, which also
//! records the call's pc and id.
//!
//! # Tail calls
//!
//! `mov [r12+arg2], edx` (the index), `mov r11, rsi` (the map), then the runtime request
//! `TAIL_CALL`, which returns the target's tail entry or 1 to fall through (every register
//! unchanged: the thunk preserves them) or fails; then `cmp r10, 1; je next; jmp r10`. rsp is at
//! the current function's return address at every instruction boundary, so the target's `ret`
//! returns to this function's caller.
//!
//! A *direct* tail call ([`DirectSpec`], the kernel's `emit_bpf_tail_call_direct`) comes first
//! when the front end knows the map and index:
//! ```text
//!  movabs r10, map; cmp rsi, r10; jne ordinary; cmp edx, index; jne ordinary
//!  cmp dword [r12+tail_calls], 33; jae next; add dword [r12+tail_calls], 1
//!  site: nop5 | jmp target's tail entry       kept up to date by the program array
//!  jmp next
//!  ordinary: (the sequence above)
//!  next:
//! ```
//! The site is a recorded patch site; the program array pokes it (`text_poke`) whenever the slot
//! changes: to the new target's tail entry if it serves this program, else back to the nop.
//!
//! # BPF-to-BPF calls
//!
//! `call local` checks the depth (r10 must stay above `fp_limit`), pushes r6–r9 and r10,
//! subtracts [`STACK_SIZE`] from r10, extends the stack window to the callee's reach (as at
//! `body`, only when the reach is not zero) and does a native `call`; `exit` is `ret`, and the
//! caller pops the saved registers, exactly the interpreter's frame save/restore.
//!
//! # Checked mode
//!
//! Each access computes its address into r11 and compares it inline with the stack window and
//! the input memory (two subtract-and-compare pairs against the context; fully skipped for
//! r10-relative accesses inside the current frame, which the window always covers). Anything
//! else takes the
//! out-of-line slow path: the thunk calls `super::runtime_call`, which scans the extra regions
//! and either lets the access go on or records the interpreter's `OutOfBounds` error, after
//! which the code unwinds to the entry frame (`lea rsp, [rbp-40]`) and returns. Atomics and
//! acquire/release accesses then test alignment. Unknown helpers and excessive call depth fail
//! through the same path. Stores and atomics compare with the context's `store_bound`, which is
//! zero for a read-only input, so they reach the slow path, which refuses them.
//!
//! # Budget
//!
//! With [`CodegenOptions::budget`], each back edge and BPF-to-BPF call first does
//! `sub qword [r12 + budget_left], 1; jae ok` and otherwise reports the exhausted budget through
//! the runtime (which always fails). It comes before the jump's compare, so flags are intact.

pub mod asm;

use asm::{AluOp as X, Asm, Cond, Gpr, Label, Mem, OpSize, ShiftOp};

use super::{
    CTX_ARG2, CTX_BUDGET_LEFT, CTX_CALL_PC, CTX_FAILED, CTX_FP_LIMIT, CTX_HELPERS, CTX_STACK_BASE,
    CTX_STACK_LOW, CTX_TAIL_CALLS, JitError, rt,
};
use crate::exec::MAX_TAIL_CALL_CNT;
use crate::exec::{Access, STACK_SIZE, TOTAL_STACK};
use crate::helpers::{Helper, Helpers};
use crate::interp::{alu32, alu64};
use crate::isa::{
    AluOp, AtomicOp, Endian, Insn, JmpCond, Program, Reg, Size, Source, StackReach, Width,
};

/// Offset of the patch site from the entry.
pub const PATCH_SITE_OFFSET: usize = 0;
/// Length of the patch site: a 5-byte nop, later a `call`/`jmp rel32`.
pub const PATCH_SITE_LEN: usize = 5;
/// Offset of the instruction after the patch site.
pub const BODY_OFFSET: usize = PATCH_SITE_OFFSET + PATCH_SITE_LEN;
/// The patch site's original bytes.
pub const PATCH_SITE_NOP: [u8; PATCH_SITE_LEN] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Alignment of an image's entry: at least 8, so the patch site is inside one aligned word, and a
/// cache line, so loop heads (`LOOP_ALIGN`) sit alike in every image.
pub const IMAGE_ALIGN: usize = 64;
// The patch site lies within one aligned 8-byte word, so one atomic store can rewrite it.
const _: () = assert!(PATCH_SITE_OFFSET % 8 + PATCH_SITE_LEN <= 8 && IMAGE_ALIGN.is_multiple_of(8));

/// eBPF register → x86-64 register.
pub const REG_MAP: [Gpr; 11] = [
    Gpr::Rax,
    Gpr::Rdi,
    Gpr::Rsi,
    Gpr::Rdx,
    Gpr::Rcx,
    Gpr::R8,
    Gpr::Rbx,
    Gpr::R13,
    Gpr::R14,
    Gpr::R15,
    Gpr::R9,
];
/// Holds the run context.
const CTX: Gpr = Gpr::R12;
/// Scratch; the request word passed to the thunk.
const TMP: Gpr = Gpr::R10;
/// Scratch; the address of a checked access, the argument passed to the thunk.
const ADDR: Gpr = Gpr::R11;
/// eBPF r10.
const FP: Gpr = Gpr::R9;
/// Callee-saved registers pushed after rbp, in push order.
const SAVED: [Gpr; 5] = [Gpr::Rbx, Gpr::R12, Gpr::R13, Gpr::R14, Gpr::R15];
/// rsp relative to rbp once `SAVED` is pushed.
const SAVED_BYTES: i32 = 8 * SAVED.len() as i32;
/// Caller-saved registers that hold eBPF state (r0–r5, r10) and the access address: what the
/// runtime thunk preserves. Eight pushes keep rsp 16-byte aligned with the thunk's own call.
const THUNK_SAVED: [Gpr; 8] = [
    Gpr::Rax,
    Gpr::Rdi,
    Gpr::Rsi,
    Gpr::Rdx,
    Gpr::Rcx,
    Gpr::R8,
    Gpr::R9,
    Gpr::R11,
];
/// What a helper call preserves beyond the System V callee-saved set: r1–r5 and r10.
const HELPER_SAVED: [Gpr; 6] = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9];
/// eBPF r6–r9 and r10, saved across a BPF-to-BPF call (five pushes + the return address keep rsp
/// 16-byte aligned in the callee).
const CALL_SAVED: [Gpr; 5] = [Gpr::Rbx, Gpr::R13, Gpr::R14, Gpr::R15, Gpr::R9];

/// What [`generate`] needs besides the program.
#[derive(Clone, Copy, Debug)]
pub struct CodegenOptions {
    /// Emit bounds and alignment checks.
    pub checked: bool,
    /// Count back edges and BPF-to-BPF calls against the run's budget.
    pub budget: bool,
    /// Address of `super::runtime_call` (a parameter so tests can generate code anywhere).
    pub runtime_fn: u64,
    /// Address of the `Helpers` that `callx` resolves against (kept alive with the image).
    pub helpers: u64,
}

/// Generated code and the offsets a loader needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X86Code {
    /// The image; the entry is offset 0.
    pub code: Vec<u8>,
    /// Byte offset of the tail entry, where a tail call into the program continues.
    pub tail_entry: usize,
    /// Byte offset of each direct tail call's 5-byte patch site, in the order of the
    /// [`DirectSpec`]s given.
    pub direct_sites: Vec<usize>,
}

/// A tail call to compile as a direct one (see [`crate::exec::DirectTailCall`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectSpec {
    /// Index of the `call 12` instruction.
    pub insn: usize,
    /// The program array's address, compared with r2.
    pub map: u64,
    /// The index, compared with r3 (32 bits).
    pub index: u32,
}

fn map(r: Reg) -> Gpr {
    REG_MAP[r.index()]
}

fn op_size(size: Size) -> OpSize {
    match size {
        Size::B => OpSize::B,
        Size::H => OpSize::W,
        Size::W => OpSize::D,
        Size::DW => OpSize::Q,
    }
}

/// Generates the image for `program` (see the module documentation for its layout).
pub fn generate(
    program: &Program,
    helpers: &Helpers,
    opts: &CodegenOptions,
) -> Result<X86Code, JitError> {
    generate_with(program, helpers, opts, &[])
}

/// [`generate`], with the tail calls of `direct` compiled as direct tail calls (each must be a
/// static call of the tail call helper).
pub fn generate_with(
    program: &Program,
    helpers: &Helpers,
    opts: &CodegenOptions,
    direct: &[DirectSpec],
) -> Result<X86Code, JitError> {
    super::check_size(program)?;
    let mut a = Asm::new();
    let insn_labels = (0..program.insns().len()).map(|_| a.new_label()).collect();
    let mut g = Gen {
        rt_thunk: a.new_label(),
        fault: a.new_label(),
        a,
        program,
        helpers,
        opts: *opts,
        insn_labels,
        direct,
        direct_sites: vec![usize::MAX; direct.len()],
    };
    let tail_entry = g.prologue();
    let loop_heads = loop_heads(program);
    for (i, insn) in program.insns().iter().enumerate() {
        let label = g.insn_labels[i];
        if loop_heads[i] {
            g.a.align_with_nops(LOOP_ALIGN);
        }
        g.a.bind(label);
        g.insn(i, *insn)?;
    }
    if let Some(i) = g.direct_sites.iter().position(|&o| o == usize::MAX) {
        return Err(JitError::InvalidInstruction {
            pc: program.slot_of(direct[i].insn.min(program.insns().len() - 1)),
            reason: "a direct tail call names an instruction that is not a tail call",
        });
    }
    Ok(X86Code {
        direct_sites: g.direct_sites,
        code: g.a.finish()?,
        tail_entry,
    })
}

/// Alignment of a loop's first instruction. Its offset is also its address's (`IMAGE_ALIGN` is a
/// multiple), so a loop sits the same way in its cache line wherever the image lands (see
/// ARCHITECTURE, jit: placement moved loops by up to 1.6x).
const LOOP_ALIGN: usize = 32;

/// Which instructions a backward jump lands on (the heads of loops): its target, or the
/// instruction after the target when the jump is rotated ([`super::rotated_test`]).
fn loop_heads(program: &Program) -> Vec<bool> {
    let mut heads = vec![false; program.insns().len()];
    for j in 0..program.insns().len() {
        if let Some(t) = program.target_of(j).filter(|&t| t <= j) {
            heads[super::rotated_test(program, j).map_or(t, |test| test.index + 1)] = true;
        }
    }
    heads
}

/// Jumps to `ok` when the address in ADDR lies in the region whose (start, bound) context
/// fields are `region` (`addr - start < bound`, unsigned; TMP is clobbered).
fn region_test(a: &mut Asm, (start, bound): (i32, i32), ok: Label) {
    a.mov_rr(true, TMP, ADDR);
    a.alu_rm(X::Sub, true, TMP, Mem::new(CTX, start));
    a.alu_rm(X::Cmp, true, TMP, Mem::new(CTX, bound));
    a.jcc_short(Cond::B, ok);
}

struct Gen<'a> {
    a: Asm,
    program: &'a Program,
    helpers: &'a Helpers,
    opts: CodegenOptions,
    /// One label per instruction index.
    insn_labels: Vec<Label>,
    rt_thunk: Label,
    fault: Label,
    direct: &'a [DirectSpec],
    /// The patch site offset of each of `direct`, once emitted.
    direct_sites: Vec<usize>,
}

impl Gen<'_> {
    /// Emits everything before the first instruction; returns the tail entry's offset.
    fn prologue(&mut self) -> usize {
        let a = &mut self.a;
        let body = a.new_label();
        let epilogue = a.new_label();
        a.nop5();
        a.push(Gpr::Rbp);
        a.mov_rr(true, Gpr::Rbp, Gpr::Rsp);
        for r in SAVED {
            a.push(r);
        }
        a.mov_rr(true, CTX, Gpr::R9);
        a.load(OpSize::Q, FP, Mem::new(CTX, CTX_STACK_BASE));
        a.alu_ri(X::Add, true, FP, TOTAL_STACK as i32);
        for r in [Gpr::Rax, Gpr::Rbx, Gpr::R13, Gpr::R14, Gpr::R15] {
            a.alu_rr(X::Xor, false, r, r);
        }
        a.call(body);

        a.bind(epilogue);
        a.lea(Gpr::Rsp, Mem::new(Gpr::Rbp, -SAVED_BYTES));
        for r in SAVED.iter().rev() {
            a.pop(*r);
        }
        a.pop(Gpr::Rbp);
        a.ret();

        a.bind(self.fault);
        a.alu_rr(X::Xor, false, Gpr::Rax, Gpr::Rax);
        a.jmp_short(epilogue);

        // Called with rsp ≡ 8 (mod 16); eight pushes and 8 more bytes realign it.
        a.bind(self.rt_thunk);
        for r in THUNK_SAVED {
            a.push(r);
        }
        a.alu_ri(X::Sub, true, Gpr::Rsp, 8);
        a.mov_rr(true, Gpr::Rdi, CTX);
        a.mov_rr(true, Gpr::Rsi, ADDR);
        a.mov_rr(true, Gpr::Rdx, TMP);
        a.movabs(Gpr::Rax, self.opts.runtime_fn);
        a.call_r(Gpr::Rax);
        a.test_rr(true, Gpr::Rax, Gpr::Rax);
        a.jcc(Cond::E, self.fault);
        a.mov_rr(true, TMP, Gpr::Rax);
        a.alu_ri(X::Add, true, Gpr::Rsp, 8);
        for r in THUNK_SAVED.iter().rev() {
            a.pop(*r);
        }
        a.ret();

        // Tail entry: a tail call jumps here with r1 = its ctx argument and the caller's frame
        // (rsp at the current function's return address, r10, r12); the rest start at zero.
        // The whole stack when r1 points into it or the frame is not the entry frame
        // (`HelperContext::enter_tail_call`).
        let tail_entry = a.len();
        let whole = a.new_label();
        let reserved = a.new_label();
        a.mov_rr(true, ADDR, Gpr::Rdi);
        a.alu_rm(X::Sub, true, ADDR, Mem::new(CTX, CTX_STACK_BASE));
        a.alu_ri(X::Cmp, true, ADDR, TOTAL_STACK as i32);
        a.jcc_short(Cond::B, whole);
        a.load(OpSize::Q, ADDR, Mem::new(CTX, CTX_STACK_BASE));
        a.alu_ri(X::Add, true, ADDR, TOTAL_STACK as i32);
        a.alu_rr(X::Cmp, true, ADDR, FP);
        a.jcc_short(Cond::E, reserved);
        a.bind(whole);
        self.reserve(StackReach::Unbounded);
        let a = &mut self.a;
        a.bind(reserved);
        for r in [
            Gpr::Rax,
            Gpr::Rsi,
            Gpr::Rdx,
            Gpr::Rcx,
            Gpr::R8,
            Gpr::Rbx,
            Gpr::R13,
            Gpr::R14,
            Gpr::R15,
        ] {
            a.alu_rr(X::Xor, false, r, r);
        }

        a.bind(body);
        self.reserve(self.program.stack_reach(0));
        tail_entry
    }

    /// Extends the run's stack window to what a function entered with the current r10 reaches
    /// (`HelperContext::reserve_stack`): inline compare, runtime call the first time only.
    fn reserve(&mut self, reach: StackReach) {
        let a = &mut self.a;
        match reach {
            StackReach::Bytes(0) => return,
            StackReach::Bytes(n) => {
                let n = (n as usize).min(TOTAL_STACK) as i32;
                a.lea(ADDR, Mem::new(FP, -n));
            }
            StackReach::Unbounded => a.load(OpSize::Q, ADDR, Mem::new(CTX, CTX_STACK_BASE)),
        }
        let ok = a.new_label();
        a.alu_rm(X::Cmp, true, ADDR, Mem::new(CTX, CTX_STACK_LOW));
        a.jcc_short(Cond::Ae, ok);
        self.runtime(rt::info(rt::STACK, 0, 1, Access::Load));
        self.a.bind(ok);
    }

    /// Calls the runtime with request `info` (and the argument in r11); returns only if it
    /// says to continue, with its result in r10.
    fn runtime(&mut self, info: u32) {
        self.a.mov_r32_imm(TMP, info);
        self.a.call(self.rt_thunk);
    }

    fn target(&self, i: usize) -> Result<Label, JitError> {
        self.program
            .target_of(i)
            .and_then(|t| self.insn_labels.get(t).copied())
            .ok_or(JitError::InvalidInstruction {
                pc: self.program.slot_of(i),
                reason: "jump target is not an instruction",
            })
    }

    fn insn(&mut self, i: usize, insn: Insn) -> Result<(), JitError> {
        let pc = self.program.slot_of(i);
        match insn {
            Insn::Alu {
                width,
                op,
                dst,
                src,
            } => self.alu(width == Width::W64, op, map(dst), src),
            Insn::Neg { width, dst } => self.a.neg(width == Width::W64, map(dst)),
            Insn::Endian { kind, bits, dst } => self.endian(kind, bits, map(dst)),
            Insn::LoadImm64 { dst, imm } => self.a.mov_imm(map(dst), imm),
            Insn::Load {
                size,
                signed,
                dst,
                base,
                off,
            } => {
                let m = self.access(pc, base, off, size, Access::Load, false);
                if signed {
                    self.a.load_sx(op_size(size), map(dst), m);
                } else {
                    self.a.load(op_size(size), map(dst), m);
                }
            }
            Insn::Store {
                size,
                base,
                off,
                src,
            } => {
                let m = self.access(pc, base, off, size, Access::Store, false);
                match src {
                    Source::Reg(r) => self.a.store(op_size(size), m, map(r)),
                    Source::Imm(v) => self.a.store_imm(op_size(size), m, v),
                }
            }
            Insn::Atomic {
                size,
                op,
                base,
                off,
                src,
            } => {
                let m = self.access(pc, base, off, size, Access::Atomic, true);
                self.atomic(size == Size::DW, op, m, map(src));
            }
            // x86-64 is TSO: plain loads have acquire and plain stores release semantics.
            Insn::LoadAcquire {
                size,
                dst,
                base,
                off,
            } => {
                let m = self.access(pc, base, off, size, Access::Load, true);
                self.a.load(op_size(size), map(dst), m);
            }
            Insn::StoreRelease {
                size,
                base,
                off,
                src,
            } => {
                let m = self.access(pc, base, off, size, Access::Store, true);
                self.a.store(op_size(size), m, map(src));
            }
            Insn::Ja { .. } | Insn::Ja32 { .. } => {
                let t = self.target(i)?;
                self.count_back_edge(i, pc);
                match super::rotated_test(self.program, i) {
                    // Jumping back to a loop's test: run that test here instead, inverted, to the
                    // loop's body (one taken branch per iteration instead of two), and leave
                    // the loop where the test would have. No register changes in between, so
                    // the outcome is the test's.
                    Some(test) => {
                        let exit = self.target(test.index)?;
                        let body = self.insn_labels[test.index + 1];
                        self.jump(test.w64, test.cond, map(test.dst), test.src, body, true);
                        if self.program.target_of(test.index) != Some(i + 1) {
                            self.a.jmp(exit);
                        }
                    }
                    None => self.a.jmp(t),
                }
            }
            Insn::Jump {
                width,
                cond,
                dst,
                src,
                ..
            } => {
                let t = self.target(i)?;
                self.count_back_edge(i, pc);
                self.jump(width == Width::W64, cond, map(dst), src, t, false);
            }
            Insn::Call { id } => match self.helpers.lookup(id as u64) {
                Some(Helper::Plain(f)) => self.call_helper(Some(f as usize as u64), false),
                Some(Helper::Context(f)) => {
                    self.a
                        .store_imm(OpSize::D, Mem::new(CTX, CTX_CALL_PC), pc as i32);
                    self.a
                        .store_imm(OpSize::D, Mem::new(CTX, CTX_CALL_PC + 4), id as i32);
                    self.call_helper(Some(f as usize as u64), true);
                }
                Some(Helper::TailCall) => self.tail_call(i, pc),
                None => {
                    // Fails at run time, as in the interpreter (the code may never get here).
                    self.a.mov_r32_imm(ADDR, id);
                    self.runtime(rt::info(rt::HELPER, pc, 1, Access::Load));
                }
            },
            Insn::CallX { reg } => {
                // A tail call may have brought another program's code here: the lookup uses
                // this image's helpers.
                self.a.movabs(TMP, self.opts.helpers);
                self.a.store(OpSize::Q, Mem::new(CTX, CTX_HELPERS), TMP);
                self.a.mov_rr(true, ADDR, map(reg));
                self.runtime(rt::info(rt::HELPER, pc, 1, Access::Load));
                // The id is dynamic, so it may be a context helper.
                self.call_helper(None, true);
            }
            Insn::CallLocal { .. } => {
                let t = self.target(i)?;
                let reach = self.program.callee_reach(i);
                self.count(pc);
                self.call_local(pc, t, reach);
            }
            Insn::Exit => self.a.ret(),
        }
        Ok(())
    }

    /// Counts instruction `i` (slot `pc`) against the budget if it jumps backwards.
    fn count_back_edge(&mut self, i: usize, pc: usize) {
        if self.program.target_of(i).is_some_and(|t| t <= i) {
            self.count(pc);
        }
    }

    /// Takes one from the run's budget, failing at `pc` when none is left; nothing without a
    /// budget.
    fn count(&mut self, pc: usize) {
        if !self.opts.budget {
            return;
        }
        let ok = self.a.new_label();
        self.a
            .alu_mi(X::Sub, true, Mem::new(CTX, CTX_BUDGET_LEFT), 1);
        self.a.jcc_short(Cond::Ae, ok);
        self.runtime(rt::info(rt::BUDGET, pc, 1, Access::Load));
        self.a.bind(ok);
    }

    fn alu(&mut self, w64: bool, op: AluOp, d: Gpr, src: Source) {
        let a = &mut self.a;
        // The source value as the interpreter sees it: immediates sign-extended for 64 bits,
        // taken as u32 for 32 bits.
        let imm = |v: i32| {
            if w64 {
                v as i64 as u64
            } else {
                v as u32 as u64
            }
        };
        match (op, src) {
            (AluOp::Add | AluOp::Sub | AluOp::Or | AluOp::And | AluOp::Xor, _) => {
                let x = match op {
                    AluOp::Add => X::Add,
                    AluOp::Sub => X::Sub,
                    AluOp::Or => X::Or,
                    AluOp::And => X::And,
                    _ => X::Xor,
                };
                match src {
                    Source::Reg(s) => a.alu_rr(x, w64, d, map(s)),
                    Source::Imm(v) => a.alu_ri(x, w64, d, v),
                }
            }
            (AluOp::Mul, Source::Reg(s)) => a.imul_rr(w64, d, map(s)),
            // Through a register, not `imul d, d, imm`: on this machine's Zen 5 the immediate
            // form made a multiply-bound loop (Collatz, benches/jit) 1.9x slower.
            (AluOp::Mul, Source::Imm(v)) => {
                a.mov_imm(TMP, v as i64 as u64);
                a.imul_rr(w64, d, TMP)
            }
            (AluOp::Div | AluOp::SDiv | AluOp::Mod | AluOp::SMod, _) => {
                self.divmod(w64, op, d, src)
            }
            (AluOp::Lsh | AluOp::Rsh | AluOp::Arsh, _) => {
                let sh = match op {
                    AluOp::Lsh => ShiftOp::Shl,
                    AluOp::Rsh => ShiftOp::Shr,
                    _ => ShiftOp::Sar,
                };
                match src {
                    Source::Reg(s) => self.shift_reg(w64, sh, d, map(s)),
                    Source::Imm(v) => {
                        // x86 masks counts the same way (5 or 6 bits), but do it here so a zero
                        // count emits no shift at all.
                        let count = (v as u32 & if w64 { 63 } else { 31 }) as u8;
                        if count != 0 {
                            let size = if w64 { OpSize::Q } else { OpSize::D };
                            a.shift_ri(sh, size, d, count);
                        } else if !w64 {
                            a.mov_rr(false, d, d);
                        }
                    }
                }
            }
            (AluOp::Mov, Source::Reg(s)) => {
                if w64 && d == map(s) {
                    return;
                }
                a.mov_rr(w64, d, map(s));
            }
            (AluOp::MovSx8, Source::Reg(s)) => a.movsx_rr(OpSize::B, w64, d, map(s)),
            (AluOp::MovSx16, Source::Reg(s)) => a.movsx_rr(OpSize::W, w64, d, map(s)),
            // For 32 bits the interpreter keeps the low half: a plain 32-bit move.
            (AluOp::MovSx32, Source::Reg(s)) => a.movsx_rr(OpSize::D, w64, d, map(s)),
            // Moves of constants (sign-extending ones only in hand-built programs): fold them.
            (AluOp::Mov | AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32, Source::Imm(v)) => {
                let s = imm(v);
                let value = if w64 {
                    alu64(op, 0, s)
                } else {
                    alu32(op, 0, s as u32) as u64
                };
                if value == 0 {
                    // No flags are live between eBPF instructions.
                    a.alu_rr(X::Xor, false, d, d);
                } else {
                    a.mov_imm(d, value);
                }
            }
        }
    }

    /// `d = d <<|>>|>>> s` with the count in cl, which is eBPF r4: save and restore rcx.
    fn shift_reg(&mut self, w64: bool, op: ShiftOp, d: Gpr, s: Gpr) {
        let a = &mut self.a;
        if s == Gpr::Rcx {
            a.shift_cl(op, w64, d);
        } else if d == Gpr::Rcx {
            a.mov_rr(true, ADDR, Gpr::Rcx);
            a.mov_rr(true, Gpr::Rcx, s);
            a.shift_cl(op, w64, ADDR);
            a.mov_rr(true, Gpr::Rcx, ADDR);
        } else {
            a.mov_rr(true, ADDR, Gpr::Rcx);
            a.mov_rr(true, Gpr::Rcx, s);
            a.shift_cl(op, w64, d);
            a.mov_rr(true, Gpr::Rcx, ADDR);
        }
    }

    /// Division and modulo with RFC 9669's edge cases: `x / 0 = 0`, `x % 0 = x`, and for signed
    /// operations `x / -1 = -x` (wrapping) and `x % -1 = 0`, which also avoids `idiv`'s fault on
    /// INT_MIN / -1.
    fn divmod(&mut self, w64: bool, op: AluOp, d: Gpr, src: Source) {
        let signed = matches!(op, AluOp::SDiv | AluOp::SMod);
        let is_div = matches!(op, AluOp::Div | AluOp::SDiv);
        let a = &mut self.a;
        if let Source::Imm(v) = src {
            // Constant divisor: the edge cases are known now.
            let minus_one = if w64 { v == -1 } else { v as u32 == u32::MAX };
            if v == 0 {
                if is_div {
                    a.alu_rr(X::Xor, false, d, d);
                } else if !w64 {
                    a.mov_rr(false, d, d);
                }
                return;
            }
            if signed && minus_one {
                if is_div {
                    a.neg(w64, d);
                } else {
                    a.alu_rr(X::Xor, false, d, d);
                }
                return;
            }
        }
        // rax and rdx are eBPF r0 and r3: keep them on the stack (no calls happen meanwhile).
        a.push(Gpr::Rax);
        a.push(Gpr::Rdx);
        match src {
            Source::Reg(s) => a.mov_rr(w64, ADDR, map(s)),
            Source::Imm(v) if w64 => a.mov_r64_simm(ADDR, v),
            Source::Imm(v) => a.mov_r32_imm(ADDR, v as u32),
        }
        a.mov_rr(w64, Gpr::Rax, d);
        let (by_zero, minus_one, done) = (a.new_label(), a.new_label(), a.new_label());
        let guarded = matches!(src, Source::Reg(_));
        if guarded {
            a.test_rr(w64, ADDR, ADDR);
            a.jcc_short(Cond::E, by_zero);
            if signed {
                a.alu_ri(X::Cmp, w64, ADDR, -1);
                a.jcc_short(Cond::E, minus_one);
            }
        }
        if signed {
            a.sign_extend_rax(w64);
            a.idiv(w64, ADDR);
        } else {
            a.alu_rr(X::Xor, false, Gpr::Rdx, Gpr::Rdx);
            a.div(w64, ADDR);
        }
        a.mov_rr(w64, TMP, if is_div { Gpr::Rax } else { Gpr::Rdx });
        if guarded {
            a.jmp_short(done);
            a.bind(by_zero);
            if is_div {
                a.alu_rr(X::Xor, false, TMP, TMP);
            } else {
                // The dividend, zero-extended from 32 bits for the 32-bit form.
                a.mov_rr(w64, TMP, Gpr::Rax);
            }
            if signed {
                a.jmp_short(done);
                a.bind(minus_one);
                if is_div {
                    a.mov_rr(w64, TMP, Gpr::Rax);
                    a.neg(w64, TMP);
                } else {
                    a.alu_rr(X::Xor, false, TMP, TMP);
                }
            }
        }
        a.bind(done);
        a.pop(Gpr::Rdx);
        a.pop(Gpr::Rax);
        a.mov_rr(w64, d, TMP);
    }

    fn endian(&mut self, kind: Endian, bits: u8, d: Gpr) {
        let a = &mut self.a;
        match (kind, bits) {
            (Endian::Le, 16) => a.movzx_rr(OpSize::W, d, d),
            (Endian::Le, 32) => a.mov_rr(false, d, d),
            (Endian::Le, _) => {}
            (Endian::Be | Endian::Swap, 16) => {
                a.shift_ri(ShiftOp::Rol, OpSize::W, d, 8);
                a.movzx_rr(OpSize::W, d, d);
            }
            (Endian::Be | Endian::Swap, 32) => a.bswap(false, d),
            (Endian::Be | Endian::Swap, _) => a.bswap(true, d),
        }
    }

    /// Emits the checks of a memory access and returns the operand to access.
    fn access(
        &mut self,
        pc: usize,
        base: Reg,
        off: i16,
        size: Size,
        access: Access,
        aligned: bool,
    ) -> Mem {
        let b = map(base);
        let off = off as i32;
        if !self.opts.checked {
            return Mem::new(b, off);
        }
        let n = size.bytes();
        // r10 is never written and always points at the top of a frame inside the stack, so
        // accesses within the current frame are always in bounds; the range analysis proves
        // more of them (`Program::in_frame`).
        let in_frame = (base == Reg::R10 && off >= -(STACK_SIZE as i32) && off + n as i32 <= 0)
            || self
                .program
                .insn_at(pc)
                .is_some_and(|i| self.program.in_frame(i));
        let alignment_checked = aligned && n > 1;
        if in_frame && !alignment_checked {
            return Mem::new(b, off);
        }
        if !in_frame && !alignment_checked {
            // The common case: the first region's test computes the address in TMP itself, and
            // the access uses `[base + off]`; ADDR, which the second test and the runtime
            // function read, is only computed once the first test failed.
            let [first, second] = super::region_order(self.program, pc, n, access);
            let a = &mut self.a;
            let ok = a.new_label();
            a.lea(TMP, Mem::new(b, off));
            a.alu_rm(X::Sub, true, TMP, Mem::new(CTX, first.0));
            a.alu_rm(X::Cmp, true, TMP, Mem::new(CTX, first.1));
            a.jcc_short(Cond::B, ok);
            a.lea(ADDR, Mem::new(b, off));
            region_test(a, second, ok);
            self.runtime(rt::info(rt::BOUNDS, pc, n, access));
            self.a.bind(ok);
            return Mem::new(b, off);
        }
        let a = &mut self.a;
        a.lea(ADDR, Mem::new(b, off));
        if !in_frame {
            let ok = a.new_label();
            for region in super::region_order(self.program, pc, n, access) {
                region_test(&mut self.a, region, ok);
            }
            self.runtime(rt::info(rt::BOUNDS, pc, n, access));
            self.a.bind(ok);
        }
        if alignment_checked {
            let a = &mut self.a;
            let ok = a.new_label();
            a.test_r8_imm(ADDR, (n - 1) as u8);
            a.jcc_short(Cond::E, ok);
            self.runtime(rt::info(rt::MISALIGNED, pc, n, access));
            self.a.bind(ok);
        }
        Mem::new(ADDR, 0)
    }

    fn atomic(&mut self, w64: bool, op: AtomicOp, m: Mem, s: Gpr) {
        let a = &mut self.a;
        let sz = if w64 { OpSize::Q } else { OpSize::D };
        let simple = match op {
            AtomicOp::Add => Some(X::Add),
            AtomicOp::Or => Some(X::Or),
            AtomicOp::And => Some(X::And),
            AtomicOp::Xor => Some(X::Xor),
            _ => None,
        };
        if let Some(x) = simple {
            a.lock();
            a.alu_mr(x, w64, m, s);
            return;
        }
        match op {
            AtomicOp::FetchAdd => {
                a.lock();
                a.xadd(w64, m, s);
            }
            AtomicOp::Xchg => a.xchg(w64, m, s),
            AtomicOp::CmpXchg => {
                a.lock();
                a.cmpxchg(w64, m, s);
                if !w64 {
                    // A successful 32-bit cmpxchg leaves rax's upper half; r0 gets the old value
                    // zero-extended.
                    a.mov_rr(false, Gpr::Rax, Gpr::Rax);
                }
            }
            _ => {
                // Fetching and/or/xor have no x86 instruction: a cmpxchg loop with rax (eBPF r0)
                // saved on the stack.
                let x = match op {
                    AtomicOp::FetchOr => X::Or,
                    AtomicOp::FetchAnd => X::And,
                    _ => X::Xor,
                };
                let m = if m.base == ADDR && m.disp == 0 {
                    m
                } else {
                    a.lea(ADDR, m);
                    Mem::new(ADDR, 0)
                };
                a.push(Gpr::Rax);
                a.load(sz, Gpr::Rax, m);
                let retry = a.new_label();
                a.bind(retry);
                a.mov_rr(w64, TMP, Gpr::Rax);
                if s == Gpr::Rax {
                    a.alu_rm(x, w64, TMP, Mem::new(Gpr::Rsp, 0));
                } else {
                    a.alu_rr(x, w64, TMP, s);
                }
                a.lock();
                a.cmpxchg(w64, m, TMP);
                a.jcc_short(Cond::Ne, retry);
                if s == Gpr::Rax {
                    // r0 is the source: it receives the old value, the saved copy is dropped.
                    if !w64 {
                        a.mov_rr(false, Gpr::Rax, Gpr::Rax);
                    }
                    a.alu_ri(X::Add, true, Gpr::Rsp, 8);
                } else {
                    a.mov_rr(w64, s, Gpr::Rax);
                    a.pop(Gpr::Rax);
                }
            }
        }
    }

    /// A conditional jump to `target`; with `negated`, to `target` when the condition fails.
    fn jump(
        &mut self,
        w64: bool,
        cond: JmpCond,
        d: Gpr,
        src: Source,
        target: Label,
        negated: bool,
    ) {
        let a = &mut self.a;
        match (cond, src) {
            (JmpCond::Set, Source::Reg(s)) => a.test_rr(w64, d, map(s)),
            (JmpCond::Set, Source::Imm(v)) => a.test_ri(w64, d, v),
            // `test d, d` sets ZF, SF, CF = OF = 0 exactly as `cmp d, 0` does, in fewer bytes.
            (_, Source::Imm(0)) => a.test_rr(w64, d, d),
            (_, Source::Reg(s)) => a.alu_rr(X::Cmp, w64, d, map(s)),
            (_, Source::Imm(v)) => a.alu_ri(X::Cmp, w64, d, v),
        }
        let cc = match cond {
            JmpCond::Eq => Cond::E,
            JmpCond::Ne | JmpCond::Set => Cond::Ne,
            JmpCond::Gt => Cond::A,
            JmpCond::Ge => Cond::Ae,
            JmpCond::Lt => Cond::B,
            JmpCond::Le => Cond::Be,
            JmpCond::Sgt => Cond::G,
            JmpCond::Sge => Cond::Ge,
            JmpCond::Slt => Cond::L,
            JmpCond::Sle => Cond::Le,
        };
        a.jcc(if negated { cc.invert() } else { cc }, target);
    }

    /// Calls a helper at a known address, or at the address in r10 (from a `callx` lookup).
    /// r1–r5 are already the argument registers and the context becomes the sixth (r9, saved
    /// with r1–r5); the result lands in rax = r0. With `may_fail`, a failure the helper recorded
    /// in the context unwinds the run.
    fn call_helper(&mut self, addr: Option<u64>, may_fail: bool) {
        let a = &mut self.a;
        for r in HELPER_SAVED {
            a.push(r);
        }
        a.mov_rr(true, Gpr::R9, CTX);
        match addr {
            Some(f) => {
                a.movabs(Gpr::Rax, f);
                a.call_r(Gpr::Rax);
            }
            None => a.call_r(TMP),
        }
        for r in HELPER_SAVED.iter().rev() {
            a.pop(*r);
        }
        if may_fail {
            a.alu_mi(X::Cmp, true, Mem::new(CTX, CTX_FAILED), 0);
            a.jcc(Cond::Ne, self.fault);
        }
    }

    /// `bpf_tail_call`: the runtime checks the map (r2), the index (r3) and the count and
    /// returns the target's tail entry (or 1 to fall through, every register unchanged). At
    /// an instruction boundary rsp is at the current function's return address, so a jump
    /// makes the target's `exit` return to this function's caller.
    fn tail_call(&mut self, i: usize, pc: usize) {
        let fall_through = self.a.new_label();
        if let Some(d) = self.direct.iter().position(|d| d.insn == i) {
            self.direct_tail_call(d, fall_through);
        }
        let a = &mut self.a;
        a.store(OpSize::D, Mem::new(CTX, CTX_ARG2), Gpr::Rdx);
        a.mov_rr(true, ADDR, Gpr::Rsi);
        self.runtime(rt::info(rt::TAIL_CALL, pc, 1, Access::Load));
        let a = &mut self.a;
        a.alu_ri(X::Cmp, true, TMP, 1);
        a.jcc_short(Cond::E, fall_through);
        a.jmp_r(TMP);
        a.bind(fall_through);
    }

    /// The kernel's direct tail call, for r2 and r3 equal to the hint's constants (else the
    /// ordinary path after it): count the call as the runtime would (the index is in range),
    /// then the patch site, which the program array keeps at `jmp` the slot's target or `nop`.
    fn direct_tail_call(&mut self, d: usize, fall_through: Label) {
        let spec = self.direct[d];
        let a = &mut self.a;
        let ordinary = a.new_label();
        a.movabs(TMP, spec.map);
        a.alu_rr(X::Cmp, true, Gpr::Rsi, TMP);
        a.jcc(Cond::Ne, ordinary);
        a.alu_ri(X::Cmp, false, Gpr::Rdx, spec.index as i32);
        a.jcc(Cond::Ne, ordinary);
        let counter = Mem::new(CTX, CTX_TAIL_CALLS);
        a.alu_mi(X::Cmp, false, counter, MAX_TAIL_CALL_CNT as i32);
        a.jcc(Cond::Ae, fall_through);
        a.alu_mi(X::Add, false, counter, 1);
        self.direct_sites[d] = a.len();
        a.nop5();
        a.jmp(fall_through);
        a.bind(ordinary);
    }

    fn call_local(&mut self, pc: usize, target: Label, reach: StackReach) {
        let ok = self.a.new_label();
        self.a.alu_rm(X::Cmp, true, FP, Mem::new(CTX, CTX_FP_LIMIT));
        self.a.jcc_short(Cond::A, ok);
        self.runtime(rt::info(rt::CALL_DEPTH, pc, 1, Access::Load));
        let a = &mut self.a;
        a.bind(ok);
        for r in CALL_SAVED {
            a.push(r);
        }
        a.alu_ri(X::Sub, true, FP, STACK_SIZE as i32);
        self.reserve(reach);
        let a = &mut self.a;
        a.call(target);
        for r in CALL_SAVED.iter().rev() {
            a.pop(*r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::Program;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn gen_code(insns: Vec<Insn>, checked: bool) -> Vec<u8> {
        gen_budgeted(insns, checked, false)
    }

    fn gen_budgeted(insns: Vec<Insn>, checked: bool, budget: bool) -> Vec<u8> {
        let p = Program::new(insns).unwrap();
        let opts = CodegenOptions {
            checked,
            budget,
            runtime_fn: 0x1122_3344_5566_7788,
            helpers: 0x99aa_bbcc_ddee_ff00,
        };
        generate(&p, &Helpers::conformance(), &opts).unwrap().code
    }

    fn listing(code: &[u8]) -> Vec<String> {
        let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        f.options_mut().set_space_after_operand_separator(true);
        let mut out = Vec::new();
        while d.can_decode() {
            let insn = d.decode();
            assert!(!insn.is_invalid(), "undecodable byte at {:#x}", insn.ip());
            let mut s = String::new();
            f.format(&insn, &mut s);
            out.push(s);
        }
        out
    }

    /// The listing of `src`'s body: what follows the tail entry's last register clear.
    fn body_listing(src: &str, checked: bool) -> Vec<String> {
        let insns = crate::asm::assemble_program(src).unwrap().insns().to_vec();
        let l = listing(&gen_code(insns, checked));
        let start = l.iter().rposition(|s| s == "xor r15d, r15d").unwrap() + 1;
        l[start..].to_vec()
    }

    #[test]
    fn loop_heads_start_aligned_and_padding_decodes_as_nops() {
        let program = crate::asm::assemble_program(
            "mov %r0, 0\nmov %r1, 9\nloop:\nadd %r0, %r1\nsub %r1, 1\njne %r1, 0, loop\nexit",
        )
        .unwrap();
        assert_eq!(
            loop_heads(&program),
            [false, false, true, false, false, false]
        );
        let code = gen_code(program.insns().to_vec(), true);
        let mut d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
        let (mut add_at, mut nops_before) = (None, 0);
        while d.can_decode() {
            let insn = d.decode();
            assert!(!insn.is_invalid(), "undecodable byte at {:#x}", insn.ip());
            if insn.mnemonic() == iced_x86::Mnemonic::Nop && insn.ip() > 0x10 {
                nops_before = insn.ip() + insn.len() as u64;
            }
            if insn.mnemonic() == iced_x86::Mnemonic::Add && add_at.is_none() && nops_before > 0 {
                add_at = Some(insn.ip());
            }
        }
        let head = add_at.expect("the loop body's add");
        assert_eq!(head, nops_before, "the padding ends where the loop starts");
        assert_eq!(head as usize % LOOP_ALIGN, 0);
    }

    #[test]
    fn a_loop_tested_at_its_top_is_tested_again_at_its_bottom() {
        // i = 9; loop: if i == 0 goto done; i -= 1; goto loop; done: exit
        const SRC: &str = "mov %r0, 9\nloop:\njeq %r0, 0, done\nsub %r0, 1\nja loop\ndone:\nexit";
        let program = crate::asm::assemble_program(SRC).unwrap();
        assert_eq!(
            crate::jit::rotated_test(&program, 3).map(|t| t.index),
            Some(1)
        );
        assert!(crate::jit::rotated_test(&program, 1).is_none());
        assert_eq!(loop_heads(&program), [false, false, true, false, false]);
        let listed = body_listing(SRC, true);
        let body: Vec<&str> = listed
            .iter()
            .map(String::as_str)
            .filter(|s| !s.starts_with("nop"))
            .collect();
        // The bottom's test goes back to the body (`sub`) when i != 0 and falls into `exit`;
        // no jump to the top's test remains.
        assert_eq!(body.len(), 7, "{body:?}");
        assert_eq!(&body[..2], ["mov eax, 9", "test rax, rax"]);
        assert!(body[2].starts_with("je "), "{body:?}");
        assert_eq!(&body[3..5], ["sub rax, 1", "test rax, rax"]);
        assert!(body[5].starts_with("jne "), "{body:?}");
        assert_eq!(body[6], "ret");
    }

    #[test]
    fn prologue_layout() {
        let code = gen_code(vec![Insn::Exit], true);
        assert_eq!(
            &code[PATCH_SITE_OFFSET..PATCH_SITE_OFFSET + PATCH_SITE_LEN],
            PATCH_SITE_NOP
        );
        assert_eq!(
            &code[BODY_OFFSET..BODY_OFFSET + 4],
            [0x55, 0x48, 0x89, 0xe5]
        );
        let l = listing(&code);
        assert_eq!(l[0], "nop [rax+rax]");
        assert_eq!(l[1], "push rbp");
        assert_eq!(l[2], "mov rbp, rsp");
        // The last instruction is the program's `exit`.
        assert_eq!(l.last().unwrap(), "ret");
    }

    #[test]
    fn zero_constants_and_compares_with_zero_use_the_short_forms() {
        let body = body_listing("mov %r0, 0\njeq %r1, 0, +1\nmov32 %r0, 0\nexit", false);
        assert_eq!(
            body,
            [
                "xor eax, eax",
                "test rdi, rdi",
                "je 00000000000000EDh",
                "xor eax, eax",
                "ret"
            ]
        );
    }

    #[test]
    fn a_checked_input_access_tests_its_first_region_in_four_instructions() {
        let body = body_listing("ldxb %r0, [%r1+3]\nexit", true);
        // lea, sub, cmp, jb to the access; the second region and the runtime call only after.
        assert_eq!(body[0], "lea r10, [rdi+3]");
        assert!(body[1].starts_with("sub r10, [r12+"), "{body:?}");
        assert!(body[2].starts_with("cmp r10, [r12+"), "{body:?}");
        assert!(body[3].starts_with("jb "), "{body:?}");
        assert_eq!(body[4], "lea r11, [rdi+3]");
        assert_eq!(body[body.len() - 2], "movzx eax, byte ptr [rdi+3]");
    }

    #[test]
    fn budget_counts_back_edges_and_local_calls_only() {
        let asm = |src: &str| crate::asm::assemble_program(src).unwrap().insns().to_vec();
        // `sub qword ptr [r12+58h], 1` (iced writes displacements as `58h`, `0A8h`).
        let is_count = |s: &String| {
            s.strip_prefix("sub qword ptr [r12+")
                .and_then(|s| s.strip_suffix("h], 1"))
                .and_then(|d| i32::from_str_radix(d, 16).ok())
                == Some(CTX_BUDGET_LEFT)
        };
        let counts = |code: &[u8]| listing(code).iter().filter(|s| is_count(s)).count();
        // Forward jumps, helper calls, callx and accesses: nothing to count, the same bytes.
        let straight = asm("jeq %r1, 0, +2\nldxdw %r0, [%r1+0]\ncall 5\nmov %r2, 5\n\
                            call %r2\nja +0\nstxdw [%r10-8], %r0\nexit");
        // Back edges: `ja` to itself, a conditional one, `ja32`; plus a local call (forward).
        let looping = asm(
            "ja +1\nl:\nja l\nmov %r0, 0\nm:\nadd %r0, 1\njlt %r0, 9, m\n\
                           ja32 +1\nja32 -2\ncall local f\nexit\nf:\nexit",
        );
        for checked in [true, false] {
            let off = gen_budgeted(straight.clone(), checked, false);
            assert_eq!(gen_budgeted(straight.clone(), checked, true), off);
            assert_eq!(counts(&off), 0);
            let off = gen_budgeted(looping.clone(), checked, false);
            let on = gen_budgeted(looping.clone(), checked, true);
            assert_eq!(counts(&off), 0);
            assert_eq!(counts(&on), 4, "ja l, jlt, ja32 -2, call local");
            // Each count is `sub; jae ok; mov r10d, info; call thunk`: 6 + 2 + 6 + 5 bytes (the
            // loop heads' alignment padding aside).
            let unpadded = |code: &[u8]| {
                let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
                std::iter::from_fn(|| d.can_decode().then(|| d.decode()))
                    .filter(|i| i.mnemonic() != iced_x86::Mnemonic::Nop)
                    .map(|i| i.len())
                    .sum::<usize>()
            };
            assert_eq!(unpadded(&on), unpadded(&off) + 4 * 19);
        }
    }

    #[test]
    fn every_instruction_kind_decodes_cleanly() {
        // Generated code for a sample of every instruction form decodes without gaps.
        let r = Reg::new;
        let mut insns = Vec::new();
        for op in AluOp::ALL.into_iter().filter(|op| op.takes_imm()) {
            for width in [Width::W32, Width::W64] {
                for src in [Source::Reg(Reg::R4), Source::Imm(-7), Source::Imm(0)] {
                    for dst in [Reg::R0, Reg::R3, Reg::R4, Reg::R9] {
                        insns.push(Insn::Alu {
                            width,
                            op,
                            dst,
                            src,
                        });
                    }
                }
            }
        }
        for size in [Size::B, Size::H, Size::W, Size::DW] {
            insns.push(Insn::Load {
                size,
                signed: size != Size::DW,
                dst: Reg::R2,
                base: Reg::R1,
                off: 3,
            });
            insns.push(Insn::StoreRelease {
                size,
                base: Reg::R10,
                off: -16,
                src: Reg::R1,
            });
        }
        for op in AtomicOp::ALL {
            for src in [Reg::R0, Reg::R5] {
                insns.push(Insn::Atomic {
                    size: Size::W,
                    op,
                    base: Reg::R0,
                    off: 8,
                    src,
                });
            }
        }
        insns.push(Insn::CallX { reg: r(2).unwrap() });
        insns.push(Insn::Call { id: 5 });
        insns.push(Insn::Call { id: 77 });
        insns.push(Insn::CallLocal { off: 0 });
        insns.push(Insn::Exit);
        for checked in [true, false] {
            listing(&gen_code(insns.clone(), checked));
        }
    }
}
