//! Runs every program of the shared eBPF conformance suite through the interpreter.

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
