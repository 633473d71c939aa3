//! `livebpf trace`: the runtime's main job under load. Threads run a target program in a loop
//! while the main thread attaches and detaches tracing programs to it; every result is checked
//! against the interpreter, and at the end no trampoline image may be left alive.
//!
//! Tracers are compiled with a budget of back edges and calls ([`TRACER_BUDGET`] unless
//! `--budget`), so a tracer that never ends fails each run instead of hanging its runner; trace
//! then fails naming the tracer and its last error.
//!
//! Results that are addresses: engines place the input and the stack at different addresses, so
//! a target that returns a pointer into them (`r10`, `r1 + 8`) returns different numbers under
//! the interpreter and the JIT. The oracle runs on an input and a stack whose addresses trace
//! knows; a result inside one of them (either end included) is taken as that address and is
//! expected at the same offset into the JIT run's own input or stack. Any other result must be
//! equal. (A plain number that happens to equal such an address would be misread; with 64-bit
//! values and fresh heap addresses that is not a practical concern.)

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::{CliError, MemArgs, jit_error, load_program, stdout_err};
use crate::exec::{ExecError, TOTAL_STACK};
use crate::helpers::Helpers;
use crate::interp::Interpreter;
use crate::isa::Program;
use crate::jit::{JitOptions, JitStack};
use crate::reclaim;
use crate::trampoline::{self, AttachKind, Prog, attach, set_stats_enabled};

/// The oracle's instruction budget. A target that needs more is no use for a trace, which
/// wants many short runs, and without a budget one that never ends would hang the trace.
const ORACLE_BUDGET: u64 = 1 << 24;
/// How long a runner may go without completing a run before the trace gives up on it.
const STALL: Duration = Duration::from_secs(60);
/// The tracers' default budget of back edges and calls per run: a runaway tracer fails within
/// milliseconds, while any tracer that does real work stays far below it.
pub const TRACER_BUDGET: u64 = 1 << 20;

pub struct TraceArgs {
    pub target: PathBuf,
    pub fentry: PathBuf,
    pub fexit: Option<PathBuf>,
    pub mem: MemArgs,
    pub threads: usize,
    pub cycles: u64,
    /// The tracers' budget of back edges and calls per run.
    pub tracer_budget: u64,
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

/// What a correct run of the target gives, from the interpreter (see the module documentation
/// for address-valued results).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expected {
    /// This value.
    Value(u64),
    /// The address this many bytes into the run's input.
    Input(u64),
    /// The address this many bytes into the run's stack (from its lowest byte).
    Stack(u64),
    /// This error.
    Fails(ExecError),
}

impl Expected {
    /// Reads the oracle's `result` for a run whose input is `input` and whose stack starts at
    /// `stack_base`.
    fn classify(result: Result<u64, ExecError>, input: &[u8], stack_base: u64) -> Expected {
        let r0 = match result {
            Ok(r0) => r0,
            Err(e) => return Expected::Fails(e),
        };
        let start = input.as_ptr() as u64;
        if !input.is_empty() && (start..=start + input.len() as u64).contains(&r0) {
            Expected::Input(r0 - start)
        } else if (stack_base..=stack_base + TOTAL_STACK as u64).contains(&r0) {
            Expected::Stack(r0 - stack_base)
        } else {
            Expected::Value(r0)
        }
    }

    /// The value a run on `input` with its stack at `stack_base` must return, or the error.
    fn value(&self, input: &[u8], stack_base: u64) -> Result<u64, &ExecError> {
        match self {
            Expected::Value(v) => Ok(*v),
            Expected::Input(off) => Ok(input.as_ptr() as u64 + off),
            Expected::Stack(off) => Ok(stack_base + off),
            Expected::Fails(e) => Err(e),
        }
    }

    /// The expected result in words.
    fn describe(&self) -> String {
        match self {
            Expected::Value(v) => format!("returns {v:#x}"),
            Expected::Input(off) => format!("returns the address of input byte {off}"),
            Expected::Stack(off) => format!("returns the address of stack byte {off}"),
            Expected::Fails(e) => format!("fails: {e}"),
        }
    }
}

pub fn trace(args: &TraceArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (target_program, file_mem) = load_program(&args.target)?;
    let mem = args.mem.resolve(file_mem)?;
    let expected = oracle(&target_program, &mem, &args.target)?;

    let helpers = Helpers::conformance();
    let load = |program: &Program, path: &Path, opts: JitOptions| {
        Prog::load(program, &helpers, opts).map_err(|e| jit_error(path, e))
    };
    // The oracle has checked that the target ends; a tracer might not.
    let tracer_opts = JitOptions::checked().with_budget(Some(args.tracer_budget));
    let target = load(&target_program, &args.target, JitOptions::checked())?;
    let fentry = Tracer {
        prog: load(&load_program(&args.fentry)?.0, &args.fentry, tracer_opts)?,
        path: &args.fentry,
    };
    let fexit = match &args.fexit {
        Some(path) => Some(Tracer {
            prog: load(&load_program(path)?.0, path, tracer_opts)?,
            path,
        }),
        None => None,
    };

    // Each run on a fresh copy of the input (a target that writes it gives the same result
    // every time), on a stack whose address is known (for address-valued results).
    let (started, counters, reports) = run_traced(args, &target, &fentry, fexit.as_ref(), |_| {
        let (base, expected, target) = (&mem, &expected, &target);
        let mut copy = base.clone();
        let mut stack = Box::new(JitStack::new());
        move || {
            copy.copy_from_slice(base);
            let got = target.jit().run_with_stack(&mut copy, &mut stack);
            let want = expected.value(&copy, stack.base());
            check(&got, want, expected).map_or(Ok(()), Err)
        }
    })?;
    let problems = finish(
        args,
        started,
        &counters,
        &reports,
        &fentry,
        fexit.as_ref(),
        &mut |_| Ok(()),
        out,
    )?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::TraceFailed(problems.join("; ")))
    }
}

/// The end of a trace: waits for the reclaimer, prints the summary line (and then what `extra`
/// prints), and returns what went wrong: failed runs, failed tracers, tracers that did not run
/// while attached, images left alive.
#[allow(clippy::too_many_arguments)]
fn finish(
    args: &TraceArgs,
    started: Instant,
    counters: &[Counter],
    reports: &[Report],
    fentry: &Tracer<'_>,
    fexit: Option<&Tracer<'_>>,
    extra: &mut dyn FnMut(&mut dyn Write) -> Result<(), CliError>,
    out: &mut dyn Write,
) -> Result<Vec<String>, CliError> {
    let elapsed = started.elapsed();
    // Every link is gone; once the reclaimer has freed what was retired, nothing may be left.
    reclaim::flush().expect("flush outside a run");
    let live_images = trampoline::live_images();
    let runs: u64 = counters
        .iter()
        .map(|c| c.runs.load(Ordering::Acquire))
        .sum();
    let entry_stats = fentry.prog.stats();
    let exit_stats = fexit.map(|t| t.prog.stats()).unwrap_or_default();
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
    extra(out)?;
    out.flush().map_err(stdout_err)?;

    let mut problems = Vec::new();
    if run_errors > 0 {
        let first = reports
            .iter()
            .find_map(|r| r.first.as_deref())
            .unwrap_or("");
        problems.push(format!("{run_errors} target runs failed (first: {first})"));
    }
    let failed = [("fentry", Some(fentry), entry_stats)]
        .into_iter()
        .chain([("fexit", fexit, exit_stats)]);
    for (name, tracer, stats) in failed {
        if let Some(tracer) = tracer
            && stats.errors > 0
        {
            let why = tracer
                .prog
                .last_error()
                .map_or_else(String::new, |e| format!(", the last with: {e}"));
            problems.push(format!(
                "{name} tracer {} failed in {} runs{why}",
                tracer.path.display(),
                stats.errors
            ));
        }
    }
    // Each cycle waited for every runner to complete a run that began after the attach, and
    // such a run must pass through the trampoline.
    let inside = args.cycles.saturating_mul(args.threads as u64);
    let tracers = [("fentry", Some(entry_stats))]
        .into_iter()
        .chain([("fexit", fexit.map(|_| exit_stats))]);
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
    Ok(problems)
}

/// The expected outcome of one run, from the interpreter.
fn oracle(program: &Program, mem: &[u8], what: &Path) -> Result<Expected, CliError> {
    let mut copy = mem.to_vec();
    let mut stack = Box::new([0u64; TOTAL_STACK / 8]);
    let result = Interpreter::new(program)
        .with_helpers(Helpers::conformance())
        .with_budget(Some(ORACLE_BUDGET))
        .run_with_stack(&mut copy, &mut stack);
    match result {
        Err(ExecError::BudgetExhausted { budget, .. }) => Err(CliError::TraceTargetRunsAway {
            what: what.display().to_string(),
            budget,
        }),
        result => Ok(Expected::classify(result, &copy, stack.as_ptr() as u64)),
    }
}

/// Runs `run_once` until `stop`, counting completed runs in `counter` and waking `main` when the
/// count reaches its goal; each `Err` is a failed run (the first is kept, with where it was).
fn runner(
    index: usize,
    stop: &AtomicBool,
    counter: &Counter,
    main: &Thread,
    mut run_once: impl FnMut() -> Result<(), String>,
) -> Report {
    let mut report = Report::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Err(problem) = run_once() {
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

/// A trace's body, for both front ends: switches statistics on (the tracers' `run_cnt` is the
/// evidence that they ran), starts `args.threads` runners — each runs what `per_thread(i)`
/// returns over and over — and cycles the tracers on `target` meanwhile. Returns when the
/// runners have stopped: the start time, their counters and their reports.
fn run_traced<F, R>(
    args: &TraceArgs,
    target: &Prog,
    fentry: &Tracer<'_>,
    fexit: Option<&Tracer<'_>>,
    per_thread: F,
) -> Result<(Instant, Vec<Counter>, Vec<Report>), CliError>
where
    F: Fn(usize) -> R + Sync,
    R: FnMut() -> Result<(), String> + Send,
{
    set_stats_enabled(true);
    let started = Instant::now();
    let counters: Vec<Counter> = (0..args.threads).map(|_| Counter::default()).collect();
    let stop = AtomicBool::new(false);
    let main = std::thread::current();
    let (cycled, reports) = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(args.threads);
        for (i, counter) in counters.iter().enumerate() {
            let (stop, main, per_thread) = (&stop, &main, &per_thread);
            let spawned = std::thread::Builder::new()
                .name(format!("runner-{i}"))
                .spawn_scoped(s, move || runner(i, stop, counter, main, per_thread(i)));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The scope joins the runners already started once they see `stop`.
                    stop.store(true, Ordering::Relaxed);
                    return (Err(CliError::Spawn(e)), Vec::new());
                }
            }
        }
        let cycled = cycle(args, target, fentry, fexit, &counters);
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
    Ok((started, counters, reports))
}

/// Why `got` is not a correct run, if it is not: it must return `want`, which is what
/// `expected` means for this run.
fn check(
    got: &Result<u64, ExecError>,
    want: Result<u64, &ExecError>,
    expected: &Expected,
) -> Option<String> {
    match got {
        Ok(v) if want == Ok(*v) => None,
        Ok(v) => Some(format!(
            "returned {v:#x}, the interpreter {}",
            expected.describe()
        )),
        Err(e) => Some(e.to_string()),
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

/// `OBJ.o:PROG` split, when the part before the last `:` is an ELF file.
pub fn object_program(spec: &Path) -> Option<(PathBuf, String)> {
    let text = spec.to_str()?;
    let (path, prog) = text.rsplit_once(':')?;
    let path = PathBuf::from(path);
    (!prog.is_empty() && super::is_elf(&path)).then(|| (path, prog.to_string()))
}

/// What `trace OBJ.o:PROG` was asked.
pub struct ObjectTraceArgs<'a> {
    /// The target's object and program.
    pub target: (PathBuf, String),
    /// `--fentry OBJ.o:PROG`.
    pub fentry: &'a Path,
    /// `--fexit OBJ.o:PROG`.
    pub fexit: Option<&'a Path>,
    /// `--packet`, for XDP targets.
    pub packet: Option<&'a str>,
    /// `--mem`, for raw targets.
    pub mem: MemArgs,
    /// Runner threads.
    pub threads: usize,
    /// Attach/detach cycles.
    pub cycles: u64,
    /// The tracers' budget of back edges and calls per run.
    pub tracer_budget: u64,
}

/// `trace OBJ.o:PROG --fentry OBJ.o:PROG [--fexit OBJ.o:PROG]`: as [`trace`], for programs of ELF
/// objects. Targets keep their maps, so their results may change from run to run: a run only
/// has to succeed. At the end the tracers' objects' maps are printed (one `map NAME: N entries`
/// line, then `  KEYHEX = VALUEHEX` lines).
pub fn trace_object(args: &ObjectTraceArgs<'_>, out: &mut dyn Write) -> Result<(), CliError> {
    use crate::loader::ProgType;
    use crate::runtime::{Engine, LoadOptions, Loaded, XdpFrame};
    use std::collections::BTreeMap;

    let (target_path, target_name) = &args.target;
    let runtime_error = |path: &Path, source| CliError::Runtime {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let target_object =
        crate::loader::Object::parse(&super::read_object(target_path)?).map_err(|source| {
            CliError::Load {
                path: target_path.clone(),
                source: Box::new(source),
            }
        })?;
    let params: BTreeMap<String, u32> = target_object
        .programs
        .iter()
        .filter_map(|p| p.params.map(|n| (p.name.clone(), n)))
        .collect();
    // Each object once: tracers of one object share its maps (and the target's, if the same).
    let mut objects: Vec<(PathBuf, Loaded)> = Vec::new();
    let mut load = |path: &Path| -> Result<usize, CliError> {
        if let Some(i) = objects.iter().position(|(p, _)| super::same_file(p, path)) {
            return Ok(i);
        }
        let object =
            crate::loader::Object::parse(&super::read_object(path)?).map_err(|source| {
                CliError::Load {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                }
            })?;
        let opts = LoadOptions {
            target_params: params.clone(),
            ..LoadOptions::default()
        };
        let loaded = Loaded::load(&object, &opts).map_err(|e| runtime_error(path, e))?;
        objects.push((path.to_path_buf(), loaded));
        Ok(objects.len() - 1)
    };
    let target_index = load(target_path)?;
    let spec = |p: &Path, flag: &str| {
        object_program(p).ok_or_else(|| {
            CliError::Usage(format!(
                "{flag} {}: with an ELF target, tracers are OBJ.o:PROG too",
                p.display()
            ))
        })
    };
    let fentry_spec = spec(args.fentry, "--fentry")?;
    let fexit_spec = args.fexit.map(|p| spec(p, "--fexit")).transpose()?;
    let fentry_index = load(&fentry_spec.0)?;
    let fexit_index = match &fexit_spec {
        Some((path, _)) => Some(load(path)?),
        None => None,
    };
    let target_loaded = &objects[target_index].1;
    let target = target_loaded
        .program(target_name)
        .map_err(|e| runtime_error(target_path, e))?;
    let tracer = |index: usize, (path, name): &(PathBuf, String), want: AttachKind| {
        let p = objects[index]
            .1
            .program(name)
            .map_err(|e| runtime_error(path, e))?;
        let (kind, section_target) = match p.prog_type() {
            ProgType::Fentry { target } => (AttachKind::Fentry, target),
            ProgType::Fexit { target } => (AttachKind::Fexit, target),
            other => {
                return Err(CliError::Usage(format!(
                    "{}:{name} is a {} program, not a tracer (SEC(\"fentry/NAME\") or SEC(\"fexit/NAME\"))",
                    path.display(),
                    other.name()
                )));
            }
        };
        if kind != want {
            return Err(CliError::Usage(format!(
                "{}:{name} is a {kind:?} program; give it with --{}",
                path.display(),
                format!("{kind:?}").to_lowercase()
            )));
        }
        if section_target != target_name {
            return Err(CliError::Usage(format!(
                "{}:{name} traces `{section_target}` (its section), not the target `{target_name}`",
                path.display()
            )));
        }
        let prog = p
            .jit_with_budget(Some(args.tracer_budget))
            .map_err(|e| runtime_error(path, e))?;
        Ok(prog)
    };
    let fentry_prog = tracer(fentry_index, &fentry_spec, AttachKind::Fentry)?;
    let fexit_prog = match (&fexit_spec, fexit_index) {
        (Some(spec), Some(i)) => Some(tracer(i, spec, AttachKind::Fexit)?),
        _ => None,
    };
    let fentry = Tracer {
        prog: fentry_prog,
        path: args.fentry,
    };
    let fexit = match (fexit_prog, args.fexit) {
        (Some(prog), Some(path)) => Some(Tracer { prog, path }),
        _ => None,
    };

    // How one run of the target goes.
    let packet = match args.packet {
        Some(hex) => {
            Some(
                crate::conformance::parse_hex_bytes(hex).map_err(|source| CliError::Hex {
                    what: "--packet",
                    source,
                })?,
            )
        }
        None => None,
    };
    let mem = args.mem.resolve(None)?;
    let is_xdp = *target.prog_type() == ProgType::Xdp;
    match (is_xdp, &packet) {
        (true, None) => {
            return Err(CliError::Usage(
                "the target is an XDP program: pass --packet HEX".into(),
            ));
        }
        (true, Some(p)) => {
            XdpFrame::new(p).map_err(|e| runtime_error(target_path, e.into()))?;
        }
        (false, Some(_)) => {
            return Err(CliError::Usage(
                "--packet is for XDP targets; give a raw target --mem".into(),
            ));
        }
        (false, None) => {}
    }
    let target_prog = target.jit().map_err(|e| runtime_error(target_path, e))?;
    let run_once = |mem_copy: &mut Vec<u8>| -> Result<(), String> {
        if let Some(p) = &packet {
            let frame = XdpFrame::new(p).map_err(|e| e.to_string())?;
            target
                .run_frame(Engine::Jit, &frame)
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            mem_copy.copy_from_slice(&mem);
            target
                .run_raw(Engine::Jit, mem_copy)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };

    let trace_args = TraceArgs {
        target: target_path.clone(),
        fentry: args.fentry.to_path_buf(),
        fexit: args.fexit.map(Path::to_path_buf),
        mem: args.mem.clone(),
        threads: args.threads,
        cycles: args.cycles,
        tracer_budget: args.tracer_budget,
    };
    let (started, counters, reports) =
        run_traced(&trace_args, &target_prog, &fentry, fexit.as_ref(), |_| {
            let mut copy = mem.clone();
            let run_once = &run_once;
            move || run_once(&mut copy)
        })?;
    drop(target_prog);
    let mut print_maps = |out: &mut dyn Write| -> Result<(), CliError> {
        let mut printed = Vec::new();
        for index in std::iter::once(fentry_index).chain(fexit_index) {
            if printed.contains(&index) {
                continue;
            }
            printed.push(index);
            for m in objects[index].1.maps() {
                let Some(contents) = super::object::map_contents(&m.map) else {
                    continue;
                };
                writeln!(out, "map {}: {} entries", m.name, contents.len()).map_err(stdout_err)?;
                for (k, v) in contents {
                    writeln!(out, "  {k} = {}", v.as_str().unwrap_or_default())
                        .map_err(stdout_err)?;
                }
            }
        }
        Ok(())
    };
    let problems = finish(
        &trace_args,
        started,
        &counters,
        &reports,
        &fentry,
        fexit.as_ref(),
        &mut print_maps,
        out,
    )?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::TraceFailed(problems.join("; ")))
    }
}
