//! The Linux kernel as an oracle: loads a clang-compiled object with real libbpf (through
//! libbpf-rs, an implementation independent of livebpf's loader), runs one program with
//! `BPF_PROG_TEST_RUN` on packets in order (maps persist across runs), and renders the result as
//! the same JSON value `livebpf run OBJ.o --json` prints:
//! `{"runs":[{"retval":N,"packet":"HEX"},...],"maps":{"NAME":{"KEYHEX":"VALHEX",...},...}}`.
//!
//! Where the kernel cannot be used (not root, `bpf()` refused with EPERM or missing), the calls
//! return [`KernelError::Unavailable`]; [`skip`] says so loudly, and fails instead when
//! `LIVEBPF_REQUIRE_KERNEL=1`. libbpf-rs is a dev-dependency on x86-64 Linux only (libbpf-sys
//! builds libbpf from C against the host's libelf, which the arm64 cross run under qemu-user does
//! not have, and qemu-user has no `bpf()` anyway): elsewhere everything is unavailable.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Why a kernel run did not happen.
#[derive(Debug)]
pub enum KernelError {
    /// This machine cannot run BPF in the kernel: the differential test is skipped.
    Unavailable(String),
    /// The kernel could be used but refused the object or the run: a real failure.
    Failed(String),
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::Unavailable(r) => write!(f, "kernel BPF unavailable: {r}"),
            KernelError::Failed(r) => write!(f, "kernel BPF failed: {r}"),
        }
    }
}

/// Whether a skip must fail the test instead (`.ci/run` sets this when it runs as root).
pub fn required() -> bool {
    std::env::var("LIVEBPF_REQUIRE_KERNEL").as_deref() == Ok("1")
}

/// Reports a skip loudly, or panics when the kernel is required.
pub fn skip(what: &str, reason: &str) {
    assert!(
        !required(),
        "LIVEBPF_REQUIRE_KERNEL=1 but the kernel cannot run BPF ({what}): {reason}"
    );
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!! SKIPPED: {what}: the kernel cannot run BPF here: {reason}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
}

/// Lowercase hex, as the CLI prints bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One `BPF_PROG_TEST_RUN`.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's return value.
    pub retval: u32,
    /// The packet after the run (after any head or tail adjustment).
    pub packet: Vec<u8>,
    /// The kernel's reported mean duration of one repetition.
    pub duration: Duration,
}

/// Loads `obj`, runs `prog` on each packet in order, and returns the CLI's JSON value.
pub fn run(obj: &Path, prog: &str, packets: &[Vec<u8>]) -> Result<Value, KernelError> {
    let loaded = Loaded::open(obj)?;
    let runs = packets
        .iter()
        .map(|p| {
            let r = loaded.test_run(prog, p, 1)?;
            Ok(serde_json::json!({"retval": r.retval, "packet": hex(&r.packet)}))
        })
        .collect::<Result<Vec<_>, KernelError>>()?;
    Ok(serde_json::json!({"runs": runs, "maps": loaded.maps_json()?}))
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use imp::Loaded;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::path::Path;

    use libbpf_rs::{ErrorKind, MapCore, MapFlags, MapType, ObjectBuilder};
    use serde_json::{Map as JsonMap, Value};

    use super::{KernelError, Run, hex};

    /// Room for the packet to grow (`bpf_xdp_adjust_head` with a negative delta).
    const OUT_SLACK: usize = 512;

    /// An object loaded into the kernel: its maps live as long as this.
    pub struct Loaded {
        obj: libbpf_rs::Object,
    }

    fn unavailable_kind(kind: ErrorKind) -> bool {
        matches!(kind, ErrorKind::PermissionDenied | ErrorKind::Unsupported)
    }

    /// Root, and a `bpf()` that creates a map.
    fn probe() -> Result<(), KernelError> {
        if !rustix::process::geteuid().is_root() {
            return Err(KernelError::Unavailable("not root".into()));
        }
        let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        match libbpf_rs::MapHandle::create(MapType::Array, Some("probe"), 4, 4, 1, &opts) {
            Ok(_) => Ok(()),
            Err(e) if unavailable_kind(e.kind()) => Err(KernelError::Unavailable(format!(
                "bpf(BPF_MAP_CREATE) fails: {e}"
            ))),
            Err(e) => Err(KernelError::Failed(format!("bpf(BPF_MAP_CREATE): {e}"))),
        }
    }

    /// Pins the calling thread to the CPU it is on, so every run of a test updates the same
    /// per-CPU slot (and child processes, which inherit the mask, stay there too).
    fn pin() -> Result<(), KernelError> {
        let mut set = rustix::thread::CpuSet::new();
        set.set(rustix::thread::sched_getcpu());
        rustix::thread::sched_setaffinity(None, &set)
            .map_err(|e| KernelError::Failed(format!("sched_setaffinity: {e}")))
    }

    /// libbpf names global data maps `<object name prefix>.bss`; the CLI prints `.bss`. Names
    /// of maps declared in C have no dot.
    fn cli_name(libbpf_name: &str) -> &str {
        libbpf_name
            .find('.')
            .map_or(libbpf_name, |dot| &libbpf_name[dot..])
    }

    impl Loaded {
        /// Opens and loads `path` (libbpf creates the maps, fills global data and prog_array
        /// slots, and the verifier checks every program).
        pub fn open(path: &Path) -> Result<Loaded, KernelError> {
            probe()?;
            pin()?;
            let open = ObjectBuilder::default()
                .open_file(path)
                .map_err(|e| KernelError::Failed(format!("open {}: {e}", path.display())))?;
            let obj = open.load().map_err(|e| {
                KernelError::Failed(format!(
                    "load {} (libbpf printed the verifier log above): {e}",
                    path.display()
                ))
            })?;
            Ok(Loaded { obj })
        }

        /// Runs `prog` on `packet`, `repeat` times (the kernel runs the same buffer each time:
        /// a rewriting program sees its own output), after pinning this thread.
        pub fn test_run(&self, prog: &str, packet: &[u8], repeat: u32) -> Result<Run, KernelError> {
            pin()?;
            let p = self
                .obj
                .progs_mut()
                .find(|p| p.name() == prog)
                .ok_or_else(|| KernelError::Failed(format!("no program {prog}")))?;
            let mut out = vec![0u8; packet.len() + OUT_SLACK];
            let input = libbpf_rs::ProgramInput {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            };
            let o = p.test_run(input).map_err(|e| {
                KernelError::Failed(format!("BPF_PROG_TEST_RUN {prog} on {}: {e}", hex(packet)))
            })?;
            Ok(Run {
                retval: o.return_value,
                packet: o.data.map(|d| d.to_vec()).unwrap_or_default(),
                duration: o.duration,
            })
        }

        /// Every map as the CLI prints it (see the module docs of `livebpf run`): hash and LRU
        /// hash maps' present keys, every array entry, per-CPU values as every possible CPU's
        /// value padded to 8 bytes and concatenated; prog_array and ringbuf maps left out.
        pub fn maps_json(&self) -> Result<Value, KernelError> {
            let mut maps = JsonMap::new();
            for m in self.obj.maps() {
                let name = m.name().to_string_lossy().into_owned();
                let failed = |e: libbpf_rs::Error| KernelError::Failed(format!("map {name}: {e}"));
                let per_cpu = match m.map_type() {
                    MapType::Hash | MapType::LruHash | MapType::Array => false,
                    MapType::PercpuArray | MapType::PercpuHash | MapType::LruPercpuHash => true,
                    MapType::ProgArray | MapType::RingBuf => continue,
                    t => return Err(KernelError::Failed(format!("map {name}: type {t:?}"))),
                };
                let mut entries = JsonMap::new();
                for key in m.keys() {
                    let value = if per_cpu {
                        m.lookup_percpu(&key, MapFlags::ANY)
                            .map_err(failed)?
                            .map(|cpus| {
                                cpus.iter()
                                    .flat_map(|v| {
                                        let mut v = v.clone();
                                        v.resize(v.len().div_ceil(8) * 8, 0);
                                        v
                                    })
                                    .collect::<Vec<u8>>()
                            })
                    } else {
                        m.lookup(&key, MapFlags::ANY).map_err(failed)?
                    };
                    // A key deleted between the walk and the lookup cannot happen here: no
                    // program runs meanwhile.
                    let value = value.ok_or_else(|| {
                        KernelError::Failed(format!("map {name}: key {} vanished", hex(&key)))
                    })?;
                    entries.insert(hex(&key), Value::String(hex(&value)));
                }
                maps.insert(cli_name(&name).to_string(), Value::Object(entries));
            }
            Ok(Value::Object(maps))
        }
    }
}

/// Everything is unavailable where libbpf-rs is not built (see the module docs).
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
pub struct Loaded(());

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
impl Loaded {
    const WHY: &str = "the kernel oracle (libbpf-rs) is built on x86-64 Linux only";

    /// Unavailable.
    pub fn open(_path: &Path) -> Result<Loaded, KernelError> {
        Err(KernelError::Unavailable(Self::WHY.into()))
    }

    /// Unavailable.
    pub fn test_run(&self, _p: &str, _pk: &[u8], _r: u32) -> Result<Run, KernelError> {
        Err(KernelError::Unavailable(Self::WHY.into()))
    }

    /// Unavailable.
    pub fn maps_json(&self) -> Result<Value, KernelError> {
        Err(KernelError::Unavailable(Self::WHY.into()))
    }
}
