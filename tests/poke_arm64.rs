//! arm64 `text_poke` on JIT-compiled programs: the contract, far targets through the program's
//! PLT, the dummy trampoline, and a site switched ≥ 10,000 times under two runners. When the CPU
//! has BTI, the arena maps text with `PROT_BTI` and the far targets live on `PROT_BTI` pages, so
//! every indirect branch here (the PLT's `br x10`) is BTI-checked.
#![cfg(target_arch = "aarch64")]

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::arm64::enc::{self, Gpr};
use livebpf::jit::arm64::host_features;
use livebpf::jit::{JitOptions, JitProgram};
use livebpf::text::poke::{
    A64_NOP, DUMMY_TRAMPOLINE, PokeError, PokeInsn, PokeOutcome, ProgramSite, decode_a64,
    dummy_trampoline, plt_quiesced, register_program_site, text_poke as raw_text_poke,
    unregister_program_site,
};
use livebpf::text::{
    Allocation, ArenaOptions, CodeArena, ImageKind, Registry, TextError, sync_all_threads,
    sync_icache,
};
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags, mmap_anonymous, mprotect, munmap};

const PROT_BTI: u32 = 0x10;

/// The global arena: with `PROT_BTI` when the CPU enforces BTI.
fn arena() -> &'static CodeArena {
    match CodeArena::init_global(ArenaOptions {
        bti: host_features().bti,
        ..ArenaOptions::default()
    }) {
        Ok(a) => a,
        Err(TextError::GlobalAlreadyInitialized) => CodeArena::global().unwrap(),
        Err(e) => panic!("{e}"),
    }
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A program `r0 = r1 + add`, compiled with the default options.
fn program(add: i32) -> JitProgram {
    arena();
    let p = assemble_program(&format!("mov r0, r1\nadd r0, {add}\nexit")).unwrap();
    JitProgram::compile(&p, &Helpers::new(), JitOptions::checked()).unwrap()
}

/// `r0 = r1 + add` through `JitProgram::call`.
fn run(p: &JitProgram, r1: u64) -> u64 {
    p.call([r1, 0, 0, 0, 0]).unwrap()
}

fn word_at(addr: usize) -> u32 {
    // SAFETY: only called on 4-aligned addresses inside live JIT images (RX view, always
    // readable); the test's own thread is the only poker.
    unsafe { std::ptr::read_volatile(addr as *const u32) }
}

fn literal_at(addr: usize) -> u64 {
    // SAFETY: as in `word_at`, for the 8-aligned PLT literal.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// Where the program's PLT and site are, from its generated code.
struct Layout {
    site: usize,
    plt: usize,
    literal: usize,
}

fn layout(p: &JitProgram) -> Layout {
    let len = p.code().len();
    Layout {
        site: p.entry() + p.patch_site_offset(),
        plt: p.entry() + len - 16,
        literal: p.entry() + len - 8,
    }
}

/// The raw poke on this file's own images and programs.
fn text_poke(ip: usize, old: PokeInsn, new: PokeInsn) -> Result<PokeOutcome, PokeError> {
    // SAFETY: every target these tests branch a site to is complete code of this file (a stub,
    // a program, a trampoline-like image) that stays mapped while a site can branch there.
    unsafe { raw_text_poke(ip, old, new) }
}

/// Code in the global arena, registered as a trampoline image; freed on drop.
struct Image {
    alloc: Option<Allocation>,
}

impl Image {
    fn new(words: &[u32]) -> Image {
        let arena = arena();
        let bytes = words_to_bytes(words);
        let alloc = arena.alloc(bytes.len(), 16).unwrap();
        arena.write(&alloc, 0, &bytes).unwrap();
        // SAFETY: the image is this test's code in the global arena, unregistered before it is
        // freed; the tests poke only its first word, a `nop`/`b`/`bl` site.
        unsafe {
            let registry = Registry::global();
            registry
                .register(alloc.rx(), alloc.len(), ImageKind::Trampoline, 0)
                .unwrap();
            registry.add_site(alloc.rx()).unwrap();
        }
        Image { alloc: Some(alloc) }
    }

    fn addr(&self) -> usize {
        self.alloc.as_ref().unwrap().rx()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let alloc = self.alloc.take().unwrap();
        Registry::global().unregister(alloc.rx()).unwrap();
        // SAFETY: the tests join every thread that may run an image before dropping it.
        unsafe { arena().free(alloc).unwrap() };
    }
}

/// Code on its own page more than 128 MiB away from every arena address (out of `b`/`bl`
/// range), mapped RX (+ BTI when the arena has it); unmapped on drop.
struct FarCode {
    addr: usize,
    len: usize,
}

impl FarCode {
    fn new(words: &[u32]) -> FarCode {
        let bytes = words_to_bytes(words);
        let len = bytes.len().next_multiple_of(64 << 10);
        let range = arena().rx_range();
        // Try beyond the arena's reservation, then below it.
        let candidates = [
            range.end + (512 << 20),
            range.end + (3 << 30),
            range.start.saturating_sub(512 << 20).saturating_sub(len),
        ];
        for hint in candidates {
            // SAFETY: a fresh private mapping at a free address (FIXED_NOREPLACE never replaces
            // an existing mapping).
            let Ok(p) = (unsafe {
                mmap_anonymous(
                    hint as *mut c_void,
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
                )
            }) else {
                continue;
            };
            let addr = p as usize;
            // SAFETY: the mapping is ours and `len` ≥ the code's length.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast(), bytes.len()) };
            let mut prot = ProtFlags::READ | ProtFlags::EXEC;
            if arena().options().bti {
                prot |= ProtFlags::from_bits_retain(PROT_BTI);
            }
            // SAFETY: our own mapping; nothing runs it yet.
            unsafe { mprotect(p, len, MprotectFlags::from_bits_retain(prot.bits())) }.unwrap();
            // SAFETY: mapped readable.
            unsafe { sync_icache(addr, bytes.len()) };
            let far = FarCode { addr, len };
            assert!(
                far.is_far_from_arena(),
                "mapping at {addr:#x} is within reach"
            );
            return far;
        }
        panic!("no address space more than 128 MiB away from the arena");
    }

    fn is_far_from_arena(&self) -> bool {
        let r = arena().rx_range();
        self.addr >= r.end + (128 << 20) || self.addr + self.len + (128 << 20) <= r.start
    }
}

impl Drop for FarCode {
    fn drop(&mut self) {
        // SAFETY: the tests join every thread that may run the code before dropping it.
        let _ = unsafe { munmap(self.addr as *mut c_void, self.len) };
    }
}

const X15: Gpr = Gpr::new(15);
const X16: Gpr = Gpr::new(16);
const X17: Gpr = Gpr::new(17);

/// A call target with the trampoline convention: counts, then returns to the instruction after
/// the patch site with x30 restored from x9 (as the dummy trampoline does). `bti jc` lets the
/// PLT's `br x10` land on it. Preserves x0–x7 and x9.
fn counting_stub(counter: &'static AtomicU64) -> Vec<u32> {
    let mut w = vec![enc::BTI_JC];
    // ldr x16, counter address (the literal at word 10).
    w.push(enc::ldr_literal(true, X16, 9 * 4).unwrap());
    w.push(enc::ldaxr(true, X17, X16));
    w.push(enc::add_imm(true, X17, X17, 1).unwrap());
    w.push(enc::stlxr(true, X15, X17, X16));
    w.push(enc::cbnz(false, X15, -12).unwrap());
    w.push(enc::mov_reg(true, enc::X10, enc::LR));
    w.push(enc::mov_reg(true, enc::LR, enc::X9));
    w.push(enc::ret(enc::X10));
    w.push(enc::NOP);
    assert_eq!(w.len(), 10);
    // Word 10 (8-aligned in a 16-aligned image): the counter's address.
    let a = counter.as_ptr() as u64;
    w.extend([a as u32, (a >> 32) as u32]);
    w
}

/// A jump target: returns `value` to the program's caller (entered by `b`, so x30 still holds
/// the caller's return address).
fn replacement(value: u16) -> Vec<u32> {
    vec![
        enc::BTI_JC,
        enc::movz(true, enc::X0, value, 0),
        enc::ret(enc::LR),
    ]
}

fn bl_to(site: usize, target: usize) -> u32 {
    enc::bl(target as i64 - site as i64).unwrap()
}

#[test]
fn near_nop_call_jump_nop() {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let prog = program(1);
    let stub = Image::new(&counting_stub(&COUNT));
    let alt = Image::new(&replacement(100));
    let l = layout(&prog);
    assert_eq!(word_at(l.site), A64_NOP);
    assert_eq!(run(&prog, 1), 2);

    let call = PokeInsn::Call(stub.addr());
    assert_eq!(
        text_poke(prog.patch_site().ip(), PokeInsn::Nop, call),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(word_at(l.site), bl_to(l.site, stub.addr()));
    assert_eq!(decode_a64(l.site, word_at(l.site)), Some(call));
    assert_eq!(run(&prog, 1), 2);
    assert_eq!(COUNT.load(Ordering::Relaxed), 1);

    let jump = PokeInsn::Jump(alt.addr());
    assert_eq!(
        text_poke(prog.patch_site().ip(), call, jump),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(run(&prog, 1), 100);
    assert_eq!(COUNT.load(Ordering::Relaxed), 1);

    assert_eq!(
        text_poke(prog.patch_site().ip(), jump, PokeInsn::Nop),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(word_at(l.site), A64_NOP);
    assert_eq!(run(&prog, 1), 2);
    // Applying what is already there is reported, not an error.
    assert_eq!(
        text_poke(prog.patch_site().ip(), call, PokeInsn::Nop),
        Ok(PokeOutcome::AlreadyApplied)
    );
    // The literal never left the dummy trampoline.
    assert_eq!(literal_at(l.literal), dummy_trampoline().unwrap() as u64);
}

#[test]
fn far_targets_go_through_the_plt() {
    static FAR1: AtomicU64 = AtomicU64::new(0);
    static FAR2: AtomicU64 = AtomicU64::new(0);
    static NEAR: AtomicU64 = AtomicU64::new(0);
    let prog = program(5);
    let far1 = FarCode::new(&counting_stub(&FAR1));
    let far2 = FarCode::new(&counting_stub(&FAR2));
    let far_alt = FarCode::new(&replacement(777));
    let near = Image::new(&counting_stub(&NEAR));
    let l = layout(&prog);
    let dummy = dummy_trampoline().unwrap() as u64;
    let bl_plt = bl_to(l.site, l.plt);
    let e = prog.patch_site().ip();

    // nop -> far: the literal first, then `bl plt`.
    let c1 = PokeInsn::Call(far1.addr);
    assert_eq!(text_poke(e, PokeInsn::Nop, c1), Ok(PokeOutcome::Applied));
    assert_eq!(word_at(l.site), bl_plt);
    assert_eq!(literal_at(l.literal), far1.addr as u64);
    assert_eq!(run(&prog, 1), 6);
    assert_eq!(FAR1.load(Ordering::Relaxed), 1);

    // far -> far: only the literal changes.
    let c2 = PokeInsn::Call(far2.addr);
    assert_eq!(text_poke(e, c1, c2), Ok(PokeOutcome::Applied));
    assert_eq!(word_at(l.site), bl_plt);
    assert_eq!(literal_at(l.literal), far2.addr as u64);
    assert_eq!(run(&prog, 1), 6);
    assert_eq!(
        (FAR1.load(Ordering::Relaxed), FAR2.load(Ordering::Relaxed)),
        (1, 1)
    );
    assert_eq!(text_poke(e, c1, c2), Ok(PokeOutcome::AlreadyApplied));

    // far -> near: a direct `bl`; the literal keeps the old target for threads that executed
    // the old `bl plt` and have yet to load it.
    let cn = PokeInsn::Call(near.addr());
    assert_eq!(text_poke(e, c2, cn), Ok(PokeOutcome::Applied));
    assert_eq!(word_at(l.site), bl_to(l.site, near.addr()));
    assert_eq!(literal_at(l.literal), far2.addr as u64);
    assert_eq!(run(&prog, 1), 6);
    assert_eq!(NEAR.load(Ordering::Relaxed), 1);

    // near -> far jump: the literal last served a call, so it is refused until a grace period
    // is declared (a stale `bl plt` must never enter a replacement).
    let j = PokeInsn::Jump(far_alt.addr);
    assert!(matches!(
        text_poke(e, cn, j),
        Err(PokeError::PltKindChange { was_call: true, .. })
    ));
    assert_eq!(word_at(l.site), bl_to(l.site, near.addr()));
    assert_eq!(text_poke(e, cn, PokeInsn::Nop), Ok(PokeOutcome::Applied));
    // SAFETY: this test's own program; no other thread runs it.
    unsafe { plt_quiesced(prog.entry()) };
    assert_eq!(text_poke(e, PokeInsn::Nop, j), Ok(PokeOutcome::Applied));
    assert_eq!(
        word_at(l.site),
        enc::b(l.plt as i64 - l.site as i64).unwrap()
    );
    assert_eq!(literal_at(l.literal), far_alt.addr as u64);
    assert_eq!(run(&prog, 1), 777);
    assert_eq!(text_poke(e, j, PokeInsn::Nop), Ok(PokeOutcome::Applied));
    assert_eq!(word_at(l.site), A64_NOP);
    assert_eq!(literal_at(l.literal), far_alt.addr as u64);
    assert_eq!(run(&prog, 1), 6);
    // A thread that executed the old `b plt` just before the nop was stored still runs the
    // replacement (it used to land in the dummy trampoline and return r1).
    let rw = arena().rw_alias(l.site).unwrap();
    let set_word = |w: u32| {
        // SAFETY: the site is a 4-aligned word of this test's own image, which no other
        // thread runs; the store is single-copy atomic.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(rw.cast()).store(w, Ordering::Release) };
        arena().sync_text(l.site, 4).unwrap();
        sync_all_threads().unwrap();
    };
    set_word(enc::b(l.plt as i64 - l.site as i64).unwrap());
    assert_eq!(run(&prog, 1), 777);
    set_word(A64_NOP);
    let _ = dummy;
    assert_eq!(FAR1.load(Ordering::Relaxed), 1);
    assert_eq!(FAR2.load(Ordering::Relaxed), 1);
}

#[test]
fn mismatch_writes_nothing_literal_included() {
    static C1: AtomicU64 = AtomicU64::new(0);
    static C2: AtomicU64 = AtomicU64::new(0);
    let prog = program(1);
    let far1 = FarCode::new(&counting_stub(&C1));
    let far2 = FarCode::new(&counting_stub(&C2));
    let near = Image::new(&counting_stub(&C1));
    let l = layout(&prog);
    let e = prog.patch_site().ip();
    // The site holds a nop, not the expected call.
    let r = text_poke(e, PokeInsn::Call(near.addr()), PokeInsn::Call(far1.addr));
    assert_eq!(
        r,
        Err(PokeError::Mismatch {
            ip: l.site,
            expected: PokeInsn::Call(near.addr()),
            found: PokeInsn::Nop
        })
    );
    assert_eq!(word_at(l.site), A64_NOP);
    assert_eq!(literal_at(l.literal), dummy_trampoline().unwrap() as u64);
    // Same word (`bl plt`), different literal: still a mismatch, and the literal stays.
    let c1 = PokeInsn::Call(far1.addr);
    text_poke(e, PokeInsn::Nop, c1).unwrap();
    let r = text_poke(e, PokeInsn::Call(far2.addr), PokeInsn::Nop);
    assert_eq!(
        r,
        Err(PokeError::Mismatch {
            ip: l.site,
            expected: PokeInsn::Call(far2.addr),
            found: c1
        })
    );
    assert_eq!(literal_at(l.literal), far1.addr as u64);
    assert_eq!(word_at(l.site), bl_to(l.site, l.plt));
    // A jump where a call is expected.
    let r = text_poke(e, PokeInsn::Jump(far1.addr), PokeInsn::Nop);
    assert!(matches!(r, Err(PokeError::Mismatch { .. })));
    text_poke(e, c1, PokeInsn::Nop).unwrap();
}

#[test]
fn contract_errors() {
    let prog = program(1);
    // Not JIT text.
    let heap = Box::new(0u64);
    let ip = &*heap as *const u64 as usize;
    assert_eq!(
        text_poke(ip, PokeInsn::Nop, PokeInsn::Call(prog.entry())),
        Err(PokeError::NotText { ip })
    );
    // A site inside a trampoline image: near targets only.
    let tramp = Image::new(&[A64_NOP, enc::ret(enc::LR)]);
    let far = FarCode::new(&replacement(1));
    let r = text_poke(tramp.addr(), PokeInsn::Nop, PokeInsn::Jump(far.addr));
    assert_eq!(
        r,
        Err(PokeError::OutOfRange {
            ip: tramp.addr(),
            target: far.addr
        })
    );
    assert_eq!(word_at(tramp.addr()), A64_NOP);
    let target = tramp.addr() + 4;
    assert_eq!(
        text_poke(tramp.addr(), PokeInsn::Nop, PokeInsn::Jump(target)),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(word_at(tramp.addr()), enc::b(4).unwrap());
    assert_eq!(
        text_poke(tramp.addr(), PokeInsn::Jump(target), PokeInsn::Nop),
        Ok(PokeOutcome::Applied)
    );
    // Misaligned targets cannot be encoded.
    assert!(matches!(
        text_poke(
            prog.patch_site().ip(),
            PokeInsn::Nop,
            PokeInsn::Call(prog.entry() + 2)
        ),
        Err(PokeError::OutOfRange { .. })
    ));
    // Not a site: a word that is not nop/b/bl.
    assert!(matches!(
        text_poke(
            tramp.addr() + 4,
            PokeInsn::Nop,
            PokeInsn::Jump(tramp.addr())
        ),
        Err(PokeError::NotASite { .. })
    ));
    // A program image the JIT did not register a layout for cannot be poked at its entry.
    let bytes = words_to_bytes(&[A64_NOP, enc::ret(enc::LR)]);
    let a = arena().alloc(bytes.len(), 16).unwrap();
    arena().write(&a, 0, &bytes).unwrap();
    // SAFETY: this test's own code, never run, unregistered below.
    unsafe {
        Registry::global()
            .register(a.rx(), a.len(), ImageKind::Program, 0)
            .unwrap()
    };
    assert!(matches!(
        text_poke(a.rx(), PokeInsn::Nop, PokeInsn::Jump(a.rx() + 4)),
        Err(PokeError::NotASite { .. })
    ));
    // A layout outside the image is refused.
    assert!(
        register_program_site(
            a.rx(),
            ProgramSite {
                site: 0,
                plt: 0,
                literal: 8
            }
        )
        .is_err()
    );
    Registry::global().unregister(a.rx()).unwrap();
    // SAFETY: never run.
    unsafe { arena().free(a).unwrap() };
    assert_eq!(unregister_program_site(12345), None);
}

/// The dummy trampoline is a valid target of the PLT's `br x10` (under BTI, a `bti j` landing
/// pad): with the literal at the dummy, `bl plt` at the site behaves like the nop.
#[test]
fn dummy_trampoline_behind_the_plt_behaves_like_the_nop() {
    let prog = program(3);
    let l = layout(&prog);
    assert_eq!(literal_at(l.literal), dummy_trampoline().unwrap() as u64);
    let dummy = dummy_trampoline().unwrap();
    assert_eq!(word_at(dummy), DUMMY_TRAMPOLINE[0]);
    assert_eq!(
        Registry::global().lookup(dummy).map(|s| s.kind),
        Some(ImageKind::Trampoline)
    );
    // Write `bl plt` by hand, leaving the literal at the dummy (the window text_poke allows
    // when a thread sees the branch before the literal).
    let rw = arena().rw_alias(l.site).unwrap();
    // SAFETY: the site is a 4-aligned word of this test's own image, which no other thread
    // runs; the store is single-copy atomic.
    unsafe {
        std::sync::atomic::AtomicU32::from_ptr(rw.cast())
            .store(bl_to(l.site, l.plt), Ordering::Release)
    };
    arena().sync_text(l.site, 4).unwrap();
    sync_all_threads().unwrap();
    for r1 in [0, 1, 1000] {
        assert_eq!(run(&prog, r1), r1 + 3);
    }
    // text_poke sees `bl plt` with the dummy literal as a call to the dummy.
    assert_eq!(
        text_poke(prog.patch_site().ip(), PokeInsn::Call(dummy), PokeInsn::Nop),
        Ok(PokeOutcome::Applied)
    );
    assert_eq!(word_at(l.site), A64_NOP);
}

#[test]
fn prologue_site_layout_with_and_without_bti() {
    arena();
    let p = assemble_program("mov r0, 1\nexit").unwrap();
    for bti in [false, true] {
        let prog =
            JitProgram::compile(&p, &Helpers::new(), JitOptions::checked().with_bti(bti)).unwrap();
        let forced = bti || arena().options().bti;
        assert_eq!(prog.patch_site_offset(), if forced { 8 } else { 4 });
        assert_eq!(word_at(prog.entry() + prog.patch_site_offset()), A64_NOP);
        assert_eq!(
            word_at(prog.entry() + prog.patch_site_offset() - 4),
            enc::mov_reg(true, enc::X9, enc::LR)
        );
        // Poking the entry patches the site wherever it is.
        static C: AtomicU64 = AtomicU64::new(0);
        let stub = Image::new(&counting_stub(&C));
        let before = C.load(Ordering::Relaxed);
        text_poke(
            prog.patch_site().ip(),
            PokeInsn::Nop,
            PokeInsn::Call(stub.addr()),
        )
        .unwrap();
        assert_eq!(prog.call([0; 5]), Ok(1));
        assert_eq!(C.load(Ordering::Relaxed), before + 1);
        text_poke(
            prog.patch_site().ip(),
            PokeInsn::Call(stub.addr()),
            PokeInsn::Nop,
        )
        .unwrap();
    }
}

/// Two threads run the program while this one switches its site ≥ 10,000 times through every
/// transition — nop, near call, far call (PLT), another far call (literal only), back — and
/// every result must be right.
#[test]
fn site_switched_under_two_runners_with_far_targets() {
    static NEAR: AtomicU64 = AtomicU64::new(0);
    static FAR1: AtomicU64 = AtomicU64::new(0);
    static FAR2: AtomicU64 = AtomicU64::new(0);
    let pokes: usize = std::env::var("LIVEBPF_POKE_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let prog = Arc::new(program(7));
    let near = Image::new(&counting_stub(&NEAR));
    let far1 = FarCode::new(&counting_stub(&FAR1));
    let far2 = FarCode::new(&counting_stub(&FAR2));
    let cycle = [
        PokeInsn::Nop,
        PokeInsn::Call(near.addr()),
        PokeInsn::Call(far1.addr),
        PokeInsn::Call(far2.addr),
        PokeInsn::Nop,
        PokeInsn::Call(far2.addr),
        PokeInsn::Call(near.addr()),
        PokeInsn::Call(far1.addr),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let runners: Vec<_> = (0..2)
        .map(|t| {
            let prog = Arc::clone(&prog);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut runs = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = runs.wrapping_mul(31).wrapping_add(t);
                    assert_eq!(prog.call([x, 0, 0, 0, 0]), Ok(x + 7));
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    let started = std::time::Instant::now();
    let e = prog.patch_site().ip();
    for i in 0..pokes {
        let old = cycle[i % cycle.len()];
        let new = cycle[(i + 1) % cycle.len()];
        assert_eq!(text_poke(e, old, new), Ok(PokeOutcome::Applied), "poke {i}");
    }
    let elapsed = started.elapsed();
    let last = cycle[pokes % cycle.len()];
    text_poke(e, last, PokeInsn::Nop).unwrap();
    stop.store(true, Ordering::Relaxed);
    let runs: u64 = runners.into_iter().map(|r| r.join().unwrap()).sum();
    let counts = [&NEAR, &FAR1, &FAR2].map(|c| c.load(Ordering::Relaxed));
    println!(
        "{pokes} pokes in {elapsed:?} ({:?} each), {runs} runs, calls near/far1/far2 {counts:?}",
        elapsed / pokes as u32
    );
    assert!(runs > 0);
    assert_eq!(run(&prog, 1), 8);
}
