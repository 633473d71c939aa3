//! The `livebpf` binary end to end: normal output, and one-line errors with a non-zero exit.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Output, Stdio};

use livebpf::cli::Engine;

#[path = "common/bin.rs"]
mod bin;

fn command() -> Command {
    bin::livebpf_command()
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

fn trace_example(name: &str) -> String {
    format!("{}/examples/trace/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The engines this host can run: the JIT only where it is the default (see
/// `Engine::default_for_host`, which the arm64 backend flips when it lands).
fn engines() -> Vec<&'static str> {
    if Engine::default_for_host() == Engine::Jit {
        vec!["jit", "interp"]
    } else {
        vec!["interp"]
    }
}

/// A program as the hex text the conformance plugin reads on stdin.
fn program_hex(src: &str) -> String {
    let program = livebpf::asm::assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    program
        .encode()
        .iter()
        .map(|b| format!("{b:02x} "))
        .collect()
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
    let o = livebpf(
        &[
            "run",
            looping.to_str().unwrap(),
            "--budget",
            "100",
            "--engine",
            "interp",
        ],
        None,
    );
    assert_one_line_error(&o, "budget");
    let o = livebpf(&["run", "/nonexistent/prog.s"], None);
    assert_one_line_error(&o, "cannot read");
    let o = livebpf(&["run", &example(), "--mem", "zz"], None);
    assert_one_line_error(&o, "hex");
}

#[test]
fn run_budget_stops_a_runaway_program_with_every_engine() {
    let looping = temp("run-loop.s", b"l:\nja l\n");
    for engine in engines() {
        let o = livebpf(
            &[
                "run",
                looping.to_str().unwrap(),
                "--budget",
                "100",
                "--engine",
                engine,
            ],
            None,
        );
        assert_one_line_error(&o, "budget of 100 exhausted at instruction 0");
        // A program that ends within its budget prints its result.
        let o = livebpf(
            &[
                "run",
                &trace_example("target.s"),
                "--mem",
                "68 65 6c 6c 6f",
                "--budget",
                "100",
                "--engine",
                engine,
            ],
            None,
        );
        assert_eq!(
            stdout(&o),
            "0xa430d84680aabd0b\n",
            "{engine}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn sieve_with_every_engine_and_the_default() {
    for engine in engines() {
        let o = livebpf(
            &[
                "run",
                &example(),
                "--zeroed-mem",
                "4096",
                "--engine",
                engine,
            ],
            None,
        );
        assert!(o.status.success(), "{engine}: {}", stderr(&o));
        assert_eq!(stdout(&o), "0x234\n", "{engine}");
    }
    let o = livebpf(&["run", &example(), "--zeroed-mem", "100"], None);
    assert_eq!(stdout(&o), "0x19\n", "{}", stderr(&o));
    let o = livebpf(&["run", "--help"], None);
    let default = match Engine::default_for_host() {
        Engine::Jit => "[default: jit]",
        Engine::Interp => "[default: interp]",
    };
    assert!(stdout(&o).contains(default), "{}", stdout(&o));
}

#[test]
fn conformance_plugin_gives_the_same_results_with_every_engine() {
    // (program, memory, expected r0 as the plugin prints it)
    let cases: &[(&str, &str, &str)] = &[
        ("mov %r0, %r2\nexit", "01 02 03", "3"),
        ("ldxw %r0, [%r1+1]\nexit", "aa 01 02 03 04", "4030201"),
        // callx reaches the conformance suite's identity helper (id 5)
        ("mov %r1, 7\nmov %r2, 5\ncall %r2\nexit", "", "7"),
        (
            "mov %r1, 3\ncall local f\nadd %r0, 1\nexit\nf:\nmov %r0, %r1\nmul %r0, 5\nexit",
            "",
            "10",
        ),
        ("mov %r0, 9\nmov %r1, 0\ndiv %r0, %r1\nexit", "", "0"),
        (
            "stdw [%r10-8], 40\nmov %r1, 2\nlock fetch add [%r10-8], %r1\nldxdw %r0, [%r10-8]\nadd %r0, %r1\nexit",
            "",
            "52",
        ),
    ];
    for engine in engines() {
        for (src, mem, want) in cases {
            let mut args = vec!["conformance-plugin", "--engine", engine];
            if !mem.is_empty() {
                args.push(mem);
            }
            let o = livebpf(&args, Some(&program_hex(src)));
            assert!(o.status.success(), "{engine} {src}: {}", stderr(&o));
            assert_eq!(stdout(&o).trim(), *want, "{engine}: {src}");
        }
    }
    // A few files of the conformance suite itself, when it is checked out next to the project.
    let Some(dir) = livebpf::conformance::shared_dir() else {
        return;
    };
    for name in ["callx", "call_local", "lock_fetch_add", "mem-len", "prime"] {
        let case = livebpf::conformance::TestCase::load(&dir.join(format!("{name}.data")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let program: String = case
            .program()
            .unwrap()
            .encode()
            .iter()
            .map(|b| format!("{b:02x} "))
            .collect();
        let mem: String = case.mem.iter().map(|b| format!("{b:02x} ")).collect();
        for engine in engines() {
            let o = livebpf(
                &["conformance-plugin", mem.trim(), "--engine", engine],
                Some(&program),
            );
            assert!(o.status.success(), "{engine} {name}: {}", stderr(&o));
            assert_eq!(
                stdout(&o),
                format!("{:x}\n", case.result),
                "{engine} {name}"
            );
        }
    }
}

#[test]
fn out_of_bounds_is_the_same_one_line_error_with_every_engine() {
    // No input memory: r1 = 0, so the faulting address (0x8) is the same in every process.
    let oob = temp("oob-engines.s", b"mov %r0, 1\nldxdw %r0, [%r1+8]\nexit\n");
    let mut messages = Vec::new();
    for engine in engines() {
        let o = livebpf(&["run", oob.to_str().unwrap(), "--engine", engine], None);
        assert_one_line_error(
            &o,
            "out-of-bounds load of 8 bytes at address 0x8 (instruction 1)",
        );
        messages.push(stderr(&o));
        let o = livebpf(
            &["conformance-plugin", "--engine", engine],
            Some(&program_hex("ldxdw %r0, [%r1+8]\nexit")),
        );
        assert_one_line_error(&o, "out-of-bounds load");
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "{messages:?}");
}

#[test]
fn dump_prints_ebpf_with_slot_numbers() {
    let o = livebpf(&["dump", &example()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 19, "{out}");
    assert_eq!(lines[0], "   0: mov %r0, 0");
    assert!(lines[2].starts_with("   2: jge %r3, %r2, +15"), "{out}");
    assert!(lines[2].ends_with("; -> 18"), "{out}");
    assert_eq!(lines[18], "  18: exit");
    // lddw takes two slots: the next instruction is numbered after both.
    let wide = temp("wide.s", b"lddw %r0, 0x1122334455667788\nexit\n");
    let o = livebpf(&["dump", wide.to_str().unwrap()], None);
    assert_eq!(
        stdout(&o),
        "   0: lddw %r0, 0x1122334455667788\n   2: exit\n"
    );
    // --arch only makes sense with --jited: a usage error from clap.
    let o = livebpf(&["dump", &example(), "--arch", "arm64"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn dump_jited_x86_64_marks_the_patch_site() {
    // The generator is host-independent, so this works on any host.
    let o = livebpf(&["dump", &example(), "--jited", "--arch", "x86_64"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let first = out.lines().next().unwrap_or("");
    assert!(first.starts_with("     0:  0f 1f 44 00 00 "), "{first}");
    assert!(first.contains("nop dword ptr [rax + rax]"), "{first}");
    assert!(
        first.contains("; <- patch site (nop, poked to call/jmp by attach)"),
        "{first}"
    );
    assert_eq!(out.matches("patch site").count(), 1, "{out}");
    assert!(out.lines().any(|l| l.ends_with(" ret")), "{out}");
    assert!(out.contains("push rbp"), "{out}");
    assert!(
        out.lines()
            .last()
            .unwrap_or("")
            .contains("(x86_64, checked memory accesses)"),
        "{out}"
    );
    // Without --arch: the host's architecture.
    let o = livebpf(&["dump", &example(), "--jited"], None);
    if cfg!(target_arch = "x86_64") {
        // Equal but for embedded addresses, which ASLR moves between processes.
        assert_eq!(stdout(&o).lines().count(), out.lines().count());
        assert_eq!(stdout(&o).lines().next(), Some(first));
    } else if cfg!(target_arch = "aarch64") {
        assert!(stdout(&o).contains("(arm64, checked"), "{}", stdout(&o));
    }
}

#[test]
fn dump_jited_arm64_marks_the_patch_site_and_the_plt() {
    let o = livebpf(&["dump", &example(), "--jited", "--arch", "arm64"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let site: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("<- patch site"))
        .collect();
    assert_eq!(site.len(), 1, "{out}");
    assert!(
        site[0].contains("1f 20 03 d5") && site[0].contains(" nop "),
        "{}",
        site[0]
    );
    assert!(site[0].contains("poked to bl/b by attach"), "{}", site[0]);
    let plt = out.lines().find(|l| l.contains("<- PLT:")).unwrap_or("");
    assert!(plt.contains("ldr x10"), "{out}");
    let literal = out
        .lines()
        .find(|l| l.contains("<- PLT target"))
        .unwrap_or("");
    assert!(literal.contains(".quad"), "{out}");
    // The code of each eBPF instruction is introduced by the instruction.
    assert!(out.contains(";   0: mov %r0, 0\n"), "{out}");
    assert!(out.contains(";  18: exit\n"), "{out}");
    assert!(out.lines().any(|l| l.ends_with(" ret")), "{out}");
    // `aarch64` is accepted as well.
    let o = livebpf(&["dump", &example(), "--jited", "--arch", "aarch64"], None);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The `key=value` fields of trace's summary line.
fn summary(out: &str) -> std::collections::HashMap<String, String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("trace: "))
        .unwrap_or_else(|| panic!("no summary in {out:?}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn field(s: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    s.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {s:?}"))
}

fn trace_args(target: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["trace", target, "--fentry"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(trace_example("count_entry.s"));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn livebpf_owned(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    livebpf(&args, None)
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_attaches_and_detaches_under_load_without_errors_or_leaks() {
    let fexit = trace_example("count_exit.s");
    let args = trace_args(
        &trace_example("target.s"),
        &[
            "--fexit",
            &fexit,
            "--zeroed-mem",
            "256",
            "--threads",
            "2",
            "--cycles",
            "50",
        ],
    );
    let o = livebpf_owned(&args);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let s = summary(&stdout(&o));
    assert_eq!(field(&s, "cycles"), 50);
    assert_eq!(field(&s, "threads"), 2);
    assert_eq!(field(&s, "errors"), 0, "{s:?}");
    assert_eq!(field(&s, "live_images"), 0, "{s:?}");
    // Every cycle waits for each runner to complete a run while both tracers are attached.
    assert!(field(&s, "fentry") >= 100, "{s:?}");
    assert!(field(&s, "fexit") >= 100, "{s:?}");
    assert!(field(&s, "runs") >= field(&s, "fentry"), "{s:?}");
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_with_fentry_only_of_a_target_that_writes_its_input() {
    // A target that writes its input: each run gets a fresh copy, so every result is the same.
    let args = trace_args(
        &example(),
        &["--zeroed-mem", "300", "--threads", "3", "--cycles", "20"],
    );
    let o = livebpf_owned(&args);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let s = summary(&stdout(&o));
    assert_eq!(field(&s, "errors"), 0, "{s:?}");
    assert_eq!(field(&s, "fexit"), 0, "{s:?}");
    assert!(field(&s, "fentry") >= 60, "{s:?}");
    assert_eq!(field(&s, "live_images"), 0, "{s:?}");
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_of_a_faulting_target_reports_errors_and_fails() {
    let oob = temp("trace-oob.s", b"ldxdw %r0, [%r1+256]\nexit\n");
    let args = trace_args(
        oob.to_str().unwrap(),
        &["--zeroed-mem", "256", "--threads", "2", "--cycles", "10"],
    );
    let o = livebpf_owned(&args);
    assert!(!o.status.success());
    let s = summary(&stdout(&o));
    assert!(field(&s, "errors") > 0, "{s:?}");
    assert_eq!(field(&s, "errors"), field(&s, "runs"), "{s:?}");
    assert_eq!(field(&s, "live_images"), 0, "{s:?}");
    assert_one_line_error(&o, "out-of-bounds load of 8 bytes");
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_counts_tracer_errors() {
    // The tracer reads past its 48-byte context: each of its runs fails (the target's do not).
    let bad = temp("bad-tracer.s", b"ldxdw %r0, [%r1+48]\nexit\n");
    let o = livebpf(
        &[
            "trace",
            &trace_example("target.s"),
            "--fentry",
            bad.to_str().unwrap(),
            "--threads",
            "2",
            "--cycles",
            "10",
        ],
        None,
    );
    assert!(!o.status.success());
    let s = summary(&stdout(&o));
    assert_eq!(field(&s, "errors"), field(&s, "fentry"), "{s:?}");
    assert!(field(&s, "errors") >= 20, "{s:?}");
    let reason = format!(
        "fentry tracer {} failed in {} runs, the last with: out-of-bounds load of 8 bytes",
        bad.display(),
        field(&s, "errors")
    );
    assert_one_line_error(&o, &reason);
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_tracers_cannot_write_their_context() {
    // The fexit tries to change the target's return value: each of its runs fails, the target's
    // results stay right (errors counts only the tracer's runs).
    let writer = temp(
        "write-retval.s",
        b"mov %r2, 1234\nstxdw [%r1+40], %r2\nexit\n",
    );
    let args = trace_args(
        &trace_example("target.s"),
        &[
            "--fexit",
            writer.to_str().unwrap(),
            "--zeroed-mem",
            "16",
            "--threads",
            "2",
            "--cycles",
            "10",
        ],
    );
    let o = livebpf_owned(&args);
    assert!(!o.status.success());
    let s = summary(&stdout(&o));
    assert_eq!(field(&s, "errors"), field(&s, "fexit"), "{s:?}");
    assert!(field(&s, "errors") >= 20, "{s:?}");
    assert_one_line_error(&o, "the last with: out-of-bounds store of 8 bytes");
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_stops_a_runaway_tracer_at_its_budget_and_says_so() {
    let looping = temp("LOOP.s", b"l:\nja l\n");
    let started = std::time::Instant::now();
    let o = livebpf(
        &[
            "trace",
            &trace_example("target.s"),
            "--fentry",
            looping.to_str().unwrap(),
            "--threads",
            "2",
            "--cycles",
            "5",
        ],
        None,
    );
    // A few seconds even under qemu; without the budget the trace never ends.
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    let s = summary(&stdout(&o));
    assert_eq!(field(&s, "errors"), field(&s, "fentry"), "{s:?}");
    assert!(field(&s, "errors") >= 10, "{s:?}");
    assert_one_line_error(
        &o,
        &format!(
            "fentry tracer {} failed in {} runs, the last with: instruction budget of 1048576 \
             exhausted at instruction 0",
            looping.display(),
            field(&s, "errors")
        ),
    );
    // --budget sets the tracers' budget, fexit's too.
    let args = trace_args(
        &trace_example("target.s"),
        &[
            "--fexit",
            looping.to_str().unwrap(),
            "--budget",
            "1000",
            "--threads",
            "2",
            "--cycles",
            "5",
        ],
    );
    let o = livebpf_owned(&args);
    assert_one_line_error(&o, "fexit tracer");
    assert_one_line_error(&o, "instruction budget of 1000 exhausted at instruction 0");
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn trace_of_targets_that_return_pointers() {
    // Stack and input addresses differ between the interpreter and the JIT: such results are
    // compared as offsets into the same region.
    let cases: [(&str, &[u8], &[&str]); 4] = [
        ("ret-r10.s", b"mov %r0, %r10\nexit\n", &[]),
        ("ret-frame.s", b"mov %r0, %r10\nsub %r0, 24\nexit\n", &[]),
        (
            "ret-r1.s",
            b"mov %r0, %r1\nadd %r0, 8\nexit\n",
            &["--zeroed-mem", "16"],
        ),
        (
            "ret-end.s",
            b"mov %r0, %r1\nadd %r0, %r2\nexit\n",
            &["--zeroed-mem", "16"],
        ),
    ];
    for (name, src, mem) in cases {
        let target = temp(name, src);
        let mut extra = vec!["--threads", "2", "--cycles", "10"];
        extra.extend_from_slice(mem);
        let o = livebpf_owned(&trace_args(target.to_str().unwrap(), &extra));
        assert!(o.status.success(), "{name}: {}{}", stdout(&o), stderr(&o));
        assert_eq!(field(&summary(&stdout(&o)), "errors"), 0, "{name}");
    }
    // An address outside both regions must still be equal, so it is reported.
    let target = temp("ret-past.s", b"mov %r0, %r1\nadd %r0, 17\nexit\n");
    let o = livebpf_owned(&trace_args(
        target.to_str().unwrap(),
        &["--zeroed-mem", "16", "--threads", "2", "--cycles", "5"],
    ));
    assert_one_line_error(&o, "target runs failed");
}

#[test]
fn trace_usage_errors() {
    let target = trace_example("target.s");
    let o = livebpf_owned(&trace_args(&target, &["--threads", "0"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = livebpf(&["trace", &target], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = livebpf_owned(&trace_args("/nonexistent/target.s", &[]));
    assert_one_line_error(&o, "cannot read");
    let looping = temp("trace-loop.s", b"l:\nja l\n");
    let o = livebpf_owned(&trace_args(looping.to_str().unwrap(), &[]));
    assert_one_line_error(&o, "does not finish");
}

#[test]
fn trace_examples_run_on_their_own() {
    let o = livebpf(
        &["run", &trace_example("target.s"), "--mem", "68 65 6c 6c 6f"],
        None,
    );
    assert_eq!(stdout(&o), "0xa430d84680aabd0b\n", "{}", stderr(&o));
    let ctx = "00 ".repeat(48);
    for tracer in ["count_entry.s", "count_exit.s"] {
        let o = livebpf(&["run", &trace_example(tracer), "--mem", &ctx], None);
        assert!(o.status.success(), "{tracer}: {}", stderr(&o));
    }
}

/// A program that returns the length of its input memory, to see what a hex string became.
fn mem_len_prog() -> std::path::PathBuf {
    temp("mem-len.s", b"mov %r0, %r2\nexit\n")
}

#[test]
fn hex_is_only_hex_digit_pairs_and_whitespace() {
    let prog = mem_len_prog();
    let prog = prog.to_str().unwrap();
    // `u8::from_str_radix` takes a leading `+`: `+1+2` must not become the bytes 01 02.
    let o = livebpf(&["run", prog, "--mem", "+1+2"], None);
    assert_one_line_error(&o, "--mem: column 1: `+` is not a hex digit");
    let o = livebpf(&["run", prog, "--mem", "01 0x02"], None);
    assert_one_line_error(&o, "column 5: `x` is not a hex digit");
    // A byte is two digits in one group: `0 1` is not the byte 01.
    let o = livebpf(&["run", prog, "--mem", "0 1"], None);
    assert_one_line_error(&o, "column 1: `0` has an odd number of hex digits");
    let o = livebpf(&["run", prog, "--mem", "aa\tbbcc\n dd  "], None);
    assert_eq!(stdout(&o), "0x4\n", "{}", stderr(&o));
    // The plugin's program on stdin, with its line and column.
    let o = livebpf(
        &["conformance-plugin"],
        Some("bf 20 00 00 00 00 00 00\n95 +0 00"),
    );
    assert_one_line_error(&o, "the program on stdin: line 2, column 4: `+`");
    let o = livebpf(&["conformance-plugin", "01 g0"], Some(&program_hex("exit")));
    assert_one_line_error(&o, "memory: column 4: `g` is not a hex digit");
    // A .data file's memory, with the line of the file.
    let data = temp(
        "bad-mem.data",
        b"-- asm\nmov %r0, %r2\nexit\n-- mem\n00 01\n02 +3\n-- result\n0x4\n",
    );
    let o = livebpf(&["run", data.to_str().unwrap()], None);
    assert_one_line_error(
        &o,
        "line 6: bad hex in -- mem: column 4: `+` is not a hex digit",
    );
}

#[test]
fn conformance_data_numbers_are_digits_only() {
    for bad in ["0x+5", "-+5", "+5"] {
        let data = temp(
            "bad-result.data",
            format!("-- asm\nmov %r0, 5\nexit\n-- result\n{bad}\n").as_bytes(),
        );
        let o = livebpf(&["run", data.to_str().unwrap()], None);
        assert_one_line_error(&o, &format!("bad result value `{bad}`"));
    }
}

#[test]
fn oversized_program_files_are_refused_without_reading_them_whole() {
    let limit = livebpf::cli::MAX_PROGRAM_FILE;
    assert_eq!(limit, 8 << 24, "the README documents 128 MiB");
    let message = format!("is larger than {limit} bytes");
    // A character device that never ends.
    let commands: [&[&str]; 4] = [
        &["run", "/dev/zero"],
        &["disasm", "/dev/zero"],
        &["dump", "/dev/zero"],
        &["asm", "/dev/zero", "-o", "/dev/null"],
    ];
    for args in commands {
        let o = livebpf(args, None);
        assert_one_line_error(&o, &format!("/dev/zero {message}"));
    }
    // A regular file that says how large it is (sparse: nothing is written).
    let big = temp("big.bin", b"");
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(limit + 1)
        .unwrap();
    let o = livebpf(&["run", big.to_str().unwrap()], None);
    assert_one_line_error(&o, &message);
    std::fs::remove_file(&big).unwrap();
    // A FIFO fed assembly text for ever.
    let fifo = std::env::temp_dir().join(format!("livebpf-cli-fifo-{}", std::process::id()));
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::options().write(true).open(&fifo).unwrap();
            let chunk = "mov %r0, 1\n".repeat(4096);
            // Ends with EPIPE once livebpf stops reading.
            while f.write_all(chunk.as_bytes()).is_ok() {}
        })
    };
    let o = livebpf(&["run", fifo.to_str().unwrap()], None);
    // Should livebpf not have opened the FIFO, this releases the writer from its `open`.
    drop(
        std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo),
    );
    writer.join().unwrap();
    std::fs::remove_file(&fifo).unwrap();
    assert_one_line_error(&o, &message);
}

#[test]
fn asm_refuses_to_overwrite_its_input() {
    let src = b"mov %r0, 1\nexit\n";
    // Assembly text in a `.bin` file: the default output would be the input itself.
    let input = temp("text.bin", src);
    let o = livebpf(&["asm", input.to_str().unwrap()], None);
    assert_one_line_error(&o, "pass -o");
    assert_one_line_error(&o, "is the input");
    assert_eq!(std::fs::read(&input).unwrap(), src);
    // The same file by another name: `-o` the input, a hard link or a symlink to it.
    let input = temp("self.s", src);
    let link = input.with_file_name("self-hard.bin");
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(&input, &link).unwrap();
    let sym = input.with_file_name("self-sym.bin");
    let _ = std::fs::remove_file(&sym);
    std::os::unix::fs::symlink(&input, &sym).unwrap();
    let dotted = input.with_file_name(".").join("self.s");
    for out in [&input, &link, &sym, &dotted] {
        let o = livebpf(
            &["asm", input.to_str().unwrap(), "-o", out.to_str().unwrap()],
            None,
        );
        assert_one_line_error(&o, "is the input");
        assert_eq!(std::fs::read(&input).unwrap(), src);
    }
    // Another file is fine.
    let out = input.with_file_name("self-out.bin");
    let o = livebpf(
        &["asm", input.to_str().unwrap(), "-o", out.to_str().unwrap()],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap().len(), 16);
}

/// The first 64 bytes of an x86-64 relocatable ELF object, as clang -target bpf writes them.
fn elf_header() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    h[16] = 1; // ET_REL
    h[18] = 247; // EM_BPF
    h[20] = 1;
    h
}

#[test]
fn elf_objects_are_named_with_the_way_out() {
    let elf = temp("prog.o", &elf_header());
    let path = elf.to_str().unwrap();
    // Commands that take bytecode name the ones that take objects.
    let commands: [&[&str]; 2] = [&["disasm", path], &["asm", path, "-o", "/dev/null"]];
    for cmd in commands {
        let o = livebpf(cmd, None);
        assert_one_line_error(&o, &format!("{path} is an ELF object file"));
        assert_one_line_error(&o, "`livebpf run`, `dump` and `show` load objects");
    }
    // `run` and `dump` load objects: a header alone is refused by the loader, in one line.
    for cmd in [&["run", path][..], &["dump", path]] {
        let o = livebpf(cmd, None);
        assert_one_line_error(&o, path);
    }
    let hex: String = elf_header().iter().map(|b| format!("{b:02x} ")).collect();
    let o = livebpf(&["conformance-plugin"], Some(&hex));
    assert_one_line_error(&o, "is an ELF object file");
}

#[test]
fn text_is_told_from_bytecode_by_a_rule_not_by_luck() {
    // A UTF-8 byte order mark is dropped.
    let bom = temp("bom.s", b"\xef\xbb\xbfmov %r0, 7\nexit\n");
    let o = livebpf(&["run", bom.to_str().unwrap()], None);
    assert_eq!(stdout(&o), "0x7\n", "{}", stderr(&o));
    let bom = temp(
        "bom.data",
        b"\xef\xbb\xbf-- asm\nmov %r0, %r2\nexit\n-- mem\n01 02\n-- result\n0x2\n",
    );
    let o = livebpf(&["run", bom.to_str().unwrap()], None);
    assert_eq!(stdout(&o), "0x2\n", "{}", stderr(&o));
    // Assembly with one byte that is not UTF-8: reported where it is, not decoded as bytecode.
    let bad = temp("latin1.s", b"mov %r0, 1\nmov %r0, 2 # caf\xe9\nexit\n");
    let o = livebpf(&["run", bad.to_str().unwrap()], None);
    assert_one_line_error(&o, "latin1.s: line 2, column 17: byte 0xe9 is not UTF-8");
    // ... even when its length is a multiple of 8.
    let bad = temp("latin1-8.s", b"mov %r0, 1\nexit # abcd\xe9\n");
    assert_eq!(std::fs::read(&bad).unwrap().len() % 8, 0);
    let o = livebpf(&["run", bad.to_str().unwrap()], None);
    assert_one_line_error(&o, "line 2, column 12: byte 0xe9 is not UTF-8");
    // A stray NUL in a file that is otherwise text.
    let nul = temp(
        "nul.s",
        b"mov %r0, 1\nmov %r1, 2\nmov %r2, 3\nadd %r0,\0%r1\nexit\n",
    );
    let o = livebpf(&["run", nul.to_str().unwrap()], None);
    assert_one_line_error(&o, "nul.s: line 4, column 9: a NUL byte");
    // Bytecode that decodes is bytecode, even when most of its bytes are printable:
    // `stw [%r9+0x4141], 0x41414141` is `b` TAB `AAAAAA`.
    let printable = temp(
        "printable.bin",
        b"\x62\x09\x41\x41\x41\x41\x41\x41\x95\0\0\0\0\0\0\0",
    );
    let o = livebpf(&["dump", printable.to_str().unwrap()], None);
    assert!(
        stdout(&o).contains("stw [%r9+16705], 1094795585"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    // Binary that does not decode keeps the decoder's message.
    let binary = temp(
        "bad-op.bin",
        &[0xff, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0],
    );
    let o = livebpf(&["run", binary.to_str().unwrap()], None);
    assert_one_line_error(&o, "invalid instruction at slot 0");
}

/// Runs livebpf with its stdout closed (`>&-`), through `sh` since `Command` cannot close it.
fn livebpf_stdout_closed(args: &[&str]) -> Output {
    livebpf_redirected(">&-", args)
}

/// Runs livebpf through `sh` with the redirection `redirect`.
fn livebpf_redirected(redirect: &str, args: &[&str]) -> Output {
    let inner = command();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("exec \"$@\" {redirect}"))
        .arg("sh")
        .arg(inner.get_program())
        .args(inner.get_args())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd.output().unwrap()
}

/// Runs livebpf writing to a pipe whose reader is already gone.
fn livebpf_broken_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn failed_writes_to_stdout_are_reported() {
    let bin = temp("write-fail.bin", b"");
    let ex = example();
    let target = trace_example("target.s");
    let fentry = trace_example("count_entry.s");
    let bin = bin.to_str().unwrap();
    let mut commands: Vec<Vec<&str>> = vec![
        vec!["run", &ex, "--zeroed-mem", "64"],
        vec!["asm", &ex, "-o", bin],
        vec!["disasm", bin],
        vec!["dump", &ex],
        vec!["dump", &ex, "--jited", "--arch", "x86_64"],
    ];
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        commands.push(vec![
            "trace",
            &target,
            "--fentry",
            &fentry,
            "--threads",
            "1",
            "--cycles",
            "2",
        ]);
    }
    // Make sure the bytecode exists before `disasm` reads it.
    assert!(livebpf(&commands[1], None).status.success());
    for args in &commands {
        let o = livebpf_stdout_closed(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_one_line_error(&o, "cannot write to stdout");
        assert_one_line_error(&o, "closed");
        let o = livebpf_broken_pipe(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_one_line_error(&o, "cannot write to stdout");
        assert_one_line_error(&o, "Broken pipe");
    }
    // Open, but not for writing: std's stdout would pretend the write worked.
    let o = livebpf_redirected("1</dev/null", &commands[0]);
    assert_one_line_error(&o, "Bad file descriptor");
    // --help is normal output too.
    let o = livebpf_stdout_closed(&["--help"]);
    assert_one_line_error(&o, "cannot write to stdout");
    let o = livebpf_broken_pipe(&["run", "--help"]);
    assert_one_line_error(&o, "Broken pipe");
    // The plugin reads stdin, so it gets its program there.
    let mut child = command()
        .arg("conformance-plugin")
        .stdin(Stdio::piped())
        .stdout({
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            writer
        })
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(program_hex("mov %r0, 1\nexit").as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_one_line_error(&o, "cannot write to stdout");
}

#[test]
fn show_prints_programs_then_maps_one_per_line() {
    let Some(clang) = ["clang-19", "clang"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        assert!(
            std::env::var("LIVEBPF_REQUIRE_CLANG").as_deref() != Ok("1"),
            "LIVEBPF_REQUIRE_CLANG=1 but neither clang-19 nor clang runs"
        );
        eprintln!(
            "!! WARNING: clang-19 / clang not found: `livebpf show` on a compiled object is SKIPPED"
        );
        return;
    };
    let object = |name: &str| {
        let src = format!("{}/tests/bpf/{name}.c", env!("CARGO_MANIFEST_DIR"));
        let out = temp(&format!("{name}.o"), b"");
        let o = Command::new(clang)
            .args(["-O2", "-g", "-target", "bpf"])
            .args([
                "-I/usr/include/x86_64-linux-gnu",
                "-I/usr/include/aarch64-linux-gnu",
            ])
            .args(["-c", &src, "-o", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let tailcall = object("tailcall");
    let o = livebpf(&["show", tailcall.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "program tail_pass section=xdp type=xdp insns=2 maps=0 helpers=-\n\
         program tail_drop section=xdp type=xdp insns=2 maps=0 helpers=-\n\
         program xdp_entry section=xdp type=xdp insns=7 maps=1 helpers=12\n\
         map jump_table type=prog_array key_size=4 value_size=4 max_entries=4 flags=0x0\n"
    );
    let tracing = object("tracing");
    let o = livebpf(&["show", tracing.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "program on_entry section=fentry/target_fn type=fentry target=target_fn insns=8 maps=1 helpers=-\n\
         program on_exit section=fexit/target_fn type=fexit target=target_fn insns=6 maps=1 helpers=-\n\
         program override_ret section=fmod_ret/target_fn type=fmod_ret target=target_fn insns=2 maps=0 helpers=-\n\
         program replacement section=freplace/other_fn type=freplace target=other_fn insns=2 maps=0 helpers=-\n\
         map .bss type=array key_size=4 value_size=16 max_entries=1 flags=0x0\n"
    );
    // A refused object: one line naming the file and the map.
    let bad = object("bad_map_type");
    let o = livebpf(&["show", bad.to_str().unwrap()], None);
    assert_one_line_error(&o, &format!("{}: map `stacks` has type 7", bad.display()));
    assert!(stdout(&o).is_empty());
}

#[test]
fn show_of_what_is_not_an_ebpf_object_is_a_one_line_error() {
    let o = livebpf(&["show", &example()], None);
    assert_one_line_error(&o, "not an eBPF object file: no ELF magic number");
    let mut header = elf_header();
    header[18] = 62; // EM_X86_64
    let x86 = temp("x86.o", &header);
    let o = livebpf(&["show", x86.to_str().unwrap()], None);
    assert_one_line_error(&o, "the ELF machine is not EM_BPF");
    let truncated = temp("truncated.o", &elf_header()[..40]);
    let o = livebpf(&["show", truncated.to_str().unwrap()], None);
    assert_one_line_error(&o, "malformed object: ELF header");
    let o = livebpf(&["show", "/nonexistent/prog.o"], None);
    assert_one_line_error(&o, "cannot read /nonexistent/prog.o");
    assert!(stdout(&o).is_empty());
}

#[path = "common/clang.rs"]
mod clang;

/// `tests/bpf/xdp_counter.c` compiled, or `None` without clang.
fn counter_object() -> Option<String> {
    clang::object("xdp_counter").map(|p| p.to_str().unwrap().to_string())
}

const TCP_PACKET: &str =
    "ffffffffffff ffffffffffff 0800 4500001400000000 4006 0000 0a000001 0a000002";
const UDP_PACKET: &str =
    "ffffffffffff ffffffffffff 0800 4500001400000000 4011 0000 0a000001 0a000002";

#[test]
fn run_of_an_object_prints_the_json_contract() {
    let Some(obj) = counter_object() else {
        return;
    };
    for engine in ["interp", "jit"] {
        let o = livebpf(
            &[
                "run", &obj, "--engine", engine, "--packet", TCP_PACKET, "--packet", UDP_PACKET,
                "--packet", TCP_PACKET, "--json",
            ],
            None,
        );
        assert!(o.status.success(), "{engine}: {}", stderr(&o));
        let tcp: String = TCP_PACKET.split_whitespace().collect();
        let udp: String = UDP_PACKET.split_whitespace().collect();
        // Exactly one line, runs first, then maps; keys in ascending hex order.
        assert_eq!(
            stdout(&o),
            format!(
                "{{\"runs\":[{{\"retval\":2,\"packet\":\"{tcp}\"}},{{\"retval\":2,\"packet\":\"{udp}\"}},{{\"retval\":2,\"packet\":\"{tcp}\"}}],\"maps\":{{\"counts\":{{\"06000000\":\"0200000000000000\",\"11000000\":\"0100000000000000\"}}}}}}\n"
            ),
            "{engine}"
        );
    }
    let o = livebpf(
        &[
            "run", &obj, "--packet", TCP_PACKET, "--repeat", "1000", "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ns = v["ns_per_run"].as_f64().unwrap();
    assert!(ns > 0.0, "{v}");
    // The timing runs do not change the maps printed: one run counted.
    assert_eq!(v["maps"]["counts"]["06000000"], "0100000000000000");
}

#[test]
fn run_of_an_object_explains_what_is_missing() {
    let Some(obj) = counter_object() else {
        return;
    };
    let o = livebpf(&["run", &obj], None);
    assert_one_line_error(&o, "pass at least one --packet HEX");
    let o = livebpf(&["run", &obj, "--packet", "00"], None);
    assert_one_line_error(&o, "a packet of 1 bytes");
    let o = livebpf(&["run", &obj, "--packet", "zz"], None);
    assert_one_line_error(&o, "--packet");
    let o = livebpf(
        &["run", &obj, "--prog", "nope", "--packet", TCP_PACKET],
        None,
    );
    assert_one_line_error(&o, "no program `nope` in the object; it has: xdp_count");
    let o = livebpf(&["run", &obj, "--zeroed-mem", "4"], None);
    assert_one_line_error(&o, "--packet HEX");
    let o = livebpf(&["run", &example(), "--packet", TCP_PACKET], None);
    assert_one_line_error(&o, "is not an ELF object");
    // Several programs: --prog is needed.
    let Some(several) = clang::object("subprog_loop") else {
        return;
    };
    let o = livebpf(
        &["run", several.to_str().unwrap(), "--packet", TCP_PACKET],
        None,
    );
    assert_one_line_error(&o, "pick one with --prog NAME");
    let o = livebpf(
        &[
            "run",
            several.to_str().unwrap(),
            "--prog",
            "tc_square",
            "--packet",
            TCP_PACKET,
        ],
        None,
    );
    assert_one_line_error(&o, "__sk_buff");
}

#[test]
fn dump_of_an_object_shows_the_program_as_it_runs() {
    let Some(obj) = counter_object() else {
        return;
    };
    let o = livebpf(&["dump", &obj, "--prog", "xdp_count"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    // xdp_md.data / data_end (4-byte fields) became 8-byte loads of livebpf's context.
    assert!(
        text.contains("ldxdw %r2, [%r1+8]") || text.contains("ldxdw"),
        "{text}"
    );
    assert!(!text.contains("ldxw %r2, [%r1+4]"), "{text}");
    let o = livebpf(&["dump", &obj, "--jited"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("patch site"));
}
