//! x86-64 `text_poke` on hand-assembled images: the contract, and a site switched under load.
#![cfg(target_arch = "x86_64")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livebpf::text::poke::{
    PokeError, PokeInsn, PokeOutcome, X86_NOP5, text_poke as raw_text_poke, traps_handled,
};
use livebpf::text::{Allocation, CodeArena, ImageKind, Registry};

/// The raw poke on this file's own images and programs.
fn text_poke(ip: usize, old: PokeInsn, new: PokeInsn) -> Result<PokeOutcome, PokeError> {
    // SAFETY: every target these tests branch a site to is complete code of this file (a stub,
    // a program, a trampoline-like image) that stays mapped while a site can branch there.
    unsafe { raw_text_poke(ip, old, new) }
}

/// An image in the global arena, registered in the registry, freed on drop.
struct Image {
    alloc: Option<Allocation>,
}

impl Image {
    fn new(code: &[u8], kind: ImageKind) -> Image {
        let arena = CodeArena::global().unwrap();
        let alloc = arena.alloc(code.len(), 16).unwrap();
        arena.write(&alloc, 0, code).unwrap();
        // SAFETY: the image is this test's code in the global arena, unregistered before it is
        // freed; a `Program` image starts with its 5-byte nop patch site.
        unsafe {
            let registry = Registry::global();
            registry.register(alloc.rx(), alloc.len(), kind, 0).unwrap();
            if kind == ImageKind::Program {
                registry.add_site(alloc.rx()).unwrap();
            }
        }
        Image { alloc: Some(alloc) }
    }

    fn addr(&self) -> usize {
        self.alloc.as_ref().unwrap().rx()
    }

    fn bytes(&self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        CodeArena::global()
            .unwrap()
            .read(self.alloc.as_ref().unwrap(), 0, &mut buf)
            .unwrap();
        buf
    }

    /// Calls the image as `fn(u64) -> u64`.
    fn call(&self, x: u64) -> u64 {
        // SAFETY: every image called here is complete code following the System V ABI for
        // `fn(u64) -> u64`, and stays mapped while `self` lives.
        let f: extern "sysv64" fn(u64) -> u64 = unsafe { std::mem::transmute(self.addr()) };
        f(x)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let alloc = self.alloc.take().unwrap();
        Registry::global().unregister(alloc.rx()).unwrap();
        // SAFETY: the tests join every thread that runs an image before dropping it.
        unsafe { CodeArena::global().unwrap().free(alloc).unwrap() };
    }
}

/// `[nop5] mov rax, rdi; add rax, imm8; ret`: a "program" with a patch site.
fn program(add: u8) -> Image {
    let mut code = X86_NOP5.to_vec();
    code.extend_from_slice(&[0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, add, 0xc3]);
    Image::new(&code, ImageKind::Program)
}

/// `mov rax, rdi; add rax, imm8; ret`: a jump target.
fn replacement(add: u8) -> Image {
    Image::new(
        &[0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, add, 0xc3],
        ImageKind::Other,
    )
}

/// `movabs rax, &counter; lock inc qword [rax]; ret`: a call target that preserves the arguments.
fn counting_stub(counter: &'static AtomicU64) -> Image {
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&(counter.as_ptr() as u64).to_le_bytes());
    code.extend_from_slice(&[0xf0, 0x48, 0xff, 0x00, 0xc3]);
    Image::new(&code, ImageKind::Trampoline)
}

#[test]
fn nop_call_jump_nop() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let prog = program(1);
    let stub = counting_stub(&COUNT);
    let alt = replacement(100);
    let site = prog.addr();
    assert_eq!(prog.call(1), 2);

    let call = PokeInsn::Call(stub.addr());
    assert_eq!(
        text_poke(site, PokeInsn::Nop, call),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(prog.bytes(1), [0xe8]);
    assert_eq!(prog.call(1), 2);
    assert_eq!(COUNT.load(Ordering::Relaxed), 1);

    // call -> jump: the entry now goes to the replacement.
    let jump = PokeInsn::Jump(alt.addr());
    assert_eq!(text_poke(site, call, jump), Ok(PokeOutcome::Applied));
    assert_eq!(prog.call(1), 101);
    assert_eq!(COUNT.load(Ordering::Relaxed), 1);

    assert_eq!(
        text_poke(site, jump, PokeInsn::Nop),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(prog.bytes(5), X86_NOP5);
    assert_eq!(prog.call(1), 2);
    // Applying what is already there is reported, not an error.
    assert_eq!(
        text_poke(site, PokeInsn::Call(stub.addr()), PokeInsn::Nop),
        Ok(PokeOutcome::AlreadyApplied)
    );
}

#[test]
fn mismatch_writes_nothing() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let prog = program(1);
    let stub = counting_stub(&COUNT);
    let alt = replacement(5);
    let before = prog.bytes(13);
    let err = text_poke(
        prog.addr(),
        PokeInsn::Call(stub.addr()),
        PokeInsn::Jump(alt.addr()),
    );
    assert_eq!(
        err,
        Err(PokeError::Mismatch {
            ip: prog.addr(),
            expected: PokeInsn::Call(stub.addr()),
            found: PokeInsn::Nop
        })
    );
    assert_eq!(prog.bytes(13), before);
    assert_eq!(prog.call(3), 4);
    // A site that is not a nop/call/jump at all is refused too.
    let err = text_poke(prog.addr() + 5, PokeInsn::Nop, PokeInsn::Jump(alt.addr()));
    assert!(matches!(err, Err(PokeError::NotASite { .. })), "{err:?}");
    assert_eq!(prog.bytes(13), before);
}

#[test]
fn not_text_and_out_of_range() {
    let prog = program(1);
    let rust_fn = not_text_and_out_of_range as *const () as usize;
    assert_eq!(
        text_poke(rust_fn, PokeInsn::Nop, PokeInsn::Jump(prog.addr())),
        Err(PokeError::NotText { ip: rust_fn })
    );
    let heap = Box::new(0u64);
    let addr = &*heap as *const u64 as usize;
    assert!(matches!(
        text_poke(addr, PokeInsn::Nop, PokeInsn::Nop),
        Err(PokeError::NotText { .. })
    ));
    let far = prog.addr().wrapping_add(1 << 40);
    let before = prog.bytes(5);
    assert!(matches!(
        text_poke(prog.addr(), PokeInsn::Nop, PokeInsn::Call(far)),
        Err(PokeError::OutOfRange { .. })
    ));
    assert_eq!(prog.bytes(5), before);
}

/// Switches the site at `site` between the nop and a call to a stub counting in `count`, `pokes`
/// times, while `runners` threads call `run(thread, iteration)` (which checks its own result) in a
/// loop. Returns (runs, stub calls) after checking 0 < stub calls <= runs.
fn switch_site_under_load(
    site: usize,
    count: &'static AtomicU64,
    pokes: usize,
    runners: usize,
    run: impl Fn(u64, u64) + Send + Sync + 'static,
) -> (u64, u64) {
    let stub = counting_stub(count);
    let run = Arc::new(run);
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..runners as u64)
        .map(|t| {
            let (run, stop) = (run.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    run(t, calls);
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let call = PokeInsn::Call(stub.addr());
    for i in 0..pokes {
        let (old, new) = if i % 2 == 0 {
            (PokeInsn::Nop, call)
        } else {
            (call, PokeInsn::Nop)
        };
        assert_eq!(text_poke(site, old, new), Ok(PokeOutcome::Applied));
    }
    stop.store(true, Ordering::Relaxed);
    let calls: u64 = threads.into_iter().map(|r| r.join().unwrap()).sum();
    let counted = count.load(Ordering::Relaxed);
    assert!(calls > 0);
    assert!(counted > 0, "the stub was never reached");
    assert!(
        counted <= calls,
        "{counted} stub calls for {calls} program calls"
    );
    (calls, counted)
}

#[test]
fn site_switched_under_load() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    const POKES: usize = 100_000;
    const RUNNERS: usize = 3;
    let prog = Arc::new(program(7));
    let site = prog.addr();
    let (calls, counted) = switch_site_under_load(site, &COUNT, POKES, RUNNERS, move |t, n| {
        let x = (t * 1_000_000_007).wrapping_add(n.wrapping_mul(6364136223846793005));
        assert_eq!(prog.call(x), x.wrapping_add(7));
    });
    println!(
        "site switched {POKES} times under {RUNNERS} runners: {calls} calls, {counted} through the stub, {} int3 traps handled",
        traps_handled()
    );
}

/// The same under load, on a real JIT-compiled program: its entry's patch site switches between the
/// nop and a call to a counting stub while runners check every result against the interpreter.
#[test]
fn jit_program_site_switched_under_load() {
    use livebpf::asm::assemble_program;
    use livebpf::helpers::Helpers;
    use livebpf::interp::Interpreter;
    use livebpf::jit::{JitOptions, JitProgram};

    static COUNT: AtomicU64 = AtomicU64::new(0);
    const POKES: usize = 100_000;
    const RUNNERS: usize = 2;
    let program = assemble_program(include_str!("../examples/sieve.s")).unwrap();
    let jit = JitProgram::compile(&program, &Helpers::new(), JitOptions::checked()).unwrap();
    let expected = Interpreter::new(&program).run(&mut [0u8; 64]).unwrap();
    let site = jit.entry();
    let (calls, counted) = switch_site_under_load(site, &COUNT, POKES, RUNNERS, move |_, _| {
        assert_eq!(jit.run(&mut [0u8; 64]), Ok(expected));
    });
    println!("JIT program site switched {POKES} times: {calls} runs, {counted} through the stub");
}
