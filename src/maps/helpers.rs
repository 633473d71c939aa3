//! The kernel's map helpers, under their kernel ids: r1 is a map address from
//! [`Map::as_raw`](super::Map::as_raw) (what the loader puts in a program's `lddw`), pointers are
//! host addresses, and r0 is what the kernel helper returns.
//!
//! They are [`ContextHelperFn`]s: in a checked run (the interpreter, checked JIT code) they check
//! what the kernel's verifier would have proved, and end the run with a typed error otherwise:
//! * the map argument must be one of the run's maps ([`RunEnv::maps`]), else
//!   [`ExecError::HelperFault`] — the hook is [`HelperContext::map_arg`];
//! * key, value and data pointers must be readable by the program for the map's key/value size
//!   ([`HelperContext::check`]), else [`ExecError::OutOfBounds`] at the call;
//! * a value pointer a lookup returns is granted to the rest of the run
//!   ([`HelperContext::grant`]: `value_size` bytes; per-CPU maps: the calling CPU's value, or
//!   the CPU asked for; read-only for a `BPF_F_RDONLY_PROG` map), as the value-pointer invariant
//!   keeps it valid that long; so is a reserved ring buffer record, until it is submitted or
//!   discarded (which accept only a record reserved in this run and not yet released).
//!
//! In a trusted run they trust their arguments exactly as the kernel trusts a verified program
//! (map addresses are checked against [`RunEnv::maps`] only when the run lists any), which is
//! part of what [`JitOptions::trusted`](crate::jit::JitOptions::trusted) makes its caller vouch
//! for. They must run inside a run (lookups return pointers that are valid until it ends).
//!
//! [`RunEnv::maps`]: crate::exec::RunEnv::maps
//! [`ExecError::HelperFault`]: crate::exec::ExecError::HelperFault
//! [`ExecError::OutOfBounds`]: crate::exec::ExecError::OutOfBounds

use super::{BPF_F_RDONLY_PROG, RawMap, current_cpu, ringbuf_discard, ringbuf_submit};
use crate::exec::{Access, HelperContext, MemRegion};
use crate::helpers::{ContextHelperFn, HelperFn, Helpers};

/// `BPF_FUNC_map_lookup_elem`.
pub const MAP_LOOKUP_ELEM: u32 = 1;
/// `BPF_FUNC_map_update_elem`.
pub const MAP_UPDATE_ELEM: u32 = 2;
/// `BPF_FUNC_map_delete_elem`.
pub const MAP_DELETE_ELEM: u32 = 3;
/// `BPF_FUNC_get_smp_processor_id`.
pub const GET_SMP_PROCESSOR_ID: u32 = 8;
/// `BPF_FUNC_tail_call`: the engines' built-in tail call ([`crate::exec::tail`]).
pub const TAIL_CALL: u32 = crate::helpers::TAIL_CALL_ID;
/// `BPF_FUNC_ringbuf_output`.
pub const RINGBUF_OUTPUT: u32 = 130;
/// `BPF_FUNC_ringbuf_reserve`.
pub const RINGBUF_RESERVE: u32 = 131;
/// `BPF_FUNC_ringbuf_submit`.
pub const RINGBUF_SUBMIT: u32 = 132;
/// `BPF_FUNC_ringbuf_discard`.
pub const RINGBUF_DISCARD: u32 = 133;
/// `BPF_FUNC_ringbuf_query`.
pub const RINGBUF_QUERY: u32 = 134;
/// `BPF_FUNC_map_lookup_percpu_elem`.
pub const MAP_LOOKUP_PERCPU_ELEM: u32 = 195;

/// The calling run's context.
///
/// # Safety
/// `ctx` is the sixth argument of a context helper call: valid and not referenced by anything
/// else for the duration of the call ([`ContextHelperFn`]).
#[inline]
unsafe fn context<'a>(ctx: *mut HelperContext) -> &'a mut HelperContext {
    // SAFETY: the caller's contract.
    unsafe { &mut *ctx }
}

/// The map argument `r`, or `None` after failing the run. The reference is not tied to `ctx`,
/// so that the helper can go on using the context.
///
/// # Safety
/// `'a` ends before the run does (a helper uses it during its call only).
unsafe fn map_arg<'a>(ctx: &mut HelperContext, r: u64) -> Option<&'a RawMap> {
    // SAFETY: a trusted run without a map list trusts its programs' helper arguments, as its
    // `JitOptions::trusted` creator vouched (the module's contract).
    let map = unsafe { ctx.map_arg(r) }.map(|m| m as *const RawMap);
    match map {
        // SAFETY: the run's maps stay alive until the run ends (`run_env`'s contract), and
        // `'a` ends before that (the caller's contract).
        Some(m) => Some(unsafe { &*m }),
        None => {
            ctx.fail_helper(format!(
                "r1 = {r:#x} is not one of the run's maps (RunEnv::maps)"
            ));
            None
        }
    }
}

/// The map and the key pointer of a call, both checked; `None` after failing the run.
///
/// # Safety
/// As for [`map_arg`].
unsafe fn map_and_key<'a>(ctx: &mut HelperContext, m: u64, key: u64) -> Option<&'a RawMap> {
    // SAFETY: the caller's contract.
    let map = unsafe { map_arg(ctx, m) }?;
    ctx.check(key, map.spec().key_size as u64, Access::Load)
        .then_some(map)
}

/// Grants the value at `p` (null: nothing) to the rest of the run; r0 for the lookup.
fn granted_value(ctx: &mut HelperContext, map: &RawMap, p: *mut u8) -> u64 {
    if p.is_null() {
        return 0;
    }
    let spec = map.spec();
    let writable = spec.flags & BPF_F_RDONLY_PROG == 0;
    if ctx.grant(MemRegion::new(p as u64, spec.value_size as u64, writable)) {
        p as u64
    } else {
        0
    }
}

/// `void *bpf_map_lookup_elem(map, key)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn map_lookup_elem(
    m: u64,
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: `map` is used during this call only.
    let Some(map) = (unsafe { map_and_key(ctx, m, key) }) else {
        return 0;
    };
    // SAFETY: the key is readable (checked, or vouched for in a trusted run) and we are in a run.
    let p = unsafe { map.lookup_ptr(key as *const u8) };
    granted_value(ctx, map, p)
}

/// `long bpf_map_update_elem(map, key, value, flags)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn map_update_elem(
    m: u64,
    key: u64,
    value: u64,
    flags: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: `map` is used during this call only.
    let Some(map) = (unsafe { map_and_key(ctx, m, key) }) else {
        return 0;
    };
    if !ctx.check(value, map.spec().value_size as u64, Access::Load) {
        return 0;
    }
    // SAFETY: key and value readable for their sizes (checked, or vouched for).
    unsafe { map.update_elem(key as *const u8, value as *const u8, flags) as u64 }
}

/// `long bpf_map_delete_elem(map, key)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn map_delete_elem(
    m: u64,
    key: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: `map` is used during this call only.
    let Some(map) = (unsafe { map_and_key(ctx, m, key) }) else {
        return 0;
    };
    // SAFETY: the key is readable (checked, or vouched for).
    unsafe { map.delete_elem(key as *const u8) as u64 }
}

/// `void *bpf_map_lookup_percpu_elem(map, key, cpu)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn map_lookup_percpu_elem(
    m: u64,
    key: u64,
    cpu: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: `map` is used during this call only.
    let Some(map) = (unsafe { map_and_key(ctx, m, key) }) else {
        return 0;
    };
    let Ok(cpu) = u32::try_from(cpu) else {
        return 0;
    };
    // SAFETY: the key is readable (checked, or vouched for) and we are in a run.
    let p = unsafe { map.lookup_percpu_ptr(key as *const u8, cpu) };
    granted_value(ctx, map, p)
}

/// `u32 bpf_get_smp_processor_id(void)`: [`current_cpu`].
pub extern "C" fn get_smp_processor_id(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    current_cpu() as u64
}

/// `long bpf_ringbuf_output(ringbuf, data, size, flags)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn ringbuf_output(
    m: u64,
    data: u64,
    size: u64,
    flags: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: `map` is used during this call only.
    let Some(map) = (unsafe { map_arg(ctx, m) }) else {
        return 0;
    };
    if !ctx.check(data, size, Access::Load) {
        return 0;
    }
    // SAFETY: `size` readable bytes at `data` (checked, or vouched for).
    unsafe { map.ringbuf_output(data as *const u8, size, flags) as u64 }
}

/// `void *bpf_ringbuf_reserve(ringbuf, size, flags)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn ringbuf_reserve(
    m: u64,
    size: u64,
    flags: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: `map` is used during this call only.
    let Some(map) = (unsafe { map_arg(ctx, m) }) else {
        return 0;
    };
    let record = map.ringbuf_reserve(size, flags);
    if record.is_null() {
        return 0;
    }
    if ctx.grant_record(MemRegion::new(record as u64, size, true)) {
        record as u64
    } else {
        // The run has failed; nobody will submit the record.
        // SAFETY: reserved just now, neither submitted nor discarded.
        unsafe { ringbuf_discard(record, 0) };
        0
    }
}

/// Whether `data` may be submitted or discarded: in a checked run, a record this run reserved
/// and has not released (it is released now); `false` after failing the run.
fn release_record(ctx: &mut HelperContext, data: u64) -> bool {
    if !ctx.is_checked() || ctx.release_record(data) {
        return true;
    }
    ctx.fail_helper(
        "r1 is not a ring buffer record this run reserved and has not yet submitted or \
         discarded",
    );
    false
}

/// `void bpf_ringbuf_submit(data, flags)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn ringbuf_submit_helper(
    data: u64,
    flags: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    if release_record(ctx, data) {
        // SAFETY: a reserved, uncommitted record (checked, or the verifier's rule vouched for).
        unsafe { ringbuf_submit(data as *mut u8, flags) };
    }
    0
}

/// `void bpf_ringbuf_discard(data, flags)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn ringbuf_discard_helper(
    data: u64,
    flags: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    if release_record(ctx, data) {
        // SAFETY: as for submit.
        unsafe { ringbuf_discard(data as *mut u8, flags) };
    }
    0
}

/// `u64 bpf_ringbuf_query(ringbuf, flags)`.
///
/// # Safety
/// A [`ContextHelperFn`]: `ctx` is the calling run\'s context.
pub unsafe extern "C" fn ringbuf_query(
    m: u64,
    flags: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the caller's contract (`ContextHelperFn`).
    let ctx = unsafe { context(ctx) };
    // SAFETY: the map is used during this call only.
    unsafe { map_arg(ctx, m) }.map_or(0, |map| map.ringbuf_query(flags))
}

/// The context helpers of this module with their kernel ids.
pub const CONTEXT: [(u32, ContextHelperFn); 9] = [
    (MAP_LOOKUP_ELEM, map_lookup_elem),
    (MAP_UPDATE_ELEM, map_update_elem),
    (MAP_DELETE_ELEM, map_delete_elem),
    (RINGBUF_OUTPUT, ringbuf_output),
    (RINGBUF_RESERVE, ringbuf_reserve),
    (RINGBUF_SUBMIT, ringbuf_submit_helper),
    (RINGBUF_DISCARD, ringbuf_discard_helper),
    (RINGBUF_QUERY, ringbuf_query),
    (MAP_LOOKUP_PERCPU_ELEM, map_lookup_percpu_elem),
];

/// The plain helpers of this module with their kernel ids.
pub const PLAIN: [(u32, HelperFn); 1] = [(GET_SMP_PROCESSOR_ID, get_smp_processor_id)];

/// Every helper id this module registers, the tail call included.
pub fn ids() -> impl Iterator<Item = u32> {
    CONTEXT
        .iter()
        .map(|(id, _)| *id)
        .chain(PLAIN.iter().map(|(id, _)| *id))
        .chain([TAIL_CALL])
}

/// Registers every map helper under its kernel id, and `bpf_tail_call`
/// ([`Helpers::register_tail_call`]).
pub fn register(helpers: &mut Helpers) -> &mut Helpers {
    for (id, f) in CONTEXT {
        helpers.register_with_context(id, f);
    }
    for (id, f) in PLAIN {
        helpers.register(id, f);
    }
    helpers.register_tail_call()
}
