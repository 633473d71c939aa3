//! Starting the `livebpf` binary from a test.

use std::process::Command;

/// The binary, started through `LIVEBPF_TEST_RUNNER` when set (e.g. `qemu-aarch64 -L ...` when
/// the tests are cross-built for arm64 and run under qemu-user, which cannot exec a foreign
/// binary).
pub fn livebpf_command() -> Command {
    let exe = env!("CARGO_BIN_EXE_livebpf");
    match std::env::var("LIVEBPF_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut cmd = Command::new(words.next().unwrap());
            cmd.args(words).arg(exe);
            cmd
        }
        _ => Command::new(exe),
    }
}
