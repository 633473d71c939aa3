//! `livebpf trace`: the runtime's main job under load. Threads run a target program in a loop
//! while the main thread attaches and detaches tracing programs to it; every result is checked
//! against the interpreter, and at the end no trampoline image may be left alive.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::{CliError, MemArgs, jit_error, load_program, stdout_err};
use crate::exec::ExecError;
use crate::helpers::Helpers;
use crate::interp::Interpreter;
use crate::isa::Program;
use crate::jit::JitOptions;
use crate::reclaim;
use crate::trampoline::{self, AttachKind, Prog, attach, set_stats_enabled};

/// The oracle's instruction budget. A target that needs more is no use for a trace, which
/// wants many short runs, and without a budget one that never ends would hang the trace.
const ORACLE_BUDGET: u64 = 1 << 24;
/// How long a runner may go without completing a run before the trace gives up on it.
const STALL: Duration = Duration::from_secs(60);

pub struct TraceArgs {
    pub target: PathBuf,
    pub fentry: PathBuf,
    pub fexit: Option<PathBuf>,
    pub mem: MemArgs,
    pub threads: usize,
    pub cycles: u64,
}

/// One runner thread's progress, on its own cache line (the main thread polls them all).
#[repr(align(64))]
struct Counter {
    /// Completed runs.
    runs: AtomicU64,
    /// The run count the main thread waits for ([`NO_GOAL`] between waits); the runner wakes
    /// it on reaching it.
    goal: AtomicU64,
}

const NO_GOAL: u64 = u64::MAX;

impl Default for Counter {
    fn default() -> Counter {
        Counter {
            runs: AtomicU64::new(0),
            goal: AtomicU64::new(NO_GOAL),
        }
    }
}

/// What a runner thread found.
#[derive(Default)]
struct Report {
    errors: u64,
    first: Option<String>,
}

/// A tracer and the file it came from (for messages).
struct Tracer<'a> {
    prog: Prog,
    path: &'a Path,
}

pub fn trace(args: &TraceArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (target_program, file_mem) = load_program(&args.target)?;
    let mem = args.mem.resolve(file_mem)?;
    let expected = oracle(&target_program, &mem, &args.target)?;

    let helpers = Helpers::conformance();
    let load = |program: &Program, path: &Path| {
        Prog::load(program, &helpers, JitOptions::checked()).map_err(|e| jit_error(path, e))
    };
    let target = load(&target_program, &args.target)?;
    let fentry = Tracer {
        prog: load(&load_program(&args.fentry)?.0, &args.fentry)?,
        path: &args.fentry,
    };
    let fexit = match &args.fexit {
        Some(path) => Some(Tracer {
            prog: load(&load_program(path)?.0, path)?,
            path,
        }),
        None => None,
    };

    // The tracers' run_cnt is the evidence that they ran.
    set_stats_enabled(true);
    let started = Instant::now();
    let counters: Vec<Counter> = (0..args.threads).map(|_| Counter::default()).collect();
    let stop = AtomicBool::new(false);
    let main = std::thread::current();
    let (cycled, reports) = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(args.threads);
        for (i, counter) in counters.iter().enumerate() {
            let (target, mem, expected, stop, main) = (&target, &mem, &expected, &stop, &main);
            let spawned = std::thread::Builder::new()
                .name(format!("runner-{i}"))
                .spawn_scoped(s, move || {
                    runner(i, target, mem, expected, stop, counter, main)
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The scope joins the runners already started once they see `stop`.
                    stop.store(true, Ordering::Relaxed);
                    return (Err(CliError::Spawn(e)), Vec::new());
                }
            }
        }
        let cycled = cycle(args, &target, &fentry, fexit.as_ref(), &counters);
        stop.store(true, Ordering::Relaxed);
        let reports: Vec<Report> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Report {
                    errors: 1,
                    first: Some("a runner thread panicked".to_string()),
                })
            })
            .collect();
        (cycled, reports)
    });
    cycled?;
    let elapsed = started.elapsed();

    // Every link is gone; once the reclaimer has freed what was retired, nothing may be left.
    reclaim::flush().expect("flush outside a run");
    let live_images = trampoline::live_images();

    let runs: u64 = counters
        .iter()
        .map(|c| c.runs.load(Ordering::Acquire))
        .sum();
    let entry_stats = fentry.prog.stats();
    let exit_stats = fexit.as_ref().map(|t| t.prog.stats()).unwrap_or_default();
    let run_errors: u64 = reports.iter().map(|r| r.errors).sum();
    let errors = run_errors + entry_stats.errors + exit_stats.errors;
    writeln!(
        out,
        "trace: cycles={} threads={} runs={runs} fentry={} fexit={} errors={errors} live_images={live_images} time={:.2}s",
        args.cycles,
        args.threads,
        entry_stats.run_cnt,
        exit_stats.run_cnt,
        elapsed.as_secs_f64()
    )
    .map_err(stdout_err)?;
    out.flush().map_err(stdout_err)?;

    let mut problems = Vec::new();
    if run_errors > 0 {
        let first = reports
            .iter()
            .find_map(|r| r.first.as_deref())
            .unwrap_or("");
        problems.push(format!("{run_errors} target runs failed (first: {first})"));
    }
    for (name, stats) in [("fentry", entry_stats), ("fexit", exit_stats)] {
        if stats.errors > 0 {
            problems.push(format!("{} {name} runs failed", stats.errors));
        }
    }
    // Each cycle waited for every runner to complete a run that began after the attach, and
    // such a run must pass through the trampoline.
    let inside = args.cycles.saturating_mul(args.threads as u64);
    let tracers = [("fentry", Some(entry_stats))]
        .into_iter()
        .chain([("fexit", fexit.as_ref().map(|_| exit_stats))]);
    for (name, stats) in tracers {
        if let Some(stats) = stats
            && stats.run_cnt < inside
        {
            problems.push(format!(
                "{name} ran {} times, but {inside} runs completed while it was attached",
                stats.run_cnt
            ));
        }
    }
    if live_images != 0 {
        problems.push(format!(
            "{live_images} trampoline images still alive after every link was dropped"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::TraceFailed(problems.join("; ")))
    }
}

/// The expected outcome of one run, from the interpreter.
fn oracle(program: &Program, mem: &[u8], what: &Path) -> Result<Result<u64, ExecError>, CliError> {
    let mut copy = mem.to_vec();
    let result = Interpreter::new(program)
        .with_helpers(Helpers::conformance())
        .with_budget(Some(ORACLE_BUDGET))
        .run(&mut copy);
    match result {
        Err(ExecError::BudgetExhausted { budget, .. }) => Err(CliError::TraceTargetRunsAway {
            what: what.display().to_string(),
            budget,
        }),
        result => Ok(result),
    }
}

/// Runs `target` until `stop`, each time on a fresh copy of `base` (so a target that writes its
/// input gives the same result every time), counting completed runs in `counter` and waking
/// `main` when the count reaches its goal.
fn runner(
    index: usize,
    target: &Prog,
    base: &[u8],
    expected: &Result<u64, ExecError>,
    stop: &AtomicBool,
    counter: &Counter,
    main: &Thread,
) -> Report {
    let mut mem = base.to_vec();
    let mut report = Report::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        mem.copy_from_slice(base);
        let got = target.run(&mut mem);
        if let Some(problem) = check(&got, expected) {
            report.errors += 1;
            report
                .first
                .get_or_insert_with(|| format!("thread {index}, run {n}: {problem}"));
        }
        n += 1;
        // Only this thread writes `runs`: a store, not a read-modify-write. SeqCst pairs with
        // `wait_for_runs` (goal store, then runs load) so that one side sees the other.
        counter.runs.store(n, Ordering::SeqCst);
        let goal = counter.goal.load(Ordering::SeqCst);
        if n >= goal {
            if n == goal {
                main.unpark();
            }
            // Done for this cycle: let runners that are not (there may be more than cores).
            std::thread::yield_now();
        }
    }
    report
}

/// Why `got` is not a correct run, if it is not.
fn check(got: &Result<u64, ExecError>, expected: &Result<u64, ExecError>) -> Option<String> {
    match (got, expected) {
        (Ok(v), Ok(e)) if v == e => None,
        (Ok(v), Ok(e)) => Some(format!("returned {v:#x}, the interpreter returns {e:#x}")),
        (Ok(v), Err(e)) => Some(format!("returned {v:#x}, the interpreter fails: {e}")),
        (Err(e), _) => Some(e.to_string()),
    }
}

/// The main thread's job: attach, let every runner complete a run through the trampoline,
/// detach; `cycles` times.
fn cycle(
    args: &TraceArgs,
    target: &Prog,
    fentry: &Tracer<'_>,
    fexit: Option<&Tracer<'_>>,
    counters: &[Counter],
) -> Result<(), CliError> {
    let progress = std::io::stderr().is_terminal();
    let step = (args.cycles / 10).max(1);
    let attach_one = |kind, tracer: &Tracer<'_>, cookie| {
        attach(kind, target, &tracer.prog, cookie).map_err(|source| CliError::Attach {
            what: tracer.path.display().to_string(),
            source,
        })
    };
    let detach_one = |link: trampoline::Link, tracer: &Tracer<'_>| {
        link.detach().map_err(|e| CliError::Detach {
            what: tracer.path.display().to_string(),
            source: e.error,
        })
    };
    for c in 0..args.cycles {
        let entry = attach_one(AttachKind::Fentry, fentry, c)?;
        let exit = match fexit {
            Some(t) => Some((attach_one(AttachKind::Fexit, t, c)?, t)),
            None => None,
        };
        wait_for_runs(counters)?;
        if let Some((link, t)) = exit {
            detach_one(link, t)?;
        }
        detach_one(entry, fentry)?;
        if progress && (c + 1) % step == 0 && c + 1 < args.cycles {
            let runs: u64 = counters
                .iter()
                .map(|c| c.runs.load(Ordering::Relaxed))
                .sum();
            eprintln!(
                "trace: {}% ({}/{} cycles, {runs} runs)",
                (c + 1) * 100 / args.cycles,
                c + 1,
                args.cycles
            );
        }
    }
    Ok(())
}

/// Waits until every runner has completed a run that started after this call: its count must
/// grow by two, since the run that completes first may have started before. The main thread
/// sleeps meanwhile rather than spin: runners may outnumber the cores, and a thread that wakes
/// from sleep is scheduled promptly, so each cycle is short.
fn wait_for_runs(counters: &[Counter]) -> Result<(), CliError> {
    for c in counters {
        c.goal
            .store(c.runs.load(Ordering::SeqCst) + 2, Ordering::SeqCst);
    }
    for (thread, c) in counters.iter().enumerate() {
        let since = Instant::now();
        while c.runs.load(Ordering::SeqCst) < c.goal.load(Ordering::Relaxed) {
            if since.elapsed() > STALL {
                return Err(CliError::TraceStalled {
                    thread,
                    secs: STALL.as_secs(),
                });
            }
            // The runner unparks us when it reaches the goal; the timeout is only a backstop.
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    for c in counters {
        c.goal.store(NO_GOAL, Ordering::Relaxed);
    }
    Ok(())
}
