//! The x86-64 JIT against the interpreter: per-class unit tests, a differential property test on
//! random programs, error reporting, the image's layout and registration, and concurrent runs.
#![cfg(target_arch = "x86_64")]

mod common;

use common::limits;

use common::progen::{
    self, ALU_OPS, ATOMIC, BuildOptions, CallxOptions, Case, CaseOptions, EDGE_VALUES, IDENTITY_ID,
    ItemOptions, LOAD, LOAD_ACQUIRE, MIX_ID, STORE, UNKNOWN_ID, access, asm, endian, lddw, mix,
    neg, normalize, reg, size, source, width,
};
use livebpf::exec::{Access, ExecError, MemRegion};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::{AluOp, AtomicOp, Insn, Program, Reg, Size, Source, Width};
use livebpf::jit::x86_64::{BODY_OFFSET, PATCH_SITE_LEN, PATCH_SITE_NOP, PATCH_SITE_OFFSET};
use livebpf::jit::{JitOptions, JitProgram};
use livebpf::text::{ImageKind, Registry};
use proptest::prelude::*;

fn helpers() -> Helpers {
    let mut h = Helpers::conformance();
    h.register(MIX_ID, mix);
    h
}

/// Trusted options, for programs whose accesses are known to stay in bounds.
fn trusted() -> JitOptions {
    // SAFETY: only used on programs that access nothing but their input and stack (each is
    // also run checked and by the interpreter, which would report any stray access).
    unsafe { JitOptions::trusted() }
}

/// Runs `program` on the interpreter and the JIT (checked, and trusted if `trusted_ok`) over the
/// same buffer (see `progen::differential`); returns the interpreter's result.
fn differential(program: &Program, mem: &[u8], trusted_ok: bool) -> Result<u64, ExecError> {
    let mut modes = vec![("checked".to_string(), JitOptions::checked())];
    if trusted_ok {
        modes.push(("trusted".to_string(), trusted()));
    }
    progen::differential(program, mem, &helpers(), &modes)
}

/// A program the interpreter finds faulting on the very buffer `differential` runs it over is
/// never run trusted, even when the caller allows trusted modes (see `progen::differential`).
#[test]
fn trusted_modes_skip_a_program_that_faults_on_the_buffer() {
    let r = differential(&asm("stxdw [r1+8], r1\nmov r0, 1\nexit"), &[0; 8], true);
    assert!(matches!(r, Err(ExecError::OutOfBounds { .. })), "{r:?}");
}

fn check(src: &str, mem: &[u8], expected: Result<u64, ExecError>) {
    let got = differential(&asm(src), mem, expected.is_ok());
    assert_eq!(got, expected, "{src}");
}

// ---------------------------------------------------------------- ALU

/// The x86 registers behind r0 (rax), r3 (rdx) and r4 (rcx) are implicit operands of division
/// and shifts; every aliasing of them must still give the interpreter's result.
#[test]
fn division_modulo_and_shifts_with_every_register_aliasing() {
    let ops = [
        AluOp::Div,
        AluOp::SDiv,
        AluOp::Mod,
        AluOp::SMod,
        AluOp::Lsh,
        AluOp::Rsh,
        AluOp::Arsh,
        AluOp::Mul,
    ];
    let regs = [Reg::R0, Reg::R3, Reg::R4, Reg::R7];
    let divisors = [0u64, 1, u64::MAX, 3, 0xffff_ffff, 33, 64];
    for width in [Width::W32, Width::W64] {
        for op in ops {
            for dst in regs {
                for src in regs {
                    for &d in &[i64::MIN as u64, 0xffff_ffff_8000_0000, 100, u64::MAX] {
                        for &s in &divisors {
                            if dst == src && d != s {
                                continue;
                            }
                            let mut insns = vec![];
                            // Distinct values in the bystander registers r0, r3, r4.
                            for (r, v) in [(Reg::R0, 0xa0), (Reg::R3, 0xa3), (Reg::R4, 0xa4)] {
                                insns.push(Insn::LoadImm64 { dst: r, imm: v });
                            }
                            insns.push(Insn::LoadImm64 { dst: src, imm: s });
                            insns.push(Insn::LoadImm64 { dst, imm: d });
                            insns.push(Insn::Alu {
                                width,
                                op,
                                dst,
                                src: Source::Reg(src),
                            });
                            insns.extend(fold_registers());
                            insns.push(Insn::Exit);
                            differential(&Program::new(insns).unwrap(), &[], true).unwrap();
                        }
                    }
                }
            }
            // Immediate forms, including 0 and -1.
            for imm in [0, -1, 1, 3, -3, 31, 32, 63, 64, i32::MIN, i32::MAX] {
                for &d in &EDGE_VALUES {
                    let insns = vec![
                        Insn::LoadImm64 {
                            dst: Reg::R3,
                            imm: d,
                        },
                        Insn::Alu {
                            width,
                            op,
                            dst: Reg::R3,
                            src: Source::Imm(imm),
                        },
                        Insn::Alu {
                            width: Width::W64,
                            op: AluOp::Mov,
                            dst: Reg::R0,
                            src: Source::Reg(Reg::R3),
                        },
                        Insn::Exit,
                    ];
                    differential(&Program::new(insns).unwrap(), &[], true).unwrap();
                }
            }
        }
    }
}
/// The multiplier of `fold_registers`.
const FOLD_MUL: i32 = 0x0100_0193;

/// r0 = a hash of r0–r9 (never r10: stack addresses differ between engines).
fn fold_registers() -> Vec<Insn> {
    progen::fold_registers(FOLD_MUL)
}

#[test]
fn rfc9669_division_edge_cases() {
    let min64 = i64::MIN as u64;
    let cases = [
        ("lddw %r0, 5\nmov %r1, 0\ndiv %r0, %r1\nexit", 0),
        ("lddw %r0, 5\nmov %r1, 0\nmod %r0, %r1\nexit", 5),
        (
            "lddw %r0, 0x1ffffffff\nmov %r1, 0\nmod32 %r0, %r1\nexit",
            0xffff_ffff,
        ),
        ("lddw %r0, 0x1ffffffff\nmod32 %r0, 0\nexit", 0xffff_ffff),
        ("lddw %r0, 0x8000000000000000\nsdiv %r0, -1\nexit", min64),
        (
            "lddw %r0, 0x8000000000000000\nmov %r1, -1\nsdiv %r0, %r1\nexit",
            min64,
        ),
        (
            "lddw %r0, 0x8000000000000000\nmov %r1, -1\nsmod %r0, %r1\nexit",
            0,
        ),
        (
            "mov32 %r0, 0x80000000\nmov32 %r1, -1\nsdiv32 %r0, %r1\nexit",
            0x8000_0000,
        ),
        ("mov32 %r0, 0x80000000\nsmod32 %r0, -1\nexit", 0),
        ("mov %r0, -7\nsmod %r0, 2\nexit", -1i64 as u64),
        ("mov %r0, -7\nmov %r3, 2\nsdiv %r0, %r3\nexit", -3i64 as u64),
    ];
    for (src, want) in cases {
        check(src, &[], Ok(want));
    }
}

#[test]
fn alu_moves_endianness_and_32_bit_zero_extension() {
    let cases: [(&str, u64); 14] = [
        (
            "lddw %r0, 0xffffffffffffffff\nmov %r1, 0\nlsh32 %r0, %r1\nexit",
            0xffff_ffff,
        ),
        (
            "lddw %r0, 0xffffffffffffffff\nmov %r4, 32\nrsh32 %r0, %r4\nexit",
            0xffff_ffff,
        ),
        (
            "lddw %r4, 0xffffffffffffffff\nmov %r1, 36\narsh32 %r4, %r1\nmov %r0, %r4\nexit",
            0xffff_ffff,
        ),
        (
            "lddw %r0, 0xffffffffffffffff\nlsh32 %r0, 0\nexit",
            0xffff_ffff,
        ),
        (
            "lddw %r4, 0x8000000000000000\narsh %r4, %r4\nmov %r0, %r4\nexit",
            0x8000_0000_0000_0000,
        ),
        (
            "lddw %r1, 0x1234567887654321\nmovsx832 %r0, %r1\nexit",
            0x21,
        ),
        (
            "lddw %r1, 0x12345678876543a1\nmovsx864 %r0, %r1\nexit",
            0xffff_ffff_ffff_ffa1,
        ),
        (
            "lddw %r2, 0x1234567887658321\nmovsx1632 %r0, %r2\nexit",
            0xffff_8321,
        ),
        (
            "lddw %r2, 0x1234567887658321\nmovsx3264 %r0, %r2\nexit",
            0xffff_ffff_8765_8321,
        ),
        ("lddw %r0, 0x1122334455667788\nbe16 %r0\nexit", 0x8877),
        ("lddw %r0, 0x1122334455667788\nbe32 %r0\nexit", 0x8877_6655),
        (
            "lddw %r0, 0x1122334455667788\nbswap64 %r0\nexit",
            0x8877_6655_4433_2211,
        ),
        ("lddw %r0, 0x1122334455667788\nle16 %r0\nexit", 0x7788),
        ("lddw %r0, 0x1122334455667788\nneg32 %r0\nexit", 0xaa99_8878),
    ];
    for (src, want) in cases {
        check(src, &[], Ok(want));
    }
    // Every endian form on every register (rsi/rdi have no legacy byte registers).
    for kind in ["le", "be", "bswap"] {
        for bits in [16, 32, 64] {
            for r in 0..=9 {
                let src = format!(
                    "lddw %r{r}, 0x1122334455667788\n{kind}{bits} %r{r}\nmov %r0, %r{r}\nexit"
                );
                differential(&asm(&src), &[], true).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------- memory

#[test]
fn loads_and_stores_of_every_size_on_input_and_stack() {
    let mem: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(37) | 0x80).collect();
    for (suffix, n) in [("b", 1), ("h", 2), ("w", 4), ("dw", 8)] {
        for off in 0..=(16 - n) {
            check(&format!("ldx{suffix} %r0, [%r1+{off}]\nexit"), &mem, {
                let mut v = [0u8; 8];
                v[..n].copy_from_slice(&mem[off..off + n]);
                Ok(u64::from_le_bytes(v))
            });
            if n < 8 {
                differential(
                    &asm(&format!("ldxs{suffix} %r0, [%r1+{off}]\nexit")),
                    &mem,
                    true,
                )
                .unwrap();
            }
            for src in ["%r6", "-2"] {
                let st = if src.starts_with('%') { "stx" } else { "st" };
                let prog = format!(
                    "lddw %r6, 0xf1e2d3c4b5a69788\n{st}{suffix} [%r1+{off}], {src}\n\
                     {st}{suffix} [%r10-{}], {src}\nldxdw %r0, [%r10-8]\nldxdw %r2, [%r1+8]\n\
                     xor %r0, %r2\nexit",
                    off + n
                );
                differential(&asm(&prog), &mem, true).unwrap();
            }
        }
    }
}

#[test]
fn out_of_bounds_accesses_report_the_interpreters_error() {
    let mem = [1u8; 12];
    for (suffix, n) in [("b", 1u64), ("h", 2), ("w", 4), ("dw", 8)] {
        // Just outside either end of the input, and straddling the end.
        for off in [-1i64, 12 - n as i64 + 1, 12, 100] {
            let src = format!("ldx{suffix} %r0, [%r1{off:+}]\nexit");
            let r = differential(&asm(&src), &mem, false);
            assert!(
                matches!(r, Err(ExecError::OutOfBounds { pc: 0, size, access: Access::Load, .. }) if size == n),
                "{src}: {r:?}"
            );
            let src = format!("mov %r3, 9\nstx{suffix} [%r1{off:+}], %r3\nexit");
            let r = differential(&asm(&src), &mem, false);
            assert!(
                matches!(
                    r,
                    Err(ExecError::OutOfBounds {
                        pc: 1,
                        access: Access::Store,
                        ..
                    })
                ),
                "{src}: {r:?}"
            );
        }
        // Absolute addresses nothing is mapped at, including a wrap-around.
        for addr in [0u64, 8, u64::MAX - 2, 0xffff_8000_0000_0000] {
            let src = format!("lddw %r5, {addr:#x}\nldx{suffix} %r0, [%r5+1]\nexit");
            let want = Err(ExecError::OutOfBounds {
                pc: 2,
                addr: addr.wrapping_add(1),
                size: n,
                access: Access::Load,
            });
            assert_eq!(differential(&asm(&src), &mem, false), want, "{src}");
        }
        // Empty input: r1 = 0.
        let src = format!("ldx{suffix} %r0, [%r1+0]\nexit");
        assert_eq!(
            differential(&asm(&src), &[], false),
            Err(ExecError::OutOfBounds {
                pc: 0,
                addr: 0,
                size: n,
                access: Access::Load
            })
        );
        // Past the top of the stack, and below its bottom (8 frames of 512 bytes).
        for off in ["+0", "-4097", "+512"] {
            let src = format!("ldx{suffix} %r0, [%r10{off}]\nexit");
            let r = differential(&asm(&src), &[], false);
            assert!(
                matches!(r, Err(ExecError::OutOfBounds { pc: 0, size, .. }) if size == n),
                "{src}: {r:?}"
            );
        }
        // The bottom of the whole stack is reachable from the entry frame.
        let src = format!("ldx{suffix} %r0, [%r10-4096]\nexit");
        assert_eq!(differential(&asm(&src), &[], true), Ok(0));
    }
}

#[test]
fn extra_regions_follow_their_permissions() {
    let mut ro = [7u8; 16];
    let mut rw = [0u8; 16];
    let regions = [
        MemRegion::new(ro.as_mut_ptr() as u64, 16, false),
        MemRegion::of_slice(&mut rw),
    ];
    let load = |r: &MemRegion| {
        asm(&format!(
            "lddw %r2, {:#x}\nldxdw %r0, [%r2+8]\nstxw [%r2+12], %r0\nexit",
            r.start
        ))
    };
    let h = helpers();
    for (i, region) in regions.iter().enumerate() {
        let program = load(region);
        // SAFETY: both regions are live local arrays for the whole run.
        let interp = unsafe {
            Interpreter::new(&program)
                .with_helpers(h.clone())
                .with_region(regions[0])
                .with_region(regions[1])
        }
        .run(&mut []);
        let jit = JitProgram::compile(&program, &h, JitOptions::checked()).unwrap();
        // SAFETY: both regions are live local arrays for the whole run.
        let got = unsafe { jit.run_with_regions(&mut [], &regions) };
        assert_eq!(got, interp);
        if i == 0 {
            assert_eq!(
                got,
                Err(ExecError::OutOfBounds {
                    pc: 3,
                    addr: region.start + 12,
                    size: 4,
                    access: Access::Store
                })
            );
        } else {
            assert_eq!(got, Ok(0));
        }
        // Without the regions, the first access already fails.
        let r = jit.run(&mut []);
        assert!(
            matches!(r, Err(ExecError::OutOfBounds { pc: 2, .. })),
            "{r:?}"
        );
    }
    assert_eq!(ro, [7; 16]);
}

#[test]
fn atomics_of_both_widths_with_every_operation() {
    let ops = [
        "add",
        "or",
        "and",
        "xor",
        "fetch add",
        "fetch or",
        "fetch and",
        "fetch xor",
        "xchg",
        "cmpxchg",
    ];
    let mem = [0x5au8; 16];
    for op in ops {
        for w in ["", "32"] {
            // r0 takes part: it is cmpxchg's comparand and rax in the generated code.
            for (src, base) in [("%r2", "%r10-8"), ("%r0", "%r10-16"), ("%r0", "%r1+8")] {
                for r0 in [0u64, 0x5a5a_5a5a, 0x5a5a_5a5a_5a5a_5a5a, 0xdead_0000_beef] {
                    let prog = format!(
                        "lddw %r6, 0x5a5a5a5a5a5a5a5a\nstxdw [%r10-8], %r6\nstxdw [%r10-16], %r6\n\
                         lddw %r2, 0x0ff00ff0f00ff00f\nlddw %r0, {r0:#x}\n\
                         lock {op}{w} [{base}], {src}\n\
                         ldxdw %r3, [%r10-8]\nldxdw %r4, [%r10-16]\nldxdw %r5, [%r1+8]\n\
                         mov %r6, 0\nmov %r7, 0\nmov %r8, 0\nmov %r9, 0\nmov %r1, 0\n"
                    );
                    let mut insns = asm(&format!("{prog}exit")).insns().to_vec();
                    insns.pop();
                    insns.extend(fold_registers());
                    insns.push(Insn::Exit);
                    differential(&Program::new(insns).unwrap(), &mem, true).unwrap();
                }
            }
        }
    }
}

#[test]
fn misaligned_atomics_and_acquire_release() {
    let mem = [0u8; 16];
    for (op, n) in [
        ("lock add", 8),
        ("lock add32", 4),
        ("lock fetch or", 8),
        ("lock xchg32", 4),
    ] {
        let src = format!("mov %r2, 1\n{op} [%r1+2], %r2\nexit");
        let r = differential(&asm(&src), &mem, false);
        assert!(
            matches!(r, Err(ExecError::MisalignedAtomic { pc: 1, size, .. }) if size == n),
            "{src}: {r:?}"
        );
        // On the stack: 4 bytes below the top, a word is misaligned, a doubleword sticks out.
        let src = format!("mov %r2, 1\n{op} [%r10-6], %r2\nexit");
        let r = differential(&asm(&src), &[], false);
        if n == 4 {
            assert!(
                matches!(r, Err(ExecError::MisalignedAtomic { pc: 1, size: 4, .. })),
                "{src}: {r:?}"
            );
        } else {
            let oob = Err(ExecError::OutOfBounds {
                pc: 1,
                addr: 2, // top - 6, reduced to its alignment by `normalize`
                size: 8,
                access: Access::Atomic,
            });
            assert_eq!(normalize(r, &(0..0)), oob, "{src}");
        }
    }
    // Out of bounds wins over misaligned, as in the interpreter.
    let r = differential(
        &asm("mov %r2, 1\nlock add [%r1+13], %r2\nexit"),
        &mem,
        false,
    );
    assert!(
        matches!(
            r,
            Err(ExecError::OutOfBounds {
                access: Access::Atomic,
                ..
            })
        ),
        "{r:?}"
    );
    for (s, n) in [("b", 1u64), ("h", 2), ("w", 4), ("dw", 8)] {
        check(
            &format!(
                "lddw %r2, 0x8877665544332211\nstrel{s} [%r1+8], %r2\nldacq{s} %r0, [%r1+8]\nexit"
            ),
            &mem,
            Ok(0x8877_6655_4433_2211 & (u64::MAX >> (64 - 8 * n))),
        );
        if n > 1 {
            let r = differential(&asm(&format!("ldacq{s} %r0, [%r1+1]\nexit")), &mem, false);
            assert!(
                matches!(r, Err(ExecError::MisalignedAtomic { pc: 0, size, .. }) if size == n),
                "{r:?}"
            );
            let r = differential(
                &asm(&format!("strel{s} [%r10-{}], %r1\nexit", n + 1)),
                &[],
                false,
            );
            assert!(
                matches!(r, Err(ExecError::MisalignedAtomic { pc: 0, .. })),
                "{r:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- jumps and calls

#[test]
fn every_condition_width_and_operand_kind() {
    let conds = [
        "jeq", "jne", "jgt", "jge", "jlt", "jle", "jset", "jsgt", "jsge", "jslt", "jsle",
    ];
    let values = [
        0u64,
        1,
        u64::MAX,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0001,
        i64::MIN as u64,
    ];
    let imms = [0i32, 1, -1, i32::MIN, 0x7fff_ffff];
    for c in conds {
        for w in ["", "32"] {
            for &a in &values {
                for &b in &values {
                    let src = format!(
                        "lddw %r1, {a:#x}\nlddw %r2, {b:#x}\nmov %r0, 1\n{c}{w} %r1, %r2, +1\nmov %r0, 0\nexit"
                    );
                    differential(&asm(&src), &[], true).unwrap();
                }
                for imm in imms {
                    let src = format!(
                        "lddw %r1, {a:#x}\nmov %r0, 1\n{c}{w} %r1, {imm}, +1\nmov %r0, 0\nexit"
                    );
                    differential(&asm(&src), &[], true).unwrap();
                }
            }
        }
    }
}

#[test]
fn helper_calls_preserve_registers_and_callx_looks_up_ids() {
    // r1–r5 survive a helper call in the interpreter; so they must in the JIT.
    let src = "mov %r1, 11\nmov %r2, 22\nmov %r3, 33\nmov %r4, 44\nmov %r5, 55\nmov %r6, 66\n\
               mov %r9, 99\ncall 1\nmov %r7, %r0\ncall 5\nadd %r0, %r1\nadd %r0, %r2\n\
               add %r0, %r3\nadd %r0, %r4\nadd %r0, %r5\nadd %r0, %r6\nadd %r0, %r9\nexit";
    check(src, &[], Ok(11 + 11 + 22 + 33 + 44 + 55 + 66 + 99));
    check(
        "mov %r1, 3\nmov %r4, 1\ncall %r4\nexit",
        &[],
        Ok(mix(3, 0, 0, 1, 0)),
    );
    check("mov %r1, 3\nmov %r0, 5\ncall %r0\nexit", &[], Ok(3));
    check(
        "mov %r0, 77\ncall %r0\nexit",
        &[],
        Err(ExecError::UnknownHelper { pc: 1, id: 77 }),
    );
    check(
        "lddw %r3, 0x100000005\ncall %r3\nexit",
        &[],
        Err(ExecError::UnknownHelper {
            pc: 2,
            id: 0x1_0000_0005,
        }),
    );
    check(
        &format!("mov %r0, 1\njeq %r0, 1, +1\ncall {UNKNOWN_ID}\ncall {UNKNOWN_ID}\nexit"),
        &[],
        Err(ExecError::UnknownHelper {
            pc: 3,
            id: UNKNOWN_ID as u64,
        }),
    );
}

#[test]
fn bpf_to_bpf_calls_frames_and_depth_limit() {
    // Each frame gets its own 512 bytes; r6–r9 and r10 are restored on return.
    let src = "mov %r6, 6\nmov %r1, 3\nstxdw [%r10-8], %r1\ncall local f\n\
               ldxdw %r2, [%r10-8]\nadd %r0, %r2\nadd %r0, %r6\nexit\n\
               f:\nmov %r6, 100\nstxdw [%r10-8], %r6\nldxdw %r0, [%r10-8]\n\
               ldxdw %r3, [%r10+504]\nadd %r0, %r3\nexit";
    check(src, &[], Ok(100 + 3 + 3 + 6));
    // Recursion n calls deep: 8 frames (the entry's and 7 calls) are allowed, the 8th call fails.
    for n in [1, 7, 8, 9, 50] {
        let src = format!(
            "mov %r6, {n}\ncall local f\nexit\n\
             f:\njeq %r6, 1, done\nsub %r6, 1\nstxdw [%r10-512], %r6\ncall local f\n\
             add %r0, 1\nexit\ndone:\nmov %r0, 0\nexit"
        );
        let want = if n <= 7 {
            Ok(n - 1)
        } else {
            Err(ExecError::CallDepthExceeded { pc: 6 })
        };
        check(&src, &[], want);
    }
    // In the deepest frame r10 is 512 bytes above the stack's bottom: [r10-512] is the last
    // valid doubleword and [r10-520] is out of bounds (addresses reduced by `normalize`).
    for (off, want) in [
        (512, Ok(0)),
        (
            520,
            Err(ExecError::OutOfBounds {
                pc: 7,
                addr: 0,
                size: 8,
                access: Access::Load,
            }),
        ),
    ] {
        let src = format!(
            "mov %r6, 7\ncall local f\nexit\n\
             f:\njeq %r6, 1, deepest\nsub %r6, 1\ncall local f\nexit\n\
             deepest:\nldxdw %r0, [%r10-{off}]\nexit"
        );
        let r = differential(&asm(&src), &[], want.is_ok());
        assert_eq!(normalize(r, &(0..0)), want, "{src}");
    }
    // A fault deep inside nested calls unwinds the whole native stack.
    let src = "call local f\nexit\nf:\ncall local g\nexit\ng:\nldxdw %r0, [%r1+0]\nexit";
    check(
        src,
        &[],
        Err(ExecError::OutOfBounds {
            pc: 4,
            addr: 0,
            size: 8,
            access: Access::Load,
        }),
    );
}

// ---------------------------------------------------------------- API, image, concurrency

#[test]
fn image_layout_registration_and_drop() {
    let p = asm("mov %r0, 42\nexit");
    let jit = JitProgram::compile(&p, &helpers(), JitOptions::default()).unwrap();
    assert!(jit.is_checked());
    assert_eq!(jit.run(&mut []), Ok(42));
    assert_eq!(jit.patch_site_offset(), PATCH_SITE_OFFSET);
    assert_eq!(jit.body_offset(), BODY_OFFSET);
    let site = jit.entry() + jit.patch_site_offset();
    assert_eq!(site % 8, 0, "the nop must sit in one aligned 8-byte word");
    assert_eq!(&jit.code()[..PATCH_SITE_LEN], PATCH_SITE_NOP);
    assert_eq!(
        &jit.code()[BODY_OFFSET..BODY_OFFSET + 4],
        [0x55, 0x48, 0x89, 0xe5]
    );
    let sym = Registry::global().lookup(site + 7).expect("registered");
    assert_eq!(sym.kind, ImageKind::Program);
    assert_eq!(sym.start, jit.entry());
    assert_eq!(sym.owner, jit.id());
    assert!(sym.len >= jit.code().len());
    let (entry, id) = (jit.entry(), jit.id());
    drop(jit);
    // Other tests may reuse the address at once; the owner id is unique.
    assert!(
        Registry::global()
            .lookup(entry)
            .is_none_or(|s| s.owner != id)
    );
}

#[test]
fn concurrent_runs_of_one_program() {
    // Sums the input's bytes through a helper and the stack.
    let p = asm(
        "mov %r0, 0\nmov %r3, 0\nloop:\njge %r3, %r2, done\nmov %r4, %r1\nadd %r4, %r3\n\
         ldxb %r5, [%r4+0]\nstxdw [%r10-8], %r5\nldxdw %r5, [%r10-8]\nadd %r0, %r5\n\
         add %r3, 1\nja loop\ndone:\nmov %r6, %r0\nmov %r1, %r0\ncall 5\nadd %r0, %r6\nexit",
    );
    let jit = JitProgram::compile(&p, &helpers(), JitOptions::checked()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let jit = &jit;
            s.spawn(move || {
                for i in 0..10_000u64 {
                    let len = ((i + t) % 24) as usize;
                    let mut mem: Vec<u8> = (0..len).map(|k| (k as u64 * 7 + i + t) as u8).collect();
                    let sum: u64 = mem.iter().map(|&b| b as u64).sum();
                    assert_eq!(jit.run(&mut mem), Ok(2 * sum), "thread {t} run {i}");
                }
            });
        }
    });
}

// ---------------------------------------------------------------- run limits

fn both_modes() -> Vec<(String, JitOptions)> {
    vec![
        ("checked".to_string(), JitOptions::checked()),
        ("trusted".to_string(), trusted()),
    ]
}

#[test]
fn budget_ends_runaway_loops_and_recursion_in_checked_and_trusted_code() {
    limits::budget_in_every_mode(&both_modes(), &helpers());
}

#[test]
fn read_only_input_refuses_stores_and_atomics() {
    limits::read_only_input_in_every_mode(&both_modes(), &helpers());
}

#[test]
fn run_env_gives_args_regions_and_a_zeroed_stack() {
    common::context::run_env_in_every_mode(&both_modes(), &helpers());
}

#[test]
fn context_helpers_see_their_run_grant_memory_and_end_runs() {
    common::context::context_helpers_in_every_mode(&both_modes(), &helpers());
}

#[test]
fn tail_calls_follow_linux() {
    common::tail::tail_calls_in_every_mode(&both_modes());
}

#[test]
fn tail_call_slots_can_be_replaced_under_running_threads() {
    common::tail::tail_call_slots_replaced_under_runs(&both_modes());
}

// ---------------------------------------------------------------- random programs

fn imm() -> impl Strategy<Value = i32> {
    prop_oneof![
        any::<i32>(),
        Just(0),
        Just(1),
        Just(-1),
        Just(i32::MIN),
        Just(i32::MAX),
        -70..70i32,
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        Just(i64::MIN as u64),
        Just(0xffff_ffff),
        Just(0x8000_0000),
        Just(0xffff_ffff_8000_0000),
        0..100u64,
    ]
}

fn alu() -> impl Strategy<Value = Insn> {
    // Sign-extending moves come separately below.
    let ops = proptest::sample::select(
        ALU_OPS
            .into_iter()
            .filter(|op| op.takes_imm())
            .collect::<Vec<_>>(),
    );
    let plain = (width(), ops, reg(), source(imm())).prop_map(|(width, op, dst, src)| Insn::Alu {
        width,
        op,
        dst,
        src,
    });
    let movsx = (
        width(),
        prop_oneof![
            Just(AluOp::MovSx8),
            Just(AluOp::MovSx16),
            Just(AluOp::MovSx32)
        ],
        reg(),
        reg(),
    )
        .prop_map(|(width, op, dst, src)| Insn::Alu {
            // movsx32 exists only in the 64-bit form.
            width: if op == AluOp::MovSx32 {
                Width::W64
            } else {
                width
            },
            op,
            dst,
            src: Source::Reg(src),
        });
    prop_oneof![
        6 => plain,
        1 => movsx,
        1 => neg(reg()),
        1 => endian(reg()),
        1 => lddw(reg(), value()),
    ]
}

/// Accesses inside the current stack frame: always valid.
fn stack_access() -> impl Strategy<Value = Insn> {
    let store = (size(), 1i16..=512, source(imm())).prop_map(|(size, k, src)| Insn::Store {
        size,
        base: Reg::R10,
        off: -k.max(size.bytes() as i16),
        src,
    });
    let load =
        (size(), any::<bool>(), reg(), 1i16..=512).prop_map(|(size, signed, dst, k)| Insn::Load {
            size,
            signed: signed && size != Size::DW,
            dst,
            base: Reg::R10,
            off: -k.max(size.bytes() as i16),
        });
    let atomic_op = proptest::sample::select(AtomicOp::ALL.to_vec());
    let atomic = (
        prop_oneof![Just(Size::W), Just(Size::DW)],
        atomic_op,
        1i16..=64,
        reg(),
    )
        .prop_map(|(size, op, k, src)| Insn::Atomic {
            size,
            op,
            base: Reg::R10,
            off: -k * size.bytes() as i16,
            src,
        });
    let acq = (size(), reg(), 1i16..=64).prop_map(|(size, dst, k)| Insn::LoadAcquire {
        size,
        dst,
        base: Reg::R10,
        off: -k * 8,
    });
    let rel = (size(), reg(), 1i16..=64).prop_map(|(size, src, k)| Insn::StoreRelease {
        size,
        base: Reg::R10,
        off: -k * 8,
        src,
    });
    prop_oneof![3 => store, 3 => load, 3 => atomic, 1 => acq, 1 => rel]
}

/// Accesses that may fault: through r1 (the input, or whatever r1 was overwritten with), at
/// addresses nothing is mapped at, or misaligned atomics on the stack.
fn faulting_access() -> impl Strategy<Value = Vec<Insn>> {
    let kind = proptest::sample::select(vec![LOAD, STORE, ATOMIC, LOAD_ACQUIRE]);
    let via_r1 = (kind.clone(), size(), -12i16..80, reg())
        .prop_map(|(k, size, off, r)| vec![access(k, size, Reg::R1, off, r)]);
    let bad_addr = prop_oneof![
        0u64..0x1000,
        Just(u64::MAX - 3),
        Just(0xffff_8000_0000_0000u64),
        0xffff_ffff_ffff_f000u64..=u64::MAX,
    ];
    let absolute =
        (kind.clone(), size(), bad_addr, -8i16..8, 0u8..=9).prop_map(|(k, size, addr, off, b)| {
            let base = Reg::new(b).unwrap();
            vec![
                Insn::LoadImm64 {
                    dst: base,
                    imm: addr,
                },
                access(k, size, base, off, Reg::R2),
            ]
        });
    let misaligned = (1i16..=7, reg()).prop_map(|(m, src)| {
        vec![Insn::Atomic {
            size: Size::DW,
            op: AtomicOp::FetchAdd,
            base: Reg::R10,
            off: -16 - m,
            src,
        }]
    });
    prop_oneof![via_r1, absolute, misaligned]
}

fn item_options(faulting: bool) -> ItemOptions {
    ItemOptions {
        alu: alu().boxed(),
        imm: imm().boxed(),
        accesses: vec![
            (6, stack_access().prop_map(|i| vec![i]).boxed()),
            (if faulting { 2 } else { 0 }, faulting_access().boxed()),
        ],
        // Unknown ids end a run, so they are rare enough for most programs to run to the end.
        helpers: vec![(10, MIX_ID), (5, IDENTITY_ID), (1, UNKNOWN_ID)],
        callx: CallxOptions {
            regs: 1..=9,
            ids: vec![(6, MIX_ID), (3, IDENTITY_ID), (1, UNKNOWN_ID)],
            set: Some(0.9),
        },
        call_sub: 2,
        call_sub_in_sub: 0,
    }
}

fn case(faulting: bool) -> impl Strategy<Value = Case> {
    progen::case(&CaseOptions {
        value: value().boxed(),
        mem_lens: vec![0, 1, 8, 64],
        items: item_options(faulting),
        sub_len: 0..12,
    })
}

/// Adds the stack slots `[r10-8]`, `[r10-16]` and `[r10-512]` into r0 after the main block.
const BUILD: BuildOptions = BuildOptions {
    stack_slots: &[1, 2, 64],
    fold_mul: FOLD_MUL,
};

fn build(case: &Case) -> Program {
    progen::build(case, &BUILD)
}

proptest! {
    #![proptest_config(progen::proptest_config("PROPTEST_CASES", 10_000))]

    /// Valid programs: same r0 (or error) and same memory under the interpreter and the JIT,
    /// checked and trusted.
    #[test]
    fn jit_matches_interpreter_on_random_programs(case in case(false)) {
        let _ = differential(&build(&case), &case.mem, true);
    }

    /// Programs that may access memory out of bounds or misaligned: the checked JIT reports the
    /// interpreter's error.
    #[test]
    fn checked_jit_matches_interpreter_on_faulting_programs(case in case(true)) {
        let _ = differential(&build(&case), &case.mem, false);
    }
}
