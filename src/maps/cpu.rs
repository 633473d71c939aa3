//! What a "CPU" is for per-CPU maps: a per-thread slot.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The number of per-CPU slots: `std::thread::available_parallelism()` at first use (at least
/// 1), fixed for the life of the process. Per-CPU maps hold one value per slot.
pub fn possible_cpus() -> u32 {
    static POSSIBLE: OnceLock<u32> = OnceLock::new();
    *POSSIBLE.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, u32::MAX as usize) as u32
    })
}

/// Threads currently holding each slot.
fn loads() -> &'static [AtomicU32] {
    static LOADS: OnceLock<Box<[AtomicU32]>> = OnceLock::new();
    LOADS.get_or_init(|| (0..possible_cpus()).map(|_| AtomicU32::new(0)).collect())
}

/// Serialises slot choice, so that two new threads never pick the same free slot.
static ASSIGN: Mutex<()> = Mutex::new(());

const UNASSIGNED: u32 = u32::MAX;

thread_local! {
    /// The slot (no destructor: readable even from other thread-locals' destructors).
    static SLOT: Cell<u32> = const { Cell::new(UNASSIGNED) };
    /// Gives the slot back when the thread exits.
    static HOLD: SlotHold = const { SlotHold(Cell::new(UNASSIGNED)) };
}

struct SlotHold(Cell<u32>);

impl Drop for SlotHold {
    fn drop(&mut self) {
        let slot = self.0.get();
        if slot != UNASSIGNED {
            loads()[slot as usize].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The calling thread's per-CPU slot (`bpf_get_smp_processor_id`), in `0..`[`possible_cpus`],
/// stable for the thread's life.
///
/// A new thread takes the slot held by the fewest live threads (the lowest such index), so while
/// at most `possible_cpus()` threads use per-CPU maps each has a slot of its own; more threads
/// share slots round-robin. Slots are given back when a thread exits.
///
/// **The consequence of sharing.** In the kernel a program's per-CPU value is touched only by
/// programs running on that CPU, one at a time except when one is preempted or interrupted (a
/// tracing program in NMI, a preemptible RT kernel). Two threads sharing a slot here run truly in
/// parallel on the same per-CPU value: a non-atomic read-modify-write (`*v += 1` compiled to
/// load, add, store) can lose updates, and a value wider than 8 bytes can be seen half written;
/// an 8-byte aligned word is never torn, and atomic instructions (`BPF_ATOMIC`, `lock xadd`) on
/// the value stay exact. Per-CPU hash elements are inserted and deleted under the bucket lock, so
/// the map's structure is never at risk, only the contents of a shared slot's value.
#[inline]
pub fn current_cpu() -> u32 {
    let slot = SLOT.try_with(Cell::get).unwrap_or(0);
    if slot != UNASSIGNED {
        return slot;
    }
    assign()
}

#[cold]
fn assign() -> u32 {
    let loads = loads();
    let slot = {
        let _serial = ASSIGN.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, _) = loads
            .iter()
            .enumerate()
            .min_by_key(|(i, n)| (n.load(Ordering::Relaxed), *i))
            .expect("at least one slot");
        loads[slot].fetch_add(1, Ordering::Relaxed);
        slot as u32
    };
    let _ = SLOT.try_with(|s| s.set(slot));
    // If the thread is already exiting the slot is simply never given back.
    let _ = HOLD.try_with(|h| h.0.set(slot));
    slot
}

/// The machine's possible CPUs as the kernel counts them (`num_possible_cpus()`): the CPUs
/// listed in `/sys/devices/system/cpu/possible`, as libbpf reads them, or [`possible_cpus`] when
/// that file is unreadable; never fewer than [`possible_cpus`]. Unlike [`possible_cpus`] it does
/// not shrink with the process's CPU affinity or quota. LRU maps size their per-CPU lists by it,
/// because the kernel's eviction batches depend on it (`lru` module docs).
pub(crate) fn kernel_possible_cpus() -> u32 {
    static KERNEL: OnceLock<u32> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| count_cpu_list(&s))
            .unwrap_or(0)
            .max(possible_cpus())
    })
}

/// The number of CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_like_the_kernel() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert!(kernel_possible_cpus() >= possible_cpus());
    }
}
