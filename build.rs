//! Builds what the `native` example needs (`examples/native/`): the C library it traces, with a
//! patchable entry on every function, linked into the examples only, and its BPF tracers (an ELF
//! object compiled by clang). Neither is part of the library: without a compiler the build goes
//! on, and the example says what is missing.
use std::path::PathBuf;
use std::process::Command;

fn runs(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=examples/native/demo.c");
    println!("cargo::rerun-if-changed=examples/native/trace.bpf.c");
    println!("cargo::rustc-check-cfg=cfg(livebpf_native_demo)");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let cross = std::env::var("HOST").ok() != std::env::var("TARGET").ok();

    let mut lib = cc::Build::new();
    lib.file("examples/native/demo.c")
        .opt_level(2)
        .cargo_metadata(false)
        .warnings(false);
    match arch.as_str() {
        // One 5-byte nop at each entry: clang's flag, else gcc's fentry nop.
        "x86_64" if !cross && runs("clang-19") => {
            lib.compiler("clang-19")
                .flag("-fpatchable-function-entry=5");
        }
        // gcc refuses -mnop-mcount with -fPIC; this code links into a PIE without it (no data).
        "x86_64" => {
            lib.pic(false)
                .flag("-pg")
                .flag("-mfentry")
                .flag("-mnop-mcount");
        }
        // Two nops after `bti c`: the arm64 site, with branch protection on.
        "aarch64" => {
            lib.flag("-fpatchable-function-entry=2")
                .flag("-mbranch-protection=standard");
        }
        _ => return,
    }
    if let Err(e) = lib.try_compile("livebpf_native_demo") {
        println!(
            "cargo::warning=examples/native: the C library did not build ({e}); the `native` example will say so"
        );
        return;
    }
    println!(
        "cargo::rustc-link-arg-examples={}",
        out.join("liblivebpf_native_demo.a").display()
    );

    // The tracers: clang's BPF target, against the host's kernel headers (asm/types.h).
    let host_arch = std::env::var("HOST")
        .ok()
        .and_then(|h| h.split('-').next().map(str::to_string))
        .unwrap_or_else(|| "x86_64".into());
    let object = out.join("native_trace.bpf.o");
    let built = runs("clang-19")
        && Command::new("clang-19")
            .args(["-O2", "-g", "-target", "bpf"])
            .arg(format!("-I/usr/include/{host_arch}-linux-gnu"))
            .args(["-c", "examples/native/trace.bpf.c", "-o"])
            .arg(&object)
            .status()
            .is_ok_and(|s| s.success());
    if built {
        println!("cargo::rustc-cfg=livebpf_native_demo");
    } else {
        println!(
            "cargo::warning=examples/native: clang-19 with libbpf's headers (Debian: clang-19 libbpf-dev) is needed for the tracers; the `native` example will say so"
        );
    }
}
