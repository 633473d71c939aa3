//! Tail calls: `bpf_tail_call(ctx, prog_array, index)` (helper [`TAIL_CALL_ID`]) on every engine.
//!
//! # Semantics (Linux's)
//! The call falls through — execution continues after it with every register unchanged, r0
//! included (the kernel's interpreter and JITs leave r0 alone; its verifier treats r0–r5 as
//! clobbered, so verified programs never read them) — when `index >= max_entries`, when this run
//! already made [`MAX_TAIL_CALL_CNT`] tail calls (so the 34th falls through; the count goes up
//! whenever the index is in range, also for an empty slot, as in Linux), when the slot is empty,
//! or when its target cannot run on the calling engine (below). Otherwise the current function's
//! frame is reused by the target: it starts at its first instruction with r1 = the call's r1
//! (the ctx argument), r0 and r2–r9 zero, r10 the current frame pointer (the frame's bytes are
//! not cleared), and what it returns is what the current function returns to its caller — a
//! tail call from a BPF-to-BPF callee returns to that callee's caller. The counter, the stack,
//! the regions, the grants and the budget are the run's, shared by every program the run tail
//! calls into.
//!
//! A map argument (r2) that is not one of the run's [`RunEnv::maps`](super::RunEnv::maps) ends a
//! checked run with [`ExecError::HelperFault`] (as for the map helpers), and so does a map that
//! is not a program array.
//!
//! # What a slot holds
//! A [`TailTarget`]: the target's [`Program`] and [`Helpers`], which the interpreter runs, and,
//! when it was made from JIT code ([`TailTarget::from_jit`], `From<&Prog>`), the address of
//! that code's *tail entry* (the first body instruction, after the prologue) with its mode. A
//! JIT caller jumps there directly; it needs a target compiled in its own mode — a run is
//! checked or trusted as a whole (what helpers' [`HelperContext::allows`] says, whether grants
//! are kept), so checked code never enters trusted code nor the reverse — and, if it counts a
//! budget, a target that counts too. A slot whose target does not meet that falls through
//! (the interpreter runs every target's program, so it has no such case). [`TailCaller`]
//! describes a caller's needs; binding it to a program array ([`Map::prog_array_bind`]) makes
//! [`Map::prog_array_set`] refuse incompatible targets up front, as the kernel refuses to put an
//! incompatible program into a program array.
//!
//! Like Linux, a tail call enters the target after its patch site: trampolines attached to the
//! target (fentry, freplace, …) do not run on that path.
//!
//! # Direct tail calls (x86-64)
//! With a [`DirectTailCall`] hint (map and index known at compile time), the call compiles to a
//! compare with the constants, the count, and a 5-byte patch site that jumps straight to the
//! target; the program array keeps every such site pointed at its slot ([`Map::prog_array_set`]
//! and [`Map::prog_array_clear`] poke them under the array's writer lock, before the slot itself
//! changes; a failed poke changes nothing and reports `EBUSY`). A site holds its own reference
//! to the target it jumps to, retired a grace period after the site stops jumping there — the
//! argument is the slot's: a thread that executed the old `jmp` did so inside a run that began
//! before the poke finished. A program's sites are removed before its image is freed; when the
//! array goes first, its sites become nops (a site that cannot be poked then keeps its target
//! forever rather than jump to freed code).
//!
//! [`Map::prog_array_clear`]: crate::maps::Map::prog_array_clear
//!
//! # Lifetime
//! An entry taken out of a slot (replaced or cleared) is retired through [`crate::reclaim`] and
//! dropped after a grace period. Every run that can reach a slot is a read-side section (JIT
//! runs always were; interpreter runs are too), so a run that loaded the old entry keeps its
//! target — program, helpers and JIT image — alive until it ends, however long it runs inside
//! it. The one exception is the one freplace has: a helper must not block through
//! [`crate::reclaim::blocking`] while a tail-called program is on its thread's stack (nothing
//! holds a reference for it).
//!
//! [`Map::prog_array_bind`]: crate::maps::Map::prog_array_bind
//! [`Map::prog_array_set`]: crate::maps::Map::prog_array_set

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{ExecError, HelperContext, MAX_TAIL_CALL_CNT};
use crate::helpers::{Helpers, TAIL_CALL_ID};
use crate::isa::Program;

/// A program that can be put into a program array slot.
#[derive(Clone)]
pub struct TailTarget(pub(crate) Arc<TailCode>);

impl std::fmt::Debug for TailTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("TailTarget");
        d.field("insns", &self.0.program.insns().len());
        match &self.0.jit {
            Some(j) => d
                .field("jit_entry", &format_args!("{:#x}", j.entry))
                .field("checked", &j.checked)
                .field("budget", &j.budget),
            None => d.field("jit_entry", &None::<usize>),
        };
        d.finish()
    }
}

/// What every engine needs to run a tail call's target.
pub(crate) struct TailCode {
    pub(crate) program: Arc<Program>,
    /// The program decoded for the interpreter.
    pub(crate) decoded: crate::interp::Decoded,
    pub(crate) helpers: Arc<Helpers>,
    pub(crate) jit: Option<JitTail>,
}

/// A target's JIT code.
pub(crate) struct JitTail {
    /// The tail entry's address.
    pub(crate) entry: usize,
    pub(crate) checked: bool,
    pub(crate) budget: bool,
    /// Keeps the image at `entry` alive.
    pub(crate) _owner: Arc<dyn Any + Send + Sync>,
}

impl TailCode {
    /// The address a JIT caller in the run of `ctx` jumps to, if the target's code may run
    /// there.
    pub(crate) fn jit_entry_for(&self, ctx: &HelperContext) -> Option<usize> {
        let caller = TailCaller::jit(ctx.is_checked(), ctx.budgeted());
        self.serves(caller)
            .then(|| self.jit.as_ref().map(|j| j.entry))?
    }

    fn serves(&self, c: TailCaller) -> bool {
        if !(c.checked || c.trusted) {
            return true;
        }
        self.jit.as_ref().is_some_and(|j| {
            (!c.checked || j.checked) && (!c.trusted || !j.checked) && (!c.budget || j.budget)
        })
    }
}

impl TailTarget {
    /// A target for interpreted callers only (a JIT caller falls through it): `program` run
    /// with `helpers`.
    pub fn interpreted(program: &Program, helpers: &Helpers) -> TailTarget {
        TailTarget(Arc::new(TailCode {
            decoded: crate::interp::Decoded::new(program),
            program: Arc::new(program.clone()),
            helpers: Arc::new(helpers.clone()),
            jit: None,
        }))
    }

    /// The target's program.
    pub fn program(&self) -> &Program {
        &self.0.program
    }

    /// Whether the target has JIT code (JIT callers can enter it).
    pub fn has_jit(&self) -> bool {
        self.0.jit.is_some()
    }

    /// Whether a caller with `caller`'s needs can run this target.
    pub fn serves(&self, caller: TailCaller) -> bool {
        self.0.serves(caller)
    }

    /// Address of the JIT code's tail entry, if any (for tests and dumps).
    pub fn jit_entry(&self) -> Option<usize> {
        self.0.jit.as_ref().map(|j| j.entry)
    }
}

/// A tail call whose map and index are known when the caller is compiled: the `call 12` at slot
/// `pc` has r2 = `map` and r3 = `index` (e.g. after `lddw r2, map; mov r3, index`), as a front
/// end finds them. [`JitProgram::compile_with`](crate::jit::JitProgram::compile_with) then
/// compiles it, on x86-64, to the kernel's *direct* tail call: a compare of r2 and r3 with the
/// constants, the count check, and a 5-byte patch site that the program array pokes to `jmp`
/// the slot's target (or back to the `nop`, falling through, when the slot empties or holds a
/// target this caller cannot run) whenever the slot changes — no lookup at run time. When r2 or
/// r3 differ at run time the code takes the ordinary path, so a wrong hint costs speed, never
/// correctness. arm64 (and an index beyond the array) always takes the ordinary path.
#[derive(Clone, Debug)]
pub struct DirectTailCall {
    /// Slot index of the `call 12`.
    pub pc: usize,
    /// The program array (r2 at the call).
    pub map: crate::maps::Map,
    /// The index (r3 at the call).
    pub index: u32,
}

/// What programs that make tail calls through one program array need from its targets (see the
/// module documentation): [`TailCaller::INTERPRETER`] needs nothing, JIT code needs JIT code of
/// its own mode ([`JitProgram::tail_caller`](crate::jit::JitProgram::tail_caller)); several
/// callers' needs combine with [`TailCaller::and`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TailCaller {
    checked: bool,
    trusted: bool,
    budget: bool,
}

impl TailCaller {
    /// The interpreter: it runs every target's program itself, so it needs nothing.
    pub const INTERPRETER: TailCaller = TailCaller {
        checked: false,
        trusted: false,
        budget: false,
    };

    /// JIT code compiled checked or trusted, with or without a budget.
    pub const fn jit(checked: bool, budget: bool) -> TailCaller {
        TailCaller {
            checked,
            trusted: !checked,
            budget,
        }
    }

    /// Callers with the needs of both (checked and trusted JIT callers together cannot be
    /// served by any target).
    pub const fn and(self, other: TailCaller) -> TailCaller {
        TailCaller {
            checked: self.checked || other.checked,
            trusted: self.trusted || other.trusted,
            budget: self.budget || other.budget,
        }
    }

    /// Whether targets need checked JIT code.
    pub const fn needs_checked(&self) -> bool {
        self.checked
    }

    /// Whether targets need trusted JIT code.
    pub const fn needs_trusted(&self) -> bool {
        self.trusted
    }

    /// Whether targets need JIT code that counts a budget.
    pub const fn needs_budget(&self) -> bool {
        self.budget
    }
}

/// The tail call of the run of `ctx` at slot `pc`: the target to continue in, `None` to fall
/// through, or the error that ends the run. Counts the call.
///
/// The target stays valid until the run ends (the caller is in a read-side section: the module
/// documentation's "Lifetime").
pub(crate) fn lookup(
    ctx: &mut HelperContext,
    pc: usize,
    map: u64,
    index: u32,
) -> Result<Option<NonNull<TailCode>>, ExecError> {
    ctx.set_call(pc, TAIL_CALL_ID);
    let calls = ctx.tail_calls;
    let fault = |reason: &'static str| ExecError::HelperFault {
        pc,
        helper: TAIL_CALL_ID,
        reason: reason.into(),
    };
    // SAFETY: a trusted run without a map list trusts its programs' helper arguments, as its
    // `JitOptions::trusted` creator vouched.
    let map = unsafe { ctx.map_arg(map) }
        .ok_or_else(|| fault("r2 is not one of the run's maps (RunEnv::maps)"))?;
    let array = map
        .prog_array()
        .ok_or_else(|| fault("r2 is not a program array"))?;
    if index >= array.max_entries() || calls >= MAX_TAIL_CALL_CNT {
        return Ok(None);
    }
    let target = array.load(index);
    ctx.tail_calls = calls + 1;
    Ok(target)
}
