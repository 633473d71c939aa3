//! A minimal x86-64 encoder: exactly the instruction forms the eBPF JIT emits, one small method
//! each, checked against iced-x86's decoder in the tests below.
//!
//! Conventions: `w64` selects the 64-bit operand size (REX.W) over 32 bits. 32-bit forms zero the
//! upper half of a destination register, which eBPF's 32-bit ALU relies on. Memory operands are
//! always `[base + disp]`. Branches to a [`Label`] are resolved by [`Asm::finish`], so the emitted
//! bytes are position independent: every internal call or jump is relative.

use thiserror::Error;

/// A general-purpose register; the value is its hardware number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Gpr {
    /// `rax` (0): implicit operand of `div`, `idiv`, `cqo`/`cdq` and `cmpxchg`.
    Rax = 0,
    /// `rcx` (1): `cl` is the count of [`Asm::shift_cl`].
    Rcx,
    /// `rdx` (2): high half of the `div`/`idiv` dividend, and their remainder.
    Rdx,
    /// `rbx` (3).
    Rbx,
    /// `rsp` (4): the stack pointer; as a memory base it needs a SIB byte (emitted for it).
    Rsp,
    /// `rbp` (5): as a memory base it always takes a displacement (emitted for it).
    Rbp,
    /// `rsi` (6): its byte form `sil` needs a REX prefix (emitted for it).
    Rsi,
    /// `rdi` (7): its byte form `dil` needs a REX prefix (emitted for it).
    Rdi,
    /// `r8` (8); r8–r15 need a REX prefix.
    R8,
    /// `r9` (9).
    R9,
    /// `r10` (10).
    R10,
    /// `r11` (11).
    R11,
    /// `r12` (12): like `rsp`, as a memory base it needs a SIB byte.
    R12,
    /// `r13` (13): like `rbp`, as a memory base it always takes a displacement.
    R13,
    /// `r14` (14).
    R14,
    /// `r15` (15).
    R15,
}

impl Gpr {
    /// All sixteen registers, in hardware-number order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// Low three bits (ModRM / opcode field).
    const fn low(self) -> u8 {
        self as u8 & 7
    }

    /// The REX extension bit.
    const fn ext(self) -> u8 {
        (self as u8 >> 3) & 1
    }

    /// spl/bpl/sil/dil exist only with a REX prefix; without one the same encodings mean
    /// ah/ch/dh/bh.
    const fn byte_needs_rex(self) -> bool {
        matches!(self, Gpr::Rsp | Gpr::Rbp | Gpr::Rsi | Gpr::Rdi)
    }
}

/// Operand size of memory accesses and of the few byte/word forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpSize {
    /// Byte, 8 bits.
    B,
    /// Word, 16 bits (operand-size prefix `66`).
    W,
    /// Doubleword, 32 bits.
    D,
    /// Quadword, 64 bits (REX.W).
    Q,
}

/// A memory operand `[base + disp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mem {
    /// Base register; any of the sixteen.
    pub base: Gpr,
    /// Signed displacement, encoded as disp8 when it fits in 8 bits, else disp32.
    pub disp: i32,
}

impl Mem {
    /// The operand `[base + disp]`.
    pub const fn new(base: Gpr, disp: i32) -> Mem {
        Mem { base, disp }
    }
}

/// The r/m operand of a ModRM byte.
#[derive(Clone, Copy)]
enum Rm {
    Reg(Gpr),
    Mem(Mem),
}

/// Classic two-operand ALU operations; the value is the opcode row (and `/digit` of the
/// immediate forms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AluOp {
    /// `add` (`01 /r`, `03 /r`, `81 /0`, `83 /0`).
    Add = 0,
    /// `or` (`09 /r`, `0B /r`, `81 /1`, `83 /1`).
    Or = 1,
    /// `and` (`21 /r`, `23 /r`, `81 /4`, `83 /4`).
    And = 4,
    /// `sub` (`29 /r`, `2B /r`, `81 /5`, `83 /5`).
    Sub = 5,
    /// `xor` (`31 /r`, `33 /r`, `81 /6`, `83 /6`).
    Xor = 6,
    /// `cmp` (`39 /r`, `3B /r`, `81 /7`, `83 /7`): subtracts for the flags only.
    Cmp = 7,
}

/// Shifts and rotates; the value is the `/digit` of `C1`/`D3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShiftOp {
    /// `rol`: rotate left.
    Rol = 0,
    /// `shl`: shift left, filling with zeros.
    Shl = 4,
    /// `shr`: logical shift right, filling with zeros.
    Shr = 5,
    /// `sar`: arithmetic shift right, filling with copies of the sign bit.
    Sar = 7,
}

/// Branch conditions (the low nibble of `Jcc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    /// Unsigned below (CF).
    B = 0x2,
    /// Unsigned above or equal (CF = 0).
    Ae = 0x3,
    /// Equal (ZF = 1).
    E = 0x4,
    /// Not equal (ZF = 0).
    Ne = 0x5,
    /// Unsigned below or equal (CF = 1 or ZF = 1).
    Be = 0x6,
    /// Unsigned above (CF = 0 and ZF = 0).
    A = 0x7,
    /// Signed less.
    L = 0xc,
    /// Signed greater or equal (SF = OF).
    Ge = 0xd,
    /// Signed less or equal (ZF = 1 or SF ≠ OF).
    Le = 0xe,
    /// Signed greater (ZF = 0 and SF = OF).
    G = 0xf,
}

impl Cond {
    /// The condition that holds exactly when `self` does not (x86 condition codes come in
    /// pairs differing in the low bit).
    pub fn invert(self) -> Cond {
        match self {
            Cond::B => Cond::Ae,
            Cond::Ae => Cond::B,
            Cond::E => Cond::Ne,
            Cond::Ne => Cond::E,
            Cond::Be => Cond::A,
            Cond::A => Cond::Be,
            Cond::L => Cond::Ge,
            Cond::Ge => Cond::L,
            Cond::Le => Cond::G,
            Cond::G => Cond::Le,
        }
    }
}

/// A branch target inside the code being assembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Label(usize);

#[derive(Clone, Copy, Debug)]
enum RelKind {
    Rel8,
    Rel32,
}

/// A relative field to fill in once its label is bound.
#[derive(Clone, Copy, Debug)]
struct Fixup {
    /// Offset of the rel8/rel32 field; the branch ends right after it.
    at: usize,
    label: Label,
    kind: RelKind,
}

/// Why [`Asm::finish`] could not resolve the branches.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AsmError {
    /// The number of a label (in creation order) that a branch targets but was never bound.
    #[error("label {0} is branched to but never bound")]
    Unbound(usize),
    /// The number of a label that [`Asm::bind`] was given twice.
    #[error("label {0} is bound twice")]
    Rebound(usize),
    /// A `rel8` branch whose target is outside -128..=127 bytes.
    #[error("short branch at byte {at} cannot reach its target {distance} bytes away")]
    ShortOutOfRange {
        /// Byte offset of the `rel8` field.
        at: usize,
        /// Target minus the end of the branch, in bytes.
        distance: i64,
    },
    /// A `rel32` branch whose target does not fit 32 signed bits.
    #[error("branch at byte {at} cannot reach its target {distance} bytes away (more than 2 GiB)")]
    NearOutOfRange {
        /// Byte offset of the `rel32` field.
        at: usize,
        /// Target minus the end of the branch, in bytes.
        distance: i64,
    },
}

/// The code buffer with its labels.
#[derive(Debug, Default)]
pub struct Asm {
    buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<Fixup>,
    /// First error met while binding, reported by `finish` (binding itself cannot fail).
    error: Option<AsmError>,
}

impl Asm {
    /// An empty buffer without labels.
    pub fn new() -> Asm {
        Asm::default()
    }

    /// Bytes emitted so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing has been emitted yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// A new unbound label; bind it exactly once with [`Asm::bind`].
    pub fn new_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the current position.
    pub fn bind(&mut self, label: Label) {
        match self.labels.get_mut(label.0) {
            Some(slot @ None) => *slot = Some(self.buf.len()),
            _ => {
                self.error.get_or_insert(AsmError::Rebound(label.0));
            }
        }
    }

    /// Resolves all branches and returns the code.
    pub fn finish(mut self) -> Result<Vec<u8>, AsmError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        for f in &self.fixups {
            let target = self
                .labels
                .get(f.label.0)
                .copied()
                .flatten()
                .ok_or(AsmError::Unbound(f.label.0))?;
            let (width, at) = match f.kind {
                RelKind::Rel8 => (1, f.at),
                RelKind::Rel32 => (4, f.at),
            };
            let distance = target as i64 - (at + width) as i64;
            match f.kind {
                RelKind::Rel8 => {
                    let d = i8::try_from(distance)
                        .map_err(|_| AsmError::ShortOutOfRange { at, distance })?;
                    self.buf[at] = d as u8;
                }
                RelKind::Rel32 => {
                    let d = i32::try_from(distance)
                        .map_err(|_| AsmError::NearOutOfRange { at, distance })?;
                    self.buf[at..at + 4].copy_from_slice(&d.to_le_bytes());
                }
            }
        }
        Ok(self.buf)
    }

    fn byte(&mut self, b: u8) {
        self.buf.push(b);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn imm32(&mut self, v: i32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Emits `[66] [REX] opcode ModRM [SIB] [disp]`. `reg` is the ModRM reg field: a register
    /// number or an opcode extension. `force_rex` selects spl/bpl/sil/dil in byte forms.
    fn op_rm(&mut self, p66: bool, w: bool, force_rex: bool, opcode: &[u8], reg: u8, rm: Rm) {
        if p66 {
            self.byte(0x66);
        }
        let b = match rm {
            Rm::Reg(g) => g.ext(),
            Rm::Mem(m) => m.base.ext(),
        };
        let rex = 0x40 | (w as u8) << 3 | ((reg >> 3) & 1) << 2 | b;
        if rex != 0x40 || force_rex {
            self.byte(rex);
        }
        self.bytes(opcode);
        let reg = (reg & 7) << 3;
        match rm {
            Rm::Reg(g) => self.byte(0xc0 | reg | g.low()),
            Rm::Mem(m) => {
                let base = m.base.low();
                // mod 00 with base 101 would mean rip-relative, so rbp/r13 always take a disp8.
                let mode = if m.disp == 0 && base != 5 {
                    0
                } else if i8::try_from(m.disp).is_ok() {
                    1
                } else {
                    2
                };
                self.byte(mode << 6 | reg | base);
                if base == 4 {
                    // rsp/r12 as base need a SIB byte: no index, base = rm.
                    self.byte(0x24);
                }
                match mode {
                    1 => self.byte(m.disp as u8),
                    2 => self.imm32(m.disp),
                    _ => {}
                }
            }
        }
    }

    fn rex_b(&mut self, w: bool, r: Gpr) {
        let rex = 0x40 | (w as u8) << 3 | r.ext();
        if rex != 0x40 {
            self.byte(rex);
        }
    }

    // ---- ALU ----

    /// `op dst, src`.
    pub fn alu_rr(&mut self, op: AluOp, w64: bool, dst: Gpr, src: Gpr) {
        self.op_rm(
            false,
            w64,
            false,
            &[op as u8 * 8 + 1],
            src as u8,
            Rm::Reg(dst),
        );
    }

    /// `op dst, imm` (sign-extended to 64 bits in the 64-bit form).
    pub fn alu_ri(&mut self, op: AluOp, w64: bool, dst: Gpr, imm: i32) {
        if let Ok(imm8) = i8::try_from(imm) {
            self.op_rm(false, w64, false, &[0x83], op as u8, Rm::Reg(dst));
            self.byte(imm8 as u8);
        } else {
            self.op_rm(false, w64, false, &[0x81], op as u8, Rm::Reg(dst));
            self.imm32(imm);
        }
    }

    /// `op dst, [mem]`.
    pub fn alu_rm(&mut self, op: AluOp, w64: bool, dst: Gpr, mem: Mem) {
        self.op_rm(
            false,
            w64,
            false,
            &[op as u8 * 8 + 3],
            dst as u8,
            Rm::Mem(mem),
        );
    }

    /// `op [mem], src` (32 or 64 bits); with [`Asm::lock`] first it is atomic.
    pub fn alu_mr(&mut self, op: AluOp, w64: bool, mem: Mem, src: Gpr) {
        self.op_rm(
            false,
            w64,
            false,
            &[op as u8 * 8 + 1],
            src as u8,
            Rm::Mem(mem),
        );
    }

    /// `op [mem], imm` (32 or 64 bits, the immediate sign-extended).
    pub fn alu_mi(&mut self, op: AluOp, w64: bool, mem: Mem, imm: i32) {
        if let Ok(imm8) = i8::try_from(imm) {
            self.op_rm(false, w64, false, &[0x83], op as u8, Rm::Mem(mem));
            self.byte(imm8 as u8);
        } else {
            self.op_rm(false, w64, false, &[0x81], op as u8, Rm::Mem(mem));
            self.imm32(imm);
        }
    }

    /// `test a, b`.
    pub fn test_rr(&mut self, w64: bool, a: Gpr, b: Gpr) {
        self.op_rm(false, w64, false, &[0x85], b as u8, Rm::Reg(a));
    }

    /// `test r, imm32` (sign-extended in the 64-bit form).
    pub fn test_ri(&mut self, w64: bool, r: Gpr, imm: i32) {
        self.op_rm(false, w64, false, &[0xf7], 0, Rm::Reg(r));
        self.imm32(imm);
    }

    /// `test r8, imm8` (alignment checks).
    pub fn test_r8_imm(&mut self, r: Gpr, imm: u8) {
        self.op_rm(false, false, r.byte_needs_rex(), &[0xf6], 0, Rm::Reg(r));
        self.byte(imm);
    }

    /// `imul dst, src`.
    pub fn imul_rr(&mut self, w64: bool, dst: Gpr, src: Gpr) {
        self.op_rm(false, w64, false, &[0x0f, 0xaf], dst as u8, Rm::Reg(src));
    }

    /// `imul dst, src, imm`.
    pub fn imul_rri(&mut self, w64: bool, dst: Gpr, src: Gpr, imm: i32) {
        if let Ok(imm8) = i8::try_from(imm) {
            self.op_rm(false, w64, false, &[0x6b], dst as u8, Rm::Reg(src));
            self.byte(imm8 as u8);
        } else {
            self.op_rm(false, w64, false, &[0x69], dst as u8, Rm::Reg(src));
            self.imm32(imm);
        }
    }

    /// `neg r`.
    pub fn neg(&mut self, w64: bool, r: Gpr) {
        self.op_rm(false, w64, false, &[0xf7], 3, Rm::Reg(r));
    }

    /// `div r`: unsigned `rdx:rax / r`.
    pub fn div(&mut self, w64: bool, r: Gpr) {
        self.op_rm(false, w64, false, &[0xf7], 6, Rm::Reg(r));
    }

    /// `idiv r`: signed `rdx:rax / r`.
    pub fn idiv(&mut self, w64: bool, r: Gpr) {
        self.op_rm(false, w64, false, &[0xf7], 7, Rm::Reg(r));
    }

    /// `cqo` (64-bit) or `cdq` (32-bit): sign-extend rax into rdx.
    pub fn sign_extend_rax(&mut self, w64: bool) {
        if w64 {
            self.byte(0x48);
        }
        self.byte(0x99);
    }

    /// `op r, count` on a 16-, 32- or 64-bit register.
    pub fn shift_ri(&mut self, op: ShiftOp, size: OpSize, r: Gpr, count: u8) {
        self.op_rm(
            size == OpSize::W,
            size == OpSize::Q,
            false,
            &[0xc1],
            op as u8,
            Rm::Reg(r),
        );
        self.byte(count);
    }

    /// `op r, cl`.
    pub fn shift_cl(&mut self, op: ShiftOp, w64: bool, r: Gpr) {
        self.op_rm(false, w64, false, &[0xd3], op as u8, Rm::Reg(r));
    }

    /// `bswap r`.
    pub fn bswap(&mut self, w64: bool, r: Gpr) {
        self.rex_b(w64, r);
        self.bytes(&[0x0f, 0xc8 + r.low()]);
    }

    // ---- moves ----

    /// `mov dst, src`.
    pub fn mov_rr(&mut self, w64: bool, dst: Gpr, src: Gpr) {
        self.op_rm(false, w64, false, &[0x89], src as u8, Rm::Reg(dst));
    }

    /// `mov r32, imm32` (zero-extends).
    pub fn mov_r32_imm(&mut self, r: Gpr, imm: u32) {
        self.rex_b(false, r);
        self.byte(0xb8 + r.low());
        self.bytes(&imm.to_le_bytes());
    }

    /// `mov r64, imm32` (sign-extends).
    pub fn mov_r64_simm(&mut self, r: Gpr, imm: i32) {
        self.op_rm(false, true, false, &[0xc7], 0, Rm::Reg(r));
        self.imm32(imm);
    }

    /// `movabs r64, imm64`.
    pub fn movabs(&mut self, r: Gpr, imm: u64) {
        self.rex_b(true, r);
        self.byte(0xb8 + r.low());
        self.bytes(&imm.to_le_bytes());
    }

    /// Loads a 64-bit constant with the shortest of the three forms.
    pub fn mov_imm(&mut self, r: Gpr, v: u64) {
        if let Ok(v32) = u32::try_from(v) {
            self.mov_r32_imm(r, v32);
        } else if let Ok(s32) = i32::try_from(v as i64) {
            self.mov_r64_simm(r, s32);
        } else {
            self.movabs(r, v);
        }
    }

    /// `movzx r32, r8` / `movzx r32, r16` (zero-extends to 64 bits).
    pub fn movzx_rr(&mut self, from: OpSize, dst: Gpr, src: Gpr) {
        let (op, rex) = match from {
            OpSize::B => (0xb6, src.byte_needs_rex()),
            _ => (0xb7, false),
        };
        self.op_rm(false, false, rex, &[0x0f, op], dst as u8, Rm::Reg(src));
    }

    /// `movsx dst, r8|r16` and, for `from = D` with `w64`, `movsxd dst, r32`. `from = Q` and
    /// `from = D` without `w64` are plain moves.
    pub fn movsx_rr(&mut self, from: OpSize, w64: bool, dst: Gpr, src: Gpr) {
        match from {
            OpSize::B => self.op_rm(
                false,
                w64,
                src.byte_needs_rex(),
                &[0x0f, 0xbe],
                dst as u8,
                Rm::Reg(src),
            ),
            OpSize::W => self.op_rm(false, w64, false, &[0x0f, 0xbf], dst as u8, Rm::Reg(src)),
            OpSize::D if w64 => self.op_rm(false, true, false, &[0x63], dst as u8, Rm::Reg(src)),
            OpSize::D => self.mov_rr(false, dst, src),
            OpSize::Q => self.mov_rr(true, dst, src),
        }
    }

    /// Zero-extending load: `movzx r32, byte|word [mem]`, `mov r32, [mem]`, `mov r64, [mem]`.
    pub fn load(&mut self, size: OpSize, dst: Gpr, mem: Mem) {
        let m = Rm::Mem(mem);
        match size {
            OpSize::B => self.op_rm(false, false, false, &[0x0f, 0xb6], dst as u8, m),
            OpSize::W => self.op_rm(false, false, false, &[0x0f, 0xb7], dst as u8, m),
            OpSize::D => self.op_rm(false, false, false, &[0x8b], dst as u8, m),
            OpSize::Q => self.op_rm(false, true, false, &[0x8b], dst as u8, m),
        }
    }

    /// Sign-extending load to 64 bits: `movsx r64, byte|word [mem]`, `movsxd r64, [mem]`.
    pub fn load_sx(&mut self, size: OpSize, dst: Gpr, mem: Mem) {
        let m = Rm::Mem(mem);
        match size {
            OpSize::B => self.op_rm(false, true, false, &[0x0f, 0xbe], dst as u8, m),
            OpSize::W => self.op_rm(false, true, false, &[0x0f, 0xbf], dst as u8, m),
            OpSize::D => self.op_rm(false, true, false, &[0x63], dst as u8, m),
            OpSize::Q => self.load(OpSize::Q, dst, mem),
        }
    }

    /// `mov size [mem], src`.
    pub fn store(&mut self, size: OpSize, mem: Mem, src: Gpr) {
        let m = Rm::Mem(mem);
        match size {
            OpSize::B => self.op_rm(false, false, src.byte_needs_rex(), &[0x88], src as u8, m),
            OpSize::W => self.op_rm(true, false, false, &[0x89], src as u8, m),
            OpSize::D => self.op_rm(false, false, false, &[0x89], src as u8, m),
            OpSize::Q => self.op_rm(false, true, false, &[0x89], src as u8, m),
        }
    }

    /// `mov size [mem], imm` (the quadword form sign-extends a 32-bit immediate).
    pub fn store_imm(&mut self, size: OpSize, mem: Mem, imm: i32) {
        let m = Rm::Mem(mem);
        match size {
            OpSize::B => {
                self.op_rm(false, false, false, &[0xc6], 0, m);
                self.byte(imm as u8);
            }
            OpSize::W => {
                self.op_rm(true, false, false, &[0xc7], 0, m);
                self.bytes(&(imm as u16).to_le_bytes());
            }
            OpSize::D | OpSize::Q => {
                self.op_rm(false, size == OpSize::Q, false, &[0xc7], 0, m);
                self.imm32(imm);
            }
        }
    }

    /// `lea r64, [mem]`.
    pub fn lea(&mut self, dst: Gpr, mem: Mem) {
        self.op_rm(false, true, false, &[0x8d], dst as u8, Rm::Mem(mem));
    }

    /// `lea r64, [rip + rel32]`: the address of `label`, position independent.
    pub fn lea_label(&mut self, dst: Gpr, label: Label) {
        self.bytes(&[0x48 | dst.ext() << 2, 0x8d, dst.low() << 3 | 0b101]);
        self.rel(label, RelKind::Rel32);
    }

    /// Appends `bytes` verbatim (data, or a form this encoder lacks).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.bytes(bytes);
    }

    // ---- atomics ----

    /// The `lock` prefix for the next instruction.
    pub fn lock(&mut self) {
        self.byte(0xf0);
    }

    /// `xadd [mem], src` (use [`Asm::lock`] first).
    pub fn xadd(&mut self, w64: bool, mem: Mem, src: Gpr) {
        self.op_rm(false, w64, false, &[0x0f, 0xc1], src as u8, Rm::Mem(mem));
    }

    /// `xchg [mem], src` (always locked).
    pub fn xchg(&mut self, w64: bool, mem: Mem, src: Gpr) {
        self.op_rm(false, w64, false, &[0x87], src as u8, Rm::Mem(mem));
    }

    /// `cmpxchg [mem], src` (use [`Asm::lock`] first).
    pub fn cmpxchg(&mut self, w64: bool, mem: Mem, src: Gpr) {
        self.op_rm(false, w64, false, &[0x0f, 0xb1], src as u8, Rm::Mem(mem));
    }

    // ---- stack and control flow ----

    /// `push r64` (`50+rd`).
    pub fn push(&mut self, r: Gpr) {
        self.rex_b(false, r);
        self.byte(0x50 + r.low());
    }

    /// `pop r64` (`58+rd`).
    pub fn pop(&mut self, r: Gpr) {
        self.rex_b(false, r);
        self.byte(0x58 + r.low());
    }

    /// `call r64`.
    pub fn call_r(&mut self, r: Gpr) {
        self.op_rm(false, false, false, &[0xff], 2, Rm::Reg(r));
    }

    /// `jmp r64`.
    pub fn jmp_r(&mut self, r: Gpr) {
        self.op_rm(false, false, false, &[0xff], 4, Rm::Reg(r));
    }

    /// Near `ret` (`C3`).
    pub fn ret(&mut self) {
        self.byte(0xc3);
    }

    /// The 5-byte `nop dword [rax + rax*1 + 0]` that patch sites start as.
    pub fn nop5(&mut self) {
        self.bytes(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    }

    /// Pads with the fewest multi-byte nops (the SDM's recommended forms, up to 9 bytes each)
    /// until the length is a multiple of `align` (a power of two).
    pub fn align_with_nops(&mut self, align: usize) {
        const NOPS: [&[u8]; 9] = [
            &[0x90],
            &[0x66, 0x90],
            &[0x0f, 0x1f, 0x00],
            &[0x0f, 0x1f, 0x40, 0x00],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
            &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
            &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        ];
        let mut pad = self.buf.len().next_multiple_of(align) - self.buf.len();
        while pad > 0 {
            let n = pad.min(NOPS.len());
            self.bytes(NOPS[n - 1]);
            pad -= n;
        }
    }

    fn rel(&mut self, label: Label, kind: RelKind) {
        let at = self.buf.len();
        self.fixups.push(Fixup { at, label, kind });
        match kind {
            RelKind::Rel8 => self.byte(0),
            RelKind::Rel32 => self.imm32(0),
        }
    }

    /// `jmp rel32`.
    pub fn jmp(&mut self, label: Label) {
        self.byte(0xe9);
        self.rel(label, RelKind::Rel32);
    }

    /// `jmp rel8`; [`Asm::finish`] fails if the label is out of reach.
    pub fn jmp_short(&mut self, label: Label) {
        self.byte(0xeb);
        self.rel(label, RelKind::Rel8);
    }

    /// `jcc rel32`.
    pub fn jcc(&mut self, cond: Cond, label: Label) {
        self.bytes(&[0x0f, 0x80 + cond as u8]);
        self.rel(label, RelKind::Rel32);
    }

    /// `jcc rel8`; [`Asm::finish`] fails if the label is out of reach.
    pub fn jcc_short(&mut self, cond: Cond, label: Label) {
        self.byte(0x70 + cond as u8);
        self.rel(label, RelKind::Rel8);
    }

    /// `call rel32`.
    pub fn call(&mut self, label: Label) {
        self.byte(0xe8);
        self.rel(label, RelKind::Rel32);
    }
}

#[cfg(test)]
mod tests {
    //! Golden tests: every form is decoded by iced-x86 and compared with the Intel syntax it must
    //! mean, for every register (and a range of memory operands), so REX/ModRM/SIB corner cases
    //! (rsp/r12 bases, rbp/r13 with zero displacement, sil/dil byte registers) are all covered.

    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, MemorySizeOptions};

    fn disasm(bytes: &[u8]) -> String {
        let mut decoder = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
        let mut fmt = IntelFormatter::new();
        let o = fmt.options_mut();
        o.set_space_after_operand_separator(true);
        o.set_hex_prefix("0x");
        o.set_hex_suffix("");
        o.set_uppercase_hex(false);
        o.set_small_hex_numbers_in_decimal(false);
        o.set_branch_leading_zeros(false);
        o.set_show_branch_size(false);
        o.set_memory_size_options(MemorySizeOptions::Always);
        let mut out = Vec::new();
        while decoder.can_decode() {
            let insn = decoder.decode();
            assert!(!insn.is_invalid(), "invalid encoding in {bytes:02x?}");
            let mut s = String::new();
            fmt.format(&insn, &mut s);
            out.push(s);
        }
        out.join("; ")
    }

    fn one(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::new();
        f(&mut a);
        a.finish().unwrap()
    }

    fn check(f: impl FnOnce(&mut Asm), want: &str) {
        let bytes = one(f);
        assert_eq!(disasm(&bytes), want, "bytes {bytes:02x?}");
    }

    const NAMES64: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    const NAMES32: [&str; 16] = [
        "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "r8d", "r9d", "r10d", "r11d",
        "r12d", "r13d", "r14d", "r15d",
    ];
    const NAMES16: [&str; 16] = [
        "ax", "cx", "dx", "bx", "sp", "bp", "si", "di", "r8w", "r9w", "r10w", "r11w", "r12w",
        "r13w", "r14w", "r15w",
    ];
    const NAMES8: [&str; 16] = [
        "al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil", "r8b", "r9b", "r10b", "r11b", "r12b",
        "r13b", "r14b", "r15b",
    ];

    fn name(r: Gpr, size: OpSize) -> &'static str {
        let i = r as usize;
        match size {
            OpSize::B => NAMES8[i],
            OpSize::W => NAMES16[i],
            OpSize::D => NAMES32[i],
            OpSize::Q => NAMES64[i],
        }
    }

    fn wsize(w64: bool) -> OpSize {
        if w64 { OpSize::Q } else { OpSize::D }
    }

    fn ptr(size: OpSize) -> &'static str {
        match size {
            OpSize::B => "byte ptr ",
            OpSize::W => "word ptr ",
            OpSize::D => "dword ptr ",
            OpSize::Q => "qword ptr ",
        }
    }

    fn mem_text(m: Mem) -> String {
        let base = name(m.base, OpSize::Q);
        match m.disp {
            0 => format!("[{base}]"),
            d if d < 0 => format!("[{base}-{:#x}]", -(d as i64)),
            d => format!("[{base}+{d:#x}]"),
        }
    }

    fn mems() -> Vec<Mem> {
        let mut v = Vec::new();
        for base in Gpr::ALL {
            for disp in [0, 8, -8, 127, -128, 128, -129, 0x1000, -0x7fff_ffff] {
                v.push(Mem::new(base, disp));
            }
        }
        v
    }

    #[test]
    fn hand_checked_bytes() {
        // A few encodings spelled out, independent of the decoder.
        assert_eq!(one(|a| a.nop5()), [0x0f, 0x1f, 0x44, 0x00, 0x00]);
        assert_eq!(one(|a| a.push(Gpr::Rbp)), [0x55]);
        assert_eq!(
            one(|a| a.mov_rr(true, Gpr::Rbp, Gpr::Rsp)),
            [0x48, 0x89, 0xe5]
        );
        assert_eq!(one(|a| a.push(Gpr::R12)), [0x41, 0x54]);
        assert_eq!(
            one(|a| a.load(OpSize::Q, Gpr::R9, Mem::new(Gpr::R12, 8))),
            [0x4d, 0x8b, 0x4c, 0x24, 0x08]
        );
        assert_eq!(
            one(|a| a.lea(Gpr::Rsp, Mem::new(Gpr::Rbp, -40))),
            [0x48, 0x8d, 0x65, 0xd8]
        );
        assert_eq!(
            one(|a| a.store(OpSize::B, Mem::new(Gpr::Rax, 0), Gpr::Rsi)),
            [0x40, 0x88, 0x30]
        );
        assert_eq!(one(|a| a.ret()), [0xc3]);
    }

    #[test]
    fn alu_register_and_immediate_forms() {
        let ops = [
            (AluOp::Add, "add"),
            (AluOp::Or, "or"),
            (AluOp::And, "and"),
            (AluOp::Sub, "sub"),
            (AluOp::Xor, "xor"),
            (AluOp::Cmp, "cmp"),
        ];
        for (op, m) in ops {
            for w64 in [false, true] {
                let s = wsize(w64);
                for d in Gpr::ALL {
                    for r in Gpr::ALL {
                        let want = format!("{m} {}, {}", name(d, s), name(r, s));
                        check(|a| a.alu_rr(op, w64, d, r), &want);
                    }
                    for imm in [0, 1, -1, 127, -128, 128, -129, i32::MAX, i32::MIN] {
                        let shown = if w64 {
                            imm as i64 as u64
                        } else {
                            imm as u32 as u64
                        };
                        let want = format!("{m} {}, {shown:#x}", name(d, s));
                        check(|a| a.alu_ri(op, w64, d, imm), &want);
                    }
                }
                for mem in mems() {
                    let d = Gpr::R10;
                    let want = format!("{m} {}, {}{}", name(d, s), ptr(s), mem_text(mem));
                    check(|a| a.alu_rm(op, w64, d, mem), &want);
                    let want = format!("{m} {}{}, {}", ptr(s), mem_text(mem), name(Gpr::Rsi, s));
                    check(|a| a.alu_mr(op, w64, mem, Gpr::Rsi), &want);
                    for imm in [1, -1, 127, -128, 128, i32::MIN] {
                        let shown = if w64 {
                            imm as i64 as u64
                        } else {
                            imm as u32 as u64
                        };
                        let want = format!("{m} {}{}, {shown:#x}", ptr(s), mem_text(mem));
                        check(|a| a.alu_mi(op, w64, mem, imm), &want);
                    }
                }
            }
        }
    }

    #[test]
    fn lock_prefixed_forms() {
        let m = Mem::new(Gpr::R11, 0);
        check(
            |a| {
                a.lock();
                a.alu_mr(AluOp::Add, true, m, Gpr::Rdi)
            },
            "lock add qword ptr [r11], rdi",
        );
        check(
            |a| {
                a.lock();
                a.xadd(false, Mem::new(Gpr::R9, -8), Gpr::R8)
            },
            "lock xadd dword ptr [r9-0x8], r8d",
        );
        check(
            |a| {
                a.lock();
                a.cmpxchg(true, Mem::new(Gpr::R12, 0), Gpr::R10)
            },
            "lock cmpxchg qword ptr [r12], r10",
        );
        for w64 in [false, true] {
            let s = wsize(w64);
            for mem in mems() {
                for r in [Gpr::Rax, Gpr::Rdi, Gpr::R15] {
                    let (mt, rn) = (mem_text(mem), name(r, s));
                    check(
                        |a| a.xchg(w64, mem, r),
                        &format!("xchg {}{mt}, {rn}", ptr(s)),
                    );
                    check(
                        |a| a.xadd(w64, mem, r),
                        &format!("xadd {}{mt}, {rn}", ptr(s)),
                    );
                    check(
                        |a| a.cmpxchg(w64, mem, r),
                        &format!("cmpxchg {}{mt}, {rn}", ptr(s)),
                    );
                }
            }
        }
    }

    #[test]
    fn each_condition_inverts_to_its_pair() {
        use Cond::*;
        for c in [B, Ae, E, Ne, Be, A, L, Ge, Le, G] {
            // The x86 encoding: a condition and its opposite differ in the low bit only.
            assert_eq!(c.invert() as u8, c as u8 ^ 1, "{c:?}");
            assert_eq!(c.invert().invert(), c);
        }
    }

    #[test]
    fn test_imul_neg_div() {
        for w64 in [false, true] {
            let s = wsize(w64);
            for d in Gpr::ALL {
                let dn = name(d, s);
                for r in Gpr::ALL {
                    let rn = name(r, s);
                    check(|a| a.test_rr(w64, d, r), &format!("test {dn}, {rn}"));
                    check(|a| a.imul_rr(w64, d, r), &format!("imul {dn}, {rn}"));
                    for imm in [3, -2, 1000, i32::MIN] {
                        let shown = if w64 {
                            imm as i64 as u64
                        } else {
                            imm as u32 as u64
                        };
                        // iced shows `imul r, r, imm` with equal registers as `imul r, imm`.
                        let want = if d == r {
                            format!("imul {dn}, {shown:#x}")
                        } else {
                            format!("imul {dn}, {rn}, {shown:#x}")
                        };
                        check(|a| a.imul_rri(w64, d, r, imm), &want);
                    }
                }
                for imm in [1, -1, 0x1234_5678] {
                    let shown = if w64 {
                        imm as i64 as u64
                    } else {
                        imm as u32 as u64
                    };
                    check(
                        |a| a.test_ri(w64, d, imm),
                        &format!("test {dn}, {shown:#x}"),
                    );
                }
                check(|a| a.neg(w64, d), &format!("neg {dn}"));
                check(|a| a.div(w64, d), &format!("div {dn}"));
                check(|a| a.idiv(w64, d), &format!("idiv {dn}"));
                check(|a| a.bswap(w64, d), &format!("bswap {dn}"));
                for (op, m) in [
                    (ShiftOp::Shl, "shl"),
                    (ShiftOp::Shr, "shr"),
                    (ShiftOp::Sar, "sar"),
                    (ShiftOp::Rol, "rol"),
                ] {
                    check(|a| a.shift_cl(op, w64, d), &format!("{m} {dn}, cl"));
                    check(|a| a.shift_ri(op, s, d, 5), &format!("{m} {dn}, 0x5"));
                }
            }
            check(|a| a.sign_extend_rax(w64), if w64 { "cqo" } else { "cdq" });
        }
        for d in Gpr::ALL {
            check(
                |a| a.shift_ri(ShiftOp::Rol, OpSize::W, d, 8),
                &format!("rol {}, 0x8", name(d, OpSize::W)),
            );
            check(
                |a| a.test_r8_imm(d, 7),
                &format!("test {}, 0x7", name(d, OpSize::B)),
            );
        }
    }

    #[test]
    fn moves_and_extensions() {
        for d in Gpr::ALL {
            for r in Gpr::ALL {
                for w64 in [false, true] {
                    let s = wsize(w64);
                    check(
                        |a| a.mov_rr(w64, d, r),
                        &format!("mov {}, {}", name(d, s), name(r, s)),
                    );
                    check(
                        |a| a.movsx_rr(OpSize::B, w64, d, r),
                        &format!("movsx {}, {}", name(d, s), name(r, OpSize::B)),
                    );
                    check(
                        |a| a.movsx_rr(OpSize::W, w64, d, r),
                        &format!("movsx {}, {}", name(d, s), name(r, OpSize::W)),
                    );
                }
                check(
                    |a| a.movsx_rr(OpSize::D, true, d, r),
                    &format!("movsxd {}, {}", name(d, OpSize::Q), name(r, OpSize::D)),
                );
                check(
                    |a| a.movzx_rr(OpSize::B, d, r),
                    &format!("movzx {}, {}", name(d, OpSize::D), name(r, OpSize::B)),
                );
                check(
                    |a| a.movzx_rr(OpSize::W, d, r),
                    &format!("movzx {}, {}", name(d, OpSize::D), name(r, OpSize::W)),
                );
            }
            let (n32, n64) = (name(d, OpSize::D), name(d, OpSize::Q));
            check(
                |a| a.mov_r32_imm(d, 0xdead_beef),
                &format!("mov {n32}, 0xdeadbeef"),
            );
            check(
                |a| a.mov_r64_simm(d, -2),
                &format!("mov {n64}, 0xfffffffffffffffe"),
            );
            check(
                |a| a.movabs(d, 0x1122_3344_5566_7788),
                &format!("mov {n64}, 0x1122334455667788"),
            );
            check(|a| a.mov_imm(d, 7), &format!("mov {n32}, 0x7"));
            check(
                |a| a.mov_imm(d, u64::MAX),
                &format!("mov {n64}, 0xffffffffffffffff"),
            );
            check(
                |a| a.mov_imm(d, 1 << 40),
                &format!("mov {n64}, 0x10000000000"),
            );
            check(|a| a.push(d), &format!("push {n64}"));
            check(|a| a.pop(d), &format!("pop {n64}"));
            check(|a| a.call_r(d), &format!("call {n64}"));
            check(|a| a.jmp_r(d), &format!("jmp {n64}"));
        }
    }

    #[test]
    fn loads_and_stores() {
        let sizes = [OpSize::B, OpSize::W, OpSize::D, OpSize::Q];
        for mem in mems() {
            let mt = mem_text(mem);
            for d in [Gpr::Rax, Gpr::Rsi, Gpr::Rdi, Gpr::R9, Gpr::R11, Gpr::R15] {
                for size in sizes {
                    let p = ptr(size);
                    let zx = match size {
                        OpSize::B | OpSize::W => format!("movzx {}, {p}{mt}", name(d, OpSize::D)),
                        _ => format!("mov {}, {p}{mt}", name(d, size)),
                    };
                    check(|a| a.load(size, d, mem), &zx);
                    let sx = match size {
                        OpSize::B | OpSize::W => format!("movsx {}, {p}{mt}", name(d, OpSize::Q)),
                        OpSize::D => format!("movsxd {}, {p}{mt}", name(d, OpSize::Q)),
                        OpSize::Q => format!("mov {}, {p}{mt}", name(d, OpSize::Q)),
                    };
                    check(|a| a.load_sx(size, d, mem), &sx);
                    check(
                        |a| a.store(size, mem, d),
                        &format!("mov {p}{mt}, {}", name(d, size)),
                    );
                }
            }
            for (size, imm, shown) in [
                (OpSize::B, -1, "0xff"),
                (OpSize::W, 0x1234, "0x1234"),
                (OpSize::D, -2, "0xfffffffe"),
                (OpSize::Q, -2, "0xfffffffffffffffe"),
            ] {
                check(
                    |a| a.store_imm(size, mem, imm),
                    &format!("mov {}{mt}, {shown}", ptr(size)),
                );
            }
            check(|a| a.lea(Gpr::R11, mem), &format!("lea r11, {mt}"));
        }
    }

    #[test]
    fn branches_and_labels() {
        // Backward and forward, short and near.
        let mut a = Asm::new();
        let top = a.new_label();
        let end = a.new_label();
        a.bind(top);
        a.jcc_short(Cond::E, end); // 0: 74 xx
        a.jcc(Cond::L, top); // 2: 0f 8c rel32
        a.jmp(end); // 8: e9 rel32
        a.call(top); // 13: e8 rel32
        a.jmp_short(top); // 18: eb xx
        a.bind(end); // 20
        a.ret();
        let code = a.finish().unwrap();
        assert_eq!(
            disasm(&code),
            "je 0x14; jl 0x0; jmp 0x14; call 0x0; jmp 0x0; ret"
        );
        for (cond, m) in [
            (Cond::B, "jb"),
            (Cond::Ae, "jae"),
            (Cond::E, "je"),
            (Cond::Ne, "jne"),
            (Cond::Be, "jbe"),
            (Cond::A, "ja"),
            (Cond::L, "jl"),
            (Cond::Ge, "jge"),
            (Cond::Le, "jle"),
            (Cond::G, "jg"),
        ] {
            let mut a = Asm::new();
            let l = a.new_label();
            a.jcc(cond, l);
            a.bind(l);
            assert_eq!(disasm(&a.finish().unwrap()), format!("{m} 0x6"));
        }
    }

    #[test]
    fn rip_relative_lea_and_raw_bytes() {
        for r in Gpr::ALL {
            let mut a = Asm::new();
            let l = a.new_label();
            a.raw(&[0x90, 0x90]);
            a.bind(l);
            a.lea_label(r, l);
            let code = a.finish().unwrap();
            assert_eq!(
                disasm(&code),
                format!("nop; nop; lea {}, [0x2]", name(r, OpSize::Q))
            );
        }
    }

    #[test]
    fn branch_errors_are_reported() {
        let mut a = Asm::new();
        let l = a.new_label();
        a.jmp(l);
        assert_eq!(a.finish(), Err(AsmError::Unbound(0)));

        let mut a = Asm::new();
        let l = a.new_label();
        a.jmp_short(l);
        for _ in 0..200 {
            a.ret();
        }
        a.bind(l);
        assert!(matches!(a.finish(), Err(AsmError::ShortOutOfRange { .. })));

        let mut a = Asm::new();
        let l = a.new_label();
        a.bind(l);
        a.bind(l);
        assert_eq!(a.finish(), Err(AsmError::Rebound(0)));
    }
}
