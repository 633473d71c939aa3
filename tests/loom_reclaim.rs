//! loom runs the retirement protocol's real code, `src/reclaim/core.rs`, under every interleaving
//! and every weak-memory outcome loom models, up to a preemption bound (issue 8: check the real
//! code, not only `models/retire.pml`).
//!
//! The file is included with `#[path]`, not copied: `core.rs` takes its atomics, `Arc`, `Mutex`
//! and `reader_fence` from `super::shim`, and the `shim` below supplies loom's. The library's
//! `shim` (in `src/reclaim/mod.rs`) supplies std's, and a compiler fence as `reader_fence`.
//!
//! # Why a `SeqCst` fence for each reader fence and for each membarrier is sound
//! The real readers execute plain relaxed loads and stores with `compiler_fence(SeqCst)` between
//! them; the real writer's `barrier` is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`. The model
//! has a `fence(SeqCst)` at each reader fence and as the writer's `barrier`. The claim is that
//! every outcome of the real program (the values its loads return, hence which assertions fail)
//! is an outcome loom can produce, so "loom finds no violation" carries over, within the limits
//! listed at the end.
//!
//! 1. *What the real program guarantees.* A compiler fence keeps the emitted instructions in
//!    source order across it, so each reader's instruction stream is a sequence of *segments*
//!    (the code between two reader fences) in program order; inside a segment the compiler and
//!    the CPU may reorder. `membarrier` returns only after every other thread of the process has
//!    executed a full memory barrier at some instruction boundary `P` inside the call (a thread
//!    that is not running passes one in the scheduler), and the caller executes full barriers
//!    on entry and exit. So for each membarrier `B` and each reader: the reader's accesses
//!    before `P` are ordered before the writer's accesses after `B`, and the writer's accesses
//!    before `B` are ordered before the reader's accesses after `P`.
//! 2. *The corresponding model execution.* Say `P` falls in the segment ending at reader fence
//!    `F`. Schedule the model's `B` (a `SeqCst` fence) just before `F`. loom totally orders
//!    `SeqCst` fences by schedule and makes each one happen-after every earlier one (plus
//!    acquire/release fence semantics), so the model gives: the writer's accesses before `B`
//!    happen before the reader's accesses after `F` — implied by the real guarantee, since they
//!    are after `P`. The model gives nothing about the reader's accesses before `F` and the
//!    writer's after `B` unless an earlier fence orders them; the real program orders those
//!    before `P`. Every ordering the model imposes on reader/writer pairs is one the real
//!    program also imposes, so the values the real loads return are allowed in the model.
//! 3. *Reader against reader.* loom also orders the readers' `SeqCst` fences among themselves,
//!    which the real compiler fences do not. That cannot hide a bug here: readers share nothing
//!    but `Mutex`-protected lists (ordered in the real program too); their own relaxed stores
//!    (epoch, reference slots) are read only by the writer; they read only the writer's site,
//!    epoch and `freed` stores. A reader-to-reader edge can therefore only pass on what another
//!    reader learnt from the writer: a newer epoch or `freed` flag (which can only make a
//!    violation *more* likely) or a newer site value; but every site store in the protocol is
//!    followed by a membarrier, so a reader whose fence comes later in the schedule already
//!    sees it through that fence directly.
//! 4. *Plain stores vs relaxed atomics.* The real record fields are atomics accessed `Relaxed`,
//!    exactly as modelled; only the ordering *between* them comes from the fences. The one
//!    ordered reader store, `image_exit`'s `Release`, is a real release store in both.
//!
//! Limits: loom explores interleavings up to the preemption bound given per model (not
//! exhaustively beyond it); a load may only read stores already executed in the schedule (no
//! load buffering), which loses nothing here because every writer load that feeds a later
//! writer store is `Acquire` or followed by a barrier, and reader-to-reader communication is
//! only through locks; loom keeps the last 7 stores of each atomic (every atomic here has
//! fewer); `SeqCst` *accesses* count as `AcqRel` in loom (weaker, so sound); instruction
//! fetch of a patch site is modelled as a relaxed load of an `AtomicUsize` (cross-modifying
//! code's own rules are the poke's business, see `src/text`).
//!
//! # What is checked
//! A *site* is an `AtomicUsize` holding an image id or 0; each image has a `freed` flag
//! (`AtomicBool`) and a `body` (`loom::cell::UnsafeCell`). A runner reads the body whenever it
//! executes the image and asserts `freed` is false; the retirer sets `freed` and writes the
//! body when it frees, so loom also reports a free that is not ordered after every execution
//! of the image (a data race), not only one the runner happens to observe.
//!
//! Run time and executions (release build, 2 shared cores) are noted at each model; each model
//! prints its count. `LOOM_MAX_PREEMPTIONS` is ignored: each bound is fixed here.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

mod shim {
    pub use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    pub use loom::sync::{Arc, Mutex, MutexGuard};

    /// A reader fence: what the writer's membarrier turns the compiler fence into (module docs).
    pub fn reader_fence() {
        loom::sync::atomic::fence(Ordering::SeqCst);
    }

    pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// The protocol itself, the library's own file. Some of it (thread ids, fork support) is not
// exercised here.
#[allow(dead_code)]
#[path = "../src/reclaim/core.rs"]
mod core;

use self::core::{Domain, MAX_NESTED_IMAGES, Reader, RetireState, Retiring, Worker};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

/// Image ids 1..IMAGES; 0 is "no image" (the site is a nop).
const IMAGES: usize = 4;

struct World {
    domain: Domain,
    sites: [AtomicUsize; 2],
    freed: [AtomicBool; IMAGES],
    body: [UnsafeCell<u8>; IMAGES],
}

// SAFETY: `body` is only touched through loom's `UnsafeCell`, which checks every access.
unsafe impl Sync for World {}

impl World {
    fn new(sites: [usize; 2]) -> Arc<World> {
        Arc::new(World {
            domain: Domain::new(),
            sites: sites.map(AtomicUsize::new),
            freed: std::array::from_fn(|_| AtomicBool::new(false)),
            body: std::array::from_fn(|_| UnsafeCell::new(0)),
        })
    }

    /// The patch site: an instruction fetch, a relaxed load.
    fn fetch(&self, site: usize) -> usize {
        self.sites[site].load(Ordering::Relaxed)
    }

    /// The runner executes code of `image` (`what` says where it is).
    fn execute(&self, image: usize, what: &str) {
        SEEN.with(|s| s.entered.set(true));
        assert!(
            !self.freed[image].load(Ordering::Relaxed),
            "use after free: image {image} freed while a runner {what}"
        );
        if SEEN.with(|s| s.race_check.get()) {
            self.body[image].with(|p| unsafe { std::ptr::read_volatile(p) });
        }
    }

    /// The retirer frees `image`.
    fn free(&self, image: usize) {
        self.freed[image].store(true, Ordering::Relaxed);
        if SEEN.with(|s| s.race_check.get()) {
            self.body[image].with_mut(|p| unsafe { *p = 0xcc });
        }
    }

    /// The poke that unlinks: store the site, then the poke's closing membarrier.
    fn unlink(&self, site: usize, to: usize) {
        self.sites[site].store(to, Ordering::Relaxed);
        membarrier();
    }
}

/// Per-model settings and statistics. loom runs all threads of a model as coroutines on the
/// test's own OS thread, so a std thread-local is shared by them and private to the test.
struct Seen {
    /// Whether `body` accesses are made (loom's data-race check); the `freed` assertion always is.
    race_check: Cell<bool>,
    /// Whether some runner executed an image in the current execution.
    entered: Cell<bool>,
}

thread_local! {
    static SEEN: Seen = const {
        Seen {
            race_check: Cell::new(true),
            entered: Cell::new(false),
        }
    };
}

/// The writer's `barrier` (membarrier) in the model.
fn membarrier() {
    loom::sync::atomic::fence(Ordering::SeqCst);
}

fn wait(_spins: u32) {
    thread::yield_now();
}

/// How a runner behaves inside an image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inside {
    /// The tracers and the original run, online.
    Plain,
    /// The original blocks in a helper: quiescent while it holds the reference.
    Quiesce,
    /// A tracer runs a program whose site 1 branches into a second image (nested references).
    Nested,
}

/// One run of the traced program through site 0: go online, fetch the site, and if it branches
/// into an image, take the reference, run, drop it, run the epilogue, go offline.
fn run_traced(w: &World, r: &Reader, inside: Inside) {
    r.read_lock(&w.domain);
    let image = w.fetch(0);
    if image != 0 {
        w.execute(image, "entered it, before taking the reference");
        r.image_enter(&w.domain, image);
        w.execute(image, "held its reference");
        match inside {
            Inside::Plain => {}
            Inside::Quiesce => {
                let saved = r.quiesce();
                w.execute(image, "was blocked (quiescent) in a helper called from it");
                r.resume(&w.domain, saved);
                w.execute(image, "came back from the blocking helper");
            }
            Inside::Nested => {
                let inner = w.fetch(1);
                if inner != 0 {
                    w.execute(inner, "entered it from inside another image");
                    r.image_enter(&w.domain, inner);
                    w.execute(inner, "held its reference (nested)");
                    r.image_exit(&w.domain, inner);
                    w.execute(inner, "ran its epilogue (nested)");
                }
                w.execute(image, "returned from the nested image");
            }
        }
        r.image_exit(&w.domain, image);
        // The thread still executes the image's last instructions until it goes offline.
        w.execute(image, "ran its epilogue, after dropping the reference");
    }
    assert!(r.read_unlock());
}

/// One run of a program whose site 0 may jump to a replacement installed with freplace: no
/// reference, only the grace periods protect the replacement.
fn run_replaced(w: &World, r: &Reader) {
    r.read_lock(&w.domain);
    let replacement = w.fetch(0);
    if replacement != 0 {
        w.execute(replacement, "entered the replacement");
        w.execute(replacement, "returned from the replacement");
    }
    assert!(r.read_unlock());
}

/// A whole thread life: register, `runs` runs, unregister.
fn runner_thread(w: &World, runs: usize, run: impl Fn(&World, &Reader)) {
    let r = w.domain.register(0);
    for _ in 0..runs {
        run(w, &r);
    }
    w.domain.unregister(&r);
}

/// The reclaimer: hands `items` (image to drain, image id to free) to `Worker::step` until
/// every one is returned, freeing each as it comes back. Checks the observed states.
fn retire(w: &World, items: &[(Option<usize>, usize)]) {
    let mut worker: Worker<usize> = Worker::default();
    let mut fresh: Vec<Retiring<usize>> = items
        .iter()
        .enumerate()
        .map(|(i, &(image, item))| Retiring {
            image,
            item,
            id: i as u64,
        })
        .collect();
    let mut states: Vec<Vec<RetireState>> = vec![vec![RetireState::Gp1]; items.len()];
    let mut left = items.len();
    while left > 0 {
        let done = worker.step(
            &w.domain,
            std::mem::take(&mut fresh),
            &mut membarrier,
            &mut wait,
            &mut |item, state| states[item.id as usize].push(state),
        );
        if done.is_empty() {
            thread::yield_now();
        }
        for item in done {
            assert_eq!(
                states[item.id as usize],
                [RetireState::Gp1, RetireState::Draining, RetireState::Gp2]
            );
            w.free(item.item);
            left -= 1;
        }
    }
    assert!(!worker.is_draining());
}

/// Explores `f` with loom up to `preemption_bound` preemptions; returns how many executions
/// there were and in how many a runner executed an image (so a model is not vacuous).
fn explore(
    preemption_bound: usize,
    race_check: bool,
    f: impl Fn() + Sync + Send + 'static,
) -> (u64, u64) {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let entered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemption_bound);
    SEEN.with(|s| s.race_check.set(race_check));
    let (e, n) = (executions.clone(), entered.clone());
    builder.check(move || {
        SEEN.with(|s| s.entered.set(false));
        f();
        e.fetch_add(1, Ordering::Relaxed);
        if SEEN.with(|s| s.entered.get()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    });
    (
        executions.load(Ordering::Relaxed),
        entered.load(Ordering::Relaxed),
    )
}

/// Whether the tests run under an emulator (`LIVEBPF_TEST_RUNNER`, qemu-user in CI). loom
/// explores its own memory model, not the host's, so the models prove nothing more there and
/// take ten times as long: they run natively in the same CI job.
fn emulated(name: &str) -> bool {
    let runner = std::env::var("LIVEBPF_TEST_RUNNER").unwrap_or_default();
    if runner.is_empty() {
        return false;
    }
    eprintln!("loom model {name}: skipped under {runner}; the native run checks it");
    true
}

/// A model that must pass, with both checks on.
fn model(name: &str, preemption_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    if emulated(name) {
        return;
    }
    let start = Instant::now();
    let (executions, entered) = explore(preemption_bound, true, f);
    println!(
        "loom model {name}: preemption bound {preemption_bound}, {executions} executions \
         ({entered} with a runner inside an image), {:.1?}",
        start.elapsed()
    );
    assert!(entered > 0, "model {name} never ran an image: vacuous");
}

/// A model of a broken protocol: each check on its own must find the violation, the `freed`
/// assertion (a runner observes the free) and loom's data-race check on the image's body (the
/// free is not ordered after an execution of the image).
fn model_must_fail(
    name: &str,
    preemption_bound: usize,
    f: impl Fn() + Sync + Send + Clone + 'static,
) {
    if emulated(name) {
        return;
    }
    for (race_check, expect) in [(false, "use after free"), (true, "Causality violation")] {
        let start = Instant::now();
        let f = f.clone();
        let result = catch_unwind(AssertUnwindSafe(|| {
            explore(preemption_bound, race_check, f)
        }));
        let payload =
            result.expect_err("the broken protocol passed the model: the check has no teeth");
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(
            msg.contains(expect) || (race_check && msg.contains("use after free")),
            "the broken protocol {name} failed for another reason than {expect:?}: {msg}"
        );
        println!(
            "loom model {name} (race check {race_check}): violation found as it must be, {:.1?}: {msg}",
            start.elapsed()
        );
    }
}

/// One actor of a model: a runner thread, or the retirer.
type Actor = Box<dyn FnOnce(&World) + Send>;

/// Runs every actor on its own loom thread while the model's main thread only waits, so that
/// any actor may go first without spending a preemption.
fn actors(w: &Arc<World>, actors: Vec<Actor>) {
    let threads: Vec<_> = actors
        .into_iter()
        .map(|actor| {
            let w = w.clone();
            thread::spawn(move || actor(&w))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn traced_runner(runs: usize, inside: Inside) -> Actor {
    Box::new(move |w| runner_thread(w, runs, |w, r| run_traced(w, r, inside)))
}

/// The retirer: unlink `sites` (poke to 0, each ending with a membarrier), then retire `items`
/// through the real `Worker`.
fn retirer(sites: &'static [usize], items: &'static [(Option<usize>, usize)]) -> Actor {
    Box::new(move |w| {
        for &site in sites {
            w.unlink(site, 0);
        }
        retire(w, items);
    })
}

// (a) Two runners and one retirer. Bound A: <fill>
const A: usize = 3;
#[test]
fn a_two_runners_one_retirer() {
    model("a", A, || {
        let w = World::new([1, 0]);
        actors(
            &w,
            vec![
                traced_runner(1, Inside::Plain),
                traced_runner(1, Inside::Plain),
                retirer(&[0], &[(Some(1), 1)]),
            ],
        );
    });
}

// (b) Threads register and exit while the retirement is in flight: a runner thread lives
// twice (register, run, unregister; again), so it may register before the unlink, during the
// grace periods or the drain, or after. Bound B: <fill>
const B: usize = 5;
#[test]
fn b_registration_and_exit_during_retirement() {
    model("b", B, || {
        let w = World::new([1, 0]);
        actors(
            &w,
            vec![
                Box::new(|w| {
                    for _ in 0..2 {
                        runner_thread(w, 1, |w, r| run_traced(w, r, Inside::Plain));
                    }
                }),
                retirer(&[0], &[(Some(1), 1)]),
            ],
        );
    });
}

// (c) Nested references: image 1 (site 0) runs a program whose site 1 branches into image 2;
// both sites are unlinked and both images retired in one batch. Bound C: <fill>
const C: usize = 5;
#[test]
fn c_nested_references() {
    model("c", C, || {
        let w = World::new([1, 2]);
        actors(
            &w,
            vec![
                traced_runner(1, Inside::Nested),
                retirer(&[1, 0], &[(Some(1), 1), (Some(2), 2)]),
            ],
        );
    });
}

// (c') The overflow path: the runner's MAX_NESTED_IMAGES slots are already full (references
// to images that stay), so both its references go to the domain's shared overflow list.
// Bound C_OVERFLOW: <fill>
const C_OVERFLOW: usize = 4;
#[test]
fn c_nested_references_overflow() {
    model("c-overflow", C_OVERFLOW, || {
        let w = World::new([1, 2]);
        // Registered and filled here (one thread, no interleaving to explore), then handed to
        // the runner thread.
        let r = w.domain.register(0);
        for i in 0..MAX_NESTED_IMAGES {
            r.image_enter(&w.domain, 100 + i);
        }
        actors(
            &w,
            vec![
                Box::new(move |w| {
                    run_traced(w, &r, Inside::Nested);
                    // The filler references stay (those images are never retired).
                    w.domain.unregister(&r);
                }),
                retirer(&[1, 0], &[(Some(1), 1), (Some(2), 2)]),
            ],
        );
    });
}

// (d) freplace: site 0 jumps to replacement 3, which takes no reference; it goes back to the
// nop and the replacement is retired with `image: None`, protected by the grace periods alone.
// Bound D: <fill>
const D: usize = 3;
#[test]
fn d_freplace_without_reference() {
    model("d", D, || {
        let w = World::new([3, 0]);
        actors(
            &w,
            vec![
                Box::new(|w| runner_thread(w, 1, run_replaced)),
                Box::new(|w| runner_thread(w, 1, run_replaced)),
                retirer(&[0], &[(None, 3)]),
            ],
        );
    });
}

// (e) A runner goes quiescent (a blocking helper) while it holds the reference: it runs twice,
// so its second run may start while the first one's image is draining. Bound E: <fill>
const E: usize = 4;
#[test]
fn e_quiescent_while_holding_a_reference() {
    model("e", E, || {
        let w = World::new([1, 0]);
        actors(
            &w,
            vec![
                traced_runner(2, Inside::Quiesce),
                retirer(&[0], &[(Some(1), 1)]),
            ],
        );
    });
}

// Negative models: the same runners against a retirer that drives the real `Domain` in a
// broken order (core.rs unchanged). Each must fail, with either check; the control (nothing
// skipped, same driver) must pass, so the failures come from what is skipped.

#[derive(Clone, Copy, Default)]
struct Skip {
    gp1: bool,
    drain: bool,
    gp2: bool,
}

/// Unlinks site 0 and retires `image` by hand: grace period 1, drain, grace period 2, free,
/// minus what `skip` says.
fn retire_by_hand(w: &World, image: usize, skip: Skip) {
    w.unlink(0, 0);
    if !skip.gp1 {
        w.domain.synchronize(&mut membarrier, &mut wait);
    }
    if !skip.drain {
        while w.domain.referenced(image) {
            thread::yield_now();
        }
    }
    if !skip.gp2 {
        w.domain.synchronize(&mut membarrier, &mut wait);
    }
    w.free(image);
}

/// A runner that quiesces in the image, against the hand-driven retirer.
fn against(skip: Skip) -> impl Fn() + Sync + Send + Clone + 'static {
    move || {
        let w = World::new([1, 0]);
        actors(
            &w,
            vec![
                traced_runner(1, Inside::Quiesce),
                Box::new(move |w| retire_by_hand(w, 1, skip)),
            ],
        );
    }
}

/// Bound for the negative models (each fails within a few hundred executions).
const BROKEN: usize = 2;

// Control for the negative models. Bound CONTROL: <fill>
const CONTROL: usize = 5;
#[test]
fn control_hand_driven_protocol_passes() {
    model("control", CONTROL, against(Skip::default()));
}

// Without grace period 1, a runner that fetched the old branch may take the reference only
// after the drain looked, and then block quiescent so grace period 2 does not wait for it.
// (Against runners that never go quiescent, grace period 2 alone would be enough.)
#[test]
fn broken_without_gp1_is_caught() {
    let skip = Skip {
        gp1: true,
        ..Skip::default()
    };
    model_must_fail("no-gp1", BROKEN, against(skip));
}

// Without the drain, a runner quiescent in the image is not waited for.
#[test]
fn broken_without_drain_is_caught() {
    let skip = Skip {
        drain: true,
        ..Skip::default()
    };
    model_must_fail("no-drain", BROKEN, against(skip));
}

// Without grace period 2: the epilogue after `image_exit`, run by a thread that was quiescent
// (holding the reference) during grace period 1. (A runner that never goes quiescent is
// waited for by grace period 1 until it leaves, epilogue included.)
#[test]
fn broken_without_gp2_is_caught() {
    let skip = Skip {
        gp2: true,
        ..Skip::default()
    };
    model_must_fail("no-gp2", BROKEN, against(skip));
}

// freplace with no grace period: the replacement freed right after the site moved back.
#[test]
fn broken_freplace_without_grace_periods_is_caught() {
    model_must_fail("freplace-no-gp", BROKEN, || {
        let w = World::new([3, 0]);
        actors(
            &w,
            vec![
                Box::new(|w| runner_thread(w, 1, run_replaced)),
                Box::new(|w| {
                    w.unlink(0, 0);
                    w.free(3);
                }),
            ],
        );
    });
}

// The memory-ordering half has teeth too: the real `Worker` driven by a writer that issues no
// membarrier (neither after the poke nor in the grace periods). The readers' fences alone do
// not order their epoch store before the writer's scan (store buffering).
#[test]
fn broken_without_membarrier_is_caught() {
    model_must_fail("no-membarrier", BROKEN, || {
        let w = World::new([1, 0]);
        actors(
            &w,
            vec![
                traced_runner(1, Inside::Plain),
                Box::new(|w| {
                    w.sites[0].store(0, Ordering::Relaxed);
                    let mut worker: Worker<usize> = Worker::default();
                    let mut fresh = vec![Retiring {
                        image: Some(1),
                        item: 1,
                        id: 0,
                    }];
                    loop {
                        let done = worker.step(
                            &w.domain,
                            std::mem::take(&mut fresh),
                            &mut || {},
                            &mut wait,
                            &mut |_, _| {},
                        );
                        if !done.is_empty() {
                            break;
                        }
                        thread::yield_now();
                    }
                    w.free(1);
                }),
            ],
        );
    });
}
