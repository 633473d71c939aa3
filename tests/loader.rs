//! The ELF loader on objects that clang compiles from `tests/bpf/*.c`: maps, programs, linking
//! and relocation records with their concrete values, the refusals, and fuzzing (mutated and
//! truncated copies of real objects, and random bytes) that must never panic.
//!
//! The C sources are compiled with `clang-19` (or `clang`) `-O2 -g -target bpf`. Without clang
//! these tests say so loudly and pass, unless `LIVEBPF_REQUIRE_CLANG=1` (which `.ci/run` sets).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use livebpf::isa::{Program, RawInsn};
use livebpf::loader::{
    BPF_F_RDONLY_PROG, BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, DataSymbol,
    FuncRef, LoadError, MapOrigin, MapRef, MapRefKind, MapType, Object, ProgType, ProgramSpec,
};
use proptest::prelude::*;

/// The C sources in tests/bpf, by stem.
const SOURCES: [&str; 12] = [
    "xdp_counter",
    "globals",
    "subprog_loop",
    "tailcall",
    "tracing",
    "legacy_xdp",
    "map_kinds",
    "bad_core",
    "bad_kfunc",
    "bad_extern",
    "bad_map_type",
    "bad_section",
];

fn find_clang() -> Option<&'static str> {
    ["clang-19", "clang"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn compile(clang: &str, src: &Path, out: &Path) -> Vec<u8> {
    let o = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf"])
        // asm/types.h for linux/bpf.h; a missing directory is ignored.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-I/usr/include/aarch64-linux-gnu")
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("{clang} does not start: {e}"));
    assert!(
        o.status.success(),
        "{clang} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).unwrap()
}

/// Every object, compiled once; `None` without clang (after a loud message).
fn objects() -> Option<&'static HashMap<&'static str, Vec<u8>>> {
    static OBJECTS: OnceLock<Option<HashMap<&'static str, Vec<u8>>>> = OnceLock::new();
    OBJECTS
        .get_or_init(|| {
            let Some(clang) = find_clang() else {
                if std::env::var("LIVEBPF_REQUIRE_CLANG").as_deref() == Ok("1") {
                    panic!(
                        "LIVEBPF_REQUIRE_CLANG=1 but neither clang-19 nor clang runs: apt-get install clang-19 libbpf-dev"
                    );
                }
                eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
                eprintln!("!! WARNING: clang-19 / clang not found: the ELF loader tests on compiled  !!");
                eprintln!("!! objects are SKIPPED. Install clang-19 and libbpf-dev to run them.     !!");
                eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
                return None;
            };
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bpf-objects");
            std::fs::create_dir_all(&dir).unwrap();
            let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bpf");
            Some(
                SOURCES
                    .iter()
                    .map(|&name| {
                        let src = src_dir.join(format!("{name}.c"));
                        let out = dir.join(format!("{name}.o"));
                        (name, compile(clang, &src, &out))
                    })
                    .collect(),
            )
        })
        .as_ref()
}

fn bytes(name: &str) -> Option<&'static [u8]> {
    objects().map(|o| o[name].as_slice())
}

fn load(name: &str) -> Option<Object> {
    let bytes = bytes(name)?;
    Some(Object::parse(bytes).unwrap_or_else(|e| panic!("{name}.o: {e}")))
}

fn refusal(name: &str) -> Option<LoadError> {
    match Object::parse(bytes(name)?) {
        Ok(obj) => panic!("{name}.o loaded: {obj:#?}"),
        Err(e) => Some(e),
    }
}

fn prog<'a>(obj: &'a Object, name: &str) -> &'a ProgramSpec {
    obj.program(name)
        .unwrap_or_else(|| panic!("no program {name} in {:?}", names(obj)))
}

fn names(obj: &Object) -> Vec<&str> {
    obj.programs.iter().map(|p| p.name.as_str()).collect()
}

fn u32_at(bytes: &[u8], offset: u64) -> u32 {
    let o = offset as usize;
    u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
}

/// The program with every pseudo `lddw` turned into a plain `lddw` of 0, as the runtime does
/// (with real addresses) before decoding.
fn without_pseudo_loads(p: &ProgramSpec) -> Vec<u8> {
    let mut insns: Vec<RawInsn> = p.insns.clone();
    let slots = p
        .map_refs
        .iter()
        .map(|r| r.insn)
        .chain(p.func_refs.iter().map(|r| r.insn));
    for slot in slots {
        insns[slot].src = 0;
        insns[slot].imm = 0;
        insns[slot + 1].imm = 0;
    }
    insns.iter().flat_map(|i| i.to_bytes()).collect()
}

#[test]
fn xdp_counter_has_one_program_a_hash_map_and_two_map_references() {
    let Some(obj) = load("xdp_counter") else {
        return;
    };
    assert_eq!(obj.license.as_deref(), Some("GPL"));
    assert_eq!(obj.maps.len(), 1, "{:#?}", obj.maps);
    let m = &obj.maps[0];
    assert_eq!(m.name, "counts");
    assert_eq!(m.kind, MapType::Hash);
    assert_eq!(m.kind.kernel_id(), 1);
    assert_eq!((m.key_size, m.value_size, m.max_entries), (4, 8, 256));
    assert_eq!((m.flags, m.pinning), (0, 0));
    assert_eq!(m.origin, MapOrigin::BtfMaps);
    assert_eq!(m.initial_value, None);
    assert!(m.prog_slots.is_empty());

    assert_eq!(names(&obj), ["xdp_count"]);
    let p = &obj.programs[0];
    assert_eq!(p.section, "xdp");
    assert_eq!(p.prog_type, ProgType::Xdp);
    assert_eq!(p.license.as_deref(), Some("GPL"));
    assert_eq!(p.functions.len(), 1);
    assert_eq!(p.functions[0].name, "xdp_count");
    assert_eq!(p.functions[0].len, p.insns.len());
    assert_eq!(
        p.helpers_used,
        [1, 2],
        "bpf_map_lookup_elem, bpf_map_update_elem"
    );
    assert_eq!(p.map_refs.len(), 2);
    for r in &p.map_refs {
        assert_eq!((r.map, r.kind), (0, MapRefKind::Fd));
        assert_eq!(p.insns[r.insn].opcode, 0x18);
        assert_eq!(p.insns[r.insn].src, BPF_PSEUDO_MAP_FD);
        assert_eq!(p.insns[r.insn].imm, 0);
    }
    assert!(p.func_refs.is_empty());
    assert!(obj.notes.is_empty(), "{:?}", obj.notes);
    assert_eq!(p.bytes().len(), 8 * p.insns.len());
}

#[test]
fn globals_become_single_entry_arrays_holding_the_section_bytes() {
    let Some(obj) = load("globals") else {
        return;
    };
    assert_eq!(obj.license.as_deref(), Some("Dual MIT/GPL"));
    let map_names: Vec<&str> = obj.maps.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(map_names, [".rodata", ".data", ".bss", ".rodata.str1.1"]);
    for m in &obj.maps {
        assert_eq!(m.kind, MapType::Array, "{}", m.name);
        assert_eq!((m.key_size, m.max_entries), (4, 1), "{}", m.name);
        assert_eq!(m.origin, MapOrigin::GlobalData);
        let value = m.initial_value.as_ref().unwrap();
        assert_eq!(value.len(), m.value_size as usize, "{}", m.name);
    }

    let rodata = obj.map(".rodata").unwrap();
    assert_eq!(rodata.flags, BPF_F_RDONLY_PROG);
    let fmt = b"threshold %u packets %llu\0";
    assert_eq!(rodata.value_size as usize, 4 + 8 + fmt.len());
    let value = rodata.initial_value.as_ref().unwrap();
    let sym =
        |name: &str| -> &DataSymbol { rodata.symbols.iter().find(|s| s.name == name).unwrap() };
    assert_eq!((sym("threshold").offset, sym("threshold").size), (0, 4));
    assert_eq!(u32_at(value, sym("threshold").offset), 42);
    assert_eq!((sym("banner").offset, sym("banner").size), (4, 8));
    assert_eq!(&value[4..12], b"livebpf\0");
    let fmt_sym = sym("xdp_globals.____fmt");
    assert_eq!((fmt_sym.offset, fmt_sym.size), (12, fmt.len() as u64));
    assert_eq!(&value[12..], fmt);

    let data = obj.map(".data").unwrap();
    assert_eq!((data.flags, data.value_size), (0, 8));
    assert_eq!(data.initial_value.as_deref(), Some(&7u64.to_le_bytes()[..]));
    assert_eq!(data.symbols[0].name, "packets");

    let bss = obj.map(".bss").unwrap();
    assert_eq!((bss.flags, bss.value_size), (0, 16));
    assert_eq!(bss.initial_value.as_deref(), Some(&[0u8; 16][..]));
    assert_eq!(bss.symbols[0].name, "counters");

    let strings = obj.map(".rodata.str1.1").unwrap();
    assert_eq!(strings.flags, BPF_F_RDONLY_PROG);
    assert_eq!(strings.initial_value.as_deref(), Some(&b"literal\n\0"[..]));

    let p = prog(&obj, "xdp_globals");
    assert_eq!(p.helpers_used, [6], "bpf_trace_printk (bpf_printk too)");
    let idx = |name: &str| obj.map_index(name).unwrap();
    let refs: Vec<(usize, MapRefKind)> = p.map_refs.iter().map(|r| (r.map, r.kind)).collect();
    let value_at = |offset| MapRefKind::Value { offset };
    assert_eq!(
        refs,
        [
            (idx(".data"), value_at(0)),
            (idx(".bss"), value_at(0)),
            (idx(".rodata"), value_at(0)),
            (idx(".rodata"), value_at(12)),
            (idx(".rodata.str1.1"), value_at(0)),
        ]
    );
    for r in &p.map_refs {
        let MapRefKind::Value { offset } = r.kind else {
            unreachable!()
        };
        assert_eq!(p.insns[r.insn].src, BPF_PSEUDO_MAP_VALUE);
        assert_eq!(p.insns[r.insn].imm, r.map as i32);
        assert_eq!(p.insns[r.insn + 1].imm, offset as i32);
    }
}

#[test]
fn static_subprogram_and_bpf_loop_callback_are_appended_to_each_program() {
    let Some(obj) = load("subprog_loop") else {
        return;
    };
    assert!(obj.maps.is_empty());
    assert_eq!(names(&obj), ["xdp_loop", "tc_square"]);

    let p = prog(&obj, "xdp_loop");
    assert_eq!(p.prog_type, ProgType::Xdp);
    let spans: Vec<(&str, usize, usize)> = p
        .functions
        .iter()
        .map(|f| (f.name.as_str(), f.start, f.len))
        .collect();
    // add_index is reached first (its address is loaded before the call); twice is reached
    // from square_plus_one, by a call inside .text that has no relocation.
    assert_eq!(
        spans,
        [
            ("xdp_loop", 0, 13),
            ("add_index", 13, 7),
            ("square_plus_one", 20, 4),
            ("twice", 24, 3)
        ]
    );
    assert_eq!(p.insns.len(), 27);
    assert_eq!(p.helpers_used, [181], "bpf_loop");
    assert_eq!(
        p.func_refs,
        [FuncRef {
            insn: 5,
            target_insn: 13
        }]
    );
    assert_eq!(p.insns[5].src, BPF_PSEUDO_FUNC);
    assert_eq!(p.insns[5].imm, 13 - 5 - 1);
    assert_eq!((p.insns[6].opcode, p.insns[6].imm), (0, 0));
    // call square_plus_one: src 1, offset from the next slot.
    assert_eq!((p.insns[10].opcode, p.insns[10].src), (0x85, 1));
    assert_eq!(p.insns[10].imm, 20 - 10 - 1);
    assert_eq!((p.insns[21].opcode, p.insns[21].src), (0x85, 1));
    assert_eq!(p.insns[21].imm, 24 - 21 - 1);
    assert!(p.map_refs.is_empty());

    let t = prog(&obj, "tc_square");
    assert_eq!(
        (t.section.as_str(), &t.prog_type),
        ("tc", &ProgType::SchedCls)
    );
    let spans: Vec<(&str, usize)> = t
        .functions
        .iter()
        .map(|f| (f.name.as_str(), f.start))
        .collect();
    assert_eq!(
        spans,
        [("tc_square", 0), ("square_plus_one", 3), ("twice", 7)]
    );
    assert_eq!(t.insns.len(), 10);
    assert_eq!((t.insns[1].src, t.insns[1].imm), (1, 1));
    assert!(t.helpers_used.is_empty() && t.func_refs.is_empty());
    // Both copies of square_plus_one and twice are the same code.
    assert_eq!(&p.insns[20..27], &t.insns[3..10]);
}

#[test]
fn prog_array_values_initialise_slots_by_program_name() {
    let Some(obj) = load("tailcall") else {
        return;
    };
    assert_eq!(names(&obj), ["tail_pass", "tail_drop", "xdp_entry"]);
    for p in &obj.programs {
        assert_eq!((p.section.as_str(), &p.prog_type), ("xdp", &ProgType::Xdp));
    }
    assert_eq!(obj.maps.len(), 1);
    let m = &obj.maps[0];
    assert_eq!(m.name, "jump_table");
    assert_eq!((m.kind, m.kind.kernel_id()), (MapType::ProgArray, 3));
    assert_eq!((m.key_size, m.value_size, m.max_entries), (4, 4, 4));
    assert_eq!(
        m.prog_slots,
        [(0, "tail_pass".to_string()), (2, "tail_drop".to_string())]
    );
    let entry = prog(&obj, "xdp_entry");
    assert_eq!(entry.helpers_used, [12], "bpf_tail_call");
    assert_eq!(
        entry.map_refs,
        [MapRef {
            insn: 2,
            map: 0,
            kind: MapRefKind::Fd
        }]
    );
    assert_eq!(prog(&obj, "tail_pass").insns.len(), 2);
}

#[test]
fn tracing_sections_name_their_targets() {
    let Some(obj) = load("tracing") else {
        return;
    };
    let types: Vec<(&str, &str, ProgType)> = obj
        .programs
        .iter()
        .map(|p| (p.name.as_str(), p.section.as_str(), p.prog_type.clone()))
        .collect();
    let target = |t: &str| t.to_string();
    assert_eq!(
        types,
        [
            (
                "on_entry",
                "fentry/target_fn",
                ProgType::Fentry {
                    target: target("target_fn")
                }
            ),
            (
                "on_exit",
                "fexit/target_fn",
                ProgType::Fexit {
                    target: target("target_fn")
                }
            ),
            (
                "override_ret",
                "fmod_ret/target_fn",
                ProgType::FmodRet {
                    target: target("target_fn")
                }
            ),
            (
                "replacement",
                "freplace/other_fn",
                ProgType::Freplace {
                    target: target("other_fn")
                }
            ),
        ]
    );
    assert_eq!(obj.programs[0].prog_type.target(), Some("target_fn"));
    let bss = obj.map(".bss").unwrap();
    let syms: Vec<(&str, u64)> = bss
        .symbols
        .iter()
        .map(|s| (s.name.as_str(), s.offset))
        .collect();
    assert_eq!(syms, [("entry_calls", 0), ("last_result", 8)]);
    let bss_index = obj.map_index(".bss").unwrap();
    let entry_refs: Vec<MapRefKind> = prog(&obj, "on_entry")
        .map_refs
        .iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(entry_refs, [MapRefKind::Value { offset: 0 }]);
    let exit = prog(&obj, "on_exit");
    assert_eq!(exit.map_refs.len(), 1);
    assert_eq!(exit.map_refs[0].map, bss_index);
    assert_eq!(exit.map_refs[0].kind, MapRefKind::Value { offset: 8 });
}

#[test]
fn legacy_section_names_and_a_legacy_maps_section() {
    let Some(obj) = load("legacy_xdp") else {
        return;
    };
    let types: Vec<(&str, &str, ProgType)> = obj
        .programs
        .iter()
        .map(|p| (p.name.as_str(), p.section.as_str(), p.prog_type.clone()))
        .collect();
    assert_eq!(
        types,
        [
            ("patch_ports", "xdp_patch_ports", ProgType::Xdp),
            ("sock_filter", "socket", ProgType::SocketFilter),
            ("cls_main", "classifier", ProgType::SchedCls),
            ("raw_prog", "livebpf/custom", ProgType::Raw),
        ]
    );
    let m = obj.map("port_map").unwrap();
    assert_eq!(m.origin, MapOrigin::LegacyMaps);
    assert_eq!(m.kind, MapType::Array);
    assert_eq!(
        (m.key_size, m.value_size, m.max_entries, m.flags),
        (4, 2, 16, 0)
    );
    let p = prog(&obj, "patch_ports");
    assert_eq!(p.helpers_used, [1]);
    let map = obj.map_index("port_map").unwrap();
    assert_eq!(p.map_refs.len(), 1);
    assert_eq!(
        (p.map_refs[0].map, p.map_refs[0].kind),
        (map, MapRefKind::Fd)
    );
}

#[test]
fn every_supported_map_kind_with_pinning_and_flags() {
    let Some(obj) = load("map_kinds") else {
        return;
    };
    let maps: Vec<(&str, MapType, u32, u32, u32, u32, u32)> = obj
        .maps
        .iter()
        .map(|m| {
            let row = (m.key_size, m.value_size, m.max_entries, m.flags, m.pinning);
            (m.name.as_str(), m.kind, row.0, row.1, row.2, row.3, row.4)
        })
        .collect();
    assert_eq!(
        maps,
        [
            ("pinned_array", MapType::Array, 4, 8, 8, 0, 1),
            ("cpu_array", MapType::PercpuArray, 4, 4, 1, 0, 0),
            ("cpu_hash", MapType::PercpuHash, 16, 2, 64, 1, 0),
            ("lru", MapType::LruHash, 8, 16, 1024, 0, 0),
            ("events", MapType::Ringbuf, 0, 0, 4096, 0, 0),
            // clang's merged 16-byte constant (the initialiser of `p`, folded into the code and so
            // not referenced): global data as well.
            (
                ".rodata.cst16",
                MapType::Array,
                4,
                16,
                1,
                BPF_F_RDONLY_PROG,
                0
            ),
        ]
    );
    let numbers: Vec<u32> = obj.maps.iter().map(|m| m.kind.kernel_id()).collect();
    assert_eq!(numbers, [2, 6, 5, 9, 27, 2]);
    assert_eq!(obj.notes.len(), 1, "{:?}", obj.notes);
    assert!(obj.notes[0].contains("pinned_array") && obj.notes[0].contains("pinning = 1"));
    let p = prog(&obj, "use_maps");
    assert_eq!(p.helpers_used, [1, 131, 132]);
    let mut maps_used: Vec<(usize, MapRefKind)> =
        p.map_refs.iter().map(|r| (r.map, r.kind)).collect();
    maps_used.sort_by_key(|&(m, _)| m);
    let fd = MapRefKind::Fd;
    assert_eq!(maps_used, [(0, fd), (1, fd), (2, fd), (3, fd), (4, fd),]);
}

#[test]
fn every_linked_program_decodes_once_its_pseudo_loads_are_rewritten() {
    let Some(objects) = objects() else {
        return;
    };
    let mut checked = 0;
    for (name, bytes) in objects {
        let Ok(obj) = Object::parse(bytes) else {
            assert!(name.starts_with("bad_"), "{name}.o does not load");
            continue;
        };
        for p in &obj.programs {
            // Raw pseudo loads are refused by the decoder, as documented...
            if !p.map_refs.is_empty() || !p.func_refs.is_empty() {
                assert!(Program::decode(&p.bytes()).is_err(), "{name}: {}", p.name);
            }
            // ...and once rewritten, the calls and jumps of the linked program are valid.
            let program = Program::decode(&without_pseudo_loads(p))
                .unwrap_or_else(|e| panic!("{name}.o, {}: {e}", p.name));
            assert_eq!(program.slot_count(), p.insns.len());
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn co_re_relocations_are_refused_naming_section_function_and_type() {
    let Some(e) = refusal("bad_core") else {
        return;
    };
    let LoadError::CoreRelocation {
        section,
        symbol,
        type_name,
        kind,
        ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!(
        (section.as_str(), symbol.as_str(), type_name.as_str(), *kind),
        (
            "fentry/do_exit",
            "read_tgid",
            "task_struct",
            "field byte offset"
        )
    );
    assert!(e.to_string().contains("CO-RE"), "{e}");
}

#[test]
fn kfunc_calls_are_refused() {
    let Some(e) = refusal("bad_kfunc") else {
        return;
    };
    match &e {
        LoadError::Kfunc {
            section,
            symbol,
            insn,
            name,
        } => assert_eq!(
            (section.as_str(), symbol.as_str(), *insn, name.as_str()),
            ("xdp", "uses_kfunc", 0, "bpf_rcu_read_lock")
        ),
        e => panic!("{e:?}"),
    }
    // A call with src_reg 2 (BPF_PSEUDO_KFUNC_CALL), made by patching `call 1` of xdp_counter.
    let mut patched = bytes("xdp_counter").unwrap().to_vec();
    let call1 = [0x85, 0, 0, 0, 1, 0, 0, 0];
    let at = patched.windows(8).position(|w| w == call1).unwrap();
    patched[at + 1] = 0x20;
    match Object::parse(&patched) {
        Err(LoadError::Kfunc { symbol, name, .. }) => {
            assert_eq!((symbol.as_str(), name.as_str()), ("xdp_count", "BTF id 1"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn extern_symbols_are_refused() {
    let Some(e) = refusal("bad_extern") else {
        return;
    };
    match &e {
        LoadError::Extern {
            section,
            symbol,
            insn,
            name,
        } => assert_eq!(
            (section.as_str(), symbol.as_str(), *insn, name.as_str()),
            ("xdp", "uses_extern", 0, "LINUX_KERNEL_VERSION")
        ),
        e => panic!("{e:?}"),
    }
}

#[test]
fn unknown_map_types_are_refused_naming_the_map() {
    let Some(e) = refusal("bad_map_type") else {
        return;
    };
    match &e {
        LoadError::UnknownMapType { map, map_type } => {
            assert_eq!((map.as_str(), *map_type), ("stacks", 7))
        }
        e => panic!("{e:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("stacks") && msg.contains("stack_trace"),
        "{msg}"
    );
}

#[test]
fn relocations_to_unknown_sections_are_refused() {
    let Some(e) = refusal("bad_section") else {
        return;
    };
    match &e {
        LoadError::UnknownSection {
            section,
            symbol,
            insn,
            target,
            target_section,
        } => assert_eq!(
            (
                section.as_str(),
                symbol.as_str(),
                *insn,
                target.as_str(),
                target_section.as_str()
            ),
            ("xdp", "uses_odd", 0, "odd_value", ".odd_section")
        ),
        e => panic!("{e:?}"),
    }
}

#[test]
fn section_names_give_program_types() {
    let t = |s: &str| ProgType::from_section(s).unwrap();
    let target = |s: &str| s.to_string();
    assert_eq!(t("xdp"), ProgType::Xdp);
    assert_eq!(t("xdp.frags"), ProgType::Xdp);
    assert_eq!(t("xdp/devmap"), ProgType::Xdp);
    assert_eq!(t("xdp_patch_ports"), ProgType::Xdp);
    assert_eq!(t("socket"), ProgType::SocketFilter);
    assert_eq!(t("socket/1"), ProgType::SocketFilter);
    assert_eq!(t("tc"), ProgType::SchedCls);
    assert_eq!(t("tc/ingress"), ProgType::SchedCls);
    assert_eq!(t("tcx/egress"), ProgType::SchedCls);
    assert_eq!(t("classifier"), ProgType::SchedCls);
    assert_eq!(
        t("fentry/f"),
        ProgType::Fentry {
            target: target("f")
        }
    );
    assert_eq!(
        t("fentry.s/f"),
        ProgType::Fentry {
            target: target("f")
        }
    );
    assert_eq!(
        t("fexit/g"),
        ProgType::Fexit {
            target: target("g")
        }
    );
    assert_eq!(
        t("fmod_ret/h"),
        ProgType::FmodRet {
            target: target("h")
        }
    );
    assert_eq!(
        t("freplace/i"),
        ProgType::Freplace {
            target: target("i")
        }
    );
    assert_eq!(t("kprobe/sys_open"), ProgType::Raw);
    assert_eq!(t("my_section"), ProgType::Raw);
    assert_eq!(t("tcp"), ProgType::Raw);
    assert_eq!(t("sockops"), ProgType::Raw);
    for s in ["fentry", "fexit/", "fmod_ret", "freplace/"] {
        assert!(
            matches!(ProgType::from_section(s), Err(LoadError::BadSection { .. })),
            "{s}"
        );
    }
}

#[test]
fn not_an_object_is_a_typed_error() {
    for bytes in [&b""[..], b"\x7fEL", b"!<arch>\n", &[0u8; 64]] {
        assert!(
            matches!(Object::parse(bytes), Err(LoadError::NotBpf(_))),
            "{bytes:?}"
        );
    }
    let e = Object::from_file("/nonexistent/x.o").unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/x.o"), "{e}");
}

#[test]
fn every_truncation_of_a_real_object_is_an_error_not_a_panic() {
    let Some(objects) = objects() else {
        return;
    };
    for name in ["tailcall", "subprog_loop"] {
        let bytes = &objects[name];
        for len in 0..bytes.len() {
            let _ = Object::parse(&bytes[..len]);
        }
    }
}

/// Bytes of the real objects the mutation fuzzer starts from.
fn seeds() -> Vec<&'static [u8]> {
    match objects() {
        Some(o) => [
            "tailcall",
            "globals",
            "subprog_loop",
            "map_kinds",
            "legacy_xdp",
        ]
        .iter()
        .map(|n| o[n].as_slice())
        .collect(),
        None => Vec::new(),
    }
}

/// One mutation: where (a fraction of the file, or the header), and what.
#[derive(Clone, Debug)]
enum Mutation {
    /// Set the byte at this fraction of the file.
    Set(f64, u8),
    /// Add a small delta to the little-endian u32 at this fraction (sizes, offsets, counts).
    Nudge(f64, i8),
    /// Set a byte of the ELF header.
    Header(usize, u8),
    /// Cut the file at this fraction.
    Truncate(f64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0f64, any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        4 => (0.0..1.0f64, any::<i8>()).prop_map(|(at, d)| Mutation::Nudge(at, d)),
        1 => (0..64usize, any::<u8>()).prop_map(|(at, b)| Mutation::Header(at, b)),
        1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    match *m {
        Mutation::Set(f, b) if !bytes.is_empty() => {
            let i = at(f, bytes.len());
            bytes[i] = b;
        }
        Mutation::Nudge(f, d) if bytes.len() >= 4 => {
            let i = at(f, bytes.len() - 3) & !3;
            let v = u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
            bytes[i..i + 4].copy_from_slice(&v.wrapping_add(d as i32 as u32).to_le_bytes());
        }
        Mutation::Header(i, b) if i < bytes.len() => bytes[i] = b,
        Mutation::Truncate(f) => bytes.truncate(at(f, bytes.len())),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2500, ..ProptestConfig::default() })]

    /// Mutated copies of real objects: parsed to an object or refused, never a panic.
    #[test]
    fn mutated_objects_never_panic(
        seed in 0..5usize,
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        if !seeds.is_empty() {
            let mut bytes = seeds[seed % seeds.len()].to_vec();
            for m in &mutations {
                apply(&mut bytes, m);
            }
            if let Ok(obj) = Object::parse(&bytes) {
                // Whatever loads is consistent: every reference is in range.
                for p in &obj.programs {
                    for r in &p.map_refs {
                        prop_assert!(r.map < obj.maps.len() && r.insn + 1 < p.insns.len());
                    }
                    for r in &p.func_refs {
                        prop_assert!(r.target_insn < p.insns.len() && r.insn + 1 < p.insns.len());
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Random bytes, and random bytes behind a valid eBPF ELF header.
    #[test]
    fn random_bytes_never_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        keep_header in any::<bool>(),
    ) {
        if keep_header && bytes.len() >= 64 {
            let header = seeds().first().map(|s| s[..64].to_vec());
            if let Some(header) = header {
                bytes[..64].copy_from_slice(&header);
            }
        }
        let _ = Object::parse(&bytes);
    }
}
