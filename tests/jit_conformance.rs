//! Every program of the eBPF conformance suite (`../shared/conformance`) under the host's JIT, in
//! checked and trusted mode (on arm64 also with BTI and PAC on and off), against the expected r0
//! and against the interpreter.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use livebpf::conformance;
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::jit::{JitOptions, JitProgram};

/// (label, options) for every mode the host's JIT has.
fn modes() -> Vec<(String, JitOptions)> {
    // SAFETY: the suite's programs are known to access only their input and stack (the
    // interpreter run in the test would report anything else, and the checked JIT runs too).
    let trusted = unsafe { JitOptions::trusted() };
    let mut modes = Vec::new();
    for (name, base) in [("checked", JitOptions::checked()), ("trusted", trusted)] {
        if cfg!(target_arch = "aarch64") {
            for (bti, pac) in [(true, true), (false, false), (true, false), (false, true)] {
                let label = format!("{name}, bti {bti}, pac {pac}");
                modes.push((label, base.with_bti(bti).with_pac(pac)));
            }
        } else {
            modes.push((name.to_string(), base));
        }
    }
    modes
}

#[test]
fn conformance_suite_passes_under_the_jit() {
    let Some(dir) = conformance::shared_dir() else {
        println!("note: ../shared/conformance is missing; skipping the conformance suite");
        return;
    };
    let cases = conformance::load_dir(&dir).expect("conformance files parse");
    assert!(!cases.is_empty(), "no .data files in {}", dir.display());
    let helpers = Helpers::conformance();
    let modes = modes();
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
        for (mode, opts) in &modes {
            let jit = match JitProgram::compile(&program, &helpers, *opts) {
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
                    "{} ({mode}): got {got:?}, expected {:#x}",
                    case.name, case.result
                ));
            }
        }
    }
    println!(
        "{} conformance programs, {runs} runs under the {} JIT",
        cases.len(),
        std::env::consts::ARCH
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
