//! The `livebpf` command line. `main.rs` only parses arguments and prints the one-line error.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::conformance::{TestCase, parse_hex_bytes};
use crate::helpers::Helpers;
use crate::interp::Interpreter;
use crate::isa::{DecodeError, Program};

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
    /// The reference interpreter.
    Interp,
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
        /// Input memory as hex bytes (spaces allowed), passed in r1 with its length in r2.
        #[arg(long, conflicts_with = "zeroed_mem")]
        mem: Option<String>,
        /// Input memory of this many zero bytes.
        #[arg(long, value_name = "N")]
        zeroed_mem: Option<usize>,
        #[arg(long, value_enum, default_value_t = Engine::Interp)]
        engine: Engine,
        /// Stop after this many instructions (interpreter only).
        #[arg(long)]
        budget: Option<u64>,
    },
    /// Speak the conformance suite's plugin protocol: program as hex on stdin, memory as hex in the
    /// first argument, r0 printed in hex.
    ConformancePlugin {
        /// Input memory as hex bytes.
        mem: Option<String>,
        #[arg(long, value_enum, default_value_t = Engine::Interp)]
        engine: Engine,
    },
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

fn run_engine(
    engine: Engine,
    program: &Program,
    mem: &mut [u8],
    budget: Option<u64>,
) -> Result<u64, CliError> {
    match engine {
        Engine::Interp => Ok(Interpreter::new(program)
            .with_helpers(Helpers::conformance())
            .with_budget(budget)
            .run(mem)?),
    }
}

/// Runs one command, writing its normal output to `out`.
pub fn execute(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let stdout_err = |source| CliError::Write {
        path: PathBuf::from("<stdout>"),
        source,
    };
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
            zeroed_mem,
            engine,
            budget,
        } => {
            let (prog, file_mem) = load_program(&program)?;
            let mut mem = match (mem, zeroed_mem) {
                (Some(hex), _) => parse_hex_bytes(&hex).ok_or(CliError::Hex { what: "--mem" })?,
                (None, Some(n)) if n <= MAX_ZEROED_MEM => vec![0; n],
                (None, Some(n)) => return Err(CliError::MemTooLarge(n)),
                (None, None) => file_mem.unwrap_or_default(),
            };
            let r0 = run_engine(engine, &prog, &mut mem, budget)?;
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
            let program = decode(&bytes, Path::new("<stdin>"))?;
            let mut mem = match mem {
                Some(hex) => parse_hex_bytes(&hex).ok_or(CliError::Hex { what: "memory" })?,
                None => Vec::new(),
            };
            let r0 = run_engine(engine, &program, &mut mem, None)?;
            writeln!(out, "{r0:x}").map_err(stdout_err)?;
        }
    }
    Ok(())
}
