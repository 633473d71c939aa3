//! Assembler and disassembler for the conformance suite's eBPF assembly dialect.
//!
//! One instruction per line; `#` starts a comment. Examples of every form:
//!
//! ```text
//! mov %r0, 1          add32 %r0, %r1       neg %r2        movsx832 %r0, %r1
//! le16 %r0            be64 %r0             bswap32 %r0    (swap16 = bswap16)
//! lddw %r0, 0x1122334455667788
//! ldxw %r0, [%r1+2]   ldxsb %r0, [%r10-1]  stw [%r1], -1  stxdw [%r10-8], %r1
//! lock add [%r10-8], %r1   lock fetch xor32 [%r1+4], %r2   lock xchg [%r1], %r2
//! lock cmpxchg32 [%r1], %r2   (32 suffix: 32-bit memory word; none: 64-bit)
//! ldacqdw %r0, [%r1+0]     streldw [%r1+0], %r2
//! ja +1   ja32 L1   jeq %r1, 0x2, L3   jsgt32 %r1, %r2, -4
//! call 5   call local func   call local +3   call %r2   exit
//! L3:                 # a label on its own line
//! L4: mov %r0, 0      # or in front of an instruction
//! ```
//!
//! Jump offsets count 8-byte slots from the next instruction, so labels account for `lddw` taking
//! two. As in the suite's own assembler, the target `exit` names the first `exit` instruction
//! unless a label `exit:` is defined.
//!
//! [`assemble`] checks syntax and operand ranges only, so it can also build instructions the ISA
//! rejects (e.g. a write to r10) for negative tests; [`assemble_program`] applies the full
//! validation of [`isa`].

use std::collections::HashMap;

use thiserror::Error;

use crate::isa::{
    self, AluOp, AtomicOp, DecodeErrorKind, Endian, Insn, JmpCond, Program, Reg, Size, Source,
    Width,
};

/// An assembly error: the 1-based source line and what was wrong there.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {kind}")]
pub struct AsmError {
    /// 1-based source line of the error.
    pub line: usize,
    /// What was wrong on that line.
    pub kind: AsmErrorKind,
}

/// What went wrong on a line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AsmErrorKind {
    /// The line's first word (as written), which is no instruction of the dialect.
    #[error(
        "unknown mnemonic `{0}`; expected an instruction such as `mov`, `add32`, `lddw`, `ldxw`, \
         `stxdw`, `jeq`, `ja`, `call`, `lock add` or `exit`"
    )]
    UnknownMnemonic(String),
    /// `found` is the offending text in backticks, or "end of line".
    #[error("expected {expected}, found {found}")]
    Expected {
        /// What the parser wanted at that point, e.g. "`,` and another operand".
        expected: &'static str,
        /// The text found instead.
        found: String,
    },
    /// The operand text, which looks like a register but names none of %r0–%r10.
    #[error("`{0}` is not a register; expected %r0 to %r10")]
    BadRegister(String),
    /// A number does not fit its immediate field.
    #[error("immediate `{value}` is out of range; expected {expected}")]
    ImmediateOutOfRange {
        /// The number as written.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },
    /// The memory offset as written, with its sign, which does not fit 16 signed bits.
    #[error("memory offset `{0}` is out of range; expected -32768..=32767 (16-bit signed)")]
    OffsetOutOfRange(String),
    /// A jump or local-call offset does not fit the instruction's offset field.
    #[error("jump offset {offset} does not fit the instruction; expected {expected}")]
    JumpOutOfRange {
        /// The offset in slots from the next instruction (`i128::MIN` / `MAX` if even that
        /// overflowed).
        offset: i128,
        /// The range the instruction accepts.
        expected: &'static str,
    },
    /// The label a jump or call names, which is defined nowhere.
    #[error("undefined label `{0}`; expected a label defined as `{0}:` somewhere in the program")]
    UndefinedLabel(String),
    /// A label is defined twice.
    #[error("label `{name}` is already defined on line {first_line}; expected unique labels")]
    DuplicateLabel {
        /// The label.
        name: String,
        /// Line of its first definition (1-based).
        first_line: usize,
    },
    /// Syntactically fine, but the ISA rejects it (reported by [`assemble_program`] only).
    #[error("invalid instruction: {0}")]
    Invalid(DecodeErrorKind),
}

/// Assembles `src` into instructions. Checks syntax, labels and field ranges, not ISA rules.
pub fn assemble(src: &str) -> Result<Vec<Insn>, AsmError> {
    assemble_with_lines(src).map(|(insns, _)| insns)
}

/// Assembles `src` and validates the result as a whole program: every instruction must decode
/// (e.g. no writes to r10) and [`Program::new`] must accept it (jump targets, final `exit`).
pub fn assemble_program(src: &str) -> Result<Program, AsmError> {
    let (insns, lines) = assemble_with_lines(src)?;
    // Re-decoding the encoding applies exactly isa's rules instead of duplicating them here.
    for (insn, &line) in insns.iter().zip(&lines) {
        let (raw, n) = insn.to_raw();
        isa::decode_one(&raw[..n]).map_err(|kind| AsmError {
            line,
            kind: AsmErrorKind::Invalid(kind),
        })?;
    }
    let slots: Vec<usize> = insns
        .iter()
        .scan(0, |slot, insn| {
            let here = *slot;
            *slot += insn.slots();
            Some(here)
        })
        .collect();
    Program::new(insns).map_err(|e| {
        // Errors name a slot; report the line of the instruction there, else the last line.
        let line = slots
            .iter()
            .position(|&s| s == e.index)
            .and_then(|i| lines.get(i).copied())
            .unwrap_or_else(|| src.lines().count().max(1));
        AsmError {
            line,
            kind: AsmErrorKind::Invalid(e.kind),
        }
    })
}

/// Disassembles `insns`, one line each (newline-terminated), in the dialect [`assemble`] reads.
pub fn disassemble(insns: &[Insn]) -> String {
    let mut out = String::new();
    for insn in insns {
        out.push_str(&disassemble_insn(insn));
        out.push('\n');
    }
    out
}

/// One instruction as a line of text, without newline. Every instruction the ISA accepts
/// assembles back to itself.
pub fn disassemble_insn(insn: &Insn) -> String {
    match *insn {
        Insn::Alu {
            width,
            op,
            dst,
            src,
        } => format!("{} {dst}, {}", alu_mnemonic(op, width), source(src)),
        Insn::Neg { width, dst } => format!("neg{} {dst}", suffix32(width)),
        Insn::Endian { kind, bits, dst } => {
            let name = match kind {
                Endian::Le => "le",
                Endian::Be => "be",
                Endian::Swap => "bswap",
            };
            format!("{name}{bits} {dst}")
        }
        Insn::LoadImm64 { dst, imm } => format!("lddw {dst}, {imm:#x}"),
        Insn::Load {
            size,
            signed,
            dst,
            base,
            off,
        } => {
            let s = if signed { "s" } else { "" };
            format!("ldx{s}{} {dst}, {}", size_name(size), mem(base, off))
        }
        Insn::Store {
            size,
            base,
            off,
            src,
        } => match src {
            Source::Reg(r) => format!("stx{} {}, {r}", size_name(size), mem(base, off)),
            Source::Imm(i) => format!("st{} {}, {i}", size_name(size), mem(base, off)),
        },
        Insn::Atomic {
            size,
            op,
            base,
            off,
            src,
        } => {
            let name = match op {
                AtomicOp::Add => "add",
                AtomicOp::Or => "or",
                AtomicOp::And => "and",
                AtomicOp::Xor => "xor",
                AtomicOp::FetchAdd => "fetch add",
                AtomicOp::FetchOr => "fetch or",
                AtomicOp::FetchAnd => "fetch and",
                AtomicOp::FetchXor => "fetch xor",
                AtomicOp::Xchg => "xchg",
                AtomicOp::CmpXchg => "cmpxchg",
            };
            let w = if size == Size::W { "32" } else { "" };
            format!("lock {name}{w} {}, {src}", mem(base, off))
        }
        Insn::LoadAcquire {
            size,
            dst,
            base,
            off,
        } => format!("ldacq{} {dst}, {}", size_name(size), mem(base, off)),
        Insn::StoreRelease {
            size,
            base,
            off,
            src,
        } => format!("strel{} {}, {src}", size_name(size), mem(base, off)),
        Insn::Ja { off } => format!("ja {off:+}"),
        Insn::Ja32 { off } => format!("ja32 {off:+}"),
        Insn::Jump {
            width,
            cond,
            dst,
            src,
            off,
        } => format!(
            "{}{} {dst}, {}, {off:+}",
            cond_name(cond),
            suffix32(width),
            source(src)
        ),
        Insn::Call { id } => format!("call {id}"),
        Insn::CallLocal { off } => format!("call local {off:+}"),
        Insn::CallX { reg } => format!("call {reg}"),
        Insn::Exit => "exit".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Names shared by the assembler and the disassembler.

/// Operations spelled `NAME` / `NAME32`; the sign-extending moves have their own names.
const ALU_OPS: [AluOp; 14] = [
    AluOp::Add,
    AluOp::Sub,
    AluOp::Mul,
    AluOp::Div,
    AluOp::SDiv,
    AluOp::Or,
    AluOp::And,
    AluOp::Lsh,
    AluOp::Rsh,
    AluOp::Mod,
    AluOp::SMod,
    AluOp::Xor,
    AluOp::Mov,
    AluOp::Arsh,
];

fn alu_name(op: AluOp) -> &'static str {
    match op {
        AluOp::Add => "add",
        AluOp::Sub => "sub",
        AluOp::Mul => "mul",
        AluOp::Div => "div",
        AluOp::SDiv => "sdiv",
        AluOp::Or => "or",
        AluOp::And => "and",
        AluOp::Lsh => "lsh",
        AluOp::Rsh => "rsh",
        AluOp::Mod => "mod",
        AluOp::SMod => "smod",
        AluOp::Xor => "xor",
        AluOp::Mov => "mov",
        AluOp::Arsh => "arsh",
        AluOp::MovSx8 => "movsx8",
        AluOp::MovSx16 => "movsx16",
        AluOp::MovSx32 => "movsx32",
    }
}

/// `movsxAB`: sign-extend from A bits, B-bit operation.
const MOVSX: [(&str, Width, AluOp); 5] = [
    ("movsx832", Width::W32, AluOp::MovSx8),
    ("movsx1632", Width::W32, AluOp::MovSx16),
    ("movsx864", Width::W64, AluOp::MovSx8),
    ("movsx1664", Width::W64, AluOp::MovSx16),
    ("movsx3264", Width::W64, AluOp::MovSx32),
];

fn cond_name(cond: JmpCond) -> &'static str {
    match cond {
        JmpCond::Eq => "jeq",
        JmpCond::Gt => "jgt",
        JmpCond::Ge => "jge",
        JmpCond::Set => "jset",
        JmpCond::Ne => "jne",
        JmpCond::Sgt => "jsgt",
        JmpCond::Sge => "jsge",
        JmpCond::Lt => "jlt",
        JmpCond::Le => "jle",
        JmpCond::Slt => "jslt",
        JmpCond::Sle => "jsle",
    }
}

const SIZES: [Size; 4] = [Size::B, Size::H, Size::W, Size::DW];

fn size_name(size: Size) -> &'static str {
    match size {
        Size::B => "b",
        Size::H => "h",
        Size::W => "w",
        Size::DW => "dw",
    }
}

fn alu_mnemonic(op: AluOp, width: Width) -> String {
    match op {
        // `movsxAB`: from A bits, B-bit operation (movsx3232 is invalid but printed alike).
        AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32 => {
            let to = if width == Width::W32 { 32 } else { 64 };
            format!("{}{to}", alu_name(op))
        }
        _ => format!("{}{}", alu_name(op), suffix32(width)),
    }
}

fn suffix32(width: Width) -> &'static str {
    match width {
        Width::W32 => "32",
        Width::W64 => "",
    }
}

fn source(src: Source) -> String {
    match src {
        Source::Reg(r) => r.to_string(),
        Source::Imm(i) => i.to_string(),
    }
}

fn mem(base: Reg, off: i16) -> String {
    if off < 0 {
        // Via i32 so that -(-32768) does not overflow.
        format!("[{base}-{}]", -i32::from(off))
    } else {
        format!("[{base}+{off}]")
    }
}

// ---------------------------------------------------------------------------------------------
// Assembler.

/// A parsed instruction whose offset may still name a label.
struct Pending {
    insn: Insn,
    line: usize,
    slot: usize,
    label: Option<String>,
}

/// Where a jump goes, as written.
enum Target {
    Offset(i128),
    Label(String),
}

fn assemble_with_lines(src: &str) -> Result<(Vec<Insn>, Vec<usize>), AsmError> {
    let mut pending = Vec::new();
    // name -> (slot, line of definition)
    let mut labels: HashMap<String, (usize, usize)> = HashMap::new();
    let mut first_exit = None;
    let mut slot = 0;
    for (i, raw_line) in src.lines().enumerate() {
        let line = i + 1;
        let err = |kind| AsmError { line, kind };
        let mut text = raw_line.split_once('#').map_or(raw_line, |(t, _)| t).trim();
        // No instruction uses `:`, so each one ends a label.
        while let Some((name, rest)) = text.split_once(':') {
            let name = name.trim();
            if !is_ident(name) {
                return Err(err(AsmErrorKind::Expected {
                    expected: "a label name (letters, digits, `_`, `.`; not starting with a digit) \
                               before `:`",
                    found: show(name),
                }));
            }
            if let Some(&(_, first_line)) = labels.get(name) {
                return Err(err(AsmErrorKind::DuplicateLabel {
                    name: name.to_string(),
                    first_line,
                }));
            }
            labels.insert(name.to_string(), (slot, line));
            text = rest.trim();
        }
        if text.is_empty() {
            continue;
        }
        let (insn, label) = parse_insn(text).map_err(err)?;
        if insn == Insn::Exit && first_exit.is_none() {
            first_exit = Some(slot);
        }
        pending.push(Pending {
            insn,
            line,
            slot,
            label,
        });
        slot += insn.slots();
    }

    let mut insns = Vec::with_capacity(pending.len());
    let mut lines = Vec::with_capacity(pending.len());
    for mut p in pending {
        if let Some(name) = p.label {
            let target = match labels.get(&name) {
                Some(&(s, _)) => Some(s),
                None if name == "exit" => first_exit,
                None => None,
            };
            let err = |kind| AsmError { line: p.line, kind };
            let target = target.ok_or_else(|| err(AsmErrorKind::UndefinedLabel(name)))?;
            let off = target as i128 - (p.slot as i128 + 1);
            set_offset(&mut p.insn, off).map_err(err)?;
        }
        insns.push(p.insn);
        lines.push(p.line);
    }
    Ok((insns, lines))
}

/// Stores a slot offset in a jump or local call, checking it fits the field.
fn set_offset(insn: &mut Insn, value: i128) -> Result<(), AsmErrorKind> {
    match insn {
        Insn::Ja { off } | Insn::Jump { off, .. } => {
            *off = i16::try_from(value).map_err(|_| AsmErrorKind::JumpOutOfRange {
                offset: value,
                expected: "-32768..=32767 slots (16-bit offset; `ja32` reaches further)",
            })?;
        }
        Insn::Ja32 { off } | Insn::CallLocal { off } => {
            *off = i32::try_from(value).map_err(|_| AsmErrorKind::JumpOutOfRange {
                offset: value,
                expected: "-2147483648..=2147483647 slots (32-bit offset)",
            })?;
        }
        // Only called for instructions built with a target.
        _ => {}
    }
    Ok(())
}

/// Attaches a target to a freshly parsed jump: offsets now, labels after all lines are read.
fn with_target(mut insn: Insn, target: Target) -> Result<(Insn, Option<String>), AsmErrorKind> {
    match target {
        Target::Offset(v) => {
            set_offset(&mut insn, v)?;
            Ok((insn, None))
        }
        Target::Label(name) => Ok((insn, Some(name))),
    }
}

/// Instruction shapes selected by the mnemonic alone.
enum Form {
    Alu(Width, AluOp),
    Neg(Width),
    Endian(Endian, u8),
    Jump(Width, JmpCond),
    Load(Size, bool),
    Store(Size),
    StoreX(Size),
    LoadAcquire(Size),
    StoreRelease(Size),
}

fn form(m: &str) -> Option<Form> {
    if let Some(&(_, w, op)) = MOVSX.iter().find(|(n, _, _)| *n == m) {
        return Some(Form::Alu(w, op));
    }
    for (prefix, kind) in [
        ("le", Endian::Le),
        ("be", Endian::Be),
        ("bswap", Endian::Swap),
        ("swap", Endian::Swap),
    ] {
        match m.strip_prefix(prefix) {
            Some("16") => return Some(Form::Endian(kind, 16)),
            Some("32") => return Some(Form::Endian(kind, 32)),
            Some("64") => return Some(Form::Endian(kind, 64)),
            _ => {}
        }
    }
    let (base, width) = m
        .strip_suffix("32")
        .map_or((m, Width::W64), |b| (b, Width::W32));
    if base == "neg" {
        return Some(Form::Neg(width));
    }
    if let Some(&op) = ALU_OPS.iter().find(|&&op| alu_name(op) == base) {
        return Some(Form::Alu(width, op));
    }
    if let Some(&cond) = JmpCond::ALL.iter().find(|&&c| cond_name(c) == base) {
        return Some(Form::Jump(width, cond));
    }
    let size = |rest: &str| SIZES.into_iter().find(|&s| size_name(s) == rest);
    // Longer prefixes first: `ldxs` before `ldx`, `stx`/`strel` before `st`.
    if let Some(s) = m.strip_prefix("ldxs").and_then(size) {
        // There is no sign-extending 64-bit load.
        return (s != Size::DW).then_some(Form::Load(s, true));
    }
    if let Some(s) = m.strip_prefix("ldx").and_then(size) {
        return Some(Form::Load(s, false));
    }
    if let Some(s) = m.strip_prefix("ldacq").and_then(size) {
        return Some(Form::LoadAcquire(s));
    }
    if let Some(s) = m.strip_prefix("strel").and_then(size) {
        return Some(Form::StoreRelease(s));
    }
    if let Some(s) = m.strip_prefix("stx").and_then(size) {
        return Some(Form::StoreX(s));
    }
    if let Some(s) = m.strip_prefix("st").and_then(size) {
        return Some(Form::Store(s));
    }
    None
}

/// Parses one instruction (comment and labels already removed, non-empty).
fn parse_insn(text: &str) -> Result<(Insn, Option<String>), AsmErrorKind> {
    let (word, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let mnemonic = word.to_ascii_lowercase();
    let mut c = Cursor { s: rest };
    let (insn, label) = match mnemonic.as_str() {
        "exit" => (Insn::Exit, None),
        "lddw" => {
            let dst = c.reg()?;
            c.comma()?;
            let imm = c.imm64()?;
            (Insn::LoadImm64 { dst, imm }, None)
        }
        "ja" => with_target(Insn::Ja { off: 0 }, c.target()?)?,
        "ja32" => with_target(Insn::Ja32 { off: 0 }, c.target()?)?,
        "call" => parse_call(&mut c)?,
        "lock" => (parse_lock(&mut c)?, None),
        m => {
            let form = form(m).ok_or_else(|| AsmErrorKind::UnknownMnemonic(word.to_string()))?;
            parse_form(form, &mut c)?
        }
    };
    c.end()?;
    Ok((insn, label))
}

fn parse_form(form: Form, c: &mut Cursor<'_>) -> Result<(Insn, Option<String>), AsmErrorKind> {
    let insn = match form {
        Form::Alu(width, op) => {
            let dst = c.reg()?;
            c.comma()?;
            let src = if matches!(op, AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32) {
                if !c.at_reg() {
                    return Err(c.expected("a source register (movsx has no immediate form)"));
                }
                Source::Reg(c.reg()?)
            } else {
                c.reg_or_imm()?
            };
            Insn::Alu {
                width,
                op,
                dst,
                src,
            }
        }
        Form::Neg(width) => Insn::Neg {
            width,
            dst: c.reg()?,
        },
        Form::Endian(kind, bits) => Insn::Endian {
            kind,
            bits,
            dst: c.reg()?,
        },
        Form::Jump(width, cond) => {
            let dst = c.reg()?;
            c.comma()?;
            let src = c.reg_or_imm()?;
            c.comma()?;
            let target = c.target()?;
            return with_target(
                Insn::Jump {
                    width,
                    cond,
                    dst,
                    src,
                    off: 0,
                },
                target,
            );
        }
        Form::Load(size, signed) => {
            let dst = c.reg()?;
            c.comma()?;
            let (base, off) = c.mem()?;
            Insn::Load {
                size,
                signed,
                dst,
                base,
                off,
            }
        }
        Form::Store(size) => {
            let (base, off) = c.mem()?;
            c.comma()?;
            let imm = c.imm32("an immediate (decimal, or hex with 0x)")?;
            Insn::Store {
                size,
                base,
                off,
                src: Source::Imm(imm),
            }
        }
        Form::StoreX(size) => {
            let (base, off) = c.mem()?;
            c.comma()?;
            let src = c.reg()?;
            Insn::Store {
                size,
                base,
                off,
                src: Source::Reg(src),
            }
        }
        Form::LoadAcquire(size) => {
            let dst = c.reg()?;
            c.comma()?;
            let (base, off) = c.mem()?;
            Insn::LoadAcquire {
                size,
                dst,
                base,
                off,
            }
        }
        Form::StoreRelease(size) => {
            let (base, off) = c.mem()?;
            c.comma()?;
            let src = c.reg()?;
            Insn::StoreRelease {
                size,
                base,
                off,
                src,
            }
        }
    };
    Ok((insn, None))
}

/// `call N`, `call helper N`, `call local TARGET`, `call %rN`.
fn parse_call(c: &mut Cursor<'_>) -> Result<(Insn, Option<String>), AsmErrorKind> {
    let save = c.s;
    let word = c.word().to_ascii_lowercase();
    match word.as_str() {
        "local" => with_target(Insn::CallLocal { off: 0 }, c.target()?),
        "helper" => {
            let id = c.imm32("a helper id")? as u32;
            Ok((Insn::Call { id }, None))
        }
        _ => {
            c.s = save;
            if c.at_reg() {
                return Ok((Insn::CallX { reg: c.reg()? }, None));
            }
            let id = c.imm32("a helper id, `local` and a target, or a register")? as u32;
            Ok((Insn::Call { id }, None))
        }
    }
}

/// `lock [fetch] OP[32] [%rB+off], %rS`.
fn parse_lock(c: &mut Cursor<'_>) -> Result<Insn, AsmErrorKind> {
    const WHAT: &str = "an atomic operation after `lock`: add, and, or, xor (each optionally after \
                        `fetch`), xchg or cmpxchg, with `32` for 32-bit";
    let save = c.s;
    let mut word = c.word().to_ascii_lowercase();
    let fetch = word == "fetch";
    if fetch {
        word = c.word().to_ascii_lowercase();
    }
    let (name, size) = word
        .strip_suffix("32")
        .map_or((word.as_str(), Size::DW), |b| (b, Size::W));
    let op = match (name, fetch) {
        ("add", false) => AtomicOp::Add,
        ("or", false) => AtomicOp::Or,
        ("and", false) => AtomicOp::And,
        ("xor", false) => AtomicOp::Xor,
        ("add", true) => AtomicOp::FetchAdd,
        ("or", true) => AtomicOp::FetchOr,
        ("and", true) => AtomicOp::FetchAnd,
        ("xor", true) => AtomicOp::FetchXor,
        ("xchg", false) => AtomicOp::Xchg,
        ("cmpxchg", false) => AtomicOp::CmpXchg,
        _ => {
            c.s = save;
            return Err(c.expected(WHAT));
        }
    };
    let (base, off) = c.mem()?;
    c.comma()?;
    let src = c.reg()?;
    Ok(Insn::Atomic {
        size,
        op,
        base,
        off,
        src,
    })
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && chars.all(is_ident_char)
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// How a piece of source text is shown in an error.
fn show(tok: &str) -> String {
    if tok.is_empty() {
        "end of line".to_string()
    } else {
        format!("`{tok}`")
    }
}

/// Why a number did not parse.
enum NumError {
    NotANumber,
    /// Valid digits, but beyond even `i128`.
    TooBig,
}

/// Decimal or `0x` hex, optionally signed.
fn parse_int(tok: &str) -> Result<i128, NumError> {
    let (neg, body) = if let Some(b) = tok.strip_prefix('-') {
        (true, b)
    } else {
        (false, tok.strip_prefix('+').unwrap_or(tok))
    };
    let (radix, digits) = match body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        Some(h) => (16, h),
        None => (10, body),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumError::NotANumber);
    }
    // The digits are valid, so the only possible failure left is overflow.
    let mag = u128::from_str_radix(digits, radix).map_err(|_| NumError::TooBig)?;
    let mag = i128::try_from(mag).map_err(|_| NumError::TooBig)?;
    Ok(if neg { -mag } else { mag })
}

/// Operand reader over the rest of a line.
struct Cursor<'a> {
    s: &'a str,
}

impl<'a> Cursor<'a> {
    fn skip_ws(&mut self) {
        self.s = self.s.trim_start();
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let end = self.s.find(|c: char| !f(c)).unwrap_or(self.s.len());
        let (tok, rest) = self.s.split_at(end);
        self.s = rest;
        tok
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        match self.s.strip_prefix(c) {
            Some(rest) => {
                self.s = rest;
                true
            }
            None => false,
        }
    }

    /// The next token, for error messages.
    fn found(&self) -> String {
        let s = self.s.trim_start();
        let end = s
            .find(|c: char| c.is_whitespace() || c == ',')
            .unwrap_or(s.len());
        if end == 0 {
            show(s.chars().next().map_or("", |c| &s[..c.len_utf8()]))
        } else {
            show(&s[..end])
        }
    }

    fn expected(&self, expected: &'static str) -> AsmErrorKind {
        AsmErrorKind::Expected {
            expected,
            found: self.found(),
        }
    }

    /// A bare word such as `local` or `fetch`.
    fn word(&mut self) -> &'a str {
        self.skip_ws();
        self.take_while(is_ident_char)
    }

    fn end(&mut self) -> Result<(), AsmErrorKind> {
        self.skip_ws();
        if self.s.is_empty() {
            Ok(())
        } else {
            Err(self.expected("end of line"))
        }
    }

    fn comma(&mut self) -> Result<(), AsmErrorKind> {
        if self.eat(',') {
            Ok(())
        } else {
            Err(self.expected("`,` and another operand"))
        }
    }

    /// Whether a register comes next (numbers never start with `%` or `r`).
    fn at_reg(&mut self) -> bool {
        self.skip_ws();
        self.s.starts_with(['%', 'r', 'R'])
    }

    fn reg(&mut self) -> Result<Reg, AsmErrorKind> {
        const WHAT: &str = "a register (%r0 to %r10)";
        self.skip_ws();
        if !self.at_reg() {
            return Err(self.expected(WHAT));
        }
        let tok = self.take_while(|c| c == '%' || is_ident_char(c));
        let body = tok.strip_prefix('%').unwrap_or(tok);
        let digits = body.strip_prefix(['r', 'R']).unwrap_or("");
        let valid = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !(digits.len() > 1 && digits.starts_with('0'));
        match digits
            .parse::<u8>()
            .ok()
            .filter(|_| valid)
            .and_then(Reg::new)
        {
            Some(r) => Ok(r),
            None => Err(AsmErrorKind::BadRegister(tok.to_string())),
        }
    }

    fn number_token(&mut self) -> &'a str {
        self.skip_ws();
        self.take_while(|c| !c.is_whitespace() && c != ',' && c != ']')
    }

    /// A 32-bit immediate: -2^31..2^32-1, stored as its bit pattern.
    fn imm32(&mut self, what: &'static str) -> Result<i32, AsmErrorKind> {
        const RANGE: &str = "a 32-bit value, -2147483648..=4294967295";
        let found = self.found();
        let tok = self.number_token();
        let out_of_range = || AsmErrorKind::ImmediateOutOfRange {
            value: tok.to_string(),
            expected: RANGE,
        };
        match parse_int(tok) {
            Ok(v) if (-(1i128 << 31)..(1i128 << 32)).contains(&v) => Ok(v as i64 as u32 as i32),
            Ok(_) | Err(NumError::TooBig) => Err(out_of_range()),
            Err(NumError::NotANumber) => Err(AsmErrorKind::Expected {
                expected: what,
                found,
            }),
        }
    }

    /// A 64-bit immediate: -2^63..2^64-1, stored as its bit pattern.
    fn imm64(&mut self) -> Result<u64, AsmErrorKind> {
        let found = self.found();
        let tok = self.number_token();
        let out_of_range = || AsmErrorKind::ImmediateOutOfRange {
            value: tok.to_string(),
            expected: "a 64-bit value, -9223372036854775808..=18446744073709551615",
        };
        match parse_int(tok) {
            Ok(v) if (-(1i128 << 63)..(1i128 << 64)).contains(&v) => Ok(v as u64),
            Ok(_) | Err(NumError::TooBig) => Err(out_of_range()),
            Err(NumError::NotANumber) => Err(AsmErrorKind::Expected {
                expected: "a 64-bit immediate (decimal, or hex with 0x)",
                found,
            }),
        }
    }

    fn reg_or_imm(&mut self) -> Result<Source, AsmErrorKind> {
        if self.at_reg() {
            Ok(Source::Reg(self.reg()?))
        } else {
            Ok(Source::Imm(self.imm32(
                "a register or an immediate (decimal, or hex with 0x)",
            )?))
        }
    }

    /// `[%rN]`, `[%rN+off]` or `[%rN-off]`.
    fn mem(&mut self) -> Result<(Reg, i16), AsmErrorKind> {
        if !self.eat('[') {
            return Err(self.expected("a memory operand such as [%r1+8] or [%r10-8]"));
        }
        let base = self.reg()?;
        let neg = if self.eat('-') {
            Some(true)
        } else if self.eat('+') {
            Some(false)
        } else {
            None
        };
        let off = match neg {
            None => 0,
            Some(neg) => {
                let found = self.found();
                self.skip_ws();
                let tok = self.take_while(|c| c.is_ascii_alphanumeric());
                let text = || format!("{}{tok}", if neg { '-' } else { '+' });
                let v = match parse_int(tok) {
                    Ok(v) => {
                        if neg {
                            -v
                        } else {
                            v
                        }
                    }
                    Err(NumError::TooBig) => return Err(AsmErrorKind::OffsetOutOfRange(text())),
                    Err(NumError::NotANumber) => {
                        return Err(AsmErrorKind::Expected {
                            expected: "a memory offset (decimal, or hex with 0x)",
                            found,
                        });
                    }
                };
                i16::try_from(v).map_err(|_| AsmErrorKind::OffsetOutOfRange(text()))?
            }
        };
        if !self.eat(']') {
            return Err(self.expected("`]` closing the memory operand"));
        }
        Ok((base, off))
    }

    /// A label, or a slot offset `+N` / `-N` from the next instruction.
    fn target(&mut self) -> Result<Target, AsmErrorKind> {
        const WHAT: &str = "a jump target: a label, or a slot offset such as +2 or -1";
        self.skip_ws();
        if self.s.starts_with(['+', '-']) {
            let found = self.found();
            let tok = self.number_token();
            return match parse_int(tok) {
                Ok(v) => Ok(Target::Offset(v)),
                Err(NumError::TooBig) => Err(AsmErrorKind::JumpOutOfRange {
                    offset: if tok.starts_with('-') {
                        i128::MIN
                    } else {
                        i128::MAX
                    },
                    expected: "an offset that fits the instruction's offset field",
                }),
                Err(NumError::NotANumber) => Err(AsmErrorKind::Expected {
                    expected: WHAT,
                    found,
                }),
            };
        }
        if self
            .s
            .starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '.')
        {
            return Ok(Target::Label(self.take_while(is_ident_char).to_string()));
        }
        Err(self.expected(WHAT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(src: &str) -> Vec<u8> {
        isa::encode_program(&assemble(src).expect("assembles"))
    }

    fn err(src: &str) -> AsmError {
        assemble(src).expect_err("should fail")
    }

    #[test]
    fn golden_bytes() {
        assert_eq!(bytes("mov %r0, 42"), [0xb7, 0, 0, 0, 42, 0, 0, 0]);
        assert_eq!(bytes("add32 %r1, %r2"), [0x0c, 0x21, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes("sdiv32 r1, r2"), [0x3c, 0x21, 1, 0, 0, 0, 0, 0]);
        assert_eq!(bytes("movsx1664 %r3, %r4"), [0xbf, 0x43, 16, 0, 0, 0, 0, 0]);
        assert_eq!(bytes("neg32 %r2"), [0x84, 0x02, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes("be16 %r3"), [0xdc, 0x03, 0, 0, 16, 0, 0, 0]);
        assert_eq!(bytes("swap64 %r3"), bytes("bswap64 %r3"));
        assert_eq!(bytes("bswap64 %r3"), [0xd7, 0x03, 0, 0, 64, 0, 0, 0]);
        assert_eq!(
            bytes("lddw %r0, 0x1122334455667788"),
            [
                0x18, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0, 0, 0, 0, 0x44, 0x33, 0x22, 0x11
            ]
        );
        assert_eq!(bytes("lddw %r0, -1"), bytes("lddw %r0, 0xFFFFFFFFFFFFFFFF"));
        assert_eq!(
            bytes("ldxsw %r0, [%r10-4]"),
            [0x81, 0xa0, 0xfc, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(bytes("ldxh %r0, [%r1+0x2]"), [0x69, 0x10, 2, 0, 0, 0, 0, 0]);
        assert_eq!(
            bytes("stw [%r1+2], -1"),
            [0x62, 0x01, 2, 0, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            bytes("stxdw [%r10-8], %r1"),
            [0x7b, 0x1a, 0xf8, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(
            bytes("lock cmpxchg [%r10-8], %r1"),
            [0xdb, 0x1a, 0xf8, 0xff, 0xf1, 0, 0, 0]
        );
        assert_eq!(
            bytes("lock fetch add32 [%r10-4], %r1"),
            [0xc3, 0x1a, 0xfc, 0xff, 0x01, 0, 0, 0]
        );
        assert_eq!(bytes("ldacqdw %r0, [%r1]"), [0xdb, 0x10, 0, 0, 0, 1, 0, 0]);
        assert_eq!(
            bytes("strelw [%r1+4], %r2"),
            [0xc3, 0x21, 4, 0, 0x10, 1, 0, 0]
        );
        assert_eq!(
            bytes("jeq %r1, 0x80000000, +1"),
            [0x15, 0x01, 1, 0, 0, 0, 0, 0x80]
        );
        assert_eq!(
            bytes("jsgt32 %r1, %r2, -1"),
            [0x6e, 0x21, 0xff, 0xff, 0, 0, 0, 0]
        );
        assert_eq!(bytes("ja32 -3"), [0x06, 0, 0, 0, 0xfd, 0xff, 0xff, 0xff]);
        assert_eq!(bytes("call 5"), [0x85, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(bytes("call local +3"), [0x85, 0x10, 0, 0, 3, 0, 0, 0]);
        assert_eq!(bytes("call %r2"), [0x8d, 0x02, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes("exit # done"), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn labels_count_slots() {
        // The lddw between the jump and its label takes two slots.
        let src = "ja end\nlddw %r0, 1\nend: exit\n";
        let insns = assemble(src).unwrap();
        assert_eq!(insns[0], Insn::Ja { off: 2 });
        // Backward jump, label on its own line, local call.
        let src = "top:\n  mov %r0, 0 # c\n  jne %r0, 0, top\n  call local f\n  exit\nf:\n  exit";
        let insns = assemble(src).unwrap();
        assert_eq!(insns[1].jump_target(1), Some(0));
        assert_eq!(insns[2], Insn::CallLocal { off: 1 });
        assert!(assemble_program(src).is_ok());
        // `exit` as a target means the first exit instruction unless defined as a label.
        let insns = assemble("jeq %r1, 0, exit\nmov %r0, 1\nexit\nexit").unwrap();
        assert_eq!(insns[0].jump_target(0), Some(2));
        let insns = assemble("ja exit\nexit\nexit:\nexit").unwrap();
        assert_eq!(insns[0], Insn::Ja { off: 1 });
    }

    fn check(src: &str, line: usize, kind: AsmErrorKind) {
        let e = err(src);
        assert_eq!(e, AsmError { line, kind }, "{src:?}: {e}");
    }

    #[test]
    fn errors_name_line_and_kind() {
        check(
            "mov %r0, 1\nfrob %r0\nexit",
            2,
            AsmErrorKind::UnknownMnemonic("frob".into()),
        );
        check(
            "\n\nmov %r11, 1",
            3,
            AsmErrorKind::BadRegister("%r11".into()),
        );
        check(
            "mov %r0,",
            1,
            AsmErrorKind::Expected {
                expected: "a register or an immediate (decimal, or hex with 0x)",
                found: "end of line".into(),
            },
        );
        check(
            "exit\nadd %r0",
            2,
            AsmErrorKind::Expected {
                expected: "`,` and another operand",
                found: "end of line".into(),
            },
        );
        check(
            "exit\nexit\nja nowhere",
            3,
            AsmErrorKind::UndefinedLabel("nowhere".into()),
        );
        check(
            "a:\nexit\na: exit",
            3,
            AsmErrorKind::DuplicateLabel {
                name: "a".into(),
                first_line: 1,
            },
        );
        check(
            "mov %r0, 0x100000000",
            1,
            AsmErrorKind::ImmediateOutOfRange {
                value: "0x100000000".into(),
                expected: "a 32-bit value, -2147483648..=4294967295",
            },
        );
        check(
            "mov32 %r0, -2147483649",
            1,
            AsmErrorKind::ImmediateOutOfRange {
                value: "-2147483649".into(),
                expected: "a 32-bit value, -2147483648..=4294967295",
            },
        );
        check(
            "exit\nldxw %r0, [%r1+32768]",
            2,
            AsmErrorKind::OffsetOutOfRange("+32768".into()),
        );
        check(
            "stw [%r10-0x8001], 1",
            1,
            AsmErrorKind::OffsetOutOfRange("-0x8001".into()),
        );
        assert!(matches!(
            err("ja +32768").kind,
            AsmErrorKind::JumpOutOfRange { offset: 32768, .. }
        ));
        assert!(assemble("ja32 +32768").is_ok());
        check(
            "mov %r0, 1 2",
            1,
            AsmErrorKind::Expected {
                expected: "end of line",
                found: "`2`".into(),
            },
        );
        check(
            "movsx832 %r0, 5",
            1,
            AsmErrorKind::Expected {
                expected: "a source register (movsx has no immediate form)",
                found: "`5`".into(),
            },
        );
        assert!(matches!(
            err("lock fetch xchg [%r1], %r2").kind,
            AsmErrorKind::Expected { .. }
        ));
        assert!(matches!(
            err("ldxsdw %r0, [%r1]").kind,
            AsmErrorKind::UnknownMnemonic(_)
        ));
        assert!(matches!(
            err("9x: exit").kind,
            AsmErrorKind::Expected { .. }
        ));
        assert_eq!(
            err("mov %r11, 1").to_string(),
            "line 1: `%r11` is not a register; expected %r0 to %r10"
        );
    }

    #[test]
    fn program_validation_maps_lines() {
        let e = assemble_program("mov %r0, 1\nmov %r10, 1\nexit").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(
            e.kind,
            AsmErrorKind::Invalid(DecodeErrorKind::FramePointerWrite)
        );
        let e = assemble_program("mov %r0, 1\n\nja +5\nexit").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(matches!(
            e.kind,
            AsmErrorKind::Invalid(DecodeErrorKind::JumpOutOfProgram { .. })
        ));
        let e = assemble_program("exit\nmov %r0, 1 # falls off").unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.kind, AsmErrorKind::Invalid(DecodeErrorKind::FallsOffEnd));
        let e = assemble_program("# nothing\n").unwrap_err();
        assert_eq!(e.kind, AsmErrorKind::Invalid(DecodeErrorKind::Empty));
    }

    #[test]
    fn disassembly_format() {
        let src = "mov32 %r0, -3\nlddw %r1, 0xff\nldxb %r2, [%r1-1]\nstdw [%r10+0], 7\n\
                   lock fetch or32 [%r1+4], %r3\njne32 %r1, %r2, +0\ncall local -2\nexit\n";
        let insns = assemble(src).unwrap();
        assert_eq!(disassemble(&insns), src);
        assert_eq!(
            disassemble_insn(&Insn::Load {
                size: Size::DW,
                signed: false,
                dst: Reg::R0,
                base: Reg::R1,
                off: i16::MIN,
            }),
            "ldxdw %r0, [%r1-32768]"
        );
    }
}
