//! Program registry: which JIT image contains an address (the kernel's `bpf_address_lookup`).
//!
//! Used by the poker to refuse non-BPF text and to find a program's entry/PLT, and by diagnostics
//! to symbolise addresses. Ranges never overlap, so the image containing `addr` is the one with
//! the greatest start ≤ `addr`, found in O(log n) in a `BTreeMap`.
//!
//! Memory ordering: the `RwLock` makes `register` / `unregister` totally ordered with lookups. A
//! thread that learns an image's address through any release/acquire chain started after
//! `register` returned (e.g. the image being published) is guaranteed to find it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::TextError;

/// What a registered text range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// A JIT-compiled BPF program.
    Program,
    /// A trampoline image (fentry/fexit/fmod_ret).
    Trampoline,
    /// A PLT / veneer area (arm64 far branches).
    Plt,
    /// Anything else (dispatchers, test code).
    Other,
}

/// Result of [`Registry::lookup`]: the image containing an address and the address' offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Symbol {
    /// Start of the image (as registered).
    pub start: usize,
    /// Length of the image in bytes.
    pub len: usize,
    /// Kind of the image.
    pub kind: ImageKind,
    /// Caller-defined owner id (e.g. a program or trampoline id).
    pub owner: u64,
    /// `addr - start` of the looked-up address (0 from `unregister` and `symbols`).
    pub offset: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: usize,
    kind: ImageKind,
    owner: u64,
}

impl Entry {
    fn symbol(&self, start: usize, offset: usize) -> Symbol {
        Symbol {
            start,
            len: self.len,
            kind: self.kind,
            owner: self.owner,
            offset,
        }
    }
}

/// Address → image map, safe for concurrent lookups and updates.
#[derive(Debug, Default)]
pub struct Registry {
    /// start → entry; ranges `[start, start + len)` are disjoint and non-empty.
    map: RwLock<BTreeMap<usize, Entry>>,
    /// Addresses of the patch sites inside registered images (the only addresses a poke
    /// accepts). Taken after `map` when both are locked.
    sites: RwLock<BTreeSet<usize>>,
}

impl Registry {
    /// An empty registry.
    pub const fn new() -> Self {
        Self {
            map: RwLock::new(BTreeMap::new()),
            sites: RwLock::new(BTreeSet::new()),
        }
    }

    /// The process-wide registry.
    pub fn global() -> &'static Registry {
        static GLOBAL: Registry = Registry::new();
        &GLOBAL
    }

    /// Register `[start, start + len)`. Fails if the range is empty, wraps, or overlaps a
    /// registered one (the registry is left unchanged).
    ///
    /// # Safety
    /// For as long as it stays registered, the range must be code in the global
    /// [`super::CodeArena`] that the caller owns, of the stated `kind`: livebpf trusts these
    /// records when it patches code (a program's layout and PLT are found through them).
    pub unsafe fn register(
        &self,
        start: usize,
        len: usize,
        kind: ImageKind,
        owner: u64,
    ) -> Result<(), TextError> {
        let end = match start.checked_add(len) {
            Some(end) if len != 0 => end,
            _ => return Err(TextError::InvalidRange { start, len }),
        };
        let mut map = self.write();
        // Only two candidates can overlap: the last range starting at or before `start`, and the
        // first one starting after it.
        let before = map
            .range(..=start)
            .next_back()
            .filter(|(s, e)| *s + e.len > start);
        let after = map.range(start..end).next();
        if let Some((&s, e)) = before.or(after) {
            return Err(TextError::Overlap {
                start,
                len,
                existing_start: s,
                existing_len: e.len,
                existing_kind: e.kind,
            });
        }
        map.insert(start, Entry { len, kind, owner });
        Ok(())
    }

    /// Remove the image registered at exactly `start`, and its patch sites; returns what it
    /// was.
    pub fn unregister(&self, start: usize) -> Result<Symbol, TextError> {
        let mut map = self.write();
        let entry = map
            .remove(&start)
            .ok_or(TextError::NotRegistered { start })?;
        let mut sites = self.sites_write();
        let inside: Vec<usize> = sites.range(start..start + entry.len).copied().collect();
        for site in inside {
            sites.remove(&site);
        }
        if std::ptr::eq(self, Registry::global()) {
            // Pokes reach only the global registry's sites; the poker must not remember them
            // past their image.
            super::poke::forget_sites(start, start + entry.len);
        }
        Ok(entry.symbol(start, 0))
    }

    /// Records a patch site at `ip`, inside a registered image: an address `text_poke` may
    /// rewrite. Fails with [`TextError::NotRegistered`] when `ip` is in no registered image.
    ///
    /// # Safety
    /// The instruction at `ip` is a patch site of the image's owner — on x86-64 a 5-byte
    /// nop, call or jump; on arm64 one `nop`, `b` or `bl` word — that other threads may execute
    /// while it is rewritten, and whose every state (nop, or a branch a poke writes) is valid
    /// code for them.
    pub unsafe fn add_site(&self, ip: usize) -> Result<(), TextError> {
        let map = self.read();
        let inside = map
            .range(..=ip)
            .next_back()
            .is_some_and(|(&start, e)| ip - start < e.len);
        if !inside {
            return Err(TextError::NotRegistered { start: ip });
        }
        self.sites_write().insert(ip);
        Ok(())
    }

    /// Whether `ip` is a recorded patch site.
    pub fn is_site(&self, ip: usize) -> bool {
        self.sites
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&ip)
    }

    fn sites_write(&self) -> RwLockWriteGuard<'_, BTreeSet<usize>> {
        self.sites.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The image containing `addr`, with `addr`'s offset in it.
    pub fn lookup(&self, addr: usize) -> Option<Symbol> {
        let map = self.read();
        let (&start, entry) = map.range(..=addr).next_back()?;
        let offset = addr - start;
        (offset < entry.len).then(|| entry.symbol(start, offset))
    }

    /// Number of registered images.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no image is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// A snapshot of all registered images, ordered by start (for leak checks and dumps).
    pub fn symbols(&self) -> Vec<Symbol> {
        self.read().iter().map(|(&s, e)| e.symbol(s, 0)).collect()
    }

    /// Holds the registry's write lock until the guard drops (across `fork`, so the child never
    /// inherits it locked by a thread it does not have).
    pub(crate) fn hold(&'static self) -> RegistryHold {
        RegistryHold(self.write(), self.sites_write())
    }

    // Nothing panics while holding the lock, so a poisoned map is still consistent.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<usize, Entry>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<usize, Entry>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The registry held by [`Registry::hold`].
#[allow(dead_code)] // held for its locks
pub(crate) struct RegistryHold(
    RwLockWriteGuard<'static, BTreeMap<usize, Entry>>,
    RwLockWriteGuard<'static, BTreeSet<usize>>,
);
