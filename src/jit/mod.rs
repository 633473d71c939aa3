//! JIT compilation of eBPF programs to native code placed in the W^X code arena.
//!
//! [`JitProgram::compile`] turns a validated [`Program`] into machine code for the host
//! ([`x86_64`] or [`arm64`]), copies it into the global [`CodeArena`] and registers it in the
//! program [`Registry`] as a program image, so that a poker can later recognise its patch site (on
//! arm64 also its PLT, see [`crate::text::poke`]). [`generate`] produces the code for either
//! architecture on any host, without placing it (for dumps).
//! [`JitProgram::run`] follows the same contract as [`crate::interp::Interpreter::run`] and returns
//! exactly the interpreter's results and errors (budgets aside, see below).
//!
//! # Function ABI of a compiled program
//!
//! The image's entry ([`JitProgram::entry`]) is a function
//!
//! ```text
//! extern "sysv64" fn(r1: u64, r2: u64, r3: u64, r4: u64, r5: u64, ctx: *mut RunContext) -> u64
//! ```
//!
//! eBPF r1–r5 arrive in rdi, rsi, rdx, rcx, r8 — the System V argument registers, so a trampoline
//! can call a program (or, later, any traced function) with up to five arguments unchanged — and
//! r9 points at a per-run [`RunContext`] (a [`HelperContext`], see [`crate::exec::context`]): the
//! stack ([`crate::exec::TOTAL_STACK`] bytes, zeroed by the caller; r10 starts at its top), the
//! regions checked code may touch (the first one checked inline), the grants helpers made, the
//! run's maps and user pointer, and the slot where a failing run leaves its [`ExecError`]. The
//! return value is r0, meaningful only when the context holds no error. r0 and r6–r9 start at
//! zero, as in the interpreter.
//!
//! On arm64 the entry is `extern "C"` (AAPCS64): r1–r5 in x0–x4, the context in x5; see
//! [`arm64`] for its prologue (`[bti jc]; mov x9, x30; nop; [paciasp]; ...`) and PLT.
//!
//! # Helper calls and tail calls
//!
//! A helper is called with r1–r5 in the first five argument registers and the run's context as
//! the sixth (x86-64: r9, saved and restored around the call because it holds eBPF r10; arm64:
//! x5), whatever its kind ([`crate::helpers`]): a plain helper ignores it. After a call to a
//! context helper, or a `callx` (whose helper is only known at run time), the code tests the
//! context's failure flag and unwinds the run when the helper called
//! [`HelperContext::fail`]; plain helper calls test nothing. Before a context helper call the
//! code stores the call's slot index and helper id in the context ([`HelperContext::pc`]).
//!
//! `bpf_tail_call` ([`crate::exec::tail`]) asks the runtime function for the target (it checks
//! the map, the index and the count, and picks an entry this code may jump to); the code then
//! jumps to the target's *tail entry* ([`JitProgram::tail_entry`]: zero r0 and r2–r9, then its
//! first instruction). At an instruction boundary the native stack (x86-64) or sp and x30
//! (arm64) are exactly the current function's, so the target's `exit` returns to that
//! function's caller and its faults unwind through the same entry frame (every image has the
//! same prologue layout).
//!
//! # Memory safety modes
//!
//! * checked ([`JitOptions::checked`], the default): every load, store and atomic is checked like
//!   the interpreter does it. See [`x86_64`] for how.
//! * trusted ([`JitOptions::trusted`], `unsafe`): no checks at all, for speed; the caller vouches
//!   that the programs only touch memory they may and pass helpers valid arguments.
//!
//! A run's input is writable unless its context says otherwise ([`RunContext::init_raw`] with a
//! read-only [`MemRegion`], as trampolines give tracers their arguments): then checked code
//! refuses stores and atomics to it with [`ExecError::OutOfBounds`]. Trusted code checks nothing,
//! so the read-only guarantee needs checked mode.
//!
//! # Instruction budget
//!
//! [`JitOptions::with_budget`] (off by default) bounds how long a run may go: the code counts
//! every execution of a *back edge* (a jump, conditional or not, `ja32` included, whose target is
//! at or before the jump itself; counted whether or not a conditional one is taken) and of a
//! BPF-to-BPF call, against the budget kept in the [`RunContext`]. The event that would take it
//! below zero ends the run with [`ExecError::BudgetExhausted`] at that instruction — the
//! interpreter's error, but not its count: the interpreter counts every instruction, the JIT only
//! these events (straight-line code and calls to helpers cannot run forever, and counting only at
//! back edges and calls keeps the cost off the fast paths). Every counted event is an executed
//! instruction, so a program the interpreter finishes within a budget of N, the JIT finishes
//! within N too, and usually goes much further before failing. Without a budget the
//! generated code is exactly the code of a program compiled without one: no counting at all.

pub mod arm64;
pub mod x86_64;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

pub(crate) use crate::exec::context::{
    CTX_ARG2, CTX_BUDGET_LEFT, CTX_CALL_PC, CTX_FAILED, CTX_FP_LIMIT, CTX_HELPERS, CTX_MEM_START,
    CTX_STACK_BASE, CTX_STACK_LOW, CTX_TAIL_CALLS, ctx_bound, ctx_stack_bound,
};
use crate::exec::tail::{JitTail, TailCode};
use crate::exec::{Access, DirectTailCall, ExecError, MemRegion, RunEnv, TailCaller, TailTarget};
pub use crate::exec::{HelperContext, JitStack, RunContext};
use crate::helpers::{Helper, Helpers};
use crate::isa::{Insn, JmpCond, Program, Reg, Source, Width};
use crate::maps::DirectSites;
use crate::text::{Allocation, CodeArena, Registry, TextError};

/// Why a program could not be compiled.
#[derive(Debug, Error)]
pub enum JitError {
    /// The program has more slots than the error information in generated code can name.
    #[error(
        "the program has {slots} instruction slots; the JIT supports at most {max} (split it into smaller programs)"
    )]
    ProgramTooLarge {
        /// The program's length in slots.
        slots: usize,
        /// The largest length supported, in slots (2^24 − 1).
        max: usize,
    },
    /// The backend cannot generate code for an instruction (e.g. an arm64 branch out of range).
    #[error("instruction {pc} cannot be compiled: {reason}")]
    InvalidInstruction {
        /// Slot index of the instruction (0 when the problem concerns the whole image).
        pc: usize,
        /// What went wrong.
        reason: &'static str,
    },
    /// The x86-64 assembler rejected the generated code (a JIT bug).
    #[error("the generated code is inconsistent: {0} (a JIT bug; please report it)")]
    Assembler(#[from] x86_64::asm::AsmError),
    /// The code arena or the program registry could not place or register the image.
    #[error("cannot place the code: {0}")]
    Text(#[from] TextError),
    /// A direct tail call's site could not be written.
    #[error("a direct tail call site cannot be written: {0}")]
    Poke(#[from] crate::text::poke::PokeError),
    /// The backend's code cannot run on this host's architecture.
    #[error("the {backend} JIT cannot run on this {host} host")]
    UnsupportedHost {
        /// The backend, e.g. `"x86-64"`.
        backend: &'static str,
        /// The host architecture, as [`std::env::consts::ARCH`] names it.
        host: &'static str,
    },
}

/// How [`JitProgram::compile`] treats memory accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JitOptions {
    checked: bool,
    bti: bool,
    pac: bool,
    lse: Option<bool>,
    budget: Option<u64>,
}

impl Default for JitOptions {
    fn default() -> Self {
        JitOptions::checked()
    }
}

impl JitOptions {
    /// Every memory access is bounds checked (and atomics alignment checked), with the
    /// interpreter's errors.
    pub const fn checked() -> JitOptions {
        JitOptions {
            checked: true,
            bti: true,
            pac: true,
            lse: None,
            budget: None,
        }
    }

    /// No memory checks: out-of-bounds accesses really happen.
    ///
    /// # Safety
    /// Every program compiled with these options, on every run, may only access memory that is
    /// valid for that access (its input, its stack, or memory the embedder owns and hands it, e.g.
    /// through a helper), and its atomics must be naturally aligned. Helpers that trust their
    /// arguments in trusted runs must get valid ones: in particular, when the run lists no
    /// [`RunEnv::maps`], every map argument of the map helpers and of `bpf_tail_call` must be
    /// a live map's [`Map::as_raw`](crate::maps::Map::as_raw) address.
    pub const unsafe fn trusted() -> JitOptions {
        JitOptions {
            checked: false,
            bti: true,
            pac: true,
            lse: None,
            budget: None,
        }
    }

    /// Whether memory accesses are checked ([`JitOptions::checked`]) rather than trusted.
    pub const fn is_checked(&self) -> bool {
        self.checked
    }

    /// arm64: start programs with a `bti jc` landing pad (default on; forced on when the code
    /// arena maps text with `PROT_BTI`). Ignored by the x86-64 backend.
    pub const fn with_bti(mut self, bti: bool) -> JitOptions {
        self.bti = bti;
        self
    }

    /// arm64: sign the return address with `paciasp`/`autiasp` (default on). Ignored by the
    /// x86-64 backend.
    pub const fn with_pac(mut self, pac: bool) -> JitOptions {
        self.pac = pac;
        self
    }

    /// arm64: use LSE atomics (`true`) or exclusive-access loops (`false`); by default LSE when
    /// the CPU has it. LSE is never used on CPUs without it. Ignored by the x86-64 backend.
    pub const fn with_lse(mut self, lse: bool) -> JitOptions {
        self.lse = Some(lse);
        self
    }

    /// Ends a run with [`ExecError::BudgetExhausted`] once it has executed more than `budget`
    /// back edges and BPF-to-BPF calls (see the module documentation); `None` (the default)
    /// compiles no counting at all.
    pub const fn with_budget(mut self, budget: Option<u64>) -> JitOptions {
        self.budget = budget;
        self
    }

    /// The budget of back edges and calls per run, if any.
    pub const fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Whether arm64 code starts with a `bti jc` landing pad ([`JitOptions::with_bti`]).
    pub const fn bti(&self) -> bool {
        self.bti
    }

    /// Whether arm64 code signs its return address ([`JitOptions::with_pac`]).
    pub const fn pac(&self) -> bool {
        self.pac
    }

    /// The LSE choice of [`JitOptions::with_lse`], `None` when left to the CPU.
    pub const fn lse(&self) -> Option<bool> {
        self.lse
    }
}

/// Requests that generated code passes to [`runtime_call`]; `info` packs the request, the slot
/// index of the instruction and the access.
pub(crate) mod rt {
    use crate::exec::Access;

    /// Is this access allowed (slow path of the inline bounds check)? Returns 1 or fails.
    pub const BOUNDS: u32 = 0;
    /// Report a misaligned atomic. Always fails.
    pub const MISALIGNED: u32 = 1;
    /// Look up the helper whose id is `arg`; returns its address or fails.
    pub const HELPER: u32 = 2;
    /// Report a BPF-to-BPF call beyond the depth limit. Always fails.
    pub const CALL_DEPTH: u32 = 3;
    /// Report an exhausted instruction budget. Always fails.
    pub const BUDGET: u32 = 4;
    /// `bpf_tail_call` with the map in `arg` and the index in the context's `arg2`: returns the
    /// target's tail entry, 1 to fall through, or fails.
    pub const TAIL_CALL: u32 = 5;
    /// Extend the run's stack window down to `arg` (zeroing it), for a function being
    /// entered; returns 1.
    pub const STACK: u32 = 6;

    /// The highest slot index `info` can carry.
    pub const MAX_PC: usize = (1 << 24) - 1;

    /// Packs a request: bits 0–1 log2 of the access size, 2–3 the access, 4–7 the request, 8–31
    /// the slot index (at most [`MAX_PC`], checked before code generation).
    pub fn info(request: u32, pc: usize, size: usize, access: Access) -> u32 {
        let access = match access {
            Access::Load => 0,
            Access::Store => 1,
            Access::Atomic => 2,
        };
        ((pc & MAX_PC) as u32) << 8 | request << 4 | access << 2 | size.trailing_zeros() & 3
    }
}

/// The test of a loop that tests at its top, as a backward `ja` at its bottom re-runs it
/// ([`rotated_test`]).
pub(crate) struct LoopTest {
    /// The test's instruction index; the loop's body starts at the next one.
    pub index: usize,
    pub w64: bool,
    pub cond: JmpCond,
    pub dst: Reg,
    pub src: Source,
}

/// When instruction `i` is an unconditional backward jump to a conditional jump (a loop that
/// tests at its top), that test: both backends run it at `i` instead, inverted, back to the
/// loop's body, and leave where the test would have: one taken branch per iteration instead of
/// two, with the same outcome (no register changes in between).
pub(crate) fn rotated_test(program: &Program, i: usize) -> Option<LoopTest> {
    if !matches!(program.insns()[i], Insn::Ja { .. } | Insn::Ja32 { .. }) {
        return None;
    }
    let index = program.target_of(i).filter(|&t| t < i)?;
    match program.insns()[index] {
        Insn::Jump {
            width,
            cond,
            dst,
            src,
            ..
        } => Some(LoopTest {
            index,
            w64: width == Width::W64,
            cond,
            dst,
            src,
        }),
        _ => None,
    }
}

/// The (start, bound) context fields of the two regions a checked access outside the frame is
/// tested against — `addr - start < bound` (unsigned) for the stack window and the first region
/// — the likelier first: the stack when the base may derive from r10 (both backends).
pub(crate) fn region_order(
    program: &Program,
    pc: usize,
    size: usize,
    access: Access,
) -> [(i32, i32); 2] {
    let stack = (CTX_STACK_LOW, ctx_stack_bound(size));
    let input = (CTX_MEM_START, ctx_bound(size, access));
    let stack_first = program
        .insn_at(pc)
        .is_none_or(|i| program.may_address_stack(i));
    if stack_first {
        [stack, input]
    } else {
        [input, stack]
    }
}

/// The one Rust function generated code calls (through its register-saving thunk). Returns
/// non-zero to continue — 1, or a helper's address — or 0 after storing the run's error in the
/// context, and the code then unwinds to its entry frame and returns.
///
/// Never panics: unwinding out of an `extern` function would abort the process.
#[cfg(target_arch = "x86_64")]
pub(crate) extern "sysv64" fn runtime_call(
    ctx: *mut RunContext<'static>,
    arg: u64,
    info: u64,
) -> u64 {
    runtime_dispatch(ctx, arg, info)
}

/// [`runtime_call`] for arm64 code (AAPCS64).
#[cfg(target_arch = "aarch64")]
pub(crate) extern "C" fn runtime_call(ctx: *mut RunContext<'static>, arg: u64, info: u64) -> u64 {
    runtime_dispatch(ctx, arg, info)
}

/// The body of [`runtime_call`], shared by the per-ABI entry points.
fn runtime_dispatch(ctx: *mut RunContext<'static>, arg: u64, info: u64) -> u64 {
    // SAFETY: generated code passes the context pointer it was entered with, which its caller
    // keeps alive and unaliased (`&mut`) for the whole run; nothing else touches it meanwhile.
    let ctx = unsafe { (*ctx).state() };
    let pc = (info >> 8) as usize & rt::MAX_PC;
    let size = 1u64 << (info & 3);
    let access = match (info >> 2) & 3 {
        0 => Access::Load,
        1 => Access::Store,
        _ => Access::Atomic,
    };
    let error = match (info >> 4) as u32 & 0xf {
        rt::BOUNDS => {
            // The real check even in a trusted run: only checked code asks.
            if ctx.permits(arg, size, access) {
                return 1;
            }
            ExecError::OutOfBounds {
                pc,
                addr: arg,
                size,
                access,
            }
        }
        rt::MISALIGNED => ExecError::MisalignedAtomic {
            pc,
            addr: arg,
            size,
        },
        rt::HELPER => {
            // SAFETY: the calling image stored its own helpers, which it keeps alive.
            let helpers = unsafe { &*ctx.helpers_ptr() };
            match helpers.lookup(arg).and_then(Helper::address) {
                Some(f) => {
                    // Any helper may be a context helper: it may want the call's pc and id.
                    ctx.set_call(pc, arg as u32);
                    return f;
                }
                None => ExecError::UnknownHelper { pc, id: arg },
            }
        }
        rt::STACK => {
            ctx.reserve_stack(arg);
            return 1;
        }
        rt::BUDGET => ExecError::BudgetExhausted {
            pc,
            budget: ctx.budget(),
        },
        rt::TAIL_CALL => {
            let index = ctx.arg2() as u32;
            match crate::exec::tail::lookup(ctx, pc, arg, index) {
                // SAFETY: the entry stays valid until the run ends: the run is a read-side
                // section and replaced entries wait a grace period.
                Ok(Some(code)) => match unsafe { code.as_ref() }.jit_entry_for(ctx) {
                    Some(entry) => return entry as u64,
                    None => return 1,
                },
                Ok(None) => return 1,
                Err(e) => e,
            }
        }
        _ => ExecError::CallDepthExceeded { pc },
    };
    ctx.set_error(error);
    0
}

/// Rejects programs whose slot indices do not fit the error information generated code carries
/// (everything else a backend relies on, `Program::new` already guarantees).
pub(crate) fn check_size(program: &Program) -> Result<(), JitError> {
    let slots = program.slot_count();
    if slots > rt::MAX_PC {
        return Err(JitError::ProgramTooLarge {
            slots,
            max: rt::MAX_PC,
        });
    }
    Ok(())
}

/// The type of a compiled program's entry; see the module documentation.
#[cfg(target_arch = "x86_64")]
pub type JitFn = unsafe extern "sysv64" fn(u64, u64, u64, u64, u64, *mut RunContext<'_>) -> u64;
/// The type of a compiled program's entry; see the module documentation.
#[cfg(target_arch = "aarch64")]
pub type JitFn = unsafe extern "C" fn(u64, u64, u64, u64, u64, *mut RunContext<'_>) -> u64;

/// Address of [`runtime_call`], or why this host cannot run x86-64 code.
fn runtime_fn_addr() -> Result<u64, JitError> {
    #[cfg(target_arch = "x86_64")]
    return Ok(runtime_call as *const () as u64);
    #[cfg(not(target_arch = "x86_64"))]
    return Err(JitError::UnsupportedHost {
        backend: "x86-64",
        host: std::env::consts::ARCH,
    });
}

/// A target architecture of the JIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86-64 (AMD64); programs use the System V calling convention.
    X86_64,
    /// AArch64 (the A64 instruction set); programs use AAPCS64.
    Arm64,
}

impl Arch {
    /// The architecture of this host, if the JIT supports it.
    pub fn host() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Arm64)
        } else {
            None
        }
    }

    /// `x86-64` or `arm64`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86-64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// Addresses a program embeds that only exist on a host of its architecture (the runtime
/// function, the arm64 dummy trampoline) are this placeholder when [`generate`] targets
/// another architecture.
pub const FOREIGN_ADDRESS_PLACEHOLDER: u64 = 0;

/// Machine code generated for one architecture, not placed in the arena: for dumps
/// (`livebpf dump --jited --arch ...`) and size measurements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedCode {
    /// The architecture the code is for.
    pub arch: Arch,
    /// The image; the entry is offset 0.
    pub bytes: Vec<u8>,
    /// Byte offset of the patch site.
    pub patch_site: usize,
    /// Length of the patch site in bytes: 5 on x86-64 (a 5-byte `nop`), 4 on arm64 (one
    /// instruction).
    pub patch_site_len: usize,
    /// Byte offset of the instruction after the patch site.
    pub body: usize,
    /// Byte offset of the tail entry, where a tail call into the program continues.
    pub tail_entry: usize,
    /// arm64: the PLT (`ldr x10, #8; br x10; .quad target`), and the offset of its literal.
    pub plt: Option<(usize, usize)>,
    /// Byte offset of each eBPF instruction's code, by instruction index, when the backend
    /// reports it (arm64).
    pub insn_offsets: Option<Vec<usize>>,
}

/// Generates `program` for `arch` on any host, as [`JitProgram::compile`] would on a host of
/// that architecture; helper addresses are this process's. On another architecture, host-only
/// addresses are [`FOREIGN_ADDRESS_PLACEHOLDER`], and arm64 atomics are the portable
/// exclusive-access loops unless `opts` asks for LSE ([`JitOptions::with_lse`]).
pub fn generate(
    program: &Program,
    helpers: &Helpers,
    arch: Arch,
    opts: JitOptions,
) -> Result<GeneratedCode, JitError> {
    let native = Arch::host() == Some(arch);
    match arch {
        Arch::X86_64 => {
            let cg = x86_64::CodegenOptions {
                checked: opts.checked,
                budget: opts.budget.is_some(),
                runtime_fn: if native {
                    runtime_fn_addr()?
                } else {
                    FOREIGN_ADDRESS_PLACEHOLDER
                },
                helpers: helpers as *const Helpers as u64,
            };
            let code = x86_64::generate(program, helpers, &cg)?;
            Ok(GeneratedCode {
                arch,
                bytes: code.code,
                patch_site: x86_64::PATCH_SITE_OFFSET,
                patch_site_len: x86_64::PATCH_SITE_LEN,
                body: x86_64::BODY_OFFSET,
                tail_entry: code.tail_entry,
                plt: None,
                insn_offsets: None,
            })
        }
        Arch::Arm64 => {
            #[cfg(target_arch = "aarch64")]
            let (runtime_fn, plt_target, lse) = (
                runtime_call as *const () as u64,
                crate::text::poke::dummy_trampoline()? as u64,
                opts.lse.unwrap_or(true) && arm64::host_features().lse,
            );
            #[cfg(not(target_arch = "aarch64"))]
            let (runtime_fn, plt_target, lse) = (
                FOREIGN_ADDRESS_PLACEHOLDER,
                FOREIGN_ADDRESS_PLACEHOLDER,
                opts.lse.unwrap_or(false),
            );
            let code = arm64::generate(
                program,
                helpers,
                &arm64::Arm64Options {
                    checked: opts.checked,
                    budget: opts.budget.is_some(),
                    bti: opts.bti,
                    pac: opts.pac,
                    lse,
                    runtime_fn,
                    plt_target,
                    helpers: helpers as *const Helpers as u64,
                },
            )?;
            Ok(GeneratedCode {
                arch,
                patch_site: code.patch_site,
                patch_site_len: arm64::INSN_BYTES,
                body: code.body,
                tail_entry: code.tail_entry,
                plt: Some((code.plt, code.plt_literal)),
                insn_offsets: Some(code.insn_offsets),
                bytes: code.code,
            })
        }
    }
}

/// Owner ids for the registry, one per compiled program.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A compiled program in executable memory. Dropping it unregisters and frees the image.
#[derive(Debug)]
pub struct JitProgram {
    /// `None` only while dropping.
    image: Option<Allocation>,
    entry: usize,
    code: Vec<u8>,
    /// The program compiled, for tail calls from the interpreter ([`TailTarget`]).
    program: Arc<Program>,
    /// For `callx`, at a stable address the code embeds; static `call`s have their helper's
    /// address compiled in.
    helpers: Arc<Helpers>,
    /// The context every [`JitProgram::call`] starts from (it points at `helpers`).
    call_template: crate::exec::context::CallTemplate,
    checked: bool,
    budget: Option<u64>,
    /// The entry function's stack reach, which every run starts by reserving.
    entry_reach: crate::isa::StackReach,
    id: u64,
    patch_site: usize,
    body: usize,
    tail_entry: usize,
    /// Direct tail-call sites registered with program arrays; removed before the image is freed.
    direct: Vec<DirectSites>,
    /// Their addresses.
    direct_ips: Vec<usize>,
}

// The image is immutable machine code and the other fields are plain data; every run gets its own
// context and stack, so any number of threads may run a program at once.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<JitProgram>();
};

/// An image placed in the arena and registered, with its offsets.
struct Placed {
    image: Allocation,
    code: Vec<u8>,
    patch_site: usize,
    body: usize,
    tail_entry: usize,
    direct: Vec<DirectSites>,
    direct_ips: Vec<usize>,
}

/// A direct tail-call hint checked against the program: the instruction and its map.
// Only the x86-64 backend makes direct tail calls; arm64 checks the hints and ignores them.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Hint<'m> {
    insn: usize,
    map: &'m crate::maps::Map,
    index: u32,
}

/// The hints of `direct` that make direct tail calls: each must name a static call of the tail
/// call helper and a program array; one whose index is beyond the array is left to the
/// ordinary path (it always falls through).
fn check_hints<'m>(
    program: &Program,
    helpers: &Helpers,
    direct: &'m [DirectTailCall],
) -> Result<Vec<Hint<'m>>, JitError> {
    let mut hints: Vec<Hint<'m>> = Vec::new();
    for d in direct {
        let bad = |reason| JitError::InvalidInstruction { pc: d.pc, reason };
        let insn = program
            .insn_at(d.pc)
            .ok_or(bad("a direct tail call hint names no instruction"))?;
        let is_tail_call = match program.insns()[insn] {
            crate::isa::Insn::Call { id } => {
                matches!(helpers.lookup(id as u64), Some(Helper::TailCall))
            }
            _ => false,
        };
        if !is_tail_call {
            return Err(bad(
                "a direct tail call hint names an instruction that is not a tail call (call 12 with the tail call registered)",
            ));
        }
        let array = d.map.prog_array().ok_or(bad(
            "a direct tail call hint names a map that is not a program array",
        ))?;
        if hints.iter().any(|h| h.insn == insn) {
            return Err(bad("two direct tail call hints name the same instruction"));
        }
        if d.index < array.max_entries() {
            hints.push(Hint {
                insn,
                map: &d.map,
                index: d.index,
            });
        }
    }
    Ok(hints)
}

impl JitProgram {
    /// Compiles `program`; static `call`s bind to `helpers` now, `callx` looks ids up in them at
    /// run time.
    pub fn compile(
        program: &Program,
        helpers: &Helpers,
        opts: JitOptions,
    ) -> Result<JitProgram, JitError> {
        Self::compile_with(program, helpers, opts, &[])
    }

    /// [`JitProgram::compile`], with the tail calls of `direct` compiled as direct tail calls
    /// on x86-64 (see [`DirectTailCall`]; on arm64 the hints are checked and the calls take the
    /// ordinary path). The program arrays named keep the direct sites pointed at their slots'
    /// targets until this program is dropped. Each hint must name a static `call 12` (with the
    /// tail call registered in `helpers`) and a program array, else
    /// [`JitError::InvalidInstruction`].
    pub fn compile_with(
        program: &Program,
        helpers: &Helpers,
        opts: JitOptions,
        direct: &[DirectTailCall],
    ) -> Result<JitProgram, JitError> {
        let hints = check_hints(program, helpers, direct)?;
        let helpers = Arc::new(helpers.clone());
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        #[cfg(target_arch = "aarch64")]
        let placed = {
            let _ = hints;
            Self::place_arm64(program, &helpers, opts, id)?
        };
        #[cfg(not(target_arch = "aarch64"))]
        let placed = Self::place_x86_64(program, &helpers, opts, id, &hints)?;
        Ok(JitProgram {
            entry: placed.image.rx(),
            image: Some(placed.image),
            code: placed.code,
            program: Arc::new(program.clone()),
            // SAFETY: the template points at the helpers, which the program keeps alive (an
            // `Arc`, so they do not move with it).
            call_template: unsafe {
                crate::exec::context::CallTemplate::new(&helpers, opts.budget)
            },
            helpers,
            checked: opts.checked,
            budget: opts.budget,
            entry_reach: program.stack_reach(0),
            id,
            patch_site: placed.patch_site,
            body: placed.body,
            tail_entry: placed.tail_entry,
            direct: placed.direct,
            direct_ips: placed.direct_ips,
        })
    }

    #[cfg(target_arch = "aarch64")]
    fn place_arm64(
        program: &Program,
        helpers: &Arc<Helpers>,
        opts: JitOptions,
        id: u64,
    ) -> Result<Placed, JitError> {
        let placed = arm64::place(program, helpers, opts, id)?;
        Ok(Placed {
            image: placed.image,
            patch_site: placed.code.patch_site,
            body: placed.code.body,
            tail_entry: placed.code.tail_entry,
            code: placed.code.code,
            direct: Vec::new(),
            direct_ips: Vec::new(),
        })
    }

    #[cfg(not(target_arch = "aarch64"))]
    fn place_x86_64(
        program: &Program,
        helpers: &Arc<Helpers>,
        opts: JitOptions,
        id: u64,
        hints: &[Hint<'_>],
    ) -> Result<Placed, JitError> {
        let cg = x86_64::CodegenOptions {
            checked: opts.checked,
            budget: opts.budget.is_some(),
            runtime_fn: runtime_fn_addr()?,
            helpers: Arc::as_ptr(helpers) as u64,
        };
        let specs: Vec<x86_64::DirectSpec> = hints
            .iter()
            .map(|h| x86_64::DirectSpec {
                insn: h.insn,
                map: h.map.as_raw() as u64,
                index: h.index,
            })
            .collect();
        let generated = x86_64::generate_with(program, helpers, &cg, &specs)?;
        let code = generated.code;
        let arena = CodeArena::global()?;
        let image = arena.alloc(code.len(), x86_64::IMAGE_ALIGN)?;
        let registry = Registry::global();
        let caller = TailCaller::jit(opts.checked, opts.budget.is_some());
        let mut direct = Vec::new();
        let placed = arena
            .write(&image, 0, &code)
            .and_then(|()| {
                // SAFETY: the image is this program's code in the global arena, owned by the
                // JitProgram being built, which unregisters it before freeing it; its patch
                // sites are the generated 5-byte nops (the entry's and the direct tail calls').
                unsafe {
                    registry.register(
                        image.rx(),
                        image.len(),
                        crate::text::ImageKind::Program,
                        id,
                    )?;
                    registry.add_site(image.rx() + x86_64::PATCH_SITE_OFFSET)?;
                    for &offset in &generated.direct_sites {
                        registry.add_site(image.rx() + offset)?;
                    }
                }
                Ok(())
            })
            .map_err(JitError::from)
            .and_then(|()| {
                // Nothing runs the image yet: each site's first jump is written directly.
                for (h, &offset) in hints.iter().zip(&generated.direct_sites) {
                    let array = h.map.prog_array().expect("checked by check_hints");
                    let ip = image.rx() + offset;
                    let sites = array.attach_sites(&[(ip, h.index)], caller, id, |ip, entry| {
                        let insn = match entry {
                            Some(t) => crate::text::poke::PokeInsn::Jump(t),
                            None => crate::text::poke::PokeInsn::Nop,
                        };
                        let bytes = crate::text::poke::encode_x86(ip, insn)?;
                        arena.write(&image, offset, &bytes)?;
                        Ok::<(), JitError>(())
                    })?;
                    direct.push(sites);
                }
                Ok(())
            });
        if let Err(e) = placed {
            // Sites first (they name the image), then the image, never published.
            drop(direct);
            let _ = registry.unregister(image.rx());
            // SAFETY: the image was never published, so nothing can be running it.
            let _ = unsafe { arena.free(image) };
            return Err(e);
        }
        let direct_ips = generated
            .direct_sites
            .iter()
            .map(|o| image.rx() + o)
            .collect();
        Ok(Placed {
            image,
            code,
            patch_site: x86_64::PATCH_SITE_OFFSET,
            body: x86_64::BODY_OFFSET,
            tail_entry: generated.tail_entry,
            direct,
            direct_ips,
        })
    }

    /// Runs the program on `mem` (r1 = its address or 0 when empty, r2 = its length), as
    /// [`crate::interp::Interpreter::run`] does.
    pub fn run(&self, mem: &mut [u8]) -> Result<u64, ExecError> {
        // SAFETY: no extra regions, so the contract of `run_with_regions` holds trivially.
        unsafe { self.run_with_regions(mem, &[]) }
    }

    /// As [`JitProgram::run`], and the program may also access the `extra` regions.
    ///
    /// # Safety
    /// Each region must be valid for reads, and for writes if marked writable, for the whole
    /// run, and must not overlap memory Rust code holds references to (other than `mem`).
    pub unsafe fn run_with_regions(
        &self,
        mem: &mut [u8],
        extra: &[MemRegion],
    ) -> Result<u64, ExecError> {
        let mut stack = std::mem::MaybeUninit::<JitStack>::uninit();
        // SAFETY: forwarded from the caller; the stack is this run's own.
        unsafe { self.run_on(mem, stack.as_mut_ptr(), extra) }
    }

    /// As [`JitProgram::run`], with `stack` as the run's stack (whatever it holds: the run
    /// zeroes what it can reach): for callers that need to know where the run's stack lies
    /// (e.g. to recognise a result that points into it).
    pub fn run_with_stack(&self, mem: &mut [u8], stack: &mut JitStack) -> Result<u64, ExecError> {
        // SAFETY: no extra regions; the stack is borrowed exclusively.
        unsafe { self.run_on(mem, stack, &[]) }
    }

    /// Runs on `stack` (any contents).
    ///
    /// # Safety
    /// As for [`JitProgram::run_with_regions`], and `stack` as for
    /// [`RunContext::over_stack`] for the run.
    unsafe fn run_on(
        &self,
        mem: &mut [u8],
        stack: *mut JitStack,
        extra: &[MemRegion],
    ) -> Result<u64, ExecError> {
        // SAFETY: forwarded from the caller.
        let mut ctx =
            unsafe { RunContext::over_stack(mem, stack, extra, &self.helpers, self.budget) };
        let args = [ctx.mem_addr(), ctx.mem_len(), 0, 0, 0];
        self.execute(args, &mut ctx)
    }

    /// Runs the program in `env`: r1..r5 = `env.args`, the stack `stack` (whatever it holds:
    /// the run zeroes what it can reach), the regions, user pointer and maps of `env` (see
    /// [`RunEnv`]).
    ///
    /// # Safety
    /// Every region of `env` is valid for reads, and for writes if marked writable, for the
    /// whole run, and not aliased by Rust references meanwhile; every map of `env.maps` is
    /// alive for the whole run; `env.user` is valid for whatever the registered context helpers
    /// do with it.
    pub unsafe fn run_env(&self, env: &RunEnv<'_>, stack: &mut JitStack) -> Result<u64, ExecError> {
        // SAFETY: forwarded from the caller; the stack is borrowed exclusively.
        unsafe { self.run_env_on(env, stack) }
    }

    /// [`JitProgram::run_env`] on a stack given by address (any contents, maybe uninitialised).
    ///
    /// # Safety
    /// As for `run_env`, and `stack` as for [`RunContext::over_stack`] for the run.
    pub(crate) unsafe fn run_env_on(
        &self,
        env: &RunEnv<'_>,
        stack: *mut JitStack,
    ) -> Result<u64, ExecError> {
        let extra = env.regions.get(1..).unwrap_or(&[]);
        // SAFETY: forwarded from the caller.
        let mut ctx =
            unsafe { RunContext::from_env(env, extra, stack, &self.helpers, self.budget) };
        self.execute(env.args, &mut ctx)
    }

    /// Runs the program with `args` in r1..r5 and no input memory (a traced function's
    /// arguments; in checked mode the program can only dereference its stack).
    pub fn call(&self, args: [u64; 5]) -> Result<u64, ExecError> {
        let mut stack = std::mem::MaybeUninit::<JitStack>::uninit();
        let mut ctx = std::mem::MaybeUninit::<RunContext<'static>>::uninit();
        // SAFETY: both are this run's own, in this frame; the template's helpers are `self`'s.
        unsafe {
            self.call_template
                .start(ctx.as_mut_ptr(), stack.as_mut_ptr())
        };
        // SAFETY: initialised just above.
        let result = self.execute(args, unsafe { ctx.assume_init_mut() });
        // SAFETY: initialised, no code runs with it any more, dropped once (a `MaybeUninit`
        // never drops on its own; if `execute` panicked it would only leak).
        unsafe { ctx.assume_init_drop() };
        result
    }

    /// Calls the image with `args` and `ctx`, inside a read-side section: while a thread runs JIT
    /// code it may fetch a patch site, and retired trampoline images and program array entries
    /// wait for it ([`crate::reclaim`]).
    fn execute(&self, args: [u64; 5], ctx: &mut RunContext<'_>) -> Result<u64, ExecError> {
        let _online = crate::reclaim::ReadGuard::new();
        let state = ctx.state();
        state.set_checked(self.checked);
        state.enter_run(self.entry_reach);
        let [r1, r2, r3, r4, r5] = args;
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        let r0 = {
            // SAFETY: `entry` is the start of this program's image, generated for exactly the
            // `JitFn` ABI, and the image stays mapped while `self` is borrowed.
            let f: JitFn = unsafe { std::mem::transmute::<usize, JitFn>(self.entry) };
            // SAFETY: the context is fully initialised for this run and outlives the call.
            // Checked code only touches the regions, the stack and what helpers grant, all of
            // which the caller vouched for; trusted code was vouched for by whoever created its
            // `JitOptions::trusted`.
            unsafe { f(r1, r2, r3, r4, r5, ctx) }
        };
        // Unreachable in practice: `compile` fails on other hosts, so no `JitProgram` exists.
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let r0 = {
            let _ = (r1, r2, r3, r4, r5);
            ctx.state().set_error(ExecError::EngineUnavailable {
                engine: "jit",
                reason: format!("x86-64 code cannot run on {}", std::env::consts::ARCH),
            });
            0
        };
        match ctx.take_error() {
            Some(e) => Err(e),
            None => Ok(r0),
        }
    }

    /// Address of the entry, which is the patch site (RX view, 8-byte aligned).
    pub fn entry(&self) -> usize {
        self.entry
    }

    /// Address of the tail entry, where a tail call into this program continues (its first
    /// instruction, after the prologue; see [`crate::exec::tail`]).
    pub fn tail_entry(&self) -> usize {
        self.entry + self.tail_entry
    }

    /// Addresses of the direct tail-call sites ([`JitProgram::compile_with`]), in the order of
    /// the hints that made one (for tests and dumps).
    pub fn direct_tail_call_sites(&self) -> &[usize] {
        &self.direct_ips
    }

    /// The machine code as generated (the patch site holds its original nop here).
    pub fn code(&self) -> &[u8] {
        &self.code
    }

    /// The program this was compiled from.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The helpers the program was compiled with.
    pub fn helpers(&self) -> &Helpers {
        &self.helpers
    }

    /// The program's prologue patch site, where trampolines and replacements are attached.
    pub fn patch_site(&self) -> crate::text::poke::PatchSite {
        crate::text::poke::PatchSite::recorded(self.entry + self.patch_site)
    }

    /// Offset of the patch site from [`JitProgram::entry`].
    pub fn patch_site_offset(&self) -> usize {
        self.patch_site
    }

    /// Offset of the instruction after the patch site, where a trampoline calls the body.
    pub fn body_offset(&self) -> usize {
        self.body
    }

    /// Whether memory accesses are checked.
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// The budget of back edges and calls each run gets, if it was compiled with one.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// The owner id the image is registered under in [`Registry::global`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What this program needs from tail-call targets ([`crate::maps::Map::prog_array_bind`]).
    pub fn tail_caller(&self) -> TailCaller {
        TailCaller::jit(self.checked, self.budget.is_some())
    }

    /// A program array target for this program, from its parts (see
    /// [`TailTarget::from_jit`]); `owner` keeps the image alive.
    pub(crate) fn tail_target(&self, owner: Arc<dyn Any + Send + Sync>) -> TailTarget {
        TailTarget(Arc::new(TailCode {
            decoded: crate::interp::Decoded::new(&self.program),
            program: self.program.clone(),
            helpers: self.helpers.clone(),
            jit: Some(JitTail {
                entry: self.tail_entry(),
                checked: self.checked,
                budget: self.budget.is_some(),
                _owner: owner,
            }),
        }))
    }
}

impl TailTarget {
    /// A target for every engine: `jit`'s code for JIT callers, its program and helpers for the
    /// interpreter.
    pub fn from_jit(jit: Arc<JitProgram>) -> TailTarget {
        let owner: Arc<dyn Any + Send + Sync> = jit.clone();
        jit.tail_target(owner)
    }
}

impl Drop for JitProgram {
    fn drop(&mut self) {
        let Some(image) = self.image.take() else {
            return;
        };
        // The program arrays must stop poking the image before it is freed.
        self.direct.clear();
        // Unregister first so the poker cannot find text that is about to be freed.
        #[cfg(target_arch = "aarch64")]
        crate::text::poke::unregister_program_site(image.rx());
        let _ = Registry::global().unregister(image.rx());
        if let Ok(arena) = CodeArena::global() {
            // SAFETY: runs borrow `self`, so none is in progress and none can start. Anyone who
            // copied `entry()` and jumps there after the drop broke that function's contract.
            let _ = unsafe { arena.free(image) };
        }
    }
}
