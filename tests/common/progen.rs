//! The differential harness and random program generator shared by the JIT tests: one program
//! of generated [`Item`]s (a main block, an exit, a subprogram) run on the interpreter and on the
//! JIT. What differs between backends (operand distributions, accesses, helpers) comes in
//! through [`ItemOptions`], [`CaseOptions`] and [`BuildOptions`].

use std::ops::{Range, RangeInclusive};

use livebpf::asm::assemble_program;
use livebpf::exec::ExecError;
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::{AluOp, AtomicOp, Endian, Insn, JmpCond, Program, Reg, Size, Source, Width};
use livebpf::jit::{JitOptions, JitProgram};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::Config as ProptestConfig;

// ---------------------------------------------------------------- helpers and harness

/// A deterministic helper that depends on all five arguments.
pub extern "C" fn mix(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ b.rotate_left(7)
        ^ c.wrapping_add(d.rotate_right(13))
        ^ e.wrapping_mul(3)
}

pub const MIX_ID: u32 = 1;
pub const IDENTITY_ID: u32 = 5;
pub const UNKNOWN_ID: u32 = 77;

pub const EDGE_VALUES: [u64; 10] = [
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

/// Every ALU operation (the sign-extending moves last).
pub const ALU_OPS: [AluOp; 17] = AluOp::ALL;

pub fn asm(src: &str) -> Program {
    assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// Stack addresses differ between engines: an address in user space away from the input (where
/// only the stacks can be) is reduced to what must agree, its alignment (`addr % 8`). Input
/// addresses agree exactly because every engine runs on the same buffer, and the out-of-bounds
/// addresses the tests make up lie below 64 KiB or in the kernel half.
pub fn normalize(r: Result<u64, ExecError>, mem: &Range<u64>) -> Result<u64, ExecError> {
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

/// Runs `program` on the interpreter and on the JIT in every one of `modes` over the same
/// buffer, so input addresses in results and errors agree; compares results and the final
/// memory, and returns the interpreter's result. Trusted modes run only when the interpreter
/// ran without an error on this very buffer: trusted code checks nothing, and whether a
/// program faults may depend on the buffer's address (a helper mixing r1 into its result).
pub fn differential(
    program: &Program,
    mem: &[u8],
    h: &Helpers,
    modes: &[(String, JitOptions)],
) -> Result<u64, ExecError> {
    // The input sits 16-aligned (aligned offsets are aligned addresses) in the middle of a
    // 64 KiB heap block, so no stack of either engine is within 4 KiB of it (see `normalize`).
    let mut backing = vec![0u8; (64 << 10) + mem.len()];
    let at = (32 << 10) + backing.as_ptr().align_offset(16);
    let buf = &mut backing[at..at + mem.len()];
    buf.copy_from_slice(mem);
    let range = buf.as_ptr() as u64..buf.as_ptr() as u64 + buf.len() as u64;
    let want = Interpreter::new(program).with_helpers(h.clone()).run(buf);
    let want_mem = buf.to_vec();
    for (mode, opts) in modes {
        if !opts.is_checked() && want.is_err() {
            continue;
        }
        buf.copy_from_slice(mem);
        let jit = JitProgram::compile(program, h, *opts).expect("compiles");
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

/// r0 = a hash of r0–r9 (never r10: stack addresses differ between engines), multiplying by
/// `mul` before each register is xored in, so that every register's final value matters.
pub fn fold_registers(mul: i32) -> Vec<Insn> {
    let mut v = Vec::new();
    for n in 1..=9 {
        v.push(Insn::Alu {
            width: Width::W64,
            op: AluOp::Mul,
            dst: Reg::R0,
            src: Source::Imm(mul),
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

/// The property tests' configuration: `default_cases` cases unless the environment variable
/// `cases_var` holds a number; failures print the minimal case, and no regression files are
/// written outside the tests' sources.
///
/// The random seed is `LIVEBPF_PROPTEST_SEED` when set, else drawn now; it is printed to stderr,
/// which the test harness shows when a test fails, so any failure can be replayed exactly.
pub fn proptest_config(cases_var: &str, default_cases: u32) -> ProptestConfig {
    let cases = std::env::var(cases_var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let seed = std::env::var("LIVEBPF_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        });
    eprintln!(
        "proptest: {cases} cases, seed {seed} (replay with LIVEBPF_PROPTEST_SEED={seed} {cases_var}={cases})"
    );
    ProptestConfig {
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..ProptestConfig::with_cases(cases)
    }
}

// ---------------------------------------------------------------- program model

/// One generated piece of a program; jumps and calls get their offsets when the program is laid
/// out.
#[derive(Clone, Debug)]
pub enum Item {
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
pub struct Case {
    /// Initial values of r0–r9 (r1's is unused: r1 keeps the input's address).
    pub init: [u64; 10],
    pub mem: Vec<u8>,
    pub main: Vec<Item>,
    pub sub: Vec<Item>,
}

/// How [`build`] closes the main block.
pub struct BuildOptions {
    /// The stack doublewords `[r10 - 8 * k]` added into r0 after the main block, so that the
    /// stack's contents matter too.
    pub stack_slots: &'static [i16],
    /// The multiplier of [`fold_registers`].
    pub fold_mul: i32,
}

enum Fix {
    /// Jump to instruction index.
    To(usize),
    Sub,
}

/// Appends a block's instructions; records fixups (instruction index, what it targets).
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

/// Lays out a case: r0 and r2–r9 set from `init`, the main block, the stack slots and registers
/// folded into r0, exit; then the subprogram and its exit.
pub fn build(case: &Case, opts: &BuildOptions) -> Program {
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
    for &k in opts.stack_slots {
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
    insns.extend(fold_registers(opts.fold_mul));
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

// ---------------------------------------------------------------- strategies

pub fn reg() -> impl Strategy<Value = Reg> {
    (0u8..=9).prop_map(|n| Reg::new(n).unwrap())
}

/// Any register but r1 (the input's address, kept so that input accesses stay meaningful).
pub fn data_reg() -> impl Strategy<Value = Reg> {
    prop_oneof![Just(0u8), 2u8..10].prop_map(|n| Reg::new(n).unwrap())
}

/// A register or an immediate drawn from `imm`.
pub fn source(imm: impl Strategy<Value = i32>) -> impl Strategy<Value = Source> {
    prop_oneof![reg().prop_map(Source::Reg), imm.prop_map(Source::Imm)]
}

pub fn width() -> impl Strategy<Value = Width> {
    prop_oneof![Just(Width::W32), Just(Width::W64)]
}

pub fn size() -> impl Strategy<Value = Size> {
    prop_oneof![Just(Size::B), Just(Size::H), Just(Size::W), Just(Size::DW)]
}

pub fn neg(dst: impl Strategy<Value = Reg>) -> impl Strategy<Value = Insn> {
    (width(), dst).prop_map(|(width, dst)| Insn::Neg { width, dst })
}

/// Every byte swap of every width.
pub fn endian(dst: impl Strategy<Value = Reg>) -> impl Strategy<Value = Insn> {
    (
        prop_oneof![Just(Endian::Le), Just(Endian::Be), Just(Endian::Swap)],
        prop_oneof![Just(16u8), Just(32), Just(64)],
        dst,
    )
        .prop_map(|(kind, bits, dst)| Insn::Endian { kind, bits, dst })
}

pub fn lddw(
    dst: impl Strategy<Value = Reg>,
    value: impl Strategy<Value = u64>,
) -> impl Strategy<Value = Insn> {
    (dst, value).prop_map(|(dst, imm)| Insn::LoadImm64 { dst, imm })
}

/// Kinds of [`access`].
pub const LOAD: u8 = 0;
pub const STORE: u8 = 1;
pub const ATOMIC: u8 = 2;
pub const STORE_RELEASE: u8 = 3;
pub const LOAD_ACQUIRE: u8 = 4;

/// A load, store (reg or imm), atomic, store-release or load-acquire (any other `kind`) at
/// `[base + off]`.
pub fn access(kind: u8, size: Size, base: Reg, off: i16, r: Reg) -> Insn {
    match kind {
        LOAD => Insn::Load {
            size,
            signed: size != Size::DW && off % 2 == 0,
            dst: r,
            base,
            off,
        },
        STORE => Insn::Store {
            size,
            base,
            off,
            src: if off % 2 == 0 {
                Source::Reg(r)
            } else {
                Source::Imm(-5)
            },
        },
        ATOMIC => Insn::Atomic {
            size: if size == Size::DW { Size::DW } else { Size::W },
            op: AtomicOp::ALL[off.unsigned_abs() as usize % AtomicOp::ALL.len()],
            base,
            off,
            src: r,
        },
        STORE_RELEASE => Insn::StoreRelease {
            size,
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

/// A weighted choice between boxed strategies, in order (shrinking prefers earlier ones); arms
/// of weight 0 are left out.
fn weighted<T: std::fmt::Debug + 'static>(arms: Vec<(u32, BoxedStrategy<T>)>) -> BoxedStrategy<T> {
    Union::new_weighted(arms.into_iter().filter(|&(w, _)| w > 0).collect()).boxed()
}

/// `callx` items: `mov reg, id` (always, or with probability `set`) then `callx reg`.
#[derive(Clone)]
pub struct CallxOptions {
    pub regs: RangeInclusive<u8>,
    /// Helper ids with their weights.
    pub ids: Vec<(u32, u32)>,
    /// `None`: `reg` is always set to the id; `Some(p)`: with probability `p`, else the call
    /// goes to whatever `reg` holds.
    pub set: Option<f64>,
}

/// What a generated block is made of, besides jumps.
#[derive(Clone)]
pub struct ItemOptions {
    /// A single ALU instruction (weight 12).
    pub alu: BoxedStrategy<Insn>,
    /// Immediate operands of conditional jumps.
    pub imm: BoxedStrategy<i32>,
    /// Memory accesses with their weights, after the ALU in the choice.
    pub accesses: Vec<(u32, BoxedStrategy<Vec<Insn>>)>,
    /// `call id` helper ids with their weights (unknown ids end a run, so keep them rare).
    pub helpers: Vec<(u32, u32)>,
    pub callx: CallxOptions,
    /// Weight of `call local` to the subprogram in the main block.
    pub call_sub: u32,
    /// Weight of `call local` in the subprogram itself (recursion ends at the depth limit at
    /// the latest).
    pub call_sub_in_sub: u32,
}

fn callx(opts: &CallxOptions) -> BoxedStrategy<Item> {
    let set = match opts.set {
        Some(p) => proptest::bool::weighted(p).boxed(),
        None => Just(true).boxed(),
    };
    let ids = weighted(
        opts.ids
            .iter()
            .map(|&(w, id)| (w, Just(id as i32).boxed()))
            .collect(),
    );
    (opts.regs.clone(), ids, set)
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
        })
        .boxed()
}

/// One item of the main block (`in_sub` false) or of the subprogram.
pub fn item(opts: &ItemOptions, in_sub: bool) -> BoxedStrategy<Item> {
    let jump = (
        width(),
        proptest::sample::select(JmpCond::ALL.to_vec()),
        reg(),
        source(opts.imm.clone()),
        0usize..6,
    )
        .prop_map(|(width, cond, dst, src, skip)| Item::Jump {
            width,
            cond,
            dst,
            src,
            skip,
        });
    let helper = weighted(
        opts.helpers
            .iter()
            .map(|&(w, id)| (w, Just(id).boxed()))
            .collect(),
    )
    .prop_map(|id| Item::Plain(vec![Insn::Call { id }]));
    let call_sub = if in_sub {
        opts.call_sub_in_sub
    } else {
        opts.call_sub
    };
    let mut arms = vec![(
        12,
        opts.alu.clone().prop_map(|i| Item::Plain(vec![i])).boxed(),
    )];
    arms.extend(
        opts.accesses
            .iter()
            .map(|(w, s)| (*w, s.clone().prop_map(Item::Plain).boxed())),
    );
    arms.extend([
        (3, jump.boxed()),
        (1, (0usize..4).prop_map(|skip| Item::Ja { skip }).boxed()),
        (2, helper.boxed()),
        (1, callx(&opts.callx)),
        (call_sub, Just(Item::CallSub).boxed()),
    ]);
    weighted(arms)
}

/// What a generated case is made of.
pub struct CaseOptions {
    /// Initial register values.
    pub value: BoxedStrategy<u64>,
    /// Input lengths, equally likely.
    pub mem_lens: Vec<usize>,
    pub items: ItemOptions,
    /// Lengths of the subprogram (the main block has 1 to 39 items).
    pub sub_len: Range<usize>,
}

pub fn case(opts: &CaseOptions) -> impl Strategy<Value = Case> + use<> {
    (
        proptest::array::uniform10(opts.value.clone()),
        proptest::sample::select(opts.mem_lens.clone())
            .prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n)),
        proptest::collection::vec(item(&opts.items, false), 1..40),
        proptest::collection::vec(item(&opts.items, true), opts.sub_len.clone()),
    )
        .prop_map(|(init, mem, main, sub)| Case {
            init,
            mem,
            main,
            sub,
        })
}
