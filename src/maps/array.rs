//! `BPF_MAP_TYPE_ARRAY`, `PERCPU_ARRAY` (the kernel's `arraymap.c`) and `PROG_ARRAY`.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use super::mem::{Deferred, copy_from_map, copy_to_map, round8};
use super::{BPF_ANY, BPF_NOEXIST, MapError, MapSpec, check_update_flags, current_cpu};
use crate::exec::tail::{TailCaller, TailCode, TailTarget};
use crate::reclaim::{ReadGuard, retire};
use crate::text::poke::{PokeError, PokeInsn};

/// Values of an array: `max_entries` slots of `round_up(value_size, 8)` bytes, zeroed at
/// creation, at fixed addresses for the map's life. Per-CPU arrays hold one such block per slot
/// (slot-major, each block padded to a cache line so slots do not share lines).
pub(crate) struct ArrayStore {
    base: NonNull<u8>,
    layout: Layout,
    max_entries: u32,
    value_size: usize,
    stride: usize,
    percpu: bool,
    ncpus: usize,
    cpu_stride: usize,
}

const CACHE_LINE: usize = 64;

impl ArrayStore {
    pub(crate) fn new(spec: &MapSpec, percpu: bool, ncpus: usize) -> Result<ArrayStore, MapError> {
        let stride = round8(spec.value_size as usize);
        let oom =
            MapError::NoMemory("the array does not fit in memory: use fewer or smaller entries");
        let block = stride.checked_mul(spec.max_entries as usize).ok_or(oom)?;
        let (cpu_stride, total) = if percpu {
            let padded = block.checked_next_multiple_of(CACHE_LINE).ok_or(oom)?;
            (padded, padded.checked_mul(ncpus).ok_or(oom)?)
        } else {
            (block, block)
        };
        let layout = Layout::from_size_align(total, CACHE_LINE).map_err(|_| oom)?;
        // SAFETY: total > 0 (max_entries and value_size are non-zero).
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(oom)?;
        Ok(ArrayStore {
            base,
            layout,
            max_entries: spec.max_entries,
            value_size: spec.value_size as usize,
            stride,
            percpu,
            ncpus,
            cpu_stride,
        })
    }

    #[inline]
    fn slot(&self, index: u32, cpu: usize) -> *mut u8 {
        debug_assert!(index < self.max_entries && cpu < self.ncpus.max(1));
        let cpu_off = if self.percpu {
            cpu * self.cpu_stride
        } else {
            0
        };
        // SAFETY: in bounds of the allocation (index < max_entries, cpu < ncpus).
        unsafe {
            self.base
                .as_ptr()
                .add(cpu_off + index as usize * self.stride)
        }
    }

    /// # Safety
    /// `key` points at 4 readable bytes.
    #[inline]
    pub(crate) unsafe fn lookup_ptr(&self, key: *const u8, cpu: Option<u32>) -> *mut u8 {
        // SAFETY: the caller's contract.
        let index = unsafe { (key as *const u32).read_unaligned() };
        if index >= self.max_entries {
            return std::ptr::null_mut();
        }
        let cpu = if self.percpu {
            cpu.unwrap_or_else(current_cpu) as usize
        } else {
            0
        };
        self.slot(index, cpu)
    }

    /// `array_map_update_elem` / `bpf_percpu_array_update`.
    ///
    /// # Safety
    /// `key` 4 readable bytes; `value` `value_size` bytes, or for `all_cpus` on a per-CPU array
    /// `ncpus * stride` bytes.
    pub(crate) unsafe fn update(
        &self,
        key: *const u8,
        value: *const u8,
        flags: u64,
        all_cpus: bool,
    ) -> Result<(), MapError> {
        check_update_flags(flags)?;
        // SAFETY: the caller's contract.
        let index = unsafe { (key as *const u32).read_unaligned() };
        if index >= self.max_entries {
            return Err(MapError::TooBig(
                "array index is not below max_entries: use a smaller index",
            ));
        }
        if flags == BPF_NOEXIST {
            // All array elements always exist.
            return Err(MapError::Exists(
                "array elements always exist: update with BPF_ANY or BPF_EXIST",
            ));
        }
        if self.percpu && all_cpus {
            for cpu in 0..self.ncpus {
                // SAFETY: the host buffer holds ncpus strides; the slot is in bounds.
                unsafe {
                    copy_to_map(
                        self.slot(index, cpu),
                        value.add(cpu * self.stride),
                        self.stride,
                    )
                };
            }
        } else {
            let cpu = if self.percpu {
                current_cpu() as usize
            } else {
                0
            };
            // SAFETY: value_size readable bytes; the slot holds stride >= value_size bytes.
            unsafe { copy_to_map(self.slot(index, cpu), value, self.value_size) };
        }
        Ok(())
    }

    /// The host lookup: the value, or every slot's value for a per-CPU array.
    ///
    /// # Safety
    /// `key` points at 4 readable bytes.
    pub(crate) unsafe fn copy_value(&self, key: *const u8) -> Option<Vec<u8>> {
        // SAFETY: the caller's contract.
        let index = unsafe { (key as *const u32).read_unaligned() };
        if index >= self.max_entries {
            return None;
        }
        if self.percpu {
            let mut out = vec![0u8; self.ncpus * self.stride];
            for cpu in 0..self.ncpus {
                // SAFETY: in bounds of both.
                unsafe {
                    copy_from_map(
                        out.as_mut_ptr().add(cpu * self.stride),
                        self.slot(index, cpu),
                        self.stride,
                    )
                };
            }
            Some(out)
        } else {
            let mut out = vec![0u8; self.value_size];
            // SAFETY: in bounds of both.
            unsafe { copy_from_map(out.as_mut_ptr(), self.slot(index, 0), self.value_size) };
            Some(out)
        }
    }
}

impl Drop for ArrayStore {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// `array_map_get_next_key`: 0 for no key or an index out of range, `None` after the last.
pub(crate) fn next_index(index: Option<u32>, max_entries: u32) -> Option<u32> {
    match index {
        None => Some(0),
        Some(i) if i >= max_entries => Some(0),
        Some(i) if i == max_entries - 1 => None,
        Some(i) => Some(i + 1),
    }
}

/// One slot of a program array: the target of `bpf_tail_call` through it.
///
/// Boxed and linked into the slot's `AtomicPtr`; an entry taken out (replaced or cleared) is
/// retired and dropped only after a grace period, so a run that loaded it may keep running its
/// target until the run ends ([`crate::exec::tail`]).
pub(crate) struct ProgEntry {
    pub(crate) target: TailTarget,
}

/// `BPF_MAP_TYPE_PROG_ARRAY`: `max_entries` slots, each null or a boxed [`ProgEntry`].
pub(crate) struct ProgArrayStore {
    slots: Box<[AtomicPtr<ProgEntry>]>,
    /// What the callers bound to the array need, and the direct tail-call sites patched through
    /// it; serialises the writers. Shared with the programs owning the sites, which remove them
    /// under the same lock before their image is freed.
    writers: Arc<Mutex<Writers>>,
}

/// The state every writer of a program array holds the lock of.
pub(crate) struct Writers {
    owner: TailCaller,
    sites: Vec<DirectSite>,
    /// The array is gone: its sites were turned into nops and no new ones may come.
    closed: bool,
}

/// A direct tail call site (x86-64): a 5-byte `nop` or `jmp` in a caller's image, pointing at the
/// tail entry of the target in slot `index` when that target serves the caller, else the nop.
struct DirectSite {
    ip: usize,
    index: u32,
    caller: TailCaller,
    /// The owning program's id ([`crate::jit::JitProgram::id`]).
    owner: u64,
    /// What the site jumps to, kept alive by the site (until a grace period after it stops
    /// jumping there).
    current: Option<TailTarget>,
}

impl DirectSite {
    /// What the site should jump to for `target` (the slot's target, if any).
    fn wanted(&self, target: Option<&TailTarget>) -> Option<TailTarget> {
        target.filter(|t| t.serves(self.caller)).cloned()
    }
}

fn site_insn(target: Option<&TailTarget>) -> PokeInsn {
    match target.and_then(TailTarget::jit_entry) {
        Some(entry) => PokeInsn::Jump(entry),
        None => PokeInsn::Nop,
    }
}

/// Rewrites `site` from its current target to `want`; the old target is retired (a thread that
/// jumped there before the poke may still run it until its run ends).
fn repoint(site: &mut DirectSite, want: Option<TailTarget>) -> Result<(), PokeError> {
    let (old, new) = (site_insn(site.current.as_ref()), site_insn(want.as_ref()));
    if old != new {
        poke_site(site.ip, old, new)?;
    }
    if let Some(old) = std::mem::replace(&mut site.current, want) {
        retire(Box::new(Deferred(old)));
    }
    Ok(())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn poke_site(ip: usize, old: PokeInsn, new: PokeInsn) -> Result<(), PokeError> {
    // SAFETY: `ip` is a direct tail-call site of a live image (its owner removes it under the
    // writers' lock, which we hold, before freeing the image); a `Jump` goes to the tail entry of
    // a target that `DirectSite::current` keeps alive until a grace period after the site stops
    // jumping there, and the target's mode serves the site's program.
    unsafe { crate::text::poke::text_poke(ip, old, new) }.map(|_| ())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn poke_site(ip: usize, _: PokeInsn, _: PokeInsn) -> Result<(), PokeError> {
    // No JIT here, so no site can exist.
    Err(PokeError::NotText { ip })
}

/// The direct tail-call sites one program patched through one program array; dropping it (before
/// the program's image is freed) removes them.
pub(crate) struct DirectSites {
    writers: Arc<Mutex<Writers>>,
    owner: u64,
}

impl std::fmt::Debug for DirectSites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectSites")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Drop for DirectSites {
    fn drop(&mut self) {
        let mut w = lock(&self.writers);
        w.sites.retain_mut(|s| {
            if s.owner != self.owner {
                return true;
            }
            // The image goes away with no thread in it: the site needs no poke, only its
            // target a grace period (a run that went through it may be a tail-call target's).
            if let Some(t) = s.current.take() {
                retire(Box::new(Deferred(t)));
            }
            false
        });
    }
}

fn lock(w: &Mutex<Writers>) -> std::sync::MutexGuard<'_, Writers> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProgArrayStore {
    pub(crate) fn new(max_entries: u32) -> Result<ProgArrayStore, MapError> {
        let mut v = Vec::new();
        v.try_reserve_exact(max_entries as usize).map_err(|_| {
            MapError::NoMemory("the program array does not fit in memory: use fewer entries")
        })?;
        v.extend((0..max_entries).map(|_| AtomicPtr::new(std::ptr::null_mut())));
        Ok(ProgArrayStore {
            slots: v.into_boxed_slice(),
            writers: Arc::new(Mutex::new(Writers {
                owner: TailCaller::default(),
                sites: Vec::new(),
                closed: false,
            })),
        })
    }

    fn writers(&self) -> std::sync::MutexGuard<'_, Writers> {
        lock(&self.writers)
    }

    fn slot(&self, index: u32) -> Result<&AtomicPtr<ProgEntry>, MapError> {
        self.slots.get(index as usize).ok_or(MapError::TooBig(
            "program array index is not below max_entries: use a smaller index",
        ))
    }

    fn retire_entry(old: *mut ProgEntry) {
        if !old.is_null() {
            // SAFETY: every non-null slot value came from Box::into_raw and was swapped out once.
            retire(Box::new(Deferred(unsafe { Box::from_raw(old) })));
        }
    }

    /// Points the direct sites of slot `index` at `target` (or their nop), all or none: on a
    /// failure the sites already repointed are set back (best effort) and the error returned.
    fn repoint_sites(
        w: &mut Writers,
        index: u32,
        target: Option<&TailTarget>,
    ) -> Result<(), MapError> {
        let mut done = Vec::new();
        for (i, site) in w.sites.iter_mut().enumerate() {
            if site.index != index {
                continue;
            }
            let previous = site.current.clone();
            let want = site.wanted(target);
            if let Err(e) = repoint(site, want) {
                for (j, previous) in done {
                    let site: &mut DirectSite = &mut w.sites[j];
                    let _ = repoint(site, previous);
                }
                return Err(MapError::Busy(patch_failure(&e)));
            }
            done.push((i, previous));
        }
        Ok(())
    }

    /// `bpf_fd_array_map_update_elem`: only `BPF_ANY`; a target the bound callers cannot run
    /// is refused, as the kernel refuses an incompatible program. The slot's direct tail-call
    /// sites jump to the new target (if it serves them) before the slot changes.
    pub(crate) fn set(&self, index: u32, target: TailTarget, flags: u64) -> Result<(), MapError> {
        if flags != BPF_ANY {
            return Err(MapError::Invalid(
                "program array slots are only updated with BPF_ANY",
            ));
        }
        let slot = self.slot(index)?;
        let mut w = self.writers();
        if !target.serves(w.owner) {
            return Err(incompatible(w.owner));
        }
        Self::repoint_sites(&mut w, index, Some(&target))?;
        let old = slot.swap(
            Box::into_raw(Box::new(ProgEntry { target })),
            Ordering::AcqRel,
        );
        drop(w);
        Self::retire_entry(old);
        Ok(())
    }
    /// Adds `caller`'s needs to what every target must meet; fails, changing nothing, if a
    /// current target does not.
    pub(crate) fn bind(&self, caller: TailCaller) -> Result<(), MapError> {
        let mut w = self.writers();
        let wanted = w.owner.and(caller);
        let _run = ReadGuard::new();
        for slot in self.slots.iter() {
            let p = slot.load(Ordering::Acquire);
            // SAFETY: writers are excluded by the lock, so a linked entry stays linked (and
            // alive) while we read it.
            if !p.is_null() && !unsafe { &(*p).target }.serves(wanted) {
                return Err(incompatible(wanted));
            }
        }
        w.owner = wanted;
        Ok(())
    }

    /// `fd_array_map_delete_elem`; the slot's direct sites become nops first.
    pub(crate) fn clear(&self, index: u32) -> Result<(), MapError> {
        let slot = self.slot(index)?;
        let mut w = self.writers();
        if slot.load(Ordering::Acquire).is_null() {
            return Err(MapError::NotFound(
                "the program array slot is already empty",
            ));
        }
        Self::repoint_sites(&mut w, index, None)?;
        let old = slot.swap(std::ptr::null_mut(), Ordering::AcqRel);
        drop(w);
        Self::retire_entry(old);
        Ok(())
    }

    /// Registers direct tail-call sites of a program being compiled (`owner` its id, `caller`
    /// its needs): for each `(ip, index)`, `write` puts the site's first instruction into the
    /// image — a jump to `Some(tail entry)` of the slot's target if it serves the caller, else
    /// the nop — before anything can run it. On an error nothing stays registered.
    // Only the x86-64 backend makes direct tail calls.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn attach_sites<E>(
        &self,
        sites: &[(usize, u32)],
        caller: TailCaller,
        owner: u64,
        mut write: impl FnMut(usize, Option<usize>) -> Result<(), E>,
    ) -> Result<DirectSites, E> {
        let mut w = self.writers();
        let handle = DirectSites {
            writers: self.writers.clone(),
            owner,
        };
        for &(ip, index) in sites {
            let mut site = DirectSite {
                ip,
                index,
                caller,
                owner,
                current: None,
            };
            if !w.closed {
                let p = self
                    .slots
                    .get(index as usize)
                    .map(|s| s.load(Ordering::Acquire));
                let p = p.filter(|p| !p.is_null());
                // SAFETY: writers are excluded by the lock, so a linked entry stays alive.
                site.current = site.wanted(p.map(|p| unsafe { &(*p).target }));
            }
            // The record first, so that an error below leaves it for `handle` to remove.
            let entry = site.current.as_ref().and_then(TailTarget::jit_entry);
            w.sites.push(site);
            if let Err(e) = write(ip, entry) {
                drop(w);
                drop(handle);
                return Err(e);
            }
        }
        Ok(handle)
    }

    /// How many direct tail-call sites are patched through this array.
    pub(crate) fn direct_sites(&self) -> usize {
        self.writers().sites.len()
    }

    pub(crate) fn max_entries(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The target in slot `index` (`None` when empty or out of range). It stays valid until the
    /// caller's run (read-side section) ends: a replaced entry is retired after a grace period.
    #[inline]
    pub(crate) fn load(&self, index: u32) -> Option<NonNull<TailCode>> {
        let p = self.slots.get(index as usize)?.load(Ordering::Acquire);
        // SAFETY: a linked entry is freed only a grace period after it is unlinked, and the
        // caller is in a run.
        (!p.is_null()).then(|| NonNull::from(&*unsafe { &(*p).target }.0))
    }

    pub(crate) fn get(&self, index: u32) -> Option<TailTarget> {
        let _run = ReadGuard::new();
        let p = self.slots.get(index as usize)?.load(Ordering::Acquire);
        // SAFETY: we are in a run, so a concurrently unlinked entry is not freed yet.
        (!p.is_null()).then(|| unsafe { (*p).target.clone() })
    }
}

fn incompatible(owner: TailCaller) -> MapError {
    MapError::IncompatibleProgram(
        match (
            owner.needs_checked(),
            owner.needs_trusted(),
            owner.needs_budget(),
        ) {
            (true, true, _) => {
                "both checked and trusted JIT programs tail-call through this array, and no \
                 target can serve both: use one mode for the programs sharing it"
            }
            (true, false, false) => {
                "the programs tail-calling through this array are checked JIT code: targets \
                 need checked JIT code (TailTarget::from_jit, Prog::tail_target)"
            }
            (true, false, true) => {
                "the programs tail-calling through this array are checked JIT code with a \
                 budget: targets need checked JIT code compiled with a budget"
            }
            (false, true, false) => {
                "the programs tail-calling through this array are trusted JIT code: targets \
                 need trusted JIT code (TailTarget::from_jit, Prog::tail_target)"
            }
            (false, true, true) => {
                "the programs tail-calling through this array are trusted JIT code with a \
                 budget: targets need trusted JIT code compiled with a budget"
            }
            // Never built: interpreter callers accept every target.
            (false, false, _) => "the target cannot serve the programs bound to this array",
        },
    )
}

/// What a failed site update reports.
fn patch_failure(e: &PokeError) -> &'static str {
    match e {
        PokeError::SigtrapBlocked { .. } => {
            "a direct tail-call site could not be repointed because a thread that runs JIT \
             code blocks SIGTRAP (see text_poke); nothing changed"
        }
        PokeError::TrapHandlerReplaced { .. } => {
            "a direct tail-call site could not be repointed because livebpf's SIGTRAP handler \
             was replaced (see text_poke); nothing changed"
        }
        _ => "a direct tail-call site could not be repointed (a text_poke error); nothing changed",
    }
}

impl Drop for ProgArrayStore {
    fn drop(&mut self) {
        // Programs may outlive the array: their direct sites become nops (falling through, as
        // for an empty slot). A site that cannot be poked keeps jumping to its target, which is
        // then never freed.
        let mut w = self.writers();
        w.closed = true;
        for mut site in std::mem::take(&mut w.sites) {
            if repoint(&mut site, None).is_err() {
                std::mem::forget(site.current.take());
            }
        }
        drop(w);
        for slot in self.slots.iter() {
            let p = slot.swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: came from Box::into_raw; the map is unreachable (dropped after a grace
                // period).
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}
