//! `bpf_tail_call` on the interpreter and on JIT code in every mode a test binary passes in:
//! chains, the 33-call limit, fall-through cases, tail calls from subprograms, map checks,
//! targets of another mode, and slots replaced while other threads run through them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livebpf::exec::{ExecError, HelperContext, MAX_TAIL_CALL_CNT, MemRegion, RunEnv, TailTarget};
use livebpf::helpers::Helpers;
use livebpf::jit::{JitOptions, JitProgram};
use livebpf::maps::{self, BPF_ANY, Map, MapError, MapSpec, MapType, RawMap};
use livebpf::trampoline::Prog;

use super::engines::{Engine, Loaded, engines};
use super::progen::asm;

/// A context helper that parks its thread until the test lets it go (see [`Rendezvous`]).
pub const PARK_ID: u32 = 110;

/// Where a parked helper waits: 0 idle, 1 parked, 2 released.
static PARK: AtomicU32 = AtomicU32::new(0);
/// Serialises the tests that use `PARK`.
static PARK_USERS: Mutex<()> = Mutex::new(());

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn park(_: u64, _: u64, _: u64, _: u64, _: u64, _: *mut HelperContext) -> u64 {
    PARK.store(1, Ordering::SeqCst);
    while PARK.load(Ordering::SeqCst) != 2 {
        std::thread::yield_now();
    }
    0
}

/// The map helpers, the tail call and [`PARK_ID`].
pub fn tail_helpers() -> Helpers {
    let mut h = Helpers::new();
    maps::helpers::register(&mut h);
    h.register_with_context(PARK_ID, park);
    h
}

fn prog_array(n: u32) -> Map {
    Map::create(&MapSpec::new("pa", MapType::ProgArray, 4, 4, n)).unwrap()
}

/// `src` with `M` replaced by the address of `map`.
fn with_map(src: &str, map: &Map) -> String {
    src.replace("M", &format!("{:#x}", map.as_raw() as u64))
}

/// A run over an 8-byte counter (r1 = its address), knowing `maps`.
struct Run<'a> {
    counter: Box<u64>,
    maps: Vec<*const RawMap>,
    engine: &'a Engine,
    h: Helpers,
}

impl Run<'_> {
    fn load(&self, src: &str) -> Loaded {
        self.engine.load(&asm(src), &self.h)
    }

    /// Runs `p` with the counter at `start`; returns r0 and the counter.
    fn run(&mut self, p: &Loaded, start: u64) -> (Result<u64, ExecError>, u64) {
        *self.counter = start;
        let c = &mut *self.counter as *mut u64 as u64;
        let regions = [MemRegion::new(c, 8, true)];
        let env = RunEnv {
            args: [c, 8, 0, 0, 0],
            regions: &regions,
            maps: &self.maps,
            ..RunEnv::default()
        };
        // SAFETY: the counter and the maps are alive; the counter is not borrowed meanwhile.
        let r = unsafe { p.run(&env) };
        (r, *self.counter)
    }
}

/// `mov r0, v; exit` loaded for `engine`.
fn returns(run: &Run, v: u64) -> Loaded {
    run.load(&format!("mov r0, {v}\nexit"))
}

/// A self tail call through slot 0 that counts its runs in the counter and returns the count.
const SELF_COUNT: &str = "mov r6, r1
ldxdw r0, [r6+0]
add r0, 1
stxdw [r6+0], r0
lddw r2, M
mov r3, 0
call 12
ldxdw r0, [r6+0]
exit";

/// The semantics, on every engine.
pub fn tail_calls_in_every_mode(modes: &[(String, JitOptions)]) {
    for (name, engine) in engines(modes) {
        let pa = prog_array(4);
        let other = Map::create(&MapSpec::new("arr", MapType::Array, 4, 8, 1)).unwrap();
        let mut run = Run {
            counter: Box::new(0),
            maps: vec![pa.as_raw(), other.as_raw()],
            engine: &engine,
            h: tail_helpers(),
        };
        let set =
            |slot: u32, l: &Loaded| pa.prog_array_set(slot, l.tail_target(), BPF_ANY).unwrap();

        // A chain 0 → 1 → 2: each target starts with r1 = ctx and r0, r2–r9 zero.
        let p0 = run.load(&with_map(
            "mov r6, 1\nmov r7, 2\nmov r8, 3\nmov r9, 4\nmov r0, 5\nmov r4, 6\n\
             lddw r2, M\nmov r3, 1\ncall 12\nmov r0, 99\nexit",
            &pa,
        ));
        let p1 = run.load(&with_map(
            "or r0, r2\nor r0, r3\nor r0, r4\nor r0, r5\nor r0, r6\nor r0, r7\nor r0, r8\n\
             or r0, r9\njne r0, 0, bad\n\
             ldxdw r0, [r1+0]\nadd r0, 10\nstxdw [r1+0], r0\n\
             lddw r2, M\nmov r3, 2\ncall 12\nmov r0, 98\nexit\nbad:\nmov r0, 2989\nexit",
            &pa,
        ));
        let p2 = run.load("ldxdw r0, [r1+0]\nadd r0, 100\nexit");
        set(1, &p1);
        set(2, &p2);
        assert_eq!(run.run(&p0, 1), (Ok(111), 11), "{name}: chain");

        // 33 tail calls per run, counted per run: 34 runs of the program.
        let counting = run.load(&with_map(SELF_COUNT, &pa));
        set(0, &counting);
        let runs = MAX_TAIL_CALL_CNT as u64 + 1;
        for _ in 0..2 {
            assert_eq!(run.run(&counting, 0), (Ok(runs), runs), "{name}: the limit");
        }

        // Falling through: every register as it was (r0 included), for an empty slot (3) and an
        // index out of range (4, 1 << 32 - 1).
        for index in ["3", "4", "-1"] {
            let src = with_map(
                &format!(
                    "mov r0, 42\nmov r1, 7\nmov r4, 9\nmov r5, 11\nlddw r2, M\nmov r3, {index}\n\
                     call 12\nlddw r6, M\njne r2, r6, bad\nadd r0, r1\nadd r0, r4\nadd r0, r5\n\
                     exit\nbad:\nmov r0, 0\nexit"
                ),
                &pa,
            );
            assert_eq!(
                run.run(&run.load(&src), 0).0,
                Ok(42 + 7 + 9 + 11),
                "{name}: {index}"
            );
        }
        // An empty slot counts against the limit, as in Linux; an index out of range does not.
        set(0, &returns(&run, 5));
        let attempts = |index: u32, n: u32| {
            with_map(
                &format!(
                    "mov r6, r1\nmov r7, 0\nloop:\nmov r1, r6\nlddw r2, M\nmov r3, {index}\n\
                     call 12\nadd r7, 1\njlt r7, {n}, loop\n\
                     mov r1, r6\nlddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit"
                ),
                &pa,
            )
        };
        let limit = MAX_TAIL_CALL_CNT;
        assert_eq!(
            run.run(&run.load(&attempts(3, limit - 1)), 0).0,
            Ok(5),
            "{name}"
        );
        assert_eq!(
            run.run(&run.load(&attempts(3, limit)), 0).0,
            Ok(77),
            "{name}"
        );
        assert_eq!(
            run.run(&run.load(&attempts(4, limit + 7)), 0).0,
            Ok(5),
            "{name}"
        );

        // From a subprogram: the target's result returns to the subprogram's caller, with the
        // caller's r6–r9 restored; the target makes calls of its own.
        let target = run.load("mov r6, 1\ncall local g\nexit\ng:\nmov r0, 7\nexit");
        set(0, &target);
        let from_sub = run.load(&with_map(
            "mov r6, 5\ncall local f\nadd r0, r6\nadd r0, 1000\nexit\n\
             f:\nmov r6, 77\ncall local h\nmov r0, 1\nexit\n\
             h:\nlddw r2, M\nmov r3, 0\ncall 12\nmov r0, 2\nexit",
            &pa,
        ));
        assert_eq!(
            run.run(&from_sub, 0).0,
            Ok(1 + 1000 + 5),
            "{name}: from a subprogram"
        );
        let direct = run.load(&with_map(
            "mov r6, 5\ncall local f\nadd r0, r6\nadd r0, 1000\nexit\n\
             f:\nmov r6, 77\nlddw r2, M\nmov r3, 0\ncall 12\nmov r0, 1\nexit",
            &pa,
        ));
        assert_eq!(
            run.run(&direct, 0).0,
            Ok(7 + 5 + 1000),
            "{name}: to the caller's caller"
        );

        // The map argument: not one of the run's maps, or not a program array.
        let fault = |r: Result<u64, ExecError>, reason: &str| match r {
            Err(ExecError::HelperFault {
                pc: 3,
                helper: 12,
                reason: got,
            }) => assert!(got.contains(reason), "{name}: {got}"),
            other => panic!("{name}: {other:?}"),
        };
        let bad_map = run.load("lddw r2, 0x1000\nmov r3, 0\ncall 12\nexit");
        fault(run.run(&bad_map, 0).0, "RunEnv::maps");
        let not_array = run.load(&with_map("lddw r2, M\nmov r3, 0\ncall 12\nexit", &other));
        fault(run.run(&not_array, 0).0, "not a program array");

        // A target for the other engines: the interpreter runs every target's program, JIT code
        // only targets of its own mode (else it falls through).
        let caller = run.load(&with_map(
            "lddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit",
            &pa,
        ));
        let p5 = asm("mov r0, 5\nexit");
        pa.prog_array_set(0, TailTarget::interpreted(&p5, &run.h), BPF_ANY)
            .unwrap();
        let want = if let Engine::Jit(_) = engine { 77 } else { 5 };
        assert_eq!(
            run.run(&caller, 0).0,
            Ok(want),
            "{name}: interpreted target"
        );
        // SAFETY: the program touches nothing.
        let trusted = unsafe { JitOptions::trusted() };
        for (mode, opts) in [
            ("checked", JitOptions::checked()),
            ("trusted", trusted),
            ("budgeted", JitOptions::checked().with_budget(Some(100))),
        ] {
            let jit = Arc::new(JitProgram::compile(&p5, &run.h, opts).unwrap());
            let t = TailTarget::from_jit(jit);
            let runs = match &engine {
                Engine::Interp => true,
                Engine::Jit(o) => {
                    o.is_checked() == opts.is_checked()
                        && (o.budget().is_none() || mode == "budgeted")
                }
            };
            assert_eq!(t.serves(engine.tail_caller()), runs, "{name}: {mode}");
            pa.prog_array_set(0, t, BPF_ANY).unwrap();
            let want = if runs { 5 } else { 77 };
            assert_eq!(run.run(&caller, 0).0, Ok(want), "{name}: {mode} target");
        }
        // Bound to this caller, the array refuses what it could not run.
        let bound = prog_array(1);
        bound.prog_array_bind(engine.tail_caller()).unwrap();
        let refused = bound.prog_array_set(0, TailTarget::interpreted(&p5, &run.h), BPF_ANY);
        match engine {
            Engine::Interp => refused.unwrap(),
            Engine::Jit(_) => assert!(matches!(refused, Err(MapError::IncompatibleProgram(_)))),
        }
        // A loaded `Prog` as a target.
        if let Engine::Jit(o) = engine {
            let prog = Prog::load(&p5, &run.h, o).unwrap();
            pa.prog_array_set(0, (&prog).into(), BPF_ANY).unwrap();
            drop(prog);
            assert_eq!(run.run(&caller, 0).0, Ok(5), "{name}: Prog target");
        }
        pa.prog_array_clear(0).unwrap();
        assert_eq!(run.run(&caller, 0).0, Ok(77), "{name}: cleared");
    }
}

/// Slots replaced while other threads run through them: every run returns a result of one of
/// the targets, and a target taken out of its slot stays alive until the runs that entered it
/// end.
pub fn tail_call_slots_replaced_under_runs(modes: &[(String, JitOptions)]) {
    let _serial = PARK_USERS.lock().unwrap_or_else(|e| e.into_inner());
    for (name, engine) in engines(modes) {
        let pa = prog_array(1);
        let h = tail_helpers();
        let engine = &engine;
        // Targets are JIT code (of the engine's mode; checked for the interpreter), so that a
        // weak reference shows when their image is freed.
        let target_opts = match engine {
            Engine::Interp => JitOptions::checked(),
            Engine::Jit(o) => *o,
        };
        let target = |src: &str| Arc::new(JitProgram::compile(&asm(src), &h, target_opts).unwrap());
        let caller_src = with_map("lddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit", &pa);
        let caller = engine.load(&asm(&caller_src), &h);
        let array = pa.as_raw() as usize;
        let run = || {
            let maps = [array as *const RawMap];
            let env = RunEnv {
                maps: &maps,
                ..RunEnv::default()
            };
            // SAFETY: the environment holds only the program array, alive throughout.
            unsafe { caller.run(&env) }
        };

        // A run parked inside target A while the slot moves on to B and every other handle of
        // A is dropped: A stays alive until that run ends, then is freed.
        let a = target(&format!("call {PARK_ID}\nmov r0, 1\nexit"));
        let weak_a = Arc::downgrade(&a);
        pa.prog_array_set(0, TailTarget::from_jit(a), BPF_ANY)
            .unwrap();
        PARK.store(0, Ordering::SeqCst);
        std::thread::scope(|s| {
            let parked = s.spawn(run);
            while PARK.load(Ordering::SeqCst) != 1 {
                std::thread::yield_now();
            }
            let b = target("mov r0, 2\nexit");
            pa.prog_array_set(0, TailTarget::from_jit(b), BPF_ANY)
                .unwrap();
            assert_eq!(run(), Ok(2), "{name}: the new target, meanwhile");
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                weak_a.upgrade().is_some(),
                "{name}: A freed while a run is inside it"
            );
            PARK.store(2, Ordering::SeqCst);
            assert_eq!(
                parked.join().unwrap(),
                Ok(1),
                "{name}: the parked run finished in A"
            );
        });
        livebpf::reclaim::flush().unwrap();
        assert!(
            weak_a.upgrade().is_none(),
            "{name}: A was not freed after its runs ended"
        );

        // Two threads running through the slot while it is replaced with fresh targets; each
        // replacement waits for a run to finish after the previous one, so they interleave.
        let rounds = 100;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let runs = std::sync::atomic::AtomicU64::new(0);
        // A bad result is recorded, not asserted in the runner: the replacer waits for runs.
        let bad = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let r = run();
                        if !r
                            .as_ref()
                            .is_ok_and(|r| (10..10 + rounds).contains(r) || *r == 2)
                        {
                            bad.lock().unwrap().get_or_insert(r);
                        }
                        runs.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            for i in 0..rounds {
                let t = target(&format!("mov r0, {}\nexit", 10 + i));
                let before = runs.load(Ordering::Relaxed);
                pa.prog_array_set(0, TailTarget::from_jit(t), BPF_ANY)
                    .unwrap();
                while runs.load(Ordering::Relaxed) < before + 2 {
                    std::thread::yield_now();
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(
            bad.into_inner().unwrap(),
            None,
            "{name}: a run returned a stray result"
        );
        assert_eq!(run(), Ok(10 + rounds - 1), "{name}: the last target");
    }
}
