//! The LRU of `LRU_HASH` and `LRU_PERCPU_HASH` maps: Linux's `bpf_lru_list` algorithm,
//! re-implemented so that a sequence of operations evicts exactly what the kernel evicts.
//!
//! # Nodes
//! A map has one node per entry (`max_entries` of them, as the kernel preallocates), in one
//! array, plus a sentinel node heading each list. Lists are circular and doubly linked by node
//! index. A node in use names its element (the element's address) and the element names its node
//! (the low 31 bits of its LRU word, whose bit 31 is the *reference bit*). Nodes and elements are
//! separate because an element's memory must outlive a grace period after it leaves the table
//! (the value-pointer invariant of [`crate::maps`]) while its node is reused at once, as the
//! kernel reuses its preallocated element.
//!
//! # Lists
//! "CPUs" here are the machine's possible CPUs, as the kernel counts them
//! (`cpu::kernel_possible_cpus`: batch sizes and per-CPU shares depend on the count), and a
//! thread uses the lists of its CPU slot ([`crate::maps::current_cpu`]).
//!
//! *Common* flavour (the default): a global free, active and inactive list, and per CPU a
//! local free list and a *pending* list. An insertion takes a node from its CPU's local free list
//! (refilling it from the global lists, see below) and puts it at the head of the CPU's pending
//! list. A refill, under the global lock: moves every pending node to the head of the active
//! (reference bit set) or inactive list, oldest first; *rotates* (below); moves up to
//! `target_free` nodes from the global free list to the local one (`target_free` =
//! `max_entries / possible CPUs / 2`, clamped to 1..=128); and if that was fewer, *shrinks* the
//! inactive list for the rest. If even that finds nothing, the insertion *steals*, round robin
//! over the CPUs starting where its CPU's previous search ended (at first: itself): a node from
//! a CPU's local free list, else its oldest pending node without the reference bit, else its
//! oldest pending node.
//!
//! *Per-CPU* flavour (`BPF_F_NO_COMMON_LRU`): each CPU has its own free, active and inactive
//! lists holding `max_entries / possible CPUs` nodes. An insertion rotates its CPU's lists,
//! shrinks for 4 nodes when its free list is empty, and takes the first free node onto the head
//! of its inactive list. It never steals.
//!
//! *Rotate*: if the inactive list is shorter than the active one, walk the active list from its
//! tail (at most `nr_scans` nodes, and not past the node that was first): a node with the
//! reference bit goes back to the active head, one without to the inactive head. Then walk the
//! inactive list backwards from where the previous walk stopped, wrapping around once (at most
//! `nr_scans` nodes): referenced nodes move to the active head, the others stay. *Shrink*: from
//! the inactive tail (at most `nr_scans` nodes), referenced nodes move to the active head and
//! unreferenced ones are evicted until enough are; if none was, evict the tail-most node whose
//! element can be removed, of the inactive list or (empty) of the active list, whatever its
//! reference bit. Every move onto the active or inactive list clears the reference bit.
//! `nr_scans` is 128 (common) or 4 (per-CPU).
//!
//! Evicting a node unlinks its element from the table (the caller's `unlink`), which fails when
//! the element is not linked: being inserted, or already deleted (its node is then on its way to
//! a free list); such a node is skipped, as in the kernel.
//!
//! # Locks and orderings
//! Each list is guarded by its lock: the global lock (common), a CPU's local lock (its free and
//! pending lists), a CPU's list lock (per-CPU flavour). Locks nest local → global → bucket (and
//! per-CPU list → bucket), never the other way, and never two local locks at once. A node's
//! fields are relaxed atomics: they are only written by the holder of the lock of the list the
//! node is on (or by the thread that took the node off every list), so the locks' acquire and
//! release order every access that matters; atomics make the unlocked reads (a node's kind
//! before taking the lock that then confirms it) well defined. An element's header is written
//! before its node is taken, so whoever reaches it through the node, under a lock taken after
//! that, sees it. The reference bit is the exception: lookups set it without a lock (a relaxed
//! load, and a relaxed store when unset), and the LRU clears it under its lock; either may win a
//! race, as in the kernel, and the outcome is only a guess about use. Stores of the word keep its
//! node index, which never changes for an element, so no race can corrupt it.
//!
//! # Element lifetime
//! While a node is on an active, inactive or pending list its element is alive: an element is
//! retired (or given back unused) only after its node was pushed onto a free list, and the LRU
//! reads an element only through a node on those lists, under their lock.

use std::alloc::Layout;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize};
use std::sync::{Mutex, MutexGuard};

use super::MapError;

/// The reference bit of an element's LRU word.
pub(crate) const REF: u32 = 1 << 31;

/// Nodes a common refill brings to a local free list at most; the common lists' scan limit.
const LOCAL_FREE_TARGET: u32 = 128;
const LOCAL_NR_SCANS: u32 = LOCAL_FREE_TARGET;
/// Nodes a per-CPU shrink frees at most; the per-CPU lists' scan limit.
const PERCPU_FREE_TARGET: u32 = 4;
const PERCPU_NR_SCANS: u32 = PERCPU_FREE_TARGET;

// What list a node is on. Only ACTIVE and INACTIVE are counted (they index `counts`).
const ACTIVE: u8 = 0;
const INACTIVE: u8 = 1;
const FREE: u8 = 2;
const LOCAL_FREE: u8 = 3;
const PENDING: u8 = 4;
const HEAD: u8 = 5;

/// A node (all zero: valid, unlinked).
#[derive(Default)]
struct Node {
    /// The element using the node (stale while the node is free).
    elem: AtomicUsize,
    prev: AtomicU32,
    next: AtomicU32,
    /// The CPU slot whose pending list (common) or lists (per-CPU) the node belongs to.
    cpu: AtomicU32,
    kind: AtomicU8,
}

/// A lock's state for an active/inactive/free list triple.
struct ListState {
    counts: [u32; 2],
    /// Where the next inactive rotation starts: a node of the inactive list, or its head.
    rotation: u32,
    /// Nodes `virgin..virgin_end` were never used: they are the free list's tail, implicitly
    /// (so that a large map's node array is only touched as it fills).
    virgin: u32,
    virgin_end: u32,
}

/// An active, inactive and free list (the common flavour's global lists, or one CPU's).
struct Lists {
    state: Mutex<ListState>,
    /// Sentinel indices, by kind: ACTIVE, INACTIVE, FREE.
    heads: [u32; 3],
}

/// A CPU slot's local lists (common flavour).
#[repr(align(64))]
struct Local {
    lock: Mutex<()>,
    free: u32,
    pending: u32,
    next_steal: AtomicU32,
}

#[repr(align(64))]
struct PerCpu(Lists);

enum Flavour {
    Common { global: Lists, locals: Box<[Local]> },
    PerCpu(Box<[PerCpu]>),
}

/// The LRU of one map; see the module docs.
pub(crate) struct Lru {
    nodes: Box<[Node]>,
    /// Offset of the LRU word (`AtomicU32`) in an element.
    word_offset: usize,
    flavour: Flavour,
    nr_scans: u32,
    target_free: u32,
}

/// `cpu` as an index of `n` lists. Slots are below `possible_cpus()`, never above the list
/// count; a modulo only in case (a division is slow on the update path).
#[inline]
fn in_range(cpu: u32, n: usize) -> u32 {
    if (cpu as usize) < n {
        cpu
    } else {
        cpu % n as u32
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No list operation panics midway; a poisoned lock's lists are consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many entries an LRU map has: `max_entries`, or with `BPF_F_NO_COMMON_LRU` rounded up to a
/// multiple of `ncpus` (down, where up overflows u32), as the kernel adjusts `max_entries`.
pub(crate) fn entries(max_entries: u32, per_cpu_lists: bool, ncpus: u32) -> u32 {
    if !per_cpu_lists {
        return max_entries;
    }
    let n = ncpus.max(1) as u64;
    let up = (max_entries as u64).div_ceil(n) * n;
    if up > u32::MAX as u64 {
        (max_entries as u64 / n * n) as u32
    } else {
        up as u32
    }
}

/// Marks an element as used (a BPF-side lookup): sets the reference bit of its LRU word.
#[inline(always)]
pub(crate) fn touch(word: &AtomicU32) {
    let w = word.load(Relaxed);
    // Loaded first so that a hot element's line is not written again and again.
    if w & REF == 0 {
        word.store(w | REF, Relaxed);
    }
}

/// The node an element's LRU word names.
#[inline]
pub(crate) fn node_of(word: u32) -> u32 {
    word & !REF
}

impl Lru {
    /// `entries` nodes (see [`entries`]) over `ncpus` CPU slots; elements keep their LRU word
    /// at `word_offset`.
    pub(crate) fn new(
        entries: u32,
        ncpus: usize,
        per_cpu_lists: bool,
        word_offset: usize,
    ) -> Result<Lru, MapError> {
        let ncpus = ncpus.max(1);
        let sentinels = if per_cpu_lists {
            3 * ncpus
        } else {
            3 + 2 * ncpus
        };
        let total = sentinels + entries as usize;
        if total >= REF as usize {
            return Err(MapError::TooBig(
                "too many LRU entries for 31-bit node numbers: use fewer entries",
            ));
        }
        let oom = MapError::NoMemory("the LRU nodes do not fit in memory: use fewer entries");
        let layout = Layout::array::<Node>(total).map_err(|_| oom)?;
        // SAFETY: non-zero size (there are sentinels).
        let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut Node;
        if p.is_null() {
            return Err(oom);
        }
        // SAFETY: `total` zeroed nodes, a valid value for each (atomics only), allocated with the
        // layout a boxed slice of them is freed with. Zeroed pages are only touched as used.
        let nodes = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, total)) };
        let sentinel = |i: usize| {
            let n = &nodes[i];
            n.prev.store(i as u32, Relaxed);
            n.next.store(i as u32, Relaxed);
            n.kind.store(HEAD, Relaxed);
            i as u32
        };
        let lists = |first: usize, virgin: u32, virgin_end: u32| {
            let heads = [sentinel(first), sentinel(first + 1), sentinel(first + 2)];
            Lists {
                state: Mutex::new(ListState {
                    counts: [0; 2],
                    rotation: heads[INACTIVE as usize],
                    virgin,
                    virgin_end,
                }),
                heads,
            }
        };
        let s = sentinels as u32;
        let (flavour, nr_scans) = if per_cpu_lists {
            // Each CPU's share: consecutive nodes.
            let share = entries / ncpus as u32;
            let cpus = (0..ncpus)
                .map(|c| {
                    let start = s + c as u32 * share;
                    PerCpu(lists(3 * c, start, start + share))
                })
                .collect();
            (Flavour::PerCpu(cpus), PERCPU_NR_SCANS)
        } else {
            let global = lists(0, s, s + entries);
            let locals = (0..ncpus)
                .map(|c| Local {
                    lock: Mutex::new(()),
                    free: sentinel(3 + 2 * c),
                    pending: sentinel(4 + 2 * c),
                    next_steal: AtomicU32::new(c as u32),
                })
                .collect();
            (Flavour::Common { global, locals }, LOCAL_NR_SCANS)
        };
        Ok(Lru {
            nodes,
            word_offset,
            flavour,
            nr_scans,
            target_free: (entries / ncpus as u32 / 2).clamp(1, LOCAL_FREE_TARGET),
        })
    }

    // ------------------------------------------------------------------ nodes and list links

    #[inline]
    fn n(&self, i: u32) -> &Node {
        &self.nodes[i as usize]
    }

    fn next(&self, i: u32) -> u32 {
        self.n(i).next.load(Relaxed)
    }

    fn prev(&self, i: u32) -> u32 {
        self.n(i).prev.load(Relaxed)
    }

    fn kind(&self, i: u32) -> u8 {
        self.n(i).kind.load(Relaxed)
    }

    fn set_kind(&self, i: u32, kind: u8) {
        self.n(i).kind.store(kind, Relaxed)
    }

    /// Links unlinked node `i` right after `head` (at the list's head).
    fn link_after(&self, i: u32, head: u32) {
        let next = self.next(head);
        self.n(i).prev.store(head, Relaxed);
        self.n(i).next.store(next, Relaxed);
        self.n(next).prev.store(i, Relaxed);
        self.n(head).next.store(i, Relaxed);
    }

    fn unlink(&self, i: u32) {
        let (prev, next) = (self.prev(i), self.next(i));
        self.n(prev).next.store(next, Relaxed);
        self.n(next).prev.store(prev, Relaxed);
    }

    fn move_after(&self, i: u32, head: u32) {
        self.unlink(i);
        self.link_after(i, head);
    }

    /// The element's LRU word of node `i`, which is on an active, inactive or pending list
    /// (whose lock the caller holds), or was just given its element.
    fn word(&self, i: u32) -> &AtomicU32 {
        let e = self.n(i).elem.load(Relaxed);
        debug_assert!(e != 0 && !matches!(self.kind(i), FREE | LOCAL_FREE | HEAD));
        // SAFETY: such a node has a live element (module docs, "Element lifetime", which `pop`'s
        // and `push`'s contracts uphold), keeping an aligned AtomicU32 at `word_offset`.
        unsafe { &*((e + self.word_offset) as *const AtomicU32) }
    }

    fn is_ref(&self, i: u32) -> bool {
        self.word(i).load(Relaxed) & REF != 0
    }

    fn clear_ref(&self, i: u32) {
        self.word(i).store(i, Relaxed);
    }

    /// Gives node `i` (off every list) to element `elem` as a node of `kind`: the element's word
    /// names the node, unreferenced.
    fn assign(&self, i: u32, elem: usize, cpu: u32, kind: u8) {
        let n = self.n(i);
        n.kind.store(kind, Relaxed);
        n.elem.store(elem, Relaxed);
        n.cpu.store(cpu, Relaxed);
        self.clear_ref(i);
    }

    fn elem(&self, i: u32) -> usize {
        self.n(i).elem.load(Relaxed)
    }

    // ------------------------------------------------------------ active/inactive/free lists

    /// Takes the first node of `l`'s free list off it (its kind still FREE).
    fn take_free(&self, l: &Lists, st: &mut ListState) -> Option<u32> {
        let head = l.heads[FREE as usize];
        let first = self.next(head);
        if first != head {
            self.unlink(first);
            return Some(first);
        }
        if st.virgin < st.virgin_end {
            let i = st.virgin;
            st.virgin += 1;
            self.set_kind(i, FREE);
            return Some(i);
        }
        None
    }

    fn free_is_empty(&self, l: &Lists, st: &ListState) -> bool {
        let head = l.heads[FREE as usize];
        self.next(head) == head && st.virgin == st.virgin_end
    }

    fn count(st: &mut ListState, kind: u8, up: bool) {
        if let Some(c) = st.counts.get_mut(kind as usize) {
            if up {
                *c += 1;
            } else {
                *c -= 1;
            }
        }
    }

    /// Moves node `i` of `l` to the head of `l`'s list `kind`, clearing its reference bit (not
    /// for FREE: a node pushed free has an element on its way to retirement).
    fn move_within(&self, l: &Lists, st: &mut ListState, i: u32, kind: u8) {
        let from = self.kind(i);
        if from != kind {
            Self::count(st, from, false);
            Self::count(st, kind, true);
            self.set_kind(i, kind);
        }
        if kind != FREE {
            self.clear_ref(i);
        }
        if st.rotation == i {
            st.rotation = self.prev(i);
        }
        self.move_after(i, l.heads[kind as usize]);
    }

    /// Moves evicted node `i` of `l` to the head of free list `to`, as `kind`.
    fn move_to_free(&self, st: &mut ListState, i: u32, to: u32, kind: u8) {
        if st.rotation == i {
            st.rotation = self.prev(i);
        }
        Self::count(st, self.kind(i), false);
        self.set_kind(i, kind);
        self.move_after(i, to);
    }

    fn rotate_active(&self, l: &Lists, st: &mut ListState) {
        let head = l.heads[ACTIVE as usize];
        let first = self.next(head);
        let mut cur = self.prev(head);
        let mut scanned = 0;
        while cur != head {
            let prev = self.prev(cur);
            let to = if self.is_ref(cur) { ACTIVE } else { INACTIVE };
            self.move_within(l, st, cur, to);
            scanned += 1;
            if scanned == self.nr_scans || cur == first {
                break;
            }
            cur = prev;
        }
    }

    fn rotate_inactive(&self, l: &Lists, st: &mut ListState) {
        let head = l.heads[INACTIVE as usize];
        if self.next(head) == head {
            return;
        }
        // One lap backwards from `rotation`, ending at the node after it (skipping the head).
        let mut last = self.next(st.rotation);
        if last == head {
            last = self.next(last);
        }
        let mut cur = st.rotation;
        let mut next = head;
        let mut scanned = 0;
        while scanned < self.nr_scans {
            if cur == head {
                cur = self.prev(cur);
                continue;
            }
            next = self.prev(cur);
            if self.is_ref(cur) {
                self.move_within(l, st, cur, ACTIVE);
            }
            if cur == last {
                break;
            }
            cur = next;
            scanned += 1;
        }
        st.rotation = next;
    }

    fn rotate(&self, l: &Lists, st: &mut ListState) {
        if st.counts[INACTIVE as usize] < st.counts[ACTIVE as usize] {
            self.rotate_active(l, st);
        }
        self.rotate_inactive(l, st);
    }

    /// Evicts up to `want` unreferenced nodes from the inactive tail onto free list `to`.
    fn shrink_inactive<F: FnMut(usize) -> bool>(
        &self,
        l: &Lists,
        st: &mut ListState,
        want: u32,
        to: u32,
        kind: u8,
        unlink: &mut F,
    ) -> u32 {
        let head = l.heads[INACTIVE as usize];
        let mut cur = self.prev(head);
        let (mut freed, mut scanned) = (0, 0);
        while cur != head {
            let prev = self.prev(cur);
            if self.is_ref(cur) {
                self.move_within(l, st, cur, ACTIVE);
            } else if unlink(self.elem(cur)) {
                self.move_to_free(st, cur, to, kind);
                freed += 1;
                if freed == want {
                    break;
                }
            }
            scanned += 1;
            if scanned == self.nr_scans {
                break;
            }
            cur = prev;
        }
        freed
    }

    /// Shrinks the inactive list; if that frees nothing, evicts one node whatever its reference.
    fn shrink<F: FnMut(usize) -> bool>(
        &self,
        l: &Lists,
        st: &mut ListState,
        want: u32,
        to: u32,
        kind: u8,
        unlink: &mut F,
    ) -> u32 {
        let freed = self.shrink_inactive(l, st, want, to, kind, unlink);
        if freed > 0 {
            return freed;
        }
        let inactive = l.heads[INACTIVE as usize];
        let head = if self.next(inactive) != inactive {
            inactive
        } else {
            l.heads[ACTIVE as usize]
        };
        let mut cur = self.prev(head);
        while cur != head {
            let prev = self.prev(cur);
            if unlink(self.elem(cur)) {
                self.move_to_free(st, cur, to, kind);
                return 1;
            }
            cur = prev;
        }
        0
    }

    // ------------------------------------------------------------------------- public face

    /// Takes a node for element `elem` (unlinked, its header written) on CPU slot `cpu`,
    /// evicting as the kernel does; `unlink(element)` removes an element from the table if it is
    /// linked there and says whether it did (the caller retires what it removed, after this
    /// returns). The node's index is now in the element's LRU word. `None`: every node is being
    /// inserted right now.
    ///
    /// # Safety
    /// `elem` is the address of an element with an `AtomicU32` at `word_offset`, and stays alive
    /// until its node has been given back with [`push`](Self::push); so does every element
    /// given to an earlier `pop` whose node was not given back yet.
    pub(crate) unsafe fn pop<F: FnMut(usize) -> bool>(
        &self,
        cpu: u32,
        elem: usize,
        mut unlink: F,
    ) -> Option<u32> {
        match &self.flavour {
            Flavour::Common { global, locals } => {
                self.pop_common(global, locals, cpu, elem, &mut unlink)
            }
            Flavour::PerCpu(cpus) => {
                let cpu = in_range(cpu, cpus.len());
                let l = &cpus[cpu as usize].0;
                let mut st = lock(&l.state);
                self.rotate(l, &mut st);
                if self.free_is_empty(l, &st) {
                    let free = l.heads[FREE as usize];
                    self.shrink(l, &mut st, PERCPU_FREE_TARGET, free, FREE, &mut unlink);
                }
                let i = self.take_free(l, &mut st)?;
                Self::count(&mut st, INACTIVE, true);
                self.assign(i, elem, cpu, INACTIVE);
                self.link_after(i, l.heads[INACTIVE as usize]);
                Some(i)
            }
        }
    }

    fn pop_common<F: FnMut(usize) -> bool>(
        &self,
        global: &Lists,
        locals: &[Local],
        cpu: u32,
        elem: usize,
        unlink: &mut F,
    ) -> Option<u32> {
        let ncpus = locals.len() as u32;
        let cpu = in_range(cpu, locals.len());
        let loc = &locals[cpu as usize];
        {
            let _l = lock(&loc.lock);
            let mut got = self.pop_local_free(loc);
            if got.is_none() {
                self.refill(global, loc, unlink);
                got = self.pop_local_free(loc);
            }
            if let Some(i) = got {
                self.add_pending(loc, cpu, i, elem);
                return Some(i);
            }
        }
        // Nothing free anywhere: steal from the CPUs' local lists, round robin.
        let first = loc.next_steal.load(Relaxed);
        let mut steal = first;
        let got = loop {
            let victim = &locals[steal as usize];
            let got = {
                let _l = lock(&victim.lock);
                self.pop_local_free(victim)
                    .or_else(|| self.pop_pending(victim, unlink))
            };
            steal = if steal + 1 == ncpus { 0 } else { steal + 1 };
            if got.is_some() || steal == first {
                break got;
            }
        };
        loc.next_steal.store(steal, Relaxed);
        let i = got?;
        let _l = lock(&loc.lock);
        self.add_pending(loc, cpu, i, elem);
        Some(i)
    }

    /// The first node of a local free list, taken off it (its lock held).
    fn pop_local_free(&self, loc: &Local) -> Option<u32> {
        let first = self.next(loc.free);
        if first == loc.free {
            return None;
        }
        self.unlink(first);
        Some(first)
    }

    /// The oldest pending node whose element can be evicted, unreferenced ones first, taken off
    /// the list (its lock held).
    fn pop_pending<F: FnMut(usize) -> bool>(&self, loc: &Local, unlink: &mut F) -> Option<u32> {
        for force in [false, true] {
            let mut cur = self.prev(loc.pending);
            while cur != loc.pending {
                if (force || !self.is_ref(cur)) && unlink(self.elem(cur)) {
                    self.unlink(cur);
                    return Some(cur);
                }
                cur = self.prev(cur);
            }
        }
        None
    }

    fn add_pending(&self, loc: &Local, cpu: u32, i: u32, elem: usize) {
        self.assign(i, elem, cpu, PENDING);
        self.link_after(i, loc.pending);
    }

    /// Refills `loc`'s free list from the global lists (`loc`'s lock held).
    fn refill<F: FnMut(usize) -> bool>(&self, global: &Lists, loc: &Local, unlink: &mut F) {
        let mut st = lock(&global.state);
        // Flush the pending list, oldest first, onto the active or inactive head.
        let mut cur = self.prev(loc.pending);
        while cur != loc.pending {
            let prev = self.prev(cur);
            let kind = if self.is_ref(cur) { ACTIVE } else { INACTIVE };
            Self::count(&mut st, kind, true);
            self.set_kind(cur, kind);
            self.clear_ref(cur);
            self.move_after(cur, global.heads[kind as usize]);
            cur = prev;
        }
        self.rotate(global, &mut st);
        let mut moved = 0;
        while moved < self.target_free {
            let Some(i) = self.take_free(global, &mut st) else {
                break;
            };
            self.set_kind(i, LOCAL_FREE);
            self.link_after(i, loc.free);
            moved += 1;
        }
        if moved < self.target_free {
            let want = self.target_free - moved;
            self.shrink(global, &mut st, want, loc.free, LOCAL_FREE, unlink);
        }
    }

    /// Gives back node `i`, whose element the caller unlinked from the table (or never linked).
    /// The element may be retired once this returns.
    ///
    /// # Safety
    /// Node `i` came from [`pop`](Self::pop) and was not given back since: its element's word
    /// names it, and the caller is the one thread that took that element out of the table (or
    /// the one that never put it there).
    pub(crate) unsafe fn push(&self, i: u32) {
        match &self.flavour {
            Flavour::Common { global, locals } => {
                // Still pending: back to its CPU's local free list. The kind is checked again
                // under that lock: a refill may have flushed the node meanwhile (a node we own
                // never becomes pending again, so a non-pending kind is final).
                if self.kind(i) == PENDING {
                    let loc = &locals[self.n(i).cpu.load(Relaxed) as usize];
                    let _l = lock(&loc.lock);
                    if self.kind(i) == PENDING {
                        self.set_kind(i, LOCAL_FREE);
                        self.move_after(i, loc.free);
                        return;
                    }
                }
                let mut st = lock(&global.state);
                self.move_within(global, &mut st, i, FREE);
            }
            Flavour::PerCpu(cpus) => {
                let l = &cpus[self.n(i).cpu.load(Relaxed) as usize].0;
                let mut st = lock(&l.state);
                self.move_within(l, &mut st, i, FREE);
            }
        }
    }
}

#[cfg(test)]
impl Lru {
    /// Walks every list (no other thread may use the LRU): each node is on exactly one, with
    /// links both ways, the kind of its list, and the counts right. Returns the elements of the
    /// nodes in use (pending, active or inactive).
    fn check(&self) -> std::collections::HashSet<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut used = std::collections::HashSet::new();
        let mut walk = |head: u32, kind: u8| {
            let (mut n, mut prev, mut cur) = (0, head, self.next(head));
            while cur != head {
                assert_eq!(self.prev(cur), prev, "node {cur}: back link");
                assert_eq!(self.kind(cur), kind, "node {cur}: kind");
                assert!(
                    !std::mem::replace(&mut seen[cur as usize], true),
                    "node {cur} twice"
                );
                if kind != FREE && kind != LOCAL_FREE {
                    assert!(used.insert(self.elem(cur)), "node {cur}: element twice");
                }
                (n, prev, cur) = (n + 1, cur, self.next(cur));
            }
            assert_eq!(self.prev(head), prev, "list {head}: tail link");
            n
        };
        // Nodes on a list triple, counting the never used ones.
        let triple = |l: &Lists, walk: &mut dyn FnMut(u32, u8) -> u32| {
            let st = lock(&l.state);
            let mut n = st.virgin_end - st.virgin;
            for kind in [ACTIVE, INACTIVE] {
                let k = walk(l.heads[kind as usize], kind);
                assert_eq!(k, st.counts[kind as usize], "count of kind {kind}");
                n += k;
            }
            n + walk(l.heads[FREE as usize], FREE)
        };
        let on_lists = match &self.flavour {
            Flavour::Common { global, locals } => {
                let mut n = triple(global, &mut walk);
                for loc in locals.iter() {
                    n += walk(loc.free, LOCAL_FREE) + walk(loc.pending, PENDING);
                }
                n
            }
            Flavour::PerCpu(cpus) => cpus.iter().map(|c| triple(&c.0, &mut walk)).sum(),
        };
        let sentinels = self.nodes.iter().filter(|n| n.kind.load(Relaxed) == HEAD);
        assert_eq!(
            on_lists as usize,
            self.nodes.len() - sentinels.count(),
            "every node is on a list or never used"
        );
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashSet;

    /// Elements reduced to their LRU word, and a table that is a set of linked elements.
    struct Harness {
        lru: Lru,
        /// Never reallocated (addresses stay put); `used` of them taken.
        elems: Vec<AtomicU32>,
        used: usize,
        table: RefCell<HashSet<usize>>,
    }

    impl Harness {
        fn new(entries: u32, cpus: usize) -> Harness {
            Harness {
                lru: Lru::new(entries, cpus, false, 0).unwrap(),
                elems: (0..64).map(|_| AtomicU32::new(0)).collect(),
                used: 0,
                table: RefCell::new(HashSet::new()),
            }
        }

        /// Inserts a new element from `cpu`; its number.
        fn insert(&mut self, cpu: u32) -> usize {
            self.used += 1;
            let e = self.addr(self.used - 1);
            let table = &self.table;
            // SAFETY: the harness's elements (a word at offset 0) live as long as the LRU.
            unsafe {
                self.lru
                    .pop(cpu, e, |victim| table.borrow_mut().remove(&victim))
            }
            .expect("a node");
            self.table.borrow_mut().insert(e);
            self.used - 1
        }

        fn addr(&self, i: usize) -> usize {
            &self.elems[i] as *const AtomicU32 as usize
        }

        fn delete(&mut self, i: usize) {
            assert!(self.table.borrow_mut().remove(&self.addr(i)));
            // SAFETY: we just took the element out of the table; its word names its node.
            unsafe { self.lru.push(node_of(self.elems[i].load(Relaxed))) };
        }

        fn present(&self, i: usize) -> bool {
            self.table.borrow().contains(&self.addr(i))
        }
    }

    #[test]
    fn a_cpu_with_nothing_free_steals_round_robin() {
        // 3 entries over 4 CPUs: batches of one node. CPUs 0-2 each hold one pending element
        // and nothing is left on the global lists.
        let mut h = Harness::new(3, 4);
        let (a, b, c) = (h.insert(0), h.insert(1), h.insert(2));
        touch(&h.elems[b]);
        // CPU 3 starts stealing at itself, then CPU 0: its oldest unreferenced pending element.
        let d = h.insert(3);
        assert!(!h.present(a) && h.present(b) && h.present(c) && h.present(d));
        // CPU 0, now with nothing, steals from CPU 1: its only pending element is referenced,
        // taken all the same (before looking at CPU 2).
        let e = h.insert(0);
        assert!(!h.present(b) && h.present(c) && h.present(e));
        // A pending element deleted goes to its CPU's local free list, where CPU 1 steals it
        // (starting at itself, then CPU 2) without evicting anything.
        h.delete(c);
        let f = h.insert(1);
        assert!(h.present(d) && h.present(e) && h.present(f));
        assert_eq!(h.table.borrow().len(), 3);
        // Each thief's next search starts after the CPU it stole from.
        let Flavour::Common { locals, .. } = &h.lru.flavour else {
            unreachable!()
        };
        let next: Vec<u32> = locals.iter().map(|l| l.next_steal.load(Relaxed)).collect();
        assert_eq!(next, [2, 3, 2, 1]);
    }

    #[test]
    fn refills_move_batches_and_evict_the_inactive_tail() {
        // 8 entries over 2 CPUs: batches of two.
        let mut h = Harness::new(8, 2);
        let first: Vec<usize> = (0..8).map(|_| h.insert(0)).collect();
        assert!(first.iter().all(|&i| h.present(i)));
        // A referenced element moves to the active list at the next flush and survives.
        touch(&h.elems[first[0]]);
        let _ = h.insert(0);
        // The refill flushed the last two pending elements and evicted a batch of two from the
        // inactive tail: the oldest unreferenced ones, 1 and 2.
        let gone: Vec<usize> = first.iter().copied().filter(|&i| !h.present(i)).collect();
        assert_eq!(gone, [first[1], first[2]]);
    }

    #[test]
    fn concurrent_pops_and_pushes_keep_the_lists_whole() {
        use std::collections::HashMap;
        use std::sync::Mutex;
        const CPUS: usize = 4;
        const THREADS: usize = 6;
        const OPS: usize = 20_000;
        for per_cpu_lists in [false, true] {
            let lru = Lru::new(64, CPUS, per_cpu_lists, 0).unwrap();
            // Elements are never reused (one per insertion), so a stale address is harmless.
            let elems: Vec<AtomicU32> = (0..THREADS * OPS).map(|_| AtomicU32::new(0)).collect();
            // key -> element: the "hash table", its lock standing for the bucket locks.
            let table = Mutex::new(HashMap::<u32, usize>::new());
            let unlink = |e: usize| {
                let mut t = table.lock().unwrap();
                let key = t.iter().find(|&(_, &v)| v == e).map(|(&k, _)| k);
                key.map(|k| t.remove(&k)).is_some()
            };
            let word = |e: usize| {
                // SAFETY: `e` is an element of `elems`, alive for the whole test.
                unsafe { &*(e as *const AtomicU32) }
            };
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (lru, elems, table) = (&lru, &elems, &table);
                    s.spawn(move || {
                        // Threads 4 and 5 share CPUs 0 and 1 with threads 0 and 1.
                        let cpu = (t % CPUS) as u32;
                        let mut rng = 0x9e37_79b9_u64 * (t as u64 + 1);
                        for i in 0..OPS {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            let key = (rng >> 8) as u32 % 100;
                            match rng % 4 {
                                0 => {
                                    let found = table.lock().unwrap().get(&key).copied();
                                    if let Some(e) = found {
                                        touch(word(e));
                                    }
                                }
                                1 | 2 => {
                                    let e = &elems[t * OPS + i] as *const AtomicU32 as usize;
                                    // SAFETY: `elems` outlives the LRU's use; each is used once.
                                    let Some(node) = (unsafe { lru.pop(cpu, e, unlink) }) else {
                                        continue;
                                    };
                                    let old = {
                                        let mut tab = table.lock().unwrap();
                                        if rng % 4 == 2 && tab.contains_key(&key) {
                                            // BPF_NOEXIST refused: the node goes back.
                                            Some(e)
                                        } else {
                                            tab.insert(key, e)
                                        }
                                    };
                                    if let Some(o) = old {
                                        if o != e {
                                            touch(word(e));
                                        }
                                        // SAFETY: we took `o` out of the table (or it never entered it).
                                        unsafe { lru.push(node_of(word(o).load(Relaxed))) };
                                    }
                                    let _ = node;
                                }
                                _ => {
                                    let old = table.lock().unwrap().remove(&key);
                                    if let Some(o) = old {
                                        // SAFETY: we took `o` out of the table (or it never entered it).
                                        unsafe { lru.push(node_of(word(o).load(Relaxed))) };
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let used = lru.check();
            let linked: std::collections::HashSet<usize> =
                table.into_inner().unwrap().into_values().collect();
            assert_eq!(
                used, linked,
                "per-CPU lists {per_cpu_lists}: nodes in use = linked elements"
            );
            assert!(!linked.is_empty());
        }
    }
}
