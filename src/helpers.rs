//! Helper functions programs call with `call ID`: a registry from id to a native function.
//!
//! Helpers use the C ABI so that JIT code can call them directly: eBPF r1–r5 become the five
//! arguments and the return value becomes r0.

use std::collections::BTreeMap;

/// A helper: `r0 = f(r1, r2, r3, r4, r5)`.
pub type HelperFn = extern "C" fn(u64, u64, u64, u64, u64) -> u64;

/// Helpers by id.
#[derive(Clone, Default, Debug)]
pub struct Helpers {
    by_id: BTreeMap<u32, HelperFn>,
}

/// The id the conformance suite expects to be the identity helper.
pub const CONFORMANCE_IDENTITY_ID: u32 = 5;

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
        self.by_id.insert(id, f);
        self
    }

    /// The helper for a runtime id (as in `callx`, where the id comes from a register).
    pub fn get(&self, id: u64) -> Option<HelperFn> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.by_id.get(&id).copied())
    }

    /// Every registered `(id, helper)` pair, in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, HelperFn)> + '_ {
        self.by_id.iter().map(|(id, f)| (*id, *f))
    }
}
