//! Every program of the eBPF conformance suite (`../shared/conformance`) under the arm64 JIT:
//! checked and trusted, with BTI and PAC on and off, against the expected r0 and the interpreter.
#![cfg(target_arch = "aarch64")]

use std::path::Path;

use livebpf::conformance;
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::jit::{JitOptions, JitProgram};

#[test]
fn conformance_suite_passes_under_the_arm64_jit() {
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
    let mut modes = Vec::new();
    for (name, base) in [("checked", JitOptions::checked()), ("trusted", trusted)] {
        for (bti, pac) in [(true, true), (false, false), (true, false), (false, true)] {
            modes.push((name, bti, pac, base.with_bti(bti).with_pac(pac)));
        }
    }
    let mut failures = Vec::new();
    let mut runs = 0;
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
        for &(mode, bti, pac, opts) in &modes {
            let jit = match JitProgram::compile(&program, &helpers, opts) {
                Ok(j) => j,
                Err(e) => {
                    failures.push(format!("{} ({mode}): does not compile: {e}", case.name));
                    continue;
                }
            };
            let got = jit.run(&mut case.mem.clone());
            runs += 1;
            if got != Ok(case.result) {
                failures.push(format!(
                    "{} ({mode}, bti {bti}, pac {pac}): got {got:?}, expected {:#x}",
                    case.name, case.result
                ));
            }
        }
    }
    println!(
        "{} conformance programs, {runs} runs under the arm64 JIT",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.join("\n").lines().count(),
        failures.join("\n")
    );
}
