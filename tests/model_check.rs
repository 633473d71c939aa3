//! Exhaustive model check of the retirement protocol (models/retire.pml) with spin: no image is
//! freed while a runner can still be in it, and each weakened protocol is caught.
//!
//! Needs `spin` and a C compiler (Debian: `apt-get install spin gcc`). Without spin the test says
//! so and passes, unless LIVEBPF_REQUIRE_SPIN=1 (CI sets it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn spin_available() -> bool {
    Command::new("spin")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the model with extra `-D` defines; returns pan's output.
fn check(defines: &[&str], workdir: &Path) -> String {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/retire.pml");
    std::fs::create_dir_all(workdir).unwrap();
    let out = Command::new("spin")
        .args(defines)
        .arg("-a")
        .arg(&model)
        .current_dir(workdir)
        .output()
        .expect("spin runs");
    assert!(
        out.status.success(),
        "spin -a failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cc = Command::new("cc")
        .args(["-O2", "-DSAFETY", "-o", "pan", "pan.c"])
        .current_dir(workdir)
        .output()
        .expect("cc runs");
    assert!(
        cc.status.success(),
        "compiling pan failed: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let pan = Command::new(workdir.join("pan"))
        .arg("-m1000000")
        .current_dir(workdir)
        .output()
        .expect("pan runs");
    String::from_utf8_lossy(&pan.stdout).into_owned()
}

fn workdir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("livebpf-spin-{}-{name}", std::process::id()))
}

#[test]
fn retirement_protocol_is_safe_in_every_interleaving() {
    if !spin_available() {
        assert!(
            std::env::var("LIVEBPF_REQUIRE_SPIN").as_deref() != Ok("1"),
            "spin is required (LIVEBPF_REQUIRE_SPIN=1) but not installed"
        );
        eprintln!("model check skipped: `spin` not found (apt-get install spin)");
        return;
    }
    let out = check(&[], &workdir("full"));
    println!("{out}");
    assert!(
        out.contains("errors: 0"),
        "protocol violation found:\n{out}"
    );
    assert!(!out.contains("depth too small") && !out.contains("max search depth too small"));
    for broken in ["-DSKIP_GP1", "-DSKIP_DRAIN", "-DSKIP_GP2"] {
        let out = check(&[broken], &workdir(&broken[2..]));
        assert!(
            out.contains("assertion violated"),
            "the model did not catch the protocol without {broken}:\n{out}"
        );
    }
}
