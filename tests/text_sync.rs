//! membarrier-based cross-thread synchronisation, and publishing fresh code to running threads.

use livebpf::text::{SyncMode, sync_all_threads, sync_mode};

#[test]
fn membarrier_is_registered_and_works() {
    let mode = sync_mode();
    eprintln!("membarrier mode: {mode:?}");
    assert_ne!(
        mode,
        SyncMode::Unavailable,
        "this kernel should support private expedited membarrier"
    );
    assert_eq!(sync_mode(), mode, "registration is cached");
    for _ in 0..100 {
        assert_eq!(sync_all_threads().unwrap(), mode);
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn running_threads_pick_up_freshly_published_code() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use livebpf::text::{ArenaOptions, CodeArena};

    #[cfg(target_arch = "x86_64")]
    fn ret_imm(imm: u16) -> Vec<u8> {
        // mov eax, imm32; ret
        let i = u32::from(imm).to_le_bytes();
        vec![0xb8, i[0], i[1], i[2], i[3], 0xc3]
    }
    #[cfg(target_arch = "aarch64")]
    fn ret_imm(imm: u16) -> Vec<u8> {
        // bti c (a landing pad, for PROT_BTI pages); movz x0, #imm; ret
        let movz = 0xd280_0000u32 | (u32::from(imm) << 5);
        [0xd503_245f, movz, 0xd65f_03c0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    const ROUNDS: u16 = 20;
    let arena = CodeArena::new(ArenaOptions::default()).unwrap();
    let mut images = Vec::new();
    let publish = |round: u16, images: &mut Vec<_>| {
        let code = ret_imm(round);
        let a = arena.alloc(code.len(), 16).unwrap();
        arena.write(&a, 0, &code).unwrap();
        // Workers may have speculatively fetched this address range before (it is adjacent to
        // code they run): make every thread serialise before it can see the new pointer.
        sync_all_threads().unwrap();
        let rx = a.rx();
        images.push(a);
        rx
    };
    let current = Arc::new(AtomicUsize::new(publish(1, &mut images)));
    let stop = Arc::new(AtomicBool::new(false));

    let workers: Vec<_> = (0..3)
        .map(|_| {
            let current = Arc::clone(&current);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let call = |rx: usize| {
                    // SAFETY: every published address is the entry of a complete
                    // `fn() -> u64` written, synced and serialised (membarrier) before it was
                    // stored with Release; Acquire below pairs with it, and images stay
                    // allocated until all workers are joined.
                    unsafe {
                        let f: extern "C" fn() -> u64 = std::mem::transmute(rx as *const u8);
                        f()
                    }
                };
                let mut last = 0;
                let mut calls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = call(current.load(Ordering::Acquire));
                    assert!(v >= last && v <= u64::from(ROUNDS), "saw {v} after {last}");
                    last = v;
                    calls += 1;
                }
                last = call(current.load(Ordering::Acquire));
                (last, calls)
            })
        })
        .collect();

    for round in 2..=ROUNDS {
        std::thread::sleep(Duration::from_millis(2));
        let rx = publish(round, &mut images);
        current.store(rx, Ordering::Release);
    }
    std::thread::sleep(Duration::from_millis(2));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let (last, calls) = w.join().unwrap();
        assert_eq!(last, u64::from(ROUNDS));
        assert!(calls > 0);
    }
    for a in images {
        // SAFETY: all workers are joined; nothing runs the images any more.
        unsafe { arena.free(a) }.unwrap();
    }
    assert_eq!(arena.live_allocations(), 0);
}
