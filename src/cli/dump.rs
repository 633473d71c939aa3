//! `livebpf dump`: a program's eBPF instructions, or the JIT's machine code disassembled with
//! capstone and the places `attach` rewrites marked.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use capstone::prelude::*;
use clap::ValueEnum;

use super::{CliError, jit_error, stdout_err};
use crate::helpers::Helpers;
use crate::isa::Program;
use crate::jit::{self, JitOptions};

/// Architectures whose machine code `dump --jited` can show.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    #[value(name = "x86_64", alias = "x86-64")]
    X86_64,
    #[value(name = "arm64", alias = "aarch64")]
    Arm64,
}

impl Arch {
    /// This host's architecture, if livebpf has a code generator for it.
    pub fn host() -> Option<Arch> {
        jit::Arch::host().map(|a| match a {
            jit::Arch::X86_64 => Arch::X86_64,
            jit::Arch::Arm64 => Arch::Arm64,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// `dump` without `--jited`: one eBPF instruction per line after its slot number.
pub fn ebpf(program: &Program, out: &mut dyn Write) -> Result<(), CliError> {
    for i in 0..program.insns().len() {
        writeln!(out, "{}", ebpf_line(program, i)).map_err(stdout_err)?;
    }
    Ok(())
}

/// Instruction `i` after its slot number; jumps and local calls also name their target slot.
fn ebpf_line(program: &Program, i: usize) -> String {
    let text = crate::asm::disassemble_insn(&program.insns()[i]);
    let slot = program.slot_of(i);
    match program.target_of(i) {
        Some(t) => format!("{slot:4}: {text:<32} ; -> {}", program.slot_of(t)),
        None => format!("{slot:4}: {text}"),
    }
}

/// Generated code and what to point out in it.
struct Image {
    arch: Arch,
    code: Vec<u8>,
    /// Comments for the instructions that start at these offsets.
    marks: Vec<(usize, String)>,
    /// 8-byte literals inside the code, printed as `.quad`.
    data: Vec<Range<usize>>,
    /// Where the code of each eBPF instruction starts, by instruction index, when known.
    insn_offsets: Option<Vec<usize>>,
}

/// `dump --jited`: generate the checked-mode image for `arch` (on any host, as
/// `JitProgram::compile` would on that architecture) and disassemble it.
pub fn jited(
    program: &Program,
    helpers: &Helpers,
    arch: Arch,
    what: &Path,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let target = match arch {
        Arch::X86_64 => jit::Arch::X86_64,
        Arch::Arm64 => jit::Arch::Arm64,
    };
    let code = jit::generate(program, helpers, target, JitOptions::checked())
        .map_err(|e| jit_error(what, e))?;
    let mut marks = vec![(
        code.patch_site,
        match arch {
            Arch::X86_64 => "<- patch site (nop, poked to call/jmp by attach)",
            Arch::Arm64 => "<- patch site (nop, poked to bl/b by attach)",
        }
        .to_string(),
    )];
    let mut data = Vec::new();
    if let Some((plt, literal)) = code.plt {
        marks.push((
            plt,
            "<- PLT: the patch site branches here when its target is too far for bl/b".to_string(),
        ));
        marks.push((
            literal,
            "<- PLT target (the dummy trampoline until a far attach)".to_string(),
        ));
        // Shown as data only when it lies inside the code (it always should).
        if literal + 8 <= code.bytes.len() {
            data.push(literal..literal + 8);
        }
    }
    let image = Image {
        arch,
        code: code.bytes,
        marks,
        data,
        insn_offsets: code.insn_offsets,
    };
    write_image(&image, program, out)
}

fn disassembler(target: Arch) -> Result<Capstone, CliError> {
    let built = match target {
        Arch::X86_64 => Capstone::new()
            .x86()
            .mode(arch::x86::ArchMode::Mode64)
            .syntax(arch::x86::ArchSyntax::Intel)
            .build(),
        Arch::Arm64 => Capstone::new()
            .arm64()
            .mode(arch::arm64::ArchMode::Arm)
            .build(),
    };
    built.map_err(|e| CliError::Disasm(e.to_string()))
}

/// Hex bytes, space separated.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Prints `image` one instruction per line: offset, bytes, instruction, marks. Offsets are
/// relative to the image start, and so are the branch targets capstone prints.
fn write_image(image: &Image, program: &Program, out: &mut dyn Write) -> Result<(), CliError> {
    let cs = disassembler(image.arch)?;
    // arm64 words are fixed-size; x86 instructions are at most 15 bytes.
    let max_len = match image.arch {
        Arch::X86_64 => 15,
        Arch::Arm64 => 4,
    };
    // eBPF instruction index by the offset its code starts at.
    let mut starts: Vec<(usize, usize)> = image
        .insn_offsets
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, &off)| (off, i))
        .collect();
    starts.sort_unstable();
    let mut next_start = starts.iter().peekable();
    let code = &image.code;
    let mut insns = 0usize;
    let mut off = 0usize;
    while off < code.len() {
        while let Some(&&(at, i)) = next_start.peek() {
            if at > off {
                break;
            }
            next_start.next();
            writeln!(out, ";{}", ebpf_line(program, i)).map_err(stdout_err)?;
        }
        let mark = image
            .marks
            .iter()
            .find(|(at, _)| *at == off)
            .map(|(_, m)| m.as_str());
        let (len, text) = if let Some(d) = image.data.iter().find(|d| d.start == off) {
            let mut word = [0u8; 8];
            word.copy_from_slice(&code[d.clone()]);
            (8, format!(".quad {:#x}", u64::from_le_bytes(word)))
        } else {
            let window = &code[off..code.len().min(off + max_len)];
            let decoded = cs
                .disasm_count(window, off as u64, 1)
                .ok()
                .and_then(|insns| {
                    insns.iter().next().map(|i| {
                        let op = i.op_str().unwrap_or("");
                        let text = format!("{} {op}", i.mnemonic().unwrap_or("?"));
                        (i.len(), text.trim_end().to_string())
                    })
                });
            insns += 1;
            // Bytes capstone cannot decode are shown as data and the walk goes on after them.
            decoded.unwrap_or_else(|| match image.arch {
                Arch::X86_64 => (1, format!(".byte {:#04x}", code[off])),
                Arch::Arm64 => {
                    let n = window.len();
                    let mut word = [0u8; 4];
                    word[..n].copy_from_slice(window);
                    (n, format!(".word {:#010x}", u32::from_le_bytes(word)))
                }
            })
        };
        let bytes = hex(&code[off..off + len]);
        let line = match mark {
            Some(m) => format!("{off:6x}:  {bytes:<30} {text:<40} ; {m}"),
            None => format!("{off:6x}:  {bytes:<30} {text}"),
        };
        writeln!(out, "{}", line.trim_end()).map_err(stdout_err)?;
        off += len;
    }
    writeln!(
        out,
        "; {} bytes, {insns} instructions ({}, checked memory accesses)",
        code.len(),
        image.arch.name()
    )
    .map_err(stdout_err)?;
    Ok(())
}
