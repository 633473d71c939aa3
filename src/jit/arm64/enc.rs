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

    /// The register number, 0–31, as encoded in a 5-bit register field.
    pub const fn num(self) -> u32 {
        self.0 as u32
    }
}

/// `x0`: AAPCS64 argument 0 and result register; eBPF r1 in the JIT.
pub const X0: Gpr = Gpr(0);
/// `x1`: AAPCS64 argument 1; eBPF r2.
pub const X1: Gpr = Gpr(1);
/// `x2`: AAPCS64 argument 2; eBPF r3.
pub const X2: Gpr = Gpr(2);
/// `x3`: AAPCS64 argument 3; eBPF r4.
pub const X3: Gpr = Gpr(3);
/// `x4`: AAPCS64 argument 4; eBPF r5.
pub const X4: Gpr = Gpr(4);
/// `x5`: AAPCS64 argument 5; the `RunContext` pointer at entry.
pub const X5: Gpr = Gpr(5);
/// `x7`: caller-saved; eBPF r0 in the JIT.
pub const X7: Gpr = Gpr(7);
/// `x9`: caller-saved scratch; the caller's return address at entry (`mov x9, x30`).
pub const X9: Gpr = Gpr(9);
/// `x10`: caller-saved scratch; the PLT's branch register.
pub const X10: Gpr = Gpr(10);
/// `x11`: caller-saved scratch; the address of a checked access.
pub const X11: Gpr = Gpr(11);
/// `x12`: caller-saved scratch; the slow-path thunk's return address.
pub const X12: Gpr = Gpr(12);
/// `x13`: caller-saved scratch.
pub const X13: Gpr = Gpr(13);
/// `x14`: caller-saved scratch.
pub const X14: Gpr = Gpr(14);
/// `x19`: callee-saved; eBPF r6.
pub const X19: Gpr = Gpr(19);
/// `x20`: callee-saved; eBPF r7.
pub const X20: Gpr = Gpr(20);
/// `x21`: callee-saved; eBPF r8.
pub const X21: Gpr = Gpr(21);
/// `x22`: callee-saved; eBPF r9.
pub const X22: Gpr = Gpr(22);
/// `x25`: callee-saved; eBPF r10.
pub const X25: Gpr = Gpr(25);
/// `x26`: callee-saved; the `RunContext` pointer while a program runs.
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
    /// Equal (Z = 1).
    Eq = 0,
    /// Not equal (Z = 0).
    Ne = 1,
    /// Unsigned ≥ (carry set).
    Hs = 2,
    /// Unsigned <.
    Lo = 3,
    /// Negative (N = 1).
    Mi = 4,
    /// Positive or zero (N = 0).
    Pl = 5,
    /// Signed overflow (V = 1).
    Vs = 6,
    /// No signed overflow (V = 0).
    Vc = 7,
    /// Unsigned >.
    Hi = 8,
    /// Unsigned ≤.
    Ls = 9,
    /// Signed ≥ (N = V).
    Ge = 10,
    /// Signed < (N ≠ V).
    Lt = 11,
    /// Signed > (Z = 0 and N = V).
    Gt = 12,
    /// Signed ≤ (Z = 1 or N ≠ V).
    Le = 13,
    /// Always.
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
    /// `and`: bitwise AND (`opc` 00).
    And,
    /// `orr`: bitwise inclusive OR (`opc` 01).
    Orr,
    /// `eor`: bitwise exclusive OR (`opc` 10).
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
    /// Store the low `size` bytes of the register.
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
        size_bits(size) << 30 | 0x3800_0000 | ldst_opc(op) << 22 | imm9 << 12 | rrr(rt, rn, Gpr(0)),
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

#[cfg(test)]
mod tests {
    //! Every encoder against capstone (an independent disassembler), with the expected text
    //! written out here; a few words also against hand-checked values from the Arm ARM.
    use super::*;
    use capstone::arch::BuildsCapstone;
    use capstone::prelude::*;

    const BASE: u64 = 0x1000;

    fn cs() -> Capstone {
        Capstone::new()
            .arm64()
            .mode(arch::arm64::ArchMode::Arm)
            .build()
            .expect("capstone supports arm64")
    }

    /// Capstone's text for `word` at address [`BASE`].
    fn dis(cs: &Capstone, word: u32) -> String {
        let insns = cs
            .disasm_count(&word.to_le_bytes(), BASE, 1)
            .expect("disassembles");
        let insn = insns.iter().next().unwrap_or_else(|| {
            panic!("{word:#010x} is not a valid instruction");
        });
        format!(
            "{} {}",
            insn.mnemonic().unwrap_or(""),
            insn.op_str().unwrap_or("")
        )
        .trim()
        .to_string()
    }

    fn check(cases: &[(u32, &str)]) {
        let cs = cs();
        let mut bad = Vec::new();
        for &(word, want) in cases {
            let got = dis(&cs, word);
            if got != want {
                bad.push(format!("{word:#010x}: capstone `{got}`, expected `{want}`"));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    fn x(r: Gpr) -> String {
        match r.num() {
            31 => "xzr".into(),
            n => format!("x{n}"),
        }
    }

    fn w(r: Gpr) -> String {
        match r.num() {
            31 => "wzr".into(),
            n => format!("w{n}"),
        }
    }

    fn reg(sf: bool, r: Gpr) -> String {
        if sf { x(r) } else { w(r) }
    }

    /// An unsigned immediate as capstone prints those: decimal up to 9, else hex.
    fn uimm(v: u64) -> String {
        if v > 9 {
            format!("#{v:#x}")
        } else {
            format!("#{v}")
        }
    }

    /// Capstone's immediate notation: decimal up to 9, hex above, sign in front.
    fn imm(v: i64) -> String {
        let mag = v.unsigned_abs();
        let sign = if v < 0 { "-" } else { "" };
        if mag > 9 {
            format!("#{sign}{mag:#x}")
        } else {
            format!("#{sign}{mag}")
        }
    }

    const REGS: [Gpr; 6] = [X0, X7, X11, X19, X25, LR];

    #[test]
    fn hand_checked_words() {
        // Values from the Arm ARM's encoding diagrams (and the Linux JIT's well-known words).
        assert_eq!(NOP, 0xd503_201f);
        assert_eq!(mov_reg(true, X9, LR), 0xaa1e_03e9);
        assert_eq!(mov_sp(FP, SP), 0x9100_03fd);
        assert_eq!(stp(PairMode::Pre, FP, LR, SP, -16), Some(0xa9bf_7bfd));
        assert_eq!(ldp(PairMode::Post, FP, LR, SP, 16), Some(0xa8c1_7bfd));
        assert_eq!(ret(LR), 0xd65f_03c0);
        assert_eq!(movz(true, X0, 42, 0), 0xd280_0540);
        assert_eq!(ldr_literal(true, X10, 8), Some(0x5800_004a));
        assert_eq!(br(X10), 0xd61f_0140);
    }

    #[test]
    fn moves_of_immediates() {
        let mut cases = vec![
            (
                movz(true, X1, 0x1234, 16),
                "mov x1, #0x12340000".to_string(),
            ),
            (
                movk(true, X1, 0xbeef, 48),
                "movk x1, #0xbeef, lsl #48".into(),
            ),
            (
                movk(false, X1, 0xbeef, 16),
                "movk w1, #0xbeef, lsl #16".into(),
            ),
            (movn(true, X2, 0, 0), "mov x2, #-1".into()),
            (movn(false, X2, 5, 0), "mov w2, #-6".into()),
        ];
        for r in REGS {
            cases.push((movz(true, r, 7, 0), format!("mov {}, #7", x(r))));
            cases.push((movz(false, r, 0xffff, 0), format!("mov {}, #0xffff", w(r))));
        }
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
    }

    /// `mov_imm` sequences compute their value (simulated) in at most 4 words.
    #[test]
    fn mov_imm_sequences_compute_their_value() {
        let values = [
            0u64,
            1,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            0x8000_0000,
            u64::MAX,
            u64::MAX - 0x1234,
            0xffff_ffff_0000_0000,
            0x1234_5678_9abc_def0,
            0xffff_1234_ffff_ffff,
            0x0000_ffff_0000_ffff,
        ];
        for sf in [true, false] {
            for &v in &values {
                let words = mov_imm(sf, X3, v);
                assert!(!words.is_empty() && words.len() <= if sf { 4 } else { 2 });
                let mut r: u64 = 0xdead_beef_dead_beef;
                for word in &words {
                    let hw = (word >> 21) & 3;
                    let imm = ((word >> 5) & 0xffff) as u64;
                    let shifted = imm << (16 * hw);
                    r = match word & 0x7f80_0000 {
                        0x5280_0000 => shifted,
                        0x1280_0000 => !shifted,
                        0x7280_0000 => (r & !(0xffff << (16 * hw))) | shifted,
                        _ => panic!("{word:#x} is not a move-wide"),
                    };
                    if !sf {
                        r &= 0xffff_ffff;
                    }
                }
                let want = if sf { v } else { v & 0xffff_ffff };
                assert_eq!(r, want, "sf {sf} value {v:#x}: {words:08x?}");
            }
        }
    }

    #[test]
    fn add_sub_compare() {
        let mut cases: Vec<(u32, String)> = Vec::new();
        for sf in [true, false] {
            for (rd, rn, rm) in [(X0, X1, X2), (X7, X19, X25), (LR, X11, X0)] {
                let (d, n, m) = (reg(sf, rd), reg(sf, rn), reg(sf, rm));
                cases.push((add_reg(sf, rd, rn, rm), format!("add {d}, {n}, {m}")));
                cases.push((sub_reg(sf, rd, rn, rm), format!("sub {d}, {n}, {m}")));
                cases.push((subs_reg(sf, rd, rn, rm), format!("subs {d}, {n}, {m}")));
                cases.push((cmp_reg(sf, rn, rm), format!("cmp {n}, {m}")));
                cases.push((neg(sf, rd, rm), format!("neg {d}, {m}")));
                for v in [0u32, 1, 9, 10, 4095] {
                    let i = imm(v as i64);
                    cases.push((
                        add_imm(sf, rd, rn, v).unwrap(),
                        format!("add {d}, {n}, {i}"),
                    ));
                    cases.push((
                        sub_imm(sf, rd, rn, v).unwrap(),
                        format!("sub {d}, {n}, {i}"),
                    ));
                    cases.push((cmp_imm(sf, rn, v).unwrap(), format!("cmp {n}, {i}")));
                    cases.push((cmn_imm(sf, rn, v).unwrap(), format!("cmn {n}, {i}")));
                }
                cases.push((
                    add_imm(sf, rd, rn, 0x5000).unwrap(),
                    format!("add {d}, {n}, #5, lsl #12"),
                ));
                cases.push((
                    subs_imm(sf, rd, rn, 0xfff000).unwrap(),
                    format!("subs {d}, {n}, #0xfff, lsl #12"),
                ));
            }
        }
        cases.push((
            add_imm(true, SP, SP, 16).unwrap(),
            "add sp, sp, #0x10".into(),
        ));
        cases.push((
            sub_imm(true, SP, FP, 48).unwrap(),
            "sub sp, x29, #0x30".into(),
        ));
        cases.push((mov_sp(FP, SP), "mov x29, sp".into()));
        cases.push((mov_sp(SP, X9), "mov sp, x9".into()));
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
        assert_eq!(add_imm(true, X0, X0, 4096 + 1), None);
        assert_eq!(sub_imm(true, X0, X0, 1 << 24), None);
    }

    #[test]
    fn logical_register_and_immediate() {
        let mut cases: Vec<(u32, String)> = Vec::new();
        for sf in [true, false] {
            let (d, n, m) = (reg(sf, X3), reg(sf, X20), reg(sf, X13));
            for (op, name) in [
                (Logic::And, "and"),
                (Logic::Orr, "orr"),
                (Logic::Eor, "eor"),
                (Logic::Ands, "ands"),
            ] {
                cases.push((
                    logic_reg(op, sf, X3, X20, X13),
                    format!("{name} {d}, {n}, {m}"),
                ));
            }
            cases.push((bic_reg(sf, X3, X20, X13), format!("bic {d}, {n}, {m}")));
            cases.push((mvn(sf, X3, X13), format!("mvn {d}, {m}")));
            cases.push((mov_reg(sf, X3, X13), format!("mov {d}, {m}")));
            cases.push((tst_reg(sf, X20, X13), format!("tst {n}, {m}")));
        }
        // Logical immediates of every element size, rotated runs, both widths.
        let imms64 = [
            0x5555_5555_5555_5555u64,
            0x3333_3333_3333_3333,
            0x0f0f_0f0f_0f0f_0f0f,
            0x00ff_00ff_00ff_00ff,
            0x0000_ffff_0000_ffff,
            0x0000_0000_ffff_ffff,
            0xffff_ffff_0000_0000,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0001,
            1,
            7,
            0xff0,
            0xc000_0000_0000_0003,
        ];
        for v in imms64 {
            cases.push((
                logic_imm(Logic::And, true, X1, X2, v).unwrap(),
                format!("and x1, x2, {}", uimm(v)),
            ));
            cases.push((
                logic_imm(Logic::Orr, true, X1, X2, v).unwrap(),
                format!("orr x1, x2, {}", uimm(v)),
            ));
            // Capstone prints the `tst` alias's immediate as signed.
            cases.push((
                tst_imm(true, X2, v).unwrap(),
                format!("tst x2, {}", imm(v as i64)),
            ));
        }
        for v in [
            0x5555_5555u64,
            0xffff,
            0x8000_0001,
            0xfffffffe,
            1,
            0x00ff_00ff,
        ] {
            cases.push((
                logic_imm(Logic::Eor, false, X1, X2, v).unwrap(),
                format!("eor w1, w2, {}", uimm(v)),
            ));
        }
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
        for v in [0u64, u64::MAX, 0x1234, 0x5] {
            assert_eq!(bitmask_imm(true, v), None, "{v:#x}");
        }
        assert_eq!(bitmask_imm(false, 0xffff_ffff), None);
        assert_eq!(bitmask_imm(false, 0), None);
    }

    #[test]
    fn shifts_multiply_divide_extend_reverse() {
        let mut cases: Vec<(u32, String)> = Vec::new();
        for sf in [true, false] {
            let (d, n, m) = (reg(sf, X7), reg(sf, X1), reg(sf, X22));
            cases.push((lslv(sf, X7, X1, X22), format!("lsl {d}, {n}, {m}")));
            cases.push((lsrv(sf, X7, X1, X22), format!("lsr {d}, {n}, {m}")));
            cases.push((asrv(sf, X7, X1, X22), format!("asr {d}, {n}, {m}")));
            cases.push((udiv(sf, X7, X1, X22), format!("udiv {d}, {n}, {m}")));
            cases.push((sdiv(sf, X7, X1, X22), format!("sdiv {d}, {n}, {m}")));
            cases.push((mul(sf, X7, X1, X22), format!("mul {d}, {n}, {m}")));
            let a = reg(sf, X13);
            cases.push((
                madd(sf, X7, X1, X22, X13),
                format!("madd {d}, {n}, {m}, {a}"),
            ));
            cases.push((
                msub(sf, X7, X1, X22, X13),
                format!("msub {d}, {n}, {m}, {a}"),
            ));
            let width = if sf { 64 } else { 32 };
            for s in [1, 5, 13, width - 1] {
                let i = imm(s as i64);
                cases.push((lsl_imm(sf, X7, X1, s), format!("lsl {d}, {n}, {i}")));
                cases.push((lsr_imm(sf, X7, X1, s), format!("lsr {d}, {n}, {i}")));
                cases.push((asr_imm(sf, X7, X1, s), format!("asr {d}, {n}, {i}")));
            }
            cases.push((rev(sf, X7, X1), format!("rev {d}, {n}")));
            cases.push((rev16(sf, X7, X1), format!("rev16 {d}, {n}")));
            cases.push((sxt(sf, 8, X7, X1), format!("sxtb {d}, w1")));
            cases.push((sxt(sf, 16, X7, X1), format!("sxth {d}, w1")));
        }
        cases.push((sxt(true, 32, X7, X1), "sxtw x7, w1".into()));
        cases.push((uxt(8, X7, X1), "uxtb w7, w1".into()));
        cases.push((uxt(16, X7, X1), "uxth w7, w1".into()));
        // A zero shift of a 32-bit value is a zero-extending move.
        cases.push((lsl_imm(false, X7, X7, 0), "lsr w7, w7, #0".into()));
        cases.push((ubfm(true, X1, X2, 4, 11), "ubfx x1, x2, #4, #8".into()));
        cases.push((sbfm(true, X1, X2, 4, 11), "sbfx x1, x2, #4, #8".into()));
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
    }

    #[test]
    fn loads_and_stores() {
        let mut cases: Vec<(u32, String)> = Vec::new();
        let names = [
            (
                Size::B,
                "strb",
                "ldrb",
                Some("ldrsb"),
                "sturb",
                "ldurb",
                Some("ldursb"),
            ),
            (
                Size::H,
                "strh",
                "ldrh",
                Some("ldrsh"),
                "sturh",
                "ldurh",
                Some("ldursh"),
            ),
            (
                Size::W,
                "str",
                "ldr",
                Some("ldrsw"),
                "stur",
                "ldur",
                Some("ldursw"),
            ),
            (Size::DW, "str", "ldr", None, "stur", "ldur", None),
        ];
        for (size, st, ld, lds, stu, ldu, ldsu) in names {
            let t = if size == Size::DW { "x3" } else { "w3" };
            let scaled = size.bytes() as i64 * 5;
            let s = imm(scaled);
            let u = |op, rt| ldst_uimm(op, size, rt, X20, scaled).unwrap();
            cases.push((u(LdSt::Str, X3), format!("{st} {t}, [x20, {s}]")));
            cases.push((u(LdSt::Ldr, X3), format!("{ld} {t}, [x20, {s}]")));
            cases.push((
                ldst_uimm(LdSt::Ldr, size, X3, SP, 0).unwrap(),
                format!("{ld} {t}, [sp]"),
            ));
            let n = |op| ldst_simm9(op, size, X3, X25, -256).unwrap();
            cases.push((n(LdSt::Str), format!("{stu} {t}, [x25, #-0x100]")));
            cases.push((n(LdSt::Ldr), format!("{ldu} {t}, [x25, #-0x100]")));
            let r = |op| ldst_reg(op, size, X3, X11, X14).unwrap();
            cases.push((r(LdSt::Str), format!("{st} {t}, [x11, x14]")));
            cases.push((r(LdSt::Ldr), format!("{ld} {t}, [x11, x14]")));
            if let (Some(lds), Some(ldsu)) = (lds, ldsu) {
                cases.push((u(LdSt::Ldrs, X3), format!("{lds} x3, [x20, {s}]")));
                cases.push((n(LdSt::Ldrs), format!("{ldsu} x3, [x25, #-0x100]")));
                cases.push((r(LdSt::Ldrs), format!("{lds} x3, [x11, x14]")));
            } else {
                assert_eq!(ldst_uimm(LdSt::Ldrs, size, X3, X20, 8), None);
            }
            // ldar/stlr of every size.
            let (sfx, t) = match size {
                Size::B => ("b", "w3"),
                Size::H => ("h", "w3"),
                Size::W => ("", "w3"),
                Size::DW => ("", "x3"),
            };
            cases.push((ldar(size, X3, X11), format!("ldar{sfx} {t}, [x11]")));
            cases.push((stlr(size, X3, X11), format!("stlr{sfx} {t}, [x11]")));
        }
        cases.push((
            str_x_indexed(Index::Pre, LR, SP, -16).unwrap(),
            "str x30, [sp, #-0x10]!".into(),
        ));
        cases.push((
            ldr_x_indexed(Index::Post, LR, SP, 16).unwrap(),
            "ldr x30, [sp], #0x10".into(),
        ));
        for (mode, text) in [
            (PairMode::Pre, "[sp, #-0x30]!"),
            (PairMode::Offset, "[sp, #-0x30]"),
            (PairMode::Post, "[sp], #-0x30"),
        ] {
            cases.push((
                stp(mode, X19, X20, SP, -48).unwrap(),
                format!("stp x19, x20, {text}"),
            ));
            cases.push((
                ldp(mode, X0, X1, SP, -48).unwrap(),
                format!("ldp x0, x1, {text}"),
            ));
        }
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
        assert_eq!(
            ldst_uimm(LdSt::Ldr, Size::DW, X0, X1, 4),
            None,
            "misaligned"
        );
        assert_eq!(ldst_uimm(LdSt::Ldr, Size::B, X0, X1, 4096), None);
        assert_eq!(ldst_simm9(LdSt::Ldr, Size::B, X0, X1, 256), None);
        assert_eq!(stp(PairMode::Pre, X0, X1, SP, 512), None);
    }

    #[test]
    fn atomics() {
        let mut cases: Vec<(u32, String)> = Vec::new();
        for sf in [true, false] {
            let (s, t) = (reg(sf, X1), reg(sf, X13));
            for (op, name) in [
                (Lse::Add, "ldaddal"),
                (Lse::Clr, "ldclral"),
                (Lse::Eor, "ldeoral"),
                (Lse::Set, "ldsetal"),
                (Lse::Swp, "swpal"),
            ] {
                cases.push((lse(op, sf, X1, X13, X11), format!("{name} {s}, {t}, [x11]")));
            }
            cases.push((
                casal(sf, X7, X1, X11),
                format!("casal {}, {s}, [x11]", reg(sf, X7)),
            ));
            cases.push((ldaxr(sf, X13, X11), format!("ldaxr {t}, [x11]")));
            cases.push((stlxr(sf, X9, X1, X11), format!("stlxr w9, {s}, [x11]")));
        }
        cases.push((DMB_ISH, "dmb ish".into()));
        cases.push((ISB, "isb".into()));
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
    }

    #[test]
    fn branches_and_pc_relative() {
        let at = |off: i64| imm(BASE as i64 + off);
        let mut cases: Vec<(u32, String)> = Vec::new();
        for off in [-4096i64, -4, 0, 8, 0x7fc] {
            cases.push((b(off).unwrap(), format!("b {}", at(off))));
            cases.push((bl(off).unwrap(), format!("bl {}", at(off))));
            cases.push((b_cond(Cond::Hi, off).unwrap(), format!("b.hi {}", at(off))));
            cases.push((
                cbz(true, X10, off).unwrap(),
                format!("cbz x10, {}", at(off)),
            ));
            cases.push((
                cbnz(false, X9, off).unwrap(),
                format!("cbnz w9, {}", at(off)),
            ));
            cases.push((adr(X12, off).unwrap(), format!("adr x12, {}", at(off))));
            cases.push((
                ldr_literal(true, X10, off).unwrap(),
                format!("ldr x10, {}", at(off)),
            ));
        }
        cases.push((adr(X12, 3).unwrap(), format!("adr x12, {}", at(3))));
        for (c, name) in [
            (Cond::Eq, "eq"),
            (Cond::Ne, "ne"),
            (Cond::Hs, "hs"),
            (Cond::Lo, "lo"),
            (Cond::Ls, "ls"),
            (Cond::Ge, "ge"),
            (Cond::Lt, "lt"),
            (Cond::Gt, "gt"),
            (Cond::Le, "le"),
        ] {
            cases.push((b_cond(c, 16).unwrap(), format!("b.{name} {}", at(16))));
            assert_eq!(c.invert().invert(), c);
        }
        cases.push((br(X10), "br x10".into()));
        cases.push((blr(Gpr::new(16)), "blr x16".into()));
        cases.push((ret(LR), "ret".into()));
        cases.push((ret(X12), "ret x12".into()));
        let cases: Vec<_> = cases.iter().map(|(w, s)| (*w, s.as_str())).collect();
        check(&cases);
        // Range limits.
        assert!(b((128 << 20) - 4).is_some());
        assert_eq!(b(128 << 20), None);
        assert!(bl(-(128 << 20)).is_some());
        assert_eq!(bl(-(128 << 20) - 4), None);
        assert_eq!(b(2), None);
        assert!(b_cond(Cond::Eq, (1 << 20) - 4).is_some());
        assert_eq!(b_cond(Cond::Eq, 1 << 20), None);
        assert_eq!(adr(X0, 1 << 20), None);
        for off in [-(128i64 << 20), -4, 0, 4, (128 << 20) - 4] {
            assert_eq!(
                decode_branch(0x10_0000_0000, bl(off).unwrap()),
                Some((true, (0x10_0000_0000i64 + off) as usize))
            );
            assert_eq!(
                decode_branch(0x10_0000_0000, b(off).unwrap()),
                Some((false, (0x10_0000_0000i64 + off) as usize))
            );
        }
        assert_eq!(decode_branch(0, NOP), None);
    }

    #[test]
    fn hints() {
        check(&[
            (NOP, "nop"),
            (BTI_C, "bti c"),
            (BTI_J, "bti j"),
            (BTI_JC, "bti jc"),
            (PACIASP, "paciasp"),
            (AUTIASP, "autiasp"),
            (brk(1), "brk #1"),
            (UDF, "udf #0"),
        ]);
    }
}
