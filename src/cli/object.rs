//! `livebpf run OBJ.o` and `livebpf dump OBJ.o`: ELF objects through the runtime layer
//! ([`crate::runtime`]).
//!
//! `run` loads the object once (maps persist across runs) and runs the program on each
//! `--packet` in order, as repeated `BPF_PROG_TEST_RUN` calls would. With `--json` it prints one
//! line:
//!
//! ```text
//! {"runs":[{"retval":N,"packet":"HEX"},...],"maps":{"NAME":{"KEYHEX":"VALHEX",...},...},"ns_per_run":F}
//! ```
//!
//! `packet` is the packet after the run; `maps` holds every hash and LRU hash map's present
//! keys and every array map's entries, keys in ascending hex order (raw bytes, lowercase hex;
//! per-CPU maps: every possible CPU's value, each padded to 8 bytes, concatenated, as `bpf(2)`
//! returns them; ring buffers and program arrays are left out). The maps are read after the
//! listed runs and before the `--repeat N` timing runs, which add `ns_per_run`: the mean
//! wall-clock time of N runs of the last packet in one frame (as the kernel's test run reuses
//! its frame), measured around the whole loop.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_json::{Map as JsonMap, Value, json};

use super::{CliError, Engine, stdout_err};
use crate::conformance::parse_hex_bytes;
use crate::loader::ProgType;
use crate::maps::{Map, MapType};
use crate::runtime::{self, LoadOptions, Loaded, LoadedProgram, RuntimeError, XdpFrame};

/// What `run OBJ.o` was asked.
pub struct RunObject<'a> {
    /// The object file.
    pub path: &'a Path,
    /// `--prog`.
    pub prog: Option<&'a str>,
    /// `--type`.
    pub prog_type: Option<&'a str>,
    /// `--engine`.
    pub engine: Engine,
    /// `--packet`, in order.
    pub packets: &'a [String],
    /// `--repeat`.
    pub repeat: Option<u64>,
    /// `--json`.
    pub json: bool,
}

fn runtime_error(path: &Path, source: RuntimeError) -> CliError {
    CliError::Runtime {
        path: path.to_path_buf(),
        source: Box::new(source),
    }
}

/// Loads the object at `path` (the CLI's `--type` applied to every program).
pub fn load(path: &Path, prog_type: Option<&str>, engine: Engine) -> Result<Loaded, CliError> {
    let prog_type = prog_type
        .map(|t| ProgType::from_section(t).map_err(|e| CliError::Usage(format!("--type {t}: {e}"))))
        .transpose()?;
    let bytes = super::read_object(path)?;
    let object = crate::loader::Object::parse(&bytes).map_err(|source| CliError::Load {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    Loaded::load(
        &object,
        &LoadOptions {
            prog_type,
            tail_call_jit: match engine {
                Engine::Jit => runtime::TailCallJit::Checked,
                Engine::Interp => runtime::TailCallJit::Interpreter,
            },
            ..LoadOptions::default()
        },
    )
    .map_err(|e| runtime_error(path, e))
}

/// The program `--prog` names, or the only one.
pub fn pick<'l>(
    loaded: &'l Loaded,
    prog: Option<&str>,
    path: &Path,
) -> Result<&'l LoadedProgram, CliError> {
    match prog {
        Some(name) => loaded.program(name).map_err(|e| runtime_error(path, e)),
        None => match (loaded.programs(), loaded.refused()) {
            ([only], []) => Ok(only),
            ([], [(name, _)]) => loaded.program(name).map_err(|e| runtime_error(path, e)),
            ([], []) => Err(CliError::Usage(format!(
                "{} holds no program",
                path.display()
            ))),
            _ => Err(CliError::Usage(format!(
                "{} holds several programs ({}); pick one with --prog NAME",
                path.display(),
                loaded.program_names()
            ))),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A map's contents for the JSON output, or `None` for maps that are not printed.
fn map_contents(map: &Map) -> Option<JsonMap<String, Value>> {
    if matches!(map.map_type(), MapType::Ringbuf | MapType::ProgArray) {
        return None;
    }
    let mut entries: Vec<(String, String)> = Vec::new();
    for key in map.keys() {
        if let Ok(Some(value)) = map.lookup(&key) {
            entries.push((hex(&key), hex(&value)));
        }
    }
    entries.sort();
    Some(
        entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    )
}

/// `run OBJ.o`.
pub fn run(args: &RunObject<'_>, out: &mut dyn Write) -> Result<(), CliError> {
    let path = args.path;
    let loaded = load(path, args.prog_type, args.engine)?;
    let prog = pick(&loaded, args.prog, path)?;
    if *prog.prog_type() != ProgType::Xdp {
        return Err(CliError::Usage(format!(
            "program `{}` is a {} program; `run` runs XDP programs on packets (give another program type with --type xdp)",
            prog.name(),
            prog.prog_type().name()
        )));
    }
    if args.packets.is_empty() {
        return Err(CliError::Usage(
            "an XDP program runs on packets: pass at least one --packet HEX (14 bytes or more)"
                .into(),
        ));
    }
    let engine = match args.engine {
        Engine::Jit => runtime::Engine::Jit,
        Engine::Interp => runtime::Engine::Interpreter,
    };
    let mut packets = Vec::with_capacity(args.packets.len());
    for p in args.packets {
        packets.push(parse_hex_bytes(p).map_err(|source| CliError::Hex {
            what: "--packet",
            source,
        })?);
    }
    let mut runs = Vec::new();
    for packet in &packets {
        let outcome = prog
            .run_xdp(engine, packet)
            .map_err(|e| runtime_error(path, e))?;
        runs.push(outcome);
    }
    let maps: Vec<(String, JsonMap<String, Value>)> = loaded
        .maps()
        .iter()
        .filter_map(|m| map_contents(&m.map).map(|c| (m.name.clone(), c)))
        .collect();
    let ns_per_run = match args.repeat {
        Some(n) => Some(time_runs(
            prog,
            engine,
            packets.last().expect("a packet"),
            n,
            path,
        )?),
        None => None,
    };
    if args.json {
        let mut obj = JsonMap::new();
        obj.insert(
            "runs".into(),
            Value::Array(
                runs.iter()
                    .map(|r| json!({"retval": r.retval, "packet": hex(&r.packet)}))
                    .collect(),
            ),
        );
        obj.insert(
            "maps".into(),
            Value::Object(
                maps.into_iter()
                    .map(|(name, c)| (name, Value::Object(c)))
                    .collect(),
            ),
        );
        if let Some(ns) = ns_per_run {
            obj.insert("ns_per_run".into(), json!(ns));
        }
        writeln!(out, "{}", Value::Object(obj)).map_err(stdout_err)?;
        return Ok(());
    }
    for (i, r) in runs.iter().enumerate() {
        writeln!(
            out,
            "run {}: retval={} ({}) packet={}",
            i + 1,
            r.retval,
            xdp_verdict(r.retval),
            hex(&r.packet)
        )
        .map_err(stdout_err)?;
    }
    for (name, contents) in maps {
        writeln!(out, "map {name}: {} entries", contents.len()).map_err(stdout_err)?;
        for (k, v) in contents {
            writeln!(out, "  {k} = {}", v.as_str().unwrap_or_default()).map_err(stdout_err)?;
        }
    }
    if let Some(ns) = ns_per_run {
        writeln!(out, "ns_per_run={ns:.1}").map_err(stdout_err)?;
    }
    Ok(())
}

/// The largest `--repeat`.
pub const MAX_REPEAT: u64 = 1 << 32;

fn time_runs(
    prog: &LoadedProgram,
    engine: runtime::Engine,
    packet: &[u8],
    n: u64,
    path: &Path,
) -> Result<f64, CliError> {
    if n == 0 || n > MAX_REPEAT {
        return Err(CliError::Usage(format!(
            "--repeat {n}: give 1 to {MAX_REPEAT} runs"
        )));
    }
    let frame = XdpFrame::new(packet).map_err(|e| runtime_error(path, e.into()))?;
    // Compile before timing.
    if engine == runtime::Engine::Jit {
        prog.jit().map_err(|e| runtime_error(path, e))?;
    }
    let start = Instant::now();
    for _ in 0..n {
        prog.run_frame(engine, &frame)
            .map_err(|e| runtime_error(path, e))?;
    }
    Ok(start.elapsed().as_nanos() as f64 / n as f64)
}

/// The name of an XDP verdict.
fn xdp_verdict(retval: u32) -> &'static str {
    match retval {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown verdict",
    }
}

/// `dump OBJ.o --prog NAME [--jited]`: the program as it runs (map addresses in place, context
/// loads converted, loops inlined).
pub fn dump(
    path: &Path,
    prog: Option<&str>,
    prog_type: Option<&str>,
    jited: Option<super::Arch>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let loaded = load(path, prog_type, Engine::Interp)?;
    let p = pick(&loaded, prog, path)?;
    match jited {
        Some(arch) => super::dump::jited(p.program(), p.helpers(), arch, path, out),
        None => super::dump::ebpf(p.program(), out),
    }
}

/// `conformance-plugin --elf`: the object's `main` (in `.text`, as the runner writes it) or its
/// only program, run as a raw program with the conformance helpers.
pub fn run_conformance_elf(bytes: &[u8], engine: Engine, mem: &mut [u8]) -> Result<u64, CliError> {
    let path = Path::new("<stdin>");
    let object =
        crate::loader::Object::parse_with_text_program(bytes, "main").map_err(|source| {
            CliError::Load {
                path: path.to_path_buf(),
                source: Box::new(source),
            }
        })?;
    let loaded = Loaded::load(
        &object,
        &LoadOptions {
            prog_type: Some(ProgType::Raw),
            helpers: Some(crate::helpers::Helpers::conformance()),
            ..LoadOptions::default()
        },
    )
    .map_err(|e| runtime_error(path, e))?;
    let prog = match loaded.program("main") {
        Ok(p) => p,
        Err(RuntimeError::NoSuchProgram { .. }) => pick(&loaded, None, path)?,
        Err(e) => return Err(runtime_error(path, e)),
    };
    let engine = match engine {
        Engine::Jit => runtime::Engine::Jit,
        Engine::Interp => runtime::Engine::Interpreter,
    };
    prog.run_raw(engine, mem)
        .map_err(|e| runtime_error(path, e))
}
