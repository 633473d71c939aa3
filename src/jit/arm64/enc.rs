//! A64 instruction encoder: one small function per instruction form, each returning the 32-bit
//! instruction word (little-endian in memory).
//!
//! Functions whose operands may not fit (immediates, branch offsets) return `Option`, `None`
//! meaning "not encodable"; the code generator then picks another form. Register operands are
//! [`Gpr`]s; `sf` selects the 64-bit (`x`) form, otherwise the 32-bit (`w`) form, whose result
//! is zero-extended into the 64-bit register. Encodings are from the Arm Architecture Reference
//! Manual (DDI 0487), "A64 Instruction Set Encoding"; the golden tests compare every function
//! with an independent disassembler.

use crate::isa::Size;

/// A general-purpose register number 0–31. Number 31 is `xzr` or `sp` depending on the
/// operand (see each function).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gpr(u8);

impl Gpr {
    /// `x0`–`x30`, and 31 (zero register or stack pointer).
    pub const fn new(n: u8) -> Gpr {
        Gpr(n & 31)
    }

    pub const fn num(self) -> u32 {
        self.0 as u32
    }
}

pub const X0: Gpr = Gpr(0);
pub const X1: Gpr = Gpr(1);
pub const X2: Gpr = Gpr(2);
pub const X3: Gpr = Gpr(3);
pub const X4: Gpr = Gpr(4);
pub const X5: Gpr = Gpr(5);
pub const X7: Gpr = Gpr(7);
pub const X9: Gpr = Gpr(9);
pub const X10: Gpr = Gpr(10);
pub const X11: Gpr = Gpr(11);
pub const X12: Gpr = Gpr(12);
pub const X13: Gpr = Gpr(13);
pub const X14: Gpr = Gpr(14);
pub const X19: Gpr = Gpr(19);
pub const X20: Gpr = Gpr(20);
pub const X21: Gpr = Gpr(21);
pub const X22: Gpr = Gpr(22);
pub const X25: Gpr = Gpr(25);
pub const X26: Gpr = Gpr(26);
/// Frame pointer.
pub const FP: Gpr = Gpr(29);
/// Link register.
pub const LR: Gpr = Gpr(30);
/// Register 31 as the zero register (data-processing operands).
pub const XZR: Gpr = Gpr(31);
/// Register 31 as the stack pointer (address bases, add/sub immediate).
pub const SP: Gpr = Gpr(31);

/// Condition codes of `b.cond`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    Eq = 0,
    Ne = 1,
    /// Unsigned ≥ (carry set).
    Hs = 2,
    /// Unsigned <.
    Lo = 3,
    Mi = 4,
    Pl = 5,
    Vs = 6,
    Vc = 7,
    /// Unsigned >.
    Hi = 8,
    /// Unsigned ≤.
    Ls = 9,
    Ge = 10,
    Lt = 11,
    Gt = 12,
    Le = 13,
    Al = 14,
}

impl Cond {
    /// The opposite condition.
    pub const fn invert(self) -> Cond {
        match self {
            Cond::Eq => Cond::Ne,
            Cond::Ne => Cond::Eq,
            Cond::Hs => Cond::Lo,
            Cond::Lo => Cond::Hs,
            Cond::Mi => Cond::Pl,
            Cond::Pl => Cond::Mi,
            Cond::Vs => Cond::Vc,
            Cond::Vc => Cond::Vs,
            Cond::Hi => Cond::Ls,
            Cond::Ls => Cond::Hi,
            Cond::Ge => Cond::Lt,
            Cond::Lt => Cond::Ge,
            Cond::Gt => Cond::Le,
            Cond::Le => Cond::Gt,
            Cond::Al => Cond::Al,
        }
    }
}

const fn sf_bit(sf: bool) -> u32 {
    if sf { 1 << 31 } else { 0 }
}

/// `rd`, `rn` and `rm`/`rt2`-style fields at bits 0, 5 and 16.
const fn rrr(rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    rd.num() | rn.num() << 5 | rm.num() << 16
}

// ------------------------------------------------------------------ moves of immediates

/// `movz rd, #imm16, lsl #shift` (shift 0, 16, 32 or 48; 0 or 16 for 32-bit).
pub const fn movz(sf: bool, rd: Gpr, imm16: u16, shift: u32) -> u32 {
    sf_bit(sf) | 0x5280_0000 | (shift / 16) << 21 | (imm16 as u32) << 5 | rd.num()
}

/// `movn rd, #imm16, lsl #shift`: `rd = !(imm16 << shift)`.
pub const fn movn(sf: bool, rd: Gpr, imm16: u16, shift: u32) -> u32 {
    sf_bit(sf) | 0x1280_0000 | (shift / 16) << 21 | (imm16 as u32) << 5 | rd.num()
}

/// `movk rd, #imm16, lsl #shift`: replaces one halfword, keeps the others.
pub const fn movk(sf: bool, rd: Gpr, imm16: u16, shift: u32) -> u32 {
    sf_bit(sf) | 0x7280_0000 | (shift / 16) << 21 | (imm16 as u32) << 5 | rd.num()
}

/// The shortest `movz`/`movn` + `movk` sequence (1–4 words) that puts `value` in `rd`. For
/// 32-bit, only the low 32 bits of `value` count (the upper half of `rd` becomes zero).
pub fn mov_imm(sf: bool, rd: Gpr, value: u64) -> Vec<u32> {
    let halves = if sf { 4 } else { 2 };
    let value = if sf { value } else { value & 0xffff_ffff };
    let hw = |i: u32| (value >> (16 * i)) as u16;
    let zeros = (0..halves).filter(|&i| hw(i) == 0).count();
    let ones = (0..halves).filter(|&i| hw(i) == 0xffff).count();
    let mut out = Vec::with_capacity(4);
    if ones > zeros {
        // Start from all ones: movn the first halfword that is not 0xffff.
        let first = (0..halves).find(|&i| hw(i) != 0xffff).unwrap_or(0);
        out.push(movn(sf, rd, !hw(first), 16 * first));
        for i in (first + 1)..halves {
            if hw(i) != 0xffff {
                out.push(movk(sf, rd, hw(i), 16 * i));
            }
        }
    } else {
        let first = (0..halves).find(|&i| hw(i) != 0).unwrap_or(0);
        out.push(movz(sf, rd, hw(first), 16 * first));
        for i in (first + 1)..halves {
            if hw(i) != 0 {
                out.push(movk(sf, rd, hw(i), 16 * i));
            }
        }
    }
    out
}

// ------------------------------------------------------------------ add / sub

const fn addsub_imm(base: u32, sf: bool, rd: Gpr, rn: Gpr, imm: u32) -> Option<u32> {
    if imm < 4096 {
        Some(sf_bit(sf) | base | imm << 10 | rrr(rd, rn, Gpr(0)))
    } else if imm & 0xfff == 0 && imm >> 12 < 4096 {
        // The same 12 bits shifted left by 12.
        Some(sf_bit(sf) | base | 1 << 22 | (imm >> 12) << 10 | rrr(rd, rn, Gpr(0)))
    } else {
        None
    }
}

/// `add rd, rn, #imm` (`rd`/`rn` 31 = sp); imm < 4096, or a multiple of 4096 below 2^24.
pub const fn add_imm(sf: bool, rd: Gpr, rn: Gpr, imm: u32) -> Option<u32> {
    addsub_imm(0x1100_0000, sf, rd, rn, imm)
}

/// `adds rd, rn, #imm` (rd 31 = zr: `cmn`).
pub const fn adds_imm(sf: bool, rd: Gpr, rn: Gpr, imm: u32) -> Option<u32> {
    addsub_imm(0x3100_0000, sf, rd, rn, imm)
}

/// `sub rd, rn, #imm` (`rd`/`rn` 31 = sp).
pub const fn sub_imm(sf: bool, rd: Gpr, rn: Gpr, imm: u32) -> Option<u32> {
    addsub_imm(0x5100_0000, sf, rd, rn, imm)
}

/// `subs rd, rn, #imm` (rd 31 = zr: `cmp`).
pub const fn subs_imm(sf: bool, rd: Gpr, rn: Gpr, imm: u32) -> Option<u32> {
    addsub_imm(0x7100_0000, sf, rd, rn, imm)
}

/// `cmp rn, #imm`.
pub const fn cmp_imm(sf: bool, rn: Gpr, imm: u32) -> Option<u32> {
    subs_imm(sf, XZR, rn, imm)
}

/// `cmn rn, #imm` (compares with `-imm`).
pub const fn cmn_imm(sf: bool, rn: Gpr, imm: u32) -> Option<u32> {
    adds_imm(sf, XZR, rn, imm)
}

/// `mov rd, sp` / `mov sp, rn` (an `add #0`; plain `mov` would read the zero register).
pub const fn mov_sp(rd: Gpr, rn: Gpr) -> u32 {
    0x9100_0000 | rrr(rd, rn, Gpr(0))
}

/// `add rd, rn, rm` (31 = zr).
pub const fn add_reg(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    sf_bit(sf) | 0x0b00_0000 | rrr(rd, rn, rm)
}

/// `sub rd, rn, rm` (31 = zr; `neg rd, rm` is `sub rd, zr, rm`).
pub const fn sub_reg(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    sf_bit(sf) | 0x4b00_0000 | rrr(rd, rn, rm)
}

/// `subs rd, rn, rm`.
pub const fn subs_reg(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    sf_bit(sf) | 0x6b00_0000 | rrr(rd, rn, rm)
}

/// `cmp rn, rm`.
pub const fn cmp_reg(sf: bool, rn: Gpr, rm: Gpr) -> u32 {
    subs_reg(sf, XZR, rn, rm)
}

/// `neg rd, rm`.
pub const fn neg(sf: bool, rd: Gpr, rm: Gpr) -> u32 {
    sub_reg(sf, rd, XZR, rm)
}

// ------------------------------------------------------------------ logical

/// Logical operations (register and immediate forms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Logic {
    And,
    Orr,
    Eor,
    /// `ands`: `and` setting the flags (`tst` with zr as destination).
    Ands,
}

impl Logic {
    const fn opc(self) -> u32 {
        match self {
            Logic::And => 0,
            Logic::Orr => 1,
            Logic::Eor => 2,
            Logic::Ands => 3,
        }
    }
}

/// `and|orr|eor|ands rd, rn, rm` (31 = zr).
pub const fn logic_reg(op: Logic, sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    sf_bit(sf) | op.opc() << 29 | 0x0a00_0000 | rrr(rd, rn, rm)
}

/// `bic rd, rn, rm`: `rn & !rm`.
pub const fn bic_reg(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    logic_reg(Logic::And, sf, rd, rn, rm) | 1 << 21
}

/// `mvn rd, rm` (`orn rd, zr, rm`).
pub const fn mvn(sf: bool, rd: Gpr, rm: Gpr) -> u32 {
    logic_reg(Logic::Orr, sf, rd, XZR, rm) | 1 << 21
}

/// `mov rd, rm` between general registers (`orr rd, zr, rm`); the 32-bit form zero-extends.
pub const fn mov_reg(sf: bool, rd: Gpr, rm: Gpr) -> u32 {
    logic_reg(Logic::Orr, sf, rd, XZR, rm)
}

/// `tst rn, rm`.
pub const fn tst_reg(sf: bool, rn: Gpr, rm: Gpr) -> u32 {
    logic_reg(Logic::Ands, sf, XZR, rn, rm)
}

/// The `(N, immr, imms)` fields of a logical immediate, if `value` is one: a 2-, 4-, 8-, 16-,
/// 32- or 64-bit element, replicated across the register, that is a rotated run of ones (not
/// all zeros, not all ones). For 32-bit operations only the low 32 bits count.
pub fn bitmask_imm(sf: bool, value: u64) -> Option<(u32, u32, u32)> {
    let value = if sf {
        value
    } else {
        let low = value & 0xffff_ffff;
        low | low << 32
    };
    let mask = |bits: u32| {
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    };
    // The smallest element size whose replication gives `value`.
    let mut size = 64u32;
    while size > 2 {
        let half = size / 2;
        if value & mask(half) != (value >> half) & mask(half) {
            break;
        }
        size = half;
    }
    let elem = value & mask(size);
    if elem == 0 || elem == mask(size) {
        return None;
    }
    let ones = elem.count_ones();
    let run = mask(ones);
    let rotl = |x: u64, r: u32| {
        if r == 0 {
            x
        } else {
            ((x << r) | (x >> (size - r))) & mask(size)
        }
    };
    // `elem` is `run` rotated right by `immr`, so rotating it left by `immr` gives `run` back.
    let immr = (0..size).find(|&r| rotl(elem, r) == run)?;
    let n = u32::from(size == 64);
    // imms: the element size in unary-ish high bits (…110xxx for 8 bits) and ones - 1 below.
    let imms = ((!(2 * size - 1)) | (ones - 1)) & 0x3f;
    Some((n, immr, imms))
}

/// `and|orr|eor|ands rd, rn, #value` if `value` is a logical immediate (`rd` 31 = sp except
/// for `ands`, where it is zr).
pub fn logic_imm(op: Logic, sf: bool, rd: Gpr, rn: Gpr, value: u64) -> Option<u32> {
    let (n, immr, imms) = bitmask_imm(sf, value)?;
    Some(
        sf_bit(sf)
            | op.opc() << 29
            | 0x1200_0000
            | n << 22
            | immr << 16
            | imms << 10
            | rrr(rd, rn, Gpr(0)),
    )
}

/// `tst rn, #value`.
pub fn tst_imm(sf: bool, rn: Gpr, value: u64) -> Option<u32> {
    logic_imm(Logic::Ands, sf, XZR, rn, value)
}

// ------------------------------------------------------------------ shifts, multiply, divide

const fn dp2(sf: bool, opcode: u32, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    sf_bit(sf) | 0x1ac0_0000 | opcode << 10 | rrr(rd, rn, rm)
}

/// `udiv rd, rn, rm` (division by zero gives 0).
pub const fn udiv(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    dp2(sf, 0b000010, rd, rn, rm)
}

/// `sdiv rd, rn, rm` (division by zero gives 0; MIN / -1 gives MIN).
pub const fn sdiv(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    dp2(sf, 0b000011, rd, rn, rm)
}

/// `lsl rd, rn, rm` (`lslv`; the count is taken modulo the width).
pub const fn lslv(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    dp2(sf, 0b001000, rd, rn, rm)
}

/// `lsr rd, rn, rm` (`lsrv`).
pub const fn lsrv(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    dp2(sf, 0b001001, rd, rn, rm)
}

/// `asr rd, rn, rm` (`asrv`).
pub const fn asrv(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    dp2(sf, 0b001010, rd, rn, rm)
}

/// `madd rd, rn, rm, ra`: `ra + rn * rm`.
pub const fn madd(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr, ra: Gpr) -> u32 {
    sf_bit(sf) | 0x1b00_0000 | rrr(rd, rn, rm) | ra.num() << 10
}

/// `msub rd, rn, rm, ra`: `ra - rn * rm`.
pub const fn msub(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr, ra: Gpr) -> u32 {
    madd(sf, rd, rn, rm, ra) | 1 << 15
}

/// `mul rd, rn, rm`.
pub const fn mul(sf: bool, rd: Gpr, rn: Gpr, rm: Gpr) -> u32 {
    madd(sf, rd, rn, rm, XZR)
}

/// `ubfm rd, rn, #immr, #imms` (unsigned bitfield move; immediate shifts and zero-extensions
/// are aliases of it).
pub const fn ubfm(sf: bool, rd: Gpr, rn: Gpr, immr: u32, imms: u32) -> u32 {
    let n = if sf { 1 << 22 } else { 0 };
    sf_bit(sf) | 0x5300_0000 | n | (immr & 0x3f) << 16 | (imms & 0x3f) << 10 | rrr(rd, rn, Gpr(0))
}

/// `sbfm rd, rn, #immr, #imms` (signed bitfield move).
pub const fn sbfm(sf: bool, rd: Gpr, rn: Gpr, immr: u32, imms: u32) -> u32 {
    let n = if sf { 1 << 22 } else { 0 };
    sf_bit(sf) | 0x1300_0000 | n | (immr & 0x3f) << 16 | (imms & 0x3f) << 10 | rrr(rd, rn, Gpr(0))
}

const fn width(sf: bool) -> u32 {
    if sf { 64 } else { 32 }
}

/// `lsl rd, rn, #shift` (shift < width).
pub const fn lsl_imm(sf: bool, rd: Gpr, rn: Gpr, shift: u32) -> u32 {
    let w = width(sf);
    let shift = shift % w;
    ubfm(sf, rd, rn, (w - shift) % w, w - 1 - shift)
}

/// `lsr rd, rn, #shift`.
pub const fn lsr_imm(sf: bool, rd: Gpr, rn: Gpr, shift: u32) -> u32 {
    ubfm(sf, rd, rn, shift % width(sf), width(sf) - 1)
}

/// `asr rd, rn, #shift`.
pub const fn asr_imm(sf: bool, rd: Gpr, rn: Gpr, shift: u32) -> u32 {
    sbfm(sf, rd, rn, shift % width(sf), width(sf) - 1)
}

/// `uxtb wd, wn` / `uxth wd, wn`: zero-extend the low 8 or 16 bits (into the whole register).
pub const fn uxt(bits: u32, rd: Gpr, rn: Gpr) -> u32 {
    ubfm(false, rd, rn, 0, bits - 1)
}

/// `sxtb`/`sxth`/`sxtw rd, rn`: sign-extend the low 8, 16 or 32 bits to the operation width.
pub const fn sxt(sf: bool, bits: u32, rd: Gpr, rn: Gpr) -> u32 {
    sbfm(sf, rd, rn, 0, bits - 1)
}

const fn dp1(sf: bool, opcode: u32, rd: Gpr, rn: Gpr) -> u32 {
    sf_bit(sf) | 0x5ac0_0000 | opcode << 10 | rrr(rd, rn, Gpr(0))
}

/// `rev16 rd, rn`: swap the bytes of each halfword.
pub const fn rev16(sf: bool, rd: Gpr, rn: Gpr) -> u32 {
    dp1(sf, 0b000001, rd, rn)
}

/// `rev rd, rn`: reverse all bytes (of the 32- or 64-bit register).
pub const fn rev(sf: bool, rd: Gpr, rn: Gpr) -> u32 {
    dp1(sf, if sf { 0b000011 } else { 0b000010 }, rd, rn)
}

// ------------------------------------------------------------------ loads and stores

/// What a load/store does with the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LdSt {
    Str,
    /// Load, zero-extending.
    Ldr,
    /// Load, sign-extending to 64 bits (`ldrsb`/`ldrsh`/`ldrsw` into an `x` register).
    Ldrs,
}

const fn size_bits(size: Size) -> u32 {
    match size {
        Size::B => 0,
        Size::H => 1,
        Size::W => 2,
        Size::DW => 3,
    }
}

/// `opc` field (bits 22–23) of the load/store register forms.
const fn ldst_opc(op: LdSt) -> u32 {
    match op {
        LdSt::Str => 0,
        LdSt::Ldr => 1,
        LdSt::Ldrs => 2,
    }
}

/// `ldr*/str* rt, [rn, #off]` with an unsigned offset scaled by the size (`rn` 31 = sp).
/// `None` if `off` is negative, misaligned or too large, or for `Ldrs` of 64 bits.
pub const fn ldst_uimm(op: LdSt, size: Size, rt: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    let scale = size_bits(size);
    if matches!((op, size), (LdSt::Ldrs, Size::DW))
        || off < 0
        || off & ((1 << scale) - 1) != 0
        || off >> scale >= 4096
    {
        return None;
    }
    let imm12 = (off >> scale) as u32;
    Some(scale << 30 | 0x3900_0000 | ldst_opc(op) << 22 | imm12 << 10 | rrr(rt, rn, Gpr(0)))
}

/// `ldur*/stur* rt, [rn, #off]`: unscaled signed 9-bit offset.
pub const fn ldst_simm9(op: LdSt, size: Size, rt: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    if matches!((op, size), (LdSt::Ldrs, Size::DW)) || off < -256 || off > 255 {
        return None;
    }
    let imm9 = (off as u32) & 0x1ff;
    Some(
        size_bits(size) << 30
            | 0x3800_0000
            | ldst_opc(op) << 22
            | imm9 << 12
            | rrr(rt, rn, Gpr(0)),
    )
}

/// `ldr*/str* rt, [rn, rm]` (register offset, unscaled). `None` for `Ldrs` of 64 bits.
pub const fn ldst_reg(op: LdSt, size: Size, rt: Gpr, rn: Gpr, rm: Gpr) -> Option<u32> {
    if matches!((op, size), (LdSt::Ldrs, Size::DW)) {
        return None;
    }
    // option = 011 (lsl), S = 0.
    Some(size_bits(size) << 30 | 0x3820_6800 | ldst_opc(op) << 22 | rrr(rt, rn, rm))
}

/// The form of a 64-bit pre/post-indexed access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Index {
    /// `[rn, #off]!`: add `off` to `rn` first.
    Pre,
    /// `[rn], #off`: access at `rn`, then add `off`.
    Post,
}

/// `str xt, [rn, #off]!` / `str xt, [rn], #off` (off in -256..=255).
pub const fn str_x_indexed(index: Index, rt: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    ldst_x_indexed(LdSt::Str, index, rt, rn, off)
}

/// `ldr xt, [rn, #off]!` / `ldr xt, [rn], #off`.
pub const fn ldr_x_indexed(index: Index, rt: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    ldst_x_indexed(LdSt::Ldr, index, rt, rn, off)
}

const fn ldst_x_indexed(op: LdSt, index: Index, rt: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    if off < -256 || off > 255 {
        return None;
    }
    let mode = match index {
        Index::Pre => 0b11,
        Index::Post => 0b01,
    };
    Some(
        0xf800_0000
            | ldst_opc(op) << 22
            | ((off as u32) & 0x1ff) << 12
            | mode << 10
            | rrr(rt, rn, Gpr(0)),
    )
}

/// Addressing of `stp`/`ldp` (64-bit registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairMode {
    /// `[rn], #off`
    Post,
    /// `[rn, #off]!`
    Pre,
    /// `[rn, #off]`
    Offset,
}

const fn pair(load: bool, mode: PairMode, rt: Gpr, rt2: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    if off % 8 != 0 || off < -512 || off > 504 {
        return None;
    }
    let mode = match mode {
        PairMode::Post => 0b001,
        PairMode::Offset => 0b010,
        PairMode::Pre => 0b011,
    };
    let imm7 = ((off / 8) as u32) & 0x7f;
    let l = if load { 1 << 22 } else { 0 };
    Some(0xa800_0000 | mode << 23 | l | imm7 << 15 | rt2.num() << 10 | rn.num() << 5 | rt.num())
}

/// `stp xt, xt2, …` (off a multiple of 8 in -512..=504; `rn` 31 = sp).
pub const fn stp(mode: PairMode, rt: Gpr, rt2: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    pair(false, mode, rt, rt2, rn, off)
}

/// `ldp xt, xt2, …`.
pub const fn ldp(mode: PairMode, rt: Gpr, rt2: Gpr, rn: Gpr, off: i64) -> Option<u32> {
    pair(true, mode, rt, rt2, rn, off)
}

/// `ldarb/ldarh/ldar rt, [rn]`: load-acquire (zero-extending).
pub const fn ldar(size: Size, rt: Gpr, rn: Gpr) -> u32 {
    size_bits(size) << 30 | 0x08df_fc00 | rrr(rt, rn, Gpr(0))
}

/// `stlrb/stlrh/stlr rt, [rn]`: store-release.
pub const fn stlr(size: Size, rt: Gpr, rn: Gpr) -> u32 {
    size_bits(size) << 30 | 0x089f_fc00 | rrr(rt, rn, Gpr(0))
}

const fn ldst_sf(sf: bool) -> u32 {
    if sf { 3 << 30 } else { 2 << 30 }
}

/// `ldaxr rt, [rn]`: load-acquire exclusive (32 or 64 bits).
pub const fn ldaxr(sf: bool, rt: Gpr, rn: Gpr) -> u32 {
    ldst_sf(sf) | 0x085f_fc00 | rrr(rt, rn, Gpr(0))
}

/// `stlxr ws, rt, [rn]`: store-release exclusive; `ws` = 0 on success, 1 on failure.
pub const fn stlxr(sf: bool, rs: Gpr, rt: Gpr, rn: Gpr) -> u32 {
    ldst_sf(sf) | 0x0800_fc00 | rrr(rt, rn, rs)
}

/// LSE atomic memory operations (ARMv8.1), all in their acquire-release (`al`) form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lse {
    /// `ldaddal`: memory += rs.
    Add,
    /// `ldclral`: memory &= !rs.
    Clr,
    /// `ldeoral`: memory ^= rs.
    Eor,
    /// `ldsetal`: memory |= rs.
    Set,
    /// `swpal`: memory = rs.
    Swp,
}

/// `ld<op>al rs, rt, [rn]` / `swpal rs, rt, [rn]`: atomically apply `op` with `rs` to the
/// memory at `rn`; `rt` receives the old value (zr to discard it).
pub const fn lse(op: Lse, sf: bool, rs: Gpr, rt: Gpr, rn: Gpr) -> u32 {
    let opc = match op {
        Lse::Add => 0x0000,
        Lse::Clr => 0x1000,
        Lse::Eor => 0x2000,
        Lse::Set => 0x3000,
        Lse::Swp => 0x8000,
    };
    ldst_sf(sf) | 0x38e0_0000 | opc | rrr(rt, rn, rs)
}

/// `casal rs, rt, [rn]`: if memory == rs, store rt; rs receives the old value.
pub const fn casal(sf: bool, rs: Gpr, rt: Gpr, rn: Gpr) -> u32 {
    ldst_sf(sf) | 0x08e0_fc00 | rrr(rt, rn, rs)
}

/// `dmb ish`: full barrier for the inner-shareable domain.
pub const DMB_ISH: u32 = 0xd503_3bbf;
/// `isb`.
pub const ISB: u32 = 0xd503_3fdf;

// ------------------------------------------------------------------ branches

const fn fits_signed(v: i64, bits: u32) -> bool {
    let half = 1i64 << (bits - 1);
    v >= -half && v < half
}

/// Word offset of a branch of `bits` immediate bits, if `off` (bytes) is aligned and in range.
const fn word_offset(off: i64, bits: u32) -> Option<u32> {
    if off & 3 != 0 || !fits_signed(off >> 2, bits) {
        return None;
    }
    Some(((off >> 2) as u32) & ((1 << bits) - 1))
}

/// `b` to `off` bytes from this instruction (±128 MiB).
pub const fn b(off: i64) -> Option<u32> {
    match word_offset(off, 26) {
        Some(imm) => Some(0x1400_0000 | imm),
        None => None,
    }
}

/// `bl` to `off` bytes from this instruction (±128 MiB).
pub const fn bl(off: i64) -> Option<u32> {
    match word_offset(off, 26) {
        Some(imm) => Some(0x9400_0000 | imm),
        None => None,
    }
}

/// `b.cond` (±1 MiB).
pub const fn b_cond(cond: Cond, off: i64) -> Option<u32> {
    match word_offset(off, 19) {
        Some(imm) => Some(0x5400_0000 | imm << 5 | cond as u32),
        None => None,
    }
}

/// `cbz rt, off` (±1 MiB).
pub const fn cbz(sf: bool, rt: Gpr, off: i64) -> Option<u32> {
    match word_offset(off, 19) {
        Some(imm) => Some(sf_bit(sf) | 0x3400_0000 | imm << 5 | rt.num()),
        None => None,
    }
}

/// `cbnz rt, off` (±1 MiB).
pub const fn cbnz(sf: bool, rt: Gpr, off: i64) -> Option<u32> {
    match cbz(sf, rt, off) {
        Some(w) => Some(w | 1 << 24),
        None => None,
    }
}

/// `br rn`.
pub const fn br(rn: Gpr) -> u32 {
    0xd61f_0000 | rn.num() << 5
}

/// `blr rn`.
pub const fn blr(rn: Gpr) -> u32 {
    0xd63f_0000 | rn.num() << 5
}

/// `ret rn` (`ret` alone is `ret x30`). Not subject to BTI checks.
pub const fn ret(rn: Gpr) -> u32 {
    0xd65f_0000 | rn.num() << 5
}

/// `adr rd, off` (±1 MiB, byte granular).
pub const fn adr(rd: Gpr, off: i64) -> Option<u32> {
    if !fits_signed(off, 21) {
        return None;
    }
    let imm = off as u32;
    Some(0x1000_0000 | (imm & 3) << 29 | ((imm >> 2) & 0x7_ffff) << 5 | rd.num())
}

/// `ldr rt, off`: load from the PC-relative literal `off` bytes away (word aligned, ±1 MiB).
pub const fn ldr_literal(sf: bool, rt: Gpr, off: i64) -> Option<u32> {
    let opc = if sf { 0x5800_0000 } else { 0x1800_0000 };
    match word_offset(off, 19) {
        Some(imm) => Some(opc | imm << 5 | rt.num()),
        None => None,
    }
}

// ------------------------------------------------------------------ hints

/// `nop`.
pub const NOP: u32 = 0xd503_201f;
/// `bti c`: landing pad for indirect calls (`blr`, and `br x16/x17`).
pub const BTI_C: u32 = 0xd503_245f;
/// `bti j`: landing pad for indirect jumps (`br`).
pub const BTI_J: u32 = 0xd503_249f;
/// `bti jc`: landing pad for both.
pub const BTI_JC: u32 = 0xd503_24df;
/// `paciasp`: sign x30 with key A and sp as modifier (also an implicit `bti c`).
pub const PACIASP: u32 = 0xd503_233f;
/// `autiasp`: authenticate x30 signed by `paciasp` with the same sp.
pub const AUTIASP: u32 = 0xd503_23bf;
/// `udf #0`: permanently undefined (what freed arena text holds).
pub const UDF: u32 = 0;

/// `brk #imm`.
pub const fn brk(imm: u16) -> u32 {
    0xd420_0000 | (imm as u32) << 5
}

/// The target of a `b`/`bl` word at `pc`, if `word` is one: `(is_bl, target)`.
pub fn decode_branch(pc: usize, word: u32) -> Option<(bool, usize)> {
    let link = match word & 0xfc00_0000 {
        0x1400_0000 => false,
        0x9400_0000 => true,
        _ => return None,
    };
    // Sign-extend the 26-bit word offset.
    let imm = ((word << 6) as i32 >> 6) as i64 * 4;
    Some((link, (pc as i64).wrapping_add(imm) as usize))
}
