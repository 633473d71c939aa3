//! The x86-64 JIT against the interpreter: per-class unit tests, a differential property test on
//! random programs, error reporting, the image's layout and registration, and concurrent runs.
#![cfg(target_arch = "x86_64")]

use std::ops::Range;

use livebpf::asm::assemble_program;
use livebpf::exec::{Access, ExecError, MemRegion};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::{AluOp, AtomicOp, Endian, Insn, JmpCond, Program, Reg, Size, Source, Width};
use livebpf::jit::x86_64::{BODY_OFFSET, PATCH_SITE_LEN, PATCH_SITE_NOP, PATCH_SITE_OFFSET};
use livebpf::jit::{JitOptions, JitProgram};
use livebpf::text::{ImageKind, Registry};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

/// A deterministic helper that depends on all five arguments.
extern "C" fn mix(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ b.rotate_left(7)
        ^ c.wrapping_add(d.rotate_right(13))
        ^ e.wrapping_mul(3)
}

const MIX_ID: u32 = 1;
const IDENTITY_ID: u32 = 5;
const UNKNOWN_ID: u32 = 77;

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

fn asm(src: &str) -> Program {
    assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// Stack addresses differ between engines: an address in user space away from the input (where
/// only the stacks can be) is reduced to what must agree, its alignment (`addr % 8`). Input
/// addresses agree exactly because every engine runs on the same buffer, and the out-of-bounds
/// addresses the tests make up lie below 64 KiB or in the kernel half.
fn normalize(r: Result<u64, ExecError>, mem: &Range<u64>) -> Result<u64, ExecError> {
    let near_input = mem.start.saturating_sub(4096)..mem.end.saturating_add(4096);
    let stackish = |a: u64| (0x10000..0x8000_0000_0000).contains(&a) && !near_input.contains(&a);
    match r {
        Err(ExecError::MisalignedAtomic { pc, addr, size }) if stackish(addr) => {
            Err(ExecError::MisalignedAtomic {
                pc,
                addr: addr % 8,
                size,
            })
        }
        Err(ExecError::OutOfBounds {
            pc,
            addr,
            size,
            access,
        }) if stackish(addr) => Err(ExecError::OutOfBounds {
            pc,
            addr: addr % 8,
            size,
            access,
        }),
        other => other,
    }
}

/// Runs `program` on the interpreter and the JIT (checked, and trusted if `trusted_ok`) over the
/// same buffer, so input addresses in results and errors agree; compares results and the final
/// memory, and returns the interpreter's result.
fn differential(program: &Program, mem: &[u8], trusted_ok: bool) -> Result<u64, ExecError> {
    let h = helpers();
    // The input sits 16-aligned (aligned offsets are aligned addresses) in the middle of a
    // 64 KiB heap block, so no stack of either engine is within 4 KiB of it (see `normalize`).
    let mut backing = vec![0u8; 64 << 10];
    let at = (32 << 10) + backing.as_ptr().align_offset(16);
    let buf = &mut backing[at..at + mem.len()];
    buf.copy_from_slice(mem);
    let range = buf.as_ptr() as u64..buf.as_ptr() as u64 + buf.len() as u64;
    let want = Interpreter::new(program).with_helpers(h.clone()).run(buf);
    let want_mem = buf.to_vec();
    let mut modes = vec![("checked", JitOptions::checked())];
    if trusted_ok {
        modes.push(("trusted", trusted()));
    }
    for (mode, opts) in modes {
        buf.copy_from_slice(mem);
        let jit = JitProgram::compile(program, &h, opts).expect("compiles");
        let got = jit.run(buf);
        assert_eq!(
            normalize(got, &range),
            normalize(want.clone(), &range),
            "{mode} JIT vs interpreter\n{}",
            livebpf::asm::disassemble(program.insns())
        );
        assert_eq!(buf, want_mem, "{mode} JIT left different memory");
    }
    want
}

fn check(src: &str, mem: &[u8], expected: Result<u64, ExecError>) {
    let got = differential(&asm(src), mem, expected.is_ok());
    assert_eq!(got, expected, "{src}");
}

// ---------------------------------------------------------------- ALU

const EDGE_VALUES: [u64; 10] = [
    0,
    1,
    7,
    u64::MAX,
    i64::MIN as u64,
    i64::MAX as u64,
    0xffff_ffff,
    0x8000_0000,
    0xffff_ffff_8000_0000,
    0x1234_5678_9abc_def0,
];

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

/// r0 = a hash of r0–r9 (never r10: stack addresses differ between engines).
fn fold_registers() -> Vec<Insn> {
    let mut v = Vec::new();
    for n in 1..=9 {
        v.push(Insn::Alu {
            width: Width::W64,
            op: AluOp::Mul,
            dst: Reg::R0,
            src: Source::Imm(0x0100_0193),
        });
        v.push(Insn::Alu {
            width: Width::W64,
            op: AluOp::Xor,
            dst: Reg::R0,
            src: Source::Reg(Reg::new(n).unwrap()),
        });
    }
    v
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
        let interp = Interpreter::new(&program)
            .with_helpers(h.clone())
            .with_region(regions[0])
            .with_region(regions[1])
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

// ---------------------------------------------------------------- random programs

/// One generated piece of a program; jumps and calls get their offsets when the program is laid
/// out.
#[derive(Clone, Debug)]
enum Item {
    Plain(Vec<Insn>),
    /// A forward conditional jump over `skip` items (clamped to the end of the block).
    Jump {
        width: Width,
        cond: JmpCond,
        dst: Reg,
        src: Source,
        skip: usize,
    },
    Ja {
        skip: usize,
    },
    /// `call local` to the subprogram.
    CallSub,
}

#[derive(Clone, Debug)]
struct Case {
    init: [u64; 10],
    mem: Vec<u8>,
    main: Vec<Item>,
    sub: Vec<Item>,
}

fn reg() -> impl Strategy<Value = Reg> {
    (0u8..=9).prop_map(|n| Reg::new(n).unwrap())
}

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

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![reg().prop_map(Source::Reg), imm().prop_map(Source::Imm)]
}

fn width() -> impl Strategy<Value = Width> {
    prop_oneof![Just(Width::W32), Just(Width::W64)]
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![Just(Size::B), Just(Size::H), Just(Size::W), Just(Size::DW)]
}

fn alu() -> impl Strategy<Value = Insn> {
    let ops = prop_oneof![
        Just(AluOp::Add),
        Just(AluOp::Sub),
        Just(AluOp::Mul),
        Just(AluOp::Div),
        Just(AluOp::SDiv),
        Just(AluOp::Mod),
        Just(AluOp::SMod),
        Just(AluOp::Or),
        Just(AluOp::And),
        Just(AluOp::Xor),
        Just(AluOp::Lsh),
        Just(AluOp::Rsh),
        Just(AluOp::Arsh),
        Just(AluOp::Mov),
    ];
    let plain = (width(), ops, reg(), source()).prop_map(|(width, op, dst, src)| Insn::Alu {
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
    let neg = (width(), reg()).prop_map(|(width, dst)| Insn::Neg { width, dst });
    let endian = (
        prop_oneof![Just(Endian::Le), Just(Endian::Be), Just(Endian::Swap)],
        prop_oneof![Just(16u8), Just(32), Just(64)],
        reg(),
    )
        .prop_map(|(kind, bits, dst)| Insn::Endian { kind, bits, dst });
    let lddw = (reg(), value()).prop_map(|(dst, imm)| Insn::LoadImm64 { dst, imm });
    prop_oneof![6 => plain, 1 => movsx, 1 => neg, 1 => endian, 1 => lddw]
}

/// Accesses inside the current stack frame: always valid.
fn stack_access() -> impl Strategy<Value = Insn> {
    let store = (size(), 1i16..=512, source()).prop_map(|(size, k, src)| Insn::Store {
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
    let kind = 0u8..4;
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

/// A load, store (reg or imm), atomic or load-acquire at `[base + off]`.
fn access(kind: u8, size: Size, base: Reg, off: i16, r: Reg) -> Insn {
    match kind {
        0 => Insn::Load {
            size,
            signed: size != Size::DW && off % 2 == 0,
            dst: r,
            base,
            off,
        },
        1 => Insn::Store {
            size,
            base,
            off,
            src: if off % 2 == 0 {
                Source::Reg(r)
            } else {
                Source::Imm(-5)
            },
        },
        2 => Insn::Atomic {
            size: if size == Size::DW { Size::DW } else { Size::W },
            op: AtomicOp::ALL[off.unsigned_abs() as usize % AtomicOp::ALL.len()],
            base,
            off,
            src: r,
        },
        _ => Insn::LoadAcquire {
            size,
            dst: r,
            base,
            off,
        },
    }
}

fn item(with_sub_calls: bool, faulting: bool) -> BoxedStrategy<Item> {
    let jump = (
        width(),
        proptest::sample::select(JmpCond::ALL.to_vec()),
        reg(),
        source(),
        0usize..6,
    )
        .prop_map(|(width, cond, dst, src, skip)| Item::Jump {
            width,
            cond,
            dst,
            src,
            skip,
        });
    // Unknown ids end a run, so they are rare enough for most programs to run to the end.
    let helper = prop_oneof![
        10 => Just(MIX_ID),
        5 => Just(IDENTITY_ID),
        1 => Just(UNKNOWN_ID)
    ]
    .prop_map(|id| Item::Plain(vec![Insn::Call { id }]));
    let callx = (
        1u8..=9,
        prop_oneof![
            6 => Just(MIX_ID as i32),
            3 => Just(IDENTITY_ID as i32),
            1 => Just(UNKNOWN_ID as i32)
        ],
        proptest::bool::weighted(0.9),
    )
        .prop_map(|(r, id, set)| {
            let reg = Reg::new(r).unwrap();
            let mut v = Vec::new();
            if set {
                v.push(Insn::Alu {
                    width: Width::W64,
                    op: AluOp::Mov,
                    dst: reg,
                    src: Source::Imm(id),
                });
            }
            v.push(Insn::CallX { reg });
            Item::Plain(v)
        });
    let call_sub = if with_sub_calls { 2 } else { 0 };
    let faults = if faulting { 2 } else { 0 };
    prop_oneof![
        12 => alu().prop_map(|i| Item::Plain(vec![i])),
        6 => stack_access().prop_map(|i| Item::Plain(vec![i])),
        3 => jump,
        1 => (0usize..4).prop_map(|skip| Item::Ja { skip }),
        2 => helper,
        1 => callx,
        call_sub => Just(Item::CallSub),
        faults => faulting_access().prop_map(Item::Plain),
    ]
    .boxed()
}

fn case(faulting: bool) -> impl Strategy<Value = Case> {
    (
        proptest::array::uniform10(value()),
        prop_oneof![Just(0usize), Just(1), Just(8), Just(64)]
            .prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n)),
        proptest::collection::vec(item(true, faulting), 1..40),
        proptest::collection::vec(item(false, faulting), 0..12),
    )
        .prop_map(|(init, mem, main, sub)| Case {
            init,
            mem,
            main,
            sub,
        })
}

enum Fix {
    /// Jump to instruction index.
    To(usize),
    Sub,
}

/// Appends a block's instructions; returns fixups (instruction index, what it targets).
fn emit_block(items: &[Item], out: &mut Vec<Insn>, fixes: &mut Vec<(usize, Fix)>) {
    let mut starts = Vec::with_capacity(items.len() + 1);
    let mut local = Vec::new();
    for (i, item) in items.iter().enumerate() {
        starts.push(out.len());
        match item {
            Item::Plain(v) => out.extend_from_slice(v),
            Item::Jump {
                width,
                cond,
                dst,
                src,
                skip,
            } => {
                local.push((out.len(), i + 1 + skip));
                out.push(Insn::Jump {
                    width: *width,
                    cond: *cond,
                    dst: *dst,
                    src: *src,
                    off: 0,
                });
            }
            Item::Ja { skip } => {
                local.push((out.len(), i + 1 + skip));
                out.push(Insn::Ja { off: 0 });
            }
            Item::CallSub => {
                fixes.push((out.len(), Fix::Sub));
                out.push(Insn::CallLocal { off: 0 });
            }
        }
    }
    starts.push(out.len());
    for (at, target_item) in local {
        fixes.push((at, Fix::To(starts[target_item.min(items.len())])));
    }
}

fn build(case: &Case) -> Program {
    let mut insns = Vec::new();
    for (n, v) in case.init.iter().enumerate() {
        // r1 keeps the input's address (the same buffer in every engine).
        if n != 1 {
            insns.push(Insn::LoadImm64 {
                dst: Reg::new(n as u8).unwrap(),
                imm: *v,
            });
        }
    }
    let mut fixes = Vec::new();
    emit_block(&case.main, &mut insns, &mut fixes);
    for k in [1, 2, 64] {
        insns.push(Insn::Load {
            size: Size::DW,
            signed: false,
            dst: Reg::R9,
            base: Reg::R10,
            off: -8 * k,
        });
        insns.push(Insn::Alu {
            width: Width::W64,
            op: AluOp::Add,
            dst: Reg::R0,
            src: Source::Reg(Reg::R9),
        });
    }
    insns.extend(fold_registers());
    insns.push(Insn::Exit);
    let sub_start = insns.len();
    emit_block(&case.sub, &mut insns, &mut fixes);
    insns.push(Insn::Exit);
    let mut slot_of = Vec::with_capacity(insns.len());
    let mut slot = 0i64;
    for insn in &insns {
        slot_of.push(slot);
        slot += insn.slots() as i64;
    }
    for (at, fix) in fixes {
        let target = match fix {
            Fix::To(t) => t,
            Fix::Sub => sub_start,
        };
        let off = slot_of[target] - slot_of[at] - 1;
        insns[at] = match insns[at] {
            Insn::Jump {
                width,
                cond,
                dst,
                src,
                ..
            } => Insn::Jump {
                width,
                cond,
                dst,
                src,
                off: off as i16,
            },
            Insn::Ja { .. } => Insn::Ja { off: off as i16 },
            _ => Insn::CallLocal { off: off as i32 },
        };
    }
    Program::new(insns).expect("generated programs are valid")
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        // Failures print the minimal case; no regression files outside this test's sources.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

proptest! {
    #![proptest_config(proptest_config())]

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
