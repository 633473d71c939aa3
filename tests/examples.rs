//! The C examples under `examples/`, compiled with clang as the README says, run with the
//! README's own commands: the XDP counter through `livebpf run --json`, and the latency tracer
//! (the quick start's main job) through `livebpf trace OBJ.o:PROG`.

#[path = "common/bin.rs"]
mod bin;
#[path = "common/clang.rs"]
mod clang;

use std::path::Path;

/// `examples/{name}.bpf.c` compiled (into the test's temporary directory, as `{name}.o`, the
/// name the README's commands use); `None` without clang.
fn compile(name: &str) -> Option<std::path::PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.bpf.c"));
    clang::compile(&src, name)
}

/// The README line that starts with `prefix`, split into words (after `prefix`), with
/// continuation lines joined.
fn readme_command(prefix: &str) -> Vec<String> {
    let readme = include_str!("../README.md").replace("\\\n", " ");
    let line = readme
        .lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("README has a line starting with `{prefix}`"));
    line.trim_start()[prefix.len()..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn livebpf(args: &[String], dir: &Path) -> std::process::Output {
    bin::livebpf_command()
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn the_quick_start_traces_the_latency_example_while_it_runs() {
    let Some(obj) = compile("latency") else {
        return;
    };
    let dir = obj.parent().unwrap();
    let args = readme_command("cargo run --release -- ");
    assert_eq!(args[0], "trace");
    assert!(args[1].starts_with("latency.o:"), "{args:?}");
    let o = livebpf(&args, dir);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let first = stdout.lines().next().unwrap();
    assert!(first.contains("errors=0 live_images=0"), "{first}");
    let count = |key: &str| -> u64 {
        first
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap()
            .parse()
            .unwrap()
    };
    let fexit = count("fexit=");
    assert!(fexit > 0 && count("fentry=") > 0, "{first}");
    // Every fexit run counted the verdict the target returned (the packet's byte sum is even:
    // XDP_TX), read from after the target's one argument as in Linux.
    let verdicts = stdout.split("map verdicts:").nth(1).unwrap();
    let tx = verdicts
        .lines()
        .find_map(|l| l.trim().strip_prefix("03000000 = "))
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(hex(tx).try_into().unwrap()),
        fexit,
        "{stdout}"
    );
    // And put each run's latency into the histogram (a run that began before the fentry was
    // attached has no start time and is not counted).
    let histogram = stdout
        .split("map latency_ns:")
        .nth(1)
        .unwrap()
        .split("map ")
        .next()
        .unwrap();
    let total: u64 = histogram
        .lines()
        .filter_map(|l| l.split(" = ").nth(1))
        .map(|v| u64::from_le_bytes(hex(v).try_into().unwrap()))
        .sum();
    assert!(total > 0 && total <= fexit, "{total} of {fexit}: {stdout}");
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn the_xdp_counter_counts_as_the_readme_shows() {
    let Some(obj) = compile("xdp_counter") else {
        return;
    };
    let dir = obj.parent().unwrap();
    let args = readme_command("livebpf run xdp_counter.o ");
    let mut full = vec!["run".to_string(), "xdp_counter.o".to_string()];
    full.extend(args);
    for engine in ["interp", "jit"] {
        let mut a = full.clone();
        a.extend(["--engine".to_string(), engine.to_string()]);
        let o = livebpf(&a, dir);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["runs"][0]["retval"], 2, "{engine}: XDP_PASS for IPv4");
        assert_eq!(v["runs"][1]["retval"], 1, "{engine}: XDP_DROP otherwise");
        // One IPv4 packet of 34 bytes from 10.0.0.1; one packet that was not IPv4.
        assert_eq!(
            v["maps"]["by_source"]["0a000001"],
            "01000000000000002200000000000000"
        );
        assert_eq!(v["maps"][".bss"]["00000000"], "0100000000000000");
    }
}
