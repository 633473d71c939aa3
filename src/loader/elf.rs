//! The raw ELF layer: sections, symbols and `SHT_REL` relocations of a 64-bit little-endian
//! `EM_BPF` relocatable object, read with the `object` crate's low-level ELF API (which checks
//! every offset and size) into plain owned tables. Nothing here knows about maps or programs.

use std::collections::{BTreeMap, HashMap};

use object::LittleEndian as LE;
use object::elf;
use object::read::elf::{FileHeader, Rel, SectionHeader, Sym};

use super::LoadError;

/// One section header and its bytes (empty for `SHT_NOBITS`, whose size is `size`).
pub(super) struct Section<'a> {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    pub size: u64,
    pub data: &'a [u8],
}

impl Section<'_> {
    /// Whether the section holds eBPF code.
    pub fn is_exec(&self) -> bool {
        self.sh_type == elf::SHT_PROGBITS && self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }
}

/// Where a symbol is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SymPlace {
    /// `SHN_UNDEF`: an extern.
    Undefined,
    /// In the section with this index.
    Section(usize),
    /// `SHN_ABS`, `SHN_COMMON` or another reserved index.
    Special(u16),
}

/// One symbol table entry.
pub(super) struct Symbol {
    pub name: String,
    pub place: SymPlace,
    pub value: u64,
    pub size: u64,
    pub st_type: u8,
    pub bind: u8,
}

/// One `SHT_REL` entry (BPF objects carry their addends in the relocated bytes).
#[derive(Clone, Copy, Debug)]
pub(super) struct Reloc {
    pub symbol: usize,
    pub r_type: u32,
}

/// The object's sections, symbols, and the relocations of every section that has any, by the
/// relocated section's index and then by byte offset in it.
pub(super) struct Elf<'a> {
    pub sections: Vec<Section<'a>>,
    pub symbols: Vec<Symbol>,
    pub relocs: HashMap<usize, BTreeMap<u64, Reloc>>,
    /// Sections with relocations that are not read (debug info, BTF, global data).
    pub unread_relocs: Vec<usize>,
}

fn malformed(what: impl std::fmt::Display) -> LoadError {
    LoadError::Malformed(what.to_string())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Elf<'a>, LoadError> {
        let not_bpf = |reason: &str| LoadError::NotBpf(reason.to_string());
        if !data.starts_with(&elf::ELFMAG) {
            return Err(not_bpf("no ELF magic number at the start"));
        }
        if data.get(4) != Some(&elf::ELFCLASS64) {
            return Err(not_bpf("not a 64-bit ELF file"));
        }
        if data.get(5) != Some(&elf::ELFDATA2LSB) {
            return Err(not_bpf(
                "not a little-endian ELF file (clang -target bpf on a little-endian host, or bpfel)",
            ));
        }
        let header = elf::FileHeader64::<LE>::parse(data)
            .map_err(|e| malformed(format_args!("ELF header: {e}")))?;
        let endian = LE;
        if header.e_machine(endian) != elf::EM_BPF {
            return Err(not_bpf("the ELF machine is not EM_BPF (clang -target bpf)"));
        }
        if header.e_type(endian) != elf::ET_REL {
            return Err(not_bpf(
                "not a relocatable object (clang -c output is what is loaded)",
            ));
        }
        let table = header
            .sections(endian, data)
            .map_err(|e| malformed(format_args!("section headers: {e}")))?;
        let mut sections = Vec::with_capacity(table.len());
        for (index, sh) in table.enumerate() {
            let name = table
                .section_name(endian, sh)
                .map_err(|e| malformed(format_args!("name of section {}: {e}", index.0)))?;
            let name = lossy(name);
            let section_data = sh
                .data(endian, data)
                .map_err(|e| malformed(format_args!("section `{name}`: {e}")))?;
            sections.push(Section {
                name,
                sh_type: sh.sh_type(endian),
                flags: sh.sh_flags(endian),
                size: sh.sh_size(endian),
                data: section_data,
            });
        }

        let symtab = table
            .symbols(endian, data, elf::SHT_SYMTAB)
            .map_err(|e| malformed(format_args!("symbol table: {e}")))?;
        let mut symbols = Vec::with_capacity(symtab.len());
        for (index, sym) in symtab.enumerate() {
            let name = symtab
                .symbol_name(endian, sym)
                .map_err(|e| malformed(format_args!("name of symbol {}: {e}", index.0)))?;
            let shndx = sym.st_shndx(endian);
            let place = match shndx {
                elf::SHN_UNDEF => SymPlace::Undefined,
                elf::SHN_XINDEX => match symtab.symbol_section(endian, sym, index) {
                    Ok(Some(i)) => SymPlace::Section(i.0),
                    Ok(None) => SymPlace::Undefined,
                    Err(e) => return Err(malformed(format_args!("symbol {}: {e}", index.0))),
                },
                s if s < elf::SHN_LORESERVE => SymPlace::Section(usize::from(s)),
                s => SymPlace::Special(s),
            };
            if let SymPlace::Section(i) = place
                && i >= sections.len()
            {
                return Err(malformed(format_args!(
                    "symbol `{}` names section {i}, which does not exist",
                    lossy(name)
                )));
            }
            symbols.push(Symbol {
                name: lossy(name),
                place,
                value: sym.st_value(endian),
                size: sym.st_size(endian),
                st_type: sym.st_type(),
                bind: sym.st_bind(),
            });
        }

        let mut relocs: HashMap<usize, BTreeMap<u64, Reloc>> = HashMap::new();
        let mut unread_relocs = Vec::new();
        for (index, sh) in table.enumerate() {
            let sh_type = sh.sh_type(endian);
            if sh_type != elf::SHT_REL && sh_type != elf::SHT_RELA {
                continue;
            }
            let target = sh.sh_info(endian) as usize;
            let Some(target_sec) = sections.get(target) else {
                return Err(malformed(format_args!(
                    "relocation section `{}` applies to section {target}, which does not exist",
                    sections[index.0].name
                )));
            };
            let wanted = target_sec.is_exec() || target_sec.name == ".maps";
            if !wanted {
                unread_relocs.push(target);
                continue;
            }
            if sh_type == elf::SHT_RELA {
                return Err(malformed(format_args!(
                    "section `{}` has RELA relocations; eBPF objects use REL",
                    target_sec.name
                )));
            }
            if sh.link(endian) != symtab.section() {
                return Err(malformed(format_args!(
                    "relocation section `{}` does not use the symbol table",
                    sections[index.0].name
                )));
            }
            let rels: &[elf::Rel64<LE>] = sh
                .data_as_array(endian, data)
                .map_err(|e| malformed(format_args!("{}: {e}", sections[index.0].name)))?;
            let map = relocs.entry(target).or_default();
            for rel in rels {
                let offset = rel.r_offset(endian);
                let symbol = rel.r_sym(endian) as usize;
                if symbol == 0 || symbol >= symbols.len() {
                    return Err(malformed(format_args!(
                        "a relocation in `{}` names symbol {symbol}, which does not exist",
                        target_sec.name
                    )));
                }
                if offset >= target_sec.size {
                    return Err(malformed(format_args!(
                        "a relocation at byte {offset} is outside section `{}`",
                        target_sec.name
                    )));
                }
                let r_type = rel.r_type(endian);
                if map.insert(offset, Reloc { symbol, r_type }).is_some() {
                    return Err(malformed(format_args!(
                        "two relocations at byte {offset} of section `{}`",
                        target_sec.name
                    )));
                }
            }
        }
        Ok(Elf {
            sections,
            symbols,
            relocs,
            unread_relocs,
        })
    }

    /// The index of the first section called `name`.
    pub fn section_index(&self, name: &str) -> Option<usize> {
        self.sections.iter().position(|s| s.name == name)
    }

    /// The name to show for a symbol: its own, or for a section symbol its section's.
    pub fn symbol_display(&self, index: usize) -> String {
        let sym = &self.symbols[index];
        match sym.place {
            SymPlace::Section(s) if sym.name.is_empty() => self.sections[s].name.clone(),
            _ => sym.name.clone(),
        }
    }
}
