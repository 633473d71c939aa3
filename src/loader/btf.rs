//! The part of BTF the loader needs: type sizes and names, struct members, arrays, variables and
//! data sections from `.BTF` (for BTF-defined maps), and the CO-RE relocation records of
//! `.BTF.ext` (which are refused). Every count and offset is checked against the section's
//! bytes; malformed BTF is an error, never a panic.

use super::LoadError;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// The most modifiers and typedefs followed, and the deepest array nesting sized, before the
/// type is taken to be a loop.
const MAX_CHAIN: usize = 64;

fn malformed(what: impl std::fmt::Display) -> LoadError {
    LoadError::Malformed(format!("BTF: {what}"))
}

/// Little-endian reads that fail instead of panicking.
pub(super) struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }

    pub fn u32_at(&self, offset: usize) -> Option<u32> {
        let bytes = self.data.get(offset..offset.checked_add(4)?)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    }

    pub fn u16_at(&self, offset: usize) -> Option<u16> {
        let bytes = self.data.get(offset..offset.checked_add(2)?)?;
        Some(u16::from_le_bytes(bytes.try_into().ok()?))
    }

    pub fn slice(&self, offset: usize, len: usize) -> Option<&'a [u8]> {
        self.data.get(offset..offset.checked_add(len)?)
    }
}

/// A struct or union member.
#[derive(Clone, Debug)]
pub(super) struct Member {
    pub name: u32,
    pub ty: u32,
    /// Offset in bits (the low 24 bits when the struct has bitfields).
    pub bit_offset: u32,
}

/// A variable of a data section.
#[derive(Clone, Debug)]
pub(super) struct VarSecinfo {
    pub ty: u32,
    pub size: u32,
}

/// One BTF type, reduced to what the loader reads.
#[derive(Clone, Debug)]
pub(super) struct Type {
    pub kind: u32,
    pub name: u32,
    /// `size` or `type`, by kind.
    pub size_or_type: u32,
    /// Element type and count, for arrays.
    pub array: Option<(u32, u32)>,
    pub members: Vec<Member>,
    pub secinfo: Vec<VarSecinfo>,
    /// The entry count (`vlen`): parameters of a function prototype, members, variables.
    pub vlen: u32,
}

/// Parsed `.BTF`: types by id (id 0 is `void`) and the string section.
pub(super) struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, LoadError> {
        let r = Reader::new(data);
        let bad_header = || malformed("truncated header");
        if r.u16_at(0).ok_or_else(bad_header)? != BTF_MAGIC {
            return Err(malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = r.u32_at(4).ok_or_else(bad_header)? as usize;
        let field = |i: usize| r.u32_at(8 + 4 * i).ok_or_else(bad_header);
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?);
        if hdr_len < 24 {
            return Err(malformed("header shorter than 24 bytes"));
        }
        let body = |off: u32, len: u32, what: &str| {
            hdr_len
                .checked_add(off as usize)
                .and_then(|start| r.slice(start, len as usize))
                .ok_or_else(|| malformed(format_args!("{what} section out of bounds")))
        };
        let type_data = body(type_off, type_len, "type")?;
        let strings = body(str_off, str_len, "string")?;
        let types = parse_types(type_data)?;
        Ok(Btf { types, strings })
    }

    pub fn get(&self, id: u32) -> Result<&Type, LoadError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| malformed(format_args!("type id {id} does not exist")))
    }

    /// The string at `offset` of the string section.
    pub fn string(&self, offset: u32) -> Result<String, LoadError> {
        let rest = self
            .strings
            .get(offset as usize..)
            .ok_or_else(|| malformed(format_args!("string offset {offset} out of bounds")))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed("unterminated string"))?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    pub fn name(&self, id: u32) -> Result<String, LoadError> {
        self.string(self.get(id)?.name)
    }

    /// The type behind typedefs and modifiers.
    pub fn resolve(&self, mut id: u32) -> Result<u32, LoadError> {
        for _ in 0..MAX_CHAIN {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(malformed(format_args!("type {id}: modifier loop")))
    }

    /// The size in bytes of a value of type `id`.
    pub fn size_of(&self, id: u32) -> Result<u64, LoadError> {
        let mut factor: u64 = 1;
        let mut id = id;
        for _ in 0..MAX_CHAIN {
            let resolved = self.resolve(id)?;
            let t = self.get(resolved)?;
            let size = match t.kind {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_FLOAT | KIND_DATASEC
                | KIND_ENUM64 => u64::from(t.size_or_type),
                KIND_PTR => 8,
                KIND_ARRAY => {
                    let (elem, n) = t.array.unwrap_or_default();
                    factor = factor
                        .checked_mul(u64::from(n))
                        .ok_or_else(|| malformed("array size overflows"))?;
                    id = elem;
                    continue;
                }
                _ => return Err(malformed(format_args!("type {resolved} has no size"))),
            };
            return factor
                .checked_mul(size)
                .ok_or_else(|| malformed("type size overflows"));
        }
        Err(malformed(format_args!("type {id}: array nesting too deep")))
    }

    /// The data section type called `name`, if any.
    pub fn datasec(&self, name: &str) -> Result<Option<&Type>, LoadError> {
        for t in &self.types {
            if t.kind == KIND_DATASEC && self.string(t.name)? == name {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// The parameter count of the function called `name`, if BTF describes it.
    pub fn func_params(&self, name: &str) -> Option<u32> {
        self.types.iter().find_map(|t| {
            if t.kind != KIND_FUNC || self.string(t.name).ok()? != name {
                return None;
            }
            let proto = self.get(t.size_or_type).ok()?;
            (proto.kind == KIND_FUNC_PROTO).then_some(proto.vlen)
        })
    }

    pub fn is_kind(&self, id: u32, kind: u32) -> Result<bool, LoadError> {
        Ok(self.get(id)?.kind == kind)
    }
}

/// Kinds the map parser asks about.
pub(super) const PTR: u32 = KIND_PTR;
pub(super) const ARRAY: u32 = KIND_ARRAY;
pub(super) const STRUCT: u32 = KIND_STRUCT;
pub(super) const VAR: u32 = KIND_VAR;
pub(super) const FUNC_PROTO: u32 = KIND_FUNC_PROTO;

fn parse_types(data: &[u8]) -> Result<Vec<Type>, LoadError> {
    let r = Reader::new(data);
    let mut types = vec![Type {
        kind: 0,
        name: 0,
        size_or_type: 0,
        array: None,
        members: Vec::new(),
        secinfo: Vec::new(),
        vlen: 0,
    }];
    let mut off = 0usize;
    while off < data.len() {
        let id = types.len();
        let truncated = || malformed(format_args!("type {id} is truncated"));
        let name = r.u32_at(off).ok_or_else(truncated)?;
        let info = r.u32_at(off + 4).ok_or_else(truncated)?;
        let size_or_type = r.u32_at(off + 8).ok_or_else(truncated)?;
        off += 12;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let mut t = Type {
            kind,
            name,
            size_or_type,
            array: None,
            members: Vec::new(),
            secinfo: Vec::new(),
            vlen: vlen as u32,
        };
        // Bytes of kind-specific data after the common part; the entries are read below.
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
            | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
            k => return Err(malformed(format_args!("type {id} has unknown kind {k}"))),
        };
        let body = r.slice(off, extra).ok_or_else(truncated)?;
        let b = Reader::new(body);
        let word = |i: usize| b.u32_at(4 * i).unwrap_or_default();
        match kind {
            KIND_ARRAY => t.array = Some((word(0), word(2))),
            KIND_STRUCT | KIND_UNION => {
                let bitfields = info & (1 << 31) != 0;
                t.members = (0..vlen)
                    .map(|i| Member {
                        name: word(3 * i),
                        ty: word(3 * i + 1),
                        bit_offset: if bitfields {
                            word(3 * i + 2) & 0x00ff_ffff
                        } else {
                            word(3 * i + 2)
                        },
                    })
                    .collect();
            }
            KIND_DATASEC => {
                t.secinfo = (0..vlen)
                    .map(|i| VarSecinfo {
                        ty: word(3 * i),
                        size: word(3 * i + 2),
                    })
                    .collect();
            }
            _ => {}
        }
        off += extra;
        types.push(t);
    }
    Ok(types)
}

/// BPF_CORE_TYPE_ID_LOCAL: the id of a type in the program's own BTF, already right as
/// compiled; the one CO-RE relocation kind that needs no kernel BTF.
pub(super) const CORE_TYPE_ID_LOCAL: u32 = 6;

/// One CO-RE relocation record of `.BTF.ext`.
pub(super) struct CoreRelo {
    pub section: String,
    /// Byte offset of the instruction in its section.
    pub insn_off: u32,
    pub type_id: u32,
    pub kind: u32,
}

/// The name of a CO-RE relocation kind (`enum bpf_core_relo_kind`).
pub(super) fn core_kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "field byte offset",
        1 => "field byte size",
        2 => "field exists",
        3 => "field signedness",
        4 => "field left shift",
        5 => "field right shift",
        6 => "local type id",
        7 => "target type id",
        8 => "type exists",
        9 => "type size",
        10 => "enum value exists",
        11 => "enum value",
        12 => "type matches",
        _ => "unknown kind",
    }
}

/// The CO-RE relocation records of a `.BTF.ext` section (none when its header predates them).
pub(super) fn core_relos(ext: &[u8], btf: &Btf<'_>) -> Result<Vec<CoreRelo>, LoadError> {
    let malformed = |what: &str| LoadError::Malformed(format!("BTF.ext: {what}"));
    let r = Reader::new(ext);
    if r.u16_at(0).ok_or_else(|| malformed("truncated header"))? != BTF_MAGIC {
        return Err(malformed("bad magic"));
    }
    let hdr_len = r.u32_at(4).ok_or_else(|| malformed("truncated header"))? as usize;
    if hdr_len < 24 || hdr_len > ext.len() {
        return Err(malformed("bad header length"));
    }
    if hdr_len < 32 {
        return Ok(Vec::new());
    }
    let (off, len) = match (r.u32_at(24), r.u32_at(28)) {
        (Some(off), Some(len)) => (off as usize, len as usize),
        _ => return Err(malformed("truncated header")),
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let data = hdr_len
        .checked_add(off)
        .and_then(|start| r.slice(start, len))
        .ok_or_else(|| malformed("CO-RE relocations out of bounds"))?;
    let d = Reader::new(data);
    let rec_size = d
        .u32_at(0)
        .ok_or_else(|| malformed("truncated CO-RE relocations"))? as usize;
    if rec_size < 16 {
        return Err(malformed("CO-RE relocation records shorter than 16 bytes"));
    }
    let mut relos = Vec::new();
    let mut pos = 4usize;
    while pos < data.len() {
        let (name_off, count) = match (d.u32_at(pos), d.u32_at(pos + 4)) {
            (Some(a), Some(b)) => (a, b as usize),
            _ => return Err(malformed("truncated CO-RE relocation section info")),
        };
        pos += 8;
        let section = btf.string(name_off)?;
        let bytes = count
            .checked_mul(rec_size)
            .filter(|&n| d.slice(pos, n).is_some())
            .ok_or_else(|| malformed("CO-RE relocation records out of bounds"))?;
        for i in 0..count {
            let at = pos + i * rec_size;
            let field = |k: usize| d.u32_at(at + 4 * k).unwrap_or_default();
            relos.push(CoreRelo {
                section: section.clone(),
                insn_off: field(0),
                type_id: field(1),
                kind: field(3),
            });
        }
        pos += bytes;
    }
    Ok(relos)
}
