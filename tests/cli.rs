//! The `livebpf` binary end to end: normal output, and one-line errors with a non-zero exit.

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// The binary, started through `LIVEBPF_TEST_RUNNER` when set (e.g. `qemu-aarch64 -L ...` when the
/// tests are cross-built for arm64 and run under qemu-user, which cannot exec a foreign binary).
fn command() -> Command {
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

fn livebpf(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("livebpf starts");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("livebpf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn example() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sieve.s").to_string()
}

#[test]
fn run_prints_r0_in_hex() {
    let o = livebpf(&["run", &example(), "--zeroed-mem", "4096"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "0x234\n");
    let o = livebpf(
        &["run", &example(), "--mem", "00 00 00 00 00 00 00 00"],
        None,
    );
    assert_eq!(stdout(&o), "0x4\n");
}

#[test]
fn asm_then_disasm_then_run_bytecode() {
    let bin = temp("sieve.bin", b"");
    let o = livebpf(&["asm", &example(), "-o", bin.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = livebpf(&["disasm", bin.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ldxb %r5, [%r4+0]"), "{}", stdout(&o));
    let text = temp("roundtrip.s", &o.stdout);
    let o = livebpf(
        &["run", text.to_str().unwrap(), "--zeroed-mem", "100"],
        None,
    );
    assert_eq!(stdout(&o), "0x19\n");
    let o = livebpf(&["run", bin.to_str().unwrap(), "--zeroed-mem", "100"], None);
    assert_eq!(stdout(&o), "0x19\n");
}

#[test]
fn conformance_plugin_protocol() {
    // mov r0, r2 ; exit — r0 = length of the memory
    let prog = "bf  20  00  00  00  00  00  00  95  00  00  00  00  00  00  00  ";
    let o = livebpf(&["conformance-plugin", "01  02  03  "], Some(prog));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "3\n");
    let o = livebpf(&["conformance-plugin", "--engine", "interp"], Some(prog));
    assert_eq!(stdout(&o), "0\n");
    // A truncated program is an error on stderr with a non-zero status.
    let o = livebpf(&["conformance-plugin"], Some("bf 20 00"));
    assert!(!o.status.success());
    assert!(stdout(&o).is_empty());
}

fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success());
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

#[test]
fn bad_input_is_one_line_and_non_zero() {
    let bad_asm = temp("bad.s", b"mov %r0, 1\nmov %r11, 2\nexit\n");
    let o = livebpf(&["run", bad_asm.to_str().unwrap()], None);
    assert_one_line_error(&o, "line 2");
    let truncated = temp("trunc.bin", &[0x18, 0, 0, 0, 0, 0, 0, 0]);
    let o = livebpf(&["run", truncated.to_str().unwrap()], None);
    assert_one_line_error(&o, "lddw");
    let odd = temp("odd.bin", &[0x95, 0, 0, 0, 0xff]);
    let o = livebpf(&["disasm", odd.to_str().unwrap()], None);
    assert_one_line_error(&o, "multiple of 8");
    let oob = temp("oob.s", b"ldxdw %r0, [%r1+8]\nexit\n");
    let o = livebpf(&["run", oob.to_str().unwrap(), "--mem", "00"], None);
    assert_one_line_error(&o, "out-of-bounds");
    let looping = temp("loop.s", b"l:\nja l\n");
    let o = livebpf(&["run", looping.to_str().unwrap(), "--budget", "100"], None);
    assert_one_line_error(&o, "budget");
    let o = livebpf(&["run", "/nonexistent/prog.s"], None);
    assert_one_line_error(&o, "cannot read");
    let o = livebpf(&["run", &example(), "--mem", "zz"], None);
    assert_one_line_error(&o, "hex");
}
