//! Assembler against the conformance suite, and assembler/disassembler round trips.

use std::collections::HashMap;
use std::path::Path;

use livebpf::asm::{assemble, assemble_program, disassemble};
use livebpf::isa::{
    self, AluOp, AtomicOp, Endian, Insn, JmpCond, RawInsn, Reg, Size, Source, Width,
};
use proptest::prelude::*;

const CONFORMANCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/conformance");

/// Splits a `.data` file into its `-- NAME` sections.
fn sections(text: &str) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("-- ") {
            let name = name.trim().to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(name) = &current {
            let body = out.entry(name.clone()).or_default();
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

fn raw_words(section: &str) -> Vec<u64> {
    section
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let hex = l.trim_start_matches("0x").trim_start_matches("0X");
            u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("raw word {l:?}: {e}"))
        })
        .collect()
}

#[test]
fn conformance_programs_assemble() {
    let dir = Path::new(CONFORMANCE);
    if !dir.is_dir() {
        eprintln!("note: {CONFORMANCE} not found; skipping the conformance assembly test");
        return;
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read conformance dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    files.sort();
    let (mut programs, mut with_raw, mut failures) = (0, 0, Vec::new());
    for path in &files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let text = std::fs::read_to_string(path).expect("read .data file");
        let secs = sections(&text);
        let Some(asm) = secs.get("asm") else { continue };
        programs += 1;
        let insns = match assemble(asm) {
            Ok(insns) => insns,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if let Err(e) = assemble_program(asm) {
            failures.push(format!("{name}: program invalid: {e}"));
        }
        let again = assemble(&disassemble(&insns));
        if again.as_ref() != Ok(&insns) {
            failures.push(format!(
                "{name}: disassembly does not round-trip: {again:?}"
            ));
        }
        if let Some(raw) = secs.get("raw") {
            with_raw += 1;
            let words: Vec<u64> = isa::raw_slots(&isa::encode_program(&insns))
                .expect("whole slots")
                .into_iter()
                .map(RawInsn::to_u64)
                .collect();
            let expected = raw_words(raw);
            if words != expected {
                failures.push(format!(
                    "{name}: assembled {words:#018x?}, raw section {expected:#018x?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(programs > 0, "no programs found in {CONFORMANCE}");
    eprintln!("assembled {programs} conformance programs ({with_raw} checked against raw words)");
}

// ---------------------------------------------------------------------------------------------
// Generators of instructions that isa::decode_one accepts.

fn any_reg() -> impl Strategy<Value = Reg> {
    (0u8..=10).prop_map(|n| Reg::new(n).expect("0..=10"))
}

/// Registers an instruction may write: not the frame pointer.
fn dst_reg() -> impl Strategy<Value = Reg> {
    (0u8..=9).prop_map(|n| Reg::new(n).expect("0..=9"))
}

fn width() -> impl Strategy<Value = Width> {
    prop_oneof![Just(Width::W32), Just(Width::W64)]
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![Just(Size::B), Just(Size::H), Just(Size::W), Just(Size::DW)]
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        any_reg().prop_map(Source::Reg),
        any::<i32>().prop_map(Source::Imm),
    ]
}

fn alu() -> impl Strategy<Value = Insn> {
    let plain = prop_oneof![
        Just(AluOp::Add),
        Just(AluOp::Sub),
        Just(AluOp::Mul),
        Just(AluOp::Div),
        Just(AluOp::SDiv),
        Just(AluOp::Or),
        Just(AluOp::And),
        Just(AluOp::Lsh),
        Just(AluOp::Rsh),
        Just(AluOp::Mod),
        Just(AluOp::SMod),
        Just(AluOp::Xor),
        Just(AluOp::Mov),
        Just(AluOp::Arsh),
    ];
    let plain = (width(), plain, dst_reg(), source()).prop_map(|(width, op, dst, src)| Insn::Alu {
        width,
        op,
        dst,
        src,
    });
    // Sign-extending moves take a register; from 32 bits only in 64-bit form.
    let movsx = (
        prop_oneof![
            Just((Width::W32, AluOp::MovSx8)),
            Just((Width::W32, AluOp::MovSx16)),
            Just((Width::W64, AluOp::MovSx8)),
            Just((Width::W64, AluOp::MovSx16)),
            Just((Width::W64, AluOp::MovSx32)),
        ],
        dst_reg(),
        any_reg(),
    )
        .prop_map(|((width, op), dst, src)| Insn::Alu {
            width,
            op,
            dst,
            src: Source::Reg(src),
        });
    prop_oneof![4 => plain, 1 => movsx]
}

fn memory() -> impl Strategy<Value = Insn> {
    prop_oneof![
        (size(), any::<bool>(), dst_reg(), any_reg(), any::<i16>()).prop_map(
            |(size, signed, dst, base, off)| Insn::Load {
                size,
                // No sign-extending 64-bit load exists.
                signed: signed && size != Size::DW,
                dst,
                base,
                off,
            }
        ),
        (size(), any_reg(), any::<i16>(), source()).prop_map(|(size, base, off, src)| {
            Insn::Store {
                size,
                base,
                off,
                src,
            }
        }),
        (
            prop_oneof![Just(Size::W), Just(Size::DW)],
            prop::sample::select(AtomicOp::ALL.to_vec()),
            any_reg(),
            any::<i16>(),
            any_reg(),
        )
            .prop_map(|(size, op, base, off, src)| {
                // Fetching forms and xchg write their source register.
                let writes_src = !matches!(
                    op,
                    AtomicOp::Add
                        | AtomicOp::Or
                        | AtomicOp::And
                        | AtomicOp::Xor
                        | AtomicOp::CmpXchg
                );
                let src = if writes_src && src == Reg::R10 {
                    Reg::R1
                } else {
                    src
                };
                Insn::Atomic {
                    size,
                    op,
                    base,
                    off,
                    src,
                }
            }),
        (size(), dst_reg(), any_reg(), any::<i16>()).prop_map(|(size, dst, base, off)| {
            Insn::LoadAcquire {
                size,
                dst,
                base,
                off,
            }
        }),
        (size(), any_reg(), any::<i16>(), any_reg()).prop_map(|(size, base, off, src)| {
            Insn::StoreRelease {
                size,
                base,
                off,
                src,
            }
        }),
    ]
}

fn control() -> impl Strategy<Value = Insn> {
    prop_oneof![
        any::<i16>().prop_map(|off| Insn::Ja { off }),
        any::<i32>().prop_map(|off| Insn::Ja32 { off }),
        (
            width(),
            prop::sample::select(JmpCond::ALL.to_vec()),
            any_reg(),
            source(),
            any::<i16>(),
        )
            .prop_map(|(width, cond, dst, src, off)| Insn::Jump {
                width,
                cond,
                dst,
                src,
                off,
            }),
        any::<u32>().prop_map(|id| Insn::Call { id }),
        any::<i32>().prop_map(|off| Insn::CallLocal { off }),
        any_reg().prop_map(|reg| Insn::CallX { reg }),
        Just(Insn::Exit),
    ]
}

fn insn() -> impl Strategy<Value = Insn> {
    prop_oneof![
        3 => alu(),
        1 => (width(), dst_reg()).prop_map(|(width, dst)| Insn::Neg { width, dst }),
        1 => (
            prop_oneof![Just(Endian::Le), Just(Endian::Be), Just(Endian::Swap)],
            prop_oneof![Just(16u8), Just(32), Just(64)],
            dst_reg(),
        )
            .prop_map(|(kind, bits, dst)| Insn::Endian { kind, bits, dst }),
        1 => (dst_reg(), any::<u64>()).prop_map(|(dst, imm)| Insn::LoadImm64 { dst, imm }),
        3 => memory(),
        3 => control(),
    ]
}

/// Text built from pieces of the dialect, so the fuzzer reaches deep into the parser.
fn dialect_noise() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "mov",
            "add32",
            "lddw",
            "ldxw",
            "ldxsb",
            "stw",
            "stxdw",
            "lock",
            "fetch",
            "xchg",
            "cmpxchg32",
            "jeq",
            "jsgt32",
            "ja",
            "ja32",
            "call",
            "local",
            "helper",
            "exit",
            "movsx832",
            "be16",
            "swap64",
            "neg",
            "ldacqdw",
            "strelb",
            "%r0",
            "%r1",
            "r10",
            "%r11",
            "%",
            "%r",
            "[",
            "]",
            "+",
            "-",
            ",",
            ":",
            "#",
            "\n",
            " ",
            "0x",
            "0xffffffff",
            "-2147483648",
            "4294967296",
            "99999999999999999999999999999999999999999",
            "L1",
            "L1:",
            "exit:",
            "é",
            "\t",
            "\r\n",
        ])
        .prop_map(str::to_string),
        "[a-z0-9%+\\-\\[\\],:# ]{1,6}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn disassembly_round_trips(prog in prop::collection::vec(insn(), 1..24)) {
        let text = disassemble(&prog);
        prop_assert_eq!(assemble(&text), Ok(prog.clone()), "text:\n{}", text);
        // Every generated instruction is valid in the ISA, so the wire form decodes back too.
        let slots = isa::raw_slots(&isa::encode_program(&prog)).expect("whole slots");
        let mut pc = 0;
        for insn in &prog {
            prop_assert_eq!(isa::decode_one(&slots[pc..]), Ok(*insn));
            pc += insn.slots();
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = assemble(&text);
        let _ = assemble_program(&text);
    }

    #[test]
    fn dialect_noise_never_panics(text in dialect_noise()) {
        if let Err(e) = assemble(&text) {
            // Error lines point into the source.
            prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1), "{}", e);
        }
        let _ = assemble_program(&text);
    }
}
