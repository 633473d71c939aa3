//! Exhaustive model check of the retirement protocol (models/retire.pml) with spin: no image or
//! replacement is freed while a thread can still be in it, in each scenario (traced runners,
//! freplace, native callers through an entry stub, all with threads registering and exiting
//! during retirements), and each weakened protocol is caught. Each run is exhaustive (pan stops
//! with "out of memory" past 4 GiB, which fails the test) and takes a few seconds.
//!
//! Needs `spin` and a C compiler (Debian: `apt-get install spin gcc`). Without spin the tests say
//! so and pass, unless LIVEBPF_REQUIRE_SPIN=1 (CI sets it), when they fail.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn spin_available() -> bool {
    Command::new("spin")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether to go on: false (skip) when spin is missing, a failure when it is required.
fn have_spin() -> bool {
    if spin_available() {
        return true;
    }
    assert!(
        std::env::var("LIVEBPF_REQUIRE_SPIN").as_deref() != Ok("1"),
        "spin is required (LIVEBPF_REQUIRE_SPIN=1) but not installed"
    );
    eprintln!("model check skipped: `spin` not found (apt-get install spin)");
    false
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
        "spin -a {defines:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // MEMLIM (MB) makes pan stop with "out of memory" rather than take the machine.
    let cc = Command::new("cc")
        .args(["-O2", "-DSAFETY", "-DMEMLIM=4096", "-o", "pan", "pan.c"])
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
    let _ = std::fs::remove_dir_all(workdir);
    String::from_utf8_lossy(&pan.stdout).into_owned()
}

fn workdir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "livebpf-spin-{}-{}",
        std::process::id(),
        name.replace(['-', ' '], "")
    ))
}

fn stored_states(out: &str) -> &str {
    out.lines()
        .find(|l| l.contains("states, stored"))
        .map_or("?", str::trim)
}

/// The scenario must be safe: the whole state space explored, no violation.
fn must_pass(defines: &[&str]) {
    let start = Instant::now();
    let out = check(defines, &workdir(&defines.join("")));
    assert!(
        out.contains("errors: 0"),
        "protocol violation found with {defines:?}:\n{out}"
    );
    assert!(
        !out.contains("too small") && !out.contains("out of memory"),
        "the search with {defines:?} was not exhaustive:\n{out}"
    );
    println!(
        "spin {defines:?}: safe, {}, {:.1?}",
        stored_states(&out),
        start.elapsed()
    );
}

/// The broken protocol must be caught.
fn must_fail(defines: &[&str]) {
    let start = Instant::now();
    let out = check(defines, &workdir(&defines.join("")));
    assert!(
        out.contains("assertion violated"),
        "the model did not catch the protocol broken by {defines:?}:\n{out}"
    );
    println!(
        "spin {defines:?}: violation found as it must be, {:.1?}",
        start.elapsed()
    );
}

#[test]
fn retirement_protocol_is_safe_in_every_interleaving() {
    if !have_spin() {
        return;
    }
    must_pass(&[]);
    for broken in ["-DSKIP_GP1", "-DSKIP_DRAIN", "-DSKIP_GP2", "-DSTALE_LIST"] {
        must_fail(&[broken]);
    }
}

#[test]
fn freplace_retirement_is_safe_in_every_interleaving() {
    if !have_spin() {
        return;
    }
    must_pass(&["-DFREPLACE"]);
    // One grace period is enough for a replacement (nothing quiesces inside one).
    must_pass(&["-DFREPLACE", "-DFREPLACE_ONE_GP"]);
    must_fail(&["-DFREPLACE", "-DFREPLACE_NO_GP"]);
}

#[test]
fn native_callers_through_the_entry_stub_are_safe_in_every_interleaving() {
    if !have_spin() {
        return;
    }
    must_pass(&["-DNATIVE"]);
    must_fail(&["-DNATIVE", "-DNATIVE_READ_EARLY"]);
    // The stub's image load satisfied early is harmless only because each unlink ends with a
    // membarrier: without one, grace period 1 can miss the thread.
    must_fail(&["-DNATIVE", "-DNO_UNLINK_MB"]);
}
