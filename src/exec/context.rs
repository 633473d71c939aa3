//! The per-run state every engine keeps: [`HelperContext`] (what generated code reads at fixed
//! offsets and what context helpers see) and its borrowing wrapper [`RunContext`].
//!
//! One decision lives here for all engines: whether an access is allowed
//! ([`HelperContext::allows`]). The interpreter asks it for every access, checked JIT code for
//! those its inline test of the stack and the first region does not accept, and helpers for their
//! pointer arguments.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use super::{Access, ExecError, MemRegion, RunEnv, STACK_SIZE, TOTAL_STACK};
use crate::helpers::Helpers;
use crate::maps::RawMap;

/// A run's stack: [`TOTAL_STACK`] bytes, 16-aligned (atomics on it need natural alignment).
///
/// Its contents before a run do not matter: a run sees only the part it has zeroed itself
/// (each function's proven reach, when it is entered: see [`crate::exec`]), so a stack can be
/// reused by any number of runs without being cleared.
#[repr(C, align(16))]
pub struct JitStack(pub(crate) [u64; TOTAL_STACK / 8]);

impl JitStack {
    /// A zeroed stack, as the interpreter gives every run.
    pub const fn new() -> JitStack {
        JitStack([0; TOTAL_STACK / 8])
    }

    /// Address of the stack's lowest byte; a run's r10 starts at `base() + TOTAL_STACK`.
    pub fn base(&self) -> u64 {
        self.0.as_ptr() as u64
    }

    /// Zeroes the whole stack.
    pub fn zero(&mut self) {
        self.0.fill(0);
    }
}

impl Default for JitStack {
    fn default() -> Self {
        JitStack::new()
    }
}

/// Regions kept inline in the context; more go to a spill vector.
pub const INLINE_GRANTS: usize = 4;
/// The most regions one run may be granted ([`HelperContext::grant`]); the next grant ends the
/// run with [`ExecError::HelperFault`].
pub const MAX_GRANTS: usize = 1024;
/// Spill vectors a thread keeps for reuse (one per nesting level of runs that spilled).
const SPILL_POOL: usize = 4;

thread_local! {
    /// Spill vectors of finished runs, kept with their capacity so that a run's grants allocate
    /// only until the thread has seen its largest run.
    static SPILLS: RefCell<Vec<Vec<Grant>>> = const { RefCell::new(Vec::new()) };
}

/// A granted region, and whether it is a ring buffer record (which only
/// `bpf_ringbuf_submit`/`discard` may release).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Grant {
    region: MemRegion,
    record: bool,
}

/// Regions granted during one run: a few inline, the rest in a vector borrowed from the thread's
/// pool on the first spill and returned when the run ends.
struct Grants {
    /// The first `len` are initialised (left uninitialised otherwise: a run that is granted
    /// nothing, most runs, never writes them).
    inline: [MaybeUninit<Grant>; INLINE_GRANTS],
    len: usize,
    spill: Vec<Grant>,
}

impl Grants {
    fn new() -> Grants {
        Grants {
            inline: [MaybeUninit::uninit(); INLINE_GRANTS],
            len: 0,
            spill: Vec::new(),
        }
    }

    /// Writes an empty `Grants` at `dst`, as `dst.write(Grants::new())` would, without storing
    /// the inline slots, which are uninitialised by design (a whole-struct write stores them).
    ///
    /// # Safety
    /// `dst` is valid and aligned for a `Grants`; old contents are overwritten, not dropped.
    unsafe fn init_in_place(dst: *mut Grants) {
        // SAFETY: per the contract; `len` and `spill` are the fields that must be initialised.
        unsafe {
            std::ptr::addr_of_mut!((*dst).len).write(0);
            std::ptr::addr_of_mut!((*dst).spill).write(Vec::new());
        }
    }

    /// The inline grants in use.
    fn used(&self) -> &[Grant] {
        // SAFETY: the first `len` elements are initialised (`add` and `remove` keep it so), and
        // `MaybeUninit<Grant>` has `Grant`'s layout.
        unsafe { std::slice::from_raw_parts(self.inline.as_ptr().cast::<Grant>(), self.len) }
    }

    fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.used().iter().chain(self.spill.iter())
    }

    fn count(&self) -> usize {
        self.len + self.spill.len()
    }

    /// Adds `g` unless it is already there; false when full.
    fn add(&mut self, g: Grant) -> bool {
        if self.iter().any(|x| *x == g) {
            return true;
        }
        if self.len < INLINE_GRANTS {
            self.inline[self.len] = MaybeUninit::new(g);
            self.len += 1;
            return true;
        }
        if self.count() >= MAX_GRANTS {
            return false;
        }
        if self.spill.capacity() == 0 {
            // A thread-local being destroyed (a run from a destructor) just allocates.
            self.spill = SPILLS
                .try_with(|p| p.borrow_mut().pop())
                .ok()
                .flatten()
                .unwrap_or_default();
        }
        self.spill.push(g);
        true
    }

    /// Removes the first grant `pred` accepts and returns it.
    fn remove(&mut self, pred: impl Fn(&Grant) -> bool) -> Option<Grant> {
        if let Some(i) = self.used().iter().position(&pred) {
            let g = self.used()[i];
            self.inline.copy_within(i + 1..self.len, i);
            self.len -= 1;
            // Keep the inline part full while spilled regions remain.
            if let Some(last) = self.spill.pop() {
                self.inline[self.len] = MaybeUninit::new(last);
                self.len += 1;
            }
            return Some(g);
        }
        let i = self.spill.iter().position(pred)?;
        Some(self.spill.swap_remove(i))
    }

    /// Forgets every grant and hands the spill vector back to the thread's pool.
    #[inline]
    fn release(&mut self) {
        self.len = 0;
        // Most runs never spill: nothing to hand back.
        if self.spill.capacity() != 0 {
            self.release_spill();
        }
    }

    #[cold]
    #[inline(never)]
    fn release_spill(&mut self) {
        let mut spill = std::mem::take(&mut self.spill);
        spill.clear();
        let _ = SPILLS.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < SPILL_POOL {
                p.push(spill);
            }
        });
    }
}

/// The state of one run, as helpers registered with
/// [`Helpers::register_with_context`](crate::helpers::Helpers::register_with_context) see it
/// (the 6th argument of a [`ContextHelperFn`](crate::helpers::ContextHelperFn)): the run's
/// opaque user pointer ([`RunEnv::user`]), the memory the run may access ([`allows`]), the
/// regions granted so far ([`grant`]), the maps it knows ([`map`]), and a way to end the run with
/// an error ([`fail`]).
///
/// Every engine builds one per run (generated code addresses the leading fields by fixed
/// offsets, hence `#[repr(C)]`); it lives on the caller's stack for that run only, so concurrent
/// runs never share one. There is no public constructor: a helper only ever sees the context of
/// the run that called it, through a pointer valid for the duration of that call.
///
/// [`allows`]: HelperContext::allows
/// [`grant`]: HelperContext::grant
/// [`map`]: HelperContext::map
/// [`fail`]: HelperContext::fail
#[repr(C)]
pub struct HelperContext {
    // Fields generated code reads on hot paths come first, within an 8-bit displacement.
    /// The run's stack window is `[stack_low, stack_base + TOTAL_STACK)`: the bytes it has
    /// zeroed (or written since). It starts empty and grows down as functions are entered
    /// ([`HelperContext::reserve_stack`]); below it nothing may be read.
    stack_low: u64,
    /// For access sizes 1, 2, 4, 8: the window's length `- size + 1` (0 when shorter), so that
    /// an access is inside it iff `addr - stack_low < stack_bound[log2 size]` (unsigned).
    stack_bound: [u64; 4],
    /// Start of the first region, the one checked inline (0 when there is none).
    mem_start: u64,
    /// For access sizes 1, 2, 4, 8: `len - size + 1`, or 0 when the region is smaller, so that an
    /// access is inside it iff `addr - mem_start < mem_bound[log2 size]` (unsigned).
    mem_bound: [u64; 4],
    /// `mem_bound` for stores and atomics: all zero when the region is read-only, so that every
    /// write to it takes the slow path, which decides.
    store_bound: [u64; 4],
    /// Back edges and calls the run may still take, decremented by code compiled with a budget.
    budget_left: u64,
    /// Non-zero once the run has an error: generated code tests it after context helper calls.
    failed: u64,
    /// Lowest stack address; r10 starts at `stack_base + TOTAL_STACK`.
    stack_base: u64,
    /// A BPF-to-BPF call fails when r10 ≤ this (all [`crate::exec::MAX_CALL_DEPTH`] frames used).
    fp_limit: u64,
    /// Slot index of the helper call in progress; generated code stores it (and `call_id`,
    /// the next 4 bytes) before each call that may read it.
    call_pc: u32,
    /// Helper id of the call in progress.
    call_id: u32,
    /// The helpers a `callx` resolves against: the calling image stores its own before each
    /// lookup (a tail call may have entered another program's code).
    helpers: *const Helpers,
    /// Second argument of a runtime request (a tail call's index).
    arg2: u64,
    /// The budget the run started with, for the error.
    budget: u64,
    mem_len: u64,
    mem_writable: bool,
    /// Whether the run's accesses are checked (its entry program's mode; the interpreter always).
    checked: bool,
    /// Whether the run's code counts a budget (the entry program was compiled with one).
    budgeted: bool,
    /// Tail calls this run has attempted past the index check ([`crate::exec::MAX_TAIL_CALL_CNT`]);
    /// direct tail calls count it in generated code.
    pub(crate) tail_calls: u32,
    extra: *const MemRegion,
    extra_len: usize,
    user: *mut c_void,
    maps: *const *const RawMap,
    maps_len: usize,
    /// For a tracer's run: the cookie its link was attached with, and the traced program's
    /// entry address (what `bpf_get_attach_cookie` and `bpf_get_func_ip` return).
    attach_cookie: u64,
    func_ip: u64,
    // `grants` and `error` stay last: `TracerTemplate::start` copies the bytes before them.
    grants: Grants,
    /// Set by `fail` and the runtime functions when a run fails.
    error: Option<ExecError>,
}

/// Offsets of [`HelperContext`] fields used by generated code.
pub(crate) const CTX_STACK_BASE: i32 = std::mem::offset_of!(HelperContext, stack_base) as i32;
pub(crate) const CTX_STACK_LOW: i32 = std::mem::offset_of!(HelperContext, stack_low) as i32;
pub(crate) const CTX_STACK_BOUND: i32 = std::mem::offset_of!(HelperContext, stack_bound) as i32;
pub(crate) const CTX_MEM_START: i32 = std::mem::offset_of!(HelperContext, mem_start) as i32;
pub(crate) const CTX_MEM_BOUND: i32 = std::mem::offset_of!(HelperContext, mem_bound) as i32;
pub(crate) const CTX_FP_LIMIT: i32 = std::mem::offset_of!(HelperContext, fp_limit) as i32;
pub(crate) const CTX_STORE_BOUND: i32 = std::mem::offset_of!(HelperContext, store_bound) as i32;
pub(crate) const CTX_BUDGET_LEFT: i32 = std::mem::offset_of!(HelperContext, budget_left) as i32;
pub(crate) const CTX_FAILED: i32 = std::mem::offset_of!(HelperContext, failed) as i32;
pub(crate) const CTX_CALL_PC: i32 = std::mem::offset_of!(HelperContext, call_pc) as i32;
pub(crate) const CTX_HELPERS: i32 = std::mem::offset_of!(HelperContext, helpers) as i32;
pub(crate) const CTX_ARG2: i32 = std::mem::offset_of!(HelperContext, arg2) as i32;
pub(crate) const CTX_TAIL_CALLS: i32 = std::mem::offset_of!(HelperContext, tail_calls) as i32;
// Every plain field precedes `grants`, then `error` ends the struct (`TracerTemplate::start`).
const _: () = {
    use std::mem::{offset_of, size_of};
    let grants = offset_of!(HelperContext, grants);
    assert!(
        grants > offset_of!(HelperContext, func_ip) && grants > offset_of!(HelperContext, user)
    );
    assert!(
        offset_of!(HelperContext, error) + size_of::<Option<ExecError>>()
            == size_of::<HelperContext>()
    );
};
// arm64 stores pc and id with one 64-bit store: id must be the upper half of an aligned word.
const _: () = assert!(
    CTX_CALL_PC % 8 == 0 && std::mem::offset_of!(HelperContext, call_id) as i32 == CTX_CALL_PC + 4
);

/// The bound generated code compares an access of `size` bytes with (see `mem_bound`).
pub(crate) const fn ctx_bound(size: usize, access: Access) -> i32 {
    let base = match access {
        Access::Load => CTX_MEM_BOUND,
        Access::Store | Access::Atomic => CTX_STORE_BOUND,
    };
    base + 8 * size.trailing_zeros() as i32
}

/// The stack bound generated code compares an access of `size` bytes with (see `stack_bound`).
pub(crate) const fn ctx_stack_bound(size: usize) -> i32 {
    CTX_STACK_BOUND + 8 * size.trailing_zeros() as i32
}

impl HelperContext {
    /// A context with `first` as the inline-checked region and `extra` after it, the stack at
    /// `stack_base`. It records the addresses only: whoever runs with it keeps `extra` and
    /// `helpers` alive meanwhile.
    pub(crate) fn new(
        first: MemRegion,
        stack_base: u64,
        extra: &[MemRegion],
        helpers: &Helpers,
        budget: Option<u64>,
    ) -> HelperContext {
        HelperContext::from_parts(first, stack_base, extra, helpers, budget)
    }

    fn from_parts(
        first: MemRegion,
        stack_base: u64,
        extra: *const [MemRegion],
        helpers: *const Helpers,
        budget: Option<u64>,
    ) -> HelperContext {
        let mem_len = first.len;
        let mem_bound = [1u64, 2, 4, 8].map(|n| mem_len.saturating_sub(n - 1));
        let budgeted = budget.is_some();
        let budget = budget.unwrap_or(u64::MAX);
        HelperContext {
            stack_base,
            stack_low: stack_base + TOTAL_STACK as u64,
            stack_bound: [0; 4],
            // An empty region has no address (r1 = 0 for an empty input), as in the interpreter.
            mem_start: if mem_len == 0 { 0 } else { first.start },
            mem_bound,
            store_bound: if first.writable { mem_bound } else { [0; 4] },
            fp_limit: stack_base + STACK_SIZE as u64,
            budget_left: budget,
            failed: 0,
            call_pc: 0,
            call_id: 0,
            helpers,
            arg2: 0,
            budget,
            mem_len,
            mem_writable: first.writable,
            checked: true,
            budgeted,
            tail_calls: 0,
            extra: extra as *const MemRegion,
            extra_len: extra.len(),
            user: std::ptr::null_mut(),
            maps: std::ptr::null(),
            maps_len: 0,
            attach_cookie: 0,
            func_ip: 0,
            grants: Grants::new(),
            error: None,
        }
    }

    /// Sets the user pointer and the known maps of `env`.
    pub(crate) fn set_env(&mut self, env: &RunEnv<'_>) {
        self.user = env.user;
        self.maps = env.maps.as_ptr();
        self.maps_len = env.maps.len();
    }

    /// In a tracer's run (fentry, fexit, fmod_ret), the cookie its link was attached with; 0
    /// otherwise.
    pub fn attach_cookie(&self) -> u64 {
        self.attach_cookie
    }

    /// In a tracer's run, the entry address of the traced program; 0 otherwise.
    pub fn func_ip(&self) -> u64 {
        self.func_ip
    }

    /// The run's [`RunEnv::user`] pointer (null when the run was not started with one).
    pub fn user(&self) -> *mut c_void {
        self.user
    }

    /// Whether the run's memory accesses are checked: always in the interpreter, in JIT code
    /// when its entry program was compiled with [`JitOptions::checked`](crate::jit::JitOptions).
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// Whether checked code may access `[addr, addr + size)` for `access` — exactly the decision
    /// a checked load, store or atomic makes: inside a region of the run (stores and atomics
    /// need a writable one), the run's stack, or a region granted so far. Always true in a
    /// trusted run: nothing is checked there.
    pub fn allows(&self, addr: u64, size: u64, access: Access) -> bool {
        !self.checked || self.permits(addr, size, access)
    }

    /// The check itself, whatever the run's mode (checked code inside a trusted run, the
    /// interpreter).
    pub(crate) fn permits(&self, addr: u64, size: u64, access: Access) -> bool {
        // As `MemRegion::contains`, without a possible overflow panic (this runs inside JIT code).
        let contains = |start: u64, len: u64| {
            addr >= start
                && addr
                    .checked_add(size)
                    .is_some_and(|end| end <= start.wrapping_add(len))
        };
        let writes = access != Access::Load;
        if self.mem_len != 0
            && contains(self.mem_start, self.mem_len)
            && (!writes || self.mem_writable)
        {
            return true;
        }
        if contains(self.stack_low, self.stack_top() - self.stack_low) {
            return true;
        }
        let ok = |r: &MemRegion| contains(r.start, r.len) && (!writes || r.writable);
        self.extra().iter().any(ok) || self.grants.iter().any(|g| ok(&g.region))
    }

    /// The inline test of checked JIT code, for an access of `1 << log2` bytes at `addr` (a
    /// store or atomic when `writes`): inside the stack window, or inside the first region
    /// (writable for writes). True only where [`permits`](Self::permits) is (regions do not
    /// wrap around the address space); when false, `permits` decides.
    #[inline(always)]
    pub(crate) fn permits_inline(&self, addr: u64, log2: usize, writes: bool) -> bool {
        let mem_bound = if writes {
            &self.store_bound
        } else {
            &self.mem_bound
        };
        addr.wrapping_sub(self.stack_low) < self.stack_bound[log2]
            || addr.wrapping_sub(self.mem_start) < mem_bound[log2]
    }

    fn stack_top(&self) -> u64 {
        self.stack_base + TOTAL_STACK as u64
    }

    /// Makes the run's stack window reach down to `need` (at least the stack's base): zeroes
    /// what it adds. Every engine calls it when a function is entered, with the function's r10
    /// minus its [`StackReach`](crate::isa::StackReach), so that what a run can read of its
    /// stack is zero or what the run itself wrote — never an earlier run's data.
    pub(crate) fn reserve_stack(&mut self, need: u64) {
        let need = need.max(self.stack_base);
        if need >= self.stack_low {
            return;
        }
        // SAFETY: `[stack_base, stack_base + TOTAL_STACK)` is the run's own stack, writable
        // and used by nothing else during the run (the contract of every constructor), and
        // `[need, stack_low)` lies inside it. The stack is only touched by raw accesses (JIT
        // code, the interpreter's checked pointer accesses), never through Rust references.
        unsafe {
            std::ptr::write_bytes(need as *mut u8, 0, (self.stack_low - need) as usize);
        }
        self.stack_low = need;
        let len = self.stack_top() - need;
        self.stack_bound = [1u64, 2, 4, 8].map(|n| len.saturating_sub(n - 1));
    }

    /// Prepares the stack for a run's entry function, whose r10 is the stack's top.
    pub(crate) fn enter_run(&mut self, reach: crate::isa::StackReach) {
        self.enter_function(self.stack_top(), reach);
    }

    /// [`reserve_stack`](Self::reserve_stack) for a function entered with r10 = `fp` that
    /// reaches `reach` below it.
    pub(crate) fn enter_function(&mut self, fp: u64, reach: crate::isa::StackReach) {
        let need = match reach {
            crate::isa::StackReach::Bytes(n) => fp.saturating_sub(n as u64),
            crate::isa::StackReach::Unbounded => self.stack_base,
        };
        self.reserve_stack(need);
    }

    /// At a tail call's entry: the target reuses the frame at `fp` and gets `r1` from its
    /// caller. Its own analysis cannot see where r1 points, nor, when the frame is not the
    /// entry frame, which BPF caller its exit returns pointers to; both cases get the whole
    /// stack (rare: a stack pointer as the context, a tail call from a subprogram).
    pub(crate) fn enter_tail_call(&mut self, fp: u64, r1: u64) {
        if fp != self.stack_top() || r1.wrapping_sub(self.stack_base) < TOTAL_STACK as u64 {
            self.reserve_stack(self.stack_base);
        }
    }

    fn extra(&self) -> &[MemRegion] {
        if self.extra_len == 0 {
            &[]
        } else {
            // SAFETY: `extra`/`extra_len` come from a slice that the context's creator keeps
            // alive for the run (a borrow of `RunContext`, or the contract of `init_raw`).
            unsafe { std::slice::from_raw_parts(self.extra, self.extra_len) }
        }
    }

    /// Lets the rest of this run access `region` too, as if it were one of the run's regions:
    /// [`allows`](Self::allows) and checked code accept it from now on (the latter through its
    /// out-of-line path). For memory a helper hands the program that stays valid until the run
    /// ends: a map value from a lookup, a ring buffer record. An exact repeat of a granted
    /// region is not added again; empty regions are ignored.
    ///
    /// Returns true when the region is granted. A run holds at most [`MAX_GRANTS`] distinct
    /// regions; the grant after that ends the run with [`ExecError::HelperFault`] (naming the
    /// helper call) and returns false — the helper should then return 0. In a trusted run this
    /// does nothing and returns true (nothing is checked there).
    ///
    /// Grants belong to the run: they end with it, and a later run starts with none.
    pub fn grant(&mut self, region: MemRegion) -> bool {
        self.add_grant(Grant {
            region,
            record: false,
        })
    }

    fn add_grant(&mut self, g: Grant) -> bool {
        if !self.checked || g.region.len == 0 {
            return true;
        }
        if self.grants.add(g) {
            return true;
        }
        self.fail_helper(format!(
            "the run was granted more than {MAX_GRANTS} distinct regions (map values, ring \
             buffer records); look up fewer distinct elements per run"
        ));
        false
    }

    /// Withdraws a region granted earlier in this run with [`grant`](Self::grant); `region`
    /// must equal the granted one. Returns whether it was granted.
    pub fn revoke(&mut self, region: MemRegion) -> bool {
        let g = Grant {
            region,
            record: false,
        };
        self.checked && self.grants.remove(|x| *x == g).is_some()
    }

    /// The granted region that starts at `addr`, if any (always `None` in a trusted run).
    pub fn granted_at(&self, addr: u64) -> Option<MemRegion> {
        self.grants
            .iter()
            .find(|g| g.region.start == addr)
            .map(|g| g.region)
    }

    /// Regions granted so far in this run.
    pub fn grant_count(&self) -> usize {
        self.grants.count()
    }

    /// Grants a ring buffer record reserved in this run, until [`release_record`] takes it back.
    ///
    /// [`release_record`]: HelperContext::release_record
    pub(crate) fn grant_record(&mut self, region: MemRegion) -> bool {
        self.add_grant(Grant {
            region,
            record: true,
        })
    }

    /// Takes back the record granted at `addr`: false if there is none (never reserved in this
    /// run, or already submitted or discarded).
    pub(crate) fn release_record(&mut self, addr: u64) -> bool {
        self.grants
            .remove(|g| g.record && g.region.start == addr)
            .is_some()
    }

    /// Ends the run with `error`: the engine returns it once the helper returns (its return
    /// value is discarded). The first error of a run wins.
    pub fn fail(&mut self, error: ExecError) {
        self.error.get_or_insert(error);
        self.failed = 1;
    }

    /// Ends the run with [`ExecError::HelperFault`] for the helper call in progress.
    pub fn fail_helper(&mut self, reason: impl Into<Cow<'static, str>>) {
        let error = ExecError::HelperFault {
            pc: self.pc(),
            helper: self.call_id,
            reason: reason.into(),
        };
        self.fail(error);
    }

    /// [`allows`](Self::allows), and if not, ends the run with [`ExecError::OutOfBounds`] at the
    /// helper call (as if the call instruction had made the access) and returns false. For a
    /// helper's pointer arguments.
    pub fn check(&mut self, addr: u64, size: u64, access: Access) -> bool {
        if self.allows(addr, size, access) {
            return true;
        }
        self.fail(ExecError::OutOfBounds {
            pc: self.pc(),
            addr,
            size,
            access,
        });
        false
    }

    /// Whether the run has already failed.
    pub fn has_failed(&self) -> bool {
        self.failed != 0
    }

    /// Slot index of the helper call in progress (0 outside a context helper call).
    pub fn pc(&self) -> usize {
        self.call_pc as usize
    }

    /// Id of the helper in progress.
    pub fn helper_id(&self) -> u32 {
        self.call_id
    }

    /// The maps this run knows ([`RunEnv::maps`]).
    pub fn maps(&self) -> &[*const RawMap] {
        if self.maps_len == 0 {
            &[]
        } else {
            // SAFETY: from the `RunEnv` the run started with, which outlives the run.
            unsafe { std::slice::from_raw_parts(self.maps, self.maps_len) }
        }
    }

    /// The map at `addr` if it is one of the run's [`RunEnv::maps`]: the check a helper makes on
    /// a map argument (a program can pass any value in r1), one comparison per known map.
    pub fn map(&self, addr: u64) -> Option<&RawMap> {
        let m = *self.maps().iter().find(|m| **m as u64 == addr)?;
        // SAFETY: `run_env`'s contract: every listed map is alive for the whole run.
        Some(unsafe { &*m })
    }

    /// The map argument of a helper: [`map`](Self::map) in a checked run or one that lists its
    /// maps; in a trusted run without a list, `addr` taken on trust.
    ///
    /// # Safety
    /// In a trusted run with no [`RunEnv::maps`], `addr` must be the address of a map
    /// ([`Map::as_raw`](crate::maps::Map::as_raw)) that stays alive until the run ends — what
    /// [`JitOptions::trusted`](crate::jit::JitOptions::trusted) makes its caller vouch for about
    /// the programs' helper arguments.
    pub unsafe fn map_arg(&self, addr: u64) -> Option<&RawMap> {
        if self.checked || self.maps_len != 0 {
            return self.map(addr);
        }
        // SAFETY: the caller's contract.
        (addr != 0).then(|| unsafe { &*(addr as *const RawMap) })
    }

    /// Whether the run's code counts a budget.
    pub(crate) fn budgeted(&self) -> bool {
        self.budgeted
    }

    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    pub(crate) fn set_checked(&mut self, checked: bool) {
        self.checked = checked;
    }

    pub(crate) fn set_call(&mut self, pc: usize, id: u32) {
        self.call_pc = pc as u32;
        self.call_id = id;
    }

    pub(crate) fn helpers_ptr(&self) -> *const Helpers {
        self.helpers
    }

    pub(crate) fn arg2(&self) -> u64 {
        self.arg2
    }

    /// Records `error` from a runtime function (the first error wins).
    pub(crate) fn set_error(&mut self, error: ExecError) {
        self.fail(error);
    }

    /// The error the run ended with, if any.
    pub(crate) fn take_error(&mut self) -> Option<ExecError> {
        self.failed = 0;
        self.error.take()
    }
}

impl Drop for HelperContext {
    fn drop(&mut self) {
        self.grants.release();
    }
}

/// A [`HelperContext`] borrowing what its run uses: the stack, the regions, the helpers, the
/// environment. Generated code receives a pointer to it (the program ABI's last argument, see
/// [`crate::jit`]) and helpers the same address as a `*mut HelperContext`.
#[repr(transparent)]
pub struct RunContext<'a> {
    state: HelperContext,
    _borrows: PhantomData<(&'a mut [u8], &'a [MemRegion], &'a Helpers, RunEnv<'a>)>,
}

impl<'a> RunContext<'a> {
    /// A context for one run over `mem` (writable), with `stack` (its contents do not matter:
    /// the run zeroes what it reaches), `extra` regions, the `helpers` of the run's entry program
    /// and the run's `budget` of back edges and calls (only code compiled with a budget counts;
    /// give it the program's [`JitProgram::budget`](crate::jit::JitProgram::budget); `None` is
    /// as good as unlimited). The run counts as checked ([`HelperContext::is_checked`]).
    pub fn new(
        mem: &'a mut [u8],
        stack: &'a mut JitStack,
        extra: &'a [MemRegion],
        helpers: &'a Helpers,
        budget: Option<u64>,
    ) -> RunContext<'a> {
        // SAFETY: the stack is borrowed exclusively for `'a`.
        unsafe { RunContext::over_stack(mem, stack, extra, helpers, budget) }
    }

    /// [`RunContext::new`] on a stack given by address, which may be uninitialised memory.
    ///
    /// # Safety
    /// `stack` is valid for reads and writes of a `JitStack`, and nothing else uses it, for `'a`.
    pub(crate) unsafe fn over_stack(
        mem: &'a mut [u8],
        stack: *mut JitStack,
        extra: &'a [MemRegion],
        helpers: &'a Helpers,
        budget: Option<u64>,
    ) -> RunContext<'a> {
        let mem_start = if mem.is_empty() {
            0
        } else {
            mem.as_mut_ptr() as u64
        };
        let input = MemRegion::new(mem_start, mem.len() as u64, true);
        RunContext::wrap(HelperContext::from_parts(
            input,
            stack as u64,
            extra,
            helpers,
            budget,
        ))
    }

    /// A context for a run in `env` (see [`RunEnv`]): `env.regions[0]` is the region checked
    /// inline, the others and later grants out of line.
    ///
    /// # Safety
    /// The regions and maps of `env` are valid as `run_env` requires for the whole run
    /// ([`JitProgram::run_env`](crate::jit::JitProgram::run_env)); `stack` as for
    /// [`RunContext::over_stack`].
    pub(crate) unsafe fn from_env(
        env: &'a RunEnv<'a>,
        extra: &'a [MemRegion],
        stack: *mut JitStack,
        helpers: &'a Helpers,
        budget: Option<u64>,
    ) -> RunContext<'a> {
        let first = env
            .regions
            .first()
            .copied()
            .unwrap_or(MemRegion::new(0, 0, true));
        let mut state = HelperContext::from_parts(first, stack as u64, extra, helpers, budget);
        state.set_env(env);
        RunContext::wrap(state)
    }

    fn wrap(state: HelperContext) -> RunContext<'a> {
        RunContext {
            state,
            _borrows: PhantomData,
        }
    }

    /// r1 of a run over an input: its address, or 0 when it is empty.
    pub fn mem_addr(&self) -> u64 {
        self.state.mem_start
    }

    /// r2 of a run over an input: its length.
    pub fn mem_len(&self) -> u64 {
        self.state.mem_len
    }

    /// The error the run ended with, if any.
    pub fn take_error(&mut self) -> Option<ExecError> {
        self.state.take_error()
    }

    /// The context as helpers see it.
    pub(crate) fn state(&mut self) -> &mut HelperContext {
        &mut self.state
    }
}

impl RunContext<'static> {
    /// Initialises a context in place, for callers that keep it in raw memory (a trampoline's
    /// frame): input `mem`, which checked code may write only if `mem.writable` (trusted code
    /// is not checked at all), `stack`, no extra regions, `helpers` of the program and the run's
    /// `budget` (as for [`RunContext::new`]). Pair it with [`RunContext::take_raw`].
    ///
    /// # Safety
    /// `ctx` is valid for writing a `RunContext` and aligned for it (any old contents are
    /// overwritten, not dropped). Until `take_raw`, `mem` must be valid for reads (and writes,
    /// if writable or run by trusted code), `stack` must point at a `JitStack` that nothing else
    /// uses, and `helpers` must stay alive.
    pub unsafe fn init_raw(
        ctx: *mut RunContext<'static>,
        mem: MemRegion,
        stack: *mut JitStack,
        helpers: &Helpers,
        budget: Option<u64>,
    ) {
        let empty: &[MemRegion] = &[];
        let value = RunContext::wrap(HelperContext::from_parts(
            mem,
            stack as u64,
            empty,
            helpers,
            budget,
        ));
        // SAFETY: the caller guarantees `ctx` is valid and aligned for this write.
        unsafe { ctx.write(value) };
    }

    /// Ends a context made by [`RunContext::init_raw`] (or a tracer template) in place,
    /// returning the error its run ended with, if any. Its memory then owns nothing (it need
    /// not be dropped).
    ///
    /// # Safety
    /// `ctx` was initialised by `init_raw` or a tracer template, no code runs with it any more,
    /// and it is not used again (except to be initialised anew).
    pub unsafe fn take_raw(ctx: *mut RunContext<'static>) -> Option<ExecError> {
        // SAFETY: per the contract, `ctx` holds an initialised context that nothing else uses.
        let state = unsafe { &mut (*ctx).state };
        state.grants.release();
        state.take_error()
    }
}

/// A tracer's run context prepared once, when the tracer is attached: everything a tracer run
/// starts from except what differs per run (where the saved arguments and the stack are), so a
/// run copies it instead of building a context field by field.
pub(crate) struct TracerTemplate {
    state: HelperContext,
    reach: crate::isa::StackReach,
}

// SAFETY: the template only records addresses (helpers, regions, maps) that its owner keeps
// alive, and is never run with itself: it is only read, to be copied.
unsafe impl Send for TracerTemplate {}
// SAFETY: as above; shared references only read it.
unsafe impl Sync for TracerTemplate {}

impl TracerTemplate {
    /// A template for runs over an `args_len`-byte read-only argument block, with the tracer's
    /// helpers, budget, mode, extra regions and maps, its link's cookie and the traced entry,
    /// and the tracer's entry function's stack reach.
    ///
    /// # Safety
    /// `helpers`, `extra` and the maps of `maps` outlive the template and every run started
    /// from it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn new(
        args_len: u64,
        helpers: &Helpers,
        budget: Option<u64>,
        checked: bool,
        extra: &[MemRegion],
        maps: &[*const RawMap],
        cookie: u64,
        func_ip: u64,
        reach: crate::isa::StackReach,
    ) -> TracerTemplate {
        // The start address is set per run; any non-zero one keeps the region non-empty.
        let mut state = HelperContext::from_parts(
            MemRegion::new(1, args_len, false),
            0,
            extra,
            helpers,
            budget,
        );
        state.set_checked(checked);
        state.maps = maps.as_ptr();
        state.maps_len = maps.len();
        state.attach_cookie = cookie;
        state.func_ip = func_ip;
        TracerTemplate { state, reach }
    }

    /// Starts a run in `ctx`: the template, with the argument block at `args` and the stack
    /// `stack` (any contents: the run zeroes what the tracer reaches). Pair it with
    /// [`RunContext::take_raw`].
    ///
    /// # Safety
    /// As for [`RunContext::init_raw`]: `ctx` is valid and aligned for a `RunContext` (old
    /// contents are overwritten, not dropped), `args` is valid for reads of the template's
    /// length and `stack` is a `JitStack` nothing else uses, until `take_raw`.
    pub(crate) unsafe fn start(
        &self,
        ctx: *mut RunContext<'static>,
        args: u64,
        stack: *mut JitStack,
    ) {
        // SAFETY: forwarded from the caller.
        let state = unsafe { start_from(&self.state, ctx, stack) };
        state.mem_start = args;
        state.enter_run(self.reach);
    }
}

/// Initialises `ctx` as a copy of `template` on the stack `stack`. The plain fields come before
/// the grants and the error (`repr(C)`): their bytes are copied, then those two start afresh —
/// fewer stores than building the context field by field, and no duplicate of anything that
/// owns memory.
///
/// # Safety
/// `ctx` is valid and aligned for a `RunContext` (old contents are overwritten, not dropped);
/// `stack` is a `JitStack` nothing else uses while the context lives.
unsafe fn start_from<'c>(
    template: &HelperContext,
    ctx: *mut RunContext<'static>,
    stack: *mut JitStack,
) -> &'c mut HelperContext {
    const PLAIN: usize = std::mem::offset_of!(HelperContext, grants);
    // SAFETY: `ctx` is valid and aligned for the writes (the contract); the first `PLAIN` bytes
    // of a `HelperContext` are its plain-data fields (integers, pointers, bools, arrays of
    // them), so copying them is copying those values; the other two fields are then written in
    // place, making the whole context initialised.
    let state = unsafe {
        let dst = std::ptr::addr_of_mut!((*ctx).state);
        std::ptr::copy_nonoverlapping(
            (template as *const HelperContext).cast::<u8>(),
            dst.cast::<u8>(),
            PLAIN,
        );
        Grants::init_in_place(std::ptr::addr_of_mut!((*dst).grants));
        std::ptr::addr_of_mut!((*dst).error).write(None);
        &mut *dst
    };
    state.stack_base = stack as u64;
    state.stack_low = state.stack_top();
    state.fp_limit = stack as u64 + STACK_SIZE as u64;
    state
}

/// The context of a run without input memory or extra regions ([`JitProgram::call`]), made
/// once when the program is compiled: a call copies it, as a tracer run copies its
/// [`TracerTemplate`], instead of building a context field by field.
///
/// [`JitProgram::call`]: crate::jit::JitProgram::call
pub(crate) struct CallTemplate {
    state: HelperContext,
}

impl std::fmt::Debug for CallTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallTemplate")
    }
}

// SAFETY: as for `TracerTemplate`: only the helpers' address, which the owner keeps alive.
unsafe impl Send for CallTemplate {}
// SAFETY: as above.
unsafe impl Sync for CallTemplate {}

impl CallTemplate {
    /// A template with `helpers` and `budget`, no input and no regions.
    ///
    /// # Safety
    /// `helpers` outlives the template and every run started from it.
    pub(crate) unsafe fn new(helpers: &Helpers, budget: Option<u64>) -> CallTemplate {
        let state = HelperContext::from_parts(MemRegion::new(0, 0, true), 0, &[], helpers, budget);
        CallTemplate { state }
    }

    /// Starts a call's context in `ctx` on `stack`, exactly what [`RunContext::over_stack`]
    /// builds for an empty input, no regions and the template's helpers and budget.
    ///
    /// # Safety
    /// As for `start_from`: `ctx` valid and aligned for a `RunContext` (overwritten, not
    /// dropped), `stack` a `JitStack` nothing else uses while the context lives.
    pub(crate) unsafe fn start(&self, ctx: *mut RunContext<'static>, stack: *mut JitStack) {
        // SAFETY: forwarded from the caller.
        unsafe { start_from(&self.state, ctx, stack) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call's context copied from its template is the context `over_stack` builds for the same
    /// call, field by field.
    #[test]
    fn a_call_template_starts_the_context_over_stack_builds() {
        let helpers = Helpers::new();
        for budget in [None, Some(1000)] {
            let mut stack = std::mem::MaybeUninit::<JitStack>::uninit();
            // SAFETY: the helpers outlive the template.
            let template = unsafe { CallTemplate::new(&helpers, budget) };
            let mut copied = std::mem::MaybeUninit::<RunContext<'static>>::uninit();
            // SAFETY: both are this test's own.
            unsafe { template.start(copied.as_mut_ptr(), stack.as_mut_ptr()) };
            // SAFETY: initialised just above.
            let copied = unsafe { copied.assume_init() };
            // SAFETY: the same stack, unused by the copied context (nothing runs).
            let built = unsafe {
                RunContext::over_stack(&mut [], stack.as_mut_ptr(), &[], &helpers, budget)
            };
            let (a, b) = (&copied.state, &built.state);
            macro_rules! same {
                ($($field:ident),*) => {
                    $(assert_eq!(a.$field, b.$field, stringify!($field));)*
                };
            }
            same!(
                stack_low,
                stack_bound,
                mem_start,
                mem_bound,
                store_bound,
                budget_left,
                failed,
                stack_base,
                fp_limit,
                call_pc,
                call_id,
                helpers,
                arg2,
                budget,
                mem_len,
                mem_writable,
                checked,
                budgeted,
                tail_calls,
                extra_len,
                user,
                maps,
                maps_len,
                attach_cookie,
                func_ip
            );
            assert!(a.error.is_none() && b.error.is_none());
        }
    }
}
