//! Every program of the eBPF conformance suite (`../shared/conformance`) under the x86-64 JIT, in
//! checked and trusted mode, against the expected r0 and against the interpreter.
#![cfg(target_arch = "x86_64")]

use std::path::Path;

use livebpf::conformance;
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::jit::{JitOptions, JitProgram};

#[test]
fn conformance_suite_passes_under_the_jit() {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/conformance"
    ));
    if !dir.is_dir() {
        println!(
            "note: {} is missing; skipping the conformance suite",
            dir.display()
        );
        return;
    }
    let cases = conformance::load_dir(dir).expect("conformance files parse");
    assert!(!cases.is_empty(), "no .data files in {}", dir.display());
    let helpers = Helpers::conformance();
    // SAFETY: the suite's programs are known to access only their input and stack (the
    // interpreter run below would report anything else, and the checked JIT runs first).
    let trusted = unsafe { JitOptions::trusted() };
    let mut failures = Vec::new();
    for case in &cases {
        let program = match case.program() {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{}: does not assemble: {e}", case.name));
                continue;
            }
        };
        let interp = Interpreter::new(&program)
            .with_helpers(helpers.clone())
            .run(&mut case.mem.clone());
        if interp != Ok(case.result) {
            failures.push(format!("{}: interpreter gives {interp:?}", case.name));
            continue;
        }
        for (mode, opts) in [("checked", JitOptions::checked()), ("trusted", trusted)] {
            let jit = match JitProgram::compile(&program, &helpers, opts) {
                Ok(j) => j,
                Err(e) => {
                    failures.push(format!("{} ({mode}): does not compile: {e}", case.name));
                    continue;
                }
            };
            let got = jit.run(&mut case.mem.clone());
            if got != Ok(case.result) {
                failures.push(format!(
                    "{} ({mode}): got {got:?}, expected {:#x}",
                    case.name, case.result
                ));
            }
        }
    }
    println!("{} conformance programs run under the JIT", cases.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
