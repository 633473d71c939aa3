//! The runtime layer: turns a parsed object ([`crate::loader::Object`]) into programs that run,
//! with their maps, helpers and contexts, as `libbpf` plus the kernel would.
//!
//! Loading an object ([`Loaded::load`]):
//! 1. creates every map ([`crate::maps::Map`]); global data maps (`.data`, `.rodata`, `.bss`,
//!    …) get their initial value;
//! 2. for each program, rewrites each pseudo `lddw` into a plain one: a map's address
//!    ([`Map::as_raw`]) or the address of a global variable inside its map's value;
//! 3. runs what the kernel's verifier would do to it (`rewrite.rs`): the context conversion
//!    (`struct xdp_md` loads become loads of [`xdp::XdpContext`]) and the inlining of
//!    `bpf_loop` into a loop over its callback;
//! 4. refuses a call of a helper livebpf does not have for the program's type, naming it.
//!
//! A [`LoadedProgram`] then runs on any engine ([`Engine`]): the interpreter or the checked JIT
//! (safe), or the trusted JIT ([`LoadedProgram::jit_trusted`], `unsafe`: livebpf has no
//! verifier, so only a program the kernel's verifier would accept may run unchecked).
//!
//! # What a program may touch
//! In checked mode (the interpreter, the checked JIT): its stack, its context (read-only), the
//! packet's frame (XDP), the values of its global data maps (`.rodata*` read-only), and every
//! value a map helper returned during the run. Anything else ends the run with
//! [`ExecError::OutOfBounds`] naming the instruction and the address.

pub mod helpers;
pub mod printk;
mod rewrite;
pub mod xdp;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use thiserror::Error;

use crate::exec::{DirectTailCall, ExecError, HelperContext, MemRegion, RunEnv, TailTarget};
use crate::helpers::Helpers;
use crate::isa::Program;
use crate::jit::{JitError, JitOptions};
use crate::loader::{
    BPF_PSEUDO_FUNC, LoadError, MapOrigin, MapRefKind, Object, ProgType, ProgramSpec,
};
use crate::maps::{BPF_ANY, Map, MapError, MapSpec, MapType};
use crate::reclaim::ReadGuard;
use crate::trampoline::{Prog, ProgEnv};

pub use xdp::{XdpContext, XdpFrame};

/// Why an object, a program or a run failed.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The object could not be parsed or linked.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A map could not be created or initialised.
    #[error("map `{map}`: {source}")]
    Map {
        /// The map's name in the object.
        map: String,
        /// Why.
        source: MapError,
    },
    /// An instruction livebpf cannot run as the kernel would.
    #[error("program `{program}`, function `{function}`, instruction {insn}: {reason}")]
    Program {
        /// The program.
        program: String,
        /// The function the instruction is in (the program or one of its subprograms).
        function: String,
        /// The instruction's slot in the linked program (as `livebpf dump` numbers it).
        insn: usize,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A helper call livebpf cannot serve.
    #[error(
        "program `{program}`, function `{function}`, instruction {insn}: call of helper {helper}, which livebpf does not provide for {prog_type} programs"
    )]
    UnknownHelper {
        /// The program.
        program: String,
        /// The function the call is in.
        function: String,
        /// The call's slot in the linked program.
        insn: usize,
        /// The helper: its kernel name and id, or just the id.
        helper: String,
        /// The program's type.
        prog_type: &'static str,
    },
    /// The program was refused when the object was loaded.
    #[error("{reason}")]
    Refused {
        /// The program.
        program: String,
        /// Why it was refused.
        reason: String,
    },
    /// No program of that name.
    #[error("no program `{name}` in the object; it has: {available}")]
    NoSuchProgram {
        /// The name asked for.
        name: String,
        /// The programs there are.
        available: String,
    },
    /// The program's type cannot run this way.
    #[error("program `{program}` is a {prog_type} program: {reason}")]
    WrongType {
        /// The program.
        program: String,
        /// Its type.
        prog_type: &'static str,
        /// What to do instead.
        reason: String,
    },
    /// The packet cannot be given to an XDP program.
    #[error(transparent)]
    Packet(#[from] xdp::PacketSizeError),
    /// JIT compilation failed.
    #[error("program `{program}`: {source}")]
    Jit {
        /// The program.
        program: String,
        /// Why.
        source: JitError,
    },
    /// The run itself failed.
    #[error("program `{program}`: {source}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        source: ExecError,
    },
}

/// How an object is loaded.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Gives every program this type instead of the one its section names (the CLI's
    /// `--type`).
    pub prog_type: Option<ProgType>,
    /// The helpers every program may call, instead of the kernel's for its type (e.g. the
    /// conformance suite's, where id 5 is an identity function).
    pub helpers: Option<Helpers>,
    /// The JIT code that statically initialised program arrays (`.values = { ... }`) hold for
    /// JIT callers; interpreted callers run any slot. A JIT caller of the other mode falls
    /// through a slot, as `bpf_tail_call` does for a target it cannot run.
    pub tail_call_jit: TailCallJit,
    /// Parameter counts of tracing targets that are not in this object, by name (a fexit
    /// program finds its target's return value after that many arguments, as in Linux). A
    /// target in the object is looked up in its BTF.
    pub target_params: BTreeMap<String, u32>,
}

/// Which JIT code program array slots get at load time (see [`LoadOptions::tail_call_jit`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TailCallJit {
    /// Checked code: for programs run with [`Engine::Jit`].
    #[default]
    Checked,
    /// Trusted code: for programs run with [`LoadedProgram::run_frame_trusted`]. Compiling it
    /// is harmless; only running trusted code needs the promise of
    /// [`LoadedProgram::jit_trusted`], and checked callers never enter it.
    Trusted,
    /// None: only the interpreter follows the slots.
    Interpreter,
}

/// An engine to run a program on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The reference interpreter (always checked).
    Interpreter,
    /// The JIT, with every memory access checked.
    Jit,
}

/// A map of a loaded object.
#[derive(Clone, Debug)]
pub struct LoadedMap {
    /// Its name in the object (`.bss`, `.rodata`, … for global data).
    pub name: String,
    /// The map.
    pub map: Map,
    /// Where it was defined.
    pub origin: MapOrigin,
}

/// A loaded object: its maps and programs.
///
/// A program that cannot be prepared (a context livebpf does not provide, a helper it does
/// not have, …) does not stop the others from loading, as a libbpf user would disable its
/// autoload: it is listed in [`Loaded::refused`] and picking it by name reports why.
pub struct Loaded {
    maps: Vec<LoadedMap>,
    programs: Vec<LoadedProgram>,
    refused: Vec<(String, RuntimeError)>,
    notes: Vec<String>,
}

/// A program ready to run.
pub struct LoadedProgram {
    inner: Arc<ProgramInner>,
}

struct ProgramInner {
    name: String,
    section: String,
    prog_type: ProgType,
    program: Program,
    helpers: Helpers,
    /// Global data values: accessible in checked mode.
    global_regions: Vec<MemRegion>,
    /// The object's maps, kept alive while code embeds their addresses.
    _maps: Vec<Map>,
    /// The global data maps (their values are `global_regions`).
    global_maps: Vec<Map>,
    /// Their addresses: the maps helpers accept.
    map_addrs: Vec<*const crate::maps::RawMap>,
    /// Tail calls with a constant map and index, for the JITs.
    direct_tail_calls: Vec<DirectTailCall>,
    /// Compiled on first use.
    jit: OnceLock<Prog>,
    jit_trusted: OnceLock<Prog>,
}

// SAFETY: the raw map addresses point at maps that `_maps` keeps alive and are only read;
// everything else in the program is Send and Sync.
unsafe impl Send for ProgramInner {}
// SAFETY: as above.
unsafe impl Sync for ProgramInner {}

/// What an XDP run gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpOutcome {
    /// The verdict (`XDP_PASS` = 2, …): the low 32 bits of r0, as the kernel's test run reports.
    pub retval: u32,
    /// The packet after the run.
    pub packet: Vec<u8>,
}

impl Loaded {
    /// Loads a parsed object: creates its maps and prepares every program (module docs).
    pub fn load(object: &Object, opts: &LoadOptions) -> Result<Loaded, RuntimeError> {
        let maps = create_maps(object)?;
        let handles: Vec<Map> = maps.iter().map(|m| m.map.clone()).collect();
        let mut programs = Vec::with_capacity(object.programs.len());
        let mut refused = Vec::new();
        for spec in &object.programs {
            match prepare(spec, object, &maps, &handles, opts) {
                Ok(p) => programs.push(p),
                Err(e) => refused.push((spec.name.clone(), e)),
            }
        }
        let mut notes = object.notes.clone();
        for (spec, m) in object.maps.iter().zip(&maps) {
            for (slot, name) in &spec.prog_slots {
                let Some(p) = programs.iter().find(|p| p.name() == name) else {
                    notes.push(format!(
                        "program array `{}` slot {slot}: program `{name}` was not loaded, the slot stays empty",
                        spec.name
                    ));
                    continue;
                };
                let target = p.tail_target(opts.tail_call_jit)?;
                m.map
                    .prog_array_set(*slot, target, BPF_ANY)
                    .map_err(|source| RuntimeError::Map {
                        map: spec.name.clone(),
                        source,
                    })?;
            }
        }
        Ok(Loaded {
            maps,
            programs,
            refused,
            notes,
        })
    }

    /// Parses, links and loads an object file.
    pub fn from_file(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Loaded, RuntimeError> {
        let object = Object::from_file(path)?;
        Loaded::load(&object, opts)
    }

    /// The maps, in the object's order.
    pub fn maps(&self) -> &[LoadedMap] {
        &self.maps
    }

    /// The map called `name`.
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.maps.iter().find(|m| m.name == name).map(|m| &m.map)
    }

    /// The programs, in the object's order.
    pub fn programs(&self) -> &[LoadedProgram] {
        &self.programs
    }

    /// The program called `name`; if there is none, or it was refused, an error saying so.
    pub fn program(&self, name: &str) -> Result<&LoadedProgram, RuntimeError> {
        if let Some(p) = self.programs.iter().find(|p| p.name() == name) {
            return Ok(p);
        }
        if let Some((_, e)) = self.refused.iter().find(|(n, _)| n == name) {
            return Err(RuntimeError::Refused {
                program: name.to_string(),
                reason: e.to_string(),
            });
        }
        Err(RuntimeError::NoSuchProgram {
            name: name.to_string(),
            available: self.program_names(),
        })
    }

    /// The programs that could not be prepared, with why.
    pub fn refused(&self) -> &[(String, RuntimeError)] {
        &self.refused
    }

    /// The programs' names, comma-separated (for messages).
    pub fn program_names(&self) -> String {
        let names: Vec<&str> = self
            .programs
            .iter()
            .map(|p| p.name())
            .chain(self.refused.iter().map(|(n, _)| n.as_str()))
            .collect();
        if names.is_empty() {
            "no programs".to_string()
        } else {
            names.join(", ")
        }
    }

    /// What the loader accepted without acting on it (pinning, …).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

/// The kernel's map name for a map of the object: at most 15 bytes of `[A-Za-z0-9_.]`, as
/// libbpf truncates them.
fn kernel_map_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(15)
        .collect()
}

fn create_maps(object: &Object) -> Result<Vec<LoadedMap>, RuntimeError> {
    let mut out = Vec::with_capacity(object.maps.len());
    for spec in &object.maps {
        let fail = |source| RuntimeError::Map {
            map: spec.name.clone(),
            source,
        };
        let map = Map::create(
            &MapSpec::new(
                &kernel_map_name(&spec.name),
                spec.kind,
                spec.key_size,
                spec.value_size,
                spec.max_entries,
            )
            .with_flags(spec.flags),
        )
        .map_err(fail)?;
        if let Some(init) = &spec.initial_value {
            map.update(&0u32.to_le_bytes(), init, BPF_ANY)
                .map_err(fail)?;
        }
        out.push(LoadedMap {
            name: spec.name.clone(),
            map,
            origin: spec.origin,
        });
    }
    Ok(out)
}

/// The address of the single value of a global data map.
fn global_value_addr(map: &Map) -> u64 {
    let _run = ReadGuard::new();
    // SAFETY: the key is 4 readable bytes; array values never move while the map lives, and
    // the program that embeds this address keeps the map alive.
    unsafe { map.lookup_ptr(0u32.to_le_bytes().as_ptr()) as u64 }
}

fn prepare(
    spec: &ProgramSpec,
    object: &Object,
    maps: &[LoadedMap],
    handles: &[Map],
    opts: &LoadOptions,
) -> Result<LoadedProgram, RuntimeError> {
    let prog_type = opts.prog_type.clone().unwrap_or(spec.prog_type.clone());
    let function_of = |slot: usize| {
        spec.functions
            .iter()
            .find(|f| (f.start..f.start + f.len).contains(&slot))
            .map_or_else(|| spec.name.clone(), |f| f.name.clone())
    };
    let at_slot = |slot: usize, reason: String| RuntimeError::Program {
        program: spec.name.clone(),
        function: function_of(slot),
        insn: slot,
        reason,
    };
    let mut raw = spec.insns.clone();
    let mut global_regions = Vec::new();
    for r in &spec.map_refs {
        let (Some(m), Some(spec_map)) = (maps.get(r.map), object.maps.get(r.map)) else {
            return Err(at_slot(r.insn, format!("map index {} out of range", r.map)));
        };
        let addr = match r.kind {
            MapRefKind::Fd => m.map.as_raw() as u64,
            MapRefKind::Value { offset } => {
                if m.map.map_type() != MapType::Array || offset >= spec_map.value_size {
                    return Err(at_slot(
                        r.insn,
                        format!(
                            "a value reference at offset {offset} into map `{}`, which is not a single-value array of more than {offset} bytes",
                            m.name
                        ),
                    ));
                }
                global_value_addr(&m.map) + offset as u64
            }
        };
        set_lddw(&mut raw, r.insn, addr).map_err(|m| at_slot(r.insn, m))?;
    }
    for m in maps.iter().filter(|m| m.origin == MapOrigin::GlobalData) {
        let writable = m.map.spec().flags & crate::maps::BPF_F_RDONLY_PROG == 0;
        global_regions.push(MemRegion::new(
            global_value_addr(&m.map),
            m.map.spec().value_size as u64,
            writable,
        ));
    }
    // Function addresses: a plain lddw of the target's slot (never dereferenced: the rewrite
    // refuses any use but bpf_loop's callback, which it inlines).
    let mut func_slots = BTreeMap::new();
    for f in &spec.func_refs {
        if raw.get(f.insn).map(|i| i.src) != Some(BPF_PSEUDO_FUNC) {
            return Err(at_slot(
                f.insn,
                "function reference is not a pseudo lddw".into(),
            ));
        }
        set_lddw(&mut raw, f.insn, f.target_insn as u64).map_err(|m| at_slot(f.insn, m))?;
        func_slots.insert(f.insn, f.target_insn);
    }
    let bytes: Vec<u8> = raw.iter().flat_map(|i| i.to_bytes()).collect();
    let program = Program::decode(&bytes)
        .map_err(|e| at_slot(e.index, format!("invalid instruction: {e}")))?;
    let mut funcs = BTreeMap::new();
    for (&insn_slot, &target_slot) in &func_slots {
        let (Some(i), Some(t)) = (program.insn_at(insn_slot), program.insn_at(target_slot)) else {
            return Err(at_slot(
                insn_slot,
                "function reference to no instruction".into(),
            ));
        };
        funcs.insert(i, t);
    }
    let err = |i: usize, reason: String| at_slot(program.slot_of(i), reason);
    // Where a fexit/fmod_ret program reads the return value: after the target's arguments.
    let ret_index = prog_type.target().and_then(|t| {
        object
            .program(t)
            .and_then(|p| p.params)
            .or_else(|| opts.target_params.get(t).copied())
    });
    // A replacement sees its target's context (and, here, has its target's helpers).
    let ctx_type = match &prog_type {
        ProgType::Freplace { target } => object
            .program(target)
            .map_or(ProgType::Raw, |t| t.prog_type.clone()),
        t => t.clone(),
    };
    let rewritten = rewrite::rewrite(program.clone(), &ctx_type, ret_index, &funcs, &err)?;
    // Tail calls through a constant program array and index become direct jumps in JIT code,
    // poked when the slot changes (x86-64; elsewhere a hint the code checks and ignores).
    let direct_tail_calls: Vec<DirectTailCall> = rewritten
        .constant_tail_calls
        .iter()
        .filter_map(|&(pc, map, index)| {
            let m = handles.iter().find(|m| m.as_raw() as u64 == map)?;
            let index = u32::try_from(index).ok()?;
            (m.map_type() == MapType::ProgArray).then(|| DirectTailCall {
                pc,
                map: m.clone(),
                index,
            })
        })
        .collect();
    let helpers = opts
        .helpers
        .clone()
        .unwrap_or_else(|| helpers::for_type(&ctx_type));
    for (i, insn) in rewritten.program.insns().iter().enumerate() {
        if let crate::isa::Insn::Call { id } = *insn
            && !helpers.contains(id as u64)
        {
            let slot = rewritten.program.slot_of(i);
            return Err(RuntimeError::UnknownHelper {
                program: spec.name.clone(),
                function: function_of(slot),
                insn: slot,
                helper: helpers::name(id)
                    .map(|n| format!("bpf_{n} ({id})"))
                    .unwrap_or_else(|| id.to_string()),
                prog_type: prog_type.name(),
            });
        }
    }
    Ok(LoadedProgram {
        inner: Arc::new(ProgramInner {
            name: spec.name.clone(),
            section: spec.section.clone(),
            prog_type,
            program: rewritten.program,
            helpers,
            global_regions,
            _maps: handles.to_vec(),
            map_addrs: handles.iter().map(Map::as_raw).collect(),
            global_maps: maps
                .iter()
                .filter(|m| m.origin == MapOrigin::GlobalData)
                .map(|m| m.map.clone())
                .collect(),
            jit: OnceLock::new(),
            jit_trusted: OnceLock::new(),
            direct_tail_calls,
        }),
    })
}

/// Turns the pseudo `lddw` at `slot` into a plain load of `value`.
fn set_lddw(raw: &mut [crate::isa::RawInsn], slot: usize, value: u64) -> Result<(), String> {
    if slot + 1 >= raw.len() || raw[slot].opcode != 0x18 {
        return Err("a map or function reference that is not an lddw".into());
    }
    raw[slot].src = 0;
    raw[slot].imm = value as u32 as i32;
    raw[slot + 1].imm = (value >> 32) as u32 as i32;
    Ok(())
}

impl LoadedProgram {
    /// The program's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its section.
    pub fn section(&self) -> &str {
        &self.inner.section
    }

    /// Its type.
    pub fn prog_type(&self) -> &ProgType {
        &self.inner.prog_type
    }

    /// The instructions as they run: map addresses in place, context loads converted, loops
    /// inlined.
    pub fn program(&self) -> &Program {
        &self.inner.program
    }

    /// The helpers it may call.
    pub fn helpers(&self) -> &Helpers {
        &self.inner.helpers
    }

    /// The checked JIT's code for the program, compiled on first use (and shared: attach
    /// tracers to it with [`crate::attach`]).
    pub fn jit(&self) -> Result<Prog, RuntimeError> {
        self.compiled(&self.inner.jit, JitOptions::checked())
    }

    /// The trusted JIT's code for the program: no memory access is checked.
    ///
    /// # Safety
    /// As for [`JitOptions::trusted`]: every run may only touch memory valid for it — what the
    /// kernel's verifier proves of a program it accepts. livebpf has no verifier: only use this
    /// for programs the kernel accepts (or that are otherwise known to be safe).
    pub unsafe fn jit_trusted(&self) -> Result<Prog, RuntimeError> {
        // SAFETY: forwarded to the caller.
        let opts = unsafe { JitOptions::trusted() };
        self.compiled(&self.inner.jit_trusted, opts)
    }

    /// Checked JIT code for the program that ends a run with [`ExecError::BudgetExhausted`]
    /// after `budget` back edges and calls (a tracer that must not hang its target); compiled
    /// anew on each call.
    pub fn jit_with_budget(&self, budget: Option<u64>) -> Result<Prog, RuntimeError> {
        Prog::load_with_env(
            &self.inner.program,
            &self.inner.helpers,
            JitOptions::checked().with_budget(budget),
            self.env(),
        )
        .map_err(|source| RuntimeError::Jit {
            program: self.inner.name.clone(),
            source,
        })
    }

    /// What the program uses when it runs as a tracer: the object's maps and global data.
    fn env(&self) -> ProgEnv {
        ProgEnv {
            maps: self.inner._maps.clone(),
            global_data: self.inner.global_maps.clone(),
        }
    }

    /// The program as a program array slot's target: its JIT code of `jit`'s mode (where this
    /// host has a JIT) and its instructions for the interpreter.
    pub fn tail_target(&self, jit: TailCallJit) -> Result<TailTarget, RuntimeError> {
        let interpreted = || TailTarget::interpreted(&self.inner.program, &self.inner.helpers);
        if crate::jit::Arch::host().is_none() {
            return Ok(interpreted());
        }
        Ok(match jit {
            TailCallJit::Checked => TailTarget::from(&self.jit()?),
            TailCallJit::Trusted => {
                // SAFETY: only compiled here; running it is what needs the promise, and it runs
                // only from trusted callers, which made it (see `TailCallJit::Trusted`).
                let opts = unsafe { JitOptions::trusted() };
                TailTarget::from(&self.compiled(&self.inner.jit_trusted, opts)?)
            }
            TailCallJit::Interpreter => interpreted(),
        })
    }

    fn compiled(&self, cache: &OnceLock<Prog>, opts: JitOptions) -> Result<Prog, RuntimeError> {
        if let Some(p) = cache.get() {
            return Ok(p.clone());
        }
        // Two threads may compile at once; one result is kept, the other dropped. A failure is
        // not cached: it is reported to each caller.
        let prog = Prog::load_full(
            &self.inner.program,
            &self.inner.helpers,
            opts,
            self.env(),
            &self.inner.direct_tail_calls,
        )
        .map_err(|source| RuntimeError::Jit {
            program: self.inner.name.clone(),
            source,
        })?;
        Ok(cache.get_or_init(|| prog).clone())
    }

    /// Runs an XDP program on `packet` in a fresh frame, as `BPF_PROG_TEST_RUN` does.
    pub fn run_xdp(&self, engine: Engine, packet: &[u8]) -> Result<XdpOutcome, RuntimeError> {
        let frame = XdpFrame::new(packet)?;
        let retval = self.run_frame(engine, &frame)?;
        Ok(XdpOutcome {
            retval,
            packet: frame.packet(),
        })
    }

    /// Runs an XDP program on `frame` (its packet may be changed), returning the verdict.
    pub fn run_frame(&self, engine: Engine, frame: &XdpFrame) -> Result<u32, RuntimeError> {
        self.expect_xdp()?;
        let prog = match engine {
            Engine::Jit => Some(self.jit()?),
            Engine::Interpreter => None,
        };
        // SAFETY: the frame's regions are its own allocations, valid for the run and not
        // referenced by Rust code while it runs; global data values live as long as the maps,
        // which `self` holds.
        unsafe { self.run_on_frame(prog.as_ref(), frame) }
    }

    /// As [`LoadedProgram::run_frame`] on the trusted JIT.
    ///
    /// # Safety
    /// As for [`LoadedProgram::jit_trusted`].
    pub unsafe fn run_frame_trusted(&self, frame: &XdpFrame) -> Result<u32, RuntimeError> {
        self.expect_xdp()?;
        // SAFETY: forwarded to the caller.
        let prog = unsafe { self.jit_trusted()? };
        // SAFETY: as in `run_frame`; the program's own accesses are the caller's promise.
        unsafe { self.run_on_frame(Some(&prog), frame) }
    }

    /// Runs a raw program (r1 = the address of `mem`, or 0 when it is empty, r2 = its
    /// length), as `livebpf run` runs bytecode; returns r0.
    pub fn run_raw(&self, engine: Engine, mem: &mut [u8]) -> Result<u64, RuntimeError> {
        if self.inner.prog_type != ProgType::Raw {
            return Err(RuntimeError::WrongType {
                program: self.inner.name.clone(),
                prog_type: self.inner.prog_type.name(),
                reason: "only raw programs run on plain memory".into(),
            });
        }
        let mut regions = Vec::with_capacity(1 + self.inner.global_regions.len());
        if !mem.is_empty() {
            regions.push(MemRegion::of_slice(mem));
        }
        regions.extend_from_slice(&self.inner.global_regions);
        let args = [
            if mem.is_empty() {
                0
            } else {
                mem.as_mut_ptr() as u64
            },
            mem.len() as u64,
            0,
            0,
            0,
        ];
        let prog = match engine {
            Engine::Jit => Some(self.jit()?),
            Engine::Interpreter => None,
        };
        let mut state = RunState {
            xdp: std::ptr::null_mut(),
        };
        // SAFETY: `mem` is borrowed mutably for the run and not otherwise used; global data
        // values live as long as the maps, which `self` holds, and no Rust reference covers them.
        unsafe { self.run_env(args, &regions, &mut state, prog.as_ref()) }
    }

    fn expect_xdp(&self) -> Result<(), RuntimeError> {
        if self.inner.prog_type != ProgType::Xdp {
            return Err(RuntimeError::WrongType {
                program: self.inner.name.clone(),
                prog_type: self.inner.prog_type.name(),
                reason: "only XDP programs run on packets; give it `--type xdp` to run it as one"
                    .into(),
            });
        }
        Ok(())
    }

    /// # Safety
    /// `frame` is not accessed by Rust code during the run.
    unsafe fn run_on_frame(
        &self,
        prog: Option<&Prog>,
        frame: &XdpFrame,
    ) -> Result<u32, RuntimeError> {
        let [page, ctx] = frame.regions();
        // The packet's page first: JIT code checks the first region inline. Objects have few
        // global data maps: the regions fit on the stack (no allocation per run).
        let globals = &self.inner.global_regions;
        let mut inline = [MemRegion::new(0, 0, false); 8];
        let mut heap = Vec::new();
        let regions: &[MemRegion] = if globals.len() + 2 <= inline.len() {
            inline[0] = page;
            inline[1] = ctx;
            inline[2..2 + globals.len()].copy_from_slice(globals);
            &inline[..2 + globals.len()]
        } else {
            heap.extend([page, ctx]);
            heap.extend_from_slice(globals);
            &heap
        };
        let mut state = RunState {
            xdp: frame.ctx_addr() as *mut XdpContext,
        };
        // SAFETY: forwarded from the caller; `state` outlives the run.
        unsafe { self.run_env([frame.ctx_addr(), 0, 0, 0, 0], regions, &mut state, prog) }
            .map(|r0| r0 as u32)
    }

    /// Runs on `prog` (the interpreter when `None`) with the object's maps and `state`.
    ///
    /// # Safety
    /// `regions` are valid as marked for the run and not referenced by Rust code meanwhile.
    unsafe fn run_env(
        &self,
        args: [u64; 5],
        regions: &[MemRegion],
        state: &mut RunState,
        prog: Option<&Prog>,
    ) -> Result<u64, RuntimeError> {
        let env = RunEnv {
            args,
            regions,
            user: (state as *mut RunState).cast(),
            maps: &self.inner.map_addrs,
        };
        let result = match prog {
            // SAFETY: forwarded from the caller; `user` is the RunState the runtime's context
            // helpers expect, and the maps are the object's, which `self` keeps alive.
            Some(p) => unsafe { p.run_env(&env) },
            None => {
                let interp = crate::interp::Interpreter::new(&self.inner.program)
                    .with_helpers(self.inner.helpers.clone());
                // SAFETY: as above.
                unsafe { interp.run_env(&env) }
            }
        };
        result.map_err(|source| RuntimeError::Exec {
            program: self.inner.name.clone(),
            source,
        })
    }
}

/// What the runtime's context helpers find behind [`RunEnv::user`] in the runs it starts.
pub(crate) struct RunState {
    /// The XDP context of the run (null for other program types).
    pub(crate) xdp: *mut XdpContext,
}

/// The runtime's state of the run `ctx` belongs to, if the runtime started it.
///
/// # Safety
/// `ctx` is the context a helper was called with, in a run whose `user` pointer is null or a
/// live `RunState` (true of every run the runtime starts; other embedders that register the
/// runtime's helpers promise it through the contract of `run_env`).
pub(crate) unsafe fn run_state<'a>(ctx: *mut HelperContext) -> Option<&'a mut RunState> {
    // SAFETY: the caller's contract: a helper's context pointer is valid during the call.
    let user = unsafe { (*ctx).user() } as *mut RunState;
    // SAFETY: the caller's contract on `user`.
    unsafe { user.as_mut() }
}
