//! The `livebpf` command line. `main.rs` only parses arguments and prints the one-line error.
//!
//! `dump` lives in `cli/dump.rs`, `show` in `cli/show.rs`, `trace` in `cli/trace.rs`; everything else is here.

mod dump;
mod object;
mod show;
mod trace;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::conformance::{HexError, TestCase, parse_hex_bytes};
use crate::helpers::Helpers;
use crate::interp::Interpreter;
use crate::isa::{DecodeError, Program};
use crate::jit::{JitError, JitOptions, JitProgram};

pub use dump::Arch;

/// Largest program file read: 2^24 instruction slots of 8 bytes, the most the JIT's runtime
/// calls can number (`jit::rt::MAX_PC`). Assembly and `.data` files get the same limit, which is
/// far beyond any program written by hand or compiled; anything larger is the wrong file.
pub const MAX_PROGRAM_FILE: u64 = ((crate::jit::rt::MAX_PC as u64) + 1) * 8;

/// Largest program `conformance-plugin` reads on stdin: the hex text of the largest program file,
/// two digits and a separator per byte.
pub const MAX_PROGRAM_HEX: u64 = 3 * MAX_PROGRAM_FILE;

/// The first bytes of every ELF file.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// The UTF-8 byte order mark some editors put at the start of a text file.
const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

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
        #[command(flatten)]
        object: ObjectArgs,
        /// ELF objects: an XDP packet as hex bytes; the program runs on each, in order, with
        /// the object's maps kept across runs.
        #[arg(long = "packet", value_name = "HEX")]
        packets: Vec<String>,
        /// ELF objects: then time this many runs of the last packet and report ns per run.
        #[arg(long, value_name = "N")]
        repeat: Option<u64>,
        /// ELF objects: print one JSON line with each run's verdict and packet, and the maps.
        #[arg(long)]
        json: bool,
    },
    /// Speak the conformance suite's plugin protocol: program as hex on stdin, memory as hex in the
    /// first argument, r0 printed in hex.
    ConformancePlugin {
        /// Input memory as hex bytes.
        mem: Option<String>,
        #[arg(long, value_enum, default_value_t = Engine::default_for_host())]
        engine: Engine,
        /// The program on stdin is the hex of an ELF object (the runner's `--elf` mode): its
        /// function `main` in `.text`, or its only program.
        #[arg(long)]
        elf: bool,
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
        #[command(flatten)]
        object: ObjectArgs,
    },
    /// Run TARGET in several threads while attaching and detaching tracing programs to it over
    /// and over; check every result against the interpreter and that no trampoline image leaks.
    Trace {
        /// The traced program (assembly, bytecode or a conformance `.data` file), or
        /// `OBJ.o:PROG`, a program of an ELF object; tracers are then `OBJ.o:PROG` too, and
        /// their sections must name the target (`SEC("fentry/PROG")`).
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
        /// ELF targets of type XDP: the packet each run gets (hex).
        #[arg(long, value_name = "HEX")]
        packet: Option<String>,
    },
    /// Describe an ELF object compiled with `clang -O2 -g -target bpf` (libbpf conventions), one
    /// line per item: `program NAME section=S type=T [target=F] insns=N maps=M helpers=IDS`,
    /// then `map NAME type=T key_size=K value_size=V max_entries=N flags=0xF`, then `note TEXT`.
    Show {
        /// The object file (`.o`).
        object: PathBuf,
    },
}

/// Which program of an ELF object, and as what.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ObjectArgs {
    /// ELF objects: the program to use (needed when the object has several).
    #[arg(long, value_name = "NAME")]
    pub prog: Option<String>,
    /// ELF objects: the program type, as a libbpf section name (`xdp`, `socket`, `tc`,
    /// `fentry/NAME`, …), instead of the one the program's section gives.
    #[arg(long = "type", value_name = "SECTION")]
    pub prog_type: Option<String>,
}

impl ObjectArgs {
    fn is_empty(&self) -> bool {
        self.prog.is_none() && self.prog_type.is_none()
    }
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
            (Some(hex), _) => parse_hex_bytes(hex).map_err(|source| CliError::Hex {
                what: "--mem",
                source,
            }),
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
    #[error("bad hex in {what}: {source}; expected pairs of hex digits such as `01 ff`")]
    Hex {
        what: &'static str,
        source: HexError,
    },
    #[error(
        "{path} is larger than {limit} bytes, the limit for a program file (2^24 instruction slots of 8 bytes, the most the JIT accepts); is it the right file?"
    )]
    TooLarge { path: PathBuf, limit: u64 },
    #[error(
        "the program on stdin is larger than {limit} bytes of hex (3 characters per byte of the largest program, 2^24 slots of 8 bytes)"
    )]
    StdinTooLarge { limit: u64 },
    #[error(
        "{what} is an ELF object file; this command takes assembly or bytecode. `livebpf run`, `dump` and `show` load objects (pick a program with --prog NAME)"
    )]
    Elf { what: String },
    /// Options that do not fit together or are missing.
    #[error("{0}")]
    Usage(String),
    /// The runtime refused the object or a run failed.
    #[error("{}: {source}", path.display())]
    Runtime {
        /// The object file.
        path: PathBuf,
        /// Why.
        source: Box<crate::runtime::RuntimeError>,
    },
    #[error("{path}: line {line}, column {column}: {}; assembly must be UTF-8 text, and the file is not valid bytecode either", not_text(*.byte))]
    NotText {
        path: PathBuf,
        line: usize,
        column: usize,
        byte: u8,
    },
    #[error(
        "{}; refusing to overwrite it with the bytecode: pass -o OUTPUT naming another file",
        output_is_input(.input, .output)
    )]
    OverwriteInput { input: PathBuf, output: PathBuf },
    #[error("cannot write to stdout: {source}{}", stdout_hint(.source))]
    Stdout { source: std::io::Error },
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
    /// `show`: the object was refused.
    #[error("{}: {source}", path.display())]
    Load {
        /// The object file.
        path: PathBuf,
        /// Why the loader refused it.
        source: Box<crate::loader::LoadError>,
    },
}

fn not_text(byte: u8) -> String {
    match byte {
        0 => "a NUL byte".to_string(),
        b => format!("byte {b:#04x} is not UTF-8"),
    }
}

fn output_is_input(input: &Path, output: &Path) -> String {
    if input == output {
        format!("the output {} is the input file", output.display())
    } else {
        format!(
            "the output {} is the input file {} under another name",
            output.display(),
            input.display()
        )
    }
}

fn stdout_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EBADF) => {
            " (stdout is closed or not open for writing; redirect it, e.g. to /dev/null)"
        }
        Some(libc::EPIPE) => " (the program reading the output has exited)",
        _ => "",
    }
}

/// Reads `reader` to its end if it holds at most `limit` bytes, else returns `None`. It reads no
/// more than `limit + 1` bytes, so an endless source (a FIFO, `/dev/zero`) cannot exhaust memory.
fn read_at_most(reader: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// As [`read_at_most`], for hex text: it stops early after a chunk with a byte that is neither a
/// hex digit nor whitespace, since the parser rejects the text at the first such byte anyway
/// (`conformance-plugin < /dev/zero` fails at once).
fn read_hex_at_most(reader: impl Read, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut reader = reader.take(limit.saturating_add(1));
    let (mut bytes, mut chunk) = (Vec::new(), vec![0u8; 1 << 16]);
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        bytes.extend_from_slice(&chunk[..n]);
        if chunk[..n]
            .iter()
            .any(|b| !b.is_ascii_hexdigit() && !b.is_ascii_whitespace())
        {
            return Ok(Some(bytes));
        }
    }
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// Reads a program file of at most [`MAX_PROGRAM_FILE`] bytes.
fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    let io = |source| CliError::Read {
        path: path.to_path_buf(),
        source,
    };
    let too_large = || CliError::TooLarge {
        path: path.to_path_buf(),
        limit: MAX_PROGRAM_FILE,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // A regular file says how large it is: refuse a huge one without reading it.
    if file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() > MAX_PROGRAM_FILE)
    {
        return Err(too_large());
    }
    read_at_most(file, MAX_PROGRAM_FILE)
        .map_err(io)?
        .ok_or_else(too_large)
}

/// Whether `path` is a regular file that starts like an ELF file (unreadable files are left to
/// the reader, which reports them). Only regular files: peeking at a FIFO or a terminal would
/// consume what the command's reader then misses.
fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|()| magic == ELF_MAGIC)
}

/// Reads an ELF object, with the limit of a program file.
fn read_object(path: &Path) -> Result<Vec<u8>, CliError> {
    read(path)
}

/// Refuses ELF-only options for a program that is not an ELF object.
fn no_object_options(what: &Path, used: bool) -> Result<(), CliError> {
    if used {
        return Err(CliError::Usage(format!(
            "{} is not an ELF object: --prog, --type, --packet, --repeat and --json are for objects",
            what.display()
        )));
    }
    Ok(())
}

/// Decodes bytecode; an ELF object gets its own message.
fn decode(bytes: &[u8], what: &Path) -> Result<Program, CliError> {
    if bytes.starts_with(ELF_MAGIC) {
        return Err(CliError::Elf {
            what: what.display().to_string(),
        });
    }
    Program::decode(bytes).map_err(|source| CliError::Decode {
        what: what.display().to_string(),
        source,
    })
}

/// Whether bytes that did not decode as bytecode read as text with a few bad bytes: at most one
/// byte in 16 is binary (not UTF-8, or an ASCII control byte other than tab, newline, form feed
/// and carriage return). Bytecode is mostly zero bytes; text has none.
fn looks_like_text(bytes: &[u8]) -> bool {
    let binary: usize = bytes
        .utf8_chunks()
        .map(|chunk| {
            chunk.invalid().len()
                + chunk
                    .valid()
                    .bytes()
                    .filter(|b| b.is_ascii_control() && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0c))
                    .count()
        })
        .sum();
    binary.saturating_mul(16) <= bytes.len()
}

/// The bytes as assembly text, or the line and column of the first byte that is not UTF-8 or is
/// a NUL.
fn as_text<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, CliError> {
    let (valid, bad) = match std::str::from_utf8(bytes) {
        Ok(text) => (text, None),
        Err(e) => {
            let (good, rest) = bytes.split_at(e.valid_up_to());
            (
                std::str::from_utf8(good).unwrap_or_default(),
                rest.first().copied(),
            )
        }
    };
    let (before, byte) = match (valid.find('\0'), bad) {
        (Some(nul), _) => (&valid[..nul], 0),
        (None, Some(byte)) => (valid, byte),
        (None, None) => return Ok(valid),
    };
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Err(CliError::NotText {
        path: path.to_path_buf(),
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        byte,
    })
}

/// A program file: a conformance `.data` file, assembly text, or raw bytecode. Returns the
/// program and, for `.data` files, its memory. The README's "Program files" gives the rule,
/// in this order:
///
/// 1. `\x7fELF` at the start: an ELF object, refused with the way to extract its bytecode.
/// 2. A UTF-8 byte order mark at the start: text; the mark is dropped.
/// 3. No NUL byte: text. Valid bytecode always has one, since its last instruction is `exit`,
///    `ja` or `ja32`, whose register byte (and more) must be zero.
/// 4. Bytes that decode as a valid program: bytecode.
/// 5. Otherwise text if it looks like text (`looks_like_text`), else bytecode, and the error
///    is the decoder's.
///
/// Text must be UTF-8 without NUL bytes; the first byte that is not is reported with its line
/// and column. Text with a line `-- asm` is a `.data` file, other text is assembly.
pub fn load_program(path: &Path) -> Result<(Program, Option<Vec<u8>>), CliError> {
    let bytes = read(path)?;
    if bytes.starts_with(ELF_MAGIC) {
        return Err(CliError::Elf {
            what: path.display().to_string(),
        });
    }
    let text = if let Some(rest) = bytes.strip_prefix(UTF8_BOM) {
        rest
    } else if !bytes.contains(&0) {
        &bytes[..]
    } else {
        match decode(&bytes, path) {
            Ok(program) => return Ok((program, None)),
            Err(CliError::Decode { .. }) if looks_like_text(&bytes) => &bytes[..],
            Err(e) => return Err(e),
        }
    };
    let text = as_text(text, path)?;
    if text.lines().any(|l| l.trim() == "-- asm") {
        let name = path.display().to_string();
        let case = TestCase::parse(&name, text)?;
        return Ok((case.program()?, Some(case.mem)));
    }
    let program = crate::asm::assemble_program(text).map_err(|source| CliError::Asm {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((program, None))
}

/// Whether two paths name the same existing file (device and inode), whatever the spelling.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
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
    CliError::Stdout { source }
}

/// Runs one command, writing its normal output to `out`.
pub fn execute(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Asm { input, output } => {
            let output = output.unwrap_or_else(|| input.with_extension("bin"));
            // `asm x.bin` with assembly in x.bin would replace the source with its bytecode.
            if same_file(&input, &output) {
                return Err(CliError::OverwriteInput { input, output });
            }
            let (program, _) = load_program(&input)?;
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
            object,
            packets,
            repeat,
            json,
        } => {
            if is_elf(&program) {
                if mem.mem.is_some() || mem.zeroed_mem.is_some() || budget.is_some() {
                    return Err(CliError::Usage(
                        "--mem, --zeroed-mem and --budget are for bytecode; an XDP object runs on --packet HEX".into(),
                    ));
                }
                object::run(
                    &object::RunObject {
                        path: &program,
                        prog: object.prog.as_deref(),
                        prog_type: object.prog_type.as_deref(),
                        engine,
                        packets: &packets,
                        repeat,
                        json,
                    },
                    out,
                )?;
                return out.flush().map_err(stdout_err);
            }
            no_object_options(
                &program,
                !object.is_empty() || !packets.is_empty() || repeat.is_some() || json,
            )?;
            let (prog, file_mem) = load_program(&program)?;
            let mut mem = mem.resolve(file_mem)?;
            let r0 = run_engine(engine, &prog, &mut mem, budget, &program)?;
            writeln!(out, "{r0:#x}").map_err(stdout_err)?;
        }
        Command::ConformancePlugin { mem, engine, elf } => {
            let input = read_hex_at_most(std::io::stdin().lock(), MAX_PROGRAM_HEX)
                .map_err(CliError::Stdin)?
                .ok_or(CliError::StdinTooLarge {
                    limit: MAX_PROGRAM_HEX,
                })?;
            // Bytes that are not UTF-8 become U+FFFD, which the hex parser reports in place.
            let bytes = parse_hex_bytes(&String::from_utf8_lossy(&input)).map_err(|source| {
                CliError::Hex {
                    what: "the program on stdin",
                    source,
                }
            })?;
            let stdin = Path::new("<stdin>");
            let mut mem = match mem {
                Some(hex) => parse_hex_bytes(&hex).map_err(|source| CliError::Hex {
                    what: "memory",
                    source,
                })?,
                None => Vec::new(),
            };
            let r0 = if elf {
                object::run_conformance_elf(&bytes, engine, &mut mem)?
            } else {
                let program = decode(&bytes, stdin)?;
                run_engine(engine, &program, &mut mem, None, stdin)?
            };
            writeln!(out, "{r0:x}").map_err(stdout_err)?;
        }
        Command::Dump {
            program,
            jited,
            arch,
            object,
        } => {
            let arch = match (jited, arch) {
                (false, _) => None,
                (true, Some(arch)) => Some(arch),
                (true, None) => {
                    Some(Arch::host().ok_or(CliError::NoHostArch(std::env::consts::ARCH))?)
                }
            };
            if is_elf(&program) {
                object::dump(
                    &program,
                    object.prog.as_deref(),
                    object.prog_type.as_deref(),
                    arch,
                    out,
                )?;
                return out.flush().map_err(stdout_err);
            }
            no_object_options(&program, !object.is_empty())?;
            let (prog, _) = load_program(&program)?;
            if let Some(arch) = arch {
                dump::jited(&prog, &Helpers::conformance(), arch, &program, out)?;
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
            packet,
        } => {
            if let Some((object, prog)) = trace::object_program(&target) {
                return trace::trace_object(
                    &trace::ObjectTraceArgs {
                        target: (object, prog),
                        fentry: &fentry,
                        fexit: fexit.as_deref(),
                        packet: packet.as_deref(),
                        mem,
                        threads: threads as usize,
                        cycles,
                        tracer_budget: budget,
                    },
                    out,
                );
            }
            if packet.is_some() {
                return Err(CliError::Usage(
                    "--packet is for ELF targets (OBJ.o:PROG)".into(),
                ));
            }
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
        Command::Show { object } => show::show(&object, out)?,
    }
    // A buffered writer would report a failed final write only here (its drop ignores errors).
    out.flush().map_err(stdout_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_at_most_the_limit() {
        assert_eq!(
            read_at_most(&b"abcd"[..], 4).unwrap(),
            Some(b"abcd".to_vec())
        );
        assert_eq!(read_at_most(&b"abcde"[..], 4).unwrap(), None);
        // An endless source: only limit + 1 bytes are taken from it.
        assert_eq!(read_at_most(std::io::repeat(0), 1000).unwrap(), None);
        assert_eq!(
            read_hex_at_most(std::io::repeat(b'0'), 100_000).unwrap(),
            None
        );
        assert_eq!(
            read_hex_at_most(&b"01 02\n"[..], 6).unwrap(),
            Some(b"01 02\n".to_vec())
        );
        // Hex text that has gone wrong is read no further than the chunk with the bad byte.
        let bad = read_hex_at_most(std::io::repeat(b'+'), MAX_PROGRAM_HEX).unwrap();
        assert!(bad.is_some_and(|b| b.len() <= 1 << 16));
    }

    #[test]
    fn text_and_bytecode_are_told_apart() {
        assert!(looks_like_text(b"mov %r0, 1\r\n\texit\x0c\n"));
        assert!(looks_like_text(
            "é€ mov %r0, 1 # comment with one NUL\0 in it".as_bytes()
        ));
        assert!(!looks_like_text(&[0x95, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!looks_like_text(b"\xff\xfe\xfd\xfc mostly text"));
        let path = Path::new("p.s");
        let at = |bytes: &[u8]| match as_text(bytes, path) {
            Err(CliError::NotText {
                line, column, byte, ..
            }) => (line, column, byte),
            other => panic!("{other:?}"),
        };
        assert_eq!(as_text(b"exit\n", path).unwrap(), "exit\n");
        assert_eq!(at(b"exit\n\xff"), (2, 1, 0xff));
        assert_eq!(at(b"\xc3\xa9\nab\0\xff"), (2, 3, 0));
        assert_eq!(at(b"\xc3\xa9a\xe9"), (1, 3, 0xe9));
    }
}
