//! The `livebpf` command line. `main.rs` only parses arguments and prints the one-line error.
//!
//! `dump` lives in [`dump`], `trace` in [`trace`]; everything else is here.

mod dump;
mod trace;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::conformance::{TestCase, parse_hex_bytes};
use crate::helpers::Helpers;
use crate::interp::Interpreter;
use crate::isa::{DecodeError, Program};
use crate::jit::{JitError, JitOptions, JitProgram};

pub use dump::Arch;

/// Largest `--zeroed-mem` accepted, so a typo cannot exhaust memory.
pub const MAX_ZEROED_MEM: usize = 1 << 30;

#[derive(Parser, Debug)]
#[command(
    name = "livebpf",
    version,
    about = "A userspace eBPF runtime whose JIT code can be traced and replaced live"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Execution engines.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The JIT, with every memory access checked.
    Jit,
    /// The reference interpreter.
    Interp,
}

impl Engine {
    /// The JIT where this host can run its code, else the interpreter. This is the one place
    /// that lists the hosts with a JIT backend.
    pub const fn default_for_host() -> Engine {
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            Engine::Jit
        } else {
            Engine::Interp
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Assemble eBPF assembly (the conformance suite's dialect) into bytecode.
    Asm {
        /// Assembly source file.
        input: PathBuf,
        /// Output file (default: the input with extension `.bin`).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Disassemble bytecode into assembly.
    Disasm {
        /// Bytecode file (8 bytes per instruction slot).
        input: PathBuf,
    },
    /// Run a program and print r0 in hex.
    Run {
        /// Assembly text, raw bytecode, or a conformance `.data` file (whose memory is used unless
        /// --mem is given).
        program: PathBuf,
        #[command(flatten)]
        mem: MemArgs,
        #[arg(long, value_enum, default_value_t = Engine::default_for_host())]
        engine: Engine,
        /// Stop a runaway program with an error: after this many instructions under the
        /// interpreter, after this many back edges and BPF-to-BPF calls under the JIT.
        #[arg(long, value_name = "N")]
        budget: Option<u64>,
    },
    /// Speak the conformance suite's plugin protocol: program as hex on stdin, memory as hex in the
    /// first argument, r0 printed in hex.
    ConformancePlugin {
        /// Input memory as hex bytes.
        mem: Option<String>,
        #[arg(long, value_enum, default_value_t = Engine::default_for_host())]
        engine: Engine,
    },
    /// Print a program: its eBPF instructions with slot numbers, or with --jited the machine
    /// code the JIT generates for it (checked mode), with the patch site marked.
    Dump {
        /// Assembly text, raw bytecode, or a conformance `.data` file.
        program: PathBuf,
        /// Disassemble the JIT's machine code instead of the eBPF instructions.
        #[arg(long)]
        jited: bool,
        /// Architecture of the machine code (default: this host's).
        #[arg(long, value_enum, requires = "jited")]
        arch: Option<Arch>,
    },
    /// Run TARGET in several threads while attaching and detaching tracing programs to it over
    /// and over; check every result against the interpreter and that no trampoline image leaks.
    Trace {
        /// The traced program (assembly, bytecode or a conformance `.data` file).
        target: PathBuf,
        /// Tracing program run on entry: r1 points at six u64s, the target's r1..r5 and then 0.
        #[arg(long, value_name = "PROG")]
        fentry: PathBuf,
        /// Tracing program run on exit: as --fentry, with the target's result at r1+40.
        #[arg(long, value_name = "PROG")]
        fexit: Option<PathBuf>,
        #[command(flatten)]
        mem: MemArgs,
        /// Threads running TARGET.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
        threads: u32,
        /// Attach/detach cycles.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        cycles: u64,
        /// Back edges and BPF-to-BPF calls a tracer run may take; one that needs more fails
        /// (counted in errors), so a tracer that loops forever cannot hang the trace.
        #[arg(long, value_name = "N", default_value_t = trace::TRACER_BUDGET)]
        budget: u64,
    },
}

/// The input memory of `run` and `trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct MemArgs {
    /// Input memory as hex bytes (spaces allowed), passed in r1 with its length in r2.
    #[arg(long, conflicts_with = "zeroed_mem")]
    pub mem: Option<String>,
    /// Input memory of this many zero bytes.
    #[arg(long, value_name = "N")]
    pub zeroed_mem: Option<usize>,
}

impl MemArgs {
    /// The memory these options ask for, else `file_mem` (a `.data` file's), else none.
    fn resolve(&self, file_mem: Option<Vec<u8>>) -> Result<Vec<u8>, CliError> {
        match (&self.mem, self.zeroed_mem) {
            (Some(hex), _) => parse_hex_bytes(hex).ok_or(CliError::Hex { what: "--mem" }),
            (None, Some(n)) if n <= MAX_ZEROED_MEM => Ok(vec![0; n]),
            (None, Some(n)) => Err(CliError::MemTooLarge(n)),
            (None, None) => Ok(file_mem.unwrap_or_default()),
        }
    }
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Asm {
        path: PathBuf,
        source: crate::asm::AsmError,
    },
    #[error("{what}: {source}")]
    Decode { what: String, source: DecodeError },
    #[error("{0}")]
    Conformance(#[from] crate::conformance::ConformanceError),
    #[error("bad hex in {what}: expected pairs of hex digits such as `01 ff`")]
    Hex { what: &'static str },
    #[error("{0}")]
    Exec(#[from] crate::exec::ExecError),
    #[error("--zeroed-mem {0} is too large; the limit is {MAX_ZEROED_MEM} bytes")]
    MemTooLarge(usize),
    #[error("cannot read the program from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("cannot JIT-compile {what}: {source}")]
    Jit { what: String, source: JitError },
    #[error("cannot JIT-compile {what}: {source}; use --engine interp")]
    JitUnsupportedHost { what: String, source: JitError },
    #[error("cannot disassemble the machine code: {0}")]
    Disasm(String),
    #[error("livebpf has no JIT backend for this {0} host; pass --arch x86_64 or --arch arm64")]
    NoHostArch(&'static str),
    #[error("cannot attach {what}: {source}")]
    Attach {
        what: String,
        source: crate::trampoline::AttachError,
    },
    #[error("cannot detach {what}: {source}")]
    Detach {
        what: String,
        source: crate::trampoline::AttachError,
    },
    #[error(
        "{what} does not finish within {budget} instructions under the interpreter; trace needs a target that ends"
    )]
    TraceTargetRunsAway { what: String, budget: u64 },
    #[error("cannot start a runner thread: {0}")]
    Spawn(std::io::Error),
    #[error("runner thread {thread} completed no run for {secs} s; is the traced target stuck?")]
    TraceStalled { thread: usize, secs: u64 },
    #[error("trace failed: {0}")]
    TraceFailed(String),
}

fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn decode(bytes: &[u8], what: &Path) -> Result<Program, CliError> {
    Program::decode(bytes).map_err(|source| CliError::Decode {
        what: what.display().to_string(),
        source,
    })
}

/// A program file: a conformance `.data` file, assembly text, or raw bytecode. Returns the
/// program and, for `.data` files, its memory.
pub fn load_program(path: &Path) -> Result<(Program, Option<Vec<u8>>), CliError> {
    let bytes = read(path)?;
    let text = std::str::from_utf8(&bytes).ok();
    match text {
        Some(text) if text.lines().any(|l| l.trim() == "-- asm") => {
            let name = path.display().to_string();
            let case = TestCase::parse(&name, text)?;
            Ok((case.program()?, Some(case.mem)))
        }
        // Bytecode almost always holds NUL bytes; text never does.
        Some(text) if !text.contains('\0') => {
            let program = crate::asm::assemble_program(text).map_err(|source| CliError::Asm {
                path: path.to_path_buf(),
                source,
            })?;
            Ok((program, None))
        }
        _ => Ok((decode(&bytes, path)?, None)),
    }
}

/// Wraps a JIT error for the program called `what`.
fn jit_error(what: &Path, source: JitError) -> CliError {
    CliError::Jit {
        what: what.display().to_string(),
        source,
    }
}

fn run_engine(
    engine: Engine,
    program: &Program,
    mem: &mut [u8],
    budget: Option<u64>,
    what: &Path,
) -> Result<u64, CliError> {
    match engine {
        Engine::Interp => Ok(Interpreter::new(program)
            .with_helpers(Helpers::conformance())
            .with_budget(budget)
            .run(mem)?),
        Engine::Jit => {
            let opts = JitOptions::checked().with_budget(budget);
            let jit =
                JitProgram::compile(program, &Helpers::conformance(), opts).map_err(|source| {
                    match source {
                        // Only an explicit `--engine jit` gets here: say what works instead.
                        JitError::UnsupportedHost { .. } => CliError::JitUnsupportedHost {
                            what: what.display().to_string(),
                            source,
                        },
                        source => jit_error(what, source),
                    }
                })?;
            Ok(jit.run(mem)?)
        }
    }
}

fn stdout_err(source: std::io::Error) -> CliError {
    CliError::Write {
        path: PathBuf::from("<stdout>"),
        source,
    }
}

/// Runs one command, writing its normal output to `out`.
pub fn execute(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Asm { input, output } => {
            let (program, _) = load_program(&input)?;
            let output = output.unwrap_or_else(|| input.with_extension("bin"));
            std::fs::write(&output, program.encode()).map_err(|source| CliError::Write {
                path: output.clone(),
                source,
            })?;
            writeln!(
                out,
                "wrote {} instructions ({} bytes) to {}",
                program.insns().len(),
                program.slot_count() * 8,
                output.display()
            )
            .map_err(stdout_err)?;
        }
        Command::Disasm { input } => {
            let program = decode(&read(&input)?, &input)?;
            write!(out, "{}", crate::asm::disassemble(program.insns())).map_err(stdout_err)?;
        }
        Command::Run {
            program,
            mem,
            engine,
            budget,
        } => {
            let (prog, file_mem) = load_program(&program)?;
            let mut mem = mem.resolve(file_mem)?;
            let r0 = run_engine(engine, &prog, &mut mem, budget, &program)?;
            writeln!(out, "{r0:#x}").map_err(stdout_err)?;
        }
        Command::ConformancePlugin { mem, engine } => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(CliError::Stdin)?;
            let bytes = parse_hex_bytes(&input).ok_or(CliError::Hex {
                what: "the program on stdin",
            })?;
            let stdin = Path::new("<stdin>");
            let program = decode(&bytes, stdin)?;
            let mut mem = match mem {
                Some(hex) => parse_hex_bytes(&hex).ok_or(CliError::Hex { what: "memory" })?,
                None => Vec::new(),
            };
            let r0 = run_engine(engine, &program, &mut mem, None, stdin)?;
            writeln!(out, "{r0:x}").map_err(stdout_err)?;
        }
        Command::Dump {
            program,
            jited,
            arch,
        } => {
            let (prog, _) = load_program(&program)?;
            if jited {
                let arch = match arch {
                    Some(arch) => arch,
                    None => Arch::host().ok_or(CliError::NoHostArch(std::env::consts::ARCH))?,
                };
                dump::jited(&prog, arch, &program, out)?;
            } else {
                dump::ebpf(&prog, out)?;
            }
        }
        Command::Trace {
            target,
            fentry,
            fexit,
            mem,
            threads,
            cycles,
            budget,
        } => {
            trace::trace(
                &trace::TraceArgs {
                    target,
                    fentry,
                    fexit,
                    mem,
                    threads: threads as usize,
                    cycles,
                    tracer_budget: budget,
                },
                out,
            )?;
        }
    }
    Ok(())
}
