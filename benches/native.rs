//! Cost of tracing a native function, side by side in one run: a C function with a patchable
//! entry (compiled here into a shared object and loaded) called bare, with an empty livebpf
//! fentry, with an empty fexit, and — as root on x86-64, with clang — with a kernel uprobe
//! running an empty BPF program on the same function (`perf_event_open` uprobe + BPF attach,
//! through libbpf). For scale, livebpf's empty fentry on a BPF program too. A table of the
//! added cost per call, in native calls, follows criterion's output. `cargo bench --bench native`.

#[path = "../tests/common/native.rs"]
mod native_lib;
#[path = "common/tracing.rs"]
mod tracing;

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use criterion::Criterion;
use livebpf::native::NativeSite;
use livebpf::reclaim;
use livebpf::trampoline::{AttachKind, Link, attach, attach_native};

const SOURCE: &str = "long bn_target(long a, long b) { return a + b; }\n";

type Target = extern "C" fn(i64, i64) -> i64;

/// The shared object and the function, loaded (never unloaded); `None` without the compiler.
fn build() -> Option<(PathBuf, Target)> {
    let lib = native_lib::build("bn", SOURCE, native_lib::CC)?;
    // SAFETY: the symbol is `long bn_target(long, long)`.
    let f = unsafe { std::mem::transmute::<usize, Target>(lib.sym("bn_target")) };
    Some((lib.path().to_path_buf(), f))
}

/// Quick time per call, in ns (criterion keeps its estimates to itself).
fn ns_per_call(f: Target) -> f64 {
    let f = black_box(f);
    let n = 5_000_000i64;
    let start = Instant::now();
    for i in 0..n {
        black_box(f(black_box(i), 1));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// A kernel uprobe with an empty BPF program on `bn_target` in `so`, while it lives.
#[cfg(target_arch = "x86_64")]
fn kernel_uprobe(so: &std::path::Path) -> Result<(libbpf_rs::Link, libbpf_rs::Object), String> {
    use libbpf_rs::{ObjectBuilder, UprobeOpts};
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    let obj_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uprobe.bpf.o");
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/programs/uprobe.bpf.c");
    let ok = std::process::Command::new("clang-19")
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-I/usr/include/x86_64-linux-gnu",
            "-c",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&obj_path)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("clang-19 with libbpf's headers is needed".into());
    }
    let object = ObjectBuilder::default()
        .open_file(&obj_path)
        .and_then(|o| o.load())
        .map_err(|e| e.to_string())?;
    let opts = UprobeOpts {
        func_name: Some("bn_target".into()),
        ..UprobeOpts::default()
    };
    let link = object
        .progs_mut()
        .find(|p| p.name() == "empty")
        .ok_or("no program `empty`")?
        .attach_uprobe_with_opts(0, so, 0, opts)
        .map_err(|e| e.to_string())?;
    Ok((link, object))
}

fn main() {
    tracing::run_started();
    let mut c = Criterion::default().configure_from_args();
    let Some((so, f)) = build() else { return };
    let site = NativeSite::at(f as usize).expect("the function has a patchable entry");
    let tracer = tracing::empty();
    let mut table: Vec<(String, f64)> = Vec::new();
    let mut group = c.benchmark_group("native");
    let setups: [(&str, &[AttachKind]); 3] = [
        ("native bare", &[]),
        ("native + empty fentry", &[AttachKind::Fentry]),
        ("native + empty fexit", &[AttachKind::Fexit]),
    ];
    for (name, kinds) in setups {
        let links: Vec<Link> = kinds
            .iter()
            // SAFETY: bn_target takes and returns integers; its object stays loaded.
            .map(|k| unsafe { attach_native(*k, &site, &tracer, 0) }.expect("attaches"))
            .collect();
        group.bench_function(name, |b| {
            let mut i = 0i64;
            b.iter(|| {
                i += 1;
                f(black_box(i), 1)
            })
        });
        let ns = tracing::criterion_median_ns("native", name).unwrap_or_else(|| ns_per_call(f));
        table.push((name.into(), ns));
        drop(links);
    }
    // Attach and detach latency on the native site: the first link pokes the site to its stub,
    // a second one only swaps the stub's record (plus a membarrier).
    let timed = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64() * 1e6
    };
    let (mut first, mut second, mut detach) = (0.0, 0.0, 0.0);
    const CYCLES: u32 = 200;
    for _ in 0..CYCLES {
        let mut links = Vec::new();
        // SAFETY: as above.
        first += timed(&mut || {
            links.push(unsafe { attach_native(AttachKind::Fentry, &site, &tracer, 0) }.unwrap())
        });
        second += timed(&mut || {
            links.push(unsafe { attach_native(AttachKind::Fexit, &site, &tracer, 0) }.unwrap())
        });
        detach += timed(&mut || drop(std::mem::take(&mut links)));
    }
    let latency = [
        ("attach, first link (image + poke)", first),
        ("attach, second link (image + record swap)", second),
        ("detach both (record swap, poke back, retire)", detach),
    ];
    // livebpf's fentry on a BPF program, for scale.
    let prog = tracing::target();
    let bare_prog = tracing::ns_per_call(&prog);
    let link = attach(AttachKind::Fentry, &prog, &tracer, 0).expect("attaches");
    let fentry_prog = tracing::ns_per_call(&prog);
    drop(link);
    reclaim::flush().expect("flush outside a run");
    #[cfg(target_arch = "x86_64")]
    match kernel_uprobe(&so) {
        Ok(probe) => {
            group.bench_function("native + kernel uprobe (empty BPF)", |b| {
                let mut i = 0i64;
                b.iter(|| {
                    i += 1;
                    f(black_box(i), 1)
                })
            });
            let name = "native + kernel uprobe (empty BPF)";
            let ns = tracing::criterion_median_ns("native", name).unwrap_or_else(|| ns_per_call(f));
            table.push((name.into(), ns));
            drop(probe);
        }
        Err(why) => eprintln!("!! SKIPPED: the kernel uprobe ({why})"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = so;
    group.finish();
    c.final_summary();
    let bare = table[0].1;
    println!(
        "\nnative function tracing (ns per call, criterion's medians; added cost in native calls):"
    );
    for (name, ns) in &table {
        println!(
            "  {name:38} {ns:8.2} ns  (+{:7.2} ns = {:6.1} native calls)",
            ns - bare,
            (ns - bare) / bare
        );
    }
    println!(
        "  for scale: a BPF program's empty fentry adds {:.2} ns ({:.2} → {:.2} ns per run, quick timing)",
        fentry_prog - bare_prog,
        bare_prog,
        fentry_prog
    );
    println!("  goals (issue 11): fentry ≤ 2.5 native calls, fexit ≤ 3.5");
    for (name, total) in latency {
        println!("  {name:46} {:8.1} µs", total / f64::from(CYCLES));
    }
}
