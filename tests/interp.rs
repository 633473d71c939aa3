//! The interpreter, one instruction class at a time, plus its error paths.

use livebpf::asm::assemble_program;
use livebpf::exec::{Access, ExecError, MemRegion};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;

fn run_mem(src: &str, mem: &mut [u8]) -> Result<u64, ExecError> {
    let program = assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    Interpreter::new(&program)
        .with_helpers(Helpers::conformance())
        .run(mem)
}

fn run(src: &str) -> u64 {
    run_mem(src, &mut []).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

#[test]
fn alu64() {
    assert_eq!(run("mov %r0, -1\nadd %r0, 3\nexit"), 2);
    assert_eq!(run("mov %r0, 5\nsub %r0, 7\nexit"), (-2i64) as u64);
    assert_eq!(run("lddw %r0, 0x100000000\nmul %r0, 3\nexit"), 0x300000000);
    assert_eq!(run("mov %r0, 7\nmov %r1, 2\ndiv %r0, %r1\nexit"), 3);
    assert_eq!(run("mov %r0, 7\nmod %r0, 4\nexit"), 3);
    assert_eq!(
        run("mov %r0, 0xf0\nor %r0, 0xf\nand %r0, 0x3c\nxor %r0, 1\nexit"),
        0x3d
    );
    assert_eq!(run("mov %r0, 1\nlsh %r0, 63\nrsh %r0, 62\nexit"), 2);
    assert_eq!(run("mov %r0, -16\narsh %r0, 2\nexit"), (-4i64) as u64);
    assert_eq!(run("mov %r0, -7\nsdiv %r0, 2\nexit"), (-3i64) as u64);
    assert_eq!(run("mov %r0, -7\nsmod %r0, 2\nexit"), (-1i64) as u64);
    assert_eq!(run("mov %r0, 3\nneg %r0\nexit"), (-3i64) as u64);
    // Shift amounts are masked to 6 bits.
    assert_eq!(run("mov %r0, 1\nmov %r1, 65\nlsh %r0, %r1\nexit"), 2);
    // Immediates are sign-extended to 64 bits.
    assert_eq!(run("mov %r0, 0\nor %r0, -1\nexit"), u64::MAX);
}

#[test]
fn alu32_zero_extends() {
    assert_eq!(run("mov %r0, -1\nadd32 %r0, 1\nexit"), 0);
    assert_eq!(run("mov %r0, -1\nmov32 %r0, %r0\nexit"), 0xffff_ffff);
    assert_eq!(run("mov32 %r0, -8\narsh32 %r0, 1\nexit"), 0xffff_fffc);
    assert_eq!(run("mov32 %r0, 1\nlsh32 %r0, 33\nexit"), 2);
    assert_eq!(run("mov32 %r0, 5\nneg32 %r0\nexit"), 0xffff_fffb);
    assert_eq!(run("mov %r1, 0x1ff\nmovsx832 %r0, %r1\nexit"), 0xffff_ffff);
    assert_eq!(
        run("mov %r1, 0x8000\nmovsx1664 %r0, %r1\nexit"),
        0xffff_ffff_ffff_8000
    );
    assert_eq!(run("mov32 %r1, -1\nmovsx3264 %r0, %r1\nexit"), u64::MAX);
}

#[test]
fn division_edge_cases() {
    // RFC 9669: x / 0 = 0, x % 0 = x, signed overflow wraps.
    assert_eq!(run("mov %r0, 9\nmov %r1, 0\ndiv %r0, %r1\nexit"), 0);
    assert_eq!(run("mov %r0, 9\nmov %r1, 0\nmod %r0, %r1\nexit"), 9);
    assert_eq!(
        run("mov %r0, -1\nmov %r1, 0\nmod32 %r0, %r1\nexit"),
        0xffff_ffff
    );
    assert_eq!(run("mov %r0, 9\nsdiv %r0, 0\nexit"), 0);
    assert_eq!(run("mov %r0, -9\nsmod %r0, 0\nexit"), (-9i64) as u64);
    assert_eq!(
        run("lddw %r0, 0x8000000000000000\nsdiv %r0, -1\nexit"),
        1 << 63
    );
    assert_eq!(run("lddw %r0, 0x8000000000000000\nsmod %r0, -1\nexit"), 0);
    assert_eq!(
        run("mov32 %r0, 0x80000000\nsdiv32 %r0, -1\nexit"),
        0x8000_0000
    );
}

#[test]
fn byte_order() {
    let v = "lddw %r0, 0x1122334455667788\n";
    assert_eq!(run(&format!("{v}le16 %r0\nexit")), 0x7788);
    assert_eq!(run(&format!("{v}le32 %r0\nexit")), 0x55667788);
    assert_eq!(run(&format!("{v}le64 %r0\nexit")), 0x1122334455667788);
    assert_eq!(run(&format!("{v}be16 %r0\nexit")), 0x8877);
    assert_eq!(run(&format!("{v}be32 %r0\nexit")), 0x88776655);
    assert_eq!(run(&format!("{v}be64 %r0\nexit")), 0x8877665544332211);
    assert_eq!(run(&format!("{v}bswap16 %r0\nexit")), 0x8877);
}

#[test]
fn loads_and_stores() {
    let mut mem = [0x80, 0x01, 0x02, 0x83, 0, 0, 0, 0];
    assert_eq!(run_mem("ldxb %r0, [%r1]\nexit", &mut mem), Ok(0x80));
    assert_eq!(
        run_mem("ldxsb %r0, [%r1]\nexit", &mut mem),
        Ok(0xffff_ffff_ffff_ff80)
    );
    assert_eq!(run_mem("ldxh %r0, [%r1+2]\nexit", &mut mem), Ok(0x8302));
    assert_eq!(
        run_mem("ldxsh %r0, [%r1+2]\nexit", &mut mem),
        Ok(0xffff_ffff_ffff_8302)
    );
    assert_eq!(
        run_mem("ldxsw %r0, [%r1]\nexit", &mut mem),
        Ok(0xffff_ffff_8302_0180)
    );
    // Unaligned access is allowed.
    assert_eq!(run_mem("ldxh %r0, [%r1+1]\nexit", &mut mem), Ok(0x0201));
    assert_eq!(
        run_mem("stw [%r1+4], -2\nldxdw %r0, [%r1]\nexit", &mut mem),
        Ok(0xffff_fffe_8302_0180)
    );
    assert_eq!(mem[4..], [0xfe, 0xff, 0xff, 0xff]);
    assert_eq!(
        run("mov %r1, 0x1234\nstxh [%r10-2], %r1\nstb [%r10-3], 7\nldxdw %r0, [%r10-8]\nexit"),
        0x1234_0700_0000_0000
    );
}

#[test]
fn atomics() {
    let prologue = "stdw [%r10-8], 10\nmov %r1, 3\n";
    let cases = [
        ("lock add [%r10-8], %r1\nldxdw %r0, [%r10-8]", 13),
        ("lock fetch add [%r10-8], %r1\nmov %r0, %r1", 10),
        ("lock or [%r10-8], %r1\nldxdw %r0, [%r10-8]", 11),
        ("lock fetch and [%r10-8], %r1\nldxdw %r0, [%r10-8]", 2),
        ("lock fetch xor [%r10-8], %r1\nmov %r0, %r1", 10),
        (
            "lock xchg [%r10-8], %r1\nldxdw %r0, [%r10-8]\nadd %r0, %r1",
            13,
        ),
        (
            "mov %r0, 10\nlock cmpxchg [%r10-8], %r1\nldxdw %r1, [%r10-8]\nadd %r0, %r1",
            13,
        ),
        (
            "mov %r0, 9\nlock cmpxchg [%r10-8], %r1\nldxdw %r1, [%r10-8]\nadd %r0, %r1",
            20,
        ),
        ("lock add32 [%r10-8], %r1\nldxdw %r0, [%r10-8]", 13),
        (
            "mov %r0, 10\nlock cmpxchg32 [%r10-8], %r1\nldxw %r0, [%r10-8]",
            3,
        ),
        ("ldacqdw %r0, [%r10-8]", 10),
        ("strelw [%r10-8], %r1\nldxdw %r0, [%r10-8]", 3),
    ];
    for (body, want) in cases {
        assert_eq!(run(&format!("{prologue}{body}\nexit")), want, "{body}");
    }
}

#[test]
fn jumps() {
    let taken = |cond: &str| run(&format!("mov %r0, 0\n{cond}, +1\nexit\nmov %r0, 1\nexit"));
    assert_eq!(taken("mov %r1, -1\njgt %r1, 5"), 1);
    assert_eq!(taken("mov %r1, -1\njsgt %r1, 5"), 0);
    assert_eq!(taken("mov %r1, -1\njslt %r1, 0"), 1);
    assert_eq!(taken("mov %r1, 6\njset %r1, 2"), 1);
    assert_eq!(taken("mov %r1, 6\njset %r1, 1"), 0);
    assert_eq!(taken("mov %r1, 5\nmov %r2, 5\njle %r1, %r2"), 1);
    // JMP32 compares only the low halves.
    assert_eq!(taken("lddw %r1, 0x100000005\njeq32 %r1, 5"), 1);
    assert_eq!(taken("lddw %r1, 0x100000005\njeq %r1, 5"), 0);
    assert_eq!(taken("mov32 %r1, -1\njslt32 %r1, 0"), 1);
    assert_eq!(taken("mov32 %r1, -1\njslt %r1, 0"), 0);
    assert_eq!(run("mov %r0, 1\nja32 +1\nmov %r0, 2\nexit"), 1);
    assert_eq!(
        run("mov %r0, 0\nloop:\nadd %r0, 1\njlt %r0, 10, loop\nexit"),
        10
    );
}

extern "C" fn add_all(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
    a + b + c + d + e
}

#[test]
fn calls() {
    let program = assemble_program(
        "mov %r1, 1\nmov %r2, 2\nmov %r3, 3\nmov %r4, 4\nmov %r5, 5\ncall 9\nexit",
    )
    .unwrap();
    let mut helpers = Helpers::new();
    helpers.register(9, add_all);
    let interp = Interpreter::new(&program).with_helpers(helpers);
    assert_eq!(interp.run(&mut []), Ok(15));
    // callx takes the helper id from a register.
    assert_eq!(run("mov %r1, 42\nmov %r3, 5\ncall %r3\nexit"), 42);
    // BPF-to-BPF: fresh frame, r6-r9 preserved.
    let src = "mov %r6, 7\nstdw [%r10-8], 1\ncall local f\nldxdw %r1, [%r10-8]\nadd %r0, %r1\nadd %r0, %r6\nexit\n\
               f:\nmov %r6, 100\nstdw [%r10-8], 50\nldxdw %r0, [%r10-8]\nexit";
    assert_eq!(run(src), 58);
}

#[test]
fn runtime_errors_are_typed() {
    let err = |src: &str| run_mem(src, &mut [0u8; 4]).unwrap_err();
    assert!(matches!(
        err("ldxw %r0, [%r1+2]\nexit"),
        ExecError::OutOfBounds {
            pc: 0,
            size: 4,
            access: Access::Load,
            ..
        }
    ));
    assert!(matches!(
        err("mov %r0, 0\nstb [%r10+0], 1\nexit"),
        ExecError::OutOfBounds {
            pc: 1,
            access: Access::Store,
            ..
        }
    ));
    assert!(matches!(
        err("mov %r1, 0\nldxdw %r0, [%r1]\nexit"),
        ExecError::OutOfBounds { addr: 0, .. }
    ));
    assert!(matches!(
        err("lock add [%r10-15], %r1\nexit"),
        ExecError::MisalignedAtomic { .. }
    ));
    assert!(matches!(
        err("call 77\nexit"),
        ExecError::UnknownHelper { id: 77, pc: 0 }
    ));
    assert!(matches!(
        err("mov %r1, -1\ncall %r1\nexit"),
        ExecError::UnknownHelper { pc: 1, .. }
    ));
    assert!(matches!(
        err("f:\ncall local f\nexit"),
        ExecError::CallDepthExceeded { .. }
    ));
    // Address arithmetic that wraps around must not pass the bounds check.
    assert!(matches!(
        err("lddw %r2, 0xffffffffffffffff\nadd %r1, %r2\nldxw %r0, [%r1+2]\nexit"),
        ExecError::OutOfBounds { .. }
    ));
}

#[test]
fn read_only_regions_and_budget() {
    let data = [5u64; 1];
    let program = assemble_program("ldxdw %r0, [%r1]\nstdw [%r1], 0\nexit").unwrap();
    let region = MemRegion::new(data.as_ptr() as u64, 8, false);
    let mut mem = [0u8; 0];
    // SAFETY: `data` is a live local array for every run below, read-only as declared.
    let interp = unsafe { Interpreter::new(&program).with_region(region) };
    // r1 is 0 for empty input memory, so point it at the region with a trampoline program instead.
    assert!(interp.run(&mut mem).is_err());
    let src = format!(
        "lddw %r1, {:#x}\nldxdw %r0, [%r1]\nstdw [%r1], 0\nexit",
        data.as_ptr() as u64
    );
    let program = assemble_program(&src).unwrap();
    // SAFETY: `data` is a live local array for every run below, read-only as declared.
    let interp = unsafe { Interpreter::new(&program).with_region(region) };
    assert!(matches!(
        interp.run(&mut mem),
        Err(ExecError::OutOfBounds {
            access: Access::Store,
            pc: 3,
            ..
        })
    ));
    let program = assemble_program("loop:\nja loop").unwrap();
    let interp = Interpreter::new(&program).with_budget(Some(1000));
    assert_eq!(
        interp.run(&mut mem),
        Err(ExecError::BudgetExhausted {
            pc: 0,
            budget: 1000
        })
    );
}
