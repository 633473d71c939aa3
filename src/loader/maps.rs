//! Map descriptions: BTF-defined maps in `.maps` (with prog_array `.values` initialisation),
//! legacy `struct bpf_map_def` maps in `maps`, and global data sections as single-entry arrays.

use std::collections::HashMap;

use object::elf as E;

use super::btf::{self, Btf};
use super::elf::{Elf, Section, SymPlace};
use super::link::Functions;
use super::{
    BPF_F_RDONLY_PROG, DataSymbol, LoadError, MAX_GLOBAL_DATA, MapOrigin, MapSpec, MapType,
};

/// `R_BPF_64_ABS64`, the relocation of a 64-bit address in data (not in `object`'s list).
const R_BPF_64_ABS64: u32 = 2;

/// The maps, and how relocations find them.
pub(super) struct Table {
    pub specs: Vec<MapSpec>,
    /// (section, byte offset of the definition) to map index, for `.maps` and `maps`.
    pub defs: HashMap<(usize, u64), usize>,
    /// Global data section to map index.
    pub data: HashMap<usize, usize>,
}

/// The kinds of global data section.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DataKind {
    Data,
    Rodata,
    Bss,
}

fn dotted(name: &str, base: &str) -> bool {
    name == base
        || name
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The global data kind of a section, as libbpf classifies them by name.
pub(super) fn data_kind(sec: &Section<'_>) -> Option<DataKind> {
    if sec.is_exec() || !matches!(sec.sh_type, E::SHT_PROGBITS | E::SHT_NOBITS) {
        return None;
    }
    if dotted(&sec.name, ".data") {
        Some(DataKind::Data)
    } else if dotted(&sec.name, ".rodata") {
        Some(DataKind::Rodata)
    } else if dotted(&sec.name, ".bss") {
        Some(DataKind::Bss)
    } else {
        None
    }
}

fn bad_map(map: &str, reason: impl Into<String>) -> LoadError {
    LoadError::BadMap {
        map: map.to_string(),
        reason: reason.into(),
    }
}

fn kind_of(map: &str, map_type: u32) -> Result<MapType, LoadError> {
    MapType::from_kernel(map_type).ok_or_else(|| LoadError::UnknownMapType {
        map: map.to_string(),
        map_type,
    })
}

fn pinning_note(notes: &mut Vec<String>, map: &str, pinning: u32) {
    if pinning != 0 {
        let how = if pinning == 1 { " (by name)" } else { "" };
        notes.push(format!(
            "map `{map}`: pinning = {pinning}{how} is recorded, not honoured: livebpf's maps are not in a BPF filesystem"
        ));
    }
}

pub(super) fn collect(
    elf: &Elf<'_>,
    btf: Option<&Btf<'_>>,
    funcs: &Functions,
    notes: &mut Vec<String>,
) -> Result<Table, LoadError> {
    let mut table = Table {
        specs: Vec::new(),
        defs: HashMap::new(),
        data: HashMap::new(),
    };
    if let Some(sec) = elf.section_index(".maps") {
        let btf = btf.ok_or_else(|| {
            LoadError::Malformed("a .maps section but no .BTF to describe it".to_string())
        })?;
        btf_maps(elf, btf, sec, funcs, notes, &mut table)?;
    }
    if let Some(sec) = elf.section_index("maps") {
        legacy_maps(elf, sec, notes, &mut table)?;
    }
    for (index, sec) in elf.sections.iter().enumerate() {
        let Some(kind) = data_kind(sec) else { continue };
        if sec.size == 0 {
            continue;
        }
        if sec.size > MAX_GLOBAL_DATA {
            return Err(bad_map(
                &sec.name,
                format!(
                    "{} bytes of global data; the limit is {MAX_GLOBAL_DATA}",
                    sec.size
                ),
            ));
        }
        let value = if sec.sh_type == E::SHT_NOBITS {
            vec![0; sec.size as usize]
        } else {
            sec.data.to_vec()
        };
        let mut symbols: Vec<DataSymbol> = elf
            .symbols
            .iter()
            .filter(|s| s.place == SymPlace::Section(index) && s.st_type == E::STT_OBJECT)
            .map(|s| DataSymbol {
                name: s.name.clone(),
                offset: s.value,
                size: s.size,
            })
            .collect();
        symbols.sort_by(|a, b| (a.offset, &a.name).cmp(&(b.offset, &b.name)));
        table.data.insert(index, table.specs.len());
        table.specs.push(MapSpec {
            name: sec.name.clone(),
            kind: MapType::Array,
            key_size: 4,
            value_size: sec.size as u32,
            max_entries: 1,
            flags: if kind == DataKind::Rodata {
                BPF_F_RDONLY_PROG
            } else {
                0
            },
            pinning: 0,
            origin: MapOrigin::GlobalData,
            initial_value: Some(value),
            symbols,
            prog_slots: Vec::new(),
        });
    }
    for &target in &elf.unread_relocs {
        let sec = &elf.sections[target];
        if data_kind(sec).is_some() {
            notes.push(format!(
                "relocations in `{}` are not applied: a pointer initialised in global data holds its offset, not an address",
                sec.name
            ));
        }
    }
    Ok(table)
}

/// Where a BTF map's definition sits in `.maps`, and its `values` array if it has one.
struct BtfDef {
    offset: u64,
    size: u64,
    values_offset: Option<u64>,
}

fn btf_maps(
    elf: &Elf<'_>,
    btf: &Btf<'_>,
    sec: usize,
    funcs: &Functions,
    notes: &mut Vec<String>,
    table: &mut Table,
) -> Result<(), LoadError> {
    let ds = btf.datasec(".maps")?.ok_or_else(|| {
        LoadError::Malformed("the .BTF has no data section type for .maps".to_string())
    })?;
    let mut found = Vec::new();
    for e in &ds.secinfo {
        let var = btf.get(e.ty)?;
        if var.kind != btf::VAR {
            return Err(LoadError::Malformed(format!(
                ".maps entry of type {} is not a variable",
                e.ty
            )));
        }
        let name = btf.string(var.name)?;
        let (spec, values_offset) = btf_map(btf, &name, var.size_or_type)?;
        // clang leaves the offsets in the BTF to the loader (libbpf fixes them up from the
        // symbol table): the map's symbol says where its definition is.
        let sym = elf
            .symbols
            .iter()
            .find(|s| s.place == SymPlace::Section(sec) && s.name == name)
            .ok_or_else(|| bad_map(&name, "no symbol in .maps names it"))?;
        let offset = sym.value;
        let size = if sym.size > 0 {
            sym.size
        } else {
            u64::from(e.size)
        };
        if offset
            .checked_add(size)
            .is_none_or(|end| end > elf.sections[sec].size)
        {
            return Err(bad_map(&name, "its definition lies outside .maps"));
        }
        let def = BtfDef {
            offset,
            size,
            values_offset,
        };
        found.push((spec, def));
    }
    found.sort_by_key(|(_, def)| def.offset);
    let first = table.specs.len();
    let mut defs = Vec::new();
    for (spec, def) in found {
        if table
            .defs
            .insert((sec, def.offset), table.specs.len())
            .is_some()
        {
            return Err(bad_map(
                &spec.name,
                "its definition is where another map's is",
            ));
        }
        pinning_note(notes, &spec.name, spec.pinning);
        table.specs.push(spec);
        defs.push(def);
    }
    // `.values = { [i] = &prog }`: a relocation per initialised slot.
    let Some(relocs) = elf.relocs.get(&sec) else {
        return Ok(());
    };
    for (&off, reloc) in relocs {
        let Some(i) = defs
            .iter()
            .position(|d| d.offset <= off && off < d.offset + d.size)
        else {
            return Err(LoadError::Malformed(format!(
                "a relocation at byte {off} of .maps is in no map's definition"
            )));
        };
        let (def, map) = (&defs[i], first + i);
        let name = table.specs[map].name.clone();
        let Some(values) = def.values_offset else {
            return Err(bad_map(
                &name,
                "a relocation in its definition, which has no `values`",
            ));
        };
        let slot_off = (off - def.offset)
            .checked_sub(values)
            .filter(|o| o % 8 == 0)
            .ok_or_else(|| bad_map(&name, "a relocation outside its `values` slots"))?;
        let slot = slot_off / 8;
        if slot >= u64::from(table.specs[map].max_entries) {
            return Err(bad_map(
                &name,
                format!(
                    "`values` slot {slot} is beyond max_entries {}",
                    table.specs[map].max_entries
                ),
            ));
        }
        if !matches!(reloc.r_type, E::R_BPF_64_64 | R_BPF_64_ABS64) {
            return Err(bad_map(
                &name,
                format!("`values` slot {slot} has relocation type {}", reloc.r_type),
            ));
        }
        let sym = &elf.symbols[reloc.symbol];
        let addend = elf.sections[sec]
            .data
            .get(off as usize..off as usize + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        let program = match sym.place {
            SymPlace::Section(s) if sym.st_type == E::STT_FUNC => {
                funcs.program_at(s, sym.value.wrapping_add(addend))
            }
            _ => None,
        };
        let program = program.ok_or_else(|| {
            bad_map(
                &name,
                format!(
                    "`values` slot {slot} refers to `{}`, which is not a program of this object",
                    elf.symbol_display(reloc.symbol)
                ),
            )
        })?;
        table.specs[map]
            .prog_slots
            .push((slot as u32, program.to_string()));
    }
    Ok(())
}

/// `__uint(field, N)` is `int (*field)[N]`: the array's length.
fn uint_field(btf: &Btf<'_>, map: &str, field: &str, ty: u32) -> Result<u32, LoadError> {
    let bad = || {
        bad_map(
            map,
            format!("`{field}` is not written as __uint({field}, N)"),
        )
    };
    let ptr = btf.get(btf.resolve(ty)?)?;
    if ptr.kind != btf::PTR {
        return Err(bad());
    }
    let array = btf.get(btf.resolve(ptr.size_or_type)?)?;
    match (array.kind, array.array) {
        (btf::ARRAY, Some((_, n))) => Ok(n),
        _ => Err(bad()),
    }
}

/// `__type(field, T)` is `T *field`: the size of T.
fn type_field(btf: &Btf<'_>, map: &str, field: &str, ty: u32) -> Result<u32, LoadError> {
    let ptr = btf.get(btf.resolve(ty)?)?;
    if ptr.kind != btf::PTR {
        return Err(bad_map(
            map,
            format!("`{field}` is not written as __type({field}, T)"),
        ));
    }
    let size = btf.size_of(ptr.size_or_type)?;
    u32::try_from(size).map_err(|_| bad_map(map, format!("`{field}` is {size} bytes")))
}

fn btf_map(btf: &Btf<'_>, name: &str, ty: u32) -> Result<(MapSpec, Option<u64>), LoadError> {
    let st = btf.get(btf.resolve(ty)?)?;
    if st.kind != btf::STRUCT {
        return Err(bad_map(name, "its definition is not a struct"));
    }
    let (mut map_type, mut key_size, mut value_size) = (0, 0, 0);
    let (mut max_entries, mut flags, mut pinning) = (0, 0, 0);
    let mut values_offset = None;
    for m in &st.members {
        let field = btf.string(m.name)?;
        match field.as_str() {
            "type" => map_type = uint_field(btf, name, &field, m.ty)?,
            "max_entries" => max_entries = uint_field(btf, name, &field, m.ty)?,
            "map_flags" => flags = uint_field(btf, name, &field, m.ty)?,
            "pinning" => pinning = uint_field(btf, name, &field, m.ty)?,
            "key_size" => key_size = uint_field(btf, name, &field, m.ty)?,
            "value_size" => value_size = uint_field(btf, name, &field, m.ty)?,
            "numa_node" | "map_extra" => {
                uint_field(btf, name, &field, m.ty)?;
            }
            "key" => key_size = type_field(btf, name, &field, m.ty)?,
            "value" => value_size = type_field(btf, name, &field, m.ty)?,
            "values" => {
                let array = btf.get(btf.resolve(m.ty)?)?;
                let elem = match (array.kind, array.array) {
                    (btf::ARRAY, Some((elem, 0))) => elem,
                    _ => {
                        return Err(bad_map(
                            name,
                            "`values` is not written as __array(values, ...)",
                        ));
                    }
                };
                let ptr = btf.get(btf.resolve(elem)?)?;
                let is_prog = ptr.kind == btf::PTR
                    && btf.is_kind(btf.resolve(ptr.size_or_type)?, btf::FUNC_PROTO)?;
                if !is_prog {
                    return Err(bad_map(
                        name,
                        "`values` holds maps (a map of maps), which livebpf does not support",
                    ));
                }
                if m.bit_offset % 64 != 0 {
                    return Err(bad_map(name, "`values` is not 8-byte aligned"));
                }
                values_offset = Some(u64::from(m.bit_offset / 8));
                value_size = 4;
            }
            other => {
                return Err(bad_map(
                    name,
                    format!("unknown field `{other}` in its definition"),
                ));
            }
        }
    }
    let kind = kind_of(name, map_type)?;
    if values_offset.is_some() && kind != MapType::ProgArray {
        return Err(bad_map(
            name,
            format!("`values` initialises prog_array maps only, and this is a {kind}"),
        ));
    }
    Ok((
        MapSpec {
            name: name.to_string(),
            kind,
            key_size,
            value_size,
            max_entries,
            flags,
            pinning,
            origin: MapOrigin::BtfMaps,
            initial_value: None,
            symbols: Vec::new(),
            prog_slots: Vec::new(),
        },
        values_offset,
    ))
}

fn legacy_maps(
    elf: &Elf<'_>,
    sec: usize,
    notes: &mut Vec<String>,
    table: &mut Table,
) -> Result<(), LoadError> {
    let section = &elf.sections[sec];
    let mut syms: Vec<_> = elf
        .symbols
        .iter()
        .filter(|s| {
            s.place == SymPlace::Section(sec) && !matches!(s.st_type, E::STT_SECTION | E::STT_FILE)
        })
        .collect();
    syms.sort_by_key(|s| s.value);
    if syms.is_empty() {
        if section.size == 0 {
            return Ok(());
        }
        return Err(LoadError::BadSection {
            section: section.name.clone(),
            reason: "map definitions without symbols naming them".to_string(),
        });
    }
    let default_size = section.size / syms.len() as u64;
    for sym in syms {
        let size = if sym.size > 0 { sym.size } else { default_size };
        let word = |i: u64| {
            let at = sym.value.checked_add(4 * i)? as usize;
            let b = section.data.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes(b.try_into().ok()?))
        };
        let field = |i: u64| {
            if size >= 4 * (i + 1) {
                word(i)
            } else {
                Some(0)
            }
        };
        let (Some(map_type), Some(key_size), Some(value_size), Some(max_entries)) =
            (word(0), word(1), word(2), word(3))
        else {
            return Err(bad_map(
                &sym.name,
                "its struct bpf_map_def is shorter than 16 bytes",
            ));
        };
        if size < 16 {
            return Err(bad_map(
                &sym.name,
                "its struct bpf_map_def is shorter than 16 bytes",
            ));
        }
        let flags = field(4).ok_or_else(|| bad_map(&sym.name, "truncated definition"))?;
        // iproute2 and aya put `pinning` after `id`, at byte 24.
        let pinning = field(6).ok_or_else(|| bad_map(&sym.name, "truncated definition"))?;
        let kind = kind_of(&sym.name, map_type)?;
        pinning_note(notes, &sym.name, pinning);
        table.defs.insert((sec, sym.value), table.specs.len());
        table.specs.push(MapSpec {
            name: sym.name.clone(),
            kind,
            key_size,
            value_size,
            max_entries,
            flags,
            pinning,
            origin: MapOrigin::LegacyMaps,
            initial_value: None,
            symbols: Vec::new(),
            prog_slots: Vec::new(),
        });
    }
    Ok(())
}
