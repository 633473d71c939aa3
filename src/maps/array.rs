//! `BPF_MAP_TYPE_ARRAY`, `PERCPU_ARRAY` (the kernel's `arraymap.c`) and `PROG_ARRAY`.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, Ordering};

use super::mem::{Deferred, copy_from_map, copy_to_map, round8};
use super::{BPF_ANY, BPF_NOEXIST, MapError, MapSpec, check_update_flags, current_cpu};
use crate::exec::tail::{TailCaller, TailCode, TailTarget};
use crate::reclaim::{ReadGuard, retire};

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
    /// What the callers bound to the array need from targets; serialises the writers.
    owner: Mutex<TailCaller>,
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
            owner: Mutex::new(TailCaller::default()),
        })
    }

    fn owner(&self) -> std::sync::MutexGuard<'_, TailCaller> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner())
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

    /// `bpf_fd_array_map_update_elem`: only `BPF_ANY`; a target the bound callers cannot run
    /// is refused, as the kernel refuses an incompatible program.
    pub(crate) fn set(&self, index: u32, target: TailTarget, flags: u64) -> Result<(), MapError> {
        if flags != BPF_ANY {
            return Err(MapError::Invalid(
                "program array slots are only updated with BPF_ANY",
            ));
        }
        let slot = self.slot(index)?;
        let owner = self.owner();
        if !target.serves(*owner) {
            return Err(incompatible(*owner));
        }
        let old = slot.swap(
            Box::into_raw(Box::new(ProgEntry { target })),
            Ordering::AcqRel,
        );
        drop(owner);
        Self::retire_entry(old);
        Ok(())
    }

    /// Adds `caller`'s needs to what every target must meet; fails, changing nothing, if a
    /// current target does not.
    pub(crate) fn bind(&self, caller: TailCaller) -> Result<(), MapError> {
        let mut owner = self.owner();
        let wanted = owner.and(caller);
        let _run = ReadGuard::new();
        for slot in self.slots.iter() {
            let p = slot.load(Ordering::Acquire);
            // SAFETY: writers are excluded by `owner`, so a linked entry stays linked (and alive)
            // while we read it.
            if !p.is_null() && !unsafe { &(*p).target }.serves(wanted) {
                return Err(incompatible(wanted));
            }
        }
        *owner = wanted;
        Ok(())
    }

    /// `fd_array_map_delete_elem`.
    pub(crate) fn clear(&self, index: u32) -> Result<(), MapError> {
        let slot = self.slot(index)?;
        let owner = self.owner();
        let old = slot.swap(std::ptr::null_mut(), Ordering::AcqRel);
        drop(owner);
        if old.is_null() {
            return Err(MapError::NotFound(
                "the program array slot is already empty",
            ));
        }
        Self::retire_entry(old);
        Ok(())
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

impl Drop for ProgArrayStore {
    fn drop(&mut self) {
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
