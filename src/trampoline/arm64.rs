//! arm64 trampoline images.
//!
//! The target's prologue is `[bti jc] mov x9, x30; bl <image or PLT>; [paciasp] stp x29, x30, …`,
//! so on entry x30 is the address just after the site (the target's body) and x9 the return
//! address of the target's caller. The image arrives by `bl` (near) or by `br x10` from the
//! program's PLT (far), so it starts with `bti jc`. Frame (sp-relative after the prologue):
//! ```text
//!   [x29 + 16]  x29, x9     frame record of the target's caller
//!   [x29]       x29, x30    frame record of the target (x30 = its body)
//!   sp + 0      args[0..5] = r1..r5 (x0..x4), args[5] = return value
//!   sp + 48     the target's run context (x5)
//!   sp + 56     `enter` result of the tracer being run
//!   sp + 64     result of the last fmod_ret program
//!   sp + 72     x6, x7, x8 (a native function's further arguments and indirect-result pointer)
//!   sp + 96     the tracer's RunContext
//! ```
//! The original is called with `adr x30, <after>; ret x10`: `blr` would need a landing pad at the
//! body, which BTI does not give it (the kernel learnt this after merge). Returning to the target's
//! caller skips the target's frame: `mov x30, x9; ret x9`. With fentry only, the image returns into
//! the body as the dummy trampoline does: `mov x10, x30; mov x30, x9; ret x10`.
//!
//! For a native function ([`ImageTarget::Native`]) the site's stub calls the image with `blr`,
//! its reference already taken: the image has one frame record (x30 returns into the stub),
//! takes no reference, always calls the body (x0..x8 restored) outside the read-side section the
//! stub opened, and returns to the stub. freplace is an image there too, giving the replacement
//! the run context the native caller does not pass.

use super::native::{native_body_enter, native_body_exit};
use super::{
    AttachError, AttachKind, ImageTarget, LinkEntry, TRACE_CTX_WORDS, tramp_image_enter,
    tramp_image_exit, tramp_prog_enter, tramp_prog_exit,
};
use crate::isa::Size;
use crate::jit::RunContext;
use crate::jit::arm64::enc::{
    self, FP, Gpr, LR, LdSt, PairMode, SP, X0, X1, X2, X3, X4, X5, X9, X10, XZR,
};

const ARGS: i64 = 0;
const RETVAL: i64 = ARGS + 8 * (TRACE_CTX_WORDS as i64 - 1);
const SAVED_CTX: i64 = 48;
const START: i64 = 56;
const FMOD_RESULT: i64 = 64;
const NATIVE_REGS: i64 = 72;
const TRACER_CTX: i64 = 96;
const CTX_SPACE: i64 = (std::mem::size_of::<RunContext<'static>>() as i64 + 15) & !15;
/// Below the two frame records; a multiple of 16 (sp stays aligned).
const FRAME: i64 = TRACER_CTX + CTX_SPACE;

const ARG_REGS: [Gpr; 5] = [X0, X1, X2, X3, X4];
/// A native function's registers beyond the program ABI's: arguments 7 and 8, and x8.
const NATIVE_EXTRA: [Gpr; 3] = [Gpr::new(6), Gpr::new(7), Gpr::new(8)];

/// A generated image and the byte offsets of its sites.
pub(super) struct Layout {
    pub code: Vec<u8>,
    pub ip_after_call: Option<usize>,
    pub ip_epilogue: Option<usize>,
}

#[derive(Clone, Copy)]
struct Label(usize);

#[derive(Clone, Copy)]
enum Fix {
    B,
    Cbz(Gpr),
    Adr(Gpr),
}

/// Words plus label fixups, resolved by `finish`.
#[derive(Default)]
struct Code {
    words: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label, Fix)>,
    /// An operand that did not fit; reported by `finish`.
    bad: bool,
}

impl Code {
    fn emit(&mut self, w: u32) {
        self.words.push(w);
    }

    fn emit_opt(&mut self, w: Option<u32>) {
        match w {
            Some(w) => self.words.push(w),
            None => {
                self.bad = true;
                self.words.push(enc::NOP);
            }
        }
    }

    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.words.len());
    }

    fn fix(&mut self, l: Label, kind: Fix) {
        self.fixups.push((self.words.len(), l, kind));
        self.words.push(enc::NOP);
    }

    fn offset(&self) -> usize {
        self.words.len() * 4
    }

    fn mov_imm(&mut self, rd: Gpr, value: u64) {
        for w in enc::mov_imm(true, rd, value) {
            self.emit(w);
        }
    }

    fn call_abs(&mut self, f: u64) {
        self.mov_imm(X10, f);
        self.emit(enc::blr(X10));
    }

    fn str_sp(&mut self, rt: Gpr, off: i64) {
        self.emit_opt(enc::ldst_uimm(LdSt::Str, Size::DW, rt, SP, off));
    }

    fn ldr_sp(&mut self, rt: Gpr, off: i64) {
        self.emit_opt(enc::ldst_uimm(LdSt::Ldr, Size::DW, rt, SP, off));
    }

    fn add_sp(&mut self, rd: Gpr, off: i64) {
        self.emit_opt(enc::add_imm(true, rd, SP, off as u32));
    }

    fn finish(mut self) -> Result<Vec<u8>, AttachError> {
        for (at, label, kind) in std::mem::take(&mut self.fixups) {
            let target = self.labels[label.0].ok_or(AttachError::Image("unbound label"))?;
            let off = (target as i64 - at as i64) * 4;
            self.words[at] = match kind {
                Fix::B => enc::b(off),
                Fix::Cbz(rt) => enc::cbz(true, rt, off),
                Fix::Adr(rd) => enc::adr(rd, off),
            }
            .ok_or(AttachError::Image("branch out of range"))?;
        }
        if self.bad {
            return Err(AttachError::Image(
                "an operand does not fit its instruction",
            ));
        }
        Ok(self.words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
}

/// A tracer run's start: `tramp_prog_enter`, its result kept; branches to `skip` when the
/// program is not to run (already running on this thread).
fn emit_enter(c: &mut Code, shared: u64, skip: Label) {
    c.mov_imm(X0, shared);
    c.add_sp(X1, TRACER_CTX);
    c.add_sp(X2, ARGS);
    c.call_abs(tramp_prog_enter as *const () as u64);
    c.str_sp(X0, START);
    c.fix(skip, Fix::Cbz(X0));
}

/// A tracer run's end: `tramp_prog_exit` with what `emit_enter` kept.
fn emit_exit(c: &mut Code, shared: u64) {
    c.mov_imm(X0, shared);
    c.ldr_sp(X1, START);
    c.add_sp(X2, TRACER_CTX);
    c.call_abs(tramp_prog_exit as *const () as u64);
}

/// Runs one tracer: enter → program → exit; with `fmod`, a non-zero result becomes the return
/// value and skips the original.
fn emit_prog(c: &mut Code, link: &LinkEntry, fmod: Option<Label>) {
    let shared = std::sync::Arc::as_ptr(&link.shared) as u64;
    let skip = c.label();
    c.str_sp(XZR, FMOD_RESULT);
    emit_enter(c, shared, skip);
    c.add_sp(X0, ARGS);
    c.mov_imm(X1, link.shared.cookie);
    for r in [X2, X3, X4] {
        c.emit(enc::mov_reg(true, r, XZR));
    }
    c.add_sp(X5, TRACER_CTX);
    c.call_abs(link.shared.prog.0.jit.entry() as u64);
    c.str_sp(X0, FMOD_RESULT);
    c.bind(skip);
    emit_exit(c, shared);
    if let Some(skip_original) = fmod {
        let next = c.label();
        c.ldr_sp(X0, FMOD_RESULT);
        c.fix(next, Fix::Cbz(X0));
        c.str_sp(X0, RETVAL);
        c.fix(skip_original, Fix::B);
        c.bind(next);
    }
}

fn restore_args(c: &mut Code, native: bool) {
    for (i, r) in ARG_REGS.iter().enumerate() {
        c.ldr_sp(*r, ARGS + 8 * i as i64);
    }
    c.ldr_sp(X5, SAVED_CTX);
    if native {
        for (i, r) in NATIVE_EXTRA.iter().enumerate() {
            c.ldr_sp(*r, NATIVE_REGS + 8 * i as i64);
        }
    }
}

/// Runs a native function's replacement: x0..x4 = the function's arguments, its result the
/// function's; when it is skipped (already running on this thread) the function itself runs.
fn emit_replacement(c: &mut Code, link: &LinkEntry, done: Label) {
    let shared = std::sync::Arc::as_ptr(&link.shared) as u64;
    let skip = c.label();
    emit_enter(c, shared, skip);
    restore_args(c, false);
    c.add_sp(X5, TRACER_CTX);
    c.call_abs(link.shared.prog.0.jit.entry() as u64);
    c.str_sp(X0, RETVAL);
    emit_exit(c, shared);
    c.fix(done, Fix::B);
    c.bind(skip);
}

/// Pops the frame: x30 = the target's body, x9 = the target caller's return address.
fn pop_frames(c: &mut Code) {
    c.emit(enc::mov_sp(SP, FP));
    c.emit_opt(enc::ldp(PairMode::Post, FP, LR, SP, 16));
    c.emit_opt(enc::ldp(PairMode::Post, FP, X9, SP, 16));
}

/// Generates the image for `links`: position independent (its own address by `adr`, everything
/// else by absolute address).
pub(super) fn generate(links: &[LinkEntry], target: ImageTarget) -> Result<Layout, AttachError> {
    let native_body = match target {
        ImageTarget::Prog { .. } => None,
        ImageTarget::Native { body } => Some(body),
    };
    let native = native_body.is_some();
    let call_orig = native
        || links
            .iter()
            .any(|l| matches!(l.kind, AttachKind::Fexit | AttachKind::FmodRet));
    let mut c = Code::default();
    let image_start = c.label();
    c.bind(image_start);
    // Reached by `bl`, or by `br x10` from a PLT (`blr` from a native stub): needs the `j`
    // landing pad too. A hint, so a nop where BTI is off.
    c.emit(enc::BTI_JC);
    if !native {
        c.emit_opt(enc::stp(PairMode::Pre, FP, X9, SP, -16));
        c.emit(enc::mov_sp(FP, SP));
    }
    c.emit_opt(enc::stp(PairMode::Pre, FP, LR, SP, -16));
    c.emit(enc::mov_sp(FP, SP));
    c.emit_opt(enc::sub_imm(true, SP, SP, FRAME as u32));
    for (i, r) in ARG_REGS.iter().enumerate() {
        c.str_sp(*r, ARGS + 8 * i as i64);
    }
    c.str_sp(XZR, RETVAL);
    c.str_sp(X5, SAVED_CTX);
    if native {
        for (i, r) in NATIVE_EXTRA.iter().enumerate() {
            c.str_sp(*r, NATIVE_REGS + 8 * i as i64);
        }
    } else {
        c.fix(image_start, Fix::Adr(X0));
        c.call_abs(tramp_image_enter as *const () as u64);
    }
    for link in links.iter().filter(|l| l.kind == AttachKind::Fentry) {
        emit_prog(&mut c, link, None);
    }
    let (mut ip_after_call, mut ip_epilogue) = (None, None);
    if call_orig {
        let do_fexit = c.label();
        for link in links.iter().filter(|l| l.kind == AttachKind::FmodRet) {
            emit_prog(&mut c, link, Some(do_fexit));
        }
        for link in links.iter().filter(|l| l.kind == AttachKind::Freplace) {
            if !native {
                return Err(AttachError::Image("freplace of a program is not an image"));
            }
            emit_replacement(&mut c, link, do_fexit);
        }
        if native {
            c.call_abs(native_body_enter as *const () as u64);
        }
        restore_args(&mut c, native);
        match native_body {
            // `ret` to the body as below, where BTI needs no landing pad.
            Some(body) => c.mov_imm(X10, body as u64),
            // The body's address is the target's frame record's x30.
            None => c.emit_opt(enc::ldst_uimm(LdSt::Ldr, Size::DW, X10, FP, 8)),
        }
        let back = c.label();
        c.fix(back, Fix::Adr(LR));
        c.emit(enc::ret(X10));
        c.bind(back);
        c.str_sp(X0, RETVAL);
        if native {
            c.call_abs(native_body_exit as *const () as u64);
        }
        ip_after_call = Some(c.offset());
        c.emit(enc::NOP);
        c.bind(do_fexit);
        for link in links.iter().filter(|l| l.kind == AttachKind::Fexit) {
            emit_prog(&mut c, link, None);
        }
        ip_epilogue = Some(c.offset());
        if native {
            // Back to the stub, which drops the reference.
            c.ldr_sp(X0, RETVAL);
            c.emit(enc::mov_sp(SP, FP));
            c.emit_opt(enc::ldp(PairMode::Post, FP, LR, SP, 16));
            c.emit(enc::ret(LR));
            return Ok(Layout {
                code: c.finish()?,
                ip_after_call,
                ip_epilogue,
            });
        }
        c.fix(image_start, Fix::Adr(X0));
        c.call_abs(tramp_image_exit as *const () as u64);
        c.ldr_sp(X0, RETVAL);
        pop_frames(&mut c);
        // Skip the target's frame: straight back to its caller.
        c.emit(enc::mov_reg(true, LR, X9));
        c.emit(enc::ret(X9));
    } else {
        c.fix(image_start, Fix::Adr(X0));
        c.call_abs(tramp_image_exit as *const () as u64);
        restore_args(&mut c, false);
        pop_frames(&mut c);
        // Into the body with the caller's return address back in x30, as if the site were a nop.
        c.emit(enc::mov_reg(true, X10, LR));
        c.emit(enc::mov_reg(true, LR, X9));
        c.emit(enc::ret(X10));
    }
    Ok(Layout {
        code: c.finish()?,
        ip_after_call,
        ip_epilogue,
    })
}
