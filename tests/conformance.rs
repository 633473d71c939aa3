//! Runs every program of the shared eBPF conformance suite through the interpreter.

#[path = "common/bin.rs"]
mod bin;

use livebpf::conformance::{load_dir, shared_dir};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;

#[test]
fn interpreter_passes_every_conformance_file() {
    let Some(dir) = shared_dir() else {
        eprintln!("conformance: ../shared/conformance not found; skipping the shared suite");
        return;
    };
    let cases = load_dir(&dir).expect("conformance files parse");
    assert!(!cases.is_empty(), "no .data files in {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let outcome = case.program().map_err(|e| e.to_string()).and_then(|p| {
            Interpreter::new(&p)
                .with_helpers(Helpers::conformance())
                .with_budget(Some(10_000_000))
                .run(&mut case.mem.clone())
                .map_err(|e| e.to_string())
        });
        match outcome {
            Ok(r0) if r0 == case.result => {}
            Ok(r0) => failures.push(format!(
                "{}: r0 = {r0:#x}, expected {:#x}",
                case.name, case.result
            )),
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    println!(
        "conformance (interp): {} ran, {} passed, {} failed",
        cases.len(),
        cases.len() - failures.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// The object the bpf_conformance runner's `--elf` mode hands a plugin: the program as the
/// global function `main` in `.text`, hex-encoded on stdin.
fn conformance_elf(code: &[u8]) -> Vec<u8> {
    use object::write::{Object, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolKind, SymbolScope};
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    let text = obj.section_id(object::write::StandardSection::Text);
    let offset = obj.append_section_data(text, code, 8);
    obj.add_symbol(Symbol {
        name: b"main".to_vec(),
        value: offset,
        size: code.len() as u64,
        kind: SymbolKind::Text,
        scope: SymbolScope::Linkage,
        weak: false,
        section: SymbolSection::Section(text),
        flags: SymbolFlags::None,
    });
    obj.write().expect("an ELF object")
}

#[test]
fn the_plugin_passes_every_conformance_file_in_elf_mode() {
    use std::io::Write;
    use std::process::Stdio;
    let Some(dir) = shared_dir() else {
        eprintln!("conformance: ../shared/conformance not found; skipping the shared suite");
        return;
    };
    let cases = load_dir(&dir).expect("conformance files parse");
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut failures = Vec::new();
    for engine in ["interp", "jit"] {
        for case in &cases {
            let Ok(program) = case.program() else {
                continue;
            };
            let elf = hex(&conformance_elf(&program.encode()));
            let mut cmd = bin::livebpf_command();
            cmd.args(["conformance-plugin", "--elf", "--engine", engine]);
            if !case.mem.is_empty() {
                cmd.arg(hex(&case.mem));
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(elf.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if got != format!("{:x}", case.result) {
                failures.push(format!(
                    "{engine} {}: got `{got}`, expected {:x}; {}",
                    case.name,
                    case.result,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}
