//! `run_env` and context helpers, on the interpreter and on JIT code in every mode a test binary
//! passes in: what a helper sees of its run (user pointer, `allows`, the call's pc and id), what
//! it may give the program (grants) and how it ends a run (`fail`, `check`).

use std::ffi::c_void;

use livebpf::exec::{Access, ExecError, HelperContext, MemRegion, RunEnv};
use livebpf::helpers::Helpers;
use livebpf::jit::{JitOptions, JitProgram, JitStack};

use super::engines::{Engine, engines};
use super::progen::asm;

/// `r0 = *(u64 *)user + r1` (`u64::MAX` without a user pointer).
pub const USER_ID: u32 = 100;
/// `r0 = allows(r1, r2, access r3) | is_checked << 1`.
pub const ALLOWS_ID: u32 = 101;
/// Grants `[r1, r1 + r2)`, writable if r3; `r0 = granted`.
pub const GRANT_ID: u32 = 102;
/// Fails the run with a helper fault when r1 != 0; else `r0 = 5`.
pub const FAIL_ID: u32 = 103;
/// `r0 = pc << 32 | helper id` of the call.
pub const WHERE_ID: u32 = 104;
/// `check(r1, r2, load)`; `r0 = 9`.
pub const CHECK_ID: u32 = 105;
/// Revokes `[r1, r1 + r2)`, writable if r3; `r0 = revoked | grant count << 8 | length of the
/// grant at r1 << 16` (after the revocation).
pub const REVOKE_ID: u32 = 106;

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn user(r1: u64, _: u64, _: u64, _: u64, _: u64, ctx: *mut HelperContext) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    let p = ctx.user() as *const u64;
    if p.is_null() {
        return u64::MAX;
    }
    // SAFETY: the tests' user pointers point at a u64.
    unsafe { *p + r1 }
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn allows(
    r1: u64,
    r2: u64,
    r3: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    let access = match r3 {
        0 => Access::Load,
        1 => Access::Store,
        _ => Access::Atomic,
    };
    ctx.allows(r1, r2, access) as u64 | (ctx.is_checked() as u64) << 1
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn grant(
    r1: u64,
    r2: u64,
    r3: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    ctx.grant(MemRegion::new(r1, r2, r3 != 0)) as u64
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn fail(r1: u64, _: u64, _: u64, _: u64, _: u64, ctx: *mut HelperContext) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    if r1 != 0 {
        ctx.fail_helper("asked to fail");
    }
    5
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn where_(
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    (ctx.pc() as u64) << 32 | ctx.helper_id() as u64
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn check(
    r1: u64,
    r2: u64,
    _: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    ctx.check(r1, r2, Access::Load);
    9
}

/// # Safety
/// A context helper's contract.
unsafe extern "C" fn revoke(
    r1: u64,
    r2: u64,
    r3: u64,
    _: u64,
    _: u64,
    ctx: *mut HelperContext,
) -> u64 {
    // SAFETY: the engine's context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    let revoked = ctx.revoke(MemRegion::new(r1, r2, r3 != 0)) as u64;
    let at = ctx.granted_at(r1).map_or(0, |g| g.len);
    revoked | (ctx.grant_count() as u64) << 8 | at << 16
}

/// `base` with the context helpers of this module.
pub fn with_context_helpers(base: &Helpers) -> Helpers {
    let mut h = base.clone();
    h.register_with_context(USER_ID, user)
        .register_with_context(ALLOWS_ID, allows)
        .register_with_context(GRANT_ID, grant)
        .register_with_context(FAIL_ID, fail)
        .register_with_context(WHERE_ID, where_)
        .register_with_context(CHECK_ID, check)
        .register_with_context(REVOKE_ID, revoke);
    h
}

fn oob(pc: usize, addr: u64, size: u64, access: Access) -> Result<u64, ExecError> {
    Err(ExecError::OutOfBounds {
        pc,
        addr,
        size,
        access,
    })
}

/// Runs `src` in `env` on `engine`.
fn run(engine: &Engine, src: &str, h: &Helpers, env: &RunEnv) -> Result<u64, ExecError> {
    let loaded = engine.load(&asm(src), h);
    // SAFETY: the tests' environments hold only live buffers of this module.
    unsafe { loaded.run(env) }
}

/// `run_env` on every engine: r1..r5 from `args`, `regions[0]` inline and the others out of
/// line, read-only regions refused to stores, a stack that starts zeroed.
pub fn run_env_in_every_mode(modes: &[(String, JitOptions)], base: &Helpers) {
    let h = with_context_helpers(base);
    let mut a = [0u64; 4];
    let mut b = [0u64; 4];
    b[1] = 0xb1;
    let regions = [
        MemRegion::new(a.as_mut_ptr() as u64, 32, true),
        MemRegion::new(b.as_mut_ptr() as u64, 32, false),
    ];
    let (pa, pb) = (regions[0].start, regions[1].start);
    for (name, engine) in engines(modes) {
        let env = RunEnv::new([1, 2, 4, 8, 16], &[]);
        let sum = "mov r0, r1\nadd r0, r2\nadd r0, r3\nadd r0, r4\nadd r0, r5\nexit";
        assert_eq!(run(&engine, sum, &h, &env), Ok(31), "{name}");
        // Both regions: store to the first, load from the second.
        let env = RunEnv::new([pa, pb, 0, 0, 0], &regions);
        let src = "ldxdw r0, [r2+8]\nstxdw [r1+24], r0\nldxdw r0, [r1+24]\nexit";
        assert_eq!(run(&engine, src, &h, &env), Ok(0xb1), "{name}");
        if engine.is_checked() {
            let store = "stdw [r2+0], 1\nexit";
            assert_eq!(
                run(&engine, store, &h, &env),
                oob(0, pb, 8, Access::Store),
                "{name}"
            );
            let past = "ldxw r0, [r2+30]\nexit";
            assert_eq!(
                run(&engine, past, &h, &env),
                oob(0, pb + 30, 4, Access::Load),
                "{name}"
            );
        }
        // The stack starts zeroed, whatever the previous run left.
        let dirty = "stdw [r10-8], 77\nldxdw r0, [r10-8]\nexit";
        let read = "ldxdw r0, [r10-8]\nexit";
        match &engine {
            Engine::Interp => assert_eq!(run(&engine, read, &h, &env), Ok(0)),
            Engine::Jit(o) => {
                let mut stack = JitStack::new();
                let dirty = JitProgram::compile(&asm(dirty), &h, *o).unwrap();
                let read = JitProgram::compile(&asm(read), &h, *o).unwrap();
                // SAFETY: the regions are `a` and `b`, alive and not borrowed meanwhile.
                unsafe {
                    assert_eq!(dirty.run_env(&env, &mut stack), Ok(77), "{name}");
                    assert_eq!(read.run_env(&env, &mut stack), Ok(0), "{name}");
                }
            }
        }
    }
    assert_eq!(a[3], 0xb1);
}

/// Context helpers on every engine.
pub fn context_helpers_in_every_mode(modes: &[(String, JitOptions)], base: &Helpers) {
    let h = with_context_helpers(base);
    let mut counter = 1000u64;
    let mut input = [0u8; 16];
    let mut granted = Box::new([0u64; 8]);
    let g = granted.as_mut_ptr() as u64;
    let outside = 0x10u64;
    for (name, engine) in engines(modes) {
        let regions = [MemRegion::new(input.as_mut_ptr() as u64, 16, true)];
        let i = regions[0].start;
        let user_env = RunEnv {
            args: [i, 0, 0, 0, 0],
            regions: &regions,
            user: &mut counter as *mut u64 as *mut c_void,
            ..RunEnv::default()
        };
        // The user pointer, and none.
        let src = format!("mov r1, 5\ncall {USER_ID}\nexit");
        assert_eq!(run(&engine, &src, &h, &user_env), Ok(1005), "{name}");
        let plain_env = RunEnv::new([i, 0, 0, 0, 0], &regions);
        assert_eq!(run(&engine, &src, &h, &plain_env), Ok(u64::MAX), "{name}");

        // `allows`: the decision checked code makes; always true in trusted code.
        let ask = |addr: u64, size: u64, access: u64| {
            let src = format!(
                "lddw r1, {addr:#x}\nmov r2, {size}\nmov r3, {access}\ncall {ALLOWS_ID}\nexit"
            );
            run(&engine, &src, &h, &plain_env).unwrap()
        };
        let checked = engine.is_checked();
        let c = (checked as u64) << 1;
        assert_eq!(ask(i, 16, 1), 1 | c, "{name}: the region");
        assert_eq!(
            ask(i + 8, 9, 0),
            !checked as u64 | c,
            "{name}: past the region"
        );
        assert_eq!(ask(outside, 1, 0), !checked as u64 | c, "{name}: elsewhere");
        assert_eq!(ask(g, 8, 0), !checked as u64 | c, "{name}: not granted yet");

        // A grant: the rest of the run may access the region (the JIT through its slow path).
        let use_grant = |writable: u64| {
            format!(
                "lddw r1, {g:#x}\nmov r2, 64\nmov r3, {writable}\ncall {GRANT_ID}\n\
                 lddw r6, {g:#x}\nstdw [r6+56], 3\nldxdw r0, [r6+56]\nexit"
            )
        };
        assert_eq!(run(&engine, &use_grant(1), &h, &plain_env), Ok(3), "{name}");
        assert_eq!(granted[7], 3);
        // Granted from a BPF-to-BPF callee: the caller may use it too.
        let from_callee = format!(
            "call local f\nlddw r6, {g:#x}\nldxdw r0, [r6+56]\nexit\n\
             f:\nlddw r1, {g:#x}\nmov r2, 64\nmov r3, 0\ncall {GRANT_ID}\nexit"
        );
        assert_eq!(run(&engine, &from_callee, &h, &plain_env), Ok(3), "{name}");
        if checked {
            // A read-only grant refuses stores; without a grant (a new run) nothing is allowed.
            assert_eq!(
                run(&engine, &use_grant(0), &h, &plain_env),
                oob(7, g + 56, 8, Access::Store),
                "{name}"
            );
            let no_grant = format!("lddw r6, {g:#x}\nldxdw r0, [r6+56]\nexit");
            assert_eq!(
                run(&engine, &no_grant, &h, &plain_env),
                oob(2, g + 56, 8, Access::Load),
                "{name}"
            );
        }

        // `revoke`: two grants at g (of 64 and 16 bytes); revoking the first leaves the second,
        // revoking what was never granted does nothing; the revoked bytes are out of bounds.
        let revoking = format!(
            "lddw r1, {g:#x}\nmov r2, 64\nmov r3, 1\ncall {GRANT_ID}\n\
             lddw r1, {g:#x}\nmov r2, 16\nmov r3, 1\ncall {GRANT_ID}\n\
             lddw r1, {g:#x}\nmov r2, 64\nmov r3, 0\ncall {REVOKE_ID}\nmov r6, r0\n\
             lddw r1, {g:#x}\nmov r2, 64\nmov r3, 1\ncall {REVOKE_ID}\nlsh r0, 32\n\
             or r0, r6\nmov r6, r0\n\
             lddw r7, {g:#x}\nldxdw r0, [r7+8]\nldxdw r0, [r7+56]\nmov r0, r6\nexit"
        );
        if checked {
            assert_eq!(
                run(&engine, &revoking, &h, &plain_env),
                oob(27, g + 56, 8, Access::Load),
                "{name}"
            );
            let kept = revoking.replace("ldxdw r0, [r7+56]", "ja +0");
            // Not revoked (read-only asked): 2 grants, 64 bytes at g; then revoked: 1, 16.
            let want = (2 << 8 | 64 << 16) | (1 | 1 << 8 | 16 << 16) << 32;
            assert_eq!(run(&engine, &kept, &h, &plain_env), Ok(want), "{name}");
        }

        // `fail`: the run ends at the call with the helper's error; nothing after it runs, from
        // the entry function, a callee three frames deep, or through `callx`.
        let fault = |pc| {
            Err(ExecError::HelperFault {
                pc,
                helper: FAIL_ID,
                reason: "asked to fail".into(),
            })
        };
        let src = format!("mov r6, r1\nmov r1, 1\ncall {FAIL_ID}\nstb [r6+0], 1\nexit");
        assert_eq!(run(&engine, &src, &h, &plain_env), fault(2), "{name}");
        let src = format!("mov r1, 0\ncall {FAIL_ID}\nexit");
        assert_eq!(run(&engine, &src, &h, &plain_env), Ok(5), "{name}");
        let deep = format!(
            "mov r6, r1\ncall local a\nstb [r6+0], 2\nexit\n\
             a:\ncall local b\nstb [r6+1], 2\nexit\n\
             b:\nmov r1, 1\ncall {FAIL_ID}\nstb [r6+2], 2\nexit"
        );
        assert_eq!(run(&engine, &deep, &h, &plain_env), fault(8), "{name}");
        let callx =
            format!("mov r6, r1\nmov r1, 1\nmov r2, {FAIL_ID}\ncall r2\nstb [r6+0], 3\nexit");
        assert_eq!(run(&engine, &callx, &h, &plain_env), fault(3), "{name}");
        assert_eq!(input, [0; 16], "{name}: nothing ran after a failing helper");

        // The call's pc and id, statically and through `callx`.
        let src = format!("mov r0, 0\nja +0\ncall {WHERE_ID}\nexit");
        assert_eq!(
            run(&engine, &src, &h, &plain_env),
            Ok(2 << 32 | WHERE_ID as u64),
            "{name}"
        );
        let src = format!("lddw r2, {WHERE_ID}\ncall r2\nexit");
        assert_eq!(
            run(&engine, &src, &h, &plain_env),
            Ok(2 << 32 | WHERE_ID as u64),
            "{name}"
        );

        // `check`: an out-of-bounds argument ends a checked run at the call.
        let src = format!("lddw r1, {outside:#x}\nmov r2, 8\ncall {CHECK_ID}\nexit");
        let want = if checked {
            oob(3, outside, 8, Access::Load)
        } else {
            Ok(9)
        };
        assert_eq!(run(&engine, &src, &h, &plain_env), want, "{name}");
        let src = format!("mov r2, 16\ncall {CHECK_ID}\nexit");
        assert_eq!(
            run(&engine, &src, &h, &plain_env),
            Ok(9),
            "{name}: the region"
        );
    }
}
