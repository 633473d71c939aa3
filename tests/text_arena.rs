//! Code arena: allocation, W^X mappings, writing and executing code, growth, concurrency.

use std::collections::BTreeMap;
use std::sync::Arc;

use livebpf::text::{
    Allocation, ArenaOptions, CodeArena, MAX_PAGE_SIZE, TRAP_FILL_BYTE, TextError, page_size,
};

fn arena() -> CodeArena {
    CodeArena::new(ArenaOptions::default()).expect("code arena")
}

fn small_chunks() -> CodeArena {
    CodeArena::new(ArenaOptions {
        chunk_size: MAX_PAGE_SIZE,
        max_size: 64 << 20,
        ..ArenaOptions::default()
    })
    .expect("code arena")
}

fn free(arena: &CodeArena, a: Allocation) {
    // SAFETY: the tests never execute an allocation after freeing it.
    unsafe { arena.free(a) }.expect("free");
}

#[test]
fn freed_block_is_reused() {
    let arena = arena();
    let a = arena.alloc(100, 16).unwrap();
    let b = arena.alloc(100, 16).unwrap();
    assert_eq!(arena.live_allocations(), 2);
    let a_rx = a.rx();
    assert_ne!(a_rx, b.rx());
    free(&arena, a);
    assert_eq!(arena.live_allocations(), 1);
    let c = arena.alloc(90, 16).unwrap();
    assert_eq!(c.rx(), a_rx, "first fit hands the freed block out again");
    free(&arena, b);
    free(&arena, c);
    assert_eq!(arena.live_allocations(), 0);
}

#[test]
fn neighbours_coalesce_into_one_block() {
    let arena = arena();
    let blocks: Vec<_> = (0..3).map(|_| arena.alloc(64, 16).unwrap()).collect();
    let first = blocks[0].rx();
    assert_eq!(blocks[1].rx(), first + 64);
    assert_eq!(blocks[2].rx(), first + 128);
    // Free the middle one last so that it must merge with both neighbours.
    let mut it = blocks.into_iter();
    let (a, b, c) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    free(&arena, a);
    free(&arena, c);
    free(&arena, b);
    let big = arena.alloc(192, 16).unwrap();
    assert_eq!(big.rx(), first);
    free(&arena, big);
}

#[test]
fn alignment_is_honoured() {
    let arena = arena();
    let mut held = Vec::new();
    for align in [1, 8, 16, 64, 256, 4096, page_size(), MAX_PAGE_SIZE, 2 << 20] {
        // An odd-sized block first, so the next one is not aligned by accident.
        held.push(arena.alloc(48, 16).unwrap());
        let a = arena.alloc(40, align).unwrap();
        assert_eq!(a.rx() % align, 0, "align {align}");
        assert_eq!(a.len(), 40);
        held.push(a);
    }
    for a in held {
        free(&arena, a);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let arena = CodeArena::new(ArenaOptions {
        max_size: 1 << 20,
        ..ArenaOptions::default()
    })
    .unwrap();
    assert!(matches!(arena.alloc(0, 16), Err(TextError::ZeroLength)));
    for align in [0, 3, 48, 1 << 21] {
        assert!(
            matches!(arena.alloc(8, align), Err(TextError::BadAlignment { .. })),
            "align {align}"
        );
    }
    assert!(matches!(
        arena.alloc(usize::MAX, 16),
        Err(TextError::ArenaFull { .. })
    ));
    assert!(matches!(
        arena.alloc((1 << 20) + 1, 16),
        Err(TextError::ArenaFull { .. })
    ));
    let whole = arena
        .alloc(1 << 20, 16)
        .expect("the reservation holds exactly this");
    assert!(matches!(
        arena.alloc(16, 16),
        Err(TextError::ArenaFull { .. })
    ));
    free(&arena, whole);
    let a = arena.alloc(32, 16).unwrap();
    let oob = |r| matches!(r, Err(TextError::OutOfBounds { .. }));
    assert!(oob(arena.write(&a, 30, &[1, 2, 3])));
    assert!(oob(arena.write(&a, usize::MAX, &[1])));
    assert!(oob(arena.read(&a, 33, &mut [])));
    assert!(arena.write(&a, 32, &[]).is_ok());

    let other = self::arena();
    assert!(matches!(
        other.write(&a, 0, &[1]),
        Err(TextError::ForeignAllocation { .. })
    ));
    assert!(matches!(
        other.sync_text(a.rx(), 1),
        Err(TextError::NotArenaText { .. })
    ));
    // SAFETY: never executed.
    assert!(matches!(
        unsafe { other.free(a) },
        Err(TextError::ForeignAllocation { .. })
    ));
    // `a` is now leaked in `arena`: dropping the arena then keeps its mappings alive.
    assert_eq!(arena.live_allocations(), 1);
}

#[test]
fn error_messages_say_what_to_do() {
    let msg = TextError::MemfdCreate(rustix::io::Errno::NOSYS).to_string();
    assert!(msg.contains("Linux ≥ 3.17"), "{msg}");
    let msg = TextError::BadAlignment {
        align: 3,
        max_size: 1 << 30,
    }
    .to_string();
    assert!(msg.contains("power of two"), "{msg}");
}

#[test]
fn new_and_freed_text_is_trap_filled() {
    let arena = arena();
    let a = arena.alloc(40, 16).unwrap();
    let mut buf = [0u8; 40];
    arena.read(&a, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == TRAP_FILL_BYTE));
    arena.write(&a, 0, &[0x90; 40]).unwrap();
    arena.read(&a, 0, &mut buf).unwrap();
    assert_eq!(buf, [0x90; 40]);
    let rx = a.rx();
    free(&arena, a);
    let b = arena.alloc(40, 16).unwrap();
    assert_eq!(b.rx(), rx);
    arena.read(&b, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == TRAP_FILL_BYTE));
    free(&arena, b);
}

/// One line of /proc/self/maps: address range, permissions and path.
struct MapLine {
    start: usize,
    end: usize,
    perms: String,
    path: String,
}

fn maps() -> Vec<MapLine> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    text.lines()
        .map(|line| {
            let mut f = line.split_whitespace();
            let (start, end) = f.next().unwrap().split_once('-').unwrap();
            let perms = f.next().unwrap().to_string();
            let path = f.nth(3).unwrap_or("").to_string();
            MapLine {
                start: usize::from_str_radix(start, 16).unwrap(),
                end: usize::from_str_radix(end, 16).unwrap(),
                perms,
                path,
            }
        })
        .collect()
}

fn perms_at(addr: usize) -> String {
    maps()
        .into_iter()
        .find(|m| (m.start..m.end).contains(&addr))
        .map(|m| m.perms)
        .unwrap_or_default()
}

#[test]
fn views_are_w_xor_x() {
    let arena = arena();
    let a = arena.alloc(4096, 16).unwrap();
    // Shared file mappings show `s` in the fourth column.
    assert_eq!(perms_at(a.rx()), "r-xs");
    assert_eq!(perms_at(a.rw_ptr() as usize), "rw-s");
    let range = arena.rx_range();
    for m in maps() {
        let in_rx = m.start < range.end && range.start < m.end;
        let ours = m.path.starts_with("/memfd:livebpf-text");
        if in_rx || ours {
            assert!(
                !(m.perms.contains('w') && m.perms.contains('x')),
                "writable and executable: {:#x}-{:#x} {} {}",
                m.start,
                m.end,
                m.perms,
                m.path
            );
        }
    }
    free(&arena, a);
}

#[test]
fn rw_alias_maps_rx_to_rw() {
    let arena = arena();
    let a = arena.alloc(64, 16).unwrap();
    assert_eq!(arena.rw_alias(a.rx()), Some(a.rw_ptr()));
    assert_eq!(
        arena.rw_alias(a.rx() + 63),
        Some(a.rw_ptr().wrapping_add(63))
    );
    assert!(arena.contains(a.rx()));
    assert_eq!(arena.rw_alias(arena.rx_range().start - 1), None);
    assert_eq!(
        arena.rw_alias(arena.rx_range().start + arena.committed_bytes()),
        None
    );
    assert_eq!(arena.rw_alias(0), None);
    free(&arena, a);
}

#[test]
fn growth_across_many_chunks() {
    let arena = small_chunks();
    let mut held: BTreeMap<usize, usize> = BTreeMap::new();
    let mut allocs = Vec::new();
    for i in 0..2000 {
        let len = 100 + (i * 37) % 900;
        let a = arena.alloc(len, 16).unwrap();
        assert!(arena.rx_range().contains(&a.rx()));
        arena.write(&a, len - 1, &[i as u8]).unwrap();
        held.insert(a.rx(), len);
        allocs.push(a);
    }
    assert!(
        arena.committed_bytes() > 10 * MAX_PAGE_SIZE,
        "grew in chunks"
    );
    let mut prev_end = 0;
    for (&start, &len) in &held {
        assert!(start >= prev_end, "overlap at {start:#x}");
        prev_end = start + len;
    }
    // An image bigger than a chunk grows the arena by as much as it needs.
    let big = arena.alloc(5 << 20, 4096).unwrap();
    arena.write(&big, (5 << 20) - 1, &[1]).unwrap();
    for (i, a) in allocs.iter().enumerate() {
        let mut b = [0];
        arena.read(a, a.len() - 1, &mut b).unwrap();
        assert_eq!(b[0], i as u8);
    }
    let committed = arena.committed_bytes();
    for a in allocs {
        free(&arena, a);
    }
    free(&arena, big);
    assert_eq!(arena.live_allocations(), 0);
    // Everything coalesced: one allocation of the whole committed size fits without growing.
    let all = arena.alloc(committed, 16).unwrap();
    assert_eq!(arena.committed_bytes(), committed);
    free(&arena, all);
}

#[test]
fn concurrent_alloc_free_from_four_threads() {
    let arena = Arc::new(small_chunks());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let arena = Arc::clone(&arena);
            std::thread::spawn(move || {
                let mut held: Vec<(Allocation, u8)> = Vec::new();
                for i in 0..1500usize {
                    if i % 3 == 2 {
                        let (a, tag) = held.swap_remove(i % held.len());
                        let mut buf = vec![0; a.len()];
                        arena.read(&a, 0, &mut buf).unwrap();
                        assert!(buf.iter().all(|&b| b == tag), "another thread wrote here");
                        free(&arena, a);
                    } else {
                        let len = 16 + (i * 53 + t as usize * 7) % 700;
                        let align = [8, 16, 64, 256][i % 4];
                        let a = arena.alloc(len, align).unwrap();
                        assert_eq!(a.rx() % align, 0);
                        let tag = t.wrapping_mul(61).wrapping_add(i as u8) | 1;
                        arena.write(&a, 0, &vec![tag; len]).unwrap();
                        held.push((a, tag));
                    }
                }
                for (a, _) in held {
                    free(&arena, a);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(arena.live_allocations(), 0);
}

#[test]
fn global_arena_is_shared_and_configured_once() {
    let a = CodeArena::global().unwrap();
    let b = CodeArena::global().unwrap();
    assert!(std::ptr::eq(a, b));
    assert!(matches!(
        CodeArena::init_global(ArenaOptions::default()),
        Err(TextError::GlobalAlreadyInitialized)
    ));
}

#[cfg(target_arch = "x86_64")]
mod exec {
    use super::*;

    /// mov eax, 42; ret
    pub const RET_42: [u8; 6] = [0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3];

    pub fn ret_imm(imm: u32) -> [u8; 6] {
        let i = imm.to_le_bytes();
        [0xb8, i[0], i[1], i[2], i[3], 0xc3]
    }

    /// Call the code at `a` as a sysv64 function returning u64.
    ///
    /// # Safety
    /// `a` must hold a complete function of that signature, synced with `sync_text`.
    pub unsafe fn call(a: &Allocation) -> u64 {
        // SAFETY: forwarded from the contract: the address is the entry of a valid
        // `extern "sysv64" fn() -> u64` in executable memory; `mov eax` zero-extends into rax.
        unsafe {
            let f: extern "sysv64" fn() -> u64 = std::mem::transmute(a.rx_ptr());
            f()
        }
    }

    #[test]
    fn write_then_execute() {
        for opts in [
            ArenaOptions::default(),
            ArenaOptions {
                stale_alias_workaround: true,
                ..ArenaOptions::default()
            },
        ] {
            let arena = CodeArena::new(opts).unwrap();
            let a = arena.alloc(RET_42.len(), 16).unwrap();
            arena.write(&a, 0, &RET_42).unwrap();
            // SAFETY: `a` holds `mov eax, 42; ret`, written and synced by `write`.
            assert_eq!(unsafe { call(&a) }, 42);

            // Rewrite through the raw alias, as the poker will.
            let alias = arena.rw_alias(a.rx() + 1).unwrap();
            // SAFETY: `alias` points at the 4-byte immediate inside `a`, which only this thread
            // uses; the unaligned write is fine for a raw pointer.
            unsafe { alias.cast::<u32>().write_unaligned(7) };
            arena.sync_text(a.rx() + 1, 4).unwrap();
            // SAFETY: now `mov eax, 7; ret`.
            assert_eq!(unsafe { call(&a) }, 7);
            free(&arena, a);
        }
    }

    #[test]
    fn reused_block_runs_new_code() {
        let arena = arena();
        let a = arena.alloc(6, 64).unwrap();
        arena.write(&a, 0, &ret_imm(1)).unwrap();
        // SAFETY: valid function, synced.
        assert_eq!(unsafe { call(&a) }, 1);
        let rx = a.rx();
        free(&arena, a);
        let b = arena.alloc(6, 64).unwrap();
        assert_eq!(b.rx(), rx);
        arena.write(&b, 0, &ret_imm(2)).unwrap();
        // SAFETY: valid function, synced.
        assert_eq!(unsafe { call(&b) }, 2);
        free(&arena, b);
    }
}

#[cfg(target_arch = "aarch64")]
mod exec {
    use super::*;

    /// bti c; mov x0, #42; ret (words d503245f, d2800540, d65f03c0). The landing pad is needed
    /// where the arena maps pages with PROT_BTI (the default on CPUs with BTI).
    const RET_42: [u8; 12] = [
        0x5f, 0x24, 0x03, 0xd5, 0x40, 0x05, 0x80, 0xd2, 0xc0, 0x03, 0x5f, 0xd6,
    ];

    #[test]
    fn write_then_execute() {
        for opts in [
            ArenaOptions::default(),
            ArenaOptions {
                stale_alias_workaround: true,
                ..ArenaOptions::default()
            },
        ] {
            let arena = CodeArena::new(opts).unwrap();
            let a = arena.alloc(RET_42.len(), 16).unwrap();
            arena.write(&a, 0, &RET_42).unwrap();
            // SAFETY: `a` holds `mov x0, #42; ret`, written and synced (cache maintenance) by
            // `write`; the AAPCS64 "C" ABI returns u64 in x0.
            let v = unsafe {
                let f: extern "C" fn() -> u64 = std::mem::transmute(a.rx_ptr());
                f()
            };
            assert_eq!(v, 42);
            free(&arena, a);
        }
    }
}
