//! Compiling the C programs under `tests/bpf/` with clang, for the tests that load them.
//!
//! Without clang a test skips with a loud message, unless `LIVEBPF_REQUIRE_CLANG=1` (set by
//! CI), when it fails instead.

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
    static CACHE: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(p) = cache.get(name) {
        return Some(p.clone());
    }
    let Some(clang) = find_clang() else {
        if std::env::var("LIVEBPF_REQUIRE_CLANG").as_deref() == Ok("1") {
            panic!(
                "LIVEBPF_REQUIRE_CLANG=1 but neither clang-19 nor clang runs: apt-get install clang-19 libbpf-dev"
            );
        }
        eprintln!("!! WARNING: clang-19 / clang not found: tests on {name}.c are SKIPPED !!");
        return None;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/bpf/{name}.c"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("bpf-objects")
        .join(format!("{}.o", name.replace('/', "-")));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let o = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf"])
        // asm/types.h for linux/bpf.h; a missing directory is ignored.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-I/usr/include/aarch64-linux-gnu")
        .arg("-c")
        .arg(&src)
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
    cache.insert(name.to_string(), out.clone());
    Some(out)
}
