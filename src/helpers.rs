//! Helper functions programs call with `call ID`: a registry from id to a native function.
//!
//! Helpers use the C ABI so that JIT code can call them directly: eBPF r1–r5 become the first
//! five arguments and the return value becomes r0. Every engine passes the run's
//! [`HelperContext`] as a sixth argument on every helper call (x86-64: r9, arm64: x5), so the
//! same call sequence serves both kinds:
//!
//! * [`HelperFn`] ([`Helpers::register`]) ignores it: a plain function of r1–r5;
//! * [`ContextHelperFn`] ([`Helpers::register_with_context`]) uses it: to see the run's user
//!   pointer, check its pointer arguments ([`HelperContext::check`]), grant the program memory
//!   it returns ([`HelperContext::grant`]) or end the run with an error
//!   ([`HelperContext::fail`]). Engines test for a failure after every context helper call (and
//!   after `callx`, which can reach either kind); plain helper calls cost nothing extra.
//!
//! Id [`TAIL_CALL_ID`] may be registered as the built-in tail call ([`Helpers::register_tail_call`]):
//! a static `call 12` then is `bpf_tail_call`, which the engines implement themselves.

use std::collections::BTreeMap;

use crate::exec::HelperContext;

/// A plain helper: `r0 = f(r1, r2, r3, r4, r5)`.
pub type HelperFn = extern "C" fn(u64, u64, u64, u64, u64) -> u64;

/// A helper that sees its run: `r0 = f(r1, r2, r3, r4, r5, ctx)`.
///
/// An `unsafe fn` because its body may dereference `ctx`: engines call it only with `ctx`
/// pointing at the calling run's context, valid — and referenced by nothing else — for the
/// duration of the call, so the helper may turn it into a `&mut HelperContext` for that long
/// (`unsafe { &mut *ctx }`); it must not keep the pointer. Calling one yourself requires the
/// same.
pub type ContextHelperFn = unsafe extern "C" fn(u64, u64, u64, u64, u64, *mut HelperContext) -> u64;

/// What a helper id is bound to.
#[derive(Clone, Copy, Debug)]
pub enum Helper {
    /// A function of r1–r5.
    Plain(HelperFn),
    /// A function of r1–r5 and the run's context.
    Context(ContextHelperFn),
    /// `bpf_tail_call`, performed by the engine (static `call` only: a `callx` reaching it fails
    /// with [`crate::exec::ExecError::UnknownHelper`], as only static calls can be tail calls in
    /// Linux).
    TailCall,
}

impl Helper {
    /// The address generated code calls, `None` for the tail call (no function).
    pub fn address(self) -> Option<u64> {
        match self {
            Helper::Plain(f) => Some(f as usize as u64),
            Helper::Context(f) => Some(f as usize as u64),
            Helper::TailCall => None,
        }
    }
}

/// Helpers by id.
#[derive(Clone, Default, Debug)]
pub struct Helpers {
    by_id: BTreeMap<u32, Helper>,
}

/// The id the conformance suite expects to be the identity helper.
pub const CONFORMANCE_IDENTITY_ID: u32 = 5;

/// `BPF_FUNC_tail_call`: `long bpf_tail_call(void *ctx, struct bpf_map *prog_array_map, u32
/// index)`.
pub const TAIL_CALL_ID: u32 = 12;

extern "C" fn identity(r1: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    r1
}

impl Helpers {
    /// An empty registry.
    pub fn new() -> Helpers {
        Helpers::default()
    }

    /// The helpers the conformance suite needs: id 5 returns r1 unchanged.
    pub fn conformance() -> Helpers {
        let mut h = Helpers::new();
        h.register(CONFORMANCE_IDENTITY_ID, identity);
        h
    }

    /// Registers `f` under `id`, replacing any earlier helper with that id.
    pub fn register(&mut self, id: u32, f: HelperFn) -> &mut Helpers {
        self.by_id.insert(id, Helper::Plain(f));
        self
    }

    /// Registers the context helper `f` under `id`, replacing any earlier helper with that id.
    pub fn register_with_context(&mut self, id: u32, f: ContextHelperFn) -> &mut Helpers {
        self.by_id.insert(id, Helper::Context(f));
        self
    }

    /// Makes id [`TAIL_CALL_ID`] the engines' `bpf_tail_call` (see [`crate::exec::tail`]).
    pub fn register_tail_call(&mut self) -> &mut Helpers {
        self.by_id.insert(TAIL_CALL_ID, Helper::TailCall);
        self
    }

    /// What `id` is bound to, for a runtime id (as in `callx`, where it comes from a register).
    pub fn lookup(&self, id: u64) -> Option<Helper> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.by_id.get(&id).copied())
    }

    /// Whether `id` is bound to anything.
    pub fn contains(&self, id: u64) -> bool {
        self.lookup(id).is_some()
    }

    /// The plain helper registered under `id` (`None` for a context helper or the tail call;
    /// see [`Helpers::lookup`]).
    pub fn get(&self, id: u64) -> Option<HelperFn> {
        match self.lookup(id)? {
            Helper::Plain(f) => Some(f),
            _ => None,
        }
    }

    /// Every registered `(id, helper)` pair, in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, Helper)> + '_ {
        self.by_id.iter().map(|(id, f)| (*id, *f))
    }
}
