//! The ELF loader's front half: parses an object that `clang -O2 -g -target bpf` produced for
//! libbpf and links it into a runtime-independent description — [`Object`], with its maps
//! ([`MapSpec`]) and programs ([`ProgramSpec`]). It creates no map and runs nothing: the runtime
//! layer does that from the description.
//!
//! # What is understood
//!
//! * Maps: BTF-defined maps in `.maps` (`__uint(type, ...)`, `__type(key, ...)`, `key_size`,
//!   `value_size`, `max_entries`, `map_flags`, `pinning`, and `.values = {...}` initialisation of
//!   a prog_array's slots), legacy `struct bpf_map_def` maps in a `maps` section, and global
//!   data: every non-empty `.data*`, `.rodata*` and `.bss*` section becomes a single-entry array
//!   map named after the section, as libbpf names it (`.rodata`, `.data`, `.bss`,
//!   `.rodata.str1.1`), whose one value starts as the section's bytes (zeros for `.bss`).
//! * Programs: every global function in an executable section other than `.text`; its type
//!   comes from the section name ([`ProgType`]). Functions in `.text` are subprograms.
//! * Linking, as libbpf does it: each program gets its own copy of the subprograms it calls
//!   (directly or through a `bpf_loop`-style callback pointer), appended after its own code in
//!   the order first reached, with every BPF-to-BPF call offset fixed.
//!
//! # The linked instructions
//!
//! [`ProgramSpec::insns`] are raw wire slots ([`RawInsn`]). Each `lddw` that refers to a map
//! stays a *pseudo load*, as the kernel receives it from libbpf, with `src` = 1
//! (`BPF_PSEUDO_MAP_FD`, imm = the map's index in [`Object::maps`] where libbpf would put an fd)
//! or `src` = 2 (`BPF_PSEUDO_MAP_VALUE`, imm = the map index, second slot's imm = the offset into
//! the value), and a [`MapRef`] records it. Each function address (`src` = 4,
//! `BPF_PSEUDO_FUNC`) has its imm set like a local call's (target slot − this slot − 1), and a
//! [`FuncRef`] records it. `isa::Program::decode` refuses pseudo loads, so the runtime layer
//! rewrites each one (to a plain `lddw` of the map's or value's address, say) before decoding.
//! Helper calls stay `call imm` and are listed in [`ProgramSpec::helpers_used`].
//!
//! # What is refused
//!
//! With a [`LoadError`] that names the section, the function and the instruction (its slot
//! number within the section, as `llvm-objdump -d` numbers it): CO-RE relocations (other than
//! local type ids), kfunc calls, extern symbols, map types outside [`MapType`], and relocations
//! against sections that are neither code, maps nor global data. A malformed object is an
//! error, never a panic.

mod btf;
mod elf;
mod link;
mod maps;

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::isa::RawInsn;

/// `BPF_F_RDONLY_PROG`: programs may not write the map (set on `.rodata*` maps).
pub const BPF_F_RDONLY_PROG: u32 = 1 << 7;
/// `BPF_PSEUDO_MAP_FD`: the `src` of an `lddw` of a map.
pub const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `BPF_PSEUDO_MAP_VALUE`: the `src` of an `lddw` of an address inside a map's value.
pub const BPF_PSEUDO_MAP_VALUE: u8 = 2;
/// `BPF_PSEUDO_FUNC`: the `src` of an `lddw` of a function's address.
pub const BPF_PSEUDO_FUNC: u8 = 4;
/// Largest global data section accepted (16 MiB; the kernel's limit for an array value is
/// lower still).
pub const MAX_GLOBAL_DATA: u64 = 1 << 24;

/// A parsed and linked object file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// The `license` section's string, if the object has one.
    pub license: Option<String>,
    /// Maps, in order: BTF-defined maps by position in `.maps`, legacy maps by position in
    /// `maps`, then global data maps by section order. [`MapRef::map`] indexes this.
    pub maps: Vec<MapSpec>,
    /// Programs, by section order and then position in the section.
    pub programs: Vec<ProgramSpec>,
    /// Things accepted but not acted on (pinning, relocations in global data), one sentence each.
    pub notes: Vec<String>,
}

/// A map's type: the runtime's own (numbered as in `linux/bpf.h`), re-exported for loader users.
pub use crate::maps::MapType;

/// Where a map's definition came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOrigin {
    /// A BTF-defined map in `.maps`.
    BtfMaps,
    /// A `struct bpf_map_def` in the legacy `maps` section.
    LegacyMaps,
    /// A global data section (`.data*`, `.rodata*`, `.bss*`).
    GlobalData,
}

/// A variable in a global data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSymbol {
    /// The symbol's name (`name` for a global, `func.name` for a function's static).
    pub name: String,
    /// Byte offset in the map's value.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A map, as the object defines it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The map's name: the variable's for `.maps` and `maps`, the section's for global data.
    pub name: String,
    /// Its type.
    pub kind: MapType,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Most entries.
    pub max_entries: u32,
    /// `map_flags` (`BPF_F_*`).
    pub flags: u32,
    /// libbpf's `pinning` (0 none, 1 `LIBBPF_PIN_BY_NAME`): recorded, with a note, not honoured.
    pub pinning: u32,
    /// Where it was defined.
    pub origin: MapOrigin,
    /// For global data maps, the single value's initial bytes (`value_size` of them: the
    /// section's contents, or zeros for `.bss`); `None` for other maps.
    pub initial_value: Option<Vec<u8>>,
    /// For global data maps, the variables in the value, by offset.
    pub symbols: Vec<DataSymbol>,
    /// For a prog_array initialised with `.values = {...}`: (slot index, program name), by slot.
    pub prog_slots: Vec<(u32, String)>,
}

/// The program types the loader tells apart, from libbpf `SEC()` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgType {
    /// `xdp` and every section whose name starts with `xdp` (`xdp.frags`, `xdp/devmap`, legacy
    /// names such as `xdp_patch_ports`).
    Xdp,
    /// `socket` (or `socket/...`).
    SocketFilter,
    /// `tc`, `tc/...`, `tcx/...`, `classifier`, `classifier/...`.
    SchedCls,
    /// `fentry/TARGET` (or `fentry.s/TARGET`).
    Fentry {
        /// The traced function.
        target: String,
    },
    /// `fexit/TARGET` (or `fexit.s/TARGET`).
    Fexit {
        /// The traced function.
        target: String,
    },
    /// `fmod_ret/TARGET` (or `fmod_ret.s/TARGET`).
    FmodRet {
        /// The function whose return value is overridden.
        target: String,
    },
    /// `freplace/TARGET`.
    Freplace {
        /// The function replaced.
        target: String,
    },
    /// Any other section: a raw program, to be run as it is.
    Raw,
}

impl ProgType {
    /// The type named by a libbpf section name. Tracing sections must name their target.
    pub fn from_section(section: &str) -> Result<ProgType, LoadError> {
        let sub = |prefix: &str| section == prefix || section.starts_with(&format!("{prefix}/"));
        if section.starts_with("xdp") {
            return Ok(ProgType::Xdp);
        }
        if sub("socket") {
            return Ok(ProgType::SocketFilter);
        }
        if sub("tc") || section.starts_with("tcx/") || sub("classifier") {
            return Ok(ProgType::SchedCls);
        }
        type Make = fn(String) -> ProgType;
        let tracing: [(&str, Make); 7] = [
            ("fentry", |target| ProgType::Fentry { target }),
            ("fentry.s", |target| ProgType::Fentry { target }),
            ("fexit", |target| ProgType::Fexit { target }),
            ("fexit.s", |target| ProgType::Fexit { target }),
            ("fmod_ret", |target| ProgType::FmodRet { target }),
            ("fmod_ret.s", |target| ProgType::FmodRet { target }),
            ("freplace", |target| ProgType::Freplace { target }),
        ];
        for (prefix, make) in tracing {
            if section == prefix || section == format!("{prefix}/") {
                return Err(LoadError::BadSection {
                    section: section.to_string(),
                    reason: format!("a `{prefix}` program must name its target: `{prefix}/NAME`"),
                });
            }
            if let Some(target) = section.strip_prefix(&format!("{prefix}/")) {
                return Ok(make(target.to_string()));
            }
        }
        Ok(ProgType::Raw)
    }

    /// The type's short name: `xdp`, `socket_filter`, `sched_cls`, `fentry`, `fexit`,
    /// `fmod_ret`, `freplace` or `raw`.
    pub fn name(&self) -> &'static str {
        match self {
            ProgType::Xdp => "xdp",
            ProgType::SocketFilter => "socket_filter",
            ProgType::SchedCls => "sched_cls",
            ProgType::Fentry { .. } => "fentry",
            ProgType::Fexit { .. } => "fexit",
            ProgType::FmodRet { .. } => "fmod_ret",
            ProgType::Freplace { .. } => "freplace",
            ProgType::Raw => "raw",
        }
    }

    /// The function a tracing program attaches to.
    pub fn target(&self) -> Option<&str> {
        match self {
            ProgType::Fentry { target }
            | ProgType::Fexit { target }
            | ProgType::FmodRet { target }
            | ProgType::Freplace { target } => Some(target),
            _ => None,
        }
    }
}

/// What an `lddw` of a map loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapRefKind {
    /// The map itself (`BPF_PSEUDO_MAP_FD`), for map helpers.
    Fd,
    /// The address `offset` bytes into the map's (single) value (`BPF_PSEUDO_MAP_VALUE`): a
    /// global variable.
    Value {
        /// Byte offset into the value.
        offset: u32,
    },
}

/// A pseudo `lddw` of a map in a linked program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRef {
    /// Slot of the `lddw` in [`ProgramSpec::insns`].
    pub insn: usize,
    /// Index of the map in [`Object::maps`].
    pub map: usize,
    /// What is loaded.
    pub kind: MapRefKind,
}

/// A `BPF_PSEUDO_FUNC` `lddw` (a callback's address, as for `bpf_loop`) in a linked program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuncRef {
    /// Slot of the `lddw` in [`ProgramSpec::insns`].
    pub insn: usize,
    /// Slot where the function starts in [`ProgramSpec::insns`].
    pub target_insn: usize,
}

/// A function placed in a linked program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSpan {
    /// The function's symbol name.
    pub name: String,
    /// Its first slot in [`ProgramSpec::insns`].
    pub start: usize,
    /// Its length in slots.
    pub len: usize,
}

/// A linked program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramSpec {
    /// The function's name.
    pub name: String,
    /// The ELF section it is in (its libbpf `SEC()` name).
    pub section: String,
    /// Its type, from the section name.
    pub prog_type: ProgType,
    /// The object's license.
    pub license: Option<String>,
    /// The linked instructions, as raw slots: the program, then its subprograms. Map and
    /// function references are pseudo `lddw`s; see the [module docs](self).
    pub insns: Vec<RawInsn>,
    /// Every map `lddw`, by slot.
    pub map_refs: Vec<MapRef>,
    /// Every function-address `lddw`, by slot.
    pub func_refs: Vec<FuncRef>,
    /// The helper ids called (`call imm` with `src` 0), ascending, each once.
    pub helpers_used: Vec<u32>,
    /// The functions in `insns`: the program first at slot 0, then each subprogram.
    pub functions: Vec<FunctionSpan>,
}

impl ProgramSpec {
    /// The instructions as wire bytes, 8 per slot.
    pub fn bytes(&self) -> Vec<u8> {
        self.insns.iter().flat_map(|i| i.to_bytes()).collect()
    }
}

/// Why an object was not loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a 64-bit little-endian `EM_BPF` relocatable ELF object.
    #[error("not an eBPF object file: {0}")]
    NotBpf(String),
    /// The ELF, BTF or layout is broken.
    #[error("malformed object: {0}")]
    Malformed(String),
    /// A CO-RE relocation, which needs the kernel's BTF.
    #[error(
        "section `{section}`, function `{symbol}`, instruction {insn}: CO-RE relocation ({kind}) against type `{type_name}`; livebpf has no kernel BTF to relocate against"
    )]
    CoreRelocation {
        /// The section.
        section: String,
        /// The function the instruction is in.
        symbol: String,
        /// The instruction's slot in the section.
        insn: usize,
        /// The BTF type's name.
        type_name: String,
        /// The relocation kind, in words.
        kind: &'static str,
    },
    /// A call of a kernel function.
    #[error(
        "section `{section}`, function `{symbol}`, instruction {insn}: call of kfunc `{name}`; livebpf calls no kernel functions"
    )]
    Kfunc {
        /// The section.
        section: String,
        /// The function the call is in.
        symbol: String,
        /// The call's slot in the section.
        insn: usize,
        /// The kfunc's name (or its BTF id, when only that is known).
        name: String,
    },
    /// A reference to a symbol the object does not define.
    #[error(
        "section `{section}`, function `{symbol}`, instruction {insn}: reference to extern symbol `{name}`, which libbpf resolves from the kernel; livebpf has no externs"
    )]
    Extern {
        /// The section.
        section: String,
        /// The function the instruction is in.
        symbol: String,
        /// The instruction's slot in the section.
        insn: usize,
        /// The extern's name.
        name: String,
    },
    /// A map type outside [`MapType`].
    #[error(
        "map `{map}` has type {map_type} ({}), which livebpf does not support; supported: hash, array, prog_array, percpu_hash, percpu_array, lru_hash, ringbuf",
        map_type_name(*.map_type)
    )]
    UnknownMapType {
        /// The map.
        map: String,
        /// Its `BPF_MAP_TYPE_*` number.
        map_type: u32,
    },
    /// A relocation against a symbol in a section that is not code, maps or global data.
    #[error(
        "section `{section}`, function `{symbol}`, instruction {insn}: relocation against `{target}` in section `{target_section}`, which is neither code, maps nor global data (.data*, .rodata*, .bss*)"
    )]
    UnknownSection {
        /// The section of the instruction.
        section: String,
        /// The function the instruction is in.
        symbol: String,
        /// The instruction's slot in the section.
        insn: usize,
        /// The relocation's symbol.
        target: String,
        /// The section the symbol is in.
        target_section: String,
    },
    /// A relocation that does not fit its instruction or target.
    #[error("section `{section}`, function `{symbol}`, instruction {insn}: {reason}")]
    BadRelocation {
        /// The section.
        section: String,
        /// The function the instruction is in.
        symbol: String,
        /// The instruction's slot in the section.
        insn: usize,
        /// What is wrong.
        reason: String,
    },
    /// An instruction the linker cannot place (a truncated `lddw`, a call to no function).
    #[error("section `{section}`, function `{symbol}`, instruction {insn}: {reason}")]
    BadInstruction {
        /// The section.
        section: String,
        /// The function the instruction is in.
        symbol: String,
        /// The instruction's slot in the section.
        insn: usize,
        /// What is wrong.
        reason: String,
    },
    /// A map definition that cannot be read.
    #[error("map `{map}`: {reason}")]
    BadMap {
        /// The map.
        map: String,
        /// What is wrong.
        reason: String,
    },
    /// A program section that cannot be loaded.
    #[error("section `{section}`: {reason}")]
    BadSection {
        /// The section.
        section: String,
        /// What is wrong.
        reason: String,
    },
}

/// The `linux/bpf.h` name of a map type number, for messages.
fn map_type_name(map_type: u32) -> &'static str {
    const NAMES: [&str; 34] = [
        "unspec",
        "hash",
        "array",
        "prog_array",
        "perf_event_array",
        "percpu_hash",
        "percpu_array",
        "stack_trace",
        "cgroup_array",
        "lru_hash",
        "lru_percpu_hash",
        "lpm_trie",
        "array_of_maps",
        "hash_of_maps",
        "devmap",
        "sockmap",
        "cpumap",
        "xskmap",
        "sockhash",
        "cgroup_storage",
        "reuseport_sockarray",
        "percpu_cgroup_storage",
        "queue",
        "stack",
        "sk_storage",
        "devmap_hash",
        "struct_ops",
        "ringbuf",
        "inode_storage",
        "task_storage",
        "bloom_filter",
        "user_ringbuf",
        "cgrp_storage",
        "arena",
    ];
    NAMES.get(map_type as usize).copied().unwrap_or("unknown")
}

impl Object {
    /// Parses and links an object file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Object, LoadError> {
        Object::parse_inner(bytes, None)
    }

    /// As [`Object::parse`], and the global function `name` in `.text` is a program too (of
    /// type [`ProgType::Raw`]), not only a subprogram: for objects written by tools that put
    /// a whole program in `.text`, as the bpf_conformance runner's `--elf` mode does with
    /// `main`.
    pub fn parse_with_text_program(bytes: &[u8], name: &str) -> Result<Object, LoadError> {
        Object::parse_inner(bytes, Some(name))
    }

    fn parse_inner(bytes: &[u8], text_program: Option<&str>) -> Result<Object, LoadError> {
        let elf = elf::Elf::parse(bytes)?;
        let btf = match elf.section_index(".BTF") {
            Some(i) => Some(btf::Btf::parse(elf.sections[i].data)?),
            None => None,
        };
        let funcs = link::Functions::collect(&elf, text_program)?;
        if let Some(i) = elf.section_index(".BTF.ext") {
            let btf = btf
                .as_ref()
                .ok_or_else(|| LoadError::Malformed(".BTF.ext without .BTF".to_string()))?;
            let relos = btf::core_relos(elf.sections[i].data, btf)?;
            link::refuse_core(&elf, &funcs, btf, &relos)?;
        }
        let mut notes = Vec::new();
        let table = maps::collect(&elf, btf.as_ref(), &funcs, &mut notes)?;
        let license = elf.section_index("license").map(|i| {
            let data = elf.sections[i].data;
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            String::from_utf8_lossy(&data[..end]).into_owned()
        });
        let programs = link::link_all(&elf, &funcs, &table, &license)?;
        Ok(Object {
            license,
            maps: table.specs,
            programs,
            notes,
        })
    }

    /// Reads and parses an object file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Object, LoadError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Object::parse(&bytes)
    }

    /// The program called `name`.
    pub fn program(&self, name: &str) -> Option<&ProgramSpec> {
        self.programs.iter().find(|p| p.name == name)
    }

    /// The index in [`Object::maps`] of the map called `name`.
    pub fn map_index(&self, name: &str) -> Option<usize> {
        self.maps.iter().position(|m| m.name == name)
    }

    /// The map called `name`.
    pub fn map(&self, name: &str) -> Option<&MapSpec> {
        self.map_index(name).map(|i| &self.maps[i])
    }
}
