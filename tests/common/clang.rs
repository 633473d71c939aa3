//! Compiling the C programs under `tests/bpf/` (and `examples/`) with clang, for the tests that
//! load them.
//!
//! Without clang a test skips with a loud message, unless `LIVEBPF_REQUIRE_CLANG=1` (set by
//! CI), when it fails instead.
// Each test binary that includes this file uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

fn find_clang() -> Option<&'static str> {
    ["clang-19", "clang"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The object file compiled from `tests/bpf/{name}.c` (`name` may have a directory, as in
/// `run/xdp_edges`), compiled once per test binary; `None` without clang.
pub fn object(name: &str) -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/bpf/{name}.c"));
    compile(&src, &name.replace('/', "-"))
}

/// The object file compiled from the C file `src`, named `{stem}.o` in the test's temporary
/// directory, compiled once per test binary; `None` without clang.
pub fn compile(src: &Path, stem: &str) -> Option<PathBuf> {
    static CACHE: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(p) = cache.get(src) {
        return Some(p.clone());
    }
    let Some(clang) = find_clang() else {
        if std::env::var("LIVEBPF_REQUIRE_CLANG").as_deref() == Ok("1") {
            panic!(
                "LIVEBPF_REQUIRE_CLANG=1 but neither clang-19 nor clang runs: apt-get install clang-19 libbpf-dev"
            );
        }
        eprintln!(
            "!! WARNING: clang-19 / clang not found: tests on {} are SKIPPED !!",
            src.display()
        );
        return None;
    };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("bpf-objects")
        .join(format!("{stem}.o"));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let o = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf"])
        // asm/types.h for linux/bpf.h; a missing directory is ignored.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-I/usr/include/aarch64-linux-gnu")
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("{clang} does not start: {e}"));
    assert!(
        o.status.success(),
        "{clang} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    cache.insert(src.to_path_buf(), out.clone());
    Some(out)
}
