//! C shared objects with patchable entries for the native-attach tests: compiled here with the
//! host's compiler (clang-19 on x86-64, Debian's aarch64 cross gcc with branch protection for
//! arm64 under qemu) and loaded into the test process, never unloaded. Without the compiler a
//! case is skipped loudly, unless `LIVEBPF_REQUIRE_CLANG=1` (CI).
#![allow(dead_code)]

use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;

/// The host's compiler and the flags that give a native site.
#[cfg(target_arch = "x86_64")]
pub const CC: &[&str] = &["clang-19", "-fpatchable-function-entry=5"];
/// The host's compiler and the flags that give a native site.
#[cfg(target_arch = "aarch64")]
pub const CC: &[&str] = &[
    "aarch64-linux-gnu-gcc",
    "-fpatchable-function-entry=2",
    "-mbranch-protection=standard",
];

/// A loaded shared object.
pub struct Lib {
    handle: *mut libc::c_void,
    path: PathBuf,
}

// SAFETY: a dlopen handle may be used from any thread.
unsafe impl Send for Lib {}
// SAFETY: as above; `dlsym` is thread-safe.
unsafe impl Sync for Lib {}

impl Lib {
    /// The object's file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The address of `name` in it.
    pub fn sym(&self, name: &str) -> usize {
        let sym = CString::new(name).unwrap();
        // SAFETY: a valid handle and name.
        let addr = unsafe { libc::dlsym(self.handle, sym.as_ptr()) } as usize;
        assert_ne!(addr, 0, "dlsym {name}");
        addr
    }
}

/// Compiles `source` into `lib<name>.so` with `compile` (compiler then flags) and loads it;
/// `None` when the compiler does not run. gcc's `-mnop-mcount` refuses `-fPIC`: with it, the
/// object is compiled without and then linked.
pub fn build(name: &str, source: &str, compile: &[&str]) -> Option<Lib> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("native-attach");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let so = dir.join(format!("lib{name}.so"));
    let obj = dir.join(format!("{name}.o"));
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(compile[0])
            .args(&compile[1..])
            .args(args)
            .output()
            .map(|o| {
                assert!(
                    o.status.success(),
                    "{compile:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                )
            })
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let built = if compile.contains(&"-mnop-mcount") {
        run(&[
            os("-O2"),
            os("-fno-pic"),
            os("-c"),
            os("-o"),
            obj.as_os_str(),
            src.as_os_str(),
        ])
        .and_then(|()| run(&[os("-shared"), os("-o"), so.as_os_str(), obj.as_os_str()]))
    } else {
        run(&[
            os("-O2"),
            os("-fPIC"),
            os("-shared"),
            os("-o"),
            so.as_os_str(),
            src.as_os_str(),
        ])
    };
    if built.is_err() {
        if std::env::var("LIVEBPF_REQUIRE_CLANG").as_deref() == Ok("1") {
            panic!("LIVEBPF_REQUIRE_CLANG=1 but {} does not run", compile[0]);
        }
        eprintln!("!! WARNING: {} not found: {name} SKIPPED !!", compile[0]);
        return None;
    }
    let path = CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: our own object, without constructors; never dlclosed.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null(), "dlopen {so:?}");
    Some(Lib { handle, path: so })
}

/// Calls the library function at `f`, a `long f(long, long)`.
pub fn call2(f: usize, a: i64, b: i64) -> i64 {
    // SAFETY: the libraries built here keep that signature and are never unloaded.
    unsafe { std::mem::transmute::<usize, extern "C" fn(i64, i64) -> i64>(f)(a, b) }
}
