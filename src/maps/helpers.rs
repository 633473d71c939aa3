//! The kernel's map helpers as [`HelperFn`]s, under their kernel ids: r1 is a map address from
//! [`Map::as_raw`](super::Map::as_raw) (what the loader puts in a program's `lddw`), pointers are
//! host addresses, and r0 is what the kernel helper returns.
//!
//! These trust their arguments exactly as the kernel trusts a verified program: a wrong map
//! address or key pointer is undefined behaviour. They must run inside a JIT run (lookups return
//! pointers that are valid until the run ends).

use super::{RawMap, current_cpu, ringbuf_discard, ringbuf_submit};
use crate::helpers::{HelperFn, Helpers};

/// `BPF_FUNC_map_lookup_elem`.
pub const MAP_LOOKUP_ELEM: u32 = 1;
/// `BPF_FUNC_map_update_elem`.
pub const MAP_UPDATE_ELEM: u32 = 2;
/// `BPF_FUNC_map_delete_elem`.
pub const MAP_DELETE_ELEM: u32 = 3;
/// `BPF_FUNC_get_smp_processor_id`.
pub const GET_SMP_PROCESSOR_ID: u32 = 8;
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

/// # Safety
/// `map` is a live map's `as_raw` address.
#[inline]
unsafe fn map<'a>(r1: u64) -> &'a RawMap {
    // SAFETY: the caller's contract.
    unsafe { &*(r1 as *const RawMap) }
}

/// `void *bpf_map_lookup_elem(map, key)`.
pub extern "C" fn map_lookup_elem(m: u64, key: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: the module's contract (a verified program's arguments, inside a run).
    unsafe { map(m).lookup_ptr(key as *const u8) as u64 }
}

/// `long bpf_map_update_elem(map, key, value, flags)`.
pub extern "C" fn map_update_elem(m: u64, key: u64, value: u64, flags: u64, _: u64) -> u64 {
    // SAFETY: the module's contract.
    unsafe { map(m).update_elem(key as *const u8, value as *const u8, flags) as u64 }
}

/// `long bpf_map_delete_elem(map, key)`.
pub extern "C" fn map_delete_elem(m: u64, key: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: the module's contract.
    unsafe { map(m).delete_elem(key as *const u8) as u64 }
}

/// `void *bpf_map_lookup_percpu_elem(map, key, cpu)`.
pub extern "C" fn map_lookup_percpu_elem(m: u64, key: u64, cpu: u64, _: u64, _: u64) -> u64 {
    let Ok(cpu) = u32::try_from(cpu) else {
        return 0;
    };
    // SAFETY: the module's contract.
    unsafe { map(m).lookup_percpu_ptr(key as *const u8, cpu) as u64 }
}

/// `u32 bpf_get_smp_processor_id(void)`: [`current_cpu`].
pub extern "C" fn get_smp_processor_id(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    current_cpu() as u64
}

/// `long bpf_ringbuf_output(ringbuf, data, size, flags)`.
pub extern "C" fn ringbuf_output(m: u64, data: u64, size: u64, flags: u64, _: u64) -> u64 {
    // SAFETY: the module's contract.
    unsafe { map(m).ringbuf_output(data as *const u8, size, flags) as u64 }
}

/// `void *bpf_ringbuf_reserve(ringbuf, size, flags)`.
pub extern "C" fn ringbuf_reserve(m: u64, size: u64, flags: u64, _: u64, _: u64) -> u64 {
    // SAFETY: the module's contract.
    unsafe { map(m).ringbuf_reserve(size, flags) as u64 }
}

/// `void bpf_ringbuf_submit(data, flags)`.
pub extern "C" fn ringbuf_submit_helper(data: u64, flags: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: the module's contract (the verifier's rule: a reserved, uncommitted record).
    unsafe { ringbuf_submit(data as *mut u8, flags) };
    0
}

/// `void bpf_ringbuf_discard(data, flags)`.
pub extern "C" fn ringbuf_discard_helper(data: u64, flags: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: as above.
    unsafe { ringbuf_discard(data as *mut u8, flags) };
    0
}

/// `u64 bpf_ringbuf_query(ringbuf, flags)`.
pub extern "C" fn ringbuf_query(m: u64, flags: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: the module's contract.
    unsafe { map(m).ringbuf_query(flags) }
}

/// Every helper of this module with its kernel id.
pub const ALL: [(u32, HelperFn); 10] = [
    (MAP_LOOKUP_ELEM, map_lookup_elem),
    (MAP_UPDATE_ELEM, map_update_elem),
    (MAP_DELETE_ELEM, map_delete_elem),
    (GET_SMP_PROCESSOR_ID, get_smp_processor_id),
    (RINGBUF_OUTPUT, ringbuf_output),
    (RINGBUF_RESERVE, ringbuf_reserve),
    (RINGBUF_SUBMIT, ringbuf_submit_helper),
    (RINGBUF_DISCARD, ringbuf_discard_helper),
    (RINGBUF_QUERY, ringbuf_query),
    (MAP_LOOKUP_PERCPU_ELEM, map_lookup_percpu_elem),
];

/// Registers every map helper under its kernel id.
pub fn register(helpers: &mut Helpers) -> &mut Helpers {
    for (id, f) in ALL {
        helpers.register(id, f);
    }
    helpers
}
