//! x86-64 trampoline images.
//!
//! The target's patch site *jumps* to the image, so on entry `[rsp]` is the target caller's return
//! address and the image is, to the CPU, the target itself: it calls the body (just after the site)
//! and returns to the caller with a plain `ret`. Unlike the kernel's `call` + `add rsp, 8; ret`,
//! calls and returns stay paired, so the return-stack predictor keeps working. The frame:
//! ```text
//!   rbp + 8   return address of the target's caller
//!   rbp + 0   saved rbp
//!   rbp - 48  args[0..5] = r1..r5 (rdi, rsi, rdx, rcx, r8); args[5] = return value
//!   rbp - 56  the target's run context (r9)
//!   rbp - 64  `enter` result of the tracer being run
//!   rbp - 72  result of the last fmod_ret program
//!   rbp - 72 - CTX_SPACE   the tracer's RunContext
//! ```
//! On entry rsp ≡ 8 (mod 16), as in any function, so after `push rbp` the frame size is a multiple
//! of 16 to call out with an aligned stack.
//!
//! For a native function ([`ImageTarget::Native`]) the site's stub *calls* the image with the
//! image's reference already taken, so `[rsp]` returns into the stub, the image takes no reference
//! of its own, it always calls the body (r9, the sixth integer argument, is restored with the
//! others) and returns to the stub, and the body runs outside the read-side section the stub
//! opened (a native function may block). freplace is an image there too: the replacement needs
//! a run context, which the native caller does not pass.

use super::native::{native_body_enter, native_body_exit};
use super::{
    AttachError, AttachKind, ImageTarget, LinkEntry, TRACE_CTX_WORDS, tramp_image_enter,
    tramp_image_exit, tramp_prog_enter, tramp_prog_exit,
};
use crate::jit::RunContext;
use crate::jit::x86_64::asm::{AluOp, Asm, Cond, Gpr, Label, Mem, OpSize};
use crate::text::poke::PATCH_SITE_LEN;

const ARGS: i32 = -(TRACE_CTX_WORDS as i32) * 8;
const RETVAL: i32 = -8;
const SAVED_CTX: i32 = -56;
const START: i32 = -64;
const FMOD_RESULT: i32 = -72;
const CTX_SPACE: i32 = (std::mem::size_of::<RunContext<'static>>() as i32 + 15) & !15;
const TRACER_CTX: i32 = FMOD_RESULT - CTX_SPACE;
/// Frame below the saved rbp: a multiple of 16, see the module docs.
const FRAME: i32 = (-TRACER_CTX + 15) & !15;

/// The argument registers r1..r5 of the program ABI, and the context register.
const ARG_REGS: [Gpr; 5] = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8];

/// A generated image and the offsets of its sites.
pub(super) struct Layout {
    pub code: Vec<u8>,
    pub ip_after_call: Option<usize>,
    pub ip_epilogue: Option<usize>,
}

fn slot(disp: i32) -> Mem {
    Mem::new(Gpr::Rbp, disp)
}

fn call_abs(a: &mut Asm, f: u64) {
    a.movabs(Gpr::Rax, f);
    a.call_r(Gpr::Rax);
}

/// A tracer run's start: `tramp_prog_enter`, its result kept; jumps to `skip` when the program
/// is not to run (already running on this thread).
fn emit_enter(a: &mut Asm, shared: u64, skip: Label) {
    a.movabs(Gpr::Rdi, shared);
    a.lea(Gpr::Rsi, slot(TRACER_CTX));
    a.lea(Gpr::Rdx, slot(ARGS));
    call_abs(a, tramp_prog_enter as *const () as u64);
    a.store(OpSize::Q, slot(START), Gpr::Rax);
    a.test_rr(true, Gpr::Rax, Gpr::Rax);
    a.jcc(Cond::E, skip);
}

/// A tracer run's end: `tramp_prog_exit` with what `emit_enter` kept.
fn emit_exit(a: &mut Asm, shared: u64) {
    a.movabs(Gpr::Rdi, shared);
    a.load(OpSize::Q, Gpr::Rsi, slot(START));
    a.lea(Gpr::Rdx, slot(TRACER_CTX));
    call_abs(a, tramp_prog_exit as *const () as u64);
}

/// Runs one tracer: enter → program → exit. With `fmod_ret`, a non-zero result stores the return
/// value and jumps to `skip_original`.
fn emit_prog(a: &mut Asm, link: &LinkEntry, fmod: Option<Label>) {
    let shared = std::sync::Arc::as_ptr(&link.shared) as u64;
    let skip = a.new_label();
    a.store_imm(OpSize::Q, slot(FMOD_RESULT), 0);
    emit_enter(a, shared, skip);
    a.lea(Gpr::Rdi, slot(ARGS));
    a.mov_imm(Gpr::Rsi, link.shared.cookie);
    a.alu_rr(AluOp::Xor, false, Gpr::Rdx, Gpr::Rdx);
    a.alu_rr(AluOp::Xor, false, Gpr::Rcx, Gpr::Rcx);
    a.alu_rr(AluOp::Xor, false, Gpr::R8, Gpr::R8);
    a.lea(Gpr::R9, slot(TRACER_CTX));
    call_abs(a, link.shared.prog.0.jit.entry() as u64);
    a.store(OpSize::Q, slot(FMOD_RESULT), Gpr::Rax);
    a.bind(skip);
    emit_exit(a, shared);
    if let Some(skip_original) = fmod {
        let next = a.new_label();
        a.load(OpSize::Q, Gpr::Rax, slot(FMOD_RESULT));
        a.test_rr(true, Gpr::Rax, Gpr::Rax);
        a.jcc(Cond::E, next);
        a.store(OpSize::Q, slot(RETVAL), Gpr::Rax);
        a.jmp(skip_original);
        a.bind(next);
    }
}

/// Runs a native function's replacement: r1..r5 = the function's arguments, its result the
/// function's; when it is skipped (already running on this thread) the function itself runs.
fn emit_replacement(a: &mut Asm, link: &LinkEntry, done: Label) {
    let shared = std::sync::Arc::as_ptr(&link.shared) as u64;
    let skip = a.new_label();
    emit_enter(a, shared, skip);
    restore_args(a);
    a.lea(Gpr::R9, slot(TRACER_CTX));
    call_abs(a, link.shared.prog.0.jit.entry() as u64);
    a.store(OpSize::Q, slot(RETVAL), Gpr::Rax);
    emit_exit(a, shared);
    a.jmp(done);
    a.bind(skip);
}

/// Generates the image for `links` (position independent: the image finds its own address with a
/// RIP-relative `lea`, and calls everything else through absolute addresses).
pub(super) fn generate(links: &[LinkEntry], target: ImageTarget) -> Result<Layout, AttachError> {
    let (body, native) = match target {
        ImageTarget::Prog { body } => (body, false),
        ImageTarget::Native { body } => (body, true),
    };
    let call_orig = native
        || links
            .iter()
            .any(|l| matches!(l.kind, AttachKind::Fexit | AttachKind::FmodRet));
    let mut a = Asm::new();
    // The image's own address keys its reference; a RIP-relative `lea` keeps the code position
    // independent.
    let image_start = a.new_label();
    a.bind(image_start);
    a.push(Gpr::Rbp);
    a.mov_rr(true, Gpr::Rbp, Gpr::Rsp);
    a.alu_ri(AluOp::Sub, true, Gpr::Rsp, FRAME);
    for (i, r) in ARG_REGS.iter().enumerate() {
        a.store(OpSize::Q, slot(ARGS + 8 * i as i32), *r);
    }
    a.store_imm(OpSize::Q, slot(RETVAL), 0);
    a.store(OpSize::Q, slot(SAVED_CTX), Gpr::R9);
    if !native {
        a.lea_label(Gpr::Rdi, image_start);
        call_abs(&mut a, tramp_image_enter as *const () as u64);
    }
    for link in links.iter().filter(|l| l.kind == AttachKind::Fentry) {
        emit_prog(&mut a, link, None);
    }
    let (mut ip_after_call, mut ip_epilogue) = (None, None);
    if call_orig {
        let do_fexit = a.new_label();
        for link in links.iter().filter(|l| l.kind == AttachKind::FmodRet) {
            emit_prog(&mut a, link, Some(do_fexit));
        }
        for link in links.iter().filter(|l| l.kind == AttachKind::Freplace) {
            if !native {
                return Err(AttachError::Image("freplace of a program is not an image"));
            }
            emit_replacement(&mut a, link, do_fexit);
        }
        if native {
            call_abs(&mut a, native_body_enter as *const () as u64);
        }
        restore_args(&mut a);
        // Call the body: the instruction after the target's patch site.
        a.movabs(Gpr::Rax, body as u64);
        a.call_r(Gpr::Rax);
        a.store(OpSize::Q, slot(RETVAL), Gpr::Rax);
        if native {
            call_abs(&mut a, native_body_exit as *const () as u64);
        }
        ip_after_call = Some(a.len());
        a.nop5();
        a.bind(do_fexit);
        for link in links.iter().filter(|l| l.kind == AttachKind::Fexit) {
            emit_prog(&mut a, link, None);
        }
        ip_epilogue = Some(a.len());
        if !native {
            a.lea_label(Gpr::Rdi, image_start);
            call_abs(&mut a, tramp_image_exit as *const () as u64);
        }
        a.load(OpSize::Q, Gpr::Rax, slot(RETVAL));
        a.mov_rr(true, Gpr::Rsp, Gpr::Rbp);
        a.pop(Gpr::Rbp);
        a.ret();
    } else {
        a.lea_label(Gpr::Rdi, image_start);
        call_abs(&mut a, tramp_image_exit as *const () as u64);
        restore_args(&mut a);
        a.mov_rr(true, Gpr::Rsp, Gpr::Rbp);
        a.pop(Gpr::Rbp);
        // Tail-jump into the body (rax is free at a function entry): it returns to the caller.
        a.movabs(Gpr::Rax, body as u64);
        a.raw(&[0xff, 0xe0]); // jmp rax
    }
    let code = a.finish().map_err(crate::jit::JitError::from)?;
    debug_assert!(ip_after_call.is_none_or(|o| o + PATCH_SITE_LEN <= code.len()));
    Ok(Layout {
        code,
        ip_after_call,
        ip_epilogue,
    })
}

fn restore_args(a: &mut Asm) {
    for (i, r) in ARG_REGS.iter().enumerate() {
        a.load(OpSize::Q, *r, slot(ARGS + 8 * i as i32));
    }
    a.load(OpSize::Q, Gpr::R9, slot(SAVED_CTX));
}
