//! Program registry: address → image lookups, overlap rules, concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use livebpf::text::{ImageKind, Registry, Symbol, TextError};

// SAFETY (of every `register` below): these registries hold made-up ranges that no code
// patches or runs; the global registry is only given a range of this test's own.

#[test]
fn lookup_inside_at_edges_outside_and_after_unregister() {
    let r = Registry::new();
    unsafe { r.register(0x1000, 0x100, ImageKind::Program, 7) }.unwrap();
    unsafe { r.register(0x1100, 0x40, ImageKind::Plt, 7) }.unwrap(); // adjacent is fine
    unsafe { r.register(0x2000, 0x10, ImageKind::Trampoline, 9) }.unwrap();
    let sym = |offset| Symbol {
        start: 0x1000,
        len: 0x100,
        kind: ImageKind::Program,
        owner: 7,
        offset,
    };
    assert_eq!(r.lookup(0x1000), Some(sym(0)));
    assert_eq!(r.lookup(0x1080), Some(sym(0x80)));
    assert_eq!(r.lookup(0x10ff), Some(sym(0xff)));
    assert_eq!(
        r.lookup(0x1100).map(|s| (s.kind, s.offset)),
        Some((ImageKind::Plt, 0))
    );
    assert_eq!(r.lookup(0x0fff), None);
    assert_eq!(r.lookup(0x1140), None);
    assert_eq!(r.lookup(0x2010), None);
    assert_eq!(r.lookup(0), None);
    assert_eq!(r.lookup(usize::MAX), None);
    assert_eq!(r.lookup(0x200f).map(|s| s.owner), Some(9));
    assert_eq!(r.len(), 3);

    assert_eq!(r.unregister(0x1000), Ok(sym(0)));
    assert_eq!(r.lookup(0x1000), None);
    assert_eq!(r.lookup(0x10ff), None);
    assert!(r.lookup(0x1100).is_some());
    assert_eq!(
        r.unregister(0x1000),
        Err(TextError::NotRegistered { start: 0x1000 })
    );
    assert!(matches!(
        r.unregister(0x1101),
        Err(TextError::NotRegistered { .. })
    ));
    assert_eq!(
        r.symbols().iter().map(|s| s.start).collect::<Vec<_>>(),
        [0x1100, 0x2000]
    );
}

#[test]
fn overlapping_or_invalid_ranges_are_refused() {
    let r = Registry::new();
    unsafe { r.register(0x1000, 0x100, ImageKind::Program, 1) }.unwrap();
    for (start, len) in [
        (0x1000, 0x100), // identical
        (0x0f00, 0x101), // overlaps the head
        (0x10ff, 0x10),  // overlaps the tail
        (0x1010, 0x10),  // inside
        (0x0f00, 0x300), // contains
    ] {
        assert!(
            matches!(
                unsafe { r.register(start, len, ImageKind::Other, 2) },
                Err(TextError::Overlap {
                    existing_start: 0x1000,
                    ..
                })
            ),
            "{start:#x}+{len:#x}"
        );
    }
    assert!(matches!(
        unsafe { r.register(0x5000, 0, ImageKind::Other, 2) },
        Err(TextError::InvalidRange { .. })
    ));
    assert!(matches!(
        unsafe { r.register(usize::MAX, 2, ImageKind::Other, 2) },
        Err(TextError::InvalidRange { .. })
    ));
    unsafe { r.register(0x0f00, 0x100, ImageKind::Other, 3) }.unwrap();
    unsafe { r.register(usize::MAX - 1, 1, ImageKind::Other, 4) }.unwrap();
    assert_eq!(r.lookup(usize::MAX - 1).map(|s| s.owner), Some(4));
    assert_eq!(r.lookup(usize::MAX), None);
    assert_eq!(r.len(), 3);
    assert_eq!(r.lookup(0x1000).map(|s| s.owner), Some(1), "unchanged");
}

#[test]
fn global_registry_is_one_instance() {
    let g = Registry::global();
    assert!(std::ptr::eq(g, Registry::global()));
    // An address no other test uses.
    let start = usize::MAX - 0x1000;
    unsafe { g.register(start, 0x10, ImageKind::Other, 42) }.unwrap();
    assert_eq!(
        Registry::global().lookup(start + 3).map(|s| s.offset),
        Some(3)
    );
    g.unregister(start).unwrap();
}

#[test]
fn concurrent_lookups_while_registering() {
    let r = Arc::new(Registry::new());
    // Stable images at even 0x1000 slots; the writer churns odd slots between them.
    for i in 0..64usize {
        unsafe { r.register(0x10_0000 + i * 0x2000, 0x1000, ImageKind::Program, i as u64) }
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4usize)
        .map(|t| {
            let r = Arc::clone(&r);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut seen_transient = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 10_000 {
                    let i = (n as usize * 7 + t) % 64;
                    let off = (n as usize * 13) % 0x1000;
                    let s = r
                        .lookup(0x10_0000 + i * 0x2000 + off)
                        .expect("stable image");
                    assert_eq!(
                        (s.owner, s.offset, s.kind),
                        (i as u64, off, ImageKind::Program)
                    );
                    // A churned slot is either absent or exactly the writer's entry.
                    let odd = 0x10_1000 + i * 0x2000;
                    if let Some(s) = r.lookup(odd + off) {
                        assert_eq!(
                            (s.start, s.owner, s.kind, s.offset),
                            (odd, 1000 + i as u64, ImageKind::Trampoline, off)
                        );
                        seen_transient += 1;
                    }
                    n += 1;
                }
                (n, seen_transient)
            })
        })
        .collect();
    for round in 0..200usize {
        for i in 0..64usize {
            let odd = 0x10_1000 + i * 0x2000;
            if round % 2 == 0 {
                unsafe { r.register(odd, 0x1000, ImageKind::Trampoline, 1000 + i as u64) }.unwrap();
            } else {
                r.unregister(odd).unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in readers {
        let (n, _) = t.join().unwrap();
        assert!(n >= 10_000);
    }
    assert_eq!(r.len(), 64);
}

#[test]
fn sites_live_inside_their_image_and_go_with_it() {
    let r = Registry::new();
    // SAFETY: made-up ranges of a local registry that nothing patches.
    unsafe {
        assert_eq!(
            r.add_site(0x1000),
            Err(TextError::NotRegistered { start: 0x1000 })
        );
        r.register(0x1000, 0x100, ImageKind::Program, 1).unwrap();
        r.add_site(0x1008).unwrap();
    }
    assert!(r.is_site(0x1008));
    assert!(!r.is_site(0x1000));
    r.unregister(0x1000).unwrap();
    assert!(!r.is_site(0x1008));
}
