//! The eBPF instruction set (RFC 9669 plus later additions) as a typed model, with exact encoding to
//! and decoding from the 8-byte wire format.
//!
//! Offsets in jumps and local calls count 8-byte *slots*, as on the wire: `lddw` takes two slots, every
//! other instruction one. [`decode_program`] validates a whole program (registers, reserved fields,
//! jump targets) so that later layers — interpreter and JITs — can trust what they are given.

use thiserror::Error;

mod bounds;
mod dataflow;
mod reach;

pub use reach::StackReach;

/// Size in bytes of one instruction slot.
pub const INSN_SIZE: usize = 8;
/// Highest register number; r10 is the read-only frame pointer.
pub const MAX_REG: u8 = 10;

/// One of the eleven eBPF registers r0–r10.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg(u8);

impl Reg {
    /// Return value of the program, of helpers and of BPF-to-BPF calls.
    pub const R0: Reg = Reg(0);
    /// First call argument; at entry, the address of the input memory (0 if it is empty).
    pub const R1: Reg = Reg(1);
    /// Second call argument; at entry, the input length in bytes.
    pub const R2: Reg = Reg(2);
    /// Third call argument; r1–r5 are caller-saved in RFC 9669's calling convention.
    pub const R3: Reg = Reg(3);
    /// Fourth call argument; caller-saved.
    pub const R4: Reg = Reg(4);
    /// Fifth call argument; caller-saved.
    pub const R5: Reg = Reg(5);
    /// Callee-saved: preserved across helper and BPF-to-BPF calls.
    pub const R6: Reg = Reg(6);
    /// Callee-saved: preserved across helper and BPF-to-BPF calls.
    pub const R7: Reg = Reg(7);
    /// Callee-saved: preserved across helper and BPF-to-BPF calls.
    pub const R8: Reg = Reg(8);
    /// Callee-saved: preserved across helper and BPF-to-BPF calls.
    pub const R9: Reg = Reg(9);
    /// The frame pointer.
    pub const R10: Reg = Reg(10);

    /// `None` for numbers above 10.
    pub const fn new(n: u8) -> Option<Reg> {
        if n <= MAX_REG { Some(Reg(n)) } else { None }
    }

    /// The register number, 0–10, as stored in an instruction's 4-bit `dst` / `src` field.
    pub const fn num(self) -> u8 {
        self.0
    }

    /// The register number as an index into an 11-entry register file.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for Reg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "%r{}", self.0)
    }
}

/// Operation width of ALU and jump instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    /// `BPF_ALU` / `BPF_JMP32`: operate on the low 32 bits (ALU results are zero-extended).
    W32,
    /// `BPF_ALU64` / `BPF_JMP`.
    W64,
}

/// Memory access size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Size {
    /// `BPF_B`: 1 byte.
    B,
    /// `BPF_H`: 2 bytes (half word).
    H,
    /// `BPF_W`: 4 bytes (word).
    W,
    /// `BPF_DW`: 8 bytes (double word).
    DW,
}

impl Size {
    /// Access width in bytes: 1, 2, 4 or 8.
    pub const fn bytes(self) -> usize {
        match self {
            Size::B => 1,
            Size::H => 2,
            Size::W => 4,
            Size::DW => 8,
        }
    }

    const fn code(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::DW => 0x18,
        }
    }

    const fn from_code(code: u8) -> Size {
        match code & 0x18 {
            0x00 => Size::W,
            0x08 => Size::H,
            0x10 => Size::B,
            _ => Size::DW,
        }
    }
}

/// Second operand of ALU, jump and store instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `BPF_X`: the value of a register.
    Reg(Reg),
    /// `BPF_K`: the instruction's 32-bit `imm`, sign-extended to 64 bits where the operation is
    /// 64-bit.
    Imm(i32),
}

/// Binary ALU operations (`dst = dst op src`; `Mov*` ignore the old `dst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AluOp {
    /// `dst += src`, wrapping.
    Add,
    /// `dst -= src`, wrapping.
    Sub,
    /// `dst *= src`, keeping the low 32 or 64 bits of the product.
    Mul,
    /// Unsigned `dst /= src`; division by zero sets `dst` to 0.
    Div,
    /// Signed division (offset 1), truncating toward zero; division by zero sets `dst` to 0 and
    /// `MIN / -1` wraps to `MIN`.
    SDiv,
    /// `dst |= src`.
    Or,
    /// `dst &= src`.
    And,
    /// `dst <<= src`, the shift amount masked to 63 (64-bit) or 31 (32-bit).
    Lsh,
    /// Logical (zero-filling) `dst >>= src`, the shift amount masked to 63 or 31.
    Rsh,
    /// Unsigned `dst %= src`; modulo by zero leaves `dst` unchanged (its upper half zeroed for
    /// 32-bit).
    Mod,
    /// Signed modulo (offset 1) of truncated division, so the result takes the dividend's sign;
    /// modulo by zero leaves `dst` as [`AluOp::Mod`] does.
    SMod,
    /// `dst ^= src`.
    Xor,
    /// `dst = src` (32-bit: the low half, zero-extended).
    Mov,
    /// Move with sign extension from 8 bits (offset 8, register source only).
    MovSx8,
    /// Move with sign extension from 16 bits (offset 16).
    MovSx16,
    /// Move with sign extension from 32 bits (offset 32, 64-bit only).
    MovSx32,
    /// Arithmetic (sign-filling) `dst >>= src`, the shift amount masked to 63 or 31.
    Arsh,
}

impl AluOp {
    /// Every operation; the sign-extending moves come last.
    pub const ALL: [AluOp; 17] = [
        AluOp::Add,
        AluOp::Sub,
        AluOp::Mul,
        AluOp::Div,
        AluOp::SDiv,
        AluOp::Mod,
        AluOp::SMod,
        AluOp::Or,
        AluOp::And,
        AluOp::Xor,
        AluOp::Lsh,
        AluOp::Rsh,
        AluOp::Arsh,
        AluOp::Mov,
        AluOp::MovSx8,
        AluOp::MovSx16,
        AluOp::MovSx32,
    ];

    /// Whether the operation exists with an immediate source (the sign-extending moves take a
    /// register only).
    pub const fn takes_imm(self) -> bool {
        !matches!(self, AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32)
    }

    /// (opcode bits, offset field).
    const fn code(self) -> (u8, i16) {
        match self {
            AluOp::Add => (0x00, 0),
            AluOp::Sub => (0x10, 0),
            AluOp::Mul => (0x20, 0),
            AluOp::Div => (0x30, 0),
            AluOp::SDiv => (0x30, 1),
            AluOp::Or => (0x40, 0),
            AluOp::And => (0x50, 0),
            AluOp::Lsh => (0x60, 0),
            AluOp::Rsh => (0x70, 0),
            AluOp::Mod => (0x90, 0),
            AluOp::SMod => (0x90, 1),
            AluOp::Xor => (0xa0, 0),
            AluOp::Mov => (0xb0, 0),
            AluOp::MovSx8 => (0xb0, 8),
            AluOp::MovSx16 => (0xb0, 16),
            AluOp::MovSx32 => (0xb0, 32),
            AluOp::Arsh => (0xc0, 0),
        }
    }
}

/// Byte-order conversions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endian {
    /// `le16/32/64`: to little endian (truncate on a little-endian machine).
    Le,
    /// `be16/32/64`: to big endian.
    Be,
    /// `bswap16/32/64`: unconditional swap (ALU64 class).
    Swap,
}

/// Conditions of conditional jumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JmpCond {
    /// `jeq`: `dst == src`.
    Eq,
    /// `jgt`: `dst > src`, unsigned.
    Gt,
    /// `jge`: `dst >= src`, unsigned.
    Ge,
    /// `jset`: `dst & src != 0`.
    Set,
    /// `jne`: `dst != src`.
    Ne,
    /// `jsgt`: `dst > src`, signed.
    Sgt,
    /// `jsge`: `dst >= src`, signed.
    Sge,
    /// `jlt`: `dst < src`, unsigned.
    Lt,
    /// `jle`: `dst <= src`, unsigned.
    Le,
    /// `jslt`: `dst < src`, signed.
    Slt,
    /// `jsle`: `dst <= src`, signed.
    Sle,
}

impl JmpCond {
    /// Every condition, in opcode order.
    pub const ALL: [JmpCond; 11] = [
        JmpCond::Eq,
        JmpCond::Gt,
        JmpCond::Ge,
        JmpCond::Set,
        JmpCond::Ne,
        JmpCond::Sgt,
        JmpCond::Sge,
        JmpCond::Lt,
        JmpCond::Le,
        JmpCond::Slt,
        JmpCond::Sle,
    ];

    const fn code(self) -> u8 {
        match self {
            JmpCond::Eq => 0x10,
            JmpCond::Gt => 0x20,
            JmpCond::Ge => 0x30,
            JmpCond::Set => 0x40,
            JmpCond::Ne => 0x50,
            JmpCond::Sgt => 0x60,
            JmpCond::Sge => 0x70,
            JmpCond::Lt => 0xa0,
            JmpCond::Le => 0xb0,
            JmpCond::Slt => 0xc0,
            JmpCond::Sle => 0xd0,
        }
    }

    /// Evaluates the condition on two operands already reduced to the jump's width
    /// (for 32-bit jumps the caller passes the low halves, sign-extended for signed compares).
    pub fn eval64(self, a: u64, b: u64) -> bool {
        match self {
            JmpCond::Eq => a == b,
            JmpCond::Gt => a > b,
            JmpCond::Ge => a >= b,
            JmpCond::Set => a & b != 0,
            JmpCond::Ne => a != b,
            JmpCond::Sgt => (a as i64) > (b as i64),
            JmpCond::Sge => (a as i64) >= (b as i64),
            JmpCond::Lt => a < b,
            JmpCond::Le => a <= b,
            JmpCond::Slt => (a as i64) < (b as i64),
            JmpCond::Sle => (a as i64) <= (b as i64),
        }
    }

    /// Evaluates the condition on 32-bit operands.
    pub fn eval32(self, a: u32, b: u32) -> bool {
        match self {
            JmpCond::Eq => a == b,
            JmpCond::Gt => a > b,
            JmpCond::Ge => a >= b,
            JmpCond::Set => a & b != 0,
            JmpCond::Ne => a != b,
            JmpCond::Sgt => (a as i32) > (b as i32),
            JmpCond::Sge => (a as i32) >= (b as i32),
            JmpCond::Lt => a < b,
            JmpCond::Le => a <= b,
            JmpCond::Slt => (a as i32) < (b as i32),
            JmpCond::Sle => (a as i32) <= (b as i32),
        }
    }
}

/// Read-modify-write atomic operations (`BPF_STX | BPF_ATOMIC`, 32 or 64 bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AtomicOp {
    /// Atomic `*addr += src`; no register is written (`imm` 0x00).
    Add,
    /// Atomic `*addr |= src`; no register is written (`imm` 0x40).
    Or,
    /// Atomic `*addr &= src`; no register is written (`imm` 0x50).
    And,
    /// Atomic `*addr ^= src`; no register is written (`imm` 0xa0).
    Xor,
    /// As `Add`, and `src` receives the old value.
    FetchAdd,
    /// As `Or`, and `src` receives the old value (zero-extended for 32 bits).
    FetchOr,
    /// As `And`, and `src` receives the old value (zero-extended for 32 bits).
    FetchAnd,
    /// As `Xor`, and `src` receives the old value (zero-extended for 32 bits).
    FetchXor,
    /// `src` and memory exchange values.
    Xchg,
    /// If memory equals r0, store `src`; r0 always receives the old value.
    CmpXchg,
}

impl AtomicOp {
    /// Every operation: the plain ones, their fetching forms, then `Xchg` and `CmpXchg`.
    pub const ALL: [AtomicOp; 10] = [
        AtomicOp::Add,
        AtomicOp::Or,
        AtomicOp::And,
        AtomicOp::Xor,
        AtomicOp::FetchAdd,
        AtomicOp::FetchOr,
        AtomicOp::FetchAnd,
        AtomicOp::FetchXor,
        AtomicOp::Xchg,
        AtomicOp::CmpXchg,
    ];

    const fn imm(self) -> i32 {
        match self {
            AtomicOp::Add => 0x00,
            AtomicOp::Or => 0x40,
            AtomicOp::And => 0x50,
            AtomicOp::Xor => 0xa0,
            AtomicOp::FetchAdd => 0x01,
            AtomicOp::FetchOr => 0x41,
            AtomicOp::FetchAnd => 0x51,
            AtomicOp::FetchXor => 0xa1,
            AtomicOp::Xchg => 0xe1,
            AtomicOp::CmpXchg => 0xf1,
        }
    }

    fn from_imm(imm: i32) -> Option<AtomicOp> {
        AtomicOp::ALL.into_iter().find(|op| op.imm() == imm)
    }
}

/// `imm` of a load-acquire (`BPF_STX | BPF_ATOMIC`).
const LOAD_ACQ: i32 = 0x100;
/// `imm` of a store-release.
const STORE_REL: i32 = 0x110;
/// `src` of a BPF-to-BPF call.
const PSEUDO_CALL: u8 = 1;

/// One eBPF instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Insn {
    /// `dst = dst op src` (or a move).
    Alu {
        /// `BPF_ALU` (32-bit, result zero-extended) or `BPF_ALU64`.
        width: Width,
        /// The operation.
        op: AluOp,
        /// Destination and first operand.
        dst: Reg,
        /// Second operand (the value moved, for moves).
        src: Source,
    },
    /// `dst = -dst`.
    Neg {
        /// 32-bit (result zero-extended) or 64-bit negation.
        width: Width,
        /// The register negated in place.
        dst: Reg,
    },
    /// Byte-order conversion of the low `bits` (16, 32 or 64) of `dst`.
    Endian {
        /// Target byte order, or an unconditional swap.
        kind: Endian,
        /// Width converted: 16, 32 or 64 (the `imm` field); the result is zero-extended.
        bits: u8,
        /// The register converted in place.
        dst: Reg,
    },
    /// `lddw dst, imm` — two slots.
    LoadImm64 {
        /// The register loaded.
        dst: Reg,
        /// The 64-bit value: low half in the first slot's `imm`, high half in the second's.
        imm: u64,
    },
    /// `dst = *(size *)(base + off)`, zero- or sign-extended.
    Load {
        /// Access width.
        size: Size,
        /// Sign-extend to 64 bits (`BPF_MEMSX`; B, H or W only) instead of zero-extending.
        signed: bool,
        /// The register loaded.
        dst: Reg,
        /// Register holding the base address.
        base: Reg,
        /// Signed byte offset added to `base`.
        off: i16,
    },
    /// `*(size *)(base + off) = src`.
    Store {
        /// Access width; the low `size` bytes of the value are stored.
        size: Size,
        /// Register holding the base address.
        base: Reg,
        /// Signed byte offset added to `base`.
        off: i16,
        /// The value: a register (`BPF_STX`) or a sign-extended immediate (`BPF_ST`).
        src: Source,
    },
    /// Atomic read-modify-write on `*(size *)(base + off)`; size is W or DW.
    Atomic {
        /// W or DW; the address must be aligned to it.
        size: Size,
        /// The operation (the `imm` field).
        op: AtomicOp,
        /// Register holding the base address.
        base: Reg,
        /// Signed byte offset added to `base`.
        off: i16,
        /// The operand; receives the old value for fetching operations and `Xchg`.
        src: Reg,
    },
    /// `dst = load_acquire((size *)(base + off))`.
    LoadAcquire {
        /// Access width; the address must be aligned to it. The value is zero-extended.
        size: Size,
        /// The register loaded.
        dst: Reg,
        /// Register holding the base address.
        base: Reg,
        /// Signed byte offset added to `base`.
        off: i16,
    },
    /// `store_release((size *)(base + off), src)`.
    StoreRelease {
        /// Access width; the address must be aligned to it.
        size: Size,
        /// Register holding the base address.
        base: Reg,
        /// Signed byte offset added to `base`.
        off: i16,
        /// Register whose low `size` bytes are stored.
        src: Reg,
    },
    /// Unconditional jump, 16-bit offset (`ja`).
    Ja {
        /// Target, in slots relative to the next instruction.
        off: i16,
    },
    /// Unconditional jump, 32-bit offset (`ja32`, "gotol").
    Ja32 {
        /// Target, in slots relative to the next instruction (carried in `imm`).
        off: i32,
    },
    /// Conditional jump.
    Jump {
        /// `BPF_JMP` (64-bit compare) or `BPF_JMP32` (compares the low 32 bits).
        width: Width,
        /// The condition.
        cond: JmpCond,
        /// Left operand.
        dst: Reg,
        /// Right operand; an immediate is sign-extended to 64 bits for 64-bit compares.
        src: Source,
        /// Target if taken, in slots relative to the next instruction.
        off: i16,
    },
    /// Call helper `id`.
    Call {
        /// Helper id (the `imm` field); arguments in r1–r5, result in r0.
        id: u32,
    },
    /// BPF-to-BPF call; the callee starts `off` slots after the next instruction.
    CallLocal {
        /// Callee entry, in slots relative to the next instruction (carried in `imm`).
        off: i32,
    },
    /// Call the helper whose id is in `reg`.
    CallX {
        /// Register holding the helper id (carried in the `dst` field).
        reg: Reg,
    },
    /// Return r0 (from the program or the current BPF-to-BPF call).
    Exit,
}

/// The five fields of one wire slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RawInsn {
    /// Byte 0: the opcode; its low 3 bits are the instruction class.
    pub opcode: u8,
    /// Low nibble of byte 1: destination register number (0–15; only the low 4 bits are encoded).
    pub dst: u8,
    /// High nibble of byte 1: source register number or pseudo source (0–15).
    pub src: u8,
    /// Bytes 2–3, little-endian: signed offset.
    pub off: i16,
    /// Bytes 4–7, little-endian: signed immediate.
    pub imm: i32,
}

impl RawInsn {
    /// The 8 wire bytes of the slot.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.opcode;
        b[1] = (self.src << 4) | (self.dst & 0x0f);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }

    /// Splits 8 wire bytes into fields; every byte pattern is accepted.
    pub fn from_bytes(b: [u8; 8]) -> RawInsn {
        RawInsn {
            opcode: b[0],
            dst: b[1] & 0x0f,
            src: b[1] >> 4,
            off: i16::from_le_bytes([b[2], b[3]]),
            imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// The slot as the 64-bit word the conformance suite's `-- raw` section uses.
    pub fn to_u64(self) -> u64 {
        u64::from_le_bytes(self.to_bytes())
    }

    /// The inverse of [`RawInsn::to_u64`].
    pub fn from_u64(word: u64) -> RawInsn {
        RawInsn::from_bytes(word.to_le_bytes())
    }
}

// Instruction classes (low 3 bits of the opcode).
const CLS_LD: u8 = 0x00;
const CLS_LDX: u8 = 0x01;
const CLS_ST: u8 = 0x02;
const CLS_STX: u8 = 0x03;
const CLS_ALU: u8 = 0x04;
const CLS_JMP: u8 = 0x05;
const CLS_JMP32: u8 = 0x06;
const CLS_ALU64: u8 = 0x07;
// Source bit.
const SRC_X: u8 = 0x08;
// Memory modes.
const MODE_IMM: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const MODE_MEMSX: u8 = 0x80;
const MODE_ATOMIC: u8 = 0xc0;
// Special ALU / JMP operations.
const ALU_NEG: u8 = 0x80;
const ALU_END: u8 = 0xd0;
const JMP_JA: u8 = 0x00;
const JMP_CALL: u8 = 0x80;
const JMP_EXIT: u8 = 0x90;

fn alu_class(width: Width) -> u8 {
    match width {
        Width::W32 => CLS_ALU,
        Width::W64 => CLS_ALU64,
    }
}

fn jmp_class(width: Width) -> u8 {
    match width {
        Width::W32 => CLS_JMP32,
        Width::W64 => CLS_JMP,
    }
}

fn source_fields(src: Source) -> (u8, u8, i32) {
    match src {
        Source::Reg(r) => (SRC_X, r.0, 0),
        Source::Imm(i) => (0, 0, i),
    }
}

impl Insn {
    /// Number of 8-byte slots this instruction occupies (2 for `lddw`).
    pub const fn slots(&self) -> usize {
        match self {
            Insn::LoadImm64 { .. } => 2,
            _ => 1,
        }
    }

    /// The register this instruction writes, if any (fetching atomics write their source, cmpxchg
    /// writes r0).
    pub fn written_reg(&self) -> Option<Reg> {
        match *self {
            Insn::Alu { dst, .. }
            | Insn::Neg { dst, .. }
            | Insn::Endian { dst, .. }
            | Insn::LoadImm64 { dst, .. }
            | Insn::Load { dst, .. }
            | Insn::LoadAcquire { dst, .. } => Some(dst),
            Insn::Atomic { op, src, .. } => match op {
                AtomicOp::FetchAdd
                | AtomicOp::FetchOr
                | AtomicOp::FetchAnd
                | AtomicOp::FetchXor
                | AtomicOp::Xchg => Some(src),
                AtomicOp::CmpXchg => Some(Reg::R0),
                AtomicOp::Add | AtomicOp::Or | AtomicOp::And | AtomicOp::Xor => None,
            },
            _ => None,
        }
    }

    /// Jump target as a slot index, for an instruction at slot `pc`; `None` if this is not a jump.
    pub fn jump_target(&self, pc: usize) -> Option<i64> {
        let next = pc as i64 + 1;
        match *self {
            Insn::Ja { off } => Some(next + off as i64),
            Insn::Ja32 { off } => Some(next + off as i64),
            Insn::Jump { off, .. } => Some(next + off as i64),
            Insn::CallLocal { off } => Some(next + off as i64),
            _ => None,
        }
    }

    /// The wire slots of this instruction.
    pub fn to_raw(&self) -> ([RawInsn; 2], usize) {
        let one = |r: RawInsn| ([r, RawInsn::default()], 1);
        match *self {
            Insn::Alu {
                width,
                op,
                dst,
                src,
            } => {
                let (code, off) = op.code();
                let (x, s, imm) = source_fields(src);
                one(RawInsn {
                    opcode: alu_class(width) | code | x,
                    dst: dst.0,
                    src: s,
                    off,
                    imm,
                })
            }
            Insn::Neg { width, dst } => one(RawInsn {
                opcode: alu_class(width) | ALU_NEG,
                dst: dst.0,
                ..RawInsn::default()
            }),
            Insn::Endian { kind, bits, dst } => {
                let opcode = match kind {
                    Endian::Le => CLS_ALU | ALU_END,
                    Endian::Be => CLS_ALU | ALU_END | SRC_X,
                    Endian::Swap => CLS_ALU64 | ALU_END,
                };
                one(RawInsn {
                    opcode,
                    dst: dst.0,
                    imm: bits as i32,
                    ..RawInsn::default()
                })
            }
            Insn::LoadImm64 { dst, imm } => (
                [
                    RawInsn {
                        opcode: CLS_LD | MODE_IMM | Size::DW.code(),
                        dst: dst.0,
                        imm: imm as u32 as i32,
                        ..RawInsn::default()
                    },
                    RawInsn {
                        imm: (imm >> 32) as u32 as i32,
                        ..RawInsn::default()
                    },
                ],
                2,
            ),
            Insn::Load {
                size,
                signed,
                dst,
                base,
                off,
            } => one(RawInsn {
                opcode: CLS_LDX | size.code() | if signed { MODE_MEMSX } else { MODE_MEM },
                dst: dst.0,
                src: base.0,
                off,
                imm: 0,
            }),
            Insn::Store {
                size,
                base,
                off,
                src,
            } => match src {
                Source::Reg(r) => one(RawInsn {
                    opcode: CLS_STX | MODE_MEM | size.code(),
                    dst: base.0,
                    src: r.0,
                    off,
                    imm: 0,
                }),
                Source::Imm(imm) => one(RawInsn {
                    opcode: CLS_ST | MODE_MEM | size.code(),
                    dst: base.0,
                    src: 0,
                    off,
                    imm,
                }),
            },
            Insn::Atomic {
                size,
                op,
                base,
                off,
                src,
            } => one(RawInsn {
                opcode: CLS_STX | MODE_ATOMIC | size.code(),
                dst: base.0,
                src: src.0,
                off,
                imm: op.imm(),
            }),
            Insn::LoadAcquire {
                size,
                dst,
                base,
                off,
            } => one(RawInsn {
                opcode: CLS_STX | MODE_ATOMIC | size.code(),
                dst: dst.0,
                src: base.0,
                off,
                imm: LOAD_ACQ,
            }),
            Insn::StoreRelease {
                size,
                base,
                off,
                src,
            } => one(RawInsn {
                opcode: CLS_STX | MODE_ATOMIC | size.code(),
                dst: base.0,
                src: src.0,
                off,
                imm: STORE_REL,
            }),
            Insn::Ja { off } => one(RawInsn {
                opcode: CLS_JMP | JMP_JA,
                off,
                ..RawInsn::default()
            }),
            Insn::Ja32 { off } => one(RawInsn {
                opcode: CLS_JMP32 | JMP_JA,
                imm: off,
                ..RawInsn::default()
            }),
            Insn::Jump {
                width,
                cond,
                dst,
                src,
                off,
            } => {
                let (x, s, imm) = source_fields(src);
                one(RawInsn {
                    opcode: jmp_class(width) | cond.code() | x,
                    dst: dst.0,
                    src: s,
                    off,
                    imm,
                })
            }
            Insn::Call { id } => one(RawInsn {
                opcode: CLS_JMP | JMP_CALL,
                imm: id as i32,
                ..RawInsn::default()
            }),
            Insn::CallLocal { off } => one(RawInsn {
                opcode: CLS_JMP | JMP_CALL,
                src: PSEUDO_CALL,
                imm: off,
                ..RawInsn::default()
            }),
            Insn::CallX { reg } => one(RawInsn {
                opcode: CLS_JMP | JMP_CALL | SRC_X,
                dst: reg.0,
                ..RawInsn::default()
            }),
            Insn::Exit => one(RawInsn {
                opcode: CLS_JMP | JMP_EXIT,
                ..RawInsn::default()
            }),
        }
    }

    /// Appends the wire bytes of this instruction to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (raws, n) = self.to_raw();
        for raw in &raws[..n] {
            out.extend_from_slice(&raw.to_bytes());
        }
    }
}

/// Encodes a program to its wire bytes.
pub fn encode_program(insns: &[Insn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(insns.len() * INSN_SIZE);
    for insn in insns {
        insn.encode_into(&mut out);
    }
    out
}

/// Why an encoding was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeErrorKind {
    /// The program (or the slice given to [`decode_one`]) has no slots.
    #[error("the program is empty; it needs at least an `exit`")]
    Empty,
    /// The byte length, which is not a multiple of [`INSN_SIZE`].
    #[error("program length {0} is not a multiple of 8 bytes; eBPF instructions are 8 bytes each")]
    BadLength(usize),
    /// The opcode byte, which names no supported instruction (or sets a source or mode bit its
    /// class does not allow).
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The value of a `dst` or `src` field that names no register (it is above 10), or of an
    /// `lddw`'s `src` above 6 (no pseudo source has that number).
    #[error("register r{0} does not exist (registers are r0-r10)")]
    BadRegister(u8),
    /// The instruction would write r10 (as `dst`, or as the source of a fetching atomic).
    #[error("r10 is the read-only frame pointer and cannot be written")]
    FramePointerWrite,
    /// The name (`"dst"`, `"src"`, `"off"` or `"imm"`) of a field this opcode reserves, which is
    /// not zero.
    #[error("reserved field `{0}` must be zero for this opcode")]
    ReservedNotZero(&'static str),
    /// A field holds a value not allowed for this opcode.
    #[error("invalid field `{field}` = {value} for this opcode")]
    BadField {
        /// The field's name, possibly with a hint (e.g. `"imm (atomic operation)"`).
        field: &'static str,
        /// The value found, widened to `i64`.
        value: i64,
    },
    /// An `lddw` starts in the last slot, so its second slot is missing.
    #[error("lddw needs a second slot but the program ends")]
    TruncatedLddw,
    /// The second slot of an `lddw` has a non-zero opcode, `dst`, `src` or `off`.
    #[error("second slot of lddw must have opcode, registers and offset zero")]
    BadLddwSecondSlot,
    /// A description of a valid eBPF encoding this runtime does not implement (legacy packet
    /// loads, `lddw` pseudo sources, kfunc calls).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A jump or local call lands outside the program.
    #[error("jump target {target} is outside the program (0..{len})")]
    JumpOutOfProgram {
        /// The target slot index (may be negative).
        target: i64,
        /// The program's length in slots.
        len: usize,
    },
    /// A jump or local call lands on the second slot of an `lddw`.
    #[error("jump target {target} is the second slot of an lddw")]
    JumpIntoLddw {
        /// The target slot index.
        target: i64,
    },
    /// The last instruction is neither `exit` nor an unconditional jump, so execution could run
    /// past the end.
    #[error("the last instruction must be `exit` or an unconditional jump")]
    FallsOffEnd,
}

/// A rejected encoding: which slot and why.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invalid instruction at slot {index}: {kind}")]
pub struct DecodeError {
    /// Slot index (8-byte units from the start of the program).
    pub index: usize,
    /// Why the instruction was rejected.
    pub kind: DecodeErrorKind,
}

fn reg(n: u8) -> Result<Reg, DecodeErrorKind> {
    Reg::new(n).ok_or(DecodeErrorKind::BadRegister(n))
}

/// A register the instruction writes: r10 is refused.
fn dst_reg(n: u8) -> Result<Reg, DecodeErrorKind> {
    let r = reg(n)?;
    if r == Reg::R10 {
        return Err(DecodeErrorKind::FramePointerWrite);
    }
    Ok(r)
}

fn zero(value: i64, field: &'static str) -> Result<(), DecodeErrorKind> {
    if value == 0 {
        Ok(())
    } else {
        Err(DecodeErrorKind::ReservedNotZero(field))
    }
}

fn decode_source(raw: &RawInsn) -> Result<Source, DecodeErrorKind> {
    if raw.opcode & SRC_X != 0 {
        zero(raw.imm as i64, "imm")?;
        Ok(Source::Reg(reg(raw.src)?))
    } else {
        zero(raw.src as i64, "src")?;
        Ok(Source::Imm(raw.imm))
    }
}

fn decode_alu(raw: &RawInsn, width: Width) -> Result<Insn, DecodeErrorKind> {
    let code = raw.opcode & 0xf0;
    match code {
        ALU_NEG => {
            if raw.opcode & SRC_X != 0 {
                return Err(DecodeErrorKind::UnknownOpcode(raw.opcode));
            }
            zero(raw.src as i64, "src")?;
            zero(raw.off as i64, "off")?;
            zero(raw.imm as i64, "imm")?;
            Ok(Insn::Neg {
                width,
                dst: dst_reg(raw.dst)?,
            })
        }
        ALU_END => {
            let kind = match (width, raw.opcode & SRC_X != 0) {
                (Width::W32, false) => Endian::Le,
                (Width::W32, true) => Endian::Be,
                (Width::W64, false) => Endian::Swap,
                (Width::W64, true) => return Err(DecodeErrorKind::UnknownOpcode(raw.opcode)),
            };
            zero(raw.src as i64, "src")?;
            zero(raw.off as i64, "off")?;
            if !matches!(raw.imm, 16 | 32 | 64) {
                return Err(DecodeErrorKind::BadField {
                    field: "imm",
                    value: raw.imm as i64,
                });
            }
            Ok(Insn::Endian {
                kind,
                bits: raw.imm as u8,
                dst: dst_reg(raw.dst)?,
            })
        }
        _ => {
            let is_reg = raw.opcode & SRC_X != 0;
            let op = match (code, raw.off) {
                (0x00, 0) => AluOp::Add,
                (0x10, 0) => AluOp::Sub,
                (0x20, 0) => AluOp::Mul,
                (0x30, 0) => AluOp::Div,
                (0x30, 1) => AluOp::SDiv,
                (0x40, 0) => AluOp::Or,
                (0x50, 0) => AluOp::And,
                (0x60, 0) => AluOp::Lsh,
                (0x70, 0) => AluOp::Rsh,
                (0x90, 0) => AluOp::Mod,
                (0x90, 1) => AluOp::SMod,
                (0xa0, 0) => AluOp::Xor,
                (0xb0, 0) => AluOp::Mov,
                (0xb0, 8) if is_reg => AluOp::MovSx8,
                (0xb0, 16) if is_reg => AluOp::MovSx16,
                (0xb0, 32) if is_reg && width == Width::W64 => AluOp::MovSx32,
                (0xc0, 0) => AluOp::Arsh,
                (0x00..=0xc0, off) => {
                    return Err(DecodeErrorKind::BadField {
                        field: "off",
                        value: off as i64,
                    });
                }
                _ => return Err(DecodeErrorKind::UnknownOpcode(raw.opcode)),
            };
            Ok(Insn::Alu {
                width,
                op,
                dst: dst_reg(raw.dst)?,
                src: decode_source(raw)?,
            })
        }
    }
}

fn decode_jmp(raw: &RawInsn, width: Width) -> Result<Insn, DecodeErrorKind> {
    let code = raw.opcode & 0xf0;
    let is_reg = raw.opcode & SRC_X != 0;
    match code {
        JMP_JA => {
            if is_reg {
                return Err(DecodeErrorKind::UnknownOpcode(raw.opcode));
            }
            zero(raw.dst as i64, "dst")?;
            zero(raw.src as i64, "src")?;
            match width {
                Width::W64 => {
                    zero(raw.imm as i64, "imm")?;
                    Ok(Insn::Ja { off: raw.off })
                }
                Width::W32 => {
                    zero(raw.off as i64, "off")?;
                    Ok(Insn::Ja32 { off: raw.imm })
                }
            }
        }
        JMP_CALL if width == Width::W64 => {
            zero(raw.off as i64, "off")?;
            if is_reg {
                zero(raw.src as i64, "src")?;
                zero(raw.imm as i64, "imm")?;
                return Ok(Insn::CallX { reg: reg(raw.dst)? });
            }
            zero(raw.dst as i64, "dst")?;
            match raw.src {
                0 => Ok(Insn::Call { id: raw.imm as u32 }),
                PSEUDO_CALL => Ok(Insn::CallLocal { off: raw.imm }),
                2 => Err(DecodeErrorKind::Unsupported(
                    "kfunc calls (call with src=2)",
                )),
                s => Err(DecodeErrorKind::BadField {
                    field: "src",
                    value: s as i64,
                }),
            }
        }
        JMP_EXIT if width == Width::W64 => {
            if is_reg {
                return Err(DecodeErrorKind::UnknownOpcode(raw.opcode));
            }
            zero(raw.dst as i64, "dst")?;
            zero(raw.src as i64, "src")?;
            zero(raw.off as i64, "off")?;
            zero(raw.imm as i64, "imm")?;
            Ok(Insn::Exit)
        }
        _ => {
            let cond = JmpCond::ALL
                .into_iter()
                .find(|c| c.code() == code)
                .ok_or(DecodeErrorKind::UnknownOpcode(raw.opcode))?;
            Ok(Insn::Jump {
                width,
                cond,
                dst: reg(raw.dst)?,
                src: decode_source(raw)?,
                off: raw.off,
            })
        }
    }
}

fn decode_atomic(raw: &RawInsn, size: Size) -> Result<Insn, DecodeErrorKind> {
    match raw.imm {
        LOAD_ACQ => Ok(Insn::LoadAcquire {
            size,
            dst: dst_reg(raw.dst)?,
            base: reg(raw.src)?,
            off: raw.off,
        }),
        STORE_REL => Ok(Insn::StoreRelease {
            size,
            base: reg(raw.dst)?,
            off: raw.off,
            src: reg(raw.src)?,
        }),
        imm => {
            if !matches!(size, Size::W | Size::DW) {
                return Err(DecodeErrorKind::BadField {
                    field: "size (atomic read-modify-write needs W or DW)",
                    value: size.bytes() as i64,
                });
            }
            let op = AtomicOp::from_imm(imm).ok_or(DecodeErrorKind::BadField {
                field: "imm (atomic operation)",
                value: imm as i64,
            })?;
            let src = reg(raw.src)?;
            // The fetching forms write their source register (cmpxchg writes r0).
            if matches!(
                op,
                AtomicOp::FetchAdd
                    | AtomicOp::FetchOr
                    | AtomicOp::FetchAnd
                    | AtomicOp::FetchXor
                    | AtomicOp::Xchg
            ) && src == Reg::R10
            {
                return Err(DecodeErrorKind::FramePointerWrite);
            }
            Ok(Insn::Atomic {
                size,
                op,
                base: reg(raw.dst)?,
                off: raw.off,
                src,
            })
        }
    }
}

/// Decodes one instruction from `slots[0]` (and `slots[1]` for `lddw`), without checking jump
/// targets. Returns the instruction; its `slots()` says how many slots it used.
pub fn decode_one(slots: &[RawInsn]) -> Result<Insn, DecodeErrorKind> {
    let raw = slots.first().ok_or(DecodeErrorKind::Empty)?;
    let class = raw.opcode & 0x07;
    match class {
        CLS_ALU => decode_alu(raw, Width::W32),
        CLS_ALU64 => decode_alu(raw, Width::W64),
        CLS_JMP => decode_jmp(raw, Width::W64),
        CLS_JMP32 => decode_jmp(raw, Width::W32),
        CLS_LD => {
            if raw.opcode != (CLS_LD | MODE_IMM | Size::DW.code()) {
                return match raw.opcode & 0xe0 {
                    0x20 | 0x40 => Err(DecodeErrorKind::Unsupported(
                        "legacy packet loads (BPF_ABS / BPF_IND)",
                    )),
                    _ => Err(DecodeErrorKind::UnknownOpcode(raw.opcode)),
                };
            }
            match raw.src {
                0 => {}
                1..=6 => {
                    return Err(DecodeErrorKind::Unsupported(
                        "lddw with a pseudo source (map or BTF references)",
                    ));
                }
                s => return Err(DecodeErrorKind::BadRegister(s)),
            }
            zero(raw.off as i64, "off")?;
            let dst = dst_reg(raw.dst)?;
            let high = slots.get(1).ok_or(DecodeErrorKind::TruncatedLddw)?;
            if high.opcode != 0 || high.dst != 0 || high.src != 0 || high.off != 0 {
                return Err(DecodeErrorKind::BadLddwSecondSlot);
            }
            let imm = (raw.imm as u32 as u64) | ((high.imm as u32 as u64) << 32);
            Ok(Insn::LoadImm64 { dst, imm })
        }
        CLS_LDX => {
            let size = Size::from_code(raw.opcode);
            let signed = match raw.opcode & 0xe0 {
                MODE_MEM => false,
                MODE_MEMSX if size != Size::DW => true,
                _ => return Err(DecodeErrorKind::UnknownOpcode(raw.opcode)),
            };
            zero(raw.imm as i64, "imm")?;
            Ok(Insn::Load {
                size,
                signed,
                dst: dst_reg(raw.dst)?,
                base: reg(raw.src)?,
                off: raw.off,
            })
        }
        CLS_ST => {
            if raw.opcode & 0xe0 != MODE_MEM {
                return Err(DecodeErrorKind::UnknownOpcode(raw.opcode));
            }
            zero(raw.src as i64, "src")?;
            Ok(Insn::Store {
                size: Size::from_code(raw.opcode),
                base: reg(raw.dst)?,
                off: raw.off,
                src: Source::Imm(raw.imm),
            })
        }
        CLS_STX => {
            let size = Size::from_code(raw.opcode);
            match raw.opcode & 0xe0 {
                MODE_MEM => {
                    zero(raw.imm as i64, "imm")?;
                    Ok(Insn::Store {
                        size,
                        base: reg(raw.dst)?,
                        off: raw.off,
                        src: Source::Reg(reg(raw.src)?),
                    })
                }
                MODE_ATOMIC => decode_atomic(raw, size),
                _ => Err(DecodeErrorKind::UnknownOpcode(raw.opcode)),
            }
        }
        _ => unreachable!("class is three bits"),
    }
}

/// Splits wire bytes into slots.
pub fn raw_slots(bytes: &[u8]) -> Result<Vec<RawInsn>, DecodeError> {
    if !bytes.len().is_multiple_of(INSN_SIZE) {
        return Err(DecodeError {
            index: bytes.len() / INSN_SIZE,
            kind: DecodeErrorKind::BadLength(bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(INSN_SIZE)
        .map(|c| RawInsn::from_bytes(c.try_into().expect("chunk of 8")))
        .collect())
}

/// A decoded and validated program: instructions in order, with their slot positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    insns: Vec<Insn>,
    /// Slot index of each instruction.
    slot_of: Vec<usize>,
    /// For each slot, the index of the instruction starting there (`None` inside an `lddw`).
    insn_at: Vec<Option<usize>>,
    /// Each function's entry instruction and its stack reach, sorted ([`Program::stack_reach`]).
    reach: Vec<(usize, StackReach)>,
    /// Per instruction, [`Program::may_address_stack`].
    stack_based: Vec<bool>,
    /// Per instruction, [`Program::in_frame`].
    in_frame: Vec<bool>,
}

impl Program {
    /// Validates `insns` — hand-built or decoded — so every engine can rely on the same rules: no
    /// write to r10, atomic read-modify-writes of 32 or 64 bits, jump and call targets in range
    /// and on instruction boundaries, and the last instruction `exit` or an unconditional jump.
    pub fn new(insns: Vec<Insn>) -> Result<Program, DecodeError> {
        if insns.is_empty() {
            return Err(DecodeError {
                index: 0,
                kind: DecodeErrorKind::Empty,
            });
        }
        let mut slot_of = Vec::with_capacity(insns.len());
        let mut insn_at = Vec::with_capacity(insns.len());
        for (i, insn) in insns.iter().enumerate() {
            slot_of.push(insn_at.len());
            insn_at.push(Some(i));
            if insn.slots() == 2 {
                insn_at.push(None);
            }
        }
        let len = insn_at.len();
        for (i, insn) in insns.iter().enumerate() {
            let at = |kind| DecodeError {
                index: slot_of[i],
                kind,
            };
            if insn.written_reg() == Some(Reg::R10) {
                return Err(at(DecodeErrorKind::FramePointerWrite));
            }
            if let Insn::Atomic { size, .. } = insn
                && !matches!(size, Size::W | Size::DW)
            {
                return Err(at(DecodeErrorKind::BadField {
                    field: "size (atomic read-modify-write needs W or DW)",
                    value: size.bytes() as i64,
                }));
            }
            if let Some(target) = insn.jump_target(slot_of[i]) {
                let err = |kind| DecodeError {
                    index: slot_of[i],
                    kind,
                };
                if target < 0 || target >= len as i64 {
                    return Err(err(DecodeErrorKind::JumpOutOfProgram { target, len }));
                }
                if insn_at[target as usize].is_none() {
                    return Err(err(DecodeErrorKind::JumpIntoLddw { target }));
                }
            }
        }
        let last = insns.len() - 1;
        if !matches!(
            insns[last],
            Insn::Exit | Insn::Ja { .. } | Insn::Ja32 { .. }
        ) {
            return Err(DecodeError {
                index: slot_of[last],
                kind: DecodeErrorKind::FallsOffEnd,
            });
        }
        let mut program = Program {
            insns,
            slot_of,
            insn_at,
            reach: Vec::new(),
            stack_based: Vec::new(),
            in_frame: Vec::new(),
        };
        let analysis = reach::analyse(&program);
        program.reach = analysis.reach;
        program.stack_based = analysis.stack_based;
        program.in_frame = bounds::analyse(&program, &program.reach, &analysis.bounds);
        Ok(program)
    }

    /// Decodes and validates wire bytes.
    pub fn decode(bytes: &[u8]) -> Result<Program, DecodeError> {
        let slots = raw_slots(bytes)?;
        let mut insns = Vec::with_capacity(slots.len());
        let mut pc = 0;
        while pc < slots.len() {
            let insn = decode_one(&slots[pc..]).map_err(|kind| DecodeError { index: pc, kind })?;
            pc += insn.slots();
            insns.push(insn);
        }
        Program::new(insns)
    }

    /// The instructions in order, one entry per instruction (an `lddw` is one entry, two slots).
    pub fn insns(&self) -> &[Insn] {
        &self.insns
    }

    /// Number of wire slots.
    pub fn slot_count(&self) -> usize {
        self.insn_at.len()
    }

    /// Slot index of instruction `i`.
    pub fn slot_of(&self, i: usize) -> usize {
        self.slot_of[i]
    }

    /// Instruction index starting at `slot`, if one does.
    pub fn insn_at(&self, slot: usize) -> Option<usize> {
        self.insn_at.get(slot).copied().flatten()
    }

    /// Instruction index of the target of the jump or local call at instruction `i`.
    pub fn target_of(&self, i: usize) -> Option<usize> {
        let target = self.insns[i].jump_target(self.slot_of[i])?;
        // Validated in `new`.
        self.insn_at(target as usize)
    }

    /// How far below its r10 the function entered at instruction `entry` (0, or a local call's
    /// target) can touch the stack, proven statically (see the module `reach` for the rules);
    /// [`StackReach::Unbounded`] for an index that is not a function entry. Engines zero this
    /// much of a frame when the function is entered, instead of the whole stack per run.
    pub fn stack_reach(&self, entry: usize) -> StackReach {
        self.reach
            .binary_search_by_key(&entry, |&(e, _)| e)
            .map_or(StackReach::Unbounded, |k| self.reach[k].1)
    }

    /// The stack reach of the function the local call at instruction `i` enters
    /// ([`StackReach::Unbounded`] if `i` is not a local call).
    pub fn callee_reach(&self, i: usize) -> StackReach {
        match self.insns.get(i) {
            Some(Insn::CallLocal { .. }) => self
                .target_of(i)
                .map_or(StackReach::Unbounded, |t| self.stack_reach(t)),
            _ => StackReach::Unbounded,
        }
    }

    /// Whether the memory access at instruction `i` may use an address derived from its
    /// function's r10 (false for other instructions). A hint for checked engines, which test the
    /// likelier region first: an access whose base is not stack-derived can still land in the
    /// stack (a pointer a caller passed), so both tests remain.
    pub fn may_address_stack(&self, i: usize) -> bool {
        self.stack_based.get(i).copied().unwrap_or(true)
    }

    /// Whether the memory access at instruction `i` provably lies inside its function's stack
    /// frame, within the part every engine's stack window covers once the function is entered
    /// (false for other instructions, and wherever it cannot be proven). Checked engines skip
    /// the bounds test of such accesses: it could never fail. See the module `bounds` for the
    /// range analysis behind it.
    pub fn in_frame(&self, i: usize) -> bool {
        self.in_frame.get(i).copied().unwrap_or(false)
    }

    /// The program's wire bytes, as [`encode_program`] gives them.
    pub fn encode(&self) -> Vec<u8> {
        encode_program(&self.insns)
    }
}

/// Decodes and validates a whole program from wire bytes.
pub fn decode_program(bytes: &[u8]) -> Result<Program, DecodeError> {
    Program::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(insn: Insn) {
        let bytes = encode_program(&[insn]);
        let slots = raw_slots(&bytes).unwrap();
        assert_eq!(decode_one(&slots).unwrap(), insn, "bytes {bytes:02x?}");
    }

    #[test]
    fn golden_encodings() {
        // Values from RFC 9669's opcode tables.
        let mov = Insn::Alu {
            width: Width::W64,
            op: AluOp::Mov,
            dst: Reg::R0,
            src: Source::Imm(42),
        };
        assert_eq!(encode_program(&[mov]), [0xb7, 0, 0, 0, 42, 0, 0, 0]);
        assert_eq!(encode_program(&[Insn::Exit]), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        let sdiv = Insn::Alu {
            width: Width::W32,
            op: AluOp::SDiv,
            dst: Reg::R1,
            src: Source::Reg(Reg::R2),
        };
        assert_eq!(encode_program(&[sdiv]), [0x3c, 0x21, 1, 0, 0, 0, 0, 0]);
        let lddw = Insn::LoadImm64 {
            dst: Reg::R0,
            imm: 0x1122334455667788,
        };
        let words: Vec<u64> = raw_slots(&encode_program(&[lddw]))
            .unwrap()
            .into_iter()
            .map(RawInsn::to_u64)
            .collect();
        assert_eq!(words, [0x5566778800000018, 0x1122334400000000]);
        let cmpxchg = Insn::Atomic {
            size: Size::DW,
            op: AtomicOp::CmpXchg,
            base: Reg::R10,
            off: -8,
            src: Reg::R1,
        };
        assert_eq!(
            encode_program(&[cmpxchg]),
            [0xdb, 0x1a, 0xf8, 0xff, 0xf1, 0, 0, 0]
        );
        let callx = Insn::CallX { reg: Reg::R2 };
        assert_eq!(encode_program(&[callx]), [0x8d, 0x02, 0, 0, 0, 0, 0, 0]);
        let ja32 = Insn::Ja32 { off: -3 };
        assert_eq!(
            encode_program(&[ja32]),
            [0x06, 0, 0, 0, 0xfd, 0xff, 0xff, 0xff]
        );
        let bswap = Insn::Endian {
            kind: Endian::Swap,
            bits: 16,
            dst: Reg::R3,
        };
        assert_eq!(encode_program(&[bswap]), [0xd7, 3, 0, 0, 16, 0, 0, 0]);
        let ldxsw = Insn::Load {
            size: Size::W,
            signed: true,
            dst: Reg::R0,
            base: Reg::R10,
            off: -4,
        };
        assert_eq!(
            encode_program(&[ldxsw]),
            [0x81, 0xa0, 0xfc, 0xff, 0, 0, 0, 0]
        );
        let acq = Insn::LoadAcquire {
            size: Size::DW,
            dst: Reg::R0,
            base: Reg::R1,
            off: 0,
        };
        assert_eq!(encode_program(&[acq]), [0xdb, 0x10, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn every_form_roundtrips() {
        let r = Reg::R3;
        let mut all = vec![
            Insn::Neg {
                width: Width::W32,
                dst: r,
            },
            Insn::Ja { off: -1 },
            Insn::Ja32 { off: 100_000 },
            Insn::Call { id: 5 },
            Insn::CallLocal { off: 3 },
            Insn::CallX { reg: r },
            Insn::Exit,
            Insn::LoadImm64 {
                dst: r,
                imm: u64::MAX,
            },
        ];
        for op in AtomicOp::ALL {
            for size in [Size::W, Size::DW] {
                all.push(Insn::Atomic {
                    size,
                    op,
                    base: Reg::R10,
                    off: -8,
                    src: Reg::R1,
                });
            }
        }
        for size in [Size::B, Size::H, Size::W, Size::DW] {
            all.push(Insn::Load {
                size,
                signed: false,
                dst: r,
                base: Reg::R10,
                off: -8,
            });
            all.push(Insn::Store {
                size,
                base: Reg::R1,
                off: 2,
                src: Source::Imm(-1),
            });
            all.push(Insn::Store {
                size,
                base: Reg::R1,
                off: 2,
                src: Source::Reg(r),
            });
            all.push(Insn::LoadAcquire {
                size,
                dst: r,
                base: Reg::R1,
                off: 0,
            });
            all.push(Insn::StoreRelease {
                size,
                base: Reg::R1,
                off: 0,
                src: r,
            });
        }
        for cond in JmpCond::ALL {
            for width in [Width::W32, Width::W64] {
                all.push(Insn::Jump {
                    width,
                    cond,
                    dst: r,
                    src: Source::Imm(-7),
                    off: 2,
                });
            }
        }
        for kind in [Endian::Le, Endian::Be, Endian::Swap] {
            all.push(Insn::Endian {
                kind,
                bits: 32,
                dst: r,
            });
        }
        for insn in all {
            roundtrip(insn);
        }
    }

    fn decode_err(words: &[u64]) -> DecodeError {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        Program::decode(&bytes).unwrap_err()
    }

    #[test]
    fn rejects_bad_encodings_with_index_and_reason() {
        // mov r0, 1; unknown opcode 0xff; exit
        let e = decode_err(&[0x1_0000_00b7, 0xff, 0x95]);
        assert_eq!(e.index, 1);
        assert_eq!(e.kind, DecodeErrorKind::UnknownOpcode(0xff));
        // mov r11, 0
        let e = decode_err(&[0x0b7 | (11 << 8), 0x95]);
        assert_eq!(e.kind, DecodeErrorKind::BadRegister(11));
        // exit with a non-zero imm
        let e = decode_err(&[0x1_0000_0095]);
        assert_eq!(e.kind, DecodeErrorKind::ReservedNotZero("imm"));
        // truncated lddw
        let e = decode_err(&[0x18]);
        assert_eq!(e.kind, DecodeErrorKind::TruncatedLddw);
        // ja +5 out of a 2-slot program
        let e = decode_err(&[0x0005_0005, 0x95]);
        assert!(matches!(
            e.kind,
            DecodeErrorKind::JumpOutOfProgram { target: 6, .. }
        ));
        // mov r10, 0
        let e = decode_err(&[0x0ab7, 0x95]);
        assert_eq!(e.kind, DecodeErrorKind::FramePointerWrite);
        // no exit at the end
        let e = decode_err(&[0xb7]);
        assert_eq!(e.kind, DecodeErrorKind::FallsOffEnd);
        // jump into the middle of an lddw: ja +1; lddw; exit
        let e = decode_err(&[0x0001_0005, 0x18, 0, 0x95]);
        assert!(matches!(e.kind, DecodeErrorKind::JumpIntoLddw { .. }));
        // Hand-built programs follow the same rules as decoded ones.
        let writes_r10 = Insn::Alu {
            width: Width::W64,
            op: AluOp::Mov,
            dst: Reg::R10,
            src: Source::Imm(0),
        };
        let e = Program::new(vec![Insn::Exit, writes_r10, Insn::Exit]).unwrap_err();
        assert_eq!((e.index, e.kind), (1, DecodeErrorKind::FramePointerWrite));
        let byte_atomic = Insn::Atomic {
            size: Size::B,
            op: AtomicOp::Add,
            base: Reg::R10,
            off: -8,
            src: Reg::R1,
        };
        let e = Program::new(vec![byte_atomic, Insn::Exit]).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::BadField { .. }), "{e}");
        // length not a multiple of 8
        let e = Program::decode(&[0x95, 0, 0]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::BadLength(3));
        assert!(Program::decode(&[]).is_err());
    }
}
