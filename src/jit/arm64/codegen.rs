//! arm64 code generation for eBPF programs. Pure: it produces bytes on any host.
//!
//! # Image layout
//!
//! The prologue is the Linux arm64 BPF JIT's (`build_prologue`), so that the patch site has the
//! same shape as an ftrace patch site and the same trampolines work for both:
//!
//! ```text
//!  word   instruction                     offset constant
//!  ----   -----------------------------   ---------------------------------------------------
//!   0     bti jc            (bti only)    entry; BTI_INSNS = 1 with bti, 0 without
//!  +0     mov x9, x30                     x9 = the caller's return address, for trampolines
//!  +1     nop                             POKE_OFFSET = BTI_INSNS + 1: the patch site, becomes
//!                                         `bl trampoline` / `b replacement` / `bl plt`
//!  +2     paciasp           (pac only)    BODY_OFFSET = POKE_OFFSET + 1: where a trampoline
//!         stp x29, x30, [sp, #-16]!        returns to (or calls) the program
//!         mov x29, sp
//!         stp x19, x20, [sp, #-16]!       callee-saved registers that hold eBPF state
//!         stp x21, x22, [sp, #-16]!
//!         stp x25, x26, [sp, #-16]!
//!         mov x26, x5                     the RunContext
//!         ldr x25, [x26, #stack_base]; add x25, x25, #TOTAL_STACK          eBPF r10
//!         mov x7/x19/x20/x21/x22, xzr     r0, r6–r9 start at 0 as in the interpreter
//!         bl body                         the main program is a subprogram too: exit = ret
//!  epilogue:
//!         mov x0, x7
//!         sub sp, x29, #48                also unwinds every frame after a fault
//!         ldp x25, x26 / x21, x22 / x19, x20 / x29, x30, [sp], #16
//!         autiasp           (pac only)
//!         ret
//!  fault: mov x7, xzr; b epilogue
//!  tail:  [bti j]                          tail entry (reached by `br`): r1 and r10 are kept,
//!         [whole stack if r1 points into it or r10 is not the top]
//!         mov x7/x1–x4/x19–x22, xzr        the rest start at zero
//!  body:  [sub x11, x25, #reach; ldr x10, [x26, #stack_low]; cmp; b.hs ok; runtime STACK]
//!         one block per eBPF instruction
//!  cold:  out-of-line slow paths of checked accesses (set the request, call the thunk)
//!  thunk: saves live registers (x0–x4, x7, x11, x12, x15, x30), calls
//!         runtime_call(ctx, x11, x10), restores them; 0 -> fault,
//!         else returns to x12 with the result in x10 (`ret x12`: returns are not BTI-checked)
//!  PLT:   [nop]                           so that the literal is 8-byte aligned
//!         ldr x10, #8
//!         br x10
//!         .quad target                    starts as the shared dummy trampoline
//! ```
//!
//! Images are allocated [`IMAGE_ALIGN`]-aligned, so the PLT literal (8-aligned relative to the
//! image start) can be replaced with one single-copy-atomic 64-bit store.
//!
//! # Registers (the Linux JIT's mapping)
//!
//! | eBPF  | r0 | r1–r5 | r6–r9   | r10 | context | scratch                      |
//! |-------|----|-------|---------|-----|---------|------------------------------|
//! | arm64 | x7 | x0–x4 | x19–x22 | x25 | x26     | x9–x16 (x9: LR at entry)      |
//!
//! r1–r5 are the AAPCS64 argument registers, so helpers need no shuffling; r6–r9, r10 and the
//! context live in callee-saved registers, which helpers preserve. Helper calls save x0–x4
//! because the interpreter leaves r1–r5 unchanged. x29 is the entry frame's frame pointer for the
//! whole run. sp stays 16-byte aligned (every push is a pair or 16-byte slot).
//!
//! # Calls, checks and division
//!
//! `bl` overwrites x30, so every call the body makes (helper, BPF-to-BPF, thunk) first saves x30:
//! helper and local calls push it with the registers they preserve; the thunk is entered with
//! `adr x12, back; b thunk` and leaves x30 alone. BPF-to-BPF calls check the depth against the
//! context's `fp_limit`, push r6–r9, r10 and x30, move r10 down by [`STACK_SIZE`] and extend
//! the stack window to the callee's reach (as at `body`).
//!
//! A helper call passes the context as the sixth argument (`mov x5, x26`). Before a context
//! helper the code stores the call's pc and id (one 64-bit store); after it, and after `callx`,
//! it tests the context's failure flag (`ldr x10, [x26, #failed]; cbz x10, ok; b fault`: `b`
//! reaches the fault from anywhere in a large image). `callx` first stores the image's own
//! `Helpers` address in the context, for the runtime's lookup.
//!
//! A tail call stores the index (`str w2, [x26, #arg2]`), passes the map in x11 and makes the
//! runtime request `TAIL_CALL`, which returns the target's tail entry in x10, or 1 to fall
//! through with every register unchanged; then `cmp x10, #1; b.eq next; br x10`. At an
//! instruction boundary sp and x30 are the current function's, so the target's `ret` returns to
//! this function's caller.
//!
//! Checked accesses compute the address into x11 and compare it with the stack and the input
//! inline (as the x86-64 backend does); accesses relative to r10 inside the current frame need
//! no check. Anything else branches to a cold stub that asks `crate::jit::runtime_call`, which
//! scans the extra regions or records the interpreter's error. Stores and atomics compare with
//! the context's `store_bound`, zero for a read-only input, so writes to it take the slow path,
//! which refuses them.
//!
//! With [`Arm64Options::budget`], each back edge and BPF-to-BPF call first does
//! `ldr x10, [x26, #budget_left]; subs x10, x10, #1; b.lo cold; str x10, [x26, #budget_left]`,
//! the cold stub reporting the exhausted budget (it always fails); it precedes the jump's compare.
//!
//! `udiv`/`sdiv` already give RFC 9669's results: x / 0 = 0, and MIN / -1 = MIN (no trap);
//! `msub` then gives x % 0 = x and MIN % -1 = 0. No special cases are needed.
//!
//! # Atomics: LSE or exclusives
//!
//! [`Arm64Options::lse`] selects ARMv8.1 LSE instructions (`ldaddal`, `ldclral`, `ldeoral`,
//! `ldsetal`, `swpal`, `casal`): one instruction, fair under contention. CPUs before ARMv8.1
//! (Cortex-A53/A72, Raspberry Pi 3/4) lack them, so the JIT detects them at run time
//! (`HWCAP_ATOMICS` from `getauxval`) and otherwise emits `ldaxr`/`stlxr` loops. Both forms are
//! sequentially consistent, like the interpreter's `SeqCst` atomics (the same mapping Rust uses
//! for `SeqCst` read-modify-writes: acquire-release LSE, or load-acquire/store-release
//! exclusives). Load-acquire and store-release are `ldar*` and `stlr*`.

use super::enc::{self, Cond, Gpr, LdSt, Logic, Lse, PairMode};
use super::enc::{
    FP, LR, SP, X0, X1, X2, X3, X4, X5, X7, X9, X10, X11, X12, X13, X14, X19, X20, X21, X22, X25,
    X26, XZR,
};
use crate::exec::{Access, STACK_SIZE, TOTAL_STACK};
use crate::helpers::{Helper, Helpers};
use crate::interp::{alu32, alu64};
use crate::isa::{
    AluOp, AtomicOp, Endian, Insn, JmpCond, Program, Reg, Size, Source, StackReach, Width,
};
use crate::jit::{
    CTX_ARG2, CTX_BUDGET_LEFT, CTX_CALL_PC, CTX_FAILED, CTX_FP_LIMIT, CTX_HELPERS, CTX_STACK_BASE,
    CTX_STACK_LOW, JitError, rt,
};

/// Bytes per instruction.
pub const INSN_BYTES: usize = 4;

/// Words before `mov x9, x30`: the `bti jc` landing pad, when BTI is on.
pub const fn bti_insns(bti: bool) -> usize {
    if bti { 1 } else { 0 }
}

/// Word index of the patch site (the kernel's `POKE_OFFSET`).
pub const fn poke_offset(bti: bool) -> usize {
    bti_insns(bti) + 1
}

/// Word index of the instruction after the patch site, where a trampoline returns to.
pub const fn body_offset(bti: bool) -> usize {
    poke_offset(bti) + 1
}

/// Words of the return-address signing (`paciasp`), when PAC is on.
pub const fn pac_insns(pac: bool) -> usize {
    if pac { 1 } else { 0 }
}

/// [`bti_insns`] with the default options (BTI on).
pub const BTI_INSNS: usize = bti_insns(true);
/// [`poke_offset`] with the default options: `bti jc; mov x9, x30; nop`.
pub const POKE_OFFSET: usize = BTI_INSNS + 1;
/// [`body_offset`] with the default options.
pub const BODY_OFFSET: usize = POKE_OFFSET + 1;

/// Alignment of an image's start: the PLT literal's 8-byte alignment is relative to it.
pub const IMAGE_ALIGN: usize = 16;
/// Bytes of the PLT without its alignment nop: `ldr x10, #8; br x10; .quad target`.
pub const PLT_BYTES: usize = 16;
/// Offset of the literal within the PLT's last 16 bytes.
pub const PLT_LITERAL_OFFSET: usize = 8;

/// eBPF register → arm64 register.
pub const REG_MAP: [Gpr; 11] = [X0_R0, X0, X1, X2, X3, X4, X19, X20, X21, X22, X25];
const X0_R0: Gpr = X7;
/// The run context.
const CTX: Gpr = X26;
/// eBPF r10.
const BPF_FP: Gpr = X25;
/// The request word for the thunk; its result.
const TMP: Gpr = X10;
/// The address of a checked access; the thunk's argument.
const ADDR: Gpr = X11;
/// Where the thunk returns to.
const BACK: Gpr = X12;
/// Scratch for immediates and intermediate values.
const IMM: Gpr = X13;
/// Second scratch.
const IMM2: Gpr = X14;
/// Status of a store-exclusive.
const STATUS: Gpr = X9;
/// The value of a store of an immediate (live across the access checks, which use x10–x14).
const VAL: Gpr = Gpr::new(15);
/// Holds the runtime function's address in the thunk (intra-procedure-call scratch).
const X16: Gpr = Gpr::new(16);

/// Bytes the prologue pushes after x29/x30 (three pairs), so `sub sp, x29, #SAVED_BYTES`
/// restores sp in the epilogue.
const SAVED_BYTES: u32 = 48;

/// What [`generate`] needs besides the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arm64Options {
    /// Emit bounds and alignment checks.
    pub checked: bool,
    /// Count back edges and BPF-to-BPF calls against the run's budget.
    pub budget: bool,
    /// Start with the `bti jc` landing pad (needed when the arena maps text with `PROT_BTI`;
    /// a `hint` that does nothing on CPUs without BTI).
    pub bti: bool,
    /// Sign the return address (`paciasp` / `autiasp`; also hints, no-ops before ARMv8.3).
    pub pac: bool,
    /// Use LSE atomics (ARMv8.1) instead of exclusive loops.
    pub lse: bool,
    /// Address of the runtime function (`runtime_call`) the thunk calls.
    pub runtime_fn: u64,
    /// Initial PLT literal: the dummy trampoline's address.
    pub plt_target: u64,
    /// Address of the `Helpers` that `callx` resolves against (kept alive with the image).
    pub helpers: u64,
}

/// Generated code and the offsets a loader and the poker need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arm64Code {
    /// The image, little-endian instruction words (and the PLT literal).
    pub code: Vec<u8>,
    /// Byte offset of the patch site.
    pub patch_site: usize,
    /// Byte offset of the instruction after the patch site.
    pub body: usize,
    /// Byte offset of the PLT's `ldr x10, #8` (after its alignment nop).
    pub plt: usize,
    /// Byte offset of the PLT's 8-byte literal (a multiple of 8).
    pub plt_literal: usize,
    /// Byte offset of the code of each eBPF instruction (by instruction index).
    pub insn_offsets: Vec<usize>,
    /// Byte offset of the tail entry, where a tail call into the program continues.
    pub tail_entry: usize,
}

fn map(r: Reg) -> Gpr {
    REG_MAP[r.index()]
}

/// A position in the code, bound once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

/// How a branch refers to its label.
#[derive(Clone, Copy, Debug)]
enum Fix {
    B,
    Bl,
    BCond(Cond),
    Cbz(bool, Gpr),
    Cbnz(bool, Gpr),
    Adr(Gpr),
}

#[derive(Clone, Copy, Debug)]
struct Fixup {
    at: usize,
    label: Label,
    fix: Fix,
    /// The eBPF slot the branch belongs to (for the error message).
    pc: usize,
}

/// Instruction words with labels and branch fixups.
#[derive(Default)]
struct Emitter {
    words: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<Fixup>,
    pc: usize,
}

impl Emitter {
    fn emit(&mut self, word: u32) {
        self.words.push(word);
    }

    fn emit_all(&mut self, words: &[u32]) {
        self.words.extend_from_slice(words);
    }

    fn new_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.words.len());
    }

    fn branch(&mut self, fix: Fix, label: Label) {
        self.fixups.push(Fixup {
            at: self.words.len(),
            label,
            fix,
            pc: self.pc,
        });
        // Placeholder; `finish` writes the real word.
        self.emit(enc::UDF);
    }

    fn finish(mut self) -> Result<Vec<u32>, JitError> {
        for f in std::mem::take(&mut self.fixups) {
            let target = self.labels[f.label.0].ok_or(JitError::InvalidInstruction {
                pc: f.pc,
                reason: "branch to an unbound label (a JIT bug; please report it)",
            })?;
            let off = (target as i64 - f.at as i64) * INSN_BYTES as i64;
            let word = match f.fix {
                Fix::B => enc::b(off),
                Fix::Bl => enc::bl(off),
                Fix::BCond(c) => enc::b_cond(c, off),
                Fix::Cbz(sf, r) => enc::cbz(sf, r, off),
                Fix::Cbnz(sf, r) => enc::cbnz(sf, r, off),
                Fix::Adr(r) => enc::adr(r, off),
            };
            self.words[f.at] = word.ok_or(JitError::InvalidInstruction {
                pc: f.pc,
                reason: "a branch of the generated arm64 code exceeds its ±1 MiB range; split the program into smaller ones",
            })?;
        }
        Ok(self.words)
    }
}

/// An out-of-line slow path: set the request, call the thunk, continue at `back`.
struct Cold {
    entry: Label,
    back: Label,
    info: u32,
}

/// Generates the image for `program` (see the module documentation for its layout).
pub fn generate(
    program: &Program,
    helpers: &Helpers,
    opts: &Arm64Options,
) -> Result<Arm64Code, JitError> {
    crate::jit::check_size(program)?;
    let mut e = Emitter::default();
    let insn_labels = (0..program.insns().len()).map(|_| e.new_label()).collect();
    let mut g = Gen {
        fault: e.new_label(),
        thunk: e.new_label(),
        e,
        program,
        helpers,
        opts: *opts,
        insn_labels,
        cold: Vec::new(),
        thunk_used: false,
        insn_offsets: Vec::with_capacity(program.insns().len()),
    };
    let tail_entry = g.prologue() * INSN_BYTES;
    for (i, insn) in program.insns().iter().enumerate() {
        g.e.pc = program.slot_of(i);
        let label = g.insn_labels[i];
        g.e.bind(label);
        g.insn_offsets.push(g.e.words.len() * INSN_BYTES);
        g.insn(i, *insn)?;
    }
    g.cold_paths();
    let Gen {
        e, insn_offsets, ..
    } = g;
    let mut words = e.finish()?;
    // PLT: the literal must be 8-byte aligned relative to the (16-aligned) image start.
    if words.len() % 2 == 1 {
        words.push(enc::NOP);
    }
    let plt = words.len() * INSN_BYTES;
    words.push(enc::ldr_literal(true, X10, 8).expect("in range"));
    words.push(enc::br(X10));
    words.push(opts.plt_target as u32);
    words.push((opts.plt_target >> 32) as u32);
    let code = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    Ok(Arm64Code {
        code,
        patch_site: poke_offset(opts.bti) * INSN_BYTES,
        body: body_offset(opts.bti) * INSN_BYTES,
        plt,
        plt_literal: plt + PLT_LITERAL_OFFSET,
        insn_offsets,
        tail_entry,
    })
}

struct Gen<'a> {
    e: Emitter,
    program: &'a Program,
    helpers: &'a Helpers,
    opts: Arm64Options,
    insn_labels: Vec<Label>,
    fault: Label,
    thunk: Label,
    cold: Vec<Cold>,
    /// Whether inline runtime calls need the thunk.
    thunk_used: bool,
    insn_offsets: Vec<usize>,
}

impl Gen<'_> {
    /// Emits everything before the first instruction; returns the tail entry's word index.
    fn prologue(&mut self) -> usize {
        let e = &mut self.e;
        let epilogue = e.new_label();
        let body = e.new_label();
        if self.opts.bti {
            e.emit(enc::BTI_JC);
        }
        e.emit(enc::mov_reg(true, X9, LR));
        e.emit(enc::NOP);
        if self.opts.pac {
            e.emit(enc::PACIASP);
        }
        e.emit(push_pair(FP, LR));
        e.emit(enc::mov_sp(FP, SP));
        for (a, b) in [(X19, X20), (X21, X22), (X25, X26)] {
            e.emit(push_pair(a, b));
        }
        e.emit(enc::mov_reg(true, CTX, X5));
        e.emit(ldr_ctx(BPF_FP, CTX_STACK_BASE));
        e.emit(enc::add_imm(true, BPF_FP, BPF_FP, TOTAL_STACK as u32).expect("4096 encodes"));
        for r in [X7, X19, X20, X21, X22] {
            e.emit(enc::mov_reg(true, r, XZR));
        }
        e.branch(Fix::Bl, body);

        e.bind(epilogue);
        e.emit(enc::mov_reg(true, X0, X7));
        e.emit(enc::sub_imm(true, SP, FP, SAVED_BYTES).expect("small"));
        for (a, b) in [(X25, X26), (X21, X22), (X19, X20), (FP, LR)] {
            e.emit(pop_pair(a, b));
        }
        if self.opts.pac {
            e.emit(enc::AUTIASP);
        }
        e.emit(enc::ret(LR));

        e.bind(self.fault);
        e.emit(enc::mov_reg(true, X7, XZR));
        e.branch(Fix::B, epilogue);

        // Tail entry: a tail call branches here (`br`, hence `bti j`) with r1 = its ctx
        // argument and the caller's frame (sp, x30 = the current function's return address,
        // r10, the context); the rest start at zero.
        // The whole stack when r1 points into it or the frame is not the entry frame
        // (`HelperContext::enter_tail_call`).
        let tail_entry = e.words.len();
        if self.opts.bti {
            e.emit(enc::BTI_J);
        }
        let whole = e.new_label();
        let reserved = e.new_label();
        e.emit(ldr_ctx(TMP, CTX_STACK_BASE));
        e.emit(enc::sub_reg(true, ADDR, X0, TMP));
        e.emit(enc::cmp_imm(true, ADDR, TOTAL_STACK as u32).expect("4096 encodes"));
        e.branch(Fix::BCond(Cond::Lo), whole);
        e.emit(enc::add_imm(true, ADDR, TMP, TOTAL_STACK as u32).expect("4096 encodes"));
        e.emit(enc::cmp_reg(true, ADDR, BPF_FP));
        e.branch(Fix::BCond(Cond::Eq), reserved);
        e.bind(whole);
        self.reserve(StackReach::Unbounded);
        let e = &mut self.e;
        e.bind(reserved);
        for r in [X7, X1, X2, X3, X4, X19, X20, X21, X22] {
            e.emit(enc::mov_reg(true, r, XZR));
        }

        e.bind(body);
        self.reserve(self.program.stack_reach(0));
        tail_entry
    }

    /// Extends the run's stack window to what a function entered with the current r10 reaches
    /// (`HelperContext::reserve_stack`): inline compare, a runtime call the first time only.
    fn reserve(&mut self, reach: StackReach) {
        let e = &mut self.e;
        match reach {
            StackReach::Bytes(0) => return,
            StackReach::Bytes(n) => {
                let n = (n as usize).min(TOTAL_STACK) as u32;
                match enc::sub_imm(true, ADDR, BPF_FP, n) {
                    Some(w) => e.emit(w),
                    None => {
                        e.emit_all(&enc::mov_imm(true, ADDR, n as u64));
                        e.emit(enc::sub_reg(true, ADDR, BPF_FP, ADDR));
                    }
                }
            }
            StackReach::Unbounded => e.emit(ldr_ctx(ADDR, CTX_STACK_BASE)),
        }
        e.emit(ldr_ctx(TMP, CTX_STACK_LOW));
        e.emit(enc::cmp_reg(true, ADDR, TMP));
        // Inline rather than a cold stub: `b.cond` reaches only ±1 MiB, `b` to the thunk
        // anywhere in the image.
        let ok = e.new_label();
        e.branch(Fix::BCond(Cond::Hs), ok);
        self.runtime_inline(rt::info(rt::STACK, 0, 1, Access::Load));
        self.e.bind(ok);
    }

    /// Cold stubs, then the thunk (only if anything calls it).
    fn cold_paths(&mut self) {
        let cold = std::mem::take(&mut self.cold);
        let uses_thunk = !cold.is_empty() || self.thunk_used;
        for c in &cold {
            self.e.bind(c.entry);
            self.e.emit_all(&enc::mov_imm(false, TMP, c.info as u64));
            self.e.branch(Fix::Adr(BACK), c.back);
            self.e.branch(Fix::B, self.thunk);
        }
        if !uses_thunk {
            return;
        }
        let e = &mut self.e;
        e.bind(self.thunk);
        // 80 bytes: x0–x4, r0, the access address, the return address, x30 and the value of a
        // store of an immediate (x15), which the runtime (Rust code) may clobber.
        e.emit(enc::stp(PairMode::Pre, X0, X1, SP, -80).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, X2, X3, SP, 16).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, X4, X7, SP, 32).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, ADDR, BACK, SP, 48).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, LR, VAL, SP, 64).expect("in range"));
        e.emit(enc::mov_reg(true, X0, CTX));
        e.emit(enc::mov_reg(true, X1, ADDR));
        e.emit(enc::mov_reg(true, X2, TMP));
        e.emit_all(&enc::mov_imm(true, X16, self.opts.runtime_fn));
        e.emit(enc::blr(X16));
        e.emit(enc::mov_reg(true, TMP, X0));
        e.emit(enc::ldp(PairMode::Offset, LR, VAL, SP, 64).expect("in range"));
        e.emit(enc::ldp(PairMode::Offset, ADDR, BACK, SP, 48).expect("in range"));
        e.emit(enc::ldp(PairMode::Offset, X4, X7, SP, 32).expect("in range"));
        e.emit(enc::ldp(PairMode::Offset, X2, X3, SP, 16).expect("in range"));
        e.emit(enc::ldp(PairMode::Post, X0, X1, SP, 80).expect("in range"));
        // `cbnz` over `b fault`: the fault is in the prologue, beyond `cbz`'s ±1 MiB in a
        // large image.
        let resume = e.new_label();
        e.branch(Fix::Cbnz(true, TMP), resume);
        e.branch(Fix::B, self.fault);
        e.bind(resume);
        e.emit(enc::ret(BACK));
    }

    /// Branches (on `cond`, or always) to a cold stub that makes runtime request `info` and
    /// continues after this point if the runtime allows it.
    fn slow_path(&mut self, cond: Option<Cond>, info: u32) {
        let entry = self.e.new_label();
        let back = self.e.new_label();
        match cond {
            Some(c) => self.e.branch(Fix::BCond(c), entry),
            None => self.e.branch(Fix::B, entry),
        }
        self.e.bind(back);
        self.cold.push(Cold { entry, back, info });
    }

    /// Calls the runtime inline with request `info` (argument in x11); continues only if it
    /// says so, with its result in x10.
    fn runtime_inline(&mut self, info: u32) {
        let back = self.e.new_label();
        self.e.emit_all(&enc::mov_imm(false, TMP, info as u64));
        self.e.branch(Fix::Adr(BACK), back);
        self.e.branch(Fix::B, self.thunk);
        self.e.bind(back);
        self.thunk_used = true;
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
            Insn::Neg { width, dst } => {
                let d = map(dst);
                self.e.emit(enc::neg(width == Width::W64, d, d));
            }
            Insn::Endian { kind, bits, dst } => self.endian(kind, bits, map(dst)),
            Insn::LoadImm64 { dst, imm } => self.e.emit_all(&enc::mov_imm(true, map(dst), imm)),
            Insn::Load {
                size,
                signed,
                dst,
                base,
                off,
            } => {
                let op = if signed { LdSt::Ldrs } else { LdSt::Ldr };
                self.access(pc, base, off, size, Access::Load, false, |g, rn, disp| {
                    g.ldst(op, size, map(dst), rn, disp)
                });
            }
            Insn::Store {
                size,
                base,
                off,
                src,
            } => {
                let value = match src {
                    Source::Reg(r) => map(r),
                    Source::Imm(v) => {
                        // Only the low `size` bytes are stored.
                        let wide = size == Size::DW;
                        let v = if wide {
                            v as i64 as u64
                        } else {
                            v as u32 as u64
                        };
                        self.e.emit_all(&enc::mov_imm(wide, VAL, v));
                        VAL
                    }
                };
                self.access(pc, base, off, size, Access::Store, false, |g, rn, disp| {
                    g.ldst(LdSt::Str, size, value, rn, disp)
                });
            }
            Insn::Atomic {
                size,
                op,
                base,
                off,
                src,
            } => {
                self.access(pc, base, off, size, Access::Atomic, true, |_, _, _| {});
                self.atomic(size == Size::DW, op, map(src));
            }
            Insn::LoadAcquire {
                size,
                dst,
                base,
                off,
            } => {
                self.access(pc, base, off, size, Access::Load, true, |_, _, _| {});
                self.e.emit(enc::ldar(size, map(dst), ADDR));
            }
            Insn::StoreRelease {
                size,
                base,
                off,
                src,
            } => {
                self.access(pc, base, off, size, Access::Store, true, |_, _, _| {});
                self.e.emit(enc::stlr(size, map(src), ADDR));
            }
            Insn::Ja { .. } | Insn::Ja32 { .. } => {
                let t = self.target(i)?;
                self.count_back_edge(i, pc);
                match crate::jit::rotated_test(self.program, i) {
                    // Back to a loop's test: that test here, inverted, to the loop's body.
                    Some(test) => {
                        let exit = self.target(test.index)?;
                        let body = self.insn_labels[test.index + 1];
                        self.jump(test.w64, test.cond, map(test.dst), test.src, body, true);
                        if self.program.target_of(test.index) != Some(i + 1) {
                            self.e.branch(Fix::B, exit);
                        }
                    }
                    None => self.e.branch(Fix::B, t),
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
                    // pc and id with one store: `call_id` is the upper half of the word.
                    let call = (id as u64) << 32 | pc as u64;
                    self.e.emit_all(&enc::mov_imm(true, IMM, call));
                    self.e.emit(str_ctx(IMM, CTX_CALL_PC));
                    self.call_helper(Some(f as usize as u64), true);
                }
                Some(Helper::TailCall) => self.tail_call(pc),
                None => {
                    // Fails at run time, as in the interpreter (the code may never get here).
                    self.e.emit_all(&enc::mov_imm(false, ADDR, id as u64));
                    self.runtime_inline(rt::info(rt::HELPER, pc, 1, Access::Load));
                }
            },
            Insn::CallX { reg } => {
                // A tail call may have brought another program's code here: the lookup uses
                // this image's helpers.
                self.e.emit_all(&enc::mov_imm(true, IMM, self.opts.helpers));
                self.e.emit(str_ctx(IMM, CTX_HELPERS));
                self.e.emit(enc::mov_reg(true, ADDR, map(reg)));
                self.runtime_inline(rt::info(rt::HELPER, pc, 1, Access::Load));
                // The id is dynamic, so it may be a context helper.
                self.call_helper(None, true);
            }
            Insn::CallLocal { .. } => {
                let t = self.target(i)?;
                let reach = self.program.callee_reach(i);
                self.count(pc);
                self.call_local(pc, t, reach);
            }
            Insn::Exit => self.e.emit(enc::ret(LR)),
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
        self.e.emit(ldr_ctx(TMP, CTX_BUDGET_LEFT));
        self.e
            .emit(enc::subs_imm(true, TMP, TMP, 1).expect("1 encodes"));
        // Lo (carry clear): the subtraction borrowed, the budget was 0.
        self.slow_path(Some(Cond::Lo), rt::info(rt::BUDGET, pc, 1, Access::Load));
        self.e.emit(str_ctx(TMP, CTX_BUDGET_LEFT));
    }

    /// `rd = value` as an operand of width `w64`.
    fn load_imm(&mut self, w64: bool, rd: Gpr, value: u64) {
        self.e.emit_all(&enc::mov_imm(w64, rd, value));
    }

    fn alu(&mut self, w64: bool, op: AluOp, d: Gpr, src: Source) {
        // The source value as the interpreter sees it: immediates sign-extended for 64 bits,
        // taken as u32 for 32 bits.
        let imm = |v: i32| {
            if w64 {
                v as i64 as u64
            } else {
                v as u32 as u64
            }
        };
        let mask = if w64 { u64::MAX } else { u32::MAX as u64 };
        // The register operand, materialising an immediate into IMM.
        let reg = |g: &mut Self, src: Source| match src {
            Source::Reg(s) => map(s),
            Source::Imm(v) => {
                g.load_imm(w64, IMM, imm(v));
                IMM
            }
        };
        match op {
            AluOp::Add | AluOp::Sub => {
                if let Source::Imm(v) = src {
                    let v = imm(v);
                    let neg = v.wrapping_neg() & mask;
                    let (plus, minus) = if op == AluOp::Add { (v, neg) } else { (neg, v) };
                    let word = u32::try_from(plus)
                        .ok()
                        .and_then(|p| enc::add_imm(w64, d, d, p))
                        .or_else(|| {
                            u32::try_from(minus)
                                .ok()
                                .and_then(|m| enc::sub_imm(w64, d, d, m))
                        });
                    if let Some(word) = word {
                        self.e.emit(word);
                        return;
                    }
                }
                let s = reg(self, src);
                self.e.emit(if op == AluOp::Add {
                    enc::add_reg(w64, d, d, s)
                } else {
                    enc::sub_reg(w64, d, d, s)
                });
            }
            AluOp::Or | AluOp::And | AluOp::Xor => {
                let l = match op {
                    AluOp::Or => Logic::Orr,
                    AluOp::And => Logic::And,
                    _ => Logic::Eor,
                };
                if let Source::Imm(v) = src
                    && let Some(word) = enc::logic_imm(l, w64, d, d, imm(v))
                {
                    self.e.emit(word);
                    return;
                }
                let s = reg(self, src);
                self.e.emit(enc::logic_reg(l, w64, d, d, s));
            }
            AluOp::Mul => {
                let s = reg(self, src);
                self.e.emit(enc::mul(w64, d, d, s));
            }
            AluOp::Div | AluOp::SDiv | AluOp::Mod | AluOp::SMod => {
                let s = match src {
                    Source::Reg(s) => map(s),
                    Source::Imm(v) => {
                        self.load_imm(w64, IMM2, imm(v));
                        IMM2
                    }
                };
                let signed = matches!(op, AluOp::SDiv | AluOp::SMod);
                let div = if signed { enc::sdiv } else { enc::udiv };
                if matches!(op, AluOp::Div | AluOp::SDiv) {
                    self.e.emit(div(w64, d, d, s));
                } else {
                    // d - (d / s) * s; with s = 0 the quotient is 0 and d stays.
                    self.e.emit(div(w64, IMM, d, s));
                    self.e.emit(enc::msub(w64, d, IMM, s, d));
                }
            }
            AluOp::Lsh | AluOp::Rsh | AluOp::Arsh => match src {
                Source::Reg(s) => {
                    let s = map(s);
                    self.e.emit(match op {
                        AluOp::Lsh => enc::lslv(w64, d, d, s),
                        AluOp::Rsh => enc::lsrv(w64, d, d, s),
                        _ => enc::asrv(w64, d, d, s),
                    });
                }
                Source::Imm(v) => {
                    let count = v as u32 & if w64 { 63 } else { 31 };
                    if count == 0 && w64 {
                        return;
                    }
                    // A zero count still zero-extends the 32-bit result (`ubfm w, w, #0, #31`).
                    self.e.emit(match op {
                        AluOp::Lsh => enc::lsl_imm(w64, d, d, count),
                        AluOp::Rsh => enc::lsr_imm(w64, d, d, count),
                        _ => enc::asr_imm(w64, d, d, count),
                    });
                }
            },
            AluOp::Mov => match src {
                Source::Reg(s) => {
                    if !(w64 && d == map(s)) {
                        self.e.emit(enc::mov_reg(w64, d, map(s)));
                    }
                }
                Source::Imm(v) => self.load_imm(true, d, imm(v)),
            },
            AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32 => match src {
                Source::Reg(s) => {
                    let bits = match op {
                        AluOp::MovSx8 => 8,
                        AluOp::MovSx16 => 16,
                        _ => 32,
                    };
                    if bits == 32 && !w64 {
                        // The interpreter keeps the low half for the 32-bit form.
                        self.e.emit(enc::mov_reg(false, d, map(s)));
                    } else {
                        self.e.emit(enc::sxt(w64, bits, d, map(s)));
                    }
                }
                // Only in hand-built programs: fold the constant.
                Source::Imm(v) => {
                    let value = if w64 {
                        alu64(op, 0, imm(v))
                    } else {
                        alu32(op, 0, imm(v) as u32) as u64
                    };
                    self.load_imm(true, d, value);
                }
            },
        }
    }

    fn endian(&mut self, kind: Endian, bits: u8, d: Gpr) {
        let e = &mut self.e;
        match (kind, bits) {
            (Endian::Le, 16) => e.emit(enc::uxt(16, d, d)),
            (Endian::Le, 32) => e.emit(enc::mov_reg(false, d, d)),
            (Endian::Le, _) => {}
            (Endian::Be | Endian::Swap, 16) => {
                e.emit(enc::rev16(false, d, d));
                e.emit(enc::uxt(16, d, d));
            }
            (Endian::Be | Endian::Swap, 32) => e.emit(enc::rev(false, d, d)),
            (Endian::Be | Endian::Swap, _) => e.emit(enc::rev(true, d, d)),
        }
    }

    /// One load or store at `rn + disp`, in the shortest form that encodes it.
    fn ldst(&mut self, op: LdSt, size: Size, rt: Gpr, rn: Gpr, disp: i64) {
        let word = enc::ldst_uimm(op, size, rt, rn, disp)
            .or_else(|| enc::ldst_simm9(op, size, rt, rn, disp));
        match word {
            Some(w) => self.e.emit(w),
            None => {
                self.load_imm(true, IMM2, disp as u64);
                self.e
                    .emit(enc::ldst_reg(op, size, rt, rn, IMM2).expect("no 64-bit ldrs"));
            }
        }
    }

    /// `rd = rn + disp`.
    fn add_disp(&mut self, rd: Gpr, rn: Gpr, disp: i64) {
        let word = if disp >= 0 {
            enc::add_imm(true, rd, rn, disp as u32)
        } else {
            enc::sub_imm(true, rd, rn, disp.unsigned_abs() as u32)
        };
        match word {
            Some(w) if disp != 0 || rd != rn => self.e.emit(w),
            Some(_) => {}
            None => {
                self.load_imm(true, IMM2, disp as u64);
                self.e.emit(enc::add_reg(true, rd, rn, IMM2));
            }
        }
    }

    /// Emits the checks of an access and then `body(rn, disp)` for the access itself. With
    /// `aligned` (atomics, acquire/release) the address is always left in x11 and `body` gets
    /// `(x11, 0)`; the caller may emit the access itself after this returns.
    #[allow(clippy::too_many_arguments)]
    fn access(
        &mut self,
        pc: usize,
        base: Reg,
        off: i16,
        size: Size,
        access: Access,
        aligned: bool,
        body: impl FnOnce(&mut Self, Gpr, i64),
    ) {
        let b = map(base);
        let disp = off as i64;
        let n = size.bytes();
        if !self.opts.checked {
            if aligned {
                self.add_disp(ADDR, b, disp);
                body(self, ADDR, 0);
            } else {
                body(self, b, disp);
            }
            return;
        }
        // r10 is never written and always points at the top of a frame inside the stack, so
        // accesses within the current frame are always in bounds; the range analysis proves
        // more of them (`Program::in_frame`).
        let in_frame = (base == Reg::R10 && disp >= -(STACK_SIZE as i64) && disp + n as i64 <= 0)
            || self
                .program
                .insn_at(pc)
                .is_some_and(|i| self.program.in_frame(i));
        if in_frame && !(aligned && n > 1) {
            if aligned {
                self.add_disp(ADDR, b, disp);
                body(self, ADDR, 0);
            } else {
                body(self, b, disp);
            }
            return;
        }
        self.add_disp(ADDR, b, disp);
        if !in_frame {
            let ok = self.e.new_label();
            let e = &mut self.e;
            let [first, second] = crate::jit::region_order(self.program, pc, n, access);
            e.emit(ldr_ctx(TMP, first.0));
            e.emit(enc::sub_reg(true, TMP, ADDR, TMP));
            e.emit(ldr_ctx(IMM, first.1));
            e.emit(enc::cmp_reg(true, TMP, IMM));
            e.branch(Fix::BCond(Cond::Lo), ok);
            e.emit(ldr_ctx(TMP, second.0));
            e.emit(enc::sub_reg(true, TMP, ADDR, TMP));
            e.emit(ldr_ctx(IMM, second.1));
            e.emit(enc::cmp_reg(true, TMP, IMM));
            self.slow_path(Some(Cond::Hs), rt::info(rt::BOUNDS, pc, n, access));
            self.e.bind(ok);
        }
        if aligned && n > 1 {
            self.e
                .emit(enc::tst_imm(true, ADDR, (n - 1) as u64).expect("low-bit masks encode"));
            self.slow_path(Some(Cond::Ne), rt::info(rt::MISALIGNED, pc, n, access));
        }
        body(self, ADDR, 0);
    }

    /// The atomic operation on the address in x11.
    fn atomic(&mut self, sf: bool, op: AtomicOp, s: Gpr) {
        if self.opts.lse {
            self.atomic_lse(sf, op, s);
        } else {
            self.atomic_llsc(sf, op, s);
        }
    }

    fn atomic_lse(&mut self, sf: bool, op: AtomicOp, s: Gpr) {
        let e = &mut self.e;
        // The old value goes to a scratch register for the non-fetching forms: with xzr as
        // destination the load would lose its acquire semantics.
        let (l, dst) = match op {
            AtomicOp::Add => (Lse::Add, IMM2),
            AtomicOp::Or => (Lse::Set, IMM2),
            AtomicOp::Xor => (Lse::Eor, IMM2),
            AtomicOp::And => (Lse::Clr, IMM2),
            AtomicOp::FetchAdd => (Lse::Add, s),
            AtomicOp::FetchOr => (Lse::Set, s),
            AtomicOp::FetchXor => (Lse::Eor, s),
            AtomicOp::FetchAnd => (Lse::Clr, s),
            AtomicOp::Xchg => (Lse::Swp, s),
            AtomicOp::CmpXchg => {
                // r0 (x7) is the expected value and receives the old one.
                e.emit(enc::casal(sf, X7, s, ADDR));
                return;
            }
        };
        let operand = if l == Lse::Clr {
            // and = clear the bits that are zero in the source.
            e.emit(enc::mvn(sf, IMM, s));
            IMM
        } else {
            s
        };
        e.emit(enc::lse(l, sf, operand, dst, ADDR));
    }

    fn atomic_llsc(&mut self, sf: bool, op: AtomicOp, s: Gpr) {
        let retry = self.e.new_label();
        let done = self.e.new_label();
        let e = &mut self.e;
        e.bind(retry);
        e.emit(enc::ldaxr(sf, IMM, ADDR));
        let new = match op {
            AtomicOp::Add | AtomicOp::FetchAdd => {
                e.emit(enc::add_reg(sf, IMM2, IMM, s));
                IMM2
            }
            AtomicOp::Or | AtomicOp::FetchOr => {
                e.emit(enc::logic_reg(Logic::Orr, sf, IMM2, IMM, s));
                IMM2
            }
            AtomicOp::And | AtomicOp::FetchAnd => {
                e.emit(enc::logic_reg(Logic::And, sf, IMM2, IMM, s));
                IMM2
            }
            AtomicOp::Xor | AtomicOp::FetchXor => {
                e.emit(enc::logic_reg(Logic::Eor, sf, IMM2, IMM, s));
                IMM2
            }
            AtomicOp::Xchg => s,
            AtomicOp::CmpXchg => {
                e.emit(enc::cmp_reg(sf, IMM, X7));
                e.branch(Fix::BCond(Cond::Ne), done);
                s
            }
        };
        e.emit(enc::stlxr(sf, STATUS, new, ADDR));
        e.branch(Fix::Cbnz(false, STATUS), retry);
        e.bind(done);
        match op {
            AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => {}
            AtomicOp::CmpXchg => e.emit(enc::mov_reg(sf, X7, IMM)),
            _ => e.emit(enc::mov_reg(sf, s, IMM)),
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
        let value = |v: i32| {
            if w64 {
                v as i64 as u64
            } else {
                v as u32 as u64
            }
        };
        // Equality with zero needs no compare: `cbz`/`cbnz` (same ±1 MiB reach as `b.cond`).
        match (cond, src, negated) {
            (JmpCond::Eq, Source::Imm(0), false) | (JmpCond::Ne, Source::Imm(0), true) => {
                return self.e.branch(Fix::Cbz(w64, d), target);
            }
            (JmpCond::Ne, Source::Imm(0), false) | (JmpCond::Eq, Source::Imm(0), true) => {
                return self.e.branch(Fix::Cbnz(w64, d), target);
            }
            _ => {}
        }
        match (cond, src) {
            (JmpCond::Set, Source::Reg(s)) => self.e.emit(enc::tst_reg(w64, d, map(s))),
            (JmpCond::Set, Source::Imm(v)) => match enc::tst_imm(w64, d, value(v)) {
                Some(w) => self.e.emit(w),
                None => {
                    self.load_imm(w64, IMM, value(v));
                    self.e.emit(enc::tst_reg(w64, d, IMM));
                }
            },
            (_, Source::Reg(s)) => self.e.emit(enc::cmp_reg(w64, d, map(s))),
            (_, Source::Imm(v)) => {
                // cmp #v, or cmn #-v for small negative v (same flags as v ≠ 0, > MIN).
                let word = if v >= 0 {
                    enc::cmp_imm(w64, d, v as u32)
                } else {
                    enc::cmn_imm(w64, d, v.unsigned_abs())
                };
                match word {
                    Some(w) => self.e.emit(w),
                    None => {
                        self.load_imm(w64, IMM, value(v));
                        self.e.emit(enc::cmp_reg(w64, d, IMM));
                    }
                }
            }
        }
        let c = match cond {
            JmpCond::Eq => Cond::Eq,
            JmpCond::Ne | JmpCond::Set => Cond::Ne,
            JmpCond::Gt => Cond::Hi,
            JmpCond::Ge => Cond::Hs,
            JmpCond::Lt => Cond::Lo,
            JmpCond::Le => Cond::Ls,
            JmpCond::Sgt => Cond::Gt,
            JmpCond::Sge => Cond::Ge,
            JmpCond::Slt => Cond::Lt,
            JmpCond::Sle => Cond::Le,
        };
        self.e
            .branch(Fix::BCond(if negated { c.invert() } else { c }), target);
    }

    /// Calls a helper at a known address, or at the address in x10 (from a `callx` lookup).
    /// r1–r5 are already x0–x4 and the context becomes the sixth argument (x5); the result
    /// moves from x0 to r0. With `may_fail`, a failure the helper recorded in the context
    /// unwinds the run.
    fn call_helper(&mut self, addr: Option<u64>, may_fail: bool) {
        let e = &mut self.e;
        e.emit(enc::stp(PairMode::Pre, X0, X1, SP, -48).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, X2, X3, SP, 16).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, X4, LR, SP, 32).expect("in range"));
        if let Some(f) = addr {
            e.emit_all(&enc::mov_imm(true, TMP, f));
        }
        e.emit(enc::mov_reg(true, X5, CTX));
        e.emit(enc::blr(TMP));
        e.emit(enc::mov_reg(true, X7, X0));
        e.emit(enc::ldp(PairMode::Offset, X4, LR, SP, 32).expect("in range"));
        e.emit(enc::ldp(PairMode::Offset, X2, X3, SP, 16).expect("in range"));
        e.emit(enc::ldp(PairMode::Post, X0, X1, SP, 48).expect("in range"));
        if may_fail {
            // `b` (±128 MiB) rather than `cbnz` (±1 MiB) to the fault: programs may be large.
            let ok = e.new_label();
            e.emit(ldr_ctx(TMP, CTX_FAILED));
            e.branch(Fix::Cbz(true, TMP), ok);
            e.branch(Fix::B, self.fault);
            e.bind(ok);
        }
    }

    /// `bpf_tail_call`: the runtime checks the map (r2), the index (r3) and the count and
    /// returns the target's tail entry (or 1 to fall through, every register unchanged). At
    /// an instruction boundary sp and x30 are the current function's, so the target's `exit`
    /// (`ret`) returns to this function's caller.
    fn tail_call(&mut self, pc: usize) {
        self.e.emit(
            enc::ldst_uimm(LdSt::Str, Size::W, X2, CTX, CTX_ARG2 as i64)
                .expect("context fields are small"),
        );
        self.e.emit(enc::mov_reg(true, ADDR, X1));
        self.runtime_inline(rt::info(rt::TAIL_CALL, pc, 1, Access::Load));
        let e = &mut self.e;
        let fall_through = e.new_label();
        e.emit(enc::cmp_imm(true, TMP, 1).expect("1 encodes"));
        e.branch(Fix::BCond(Cond::Eq), fall_through);
        e.emit(enc::br(TMP));
        e.bind(fall_through);
    }

    fn call_local(&mut self, pc: usize, target: Label, reach: StackReach) {
        // Fails when r10 ≤ fp_limit: all frames are in use.
        self.e.emit(ldr_ctx(TMP, CTX_FP_LIMIT));
        self.e.emit(enc::cmp_reg(true, BPF_FP, TMP));
        self.slow_path(
            Some(Cond::Ls),
            rt::info(rt::CALL_DEPTH, pc, 1, Access::Load),
        );
        let e = &mut self.e;
        e.emit(enc::stp(PairMode::Pre, X19, X20, SP, -48).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, X21, X22, SP, 16).expect("in range"));
        e.emit(enc::stp(PairMode::Offset, BPF_FP, LR, SP, 32).expect("in range"));
        e.emit(enc::sub_imm(true, BPF_FP, BPF_FP, STACK_SIZE as u32).expect("512 encodes"));
        self.reserve(reach);
        let e = &mut self.e;
        e.branch(Fix::Bl, target);
        e.emit(enc::ldp(PairMode::Offset, BPF_FP, LR, SP, 32).expect("in range"));
        e.emit(enc::ldp(PairMode::Offset, X21, X22, SP, 16).expect("in range"));
        e.emit(enc::ldp(PairMode::Post, X19, X20, SP, 48).expect("in range"));
    }
}

/// `stp a, b, [sp, #-16]!`
fn push_pair(a: Gpr, b: Gpr) -> u32 {
    enc::stp(PairMode::Pre, a, b, SP, -16).expect("in range")
}

/// `ldp a, b, [sp], #16`
fn pop_pair(a: Gpr, b: Gpr) -> u32 {
    enc::ldp(PairMode::Post, a, b, SP, 16).expect("in range")
}

/// `ldr rt, [x26, #field]` for a `RunContext` field.
fn ldr_ctx(rt: Gpr, field: i32) -> u32 {
    enc::ldst_uimm(LdSt::Ldr, Size::DW, rt, CTX, field as i64).expect("context fields are small")
}

/// `str rt, [x26, #field]` for a `RunContext` field.
fn str_ctx(rt: Gpr, field: i32) -> u32 {
    enc::ldst_uimm(LdSt::Str, Size::DW, rt, CTX, field as i64).expect("context fields are small")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::Program;
    use capstone::arch::BuildsCapstone;
    use capstone::prelude::*;

    const RUNTIME: u64 = 0x1122_3344_5566_7788;
    const DUMMY: u64 = 0x0000_7f00_dead_bee0;

    fn opts(checked: bool, bti: bool, pac: bool, lse: bool) -> Arm64Options {
        Arm64Options {
            checked,
            budget: false,
            bti,
            pac,
            lse,
            runtime_fn: RUNTIME,
            plt_target: DUMMY,
            helpers: 0x99aa_bbcc_ddee_ff00,
        }
    }

    fn gen_code(insns: Vec<Insn>, o: Arm64Options) -> Arm64Code {
        let p = Program::new(insns).unwrap();
        generate(&p, &Helpers::conformance(), &o).unwrap()
    }

    #[test]
    fn budget_counts_back_edges_and_local_calls_only() {
        let asm = |src: &str| crate::asm::assemble_program(src).unwrap().insns().to_vec();
        let load = format!("ldr x10, [x26, #{CTX_BUDGET_LEFT:#x}]");
        let counts = |c: &Arm64Code| {
            let l = listing(&c.code[..c.plt]);
            let n = l.iter().filter(|s| **s == load).count();
            assert_eq!(n, l.iter().filter(|s| *s == "subs x10, x10, #1").count());
            n
        };
        // Forward jumps, helper calls, callx and accesses: nothing to count, the same words.
        let straight = asm("jeq %r1, 0, +2\nldxdw %r0, [%r1+0]\ncall 5\nmov %r2, 5\n\
                            call %r2\nja +0\nstxdw [%r10-8], %r0\nexit");
        // Back edges: `ja` to itself, a conditional one, `ja32`; plus a local call (forward).
        let looping = asm(
            "ja +1\nl:\nja l\nmov %r0, 0\nm:\nadd %r0, 1\njlt %r0, 9, m\n\
                           ja32 +1\nja32 -2\ncall local f\nexit\nf:\nexit",
        );
        for checked in [true, false] {
            let off = opts(checked, true, true, true);
            let on = Arm64Options {
                budget: true,
                ..off
            };
            let base = gen_code(straight.clone(), off);
            assert_eq!(gen_code(straight.clone(), on), base);
            assert_eq!(counts(&base), 0);
            let base = gen_code(looping.clone(), off);
            let counted = gen_code(looping.clone(), on);
            assert_eq!(counts(&base), 0);
            assert_eq!(counts(&counted), 4, "ja l, jlt, ja32 -2, call local");
            // Inline: ldr, subs, b.lo, str; cold: mov, adr, b. The PLT may gain or lose its nop.
            let grown = counted.plt as i64 - base.plt as i64;
            assert!((grown - 4 * 7 * 4).abs() <= 4, "{grown}");
        }
    }

    /// Capstone's listing of `code[..len]`, one string per word; panics on undecodable words.
    fn listing(code: &[u8]) -> Vec<String> {
        let cs = Capstone::new()
            .arm64()
            .mode(capstone::arch::arm64::ArchMode::Arm)
            .build()
            .unwrap();
        code.chunks_exact(4)
            .enumerate()
            .map(|(i, w)| {
                let insns = cs.disasm_count(w, (i * 4) as u64, 1).unwrap();
                let insn = insns
                    .iter()
                    .next()
                    .unwrap_or_else(|| panic!("undecodable word {w:02x?} at {:#x}", i * 4));
                format!(
                    "{} {}",
                    insn.mnemonic().unwrap(),
                    insn.op_str().unwrap_or("")
                )
                .trim()
                .to_string()
            })
            .collect()
    }

    #[test]
    fn prologue_matches_the_seed_with_every_option() {
        for (bti, pac) in [(true, true), (true, false), (false, true), (false, false)] {
            let c = gen_code(vec![Insn::Exit], opts(true, bti, pac, true));
            let l = listing(&c.code[..c.plt]);
            let mut want = Vec::new();
            if bti {
                want.push("bti jc");
            }
            want.extend(["mov x9, x30", "nop"]);
            if pac {
                want.push("paciasp");
            }
            want.extend(["stp x29, x30, [sp, #-0x10]!", "mov x29, sp"]);
            assert_eq!(&l[..want.len()], want.as_slice(), "bti {bti} pac {pac}");
            assert_eq!(c.patch_site, poke_offset(bti) * 4);
            assert_eq!(c.body, c.patch_site + 4);
            assert_eq!(l[c.patch_site / 4], "nop");
            // The epilogue authenticates before returning.
            let ret = l.iter().position(|s| s == "ret").unwrap();
            let pop = if pac {
                assert_eq!(l[ret - 1], "autiasp");
                ret - 2
            } else {
                ret - 1
            };
            assert_eq!(l[pop], "ldp x29, x30, [sp], #0x10");
        }
        assert_eq!(POKE_OFFSET, 2);
        assert_eq!(BODY_OFFSET, 3);
    }

    #[test]
    fn plt_is_aligned_and_points_at_the_dummy() {
        // Programs of both parities of length, so the padding nop appears in one of them.
        let mut paddings = std::collections::HashSet::new();
        for n in 0..4 {
            let mut insns = vec![
                Insn::Alu {
                    width: Width::W64,
                    op: AluOp::Mov,
                    dst: Reg::R0,
                    src: Source::Imm(1),
                };
                n
            ];
            insns.push(Insn::Exit);
            let c = gen_code(insns, opts(false, true, false, true));
            assert_eq!(c.plt_literal % 8, 0);
            assert_eq!(c.plt_literal, c.plt + 8);
            assert_eq!(c.code.len(), c.plt + PLT_BYTES);
            let l = listing(&c.code[..c.plt + 8]);
            assert_eq!(l[c.plt / 4], format!("ldr x10, #{:#x}", c.plt_literal));
            assert_eq!(l[c.plt / 4 + 1], "br x10");
            let lit = u64::from_le_bytes(c.code[c.plt_literal..].try_into().unwrap());
            assert_eq!(lit, DUMMY);
            paddings.insert(l[c.plt / 4 - 1] == "nop");
        }
        assert_eq!(paddings.len(), 2, "both with and without the padding nop");
    }

    #[test]
    fn every_instruction_kind_decodes_cleanly() {
        let mut insns = Vec::new();
        for op in AluOp::ALL.into_iter().filter(|op| op.takes_imm()) {
            for width in [Width::W32, Width::W64] {
                for src in [
                    Source::Reg(Reg::R4),
                    Source::Imm(-7),
                    Source::Imm(0),
                    Source::Imm(0x12345),
                ] {
                    insns.push(Insn::Alu {
                        width,
                        op,
                        dst: Reg::R3,
                        src,
                    });
                }
            }
        }
        for size in [Size::B, Size::H, Size::W, Size::DW] {
            for (base, off) in [
                (Reg::R1, 3),
                (Reg::R10, -8),
                (Reg::R10, -400),
                (Reg::R2, 30000),
            ] {
                insns.push(Insn::Load {
                    size,
                    signed: size != Size::DW,
                    dst: Reg::R0,
                    base,
                    off,
                });
                insns.push(Insn::Store {
                    size,
                    base,
                    off,
                    src: Source::Imm(-2),
                });
                insns.push(Insn::LoadAcquire {
                    size,
                    dst: Reg::R5,
                    base,
                    off,
                });
                insns.push(Insn::StoreRelease {
                    size,
                    base,
                    off,
                    src: Reg::R5,
                });
            }
        }
        for op in AtomicOp::ALL {
            for size in [Size::W, Size::DW] {
                insns.push(Insn::Atomic {
                    size,
                    op,
                    base: Reg::R10,
                    off: -16,
                    src: Reg::R2,
                });
            }
        }
        insns.push(Insn::Call { id: 5 });
        insns.push(Insn::Call { id: 999 });
        insns.push(Insn::CallX { reg: Reg::R2 });
        insns.push(Insn::CallLocal { off: 0 });
        insns.push(Insn::Exit);
        let p = Program::new(insns).unwrap();
        for checked in [true, false] {
            for lse in [true, false] {
                let c =
                    generate(&p, &Helpers::conformance(), &opts(checked, true, true, lse)).unwrap();
                let l = listing(&c.code[..c.plt + 8]);
                assert!(!l.iter().any(|s| s.starts_with("udf")), "placeholder left");
                let has = |m: &str| l.iter().any(|s| s.starts_with(m));
                assert_eq!(has("casal"), lse);
                assert_eq!(has("ldaxr"), !lse);
                assert!(has("ldar") && has("stlr") && has("sdiv") && has("msub"));
                assert_eq!(c.insn_offsets.len(), p.insns().len());
            }
        }
    }

    #[test]
    fn equality_with_zero_is_cbz_or_cbnz() {
        let p = crate::asm::assemble_program(
            "jeq %r1, 0, +1\njne32 %r2, 0, +1\njeq %r1, 1, +0\nmov %r0, 0\nexit",
        )
        .unwrap();
        let c = generate(&p, &Helpers::conformance(), &opts(false, true, true, true)).unwrap();
        let l = listing(&c.code[..c.plt]);
        let has = |m: &str| l.iter().any(|s| s.starts_with(m));
        assert!(has("cbz x0,") && has("cbnz w1,"), "{l:?}");
        // Only the compare with 1 remains.
        assert_eq!(
            l.iter().filter(|s| s.starts_with("cmp x0")).count(),
            1,
            "{l:?}"
        );
    }

    #[test]
    fn far_conditional_branches_fail_with_a_clear_error() {
        // 32 000 helper calls of 12 words each: 1.5 MiB of code, beyond `b.cond`'s ±1 MiB.
        let n = 32_000;
        let program = |first: Insn| {
            let mut insns = vec![first];
            insns.extend(std::iter::repeat_n(Insn::Call { id: 5 }, n));
            insns.push(Insn::Exit);
            Program::new(insns).unwrap()
        };
        let o = opts(false, true, true, true);
        let over = program(Insn::Jump {
            width: Width::W64,
            cond: JmpCond::Eq,
            dst: Reg::R1,
            src: Source::Imm(0),
            off: n as i16,
        });
        match generate(&over, &Helpers::conformance(), &o) {
            Err(JitError::InvalidInstruction { pc: 0, reason }) => {
                assert!(reason.contains("1 MiB"), "{reason}")
            }
            other => panic!("expected a range error, got {other:?}"),
        }
        // An unconditional `b` reaches ±128 MiB.
        let ja = program(Insn::Ja { off: n as i16 });
        let r = generate(&ja, &Helpers::conformance(), &o);
        assert!(r.is_ok(), "{:?}", r.err());
    }
}
