//! Direct tail calls (`JitProgram::compile_with`): on x86-64 a patch site that the program
//! array keeps at `jmp` its slot's target or `nop`; on arm64 the ordinary path. The results are
//! the same either way: these tests check both, and on x86-64 the site's bytes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livebpf::exec::{
    DirectTailCall, ExecError, HelperContext, MAX_TAIL_CALL_CNT, MemRegion, RunEnv,
};
use livebpf::helpers::Helpers;
use livebpf::jit::{JitOptions, JitProgram, JitStack};
use livebpf::maps::{self, BPF_ANY, Map, MapSpec, MapType, RawMap};
use livebpf::{TailTarget, assemble_program};

fn helpers() -> Helpers {
    let mut h = Helpers::new();
    maps::helpers::register(&mut h);
    h.register_with_context(PARK_ID, park);
    h
}

const PARK_ID: u32 = 110;
/// 0 idle, 1 parked, 2 released.
static PARK: AtomicU32 = AtomicU32::new(0);
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

fn modes() -> Vec<(&'static str, JitOptions)> {
    // SAFETY: the programs here touch only their counter, which every run passes as a region.
    let trusted = unsafe { JitOptions::trusted() };
    vec![("checked", JitOptions::checked()), ("trusted", trusted)]
}

fn prog_array(n: u32) -> Map {
    Map::create(&MapSpec::new("pa", MapType::ProgArray, 4, 4, n)).unwrap()
}

fn compile(src: &str, opts: JitOptions, map: &Map, hints: &[(usize, u32)]) -> Arc<JitProgram> {
    let src = src.replace("M", &format!("{:#x}", map.as_raw() as u64));
    let program = assemble_program(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let direct: Vec<DirectTailCall> = hints
        .iter()
        .map(|&(pc, index)| DirectTailCall {
            pc,
            map: map.clone(),
            index,
        })
        .collect();
    Arc::new(JitProgram::compile_with(&program, &helpers(), opts, &direct).unwrap())
}

fn target(src: &str, opts: JitOptions) -> TailTarget {
    let p = assemble_program(src).unwrap();
    TailTarget::from_jit(Arc::new(JitProgram::compile(&p, &helpers(), opts).unwrap()))
}

/// Runs `jit` with args r1..r5 over an 8-byte counter (r1 = its address unless `args` says
/// otherwise), knowing `maps`; returns r0 and the counter.
fn run(jit: &JitProgram, maps: &[&Map], r2: u64) -> (Result<u64, ExecError>, u64) {
    let mut counter = 0u64;
    let c = &mut counter as *mut u64 as u64;
    let regions = [MemRegion::new(c, 8, true)];
    let known: Vec<*const RawMap> = maps.iter().map(|m| m.as_raw()).collect();
    let env = RunEnv {
        args: [c, r2, 0, 0, 0],
        regions: &regions,
        maps: &known,
        ..RunEnv::default()
    };
    let mut stack = Box::new(JitStack::new());
    // SAFETY: the counter and the maps are alive, the counter not borrowed meanwhile.
    let r = unsafe { jit.run_env(&env, &mut stack) };
    (r, counter)
}

/// What a direct site holds: `None` for the nop, `Some(target)` for a `jmp`; `None` as well on
/// arm64, which has no direct sites.
fn site(jit: &JitProgram) -> Option<usize> {
    let &ip = jit.direct_tail_call_sites().first()?;
    // SAFETY: the site is 5 bytes of this live image's (readable) text.
    let bytes = unsafe { std::slice::from_raw_parts(ip as *const u8, 5) };
    match bytes[0] {
        0x0f => {
            assert_eq!(bytes, [0x0f, 0x1f, 0x44, 0x00, 0x00]);
            None
        }
        0xe9 => {
            let rel = i32::from_le_bytes(bytes[1..].try_into().unwrap());
            Some((ip as i64 + 5 + rel as i64) as usize)
        }
        other => panic!("not a site: {other:#x}"),
    }
}

fn direct_here() -> bool {
    cfg!(target_arch = "x86_64")
}

#[test]
fn a_direct_site_follows_its_slot() {
    for (name, opts) in modes() {
        let pa = prog_array(2);
        // The call is slot 4.
        let caller = "mov r6, r1\nlddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit";
        let jit = compile(caller, opts, &pa, &[(4, 0)]);
        assert_eq!(jit.direct_tail_call_sites().len(), direct_here() as usize);
        assert_eq!(pa.prog_array_direct_sites(), direct_here() as usize);
        assert_eq!(site(&jit), None, "{name}: an empty slot is the nop");
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(77), "{name}");
        let five = target("mov r0, 5\nexit", opts);
        let entry = five.jit_entry();
        pa.prog_array_set(0, five, BPF_ANY).unwrap();
        if direct_here() {
            assert_eq!(site(&jit), entry, "{name}: the site jumps to the target");
        }
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(5), "{name}");
        // A target of the other mode: the nop again.
        let other = if opts.is_checked() {
            modes()[1].1
        } else {
            JitOptions::checked()
        };
        pa.prog_array_set(0, target("mov r0, 6\nexit", other), BPF_ANY)
            .unwrap();
        assert_eq!(site(&jit), None, "{name}");
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(77), "{name}");
        pa.prog_array_set(0, target("mov r0, 7\nexit", opts), BPF_ANY)
            .unwrap();
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(7), "{name}");
        pa.prog_array_clear(0).unwrap();
        assert_eq!(site(&jit), None, "{name}: cleared");
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(77), "{name}");
        // Dropping the caller removes its site.
        drop(jit);
        assert_eq!(pa.prog_array_direct_sites(), 0);
    }
}

#[test]
fn a_wrong_hint_takes_the_ordinary_path() {
    for (name, opts) in modes() {
        let pa = prog_array(2);
        // r3 = r2 of the run: the hint (index 0) is right only when it is 0. The call is slot 3.
        let caller = "mov r3, r2\nlddw r2, M\ncall 12\nmov r0, 77\nexit";
        let jit = compile(caller, opts, &pa, &[(3, 0)]);
        pa.prog_array_set(0, target("mov r0, 5\nexit", opts), BPF_ANY)
            .unwrap();
        pa.prog_array_set(1, target("mov r0, 9\nexit", opts), BPF_ANY)
            .unwrap();
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(5), "{name}");
        assert_eq!(run(&jit, &[&pa], 1).0, Ok(9), "{name}");
        assert_eq!(run(&jit, &[&pa], 2).0, Ok(77), "{name}");
        // The map differs from the hint's: the ordinary path, which checks it.
        let other = prog_array(1);
        let jit = compile(caller, opts, &other, &[(3, 0)]);
        assert!(
            matches!(run(&jit, &[&pa, &other], 1).0, Ok(77)),
            "{name}: r2 is the hint's map"
        );
        let lying = compile(
            "mov r3, 0\nlddw r2, M\ncall 12\nmov r0, 77\nexit"
                .replace("lddw r2, M", &format!("lddw r2, {:#x}", pa.as_raw() as u64))
                .as_str(),
            opts,
            &other,
            &[(3, 0)],
        );
        assert_eq!(
            run(&lying, &[&pa, &other], 0).0,
            Ok(5),
            "{name}: r2 is another map"
        );
    }
}

#[test]
fn direct_tail_calls_count_against_the_limit() {
    for (name, opts) in modes() {
        let pa = prog_array(2);
        // A direct self tail call counting its runs (the call is slot 7).
        let counting = "mov r6, r1\nldxdw r0, [r6+0]\nadd r0, 1\nstxdw [r6+0], r0\n\
                        lddw r2, M\nmov r3, 0\ncall 12\nldxdw r0, [r6+0]\nexit";
        let jit = compile(counting, opts, &pa, &[(7, 0)]);
        pa.prog_array_set(0, TailTarget::from_jit(jit.clone()), BPF_ANY)
            .unwrap();
        let runs = MAX_TAIL_CALL_CNT as u64 + 1;
        assert_eq!(run(&jit, &[&pa], 0), (Ok(runs), runs), "{name}");
        // Empty slot 1, `n` times directly, then slot 0 (directly): falls through at 33.
        let attempts = |n: u32| {
            format!(
                "mov r7, 0\nloop:\nlddw r2, M\nmov r3, 1\ncall 12\nadd r7, 1\njlt r7, {n}, loop\n\
                 lddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit"
            )
        };
        pa.prog_array_set(0, target("mov r0, 5\nexit", opts), BPF_ANY)
            .unwrap();
        let limit = MAX_TAIL_CALL_CNT;
        let jit = compile(&attempts(limit - 1), opts, &pa, &[(4, 1), (10, 0)]);
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(5), "{name}");
        let jit = compile(&attempts(limit), opts, &pa, &[(4, 1), (10, 0)]);
        assert_eq!(run(&jit, &[&pa], 0).0, Ok(77), "{name}");
        drop(jit);
        // The self-referencing slot holds the counting program: clear it to free both.
        pa.prog_array_clear(0).unwrap();
    }
}

#[test]
fn bad_hints_are_refused() {
    let pa = prog_array(2);
    let array = Map::create(&MapSpec::new("a", MapType::Array, 4, 8, 1)).unwrap();
    let program = |src: &str| {
        assemble_program(&src.replace("M", &format!("{:#x}", pa.as_raw() as u64))).unwrap()
    };
    let p = program("lddw r2, M\nmov r3, 0\ncall 12\nexit");
    let hint = |pc, map: &Map, index| DirectTailCall {
        pc,
        map: map.clone(),
        index,
    };
    let compile = |hints: &[DirectTailCall]| {
        JitProgram::compile_with(&p, &helpers(), JitOptions::checked(), hints)
    };
    for (hints, what) in [
        (vec![hint(1, &pa, 0)], "no instruction"),
        (vec![hint(2, &pa, 0)], "not a tail call"),
        (vec![hint(3, &array, 0)], "not a program array"),
        (
            vec![hint(3, &pa, 0), hint(3, &pa, 1)],
            "the same instruction",
        ),
    ] {
        match compile(&hints) {
            Err(livebpf::jit::JitError::InvalidInstruction { reason, .. }) => {
                assert!(reason.contains(what), "{reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // An index beyond the array: no site, the ordinary path (which falls through).
    let jit = compile(&[hint(3, &pa, 2)]).unwrap();
    assert!(jit.direct_tail_call_sites().is_empty());
    assert_eq!(pa.prog_array_direct_sites(), 0);
}

#[test]
fn a_site_outliving_its_array_becomes_the_nop_and_frees_its_target() {
    let pa = prog_array(1);
    let jit = compile(
        "lddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit",
        JitOptions::checked(),
        &pa,
        &[(3, 0)],
    );
    let t = Arc::new(
        JitProgram::compile(
            &assemble_program("mov r0, 5\nexit").unwrap(),
            &helpers(),
            JitOptions::checked(),
        )
        .unwrap(),
    );
    let weak = Arc::downgrade(&t);
    pa.prog_array_set(0, TailTarget::from_jit(t), BPF_ANY)
        .unwrap();
    assert_eq!(run(&jit, &[&pa], 0).0, Ok(5));
    drop(pa);
    // The array is freed after a grace period, then its site's target after another.
    livebpf::reclaim::flush().unwrap();
    livebpf::reclaim::flush().unwrap();
    assert!(weak.upgrade().is_none(), "the target was freed");
    assert_eq!(site(&jit), None);
    // The stale address still matches the hint: the nop, falling through, touching no map.
    let mut stack = Box::new(JitStack::new());
    // SAFETY: an environment without regions or maps.
    let r = unsafe { jit.run_env(&RunEnv::default(), &mut stack) };
    if direct_here() {
        assert_eq!(r, Ok(77));
    }
}

#[test]
fn a_direct_site_replaced_under_running_threads() {
    let _serial = PARK_USERS.lock().unwrap_or_else(|e| e.into_inner());
    for (name, opts) in modes() {
        let pa = prog_array(1);
        let caller = compile(
            "lddw r2, M\nmov r3, 0\ncall 12\nmov r0, 77\nexit",
            opts,
            &pa,
            &[(3, 0)],
        );
        let array = pa.as_raw() as usize;
        let run = || {
            let maps = [array as *const RawMap];
            let env = RunEnv {
                maps: &maps,
                ..RunEnv::default()
            };
            let mut stack = Box::new(JitStack::new());
            // SAFETY: the environment holds only the program array, alive throughout.
            unsafe { caller.run_env(&env, &mut stack) }
        };
        let jit = |src: &str| {
            Arc::new(
                JitProgram::compile(&assemble_program(src).unwrap(), &helpers(), opts).unwrap(),
            )
        };
        // A run parked in A, entered through the site; the site moves on to B meanwhile.
        let a = jit(&format!("call {PARK_ID}\nmov r0, 1\nexit"));
        let weak_a = Arc::downgrade(&a);
        pa.prog_array_set(0, TailTarget::from_jit(a), BPF_ANY)
            .unwrap();
        PARK.store(0, Ordering::SeqCst);
        std::thread::scope(|s| {
            let parked = s.spawn(run);
            while PARK.load(Ordering::SeqCst) != 1 {
                std::thread::yield_now();
            }
            let b = jit("mov r0, 2\nexit");
            pa.prog_array_set(0, TailTarget::from_jit(b), BPF_ANY)
                .unwrap();
            assert_eq!(run(), Ok(2), "{name}");
            std::thread::sleep(Duration::from_millis(50));
            assert!(weak_a.upgrade().is_some(), "{name}: A freed under a run");
            PARK.store(2, Ordering::SeqCst);
            assert_eq!(parked.join().unwrap(), Ok(1), "{name}");
        });
        livebpf::reclaim::flush().unwrap();
        assert!(weak_a.upgrade().is_none(), "{name}: A never freed");
        // Two runners while the site is repointed at fresh targets.
        let rounds = 100u64;
        let stop = AtomicBool::new(false);
        let runs = AtomicU64::new(0);
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
                let t = jit(&format!("mov r0, {}\nexit", 10 + i));
                let before = runs.load(Ordering::Relaxed);
                pa.prog_array_set(0, TailTarget::from_jit(t), BPF_ANY)
                    .unwrap();
                while runs.load(Ordering::Relaxed) < before + 2 {
                    std::thread::yield_now();
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(bad.into_inner().unwrap(), None, "{name}");
        assert_eq!(run(), Ok(10 + rounds - 1), "{name}");
    }
}
