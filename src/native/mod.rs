//! Native patch sites: the entries of the host process's own functions that were compiled to be
//! rewritten while threads run them, found by address or by symbol name and validated before
//! anything is written. [`crate::trampoline::attach_native`] attaches tracing programs to them.
//!
//! # What a site must look like
//! * **x86-64**: exactly one 5-byte nop (`0f 1f 44 00 xx`, `nopl disp8(%rax,%rax,1)`: gcc writes
//!   displacement 0, clang 8) at the function's entry, after an
//!   `endbr64` when the code was built with `-fcf-protection`. clang's
//!   `-fpatchable-function-entry=5` and gcc's `-pg -mfentry -mnop-mcount` emit it. gcc's
//!   `-fpatchable-function-entry=5` emits five 1-byte nops instead: a thread may have executed
//!   some of them and be about to execute the rest, so no write can replace them with one
//!   instruction while the function may run — [`NativeError::OneByteNops`] says which flags
//!   to use.
//! * **arm64**: two `nop`s at the entry (`-fpatchable-function-entry=2`), after a `bti c` when
//!   built with branch protection. Only `B`, `BL` and `NOP` may replace each other under running
//!   threads (the Arm ARM's concurrent modification rule), so the site is the first `nop`: a
//!   `b` there reaches a per-site stub without touching the link register, and the second
//!   `nop` stays as it is.
//!
//! # Finding functions
//! [`NativeSite::find`] looks a function symbol up in the running executable and every shared
//! object loaded now (`dl_iterate_phdr(3)`), reading their ELF symbol tables (`.symtab`, then
//! `.dynsym`) from the files they were loaded from; [`NativeSite::at`] takes an address (from a
//! function pointer, `dlsym(3)`). Either way the bytes are read only after the address was
//! found inside an executable segment of a loaded object, so a wrong address is an error, never
//! a crash.

use std::ffi::{CStr, OsStr};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol, SymbolKind};

#[cfg(target_arch = "aarch64")]
use crate::text::poke::encode_a64;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::text::poke::{PokeError, PokeInsn, PokeOutcome};
#[cfg(target_arch = "x86_64")]
use crate::text::poke::{X86_NOP5_HEAD, encode_x86};

/// Why a native site could not be found or used. Nothing was written in any case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NativeError {
    /// No loaded object defines a function of that name.
    #[error(
        "no function named `{name}` in the executable or its loaded shared objects; check the spelling (C names are not mangled), that the object is loaded (dlopen) and that the symbol is not stripped"
    )]
    SymbolNotFound {
        /// The name looked up.
        name: String,
    },
    /// The address is not inside an executable segment of a loaded object.
    #[error(
        "{addr:#x} is not code of the executable or of a loaded shared object; pass the address of a function (a function pointer or dlsym)"
    )]
    NotCode {
        /// The address given.
        addr: usize,
    },
    /// x86-64: five 1-byte nops, which cannot be rewritten while a thread may be between them.
    #[error(
        "the function at {addr:#x} starts with five 1-byte nops (gcc's -fpatchable-function-entry=5): a thread may be between two of them, so they cannot be replaced under running threads; build it with clang -fpatchable-function-entry=5, or with gcc -pg -mfentry -mnop-mcount, which emit one 5-byte nop"
    )]
    OneByteNops {
        /// The function's address.
        addr: usize,
    },
    /// The function has no patchable entry.
    #[error(
        "the function at {addr:#x} has no patchable entry (it starts with {bytes:02x?}); build it with {flags}"
    )]
    NoPatchableEntry {
        /// The function's address.
        addr: usize,
        /// The bytes found at its entry.
        bytes: Vec<u8>,
        /// The compiler flags that give this architecture's site.
        flags: &'static str,
    },
    /// The executable or a shared object could not be read to look a symbol up.
    #[error("reading the symbols of {path}: {reason}")]
    Symbols {
        /// The object's file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No free page within the site's branch reach for its entry stub.
    #[error(
        "no free page within the branch reach of the site at {site:#x} (±2 GiB on x86-64, ±128 MiB on arm64) for its entry stub; the address space around the object is full"
    )]
    NoStubSpace {
        /// The site.
        site: usize,
    },
    /// The stub's page could not be made executable.
    #[error("making a native site's entry stub executable failed: {reason}")]
    StubProtect {
        /// The system's error.
        reason: String,
    },
    /// Native sites exist only on x86-64 and arm64.
    #[error("native patch sites are supported on x86-64 and arm64 only, not on {0}")]
    UnsupportedHost(&'static str),
}

/// The flags that give a function this architecture's site.
#[cfg(target_arch = "x86_64")]
const FLAGS: &str = "clang -fpatchable-function-entry=5 (or gcc -pg -mfentry -mnop-mcount): one 5-byte nop at the entry";
#[cfg(not(target_arch = "x86_64"))]
const FLAGS: &str =
    "-fpatchable-function-entry=2 (two nops at the entry, after `bti c` with -mbranch-protection)";

#[cfg(target_arch = "x86_64")]
const X86_ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// arm64 `nop` and `bti c`.
#[cfg(target_arch = "aarch64")]
const A64_NOP: u32 = 0xd503_201f;
#[cfg(target_arch = "aarch64")]
const A64_BTI_C: u32 = 0xd503_245f;

/// A validated patchable entry of a native function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeSite {
    function: usize,
    site: usize,
    landing_pad: bool,
    original: Vec<u8>,
    object: PathBuf,
}

impl NativeSite {
    /// The site of the function at `function`, after checking that the address is code of a
    /// loaded object and that the function starts with this architecture's patchable entry.
    pub fn at(function: usize) -> Result<NativeSite, NativeError> {
        let objects = loaded_objects();
        let (object, segment) = objects
            .iter()
            .find_map(|o| Some((o, o.exec.iter().find(|r| r.contains(&function))?)))
            .ok_or(NativeError::NotCode { addr: function })?;
        // Never read past the segment: a function at its very end is not a site.
        let available = segment.end - function;
        let len = ENTRY_BYTES.min(available);
        // Through /proc/self/mem, not a pointer: another thread may unload the object meanwhile,
        // and then the read fails instead of faulting.
        let mut bytes = vec![0u8; len];
        if !crate::text::poke::read_own_memory(function, &mut bytes) {
            return Err(NativeError::NotCode { addr: function });
        }
        let (offset, landing_pad) = classify(function, &bytes)?;
        Ok(NativeSite {
            function,
            site: function + offset,
            landing_pad,
            original: bytes[offset..offset + SITE_LEN].to_vec(),
            object: object.path.clone(),
        })
    }

    /// The site of the function named `name` in the executable or a loaded shared object (the
    /// first object defining it, in load order: the executable first).
    pub fn find(name: &str) -> Result<NativeSite, NativeError> {
        let addr = find_function(name)?.ok_or_else(|| NativeError::SymbolNotFound {
            name: name.to_string(),
        })?;
        NativeSite::at(addr)
    }

    /// The function's address.
    pub fn function(&self) -> usize {
        self.function
    }

    /// The address of the instruction a poke rewrites: the 5-byte nop on x86-64, the first
    /// `nop` on arm64.
    pub fn site(&self) -> usize {
        self.site
    }

    /// The site's bytes as found: what a detach must leave there.
    pub fn original(&self) -> &[u8] {
        &self.original
    }

    /// Whether the entry starts with a branch-target landing pad (`endbr64`, `bti c`) before the
    /// site.
    pub fn has_landing_pad(&self) -> bool {
        self.landing_pad
    }

    /// The file of the object the function is in (the executable's own path for its functions).
    pub fn object(&self) -> &Path {
        &self.object
    }

    /// Rewrites the site from `old` to `new` while other threads may be running the function:
    /// the int3 protocol of [`crate::text::poke`], writing through `/proc/self/mem` (native text
    /// is file-backed and has no writable alias). The site must hold `old` (else
    /// [`PokeError::NotASite`] with what it holds, and nothing is written); holding `new`
    /// already gives [`PokeOutcome::AlreadyApplied`]. Every thread runs `new` once this returns.
    /// The building block beneath attaching trampolines to native functions. At most 64 native
    /// sites per process can be poked: the SIGTRAP handler keeps them
    /// all for the process's lifetime.
    ///
    /// # Safety
    /// * A `Jump` target is a function with this function's ABI, a `Call` target code that
    ///   returns to the instruction after the site with the argument registers preserved; either
    ///   stays mapped while the site can branch there, and is within ±2 GiB (else
    ///   [`PokeError::OutOfRange`]).
    /// * The function's object is never unloaded once its site was poked.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn poke(&self, old: NativeInsn, new: NativeInsn) -> Result<PokeOutcome, PokeError> {
        let bytes = |insn: NativeInsn| -> Result<[u8; 5], PokeError> {
            match insn {
                NativeInsn::Original => Ok(self
                    .original
                    .as_slice()
                    .try_into()
                    .expect("an x86-64 site is 5 bytes")),
                NativeInsn::Jump(t) => encode_x86(self.site, PokeInsn::Jump(t)),
                NativeInsn::Call(t) => encode_x86(self.site, PokeInsn::Call(t)),
            }
        };
        let insn = match new {
            NativeInsn::Original => PokeInsn::Nop,
            NativeInsn::Jump(t) => PokeInsn::Jump(t),
            NativeInsn::Call(t) => PokeInsn::Call(t),
        };
        let (old_bytes, new_bytes) = (bytes(old)?, bytes(new)?);
        // SAFETY: forwarded from the caller; the site was validated as this function's entry nop.
        unsafe { crate::text::poke::native_text_poke(self.site, old_bytes, insn, new_bytes) }
    }

    /// arm64: as on x86-64, one aligned 32-bit store of `nop` or `b` (see the x86-64 version's
    /// documentation). A `Call` would be a `bl`, which overwrites the link register the
    /// function returns through, so it is refused ([`PokeError::NativeWrite`]).
    ///
    /// # Safety
    /// As on x86-64, with ±128 MiB for the jump's reach.
    #[cfg(target_arch = "aarch64")]
    pub unsafe fn poke(&self, old: NativeInsn, new: NativeInsn) -> Result<PokeOutcome, PokeError> {
        let word = |insn: NativeInsn| -> Result<u32, PokeError> {
            match insn {
                NativeInsn::Original => Ok(u32::from_le_bytes(
                    self.original
                        .as_slice()
                        .try_into()
                        .expect("an arm64 site is 4 bytes"),
                )),
                NativeInsn::Jump(t) => encode_a64(self.site, PokeInsn::Jump(t)),
                NativeInsn::Call(_) => Err(PokeError::NativeWrite {
                    ip: self.site,
                    reason: "a call (bl) at an arm64 native entry would overwrite the link register the function returns through; jump instead".into(),
                }),
            }
        };
        let (old_word, new_word) = (word(old)?, word(new)?);
        // SAFETY: forwarded from the caller; the site was validated as this function's entry nop.
        unsafe { crate::text::poke::native_text_poke(self.site, old_word, new_word) }
    }
}

/// What [`NativeSite::poke`] writes at a native site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NativeInsn {
    /// The nop the function was built with, exactly as found.
    Original,
    /// A jump to an absolute address (the function's callers then run that code instead).
    Jump(usize),
    /// A call to an absolute address, which returns to the function's body.
    Call(usize),
}

/// Bytes of the instruction a poke rewrites.
#[cfg(target_arch = "x86_64")]
const SITE_LEN: usize = 5;
#[cfg(not(target_arch = "x86_64"))]
const SITE_LEN: usize = 4;

/// Other hosts have no sites.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn classify(_addr: usize, _bytes: &[u8]) -> Result<(usize, bool), NativeError> {
    Err(NativeError::UnsupportedHost(std::env::consts::ARCH))
}

/// How many entry bytes the checks read.
const ENTRY_BYTES: usize = 12;

/// The site's offset in the entry `bytes`, and whether a landing pad precedes it.
#[cfg(target_arch = "x86_64")]
fn classify(addr: usize, bytes: &[u8]) -> Result<(usize, bool), NativeError> {
    let (pad, rest) = match bytes.strip_prefix(&X86_ENDBR64) {
        Some(rest) => (X86_ENDBR64.len(), rest),
        None => (0, bytes),
    };
    if rest.len() >= 5 && rest.starts_with(&X86_NOP5_HEAD) {
        return Ok((pad, pad != 0));
    }
    if rest.starts_with(&[0x90; 5]) {
        return Err(NativeError::OneByteNops { addr });
    }
    Err(NativeError::NoPatchableEntry {
        addr,
        bytes: bytes[..bytes.len().min(8)].to_vec(),
        flags: FLAGS,
    })
}

/// The site's offset in the entry `bytes`, and whether a landing pad precedes it.
#[cfg(target_arch = "aarch64")]
fn classify(addr: usize, bytes: &[u8]) -> Result<(usize, bool), NativeError> {
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect();
    let pad = usize::from(words.first() == Some(&A64_BTI_C));
    if words.len() >= pad + 2 && words[pad] == A64_NOP && words[pad + 1] == A64_NOP {
        return Ok((4 * pad, pad != 0));
    }
    Err(NativeError::NoPatchableEntry {
        addr,
        bytes: bytes[..bytes.len().min(8)].to_vec(),
        flags: FLAGS,
    })
}

/// An object loaded in this process: its file, load bias and executable segments.
struct Loaded {
    path: PathBuf,
    bias: usize,
    exec: Vec<Range<usize>>,
}

/// Every object loaded now, the executable first.
fn loaded_objects() -> Vec<Loaded> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `dl_iterate_phdr` passes a valid `dl_phdr_info` and our `data`, a
        // `Vec<Loaded>` that nothing else borrows during the call.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<Loaded>)) };
        let name = if info.dlpi_name.is_null() {
            &[][..]
        } else {
            // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        let path = if name.is_empty() {
            // The executable (and the vDSO, which has a name of its own) has an empty name.
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
        } else {
            PathBuf::from(OsStr::from_bytes(name))
        };
        let bias = info.dlpi_addr as usize;
        let phdrs = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: the loader's program headers of this object, `dlpi_phnum` of them.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let exec = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0)
            .map(|p| {
                let start = bias.wrapping_add(p.p_vaddr as usize);
                start..start + p.p_memsz as usize
            })
            .collect();
        out.push(Loaded { path, bias, exec });
        0
    }
    let mut out: Vec<Loaded> = Vec::new();
    // SAFETY: `each` matches the callback type and only touches `out` through `data`.
    unsafe { libc::dl_iterate_phdr(Some(each), (&mut out as *mut Vec<Loaded>).cast()) };
    out
}

/// The address of the function `name` in the first loaded object that defines it.
fn find_function(name: &str) -> Result<Option<usize>, NativeError> {
    for object in loaded_objects() {
        if object.exec.is_empty() || !object.path.is_file() {
            continue; // the vDSO, or an object whose file is gone
        }
        let data = std::fs::read(&object.path).map_err(|e| NativeError::Symbols {
            path: object.path.clone(),
            reason: e.to_string(),
        })?;
        let file = object::File::parse(&*data).map_err(|e| NativeError::Symbols {
            path: object.path.clone(),
            reason: e.to_string(),
        })?;
        let defined = |s: &object::Symbol<'_, '_>| {
            s.kind() == SymbolKind::Text && !s.is_undefined() && s.name() == Ok(name)
        };
        let symbol = file
            .symbols()
            .find(|s| defined(s))
            .or_else(|| file.dynamic_symbols().find(|s| defined(s)));
        if let Some(symbol) = symbol {
            return Ok(Some(object.bias.wrapping_add(symbol.address() as usize)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rust_function_is_code_but_not_a_site() {
        let addr = a_rust_function_is_code_but_not_a_site as *const () as usize;
        match NativeSite::at(addr) {
            Err(NativeError::NoPatchableEntry { addr: a, flags, .. }) => {
                assert_eq!(a, addr);
                assert!(flags.contains("patchable-function-entry"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_and_unmapped_addresses_are_not_code() {
        // Writable data (read-only data may share the text's segment, as on arm64).
        static DATA: [std::sync::atomic::AtomicU8; 16] =
            [const { std::sync::atomic::AtomicU8::new(0x90) }; 16];
        for addr in [DATA.as_ptr() as usize, 0, 16, usize::MAX - 4] {
            assert_eq!(NativeSite::at(addr), Err(NativeError::NotCode { addr }));
        }
    }

    #[test]
    fn an_unknown_symbol_is_named() {
        let err = NativeSite::find("livebpf_no_such_function_anywhere").unwrap_err();
        assert!(
            err.to_string()
                .contains("livebpf_no_such_function_anywhere")
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_entries_are_classified() {
        let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55, 0x48, 0x89];
        assert_eq!(classify(1, &nop5), Ok((0, false)));
        // clang's displacement.
        assert_eq!(
            classify(1, &[0x0f, 0x1f, 0x44, 0x00, 0x08, 0xc3]),
            Ok((0, false))
        );
        let mut endbr = X86_ENDBR64.to_vec();
        endbr.extend_from_slice(&nop5);
        assert_eq!(classify(1, &endbr), Ok((4, true)));
        assert_eq!(
            classify(1, &[0x90, 0x90, 0x90, 0x90, 0x90, 0x55]),
            Err(NativeError::OneByteNops { addr: 1 })
        );
        assert!(matches!(
            classify(1, &[0x55, 0x48]),
            Err(NativeError::NoPatchableEntry { .. })
        ));
        assert!(matches!(
            classify(1, &[0x0f, 0x1f, 0x44]),
            Err(NativeError::NoPatchableEntry { .. })
        ));
    }
}
