//! The arm64 backend: an A64 encoder ([`enc`]), a code generator that works on any host
//! ([`codegen`]), and (on arm64 hosts) placement of images in the code arena with their patch
//! site and PLT registered for [`crate::text::poke::text_poke`].
//!
//! # Function ABI of a compiled program
//!
//! ```text
//! extern "C" fn(r1: u64, r2: u64, r3: u64, r4: u64, r5: u64, ctx: *mut RunContext) -> u64
//! ```
//!
//! eBPF r1–r5 arrive in x0–x4 (AAPCS64), the [`super::RunContext`] in x5; r0 is returned in x0.
//! The code reads the context by the same `CTX_*` offsets as the x86-64 backend and calls the
//! same runtime function for slow paths and errors, so both give the interpreter's results.
//!
//! See [`codegen`] for the prologue, the PLT and the register mapping.

pub mod codegen;
pub mod enc;

pub use codegen::{
    Arm64Code, Arm64Options, BODY_OFFSET, BTI_INSNS, IMAGE_ALIGN, INSN_BYTES, PLT_BYTES,
    POKE_OFFSET, body_offset, bti_insns, generate, pac_insns, poke_offset,
};

/// Optional CPU features the arm64 JIT uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostFeatures {
    /// ARMv8.1 LSE atomics (`HWCAP_ATOMICS`).
    pub lse: bool,
    /// Branch Target Identification (`HWCAP2_BTI`): `PROT_BTI` pages are enforced.
    pub bti: bool,
    /// Pointer authentication with key A (`HWCAP_PACA`).
    pub pac: bool,
}

/// The features of this CPU, from the auxiliary vector (all false on other architectures).
pub fn host_features() -> HostFeatures {
    #[cfg(target_arch = "aarch64")]
    {
        const HWCAP_ATOMICS: u64 = 1 << 8;
        const HWCAP_PACA: u64 = 1 << 30;
        const HWCAP2_BTI: u64 = 1 << 17;
        // SAFETY: getauxval only reads the auxiliary vector; unknown keys return 0.
        let (hwcap, hwcap2) = unsafe {
            (
                libc::getauxval(libc::AT_HWCAP),
                libc::getauxval(libc::AT_HWCAP2),
            )
        };
        HostFeatures {
            lse: hwcap & HWCAP_ATOMICS != 0,
            bti: hwcap2 & HWCAP2_BTI != 0,
            pac: hwcap & HWCAP_PACA != 0,
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    HostFeatures::default()
}

#[cfg(target_arch = "aarch64")]
pub(crate) use place::place;

#[cfg(target_arch = "aarch64")]
mod place {
    use super::{Arm64Code, Arm64Options, IMAGE_ALIGN, generate, host_features};
    use crate::helpers::Helpers;
    use crate::isa::Program;
    use crate::jit::{JitError, JitOptions};
    use crate::text::poke::{ProgramSite, dummy_trampoline, register_program_site};
    use crate::text::{Allocation, CodeArena, ImageKind, Registry};

    /// A program image in the global arena, registered in the [`Registry`] and with the poker.
    #[derive(Debug)]
    pub(crate) struct Placed {
        pub(crate) image: Allocation,
        pub(crate) code: Arm64Code,
    }

    /// Generates `program` for this host and places it: allocate, write, register the image
    /// and its patch site / PLT. BTI is forced on when the arena maps text with `PROT_BTI`
    /// (the entry must be a landing pad there); LSE (by default: if the CPU has it) is forced
    /// off on CPUs without it.
    pub(crate) fn place(
        program: &Program,
        helpers: &Helpers,
        jit: JitOptions,
        owner: u64,
    ) -> Result<Placed, JitError> {
        let arena = CodeArena::global()?;
        let host_lse = host_features().lse;
        let opts = Arm64Options {
            checked: jit.is_checked(),
            budget: jit.budget().is_some(),
            bti: jit.bti() || arena.options().bti,
            pac: jit.pac(),
            lse: jit.lse().unwrap_or(host_lse) && host_lse,
            runtime_fn: crate::jit::runtime_call as *const () as u64,
            plt_target: dummy_trampoline()? as u64,
            // The caller keeps these helpers at this address as long as the image lives.
            helpers: helpers as *const Helpers as u64,
        };
        let code = generate(program, helpers, &opts)?;
        let image = arena.alloc(code.code.len(), IMAGE_ALIGN)?;
        let site = ProgramSite {
            site: code.patch_site,
            plt: code.plt,
            literal: code.plt_literal,
        };
        let registry = Registry::global();
        let placed = arena
            .write(&image, 0, &code.code)
            .map_err(JitError::from)
            .and_then(|()| {
                // SAFETY: the image is this program's code in the global arena, owned by the
                // JitProgram being built, which unregisters it before freeing it; its prologue
                // site is the generated `nop`.
                unsafe {
                    registry.register(image.rx(), image.len(), ImageKind::Program, owner)?;
                    registry.add_site(image.rx() + code.patch_site)
                }
                .map_err(JitError::from)
            })
            .and_then(|()| {
                register_program_site(image.rx(), site).map_err(|_| {
                    let _ = registry.unregister(image.rx());
                    JitError::InvalidInstruction {
                        pc: 0,
                        reason: "the generated PLT is misplaced (a JIT bug; please report it)",
                    }
                })
            });
        if let Err(e) = placed {
            // SAFETY: the image was never published, so nothing can be running it.
            let _ = unsafe { arena.free(image) };
            return Err(e);
        }
        Ok(Placed { image, code })
    }
}
