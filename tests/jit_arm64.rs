//! The arm64 JIT against the interpreter: per-class unit tests, a differential property test on
//! random programs (every option: checked/trusted, BTI, PAC, LSE/exclusives), error reporting, the
//! image's layout and registration, and concurrent runs. When the CPU has BTI, the code arena of
//! this test binary maps text with `PROT_BTI`, so every run here is also a BTI-enforced run.
#![cfg(target_arch = "aarch64")]

mod common;

use common::limits;

use common::progen::{
    self, ALU_OPS, BuildOptions, CallxOptions, Case, CaseOptions, EDGE_VALUES, IDENTITY_ID,
    ItemOptions, MIX_ID, UNKNOWN_ID, access, asm, data_reg, endian, lddw, mix, neg, size, source,
    width,
};
use livebpf::exec::{Access, ExecError, MemRegion};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::{AluOp, AtomicOp, Insn, JmpCond, Program, Reg, Size, Source, Width};
use livebpf::jit::arm64::{enc, host_features, poke_offset};
use livebpf::jit::{JitOptions, JitProgram};
use livebpf::text::poke::{A64_NOP, PATCH_SITE_LEN};
use livebpf::text::{ArenaOptions, CodeArena, ImageKind, Registry, TextError};
use proptest::prelude::*;

/// The global arena: with `PROT_BTI` when the CPU enforces BTI.
fn arena() -> &'static CodeArena {
    let bti = host_features().bti;
    match CodeArena::init_global(ArenaOptions {
        bti,
        ..ArenaOptions::default()
    }) {
        Ok(a) => a,
        Err(TextError::GlobalAlreadyInitialized) => CodeArena::global().unwrap(),
        Err(e) => panic!("{e}"),
    }
}
/// Clobbers every caller-saved register a helper may clobber (x0–x18 but x18), returns 7.
extern "C" fn clobber(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    let r: u64;
    // SAFETY: only writes registers declared as clobbered; no memory access.
    unsafe {
        std::arch::asm!(
            "mov x1, #0x1111", "mov x2, #0x2222", "mov x3, #0x3333", "mov x4, #0x4444",
            "mov x5, #0x5555", "mov x6, #0x6666", "mov x7, #0x7777", "mov x8, #0x8888",
            "mov x9, #0x9999", "mov x10, #0xaaaa", "mov x11, #0xbbbb", "mov x12, #0xcccc",
            "mov x13, #0xdddd", "mov x14, #0xeeee", "mov x15, #0xffff", "mov x16, #0x1616",
            "mov x17, #0x1717", "mov x0, #7",
            out("x0") r, out("x1") _, out("x2") _, out("x3") _, out("x4") _, out("x5") _,
            out("x6") _, out("x7") _, out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _, out("x16") _, out("x17") _,
            options(nomem, nostack),
        );
    }
    r
}
const CLOBBER_ID: u32 = 2;

fn helpers() -> Helpers {
    let mut h = Helpers::conformance();
    h.register(MIX_ID, mix);
    h.register(CLOBBER_ID, clobber);
    h
}

/// Every option combination, trusted ones only when `trusted_ok`.
fn modes(trusted_ok: bool) -> Vec<(String, JitOptions)> {
    let mut out = Vec::new();
    // SAFETY: only used on programs whose accesses are known to stay in bounds (each is also run
    // checked and by the interpreter, which would report any stray access).
    let trusted = unsafe { JitOptions::trusted() };
    let bases: &[(&str, JitOptions)] = if trusted_ok {
        &[("checked", JitOptions::checked()), ("trusted", trusted)]
    } else {
        &[("checked", JitOptions::checked())]
    };
    for &(name, base) in bases {
        for (bti, pac, lse) in [
            (true, true, true),
            (false, false, false),
            (true, false, false),
            (false, true, true),
        ] {
            out.push((
                format!("{name} bti={bti} pac={pac} lse={lse}"),
                base.with_bti(bti).with_pac(pac).with_lse(lse),
            ));
        }
    }
    out
}
/// Runs `program` on the interpreter and on the JIT in every mode over the same buffer (see
/// `progen::differential`); returns the interpreter's result.
fn differential(program: &Program, mem: &[u8], trusted_ok: bool) -> Result<u64, ExecError> {
    arena();
    progen::differential(program, mem, &helpers(), &modes(trusted_ok))
}

/// A program the interpreter finds faulting on the very buffer `differential` runs it over is
/// never run trusted, even when the caller allows trusted modes: the store just past the
/// 8-byte input would otherwise succeed in trusted code (it lands in the test's own padding)
/// and disagree with the interpreter's error.
#[test]
fn trusted_modes_skip_a_program_that_faults_on_the_buffer() {
    let r = differential(&asm("stxdw [r1+8], r1\nmov r0, 1\nexit"), &[0; 8], true);
    assert!(matches!(r, Err(ExecError::OutOfBounds { .. })), "{r:?}");
}

fn check(src: &str, mem: &[u8], expected: Result<u64, ExecError>) {
    let got = differential(&asm(src), mem, expected.is_ok());
    assert_eq!(got, expected, "{src}");
}
/// The multiplier of `fold_registers`.
const FOLD_MUL: i32 = 31;

/// Folds r0–r9 into r0 so that every register's final value matters.
fn fold_registers() -> Vec<Insn> {
    progen::fold_registers(FOLD_MUL)
}

// ---------------------------------------------------------------- ALU

#[test]
fn alu_of_every_operation_width_and_operand_on_edge_values() {
    let ops = ALU_OPS;
    let imms = [
        0,
        1,
        -1,
        31,
        32,
        63,
        4095,
        4096,
        -4096,
        0x5555,
        i32::MIN,
        i32::MAX,
    ];
    // One program per (width, operation): every edge value against every edge value and
    // immediate, results folded into r0.
    for width in [Width::W32, Width::W64] {
        for op in ops {
            if op == AluOp::MovSx32 && width == Width::W32 {
                continue;
            }
            let mut insns = Vec::new();
            for (i, &a) in EDGE_VALUES.iter().enumerate() {
                let srcs: Vec<Source> = EDGE_VALUES
                    .iter()
                    .skip(i % 3)
                    .step_by(3)
                    .map(|_| Source::Reg(Reg::R3))
                    .chain(imms.iter().map(|&v| Source::Imm(v)))
                    .collect();
                for (j, src) in srcs.into_iter().enumerate() {
                    let is_sx = matches!(op, AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32);
                    if is_sx && matches!(src, Source::Imm(_)) {
                        continue;
                    }
                    insns.push(Insn::LoadImm64 {
                        dst: Reg::R2,
                        imm: a,
                    });
                    insns.push(Insn::LoadImm64 {
                        dst: Reg::R3,
                        imm: EDGE_VALUES[(i + j) % EDGE_VALUES.len()],
                    });
                    insns.push(Insn::Alu {
                        width,
                        op,
                        dst: Reg::R2,
                        src,
                    });
                    insns.push(Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Mul,
                        dst: Reg::R0,
                        src: Source::Imm(0x1f),
                    });
                    insns.push(Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Xor,
                        dst: Reg::R0,
                        src: Source::Reg(Reg::R2),
                    });
                }
            }
            insns.push(Insn::Exit);
            differential(&Program::new(insns).unwrap(), &[], true).unwrap();
        }
    }
}

#[test]
fn rfc9669_division_edge_cases() {
    check("mov r0, 7\nmov r1, 0\ndiv r0, r1\nexit", &[], Ok(0));
    check("mov r0, 7\nmov r1, 0\nmod r0, r1\nexit", &[], Ok(7));
    check(
        "mov32 r0, -7\nmov32 r1, 0\nmod32 r0, r1\nexit",
        &[],
        Ok(0xffff_fff9),
    );
    check(
        "lddw r0, 0x8000000000000000\nmov r1, -1\nsdiv r0, r1\nexit",
        &[],
        Ok(i64::MIN as u64),
    );
    check(
        "lddw r0, 0x8000000000000000\nmov r1, -1\nsmod r0, r1\nexit",
        &[],
        Ok(0),
    );
    check(
        "mov32 r0, 0x80000000\nmov32 r1, -1\nsdiv32 r0, r1\nexit",
        &[],
        Ok(0x8000_0000),
    );
    check("mov r0, -7\nsmod r0, 2\nexit", &[], Ok(-1i64 as u64));
    check("mov r0, -7\nsdiv r0, 0\nexit", &[], Ok(0));
    check("mov r0, -7\nsmod r0, 0\nexit", &[], Ok(-7i64 as u64));
    check("mov r0, 1\nlsh r0, 65\nexit", &[], Ok(2));
    check("mov32 r0, 1\nlsh32 r0, 33\nexit", &[], Ok(2));
    check("mov r0, -1\nrsh32 r0, 0\nexit", &[], Ok(0xffff_ffff));
}

#[test]
fn byte_swaps_and_32_bit_zero_extension() {
    check(
        "lddw r0, 0x1122334455667788\nbe16 r0\nexit",
        &[],
        Ok(0x8877),
    );
    check(
        "lddw r0, 0x1122334455667788\nbe32 r0\nexit",
        &[],
        Ok(0x8877_6655),
    );
    check(
        "lddw r0, 0x1122334455667788\nbe64 r0\nexit",
        &[],
        Ok(0x8877_6655_4433_2211),
    );
    check(
        "lddw r0, 0x1122334455667788\nle16 r0\nexit",
        &[],
        Ok(0x7788),
    );
    check(
        "lddw r0, 0x1122334455667788\nle32 r0\nexit",
        &[],
        Ok(0x5566_7788),
    );
    check(
        "lddw r0, 0x1122334455667788\nle64 r0\nexit",
        &[],
        Ok(0x1122_3344_5566_7788),
    );
    check("lddw r0, -1\nadd32 r0, 1\nexit", &[], Ok(0));
    check("lddw r0, -1\nmov32 r0, r0\nexit", &[], Ok(0xffff_ffff));
}

// ---------------------------------------------------------------- memory

#[test]
fn loads_and_stores_of_every_size_on_input_and_stack() {
    let mem: Vec<u8> = (0..64).map(|i| (i * 37 + 11) as u8).collect();
    for (sz, ld, st) in [
        ("b", "ldxb", "stxb"),
        ("h", "ldxh", "stxh"),
        ("w", "ldxw", "stxw"),
        ("dw", "ldxdw", "stxdw"),
    ] {
        let src = format!(
            "{ld} r2, [r1+3]\n{st} [r10-{off}], r2\n{ld} r3, [r10-{off}]\n{st} [r1+40], r3\n\
             st{sz} [r1+50], -2\nldx{sz} r0, [r1+50]\nadd r0, r3\nldxdw r4, [r10-300]\n\
             add r0, r4\nexit",
            off = 8
        );
        check(
            &src,
            &mem,
            Interpreter::new(&asm(&src)).run(&mut mem.clone()),
        );
    }
    // Sign-extending loads.
    let src = "ldxsb r0, [r1+5]\nldxsh r2, [r1+6]\nldxsw r3, [r1+8]\nadd r0, r2\nadd r0, r3\nexit";
    let mem = [0xffu8; 16];
    check(src, &mem, Ok(-3i64 as u64));
    // An offset beyond the unscaled and scaled immediate forms, in trusted mode too.
    let mut big = vec![0u8; 40000];
    big[30001] = 9;
    check("ldxb r0, [r1+30001]\nexit", &big, Ok(9));
}

#[test]
fn out_of_bounds_accesses_report_the_interpreters_error() {
    // One byte past the input.
    let r = differential(&asm("ldxw r0, [r1+13]\nexit"), &[0; 16], false);
    assert!(matches!(
        r,
        Err(ExecError::OutOfBounds {
            pc: 0,
            size: 4,
            access: Access::Load,
            ..
        })
    ));
    // Null and kernel addresses.
    let r = differential(&asm("mov r1, 0\nstxdw [r1+8], r1\nexit"), &[], false);
    assert_eq!(
        r,
        Err(ExecError::OutOfBounds {
            pc: 1,
            addr: 8,
            size: 8,
            access: Access::Store
        })
    );
    let r = differential(
        &asm("lddw r2, 0xffff800000000000\nmov r3, 1\nstxb [r2+0], r3\nexit"),
        &[],
        false,
    );
    assert!(matches!(r, Err(ExecError::OutOfBounds { pc: 3, .. })));
    // Below the stack, through a copy of r10.
    let r = differential(&asm("mov r2, r10\nldxb r0, [r2-4097]\nexit"), &[], false);
    assert!(matches!(r, Err(ExecError::OutOfBounds { pc: 1, .. })));
    // Above the frame, through r10 itself (outside the current frame, outside the stack).
    let r = differential(&asm("ldxdw r0, [r10+8]\nexit"), &[], false);
    assert!(matches!(r, Err(ExecError::OutOfBounds { pc: 0, .. })));
    // Atomics and acquire/release check bounds too.
    let r = differential(&asm("mov r2, 0\nlock add [r2+64], r1\nexit"), &[], false);
    assert!(matches!(
        r,
        Err(ExecError::OutOfBounds {
            pc: 1,
            access: Access::Atomic,
            ..
        })
    ));
}

#[test]
fn extra_regions_follow_their_permissions() {
    arena();
    let mut ro = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let mut rw = [0u8; 8];
    let regions = [
        MemRegion::new(ro.as_mut_ptr() as u64, 8, false),
        MemRegion::of_slice(&mut rw),
    ];
    let load = format!("lddw r2, {:#x}\nldxdw r0, [r2+0]\nexit", ro.as_ptr() as u64);
    let store_ro = format!(
        "lddw r2, {:#x}\nmov r3, 9\nstxb [r2+1], r3\nexit",
        ro.as_ptr() as u64
    );
    let store_rw = format!(
        "lddw r2, {:#x}\nmov r3, 9\nstxb [r2+1], r3\nmov r0, 1\nexit",
        rw.as_ptr() as u64
    );
    // A store of an immediate whose bounds check takes the slow path (the runtime allows it):
    // the value must survive the runtime call.
    let store_imm = format!(
        "lddw r2, {:#x}\nstdw [r2+0], -0x12345\nsth [r2+2], 0x7abc\nldxdw r0, [r2+0]\nexit",
        rw.as_ptr() as u64
    );
    let h = helpers();
    for (_, opts) in modes(false) {
        let run = |src: &str| {
            let jit = JitProgram::compile(&asm(src), &h, opts).unwrap();
            // SAFETY: both regions are live local arrays for the whole run.
            unsafe { jit.run_with_regions(&mut [], &regions) }
        };
        assert_eq!(run(&load), Ok(0x0807_0605_0403_0201));
        assert!(matches!(
            run(&store_ro),
            Err(ExecError::OutOfBounds {
                pc: 3,
                access: Access::Store,
                ..
            })
        ));
        assert_eq!(run(&store_rw), Ok(1));
        assert_eq!(
            run(&store_imm),
            Ok((-0x12345i64 as u64 & !0xffff_0000) | 0x7abc_0000)
        );
    }
    assert_eq!(rw[1], 0xdc);
    assert_eq!(ro[1], 2);
}

#[test]
fn atomics_of_both_widths_with_every_operation() {
    for op in AtomicOp::ALL {
        for size in [Size::W, Size::DW] {
            for src in [Reg::R2, Reg::R0] {
                let insns = vec![
                    Insn::LoadImm64 {
                        dst: Reg::R0,
                        imm: 0x0f0f_0f0f_f0f0_f0f0,
                    },
                    Insn::LoadImm64 {
                        dst: Reg::R2,
                        imm: 0x1234_5678_8765_4321,
                    },
                    Insn::LoadImm64 {
                        dst: Reg::R3,
                        imm: 0x0f0f_0f0f_f0f0_f0f0,
                    },
                    // Memory starts equal to r0, so cmpxchg succeeds; a second one fails.
                    Insn::Store {
                        size: Size::DW,
                        base: Reg::R10,
                        off: -16,
                        src: Source::Reg(Reg::R3),
                    },
                    Insn::Store {
                        size: Size::DW,
                        base: Reg::R1,
                        off: 8,
                        src: Source::Reg(Reg::R3),
                    },
                    Insn::Atomic {
                        size,
                        op,
                        base: Reg::R10,
                        off: -16,
                        src,
                    },
                    Insn::Atomic {
                        size,
                        op,
                        base: Reg::R1,
                        off: 8,
                        src,
                    },
                    Insn::Atomic {
                        size,
                        op,
                        base: Reg::R1,
                        off: 8,
                        src,
                    },
                    Insn::Load {
                        size: Size::DW,
                        signed: false,
                        dst: Reg::R4,
                        base: Reg::R10,
                        off: -16,
                    },
                    Insn::Load {
                        size: Size::DW,
                        signed: false,
                        dst: Reg::R5,
                        base: Reg::R1,
                        off: 8,
                    },
                ];
                let mut all = insns;
                all.extend(fold_registers());
                all.push(Insn::Exit);
                differential(&Program::new(all).unwrap(), &[0u8; 16], true).unwrap();
            }
        }
    }
}

#[test]
fn misaligned_atomics_and_acquire_release() {
    let r = differential(&asm("lock add [r10-12], r1\nexit"), &[], false);
    assert!(
        matches!(r, Err(ExecError::MisalignedAtomic { pc: 0, addr, size: 8 }) if addr % 8 == 4),
        "{r:?}"
    );
    let r = differential(
        &asm("mov r2, 1\nlock add32 [r1+2], r2\nexit"),
        &[0; 8],
        false,
    );
    assert!(matches!(
        r,
        Err(ExecError::MisalignedAtomic { pc: 1, size: 4, .. })
    ));
    // Load-acquire / store-release of every size, on the stack and the input.
    let mut insns = Vec::new();
    for (i, size) in [Size::B, Size::H, Size::W, Size::DW]
        .into_iter()
        .enumerate()
    {
        let off = -8 * (i as i16 + 1);
        insns.push(Insn::LoadImm64 {
            dst: Reg::R2,
            imm: 0x8899_aabb_ccdd_eeff_u64.rotate_left(i as u32 * 8),
        });
        insns.push(Insn::StoreRelease {
            size,
            base: Reg::R10,
            off,
            src: Reg::R2,
        });
        insns.push(Insn::LoadAcquire {
            size,
            dst: Reg::R3,
            base: Reg::R10,
            off,
        });
        insns.push(Insn::StoreRelease {
            size,
            base: Reg::R1,
            off: 8 * i as i16,
            src: Reg::R3,
        });
        insns.push(Insn::LoadAcquire {
            size,
            dst: Reg::R4,
            base: Reg::R1,
            off: 8 * i as i16,
        });
        insns.push(Insn::Alu {
            width: Width::W64,
            op: AluOp::Add,
            dst: Reg::R0,
            src: Source::Reg(Reg::R4),
        });
    }
    insns.push(Insn::Exit);
    differential(&Program::new(insns).unwrap(), &[0; 32], true).unwrap();
    // Misaligned acquire.
    let p = Program::new(vec![
        Insn::LoadAcquire {
            size: Size::H,
            dst: Reg::R0,
            base: Reg::R10,
            off: -3,
        },
        Insn::Exit,
    ])
    .unwrap();
    assert!(matches!(
        differential(&p, &[], false),
        Err(ExecError::MisalignedAtomic { pc: 0, size: 2, .. })
    ));
}

// ---------------------------------------------------------------- control flow and calls

#[test]
fn every_condition_width_and_operand_kind() {
    let values = [
        0u64,
        1,
        u64::MAX,
        i64::MIN as u64,
        0x8000_0000,
        0x1_0000_0001,
        4095,
    ];
    let imms = [0i32, 1, -1, 4095, 4096, -4095, -4096, i32::MIN, 0x8000];
    for cond in JmpCond::ALL {
        for width in [Width::W32, Width::W64] {
            let mut insns = Vec::new();
            for (i, &a) in values.iter().enumerate() {
                let srcs: Vec<Source> = std::iter::once(Source::Reg(Reg::R3))
                    .chain(imms.iter().map(|&v| Source::Imm(v)))
                    .collect();
                for src in srcs {
                    insns.push(Insn::LoadImm64 {
                        dst: Reg::R2,
                        imm: a,
                    });
                    insns.push(Insn::LoadImm64 {
                        dst: Reg::R3,
                        imm: values[(i + 3) % values.len()],
                    });
                    insns.push(Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Lsh,
                        dst: Reg::R0,
                        src: Source::Imm(1),
                    });
                    insns.push(Insn::Jump {
                        width,
                        cond,
                        dst: Reg::R2,
                        src,
                        off: 1,
                    });
                    insns.push(Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Or,
                        dst: Reg::R0,
                        src: Source::Imm(1),
                    });
                }
            }
            insns.push(Insn::Exit);
            differential(&Program::new(insns).unwrap(), &[], true).unwrap();
        }
    }
}

#[test]
fn helper_calls_preserve_registers_and_callx_looks_up_ids() {
    // A helper that clobbers every caller-saved register: r1–r5 and r10 survive.
    let src = format!(
        "mov r1, 1\nmov r2, 2\nmov r3, 3\nmov r4, 4\nmov r5, 5\nmov r6, 6\nstxdw [r10-8], r6\n\
         call {CLOBBER_ID}\nmov r7, r0\nmov r0, r1\nlsh r0, 4\nor r0, r2\nlsh r0, 4\nor r0, r3\n\
         lsh r0, 4\nor r0, r4\nlsh r0, 4\nor r0, r5\nlsh r0, 4\nor r0, r6\nlsh r0, 4\nor r0, r7\n\
         ldxdw r8, [r10-8]\nlsh r0, 4\nor r0, r8\nexit"
    );
    check(&src, &[], Ok(0x1234_5676));
    check(
        &format!("mov r1, 3\nmov r2, 4\nmov r3, 5\nmov r4, 6\nmov r5, 7\ncall {MIX_ID}\nexit"),
        &[],
        Ok(mix(3, 4, 5, 6, 7)),
    );
    check(
        &format!("mov r6, {IDENTITY_ID}\nmov r1, 99\ncall r6\nexit"),
        &[],
        Ok(99),
    );
    assert_eq!(
        differential(
            &asm(&format!("mov r6, {UNKNOWN_ID}\ncall r6\nexit")),
            &[],
            false
        ),
        Err(ExecError::UnknownHelper {
            pc: 1,
            id: UNKNOWN_ID as u64
        })
    );
    assert_eq!(
        differential(
            &asm(&format!("mov r0, 1\ncall {UNKNOWN_ID}\nexit")),
            &[],
            false
        ),
        Err(ExecError::UnknownHelper {
            pc: 1,
            id: UNKNOWN_ID as u64
        })
    );
    // An id that does not fit in 32 bits.
    assert!(matches!(
        differential(&asm("lddw r6, 0x100000005\ncall r6\nexit"), &[], false),
        Err(ExecError::UnknownHelper { pc: 2, .. })
    ));
}

#[test]
fn bpf_to_bpf_calls_frames_and_depth_limit() {
    // The callee gets a fresh frame (r10 - 512), r6–r9 are restored after the call.
    let src = "mov r6, 6\nmov r7, 7\nstxdw [r10-8], r6\ncall local sub\nldxdw r1, [r10-8]\n\
               add r0, r1\nadd r0, r6\nadd r0, r7\nexit\n\
               sub:\nmov r6, 100\nmov r7, 200\nstxdw [r10-8], r7\nmov r0, 1000\nexit";
    check(src, &[], Ok(1000 + 6 + 6 + 7));
    // Recursion to exactly the limit (8 frames) works; one more fails.
    let recurse = |depth: i32| {
        format!(
            "mov r1, {depth}\ncall local f\nexit\n\
             f:\njeq r1, 1, base\nsub r1, 1\ncall local f\nadd r0, 1\nexit\n\
             base:\nmov r0, 100\nexit"
        )
    };
    check(&recurse(7), &[], Ok(106));
    assert_eq!(
        differential(&asm(&recurse(8)), &[], false),
        Err(ExecError::CallDepthExceeded { pc: 5 })
    );
}

#[test]
fn image_layout_registration_and_drop() {
    let a = arena();
    let p = asm("mov r0, 42\nexit");
    for (mode, opts) in modes(true) {
        let jit = JitProgram::compile(&p, &helpers(), opts).unwrap();
        assert_eq!(jit.run(&mut []), Ok(42), "{mode}");
        let entry = jit.entry();
        assert_eq!(entry % 16, 0);
        let bti = opts.bti() || a.options().bti;
        assert_eq!(jit.patch_site_offset(), poke_offset(bti) * 4, "{mode}");
        assert_eq!(jit.body_offset(), jit.patch_site_offset() + PATCH_SITE_LEN);
        let code = jit.code();
        let word = |off: usize| u32::from_le_bytes(code[off..off + 4].try_into().unwrap());
        assert_eq!(word(jit.patch_site_offset()), A64_NOP);
        assert_eq!(
            word(jit.patch_site_offset() - 4),
            enc::mov_reg(true, enc::X9, enc::LR)
        );
        assert_eq!(word(0) == enc::BTI_JC, bti);
        // The PLT closes the image, its literal 8-aligned in memory.
        let plt = code.len() - 16;
        assert_eq!(word(plt), enc::ldr_literal(true, enc::X10, 8).unwrap());
        assert_eq!((entry + plt + 8) % 8, 0);
        let sym = Registry::global().lookup(entry + 4).unwrap();
        assert_eq!(sym.kind, ImageKind::Program);
        assert_eq!(sym.start, entry);
        assert_eq!(sym.owner, jit.id());
        let id = jit.id();
        drop(jit);
        assert!(
            Registry::global()
                .lookup(entry)
                .is_none_or(|s| s.owner != id)
        );
    }
}

#[test]
fn concurrent_runs_of_one_program() {
    arena();
    let src = "mov r0, 0\nmov r2, 1000\nadd r0, r2\nsub r2, 1\njne r2, 0, -3\n\
               stxdw [r10-8], r0\nlock add [r1+0], r2\nldxdw r0, [r10-8]\nexit";
    let jit = JitProgram::compile(&asm(src), &helpers(), JitOptions::checked()).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut mem = [0u8; 8];
                for _ in 0..200 {
                    assert_eq!(jit.run(&mut mem), Ok(500_500));
                }
            });
        }
    });
}

// ---------------------------------------------------------------- run limits

#[test]
fn budget_ends_runaway_loops_and_recursion_in_every_mode() {
    arena();
    limits::budget_in_every_mode(&modes(true), &helpers());
}

#[test]
fn read_only_input_refuses_stores_and_atomics() {
    arena();
    limits::read_only_input_in_every_mode(&modes(false), &helpers());
}

#[test]
fn run_env_gives_args_regions_and_a_zeroed_stack() {
    arena();
    common::context::run_env_in_every_mode(&modes(true), &helpers());
}

#[test]
fn context_helpers_see_their_run_grant_memory_and_end_runs() {
    arena();
    common::context::context_helpers_in_every_mode(&modes(true), &helpers());
}

#[test]
fn tail_calls_follow_linux() {
    arena();
    common::tail::tail_calls_in_every_mode(&modes(true));
}

#[test]
fn tail_call_slots_can_be_replaced_under_running_threads() {
    arena();
    common::tail::tail_call_slots_replaced_under_runs(&modes(true)[..2]);
}

// ---------------------------------------------------------------- random programs

fn imm() -> impl Strategy<Value = i32> {
    prop_oneof![
        3 => -4200i32..4200,
        1 => any::<i32>(),
        1 => proptest::sample::select(vec![0, 1, -1, 31, 32, 63, 64, i32::MIN, i32::MAX, 0xffff, 0x5555_5555]),
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => any::<u64>(),
        1 => proptest::sample::select(EDGE_VALUES.to_vec()),
        1 => 0u64..300,
    ]
}

fn alu() -> impl Strategy<Value = Insn> {
    let binary = (
        width(),
        proptest::sample::select(ALU_OPS.to_vec()),
        data_reg(),
        source(imm()),
    )
        .prop_map(|(width, op, dst, src)| {
            let sx = matches!(op, AluOp::MovSx8 | AluOp::MovSx16 | AluOp::MovSx32);
            let (op, src) = match (op, src) {
                // Sign-extending moves have register sources; 32-bit has no movsx32.
                (_, Source::Imm(v)) if sx => (AluOp::Mov, Source::Imm(v)),
                (AluOp::MovSx32, s) if width == Width::W32 => (AluOp::Mov, s),
                other => other,
            };
            Insn::Alu {
                width,
                op,
                dst,
                src,
            }
        });
    prop_oneof![
        8 => binary,
        1 => neg(data_reg()),
        1 => endian(data_reg()),
        1 => lddw(data_reg(), value()),
    ]
}

/// An access to the stack: through r10 inside the frame, or through a copy of r10.
fn stack_access() -> impl Strategy<Value = Vec<Insn>> {
    (0u8..5, size(), 1i16..64, data_reg(), any::<bool>(), 0u8..3).prop_map(
        |(kind, size, slot, r, via_copy, misalign)| {
            // Mostly naturally aligned, sometimes not (atomics then fail like the interpreter).
            let off = -8 * slot + if misalign == 0 { 3 } else { 0 };
            if via_copy {
                vec![
                    Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Mov,
                        dst: Reg::R9,
                        src: Source::Reg(Reg::R10),
                    },
                    Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Add,
                        dst: Reg::R9,
                        src: Source::Imm(-256),
                    },
                    access(
                        kind,
                        size,
                        Reg::R9,
                        off + 256,
                        if r == Reg::R9 { Reg::R2 } else { r },
                    ),
                    // Stack addresses differ between engines: do not let one reach r0.
                    Insn::Alu {
                        width: Width::W64,
                        op: AluOp::Mov,
                        dst: Reg::R9,
                        src: Source::Imm(9),
                    },
                ]
            } else {
                vec![access(kind, size, Reg::R10, off, r)]
            }
        },
    )
}

/// An access to the input through r1: mostly in bounds, sometimes just outside.
fn input_access() -> impl Strategy<Value = Vec<Insn>> {
    (0u8..5, size(), -8i16..72, data_reg()).prop_map(|(kind, size, off, r)| {
        let off = if kind >= 2 && off >= 0 {
            off & !(size.bytes() as i16 - 1)
        } else {
            off
        };
        vec![access(kind, size, Reg::R1, off, r)]
    })
}
fn item_options() -> ItemOptions {
    ItemOptions {
        alu: alu().boxed(),
        imm: imm().boxed(),
        accesses: vec![(5, stack_access().boxed()), (3, input_access().boxed())],
        // Unknown ids end a run, so they are rare.
        helpers: vec![
            (10, MIX_ID),
            (3, IDENTITY_ID),
            (3, CLOBBER_ID),
            (1, UNKNOWN_ID),
        ],
        callx: CallxOptions {
            regs: 2..=9,
            ids: vec![(6, MIX_ID), (3, IDENTITY_ID), (1, UNKNOWN_ID)],
            set: None,
        },
        call_sub: 2,
        // The subprogram may call itself: recursion ends at the depth limit at the latest.
        call_sub_in_sub: 1,
    }
}

fn case() -> impl Strategy<Value = Case> {
    progen::case(&CaseOptions {
        value: value().boxed(),
        mem_lens: vec![0, 8, 64],
        items: item_options(),
        sub_len: 0..10,
    })
}

/// The stack's contents matter too: `[r10-8]`, `[r10-16]`, `[r10-56]` and `[r10-504]` are
/// added into r0 after the main block.
const BUILD: BuildOptions = BuildOptions {
    stack_slots: &[1, 2, 7, 63],
    fold_mul: FOLD_MUL,
};

fn build(case: &Case) -> Program {
    progen::build(case, &BUILD)
}

proptest! {
    // Each case compiles and runs 8 images; under qemu-user that costs ~10 ms.
    #![proptest_config(progen::proptest_config("LIVEBPF_PROPTEST_CASES", 200))]

    #[test]
    fn random_programs_match_the_interpreter(case in case()) {
        // Trusted modes run only if the interpreter runs the program without an error on the
        // same buffer (`progen::differential`): a helper such as `mix` makes the outcome depend
        // on the buffer's address.
        let _ = differential(&build(&case), &case.mem, true);
    }
}
