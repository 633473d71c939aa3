//! Linking, as libbpf does it: each program's own instructions, then every subprogram it
//! reaches through a BPF-to-BPF call or a function-address `lddw`, appended once each in the
//! order first reached, with call offsets fixed; map references become pseudo `lddw`s.

use std::collections::{BTreeSet, HashMap};

use object::elf as E;

use super::btf::{self, Btf, CoreRelo};
use super::elf::{Elf, Reloc, SymPlace};
use super::maps::{Table, data_kind};
use super::{
    BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE, FuncRef, FunctionSpan, LoadError,
    MapRef, MapRefKind, ProgType, ProgramSpec,
};
use crate::isa::{INSN_SIZE, RawInsn};

const OP_LDDW: u8 = 0x18;
const OP_CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
const SLOT: u64 = INSN_SIZE as u64;

/// A function symbol in an executable section.
pub(super) struct Func {
    pub name: String,
    pub section: usize,
    /// Byte offset in the section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Whether it is a program (a function outside `.text`).
    pub is_program: bool,
}

/// Every function of the object.
pub(super) struct Functions {
    funcs: Vec<Func>,
    by_start: HashMap<(usize, u64), usize>,
}

impl Functions {
    /// `text_program`: a global function in `.text` to treat as a raw program too.
    pub fn collect(elf: &Elf<'_>, text_program: Option<&str>) -> Result<Functions, LoadError> {
        let mut funcs = Vec::new();
        let mut by_start = HashMap::new();
        for sym in &elf.symbols {
            let SymPlace::Section(s) = sym.place else {
                continue;
            };
            let sec = &elf.sections[s];
            if sym.st_type != E::STT_FUNC || !sec.is_exec() {
                continue;
            }
            let malformed = |what: &str| {
                LoadError::Malformed(format!("function `{}` in `{}` {what}", sym.name, sec.name))
            };
            if sym.value % SLOT != 0 || sym.size % SLOT != 0 {
                return Err(malformed("is not made of whole 8-byte instructions"));
            }
            if sym.size == 0 {
                return Err(malformed("is empty"));
            }
            if sym
                .value
                .checked_add(sym.size)
                .is_none_or(|end| end > sec.size)
            {
                return Err(malformed("extends past the end of its section"));
            }
            let is_program = sec.name != ".text"
                || (text_program == Some(sym.name.as_str()) && sym.bind == E::STB_GLOBAL);
            if is_program && sym.bind == E::STB_LOCAL {
                return Err(LoadError::BadSection {
                    section: sec.name.clone(),
                    reason: format!(
                        "program `{}` is static; as with libbpf, programs must be global",
                        sym.name
                    ),
                });
            }
            if by_start.insert((s, sym.value), funcs.len()).is_some() {
                return Err(malformed("starts where another function does"));
            }
            funcs.push(Func {
                name: sym.name.clone(),
                section: s,
                offset: sym.value,
                size: sym.size,
                is_program,
            });
        }
        for (s, sec) in elf.sections.iter().enumerate() {
            if sec.is_exec() && sec.size > 0 && !funcs.iter().any(|f| f.section == s) {
                return Err(LoadError::BadSection {
                    section: sec.name.clone(),
                    reason: "code without a function symbol".to_string(),
                });
            }
        }
        funcs.sort_by_key(|f| (f.section, f.offset));
        by_start = funcs
            .iter()
            .enumerate()
            .map(|(i, f)| ((f.section, f.offset), i))
            .collect();
        Ok(Functions { funcs, by_start })
    }

    /// The name of the program that starts at byte `offset` of section `section`.
    pub fn program_at(&self, section: usize, offset: u64) -> Option<&str> {
        let f = &self.funcs[*self.by_start.get(&(section, offset))?];
        f.is_program.then_some(f.name.as_str())
    }

    /// The name of the function holding byte `offset` of `section`, for messages.
    fn name_at(&self, section: usize, offset: u64) -> String {
        self.funcs
            .iter()
            .find(|f| f.section == section && f.offset <= offset && offset < f.offset + f.size)
            .map_or_else(|| "?".to_string(), |f| f.name.clone())
    }
}

/// Refuses every CO-RE relocation but local type ids, which need no kernel BTF.
pub(super) fn refuse_core(
    elf: &Elf<'_>,
    funcs: &Functions,
    btf: &Btf<'_>,
    relos: &[CoreRelo],
) -> Result<(), LoadError> {
    let Some(relo) = relos.iter().find(|r| r.kind != btf::CORE_TYPE_ID_LOCAL) else {
        return Ok(());
    };
    let symbol = elf.section_index(&relo.section).map_or_else(
        || "?".to_string(),
        |s| funcs.name_at(s, u64::from(relo.insn_off)),
    );
    let type_name = match btf.name(relo.type_id)? {
        name if name.is_empty() => format!("(anonymous type {})", relo.type_id),
        name => name,
    };
    Err(LoadError::CoreRelocation {
        section: relo.section.clone(),
        symbol,
        insn: (relo.insn_off / INSN_SIZE as u32) as usize,
        type_name,
        kind: btf::core_kind_name(relo.kind),
    })
}

/// Links every program.
pub(super) fn link_all(
    elf: &Elf<'_>,
    funcs: &Functions,
    table: &Table,
    license: &Option<String>,
) -> Result<Vec<ProgramSpec>, LoadError> {
    let mut programs = Vec::new();
    for (i, f) in funcs.funcs.iter().enumerate() {
        if !f.is_program {
            continue;
        }
        let section = elf.sections[f.section].name.clone();
        let prog_type = ProgType::from_section(&section)?;
        let mut linker = Linker {
            elf,
            funcs,
            table,
            insns: Vec::new(),
            spans: Vec::new(),
            placed: HashMap::new(),
            map_refs: Vec::new(),
            func_refs: Vec::new(),
            helpers: BTreeSet::new(),
        };
        linker.place(i);
        linker.link()?;
        programs.push(ProgramSpec {
            name: f.name.clone(),
            section,
            prog_type,
            license: license.clone(),
            functions: linker
                .spans
                .iter()
                .map(|&(fi, start)| FunctionSpan {
                    name: funcs.funcs[fi].name.clone(),
                    start,
                    len: (funcs.funcs[fi].size / SLOT) as usize,
                })
                .collect(),
            insns: linker.insns,
            map_refs: linker.map_refs,
            func_refs: linker.func_refs,
            helpers_used: linker.helpers.into_iter().collect(),
        });
    }
    Ok(programs)
}

/// Where an instruction came from, for errors.
struct Here<'a> {
    section: &'a str,
    symbol: &'a str,
    insn: usize,
}

impl Here<'_> {
    fn bad_reloc(&self, reason: impl Into<String>) -> LoadError {
        LoadError::BadRelocation {
            section: self.section.to_string(),
            symbol: self.symbol.to_string(),
            insn: self.insn,
            reason: reason.into(),
        }
    }

    fn bad_insn(&self, reason: impl Into<String>) -> LoadError {
        LoadError::BadInstruction {
            section: self.section.to_string(),
            symbol: self.symbol.to_string(),
            insn: self.insn,
            reason: reason.into(),
        }
    }
}

struct Linker<'e, 'a> {
    elf: &'e Elf<'a>,
    funcs: &'e Functions,
    table: &'e Table,
    insns: Vec<RawInsn>,
    /// (function, first slot), in placement order.
    spans: Vec<(usize, usize)>,
    placed: HashMap<usize, usize>,
    map_refs: Vec<MapRef>,
    func_refs: Vec<FuncRef>,
    helpers: BTreeSet<u32>,
}

impl Linker<'_, '_> {
    /// Appends function `fi`'s instructions (once) and returns its first slot.
    fn place(&mut self, fi: usize) -> usize {
        if let Some(&start) = self.placed.get(&fi) {
            return start;
        }
        let f = &self.funcs.funcs[fi];
        let start = self.insns.len();
        let data = self.elf.sections[f.section].data;
        // Functions::collect checked the range against the section's size.
        let code = &data[f.offset as usize..(f.offset + f.size) as usize];
        self.insns.extend(
            code.chunks_exact(INSN_SIZE)
                .map(|c| RawInsn::from_bytes(c.try_into().expect("8-byte chunk"))),
        );
        self.placed.insert(fi, start);
        self.spans.push((fi, start));
        start
    }

    /// Places the function starting at byte `target` of `section`; returns its first slot.
    fn place_at(
        &mut self,
        here: &Here<'_>,
        section: usize,
        target: i64,
    ) -> Result<usize, LoadError> {
        let fi = u64::try_from(target)
            .ok()
            .and_then(|t| self.funcs.by_start.get(&(section, t)).copied())
            .ok_or_else(|| {
                here.bad_insn(format!(
                    "the call or function address targets byte {target} of `{}`, which is not the start of a function",
                    self.elf.sections[section].name
                ))
            })?;
        Ok(self.place(fi))
    }

    /// The offset from slot `from`'s successor to slot `to`, as a call's imm.
    fn rel(here: &Here<'_>, from: usize, to: usize) -> Result<i32, LoadError> {
        i32::try_from(to as i64 - from as i64 - 1)
            .map_err(|_| here.bad_insn("the linked program is too large for the call's offset"))
    }

    fn link(&mut self) -> Result<(), LoadError> {
        let mut seg = 0;
        while seg < self.spans.len() {
            let (fi, start) = self.spans[seg];
            let (elf, funcs) = (self.elf, self.funcs);
            let f = &funcs.funcs[fi];
            let section = &elf.sections[f.section];
            let relocs = elf.relocs.get(&f.section);
            let n = (f.size / SLOT) as usize;
            let mut k = 0;
            while k < n {
                let g = start + k;
                let sec_off = f.offset + SLOT * k as u64;
                let here = Here {
                    section: &section.name,
                    symbol: &f.name,
                    insn: (sec_off / SLOT) as usize,
                };
                let reloc = relocs.and_then(|r| r.get(&sec_off)).copied();
                let raw = self.insns[g];
                match raw.opcode {
                    OP_LDDW => {
                        if k + 1 >= n {
                            return Err(
                                here.bad_insn("lddw needs a second slot but the function ends")
                            );
                        }
                        if relocs.is_some_and(|r| r.contains_key(&(sec_off + SLOT))) {
                            return Err(
                                here.bad_reloc("a relocation on the second slot of an lddw")
                            );
                        }
                        self.lddw(&here, f.section, sec_off, g, reloc)?;
                        k += 2;
                        continue;
                    }
                    OP_CALL => self.call(&here, f.section, sec_off, g, reloc)?,
                    op => {
                        if reloc.is_some() {
                            return Err(here.bad_reloc(format!(
                                "a relocation on an instruction that is neither lddw nor call (opcode {op:#04x})"
                            )));
                        }
                    }
                }
                k += 1;
            }
            seg += 1;
        }
        Ok(())
    }

    fn lddw(
        &mut self,
        here: &Here<'_>,
        section: usize,
        sec_off: u64,
        g: usize,
        reloc: Option<Reloc>,
    ) -> Result<(), LoadError> {
        let raw = self.insns[g];
        let Some(reloc) = reloc else {
            return match raw.src {
                0 => Ok(()),
                BPF_PSEUDO_FUNC => {
                    let target = sec_off as i64 + (i64::from(raw.imm) + 1) * SLOT as i64;
                    let start = self.place_at(here, section, target)?;
                    self.func_ref(here, g, start)
                }
                src => {
                    Err(here.bad_insn(format!("lddw with pseudo source {src} but no relocation")))
                }
            };
        };
        if reloc.r_type != E::R_BPF_64_64 {
            return Err(here.bad_reloc(format!(
                "lddw with relocation type {} (expected R_BPF_64_64)",
                reloc.r_type
            )));
        }
        if raw.src != 0 {
            return Err(here.bad_insn(format!(
                "lddw with a relocation already has pseudo source {}",
                raw.src
            )));
        }
        let elf = self.elf;
        let sym = &elf.symbols[reloc.symbol];
        let target = elf.symbol_display(reloc.symbol);
        let s = match sym.place {
            SymPlace::Undefined => {
                return Err(LoadError::Extern {
                    section: here.section.to_string(),
                    symbol: here.symbol.to_string(),
                    insn: here.insn,
                    name: target,
                });
            }
            SymPlace::Special(index) => return Err(unknown_section(here, target, special(index))),
            SymPlace::Section(s) => s,
        };
        let tsec = &elf.sections[s];
        let off = (sym.value as i64).wrapping_add(i64::from(raw.imm));
        if let Some(&map) = u64::try_from(off)
            .ok()
            .and_then(|o| self.table.defs.get(&(s, o)))
        {
            self.insns[g].src = BPF_PSEUDO_MAP_FD;
            self.insns[g].imm = map as i32;
            self.insns[g + 1].imm = 0;
            self.map_refs.push(MapRef {
                insn: g,
                map,
                kind: MapRefKind::Fd,
            });
            return Ok(());
        }
        if tsec.name == ".maps" || tsec.name == "maps" {
            return Err(here.bad_reloc(format!(
                "`{target}` + {} is no map definition in `{}`",
                raw.imm, tsec.name
            )));
        }
        if let Some(&map) = self.table.data.get(&s) {
            let size = self.table.specs[map].value_size;
            let offset = u32::try_from(off)
                .ok()
                .filter(|&o| o <= size)
                .ok_or_else(|| {
                    here.bad_reloc(format!(
                        "`{target}` + {} is outside `{}` ({size} bytes)",
                        raw.imm, tsec.name
                    ))
                })?;
            self.insns[g].src = BPF_PSEUDO_MAP_VALUE;
            self.insns[g].imm = map as i32;
            self.insns[g + 1].imm = offset as i32;
            self.map_refs.push(MapRef {
                insn: g,
                map,
                kind: MapRefKind::Value { offset },
            });
            return Ok(());
        }
        if data_kind(tsec).is_some() {
            return Err(here.bad_reloc(format!(
                "`{target}` is in the empty section `{}`",
                tsec.name
            )));
        }
        if tsec.is_exec() {
            if tsec.name != ".text" {
                return Err(here.bad_reloc(format!(
                    "the address of `{target}` in `{}`: as with libbpf, only functions in .text can be called or have their address taken",
                    tsec.name
                )));
            }
            if off % SLOT as i64 != 0 {
                return Err(here.bad_reloc(format!(
                    "the address of `{target}` + {} is not an instruction boundary",
                    raw.imm
                )));
            }
            let start = self.place_at(here, s, off)?;
            self.insns[g].src = BPF_PSEUDO_FUNC;
            return self.func_ref(here, g, start);
        }
        Err(unknown_section(here, target, tsec.name.clone()))
    }

    fn func_ref(&mut self, here: &Here<'_>, g: usize, start: usize) -> Result<(), LoadError> {
        self.insns[g].imm = Self::rel(here, g, start)?;
        self.insns[g + 1].imm = 0;
        self.func_refs.push(FuncRef {
            insn: g,
            target_insn: start,
        });
        Ok(())
    }

    fn call(
        &mut self,
        here: &Here<'_>,
        section: usize,
        sec_off: u64,
        g: usize,
        reloc: Option<Reloc>,
    ) -> Result<(), LoadError> {
        let raw = self.insns[g];
        let kfunc = |name: String| LoadError::Kfunc {
            section: here.section.to_string(),
            symbol: here.symbol.to_string(),
            insn: here.insn,
            name,
        };
        match raw.src {
            0 if reloc.is_some() => Err(here.bad_reloc("a relocation on a helper call")),
            0 => {
                self.helpers.insert(raw.imm as u32);
                Ok(())
            }
            PSEUDO_CALL => {
                let (target_sec, target) = match reloc {
                    None => {
                        let target = sec_off as i64 + (i64::from(raw.imm) + 1) * SLOT as i64;
                        // A call into the calling function's own code (hand-written objects,
                        // such as the conformance runner's, have one symbol for the whole
                        // program): the function is copied whole, so the offset stays.
                        let own = self.funcs.funcs.iter().find(|f| {
                            f.section == section
                                && f.offset <= sec_off
                                && sec_off < f.offset + f.size
                        });
                        if let Some(f) = own
                            && target > f.offset as i64
                            && target < (f.offset + f.size) as i64
                            && !self.funcs.by_start.contains_key(&(section, target as u64))
                        {
                            return Ok(());
                        }
                        (section, target)
                    }
                    Some(reloc) => {
                        let elf = self.elf;
                        let sym = &elf.symbols[reloc.symbol];
                        let name = elf.symbol_display(reloc.symbol);
                        let s = match sym.place {
                            SymPlace::Undefined => return Err(kfunc(name)),
                            SymPlace::Special(index) => {
                                return Err(unknown_section(here, name, special(index)));
                            }
                            SymPlace::Section(s) => s,
                        };
                        let tsec = &elf.sections[s];
                        if !tsec.is_exec() {
                            return Err(unknown_section(here, name, tsec.name.clone()));
                        }
                        if tsec.name != ".text" {
                            return Err(here.bad_reloc(format!(
                                "a call of `{name}` in `{}`: as with libbpf, only functions in .text can be called",
                                tsec.name
                            )));
                        }
                        if !matches!(reloc.r_type, E::R_BPF_64_32) {
                            return Err(here.bad_reloc(format!(
                                "call with relocation type {} (expected R_BPF_64_32)",
                                reloc.r_type
                            )));
                        }
                        (
                            s,
                            (sym.value as i64).wrapping_add((i64::from(raw.imm) + 1) * SLOT as i64),
                        )
                    }
                };
                let start = self.place_at(here, target_sec, target)?;
                self.insns[g].imm = Self::rel(here, g, start)?;
                Ok(())
            }
            PSEUDO_KFUNC_CALL => Err(kfunc(format!("BTF id {}", raw.imm))),
            src => Err(here.bad_insn(format!("call with unknown source {src}"))),
        }
    }
}

fn special(index: u16) -> String {
    match index {
        E::SHN_ABS => "SHN_ABS".to_string(),
        E::SHN_COMMON => "SHN_COMMON (a common symbol)".to_string(),
        i => format!("reserved section index {i:#x}"),
    }
}

fn unknown_section(here: &Here<'_>, target: String, target_section: String) -> LoadError {
    LoadError::UnknownSection {
        section: here.section.to_string(),
        symbol: here.symbol.to_string(),
        insn: here.insn,
        target,
        target_section,
    }
}
