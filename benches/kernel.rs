//! The kernel next to livebpf, in one run: ns per run of the same clang-compiled object on the
//! same packet under the kernel's `BPF_PROG_TEST_RUN` and under livebpf's interpreter, checked
//! JIT and trusted JIT (`livebpf::runtime`, one frame reused as the kernel reuses its buffer),
//! and hash map lookup and update per op inside the kernel next to livebpf's (measured as
//! `benches/maps.rs` does). A table of ratios follows criterion's output.
//!
//! Criterion cannot time the kernel's loop, so the kernel benches use `iter_custom` with the
//! kernel's own reported mean duration per repetition (whole nanoseconds) × iterations. The
//! kernel's map cost per op is (a program doing `LOOPS` lookups in a `bpf_loop` − the same loop
//! without the lookup) / `LOOPS`, so the loop and the program run are not counted.
//!
//! The trusted JIT runs only objects the kernel's verifier accepted (loaded here first). Needs
//! root, clang-19 (or clang) and libbpf's headers; without them it says so and measures what it
//! can. `cargo bench --bench kernel`.

#[allow(dead_code)]
#[path = "../tests/common/kernel.rs"]
mod kernel;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kernel::{KernelError, Loaded};
use livebpf::maps::{BPF_ANY, BPF_EXIST, Map, MapSpec, MapType};
use livebpf::reclaim::ReadGuard;
use livebpf::runtime::{self, LoadOptions, LoadedProgram, RuntimeError, XdpFrame};

/// A 47-byte UDP datagram from 10.0.0.1:1000 to 10.0.0.2:2000 (tests/kernel_diff.rs builds it).
const UDP_PACKET: &str = "02000000000b02000000000a08004500002112344000401114960a0000010a000002\
                          03e807d0000d9c4768656c6c6f";
/// Map operations per run of the map programs (`LOOPS` in kernel_maps.c).
const LOOPS: u64 = 1024;
const ENTRIES: u32 = 1024;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `src` (relative to the crate) compiled with clang; `None` after a loud message without it.
fn compile(src: &str) -> Option<PathBuf> {
    let clang = ["clang-19", "clang"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(clang) = clang else {
        eprintln!(
            "!! SKIPPED: the kernel benches need clang-19 or clang (apt-get install clang-19)"
        );
        return None;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(src.file_stem().unwrap())
        .with_extension("o");
    let o = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf"])
        .args([
            "-I/usr/include/x86_64-linux-gnu",
            "-I/usr/include/aarch64-linux-gnu",
            "-c",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("clang starts");
    assert!(
        o.status.success(),
        "{}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(out)
}

/// The objects, loaded into the kernel; `None` after a loud message where it cannot run BPF.
struct Kernel {
    parse: Loaded,
    count: Loaded,
    maps: Loaded,
}

/// The programs benchmarked on both sides: (label, object source, program).
const PROGRAMS: [(&str, &str, &str); 2] = [
    ("parse", "tests/bpf/diff/parse.c", "parse"),
    ("hash_count", "tests/bpf/diff/hash_count.c", "hash_count"),
];

/// A livebpf engine.
#[derive(Clone, Copy, PartialEq)]
enum Engine {
    Interp,
    Jit,
    /// Only for objects the kernel's verifier accepted.
    Trusted,
}

impl Engine {
    const ALL: [Engine; 3] = [Engine::Interp, Engine::Jit, Engine::Trusted];

    fn name(self) -> &'static str {
        match self {
            Engine::Interp => "interp",
            Engine::Jit => "jit",
            Engine::Trusted => "jit-trusted",
        }
    }
}

/// An object loaded into livebpf, and whether the kernel verified it (which the trusted JIT
/// needs).
struct Ours {
    loaded: runtime::Loaded,
    prog: &'static str,
    verified: bool,
}

impl Ours {
    fn load(src: &str, prog: &'static str, verified: bool) -> Option<Ours> {
        let obj = compile(src)?;
        let loaded = runtime::Loaded::from_file(&obj, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{src}: {e}"));
        Some(Ours {
            loaded,
            prog,
            verified,
        })
    }

    fn program(&self) -> &LoadedProgram {
        self.loaded.program(self.prog).unwrap()
    }

    /// One run on `frame`; `None` for the trusted JIT on an object the kernel did not verify.
    fn run(&self, engine: Engine, frame: &XdpFrame) -> Option<Result<u32, RuntimeError>> {
        let p = self.program();
        Some(match engine {
            Engine::Interp => p.run_frame(runtime::Engine::Interpreter, frame),
            Engine::Jit => p.run_frame(runtime::Engine::Jit, frame),
            Engine::Trusted if self.verified => {
                // SAFETY: the kernel's verifier accepted this object (`verified`).
                unsafe { p.run_frame_trusted(frame) }
            }
            Engine::Trusted => return None,
        })
    }

    /// Whether `engine` runs the program on `packet`, twice (a second run may take another
    /// path: hash_count's first run inserts, later ones update in place); if not, says why.
    fn works(&self, engine: Engine, packet: &[u8]) -> bool {
        let frame = XdpFrame::new(packet).unwrap();
        for _ in 0..2 {
            match self.run(engine, &frame) {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("!! livebpf {} cannot run {}: {e}", engine.name(), self.prog);
                    return false;
                }
                None => return false,
            }
        }
        true
    }

    /// One run that `works` showed succeeds.
    fn run_ok(&self, engine: Engine, frame: &XdpFrame) -> u32 {
        match self.run(engine, frame) {
            Some(Ok(r)) => r,
            Some(Err(e)) => panic!("livebpf {} on {}: {e}", engine.name(), self.prog),
            None => panic!("{} is not verified", self.prog),
        }
    }

    /// Wall-clock ns per run over `n` runs on one frame (as the kernel reuses its buffer).
    fn ns(&self, engine: Engine, packet: &[u8], n: u64) -> Option<f64> {
        if !self.works(engine, packet) {
            return None;
        }
        let frame = XdpFrame::new(packet).unwrap();
        let t = Instant::now();
        for _ in 0..n {
            black_box(self.run_ok(engine, &frame));
        }
        Some(t.elapsed().as_nanos() as f64 / n as f64)
    }
}

fn load_kernel() -> Option<Kernel> {
    let (parse, count, maps) = (
        compile("tests/bpf/diff/parse.c")?,
        compile("tests/bpf/diff/hash_count.c")?,
        compile("benches/programs/kernel_maps.c")?,
    );
    let load = |p: &Path| match Loaded::open(p) {
        Ok(l) => Some(l),
        Err(KernelError::Unavailable(r)) => {
            kernel::skip("the kernel benches", &r);
            None
        }
        Err(e) => panic!("{e}"),
    };
    let k = Kernel {
        parse: load(&parse)?,
        count: load(&count)?,
        maps: load(&maps)?,
    };
    let filled = k.maps.test_run("fill", &unhex(UDP_PACKET), 1).unwrap();
    assert_eq!(u64::from(filled.retval), u64::from(ENTRIES), "fill");
    Some(k)
}

/// The kernel's mean ns per repetition of `prog` over `repeat` repetitions.
fn kernel_ns(l: &Loaded, prog: &str, packet: &[u8], repeat: u32) -> f64 {
    l.test_run(prog, packet, repeat)
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
        .duration
        .as_nanos() as f64
}

/// The kernel's time for `iters` runs, in chunks of at most 2^20 repetitions.
fn kernel_time(l: &Loaded, prog: &str, packet: &[u8], iters: u64) -> Duration {
    let mut left = iters;
    let mut total = 0f64;
    while left > 0 {
        let r = left.min(1 << 20);
        total += kernel_ns(l, prog, packet, r as u32) * r as f64;
        left -= r;
    }
    Duration::from_nanos(total as u64)
}

/// The kernel's ns per map operation of `prog` (lookups or updates), net of the loop.
fn kernel_map_op_ns(k: &Kernel, prog: &str, runs: u32) -> f64 {
    let p = unhex(UDP_PACKET);
    let op = kernel_ns(&k.maps, prog, &p, runs);
    let base = kernel_ns(&k.maps, "baseline", &p, runs);
    ((op - base) / LOOPS as f64).max(0.0)
}

fn filled_hash() -> Map {
    let map = Map::create(&MapSpec::new("bench", MapType::Hash, 4, 8, ENTRIES)).unwrap();
    for k in 0..ENTRIES {
        map.update(&k.to_ne_bytes(), &1u64.to_ne_bytes(), BPF_ANY)
            .unwrap();
    }
    map
}

fn keys() -> Vec<[u8; 4]> {
    (0..ENTRIES)
        .map(|k| (k * 7919 % ENTRIES).to_ne_bytes())
        .collect()
}

/// livebpf's hash lookup, ns per op, over `n` lookups (as benches/maps.rs measures it).
fn livebpf_lookup_ns(map: &Map, n: u64) -> f64 {
    let keys = keys();
    let _run = ReadGuard::new();
    let t = Instant::now();
    for i in 0..n {
        let k = &keys[(i % u64::from(ENTRIES)) as usize];
        // SAFETY: a 4-byte key; in a run (the guard above).
        black_box(unsafe { map.lookup_ptr(black_box(k.as_ptr())) });
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// livebpf's hash update of an existing key, ns per op.
fn livebpf_update_ns(map: &Map, n: u64) -> f64 {
    let keys = keys();
    let value = 42u64.to_ne_bytes();
    let t = Instant::now();
    for i in 0..n {
        let k = &keys[(i % u64::from(ENTRIES)) as usize];
        // SAFETY: a 4-byte key and an 8-byte value.
        let r = unsafe { map.update_elem(k.as_ptr(), value.as_ptr(), BPF_EXIST) };
        black_box(r);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    livebpf::maps::flush_retired();
    ns
}

fn bench(c: &mut Criterion) {
    let packet = unhex(UDP_PACKET);
    let hash = filled_hash();
    let keys = keys();
    {
        let _run = ReadGuard::new();
        let mut i = 0usize;
        c.bench_function("livebpf/hash_lookup", |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                // SAFETY: a 4-byte key; in a run.
                black_box(unsafe { hash.lookup_ptr(keys[i].as_ptr()) })
            })
        });
    }
    let value = 42u64.to_ne_bytes();
    let mut i = 0usize;
    c.bench_function("livebpf/hash_update_existing", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            // SAFETY: a 4-byte key, an 8-byte value.
            black_box(unsafe { hash.update_elem(keys[i].as_ptr(), value.as_ptr(), BPF_EXIST) })
        })
    });
    livebpf::maps::flush_retired();

    let k = load_kernel();
    for (label, src, prog) in PROGRAMS {
        let Some(ours) = Ours::load(src, prog, k.is_some()) else {
            break;
        };
        for engine in Engine::ALL {
            if !ours.works(engine, &packet) {
                continue;
            }
            let frame = XdpFrame::new(&packet).unwrap();
            c.bench_function(&format!("livebpf_{}/{label}_udp", engine.name()), |b| {
                b.iter(|| black_box(ours.run_ok(engine, &frame)))
            });
        }
    }
    let Some(k) = k else {
        return;
    };
    c.bench_function("kernel/parse_udp", |b| {
        b.iter_custom(|iters| kernel_time(&k.parse, "parse", &packet, iters))
    });
    c.bench_function("kernel/hash_count_udp", |b| {
        b.iter_custom(|iters| kernel_time(&k.count, "hash_count", &packet, iters))
    });
    for (name, prog) in [
        ("kernel/hash_lookup", "lookups"),
        ("kernel/hash_update_existing", "updates"),
    ] {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let runs = iters.div_ceil(LOOPS).clamp(1, 1 << 16) as u32;
                Duration::from_nanos((kernel_map_op_ns(&k, prog, runs) * iters as f64) as u64)
            })
        });
    }
}

/// The side-by-side table, printed after criterion's runs.
fn summary(_: &mut Criterion) {
    let packet = unhex(UDP_PACKET);
    let hash = filled_hash();
    let (lookup, update) = (
        livebpf_lookup_ns(&hash, 4_000_000),
        livebpf_update_ns(&hash, 4_000_000),
    );
    println!("\nkernel vs livebpf, ns (kernel: BPF_PROG_TEST_RUN's reported duration)");
    let k = load_kernel();
    const RUNS: u64 = 1_000_000;
    for (label, src, prog) in PROGRAMS {
        let Some(ours) = Ours::load(src, prog, k.is_some()) else {
            break;
        };
        let kernel = k.as_ref().map(|k| {
            let l = if label == "parse" { &k.parse } else { &k.count };
            kernel_ns(l, prog, &packet, RUNS as u32)
        });
        let mut line = format!("  {:<34}", format!("{label}.o, UDP packet, per run"));
        match kernel {
            Some(ns) => line += &format!(" kernel {ns:>6.1}"),
            None => line += " kernel      -",
        }
        for engine in Engine::ALL {
            match ours.ns(engine, &packet, RUNS) {
                Some(ns) => {
                    line += &format!("   {} {ns:>6.1}", engine.name());
                    if let Some(kn) = kernel {
                        line += &format!(" ({:.2}x)", ns / kn);
                    }
                }
                None => line += &format!("   {} -", engine.name()),
            }
        }
        println!("{line}");
    }
    let row = |what: &str, kernel: Option<f64>, ours: f64| match kernel {
        Some(kernel) => println!(
            "  {what:<34} kernel {kernel:>6.1}   livebpf {ours:>6.1}   livebpf/kernel {:.2}",
            ours / kernel
        ),
        None => println!("  {what:<34} kernel      -   livebpf {ours:>6.1}"),
    };
    row(
        "hash lookup (1024 entries), per op",
        k.as_ref().map(|k| kernel_map_op_ns(k, "lookups", 4000)),
        lookup,
    );
    row(
        "hash update existing, per op",
        k.as_ref().map(|k| kernel_map_op_ns(k, "updates", 4000)),
        update,
    );
    println!("  (x: livebpf / kernel; -: not measured, see the messages above)");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench, summary
}
criterion_main!(benches);
