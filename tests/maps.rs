//! Maps: the kernel's errnos and flag semantics, LRU eviction, per-CPU slots, the ring buffer,
//! the program array, typed handles, helpers, and the value-pointer invariant under concurrency.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use livebpf::exec::{Access, ExecError, RunEnv};
use livebpf::maps::{self, *};
use livebpf::reclaim::{self, ReadGuard};

const ENOENT: i32 = -libc::ENOENT;
const EEXIST: i32 = -libc::EEXIST;
const E2BIG: i32 = -libc::E2BIG;
const EINVAL: i32 = -libc::EINVAL;
const EPERM: i32 = -libc::EPERM;
const EAGAIN: i32 = -libc::EAGAIN;
const EBUSY: i32 = -libc::EBUSY;
const ENOTSUPP_: i32 = -(ENOTSUPP);

fn spec(t: MapType, key: u32, value: u32, max: u32) -> MapSpec {
    MapSpec::new("test", t, key, value, max)
}

fn create(t: MapType, key: u32, value: u32, max: u32) -> Map {
    Map::create(&spec(t, key, value, max)).expect("map is created")
}

fn create_err(s: MapSpec) -> i32 {
    Map::create(&s).expect_err("creation is refused").errno()
}

fn err<T: std::fmt::Debug>(r: Result<T, MapError>) -> i32 {
    r.expect_err("the operation fails").errno()
}

fn page() -> u32 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) as u32
}

fn k32(k: u32) -> [u8; 4] {
    k.to_ne_bytes()
}

/// BPF-side update of a map, as a helper would call it.
fn bpf_update(map: &Map, key: &[u8], value: &[u8], flags: u64) -> i64 {
    assert_eq!(key.len(), map.spec().key_size as usize);
    // SAFETY: buffers of the map's sizes (value_size for BPF-side updates).
    unsafe { map.update_elem(key.as_ptr(), value.as_ptr(), flags) }
}

fn bpf_delete(map: &Map, key: &[u8]) -> i64 {
    // SAFETY: a key of the map's size.
    unsafe { map.delete_elem(key.as_ptr()) }
}

/// A BPF-side lookup, copying `len` bytes of the value inside a run.
fn bpf_lookup(map: &Map, key: &[u8], len: usize) -> Option<Vec<u8>> {
    let _run = ReadGuard::new();
    // SAFETY: a key of the map's size, inside a run.
    let p = unsafe { map.lookup_ptr(key.as_ptr()) };
    // SAFETY: the value has at least `len` bytes and stays alive during the run.
    (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p, len) }.to_vec())
}

// ------------------------------------------------------------------------------ creation

#[test]
fn maps_are_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Map>();
    fn send<T: Send>() {}
    send::<RingBufConsumer>();
}

#[test]
fn creation_is_validated_like_the_kernel() {
    use MapType::*;
    // Arrays: key_size 4, value_size and max_entries non-zero.
    assert_eq!(create_err(spec(Array, 8, 4, 1)), EINVAL);
    assert_eq!(create_err(spec(Array, 4, 0, 1)), EINVAL);
    assert_eq!(create_err(spec(Array, 4, 4, 0)), EINVAL);
    assert_eq!(create_err(spec(PercpuArray, 4, 0, 1)), EINVAL);
    assert_eq!(create_err(spec(Array, 4, 5 << 20, 1)), E2BIG);
    assert_eq!(create_err(spec(PercpuArray, 4, (32 << 10) + 1, 1)), E2BIG);
    // EINVAL checks come before E2BIG ones.
    assert_eq!(create_err(spec(Array, 8, 5 << 20, 1)), EINVAL);
    assert_eq!(
        create_err(spec(Array, 4, 4, 1).with_flags(BPF_F_NO_PREALLOC)),
        EINVAL
    );
    assert_eq!(
        create_err(spec(Array, 4, 4, 1).with_flags(BPF_F_PRESERVE_ELEMS)),
        EINVAL
    );
    assert_eq!(
        create_err(spec(PercpuArray, 4, 4, 1).with_flags(BPF_F_MMAPABLE)),
        EINVAL
    );
    assert_eq!(
        create_err(spec(PercpuArray, 4, 4, 1).with_flags(BPF_F_NUMA_NODE)),
        EINVAL
    );
    Map::create(&spec(Array, 4, 4, 1).with_flags(BPF_F_MMAPABLE | BPF_F_NUMA_NODE)).unwrap();
    // Program arrays: 4-byte values.
    assert_eq!(create_err(spec(ProgArray, 4, 8, 4)), EINVAL);
    assert_eq!(create_err(spec(ProgArray, 4, 4, 0)), EINVAL);
    assert_eq!(
        create_err(spec(ProgArray, 4, 4, 4).with_flags(BPF_F_INNER_MAP)),
        EINVAL
    );
    // Hash maps.
    for t in [Hash, PercpuHash, LruHash, LruPercpuHash] {
        assert_eq!(create_err(spec(t, 0, 4, 1)), EINVAL, "{t:?}");
        assert_eq!(create_err(spec(t, 4, 0, 1)), EINVAL, "{t:?}");
        assert_eq!(create_err(spec(t, 4, 4, 0)), EINVAL, "{t:?}");
        assert_eq!(create_err(spec(t, 4, 4, 1).with_flags(1 << 20)), EINVAL);
        assert_eq!(create_err(spec(t, 4 << 20, 4, 1)), E2BIG, "{t:?}");
        assert_eq!(create_err(spec(t, 4, 4, (1 << 27) + 1)), E2BIG, "{t:?}");
    }
    assert_eq!(create_err(spec(PercpuHash, 4, (32 << 10) + 1, 1)), E2BIG);
    assert_eq!(
        create_err(spec(Hash, 4, 4, 1).with_flags(BPF_F_NO_COMMON_LRU)),
        EINVAL
    );
    assert_eq!(
        create_err(spec(LruHash, 4, 4, 1).with_flags(BPF_F_NO_PREALLOC)),
        ENOTSUPP_
    );
    assert_eq!(
        create_err(spec(PercpuHash, 4, 4, 1).with_flags(BPF_F_NUMA_NODE)),
        EINVAL
    );
    Map::create(&spec(Hash, 4, 4, 1).with_flags(BPF_F_NO_PREALLOC | BPF_F_ZERO_SEED)).unwrap();
    Map::create(&spec(LruHash, 4, 4, 1).with_flags(BPF_F_NO_COMMON_LRU)).unwrap();
    // Ring buffers: a power of 2, a multiple of the page, no key or value.
    let p = page();
    assert_eq!(create_err(spec(Ringbuf, 0, 0, 3 * p)), EINVAL);
    assert_eq!(create_err(spec(Ringbuf, 0, 0, p / 2)), EINVAL);
    assert_eq!(create_err(spec(Ringbuf, 0, 0, 0)), EINVAL);
    assert_eq!(create_err(spec(Ringbuf, 4, 0, p)), EINVAL);
    assert_eq!(create_err(spec(Ringbuf, 0, 4, p)), EINVAL);
    assert_eq!(
        create_err(spec(Ringbuf, 0, 0, p).with_flags(BPF_F_NO_PREALLOC)),
        EINVAL
    );
    Map::create(&spec(Ringbuf, 0, 0, 4 * p)).unwrap();
    // Access flags and names.
    assert_eq!(
        create_err(spec(Hash, 4, 4, 1).with_flags(BPF_F_RDONLY | BPF_F_WRONLY)),
        EINVAL
    );
    assert_eq!(
        create_err(spec(Array, 4, 4, 1).with_flags(BPF_F_RDONLY_PROG | BPF_F_WRONLY_PROG)),
        EINVAL
    );
    let mut long = spec(Hash, 4, 4, 1);
    long.name = "a_name_of_16_chr".into();
    assert_eq!(create_err(long), EINVAL);
    let mut bad = spec(Hash, 4, 4, 1);
    bad.name = "no spaces".into();
    assert_eq!(create_err(bad), EINVAL);
    let mut ok = spec(Hash, 4, 4, 1);
    ok.name = ".bss.counters_1".into();
    Map::create(&ok).unwrap();
    // The message says what to do.
    let e = Map::create(&spec(Array, 8, 4, 1)).unwrap_err();
    assert!(e.to_string().contains("key_size to 4"), "{e}");
    // Allocation failures are ENOMEM: 2^30 values of 4 MiB.
    assert_eq!(create_err(spec(Array, 4, 4 << 20, 1 << 30)), -libc::ENOMEM);
    assert_eq!(MapType::from_kernel(27), Some(Ringbuf));
    assert_eq!(LruPercpuHash.kernel_id(), 10);
}

// ------------------------------------------------------------------------------ arrays

#[test]
fn array_element_ops_return_the_kernels_errors() {
    let map = create(MapType::Array, 4, 8, 4);
    let v = 7u64.to_ne_bytes();
    // Every element exists (zeroed).
    assert_eq!(map.lookup(&k32(3)).unwrap(), Some(vec![0; 8]));
    assert_eq!(map.lookup(&k32(4)).unwrap(), None);
    assert_eq!(err(map.update(&k32(0), &v, BPF_NOEXIST)), EEXIST);
    assert_eq!(err(map.update(&k32(4), &v, BPF_ANY)), E2BIG);
    // Bad flags are EINVAL before the index is looked at.
    assert_eq!(err(map.update(&k32(4), &v, 3)), EINVAL);
    assert_eq!(err(map.update(&k32(0), &v, BPF_F_LOCK)), EINVAL);
    assert_eq!(err(map.update(&k32(0), &v, BPF_F_LOCK | BPF_EXIST)), EINVAL);
    assert_eq!(err(map.delete(&k32(0))), EINVAL);
    assert_eq!(err(map.delete(&k32(9))), EINVAL);
    map.update(&k32(1), &v, BPF_EXIST).unwrap();
    map.update(&k32(2), &v, BPF_ANY).unwrap();
    assert_eq!(map.lookup(&k32(1)).unwrap(), Some(v.to_vec()));
    // Buffer sizes.
    assert_eq!(err(map.update(&k32(0), &[0; 4], BPF_ANY)), EINVAL);
    assert_eq!(err(map.lookup(&[0; 8])), EINVAL);
    // The BPF side returns the same errnos.
    assert_eq!(bpf_update(&map, &k32(0), &v, BPF_NOEXIST), EEXIST as i64);
    assert_eq!(bpf_update(&map, &k32(4), &v, BPF_ANY), E2BIG as i64);
    assert_eq!(bpf_update(&map, &k32(0), &v, BPF_F_LOCK), EINVAL as i64);
    assert_eq!(bpf_update(&map, &k32(0), &v, 8), EINVAL as i64);
    assert_eq!(bpf_delete(&map, &k32(0)), EINVAL as i64);
    assert_eq!(bpf_update(&map, &k32(3), &v, BPF_EXIST), 0);
    assert_eq!(bpf_lookup(&map, &k32(3), 8), Some(v.to_vec()));
    assert_eq!(bpf_lookup(&map, &k32(4), 8), None);
}

#[test]
fn array_values_never_move() {
    let map = create(MapType::Array, 4, 12, 8);
    let _run = ReadGuard::new();
    // SAFETY: 4-byte key; in a run.
    let p = unsafe { map.lookup_ptr(k32(5).as_ptr()) };
    assert_eq!(p as usize % 8, 0, "values are 8-byte aligned");
    map.update(&k32(5), &[1; 12], BPF_ANY).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { map.lookup_ptr(k32(5).as_ptr()) }, p);
    // SAFETY: the value has 12 bytes; array values live as long as the map.
    unsafe {
        assert_eq!(std::slice::from_raw_parts(p, 12), &[1; 12]);
        *p = 9;
    }
    let mut want = [1u8; 12];
    want[0] = 9;
    assert_eq!(map.lookup(&k32(5)).unwrap(), Some(want.to_vec()));
}

#[test]
fn array_get_next_key() {
    let map = create(MapType::Array, 4, 4, 3);
    let next = |k: Option<u32>| {
        map.get_next_key(k.map(k32).as_ref().map(|k| &k[..]))
            .unwrap()
            .map(|k| u32::from_ne_bytes(k.try_into().unwrap()))
    };
    assert_eq!(next(None), Some(0));
    assert_eq!(next(Some(0)), Some(1));
    assert_eq!(next(Some(1)), Some(2));
    assert_eq!(next(Some(2)), None, "after the last: ENOENT");
    assert_eq!(next(Some(3)), Some(0), "out of range: the first");
    assert_eq!(next(Some(u32::MAX)), Some(0));
    assert_eq!(map.keys().count(), 3);
}

// ------------------------------------------------------------------------------ hash maps

#[test]
fn hash_element_ops_return_the_kernels_errors() {
    for t in [MapType::Hash, MapType::PercpuHash] {
        let map = create(t, 4, 8, 2);
        let vlen = map.value_len();
        let v = vec![5u8; vlen];
        assert_eq!(map.lookup(&k32(1)).unwrap(), None);
        assert_eq!(err(map.delete(&k32(1))), ENOENT, "{t:?}");
        assert_eq!(err(map.update(&k32(1), &v, BPF_EXIST)), ENOENT);
        map.update(&k32(1), &v, BPF_NOEXIST).unwrap();
        assert_eq!(err(map.update(&k32(1), &v, BPF_NOEXIST)), EEXIST);
        map.update(&k32(1), &v, BPF_EXIST).unwrap();
        map.update(&k32(2), &v, BPF_ANY).unwrap();
        // Full: a new key is E2BIG, replacing an existing one is fine.
        assert_eq!(err(map.update(&k32(3), &v, BPF_ANY)), E2BIG, "{t:?}");
        assert_eq!(err(map.update(&k32(3), &v, BPF_NOEXIST)), E2BIG);
        assert_eq!(err(map.update(&k32(3), &v, BPF_EXIST)), ENOENT);
        map.update(&k32(2), &v, BPF_ANY).unwrap();
        assert_eq!(err(map.update(&k32(1), &v, BPF_F_LOCK)), EINVAL);
        assert_eq!(err(map.update(&k32(1), &v, 3)), EINVAL);
        assert_eq!(err(map.update(&k32(1), &v[1..], BPF_ANY)), EINVAL);
        assert_eq!(err(map.delete(&[1, 2])), EINVAL);
        map.delete(&k32(2)).unwrap();
        map.update(&k32(3), &v, BPF_ANY).unwrap();
        // BPF side.
        let bv = [6u8; 8];
        assert_eq!(bpf_update(&map, &k32(4), &bv, BPF_ANY), E2BIG as i64);
        assert_eq!(bpf_update(&map, &k32(1), &bv, BPF_NOEXIST), EEXIST as i64);
        assert_eq!(bpf_update(&map, &k32(4), &bv, BPF_EXIST), ENOENT as i64);
        assert_eq!(bpf_update(&map, &k32(1), &bv, BPF_F_LOCK), EINVAL as i64);
        assert_eq!(bpf_delete(&map, &k32(4)), ENOENT as i64);
        assert_eq!(bpf_delete(&map, &k32(3)), 0);
        assert_eq!(bpf_update(&map, &k32(4), &bv, BPF_NOEXIST), 0);
        assert_eq!(bpf_lookup(&map, &k32(4), 8), Some(bv.to_vec()));
        assert_eq!(bpf_lookup(&map, &k32(3), 8), None);
        let mut keys: Vec<_> = map.keys().collect();
        keys.sort();
        assert_eq!(keys, vec![k32(1).to_vec(), k32(4).to_vec()]);
    }
}

#[test]
fn hash_get_next_key_restarts_on_a_missing_key() {
    let map = create(MapType::Hash, 4, 4, 64);
    for k in 0..40u32 {
        map.update(&k32(k), &k32(k), BPF_ANY).unwrap();
    }
    let first = map.get_next_key(None).unwrap().unwrap();
    assert_eq!(map.get_next_key(Some(&k32(1000))).unwrap().unwrap(), first);
    // A full walk sees every key once, then ENOENT.
    let mut seen = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    while let Some(k) = map.get_next_key(cur.as_deref()).unwrap() {
        seen.push(u32::from_ne_bytes(k[..].try_into().unwrap()));
        cur = Some(k);
    }
    seen.sort();
    assert_eq!(seen, (0..40).collect::<Vec<_>>());
    let empty = create(MapType::Hash, 4, 4, 4);
    assert_eq!(empty.get_next_key(None).unwrap(), None);
}

#[test]
fn access_flags_restrict_the_host_side_only() {
    let ro = Map::create(&spec(MapType::Hash, 4, 4, 4).with_flags(BPF_F_RDONLY)).unwrap();
    assert_eq!(err(ro.update(&k32(1), &k32(1), BPF_ANY)), EPERM);
    assert_eq!(err(ro.delete(&k32(1))), EPERM);
    assert_eq!(bpf_update(&ro, &k32(1), &k32(2), BPF_ANY), 0);
    assert_eq!(ro.lookup(&k32(1)).unwrap(), Some(k32(2).to_vec()));
    let wo = Map::create(&spec(MapType::Array, 4, 4, 4).with_flags(BPF_F_WRONLY)).unwrap();
    wo.update(&k32(1), &k32(1), BPF_ANY).unwrap();
    assert_eq!(err(wo.lookup(&k32(1))), EPERM);
    assert_eq!(err(wo.get_next_key(None)), EPERM);
    assert_eq!(bpf_lookup(&wo, &k32(1), 4), Some(k32(1).to_vec()));
}

#[test]
fn an_update_replaces_the_element_and_a_reader_keeps_the_old_value() {
    let map = create(MapType::Hash, 4, 16, 8);
    map.update(&k32(1), &[1; 16], BPF_ANY).unwrap();
    let run = ReadGuard::new();
    // SAFETY: 4-byte key; in a run.
    let old = unsafe { map.lookup_ptr(k32(1).as_ptr()) };
    assert_eq!(bpf_update(&map, &k32(1), &[2; 16], BPF_EXIST), 0);
    // SAFETY: as above.
    let new = unsafe { map.lookup_ptr(k32(1).as_ptr()) };
    assert_ne!(old, new, "a new element");
    // SAFETY: the old element is retired, not freed, while this run lasts.
    assert_eq!(unsafe { std::slice::from_raw_parts(old, 16) }, &[1; 16]);
    // SAFETY: the new one is linked.
    assert_eq!(unsafe { std::slice::from_raw_parts(new, 16) }, &[2; 16]);
    drop(run);
    maps::flush_retired();
    reclaim::flush().unwrap();
    assert_eq!(map.retired_elements(), 1);
    assert_eq!(map.freed_elements(), 1);
}

#[test]
fn a_value_pointer_outlives_a_concurrent_delete_until_the_run_ends() {
    let map = create(MapType::Hash, 4, 64, 8);
    map.update(&k32(7), &[7; 64], BPF_ANY).unwrap();
    let (ptr_tx, ptr_rx) = mpsc::channel::<usize>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel::<bool>();
    let m = map.clone();
    let reader = std::thread::spawn(move || {
        let run = ReadGuard::new();
        // SAFETY: 4-byte key; in a run.
        let p = unsafe { m.lookup_ptr(k32(7).as_ptr()) };
        ptr_tx.send(p as usize).unwrap();
        go_rx.recv().unwrap();
        // SAFETY: the element was deleted meanwhile, but this run began before.
        let intact = unsafe { std::slice::from_raw_parts(p, 64) }
            .iter()
            .all(|&b| b == 7);
        seen_tx.send(intact).unwrap();
        go_rx.recv().unwrap();
        drop(run);
    });
    assert_ne!(ptr_rx.recv().unwrap(), 0);
    map.delete(&k32(7)).unwrap();
    assert_eq!(map.lookup(&k32(7)).unwrap(), None);
    assert_eq!(map.retired_elements(), 1);
    let flushed = Arc::new(AtomicBool::new(false));
    let f = flushed.clone();
    let flusher = std::thread::spawn(move || {
        reclaim::flush().unwrap();
        f.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !flushed.load(Ordering::SeqCst),
        "freed while a run could hold it"
    );
    assert_eq!(map.freed_elements(), 0);
    go_tx.send(()).unwrap();
    assert!(seen_rx.recv().unwrap(), "the value stayed intact");
    assert_eq!(map.freed_elements(), 0);
    go_tx.send(()).unwrap();
    reader.join().unwrap();
    flusher.join().unwrap();
    assert_eq!(map.freed_elements(), 1, "freed once the run ended");
}

/// Many threads update, delete and look up one hash map; readers hold value pointers inside
/// runs and check every value is whole (value = key repeated, with a generation) and unchanged
/// for as long as they hold it. A freed element is poisoned, and a reused one holds another key
/// or generation, so a use after free fails the check.
#[test]
fn concurrent_stress_readers_never_see_a_freed_or_torn_value() {
    stress(MapType::Hash, 0);
}

/// The same on an LRU map, where updates also evict (and BPF lookups set reference bits), and
/// the LRU's lists are shared by the writers' CPU slots.
#[test]
fn concurrent_stress_lru_readers_never_see_a_freed_or_torn_value() {
    stress(MapType::LruHash, 0);
}

/// The same with one LRU list per CPU slot.
#[test]
fn concurrent_stress_lru_per_cpu_lists() {
    stress(MapType::LruHash, maps::BPF_F_NO_COMMON_LRU);
}

fn stress(map_type: MapType, flags: u32) {
    const KEYS: u64 = 512;
    const WORDS: usize = 6;
    let map = Map::create(&spec(map_type, 8, (WORDS * 8) as u32, 256).with_flags(flags)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(3);
    let reader_deadline = t0 + Duration::from_secs(10);
    let writers = 3;
    let readers = 3;
    let start = Arc::new(Barrier::new(writers + readers));
    let mut threads = Vec::new();
    for w in 0..writers {
        let (map, start) = (map.clone(), start.clone());
        threads.push(std::thread::spawn(move || {
            start.wait();
            let mut rng = 0x9e37_79b9_u64 + w as u64;
            let mut generation = 0u64;
            for i in 0..300_000u64 {
                if i % 1024 == 0 && Instant::now() > deadline {
                    break;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let k = rng % KEYS;
                generation += 1;
                let word = k | (generation << 32) | ((w as u64) << 60);
                let value = [word; WORDS];
                // SAFETY: 8-byte key and 48-byte value.
                let bytes =
                    unsafe { std::slice::from_raw_parts(value.as_ptr() as *const u8, WORDS * 8) };
                let r = match rng % 8 {
                    0..=3 => bpf_update(&map, &k.to_ne_bytes(), bytes, BPF_ANY),
                    4 => bpf_update(&map, &k.to_ne_bytes(), bytes, BPF_EXIST),
                    5 => bpf_update(&map, &k.to_ne_bytes(), bytes, BPF_NOEXIST),
                    _ => bpf_delete(&map, &k.to_ne_bytes()),
                };
                assert!(
                    [0, ENOENT as i64, EEXIST as i64, E2BIG as i64].contains(&r),
                    "unexpected {r}"
                );
            }
        }));
    }
    for r in 0..readers {
        let (map, start, stop, checked) =
            (map.clone(), start.clone(), stop.clone(), checked.clone());
        threads.push(std::thread::spawn(move || {
            start.wait();
            let mut rng = 0x1234_5678_u64 + r as u64;
            let mut rounds = 0u64;
            while (!stop.load(Ordering::Relaxed) || rounds < 20_000)
                && Instant::now() < reader_deadline
            {
                rounds += 1;
                let run = ReadGuard::new();
                let mut held: Vec<(u64, *const u64, u64)> = Vec::new();
                for _ in 0..16 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let k = rng % KEYS;
                    // SAFETY: 8-byte key; in a run.
                    let p = unsafe { map.lookup_ptr(k.to_ne_bytes().as_ptr()) } as *const u64;
                    if p.is_null() {
                        continue;
                    }
                    let first = check_value(p, k, WORDS);
                    held.push((k, p, first));
                }
                // Let writers replace and delete what we hold, then look again (spinning: a
                // yield would hand whole time slices to the writers).
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
                if rounds.is_multiple_of(256) {
                    std::thread::yield_now();
                }
                for &(k, p, first) in &held {
                    assert_eq!(check_value(p, k, WORDS), first, "value changed under a run");
                }
                checked.fetch_add(held.len() as u64, Ordering::Relaxed);
                drop(run);
            }
        }));
    }
    let (writer_threads, reader_threads): (Vec<_>, Vec<_>) = threads
        .into_iter()
        .enumerate()
        .partition(|(i, _)| *i < writers);
    for (_, t) in writer_threads {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for (_, t) in reader_threads {
        t.join().unwrap();
    }
    let checked = checked.load(Ordering::Relaxed);
    eprintln!(
        "stress {map_type:?}: {checked} values checked, {} retired, {} ms",
        map.retired_elements(),
        t0.elapsed().as_millis()
    );
    assert!(checked > 50_000, "readers checked values ({checked})");
    // The writers exited: their batches were retired. Everything retired gets freed.
    reclaim::flush().unwrap();
    assert!(map.retired_elements() > 1000);
    assert_eq!(map.freed_elements(), map.retired_elements());
    // The map's count matches its contents.
    let n = map.keys().count();
    assert!(n <= map.spec().max_entries as usize);
}

/// Every word of the value at `p` is equal and names key `k`; returns the word.
fn check_value(p: *const u64, k: u64, words: usize) -> u64 {
    // SAFETY: the caller holds `p` inside a run.
    let first = unsafe { p.read_volatile() };
    assert_eq!(
        first & 0xffff_ffff,
        k,
        "a value of another key (or poison): {first:#x}"
    );
    for i in 1..words {
        // SAFETY: as above.
        let w = unsafe { p.add(i).read_volatile() };
        assert_eq!(w, first, "a torn value at word {i}");
    }
    first
}

#[test]
fn retire_batches_are_freed_when_the_thread_exits() {
    let map = create(MapType::Hash, 4, 8, 16);
    let m = map.clone();
    std::thread::spawn(move || {
        for i in 0..100u64 {
            assert_eq!(bpf_update(&m, &k32(1), &i.to_ne_bytes(), BPF_ANY), 0);
        }
        // 99 replacements: one batch of 64 retired, 35 still gathered here.
        assert!(m.retired_elements() <= 64);
    })
    .join()
    .unwrap();
    reclaim::flush().unwrap();
    assert_eq!(map.retired_elements(), 99);
    assert_eq!(map.freed_elements(), 99);
    // Dropping a map frees what it holds (after a grace period).
    drop(map);
    reclaim::flush().unwrap();
}

// ------------------------------------------------------------------------------ LRU
//
// LRU maps evict as the kernel's `bpf_lru_list` does (see the hash map docs): nodes move to a
// CPU's free list in batches of `target_free = clamp(max_entries / possible CPUs / 2, 1, 128)`,
// fresh elements wait on the CPU's pending list, and a refill flushes them to the inactive list
// (the active one if looked up meanwhile), rotates, and evicts unreferenced nodes from the
// inactive tail. Maps of 2 entries have batches of one node whatever the CPU count.

fn lru_lookup(map: &Map, k: u32) {
    assert!(bpf_lookup(map, &k32(k), 4).is_some(), "key {k} present");
}

fn present(map: &Map) -> Vec<u32> {
    let mut v: Vec<u32> = map
        .keys()
        .map(|k| u32::from_ne_bytes(k[..].try_into().unwrap()))
        .collect();
    v.sort();
    v
}

/// The machine's possible CPUs, as the kernel counts them (what LRU batches are sized by).
fn machine_cpus() -> u32 {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .map_or_else(|_| possible_cpus().to_string(), |s| s.trim().to_string());
    let n: u32 = list
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u32>().unwrap() - a.parse::<u32>().unwrap() + 1,
            None => 1,
        })
        .sum();
    n.max(possible_cpus())
}

fn target_free(entries: u32) -> u32 {
    (entries / machine_cpus() / 2).clamp(1, 128)
}

#[test]
fn lru_a_referenced_element_gets_a_second_chance() {
    let map = create(MapType::LruHash, 4, 4, 2);
    map.update(&k32(1), &k32(1), BPF_ANY).unwrap();
    map.update(&k32(2), &k32(2), BPF_ANY).unwrap();
    // 1 is the oldest, but a program used it: the refill for 3 moves it to the active list and
    // evicts the inactive tail, 2.
    lru_lookup(&map, 1);
    map.update(&k32(3), &k32(3), BPF_ANY).unwrap();
    assert_eq!(present(&map), vec![1, 3]);
    // Flag errors are the hash map's. Bad flags are refused before anything else; a delete of
    // an absent key changes nothing; but BPF_EXIST is checked only after a node was taken, so
    // the refused update evicted 3, the unreferenced one.
    assert_eq!(err(map.update(&k32(1), &k32(1), BPF_F_LOCK)), EINVAL);
    assert_eq!(err(map.delete(&k32(9))), ENOENT);
    assert_eq!(present(&map), vec![1, 3]);
    assert_eq!(err(map.update(&k32(9), &k32(1), BPF_EXIST)), ENOENT);
    assert_eq!(present(&map), vec![1]);
}

#[test]
fn lru_host_lookups_are_not_a_use() {
    let map = create(MapType::LruHash, 4, 4, 2);
    map.update(&k32(1), &k32(1), BPF_ANY).unwrap();
    map.update(&k32(2), &k32(2), BPF_ANY).unwrap();
    assert!(map.lookup(&k32(1)).unwrap().is_some());
    map.update(&k32(3), &k32(3), BPF_ANY).unwrap();
    assert_eq!(present(&map), vec![2, 3]);
}

#[test]
fn lru_every_update_takes_a_fresh_node_so_a_full_map_evicts_first() {
    // The kernel takes the new element's node before it locks the bucket and checks the flags:
    // replacing a key, or an update the flags refuse, evicts all the same.
    let map = create(MapType::LruHash, 4, 4, 2);
    map.update(&k32(1), &k32(1), BPF_ANY).unwrap();
    map.update(&k32(2), &k32(2), BPF_ANY).unwrap();
    map.update(&k32(2), &k32(20), BPF_EXIST).unwrap();
    assert_eq!(present(&map), vec![2], "1 was evicted to replace 2");
    assert_eq!(map.lookup(&k32(2)).unwrap(), Some(k32(20).to_vec()));
    map.update(&k32(3), &k32(3), BPF_ANY).unwrap();
    assert_eq!(present(&map), vec![2, 3]);
    assert_eq!(err(map.update(&k32(3), &k32(3), BPF_NOEXIST)), EEXIST);
    assert_eq!(present(&map), vec![3], "the refused update evicted 2");
}

#[test]
fn lru_a_deleted_element_frees_its_node_without_evicting() {
    let map = create(MapType::LruHash, 4, 4, 2);
    map.update(&k32(1), &k32(1), BPF_ANY).unwrap();
    map.update(&k32(2), &k32(2), BPF_ANY).unwrap();
    map.delete(&k32(1)).unwrap();
    map.update(&k32(3), &k32(3), BPF_ANY).unwrap();
    assert_eq!(present(&map), vec![2, 3]);
}

#[test]
fn lru_evicts_a_batch_of_the_oldest_when_full() {
    let entries = 1024;
    let map = create(MapType::LruHash, 4, 4, entries);
    for k in 0..entries {
        map.update(&k32(k), &k32(k), BPF_ANY).unwrap();
    }
    assert_eq!(present(&map).len(), entries as usize, "filled exactly");
    // One more: a refill evicts a whole batch from the inactive tail, the oldest keys, and the
    // map is no longer full (as in the kernel, an LRU map keeps free nodes at hand).
    map.update(&k32(entries), &k32(0), BPF_ANY).unwrap();
    let batch = target_free(entries);
    let keys = present(&map);
    assert_eq!(keys.len(), (entries - batch + 1) as usize);
    assert_eq!(keys[0], batch, "keys 0..{batch} were evicted");
    assert!(keys.contains(&entries));
}

#[test]
fn lru_keeps_hot_keys_in_a_large_map() {
    let map = create(MapType::LruHash, 4, 4, 1024);
    for k in 0..16 {
        map.update(&k32(k), &k32(k), BPF_ANY).unwrap();
    }
    for k in 1000..20_000u32 {
        assert_eq!(bpf_update(&map, &k32(k), &k32(k), BPF_ANY), 0);
        for hot in 0..16 {
            lru_lookup(&map, hot);
        }
    }
    let keys = present(&map);
    assert!(keys.len() <= 1024, "never over");
    assert!((0..16).all(|k| keys.contains(&k)), "hot keys survive");
    assert!(keys.contains(&19_999), "the newest survives");
}

#[test]
fn lru_percpu_hash_evicts_and_updates_in_place() {
    let map = create(MapType::LruPercpuHash, 4, 4, 2);
    let n = possible_cpus() as usize;
    map.update(&k32(1), &vec![1; 8 * n], BPF_ANY).unwrap();
    map.update(&k32(2), &vec![2; 8 * n], BPF_ANY).unwrap();
    map.update(&k32(3), &vec![3; 8 * n], BPF_ANY).unwrap();
    assert_eq!(present(&map), vec![2, 3]);
    // In place: a program's pointer sees the new value.
    let _run = ReadGuard::new();
    // SAFETY: a 4-byte key; in a run.
    let p = unsafe { map.lookup_ptr(k32(3).as_ptr()) };
    assert_eq!(bpf_update(&map, &k32(3), &k32(33), BPF_EXIST), 0);
    // SAFETY: the value (at least 4 bytes) stays alive during the run.
    assert_eq!(unsafe { (p as *const u32).read() }, 33);
    // BPF_EXIST takes no node: nothing was evicted.
    assert_eq!(present(&map), vec![2, 3]);
}

#[test]
fn lru_per_cpu_lists_split_the_entries() {
    let cpus = machine_cpus();
    let m = Map::create(&spec(MapType::LruHash, 4, 4, 3).with_flags(maps::BPF_F_NO_COMMON_LRU))
        .unwrap();
    // Rounded up to a multiple of the CPUs, like the kernel's max_entries.
    assert_eq!(m.spec().max_entries, 3u32.div_ceil(cpus) * cpus);
    // One thread (one CPU) only ever uses its own share of the nodes.
    let share = 3u32.div_ceil(cpus);
    for k in 0..50 {
        assert_eq!(bpf_update(&m, &k32(k), &k32(k), BPF_ANY), 0);
        let keys = present(&m);
        assert!(keys.len() <= share as usize, "{keys:?}");
        assert!(keys.contains(&k));
    }
}

/// The kernel's common-flavour LRU, written plainly (lists as vectors, head first), to check
/// the implementation against on long random sequences from several threads.
mod model {
    use std::collections::HashMap;

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Kind {
        Active,
        Inactive,
        Free,
        LocalFree,
        Pending,
    }

    pub struct Lru {
        scans: usize,
        target_free: usize,
        key: Vec<Option<u32>>,
        referenced: Vec<bool>,
        kind: Vec<Kind>,
        cpu: Vec<usize>,
        active: Vec<usize>,
        inactive: Vec<usize>,
        free: Vec<usize>,
        /// The inactive node the next rotation starts at; `None`: the list head.
        rotation: Option<usize>,
        local_free: Vec<Vec<usize>>,
        pending: Vec<Vec<usize>>,
        next_steal: Vec<usize>,
        pub table: HashMap<u32, usize>,
    }

    fn remove(list: &mut Vec<usize>, n: usize) {
        let i = list.iter().position(|&x| x == n).expect("on the list");
        list.remove(i);
    }

    impl Lru {
        pub fn new(entries: usize, cpus: usize) -> Lru {
            Lru {
                scans: 128,
                target_free: (entries / cpus / 2).clamp(1, 128),
                key: vec![None; entries],
                referenced: vec![false; entries],
                kind: vec![Kind::Free; entries],
                cpu: vec![0; entries],
                active: Vec::new(),
                inactive: Vec::new(),
                free: (0..entries).rev().collect(),
                rotation: None,
                local_free: vec![Vec::new(); cpus],
                pending: vec![Vec::new(); cpus],
                next_steal: (0..cpus).collect(),
                table: HashMap::new(),
            }
        }

        fn global(&mut self, k: Kind) -> &mut Vec<usize> {
            match k {
                Kind::Active => &mut self.active,
                Kind::Inactive => &mut self.inactive,
                _ => &mut self.free,
            }
        }

        /// The node before `n` in the inactive list (towards the head), `None` for the head.
        fn before(&self, n: usize) -> Option<usize> {
            let i = self.inactive.iter().position(|&x| x == n).unwrap();
            i.checked_sub(1).map(|j| self.inactive[j])
        }

        fn leaving(&mut self, n: usize) {
            if self.rotation == Some(n) {
                self.rotation = self.before(n);
            }
        }

        /// Within the global lists, to the head of `to`, unreferenced.
        fn move_to(&mut self, n: usize, to: Kind) {
            self.referenced[n] = false;
            self.leaving(n);
            let from = self.kind[n];
            remove(self.global(from), n);
            self.kind[n] = to;
            self.global(to).insert(0, n);
        }

        fn evict(&mut self, n: usize) -> bool {
            match self.key[n] {
                Some(k) if self.table.get(&k) == Some(&n) => {
                    self.table.remove(&k);
                    true
                }
                _ => false,
            }
        }

        fn move_to_local_free(&mut self, n: usize, cpu: usize) {
            self.leaving(n);
            let from = self.kind[n];
            remove(self.global(from), n);
            self.kind[n] = Kind::LocalFree;
            self.local_free[cpu].insert(0, n);
        }

        fn rotate(&mut self) {
            if self.inactive.len() < self.active.len() {
                let first = self.active[0];
                let order: Vec<usize> = self.active.iter().rev().copied().collect();
                for (i, n) in order.into_iter().enumerate() {
                    let to = if self.referenced[n] {
                        Kind::Active
                    } else {
                        Kind::Inactive
                    };
                    self.move_to(n, to);
                    if i + 1 == self.scans || n == first {
                        break;
                    }
                }
            }
            if self.inactive.is_empty() {
                return;
            }
            // Positions in the circle [head, inactive...]: 0 is the head.
            let pos = |l: &Lru, x: Option<usize>| {
                x.map_or(0, |n| 1 + l.inactive.iter().position(|&y| y == n).unwrap())
            };
            let at = |l: &Lru, p: usize| (p > 0).then(|| l.inactive[p - 1]);
            let len = |l: &Lru| l.inactive.len() + 1;
            let mut last = at(self, (pos(self, self.rotation) + 1) % len(self));
            if last.is_none() {
                last = at(self, 1);
            }
            let mut cur = self.rotation;
            let mut next = None;
            let mut i = 0;
            while i < self.scans {
                let Some(n) = cur else {
                    cur = at(self, len(self) - 1);
                    continue;
                };
                let p = pos(self, Some(n));
                next = at(self, p - 1);
                if self.referenced[n] {
                    self.move_to(n, Kind::Active);
                }
                if cur == last {
                    break;
                }
                cur = next;
                i += 1;
            }
            self.rotation = next;
        }

        fn shrink(&mut self, want: usize, cpu: usize) {
            let mut freed = 0;
            let order: Vec<usize> = self.inactive.iter().rev().copied().collect();
            for (i, n) in order.into_iter().enumerate() {
                if self.referenced[n] {
                    self.move_to(n, Kind::Active);
                } else if self.evict(n) {
                    self.move_to_local_free(n, cpu);
                    freed += 1;
                    if freed == want {
                        break;
                    }
                }
                if i + 1 == self.scans {
                    break;
                }
            }
            if freed > 0 {
                return;
            }
            let list = if self.inactive.is_empty() {
                self.active.clone()
            } else {
                self.inactive.clone()
            };
            for &n in list.iter().rev() {
                if self.evict(n) {
                    self.move_to_local_free(n, cpu);
                    return;
                }
            }
        }

        fn refill(&mut self, cpu: usize) {
            while let Some(n) = self.pending[cpu].pop() {
                let to = if self.referenced[n] {
                    Kind::Active
                } else {
                    Kind::Inactive
                };
                self.referenced[n] = false;
                self.kind[n] = to;
                self.global(to).insert(0, n);
            }
            self.rotate();
            let mut moved = 0;
            while moved < self.target_free && !self.free.is_empty() {
                let n = self.free[0];
                self.move_to_local_free(n, cpu);
                moved += 1;
            }
            if moved < self.target_free {
                self.shrink(self.target_free - moved, cpu);
            }
        }

        fn pop_pending(&mut self, cpu: usize) -> Option<usize> {
            for force in [false, true] {
                for i in (0..self.pending[cpu].len()).rev() {
                    let n = self.pending[cpu][i];
                    if (force || !self.referenced[n]) && self.evict(n) {
                        self.pending[cpu].remove(i);
                        return Some(n);
                    }
                }
            }
            None
        }

        fn pop(&mut self, cpu: usize) -> Option<usize> {
            if self.local_free[cpu].is_empty() {
                self.refill(cpu);
            }
            let n = if self.local_free[cpu].is_empty() {
                let cpus = self.pending.len();
                let first = self.next_steal[cpu];
                let mut steal = first;
                let got = loop {
                    let got = if self.local_free[steal].is_empty() {
                        self.pop_pending(steal)
                    } else {
                        Some(self.local_free[steal].remove(0))
                    };
                    steal = (steal + 1) % cpus;
                    if got.is_some() || steal == first {
                        break got;
                    }
                };
                self.next_steal[cpu] = steal;
                got?
            } else {
                self.local_free[cpu].remove(0)
            };
            self.kind[n] = Kind::Pending;
            self.referenced[n] = false;
            self.cpu[n] = cpu;
            self.key[n] = None;
            self.pending[cpu].insert(0, n);
            Some(n)
        }

        fn push(&mut self, n: usize) {
            if self.kind[n] == Kind::Pending {
                let cpu = self.cpu[n];
                remove(&mut self.pending[cpu], n);
                self.kind[n] = Kind::LocalFree;
                self.local_free[cpu].insert(0, n);
            } else {
                self.move_to(n, Kind::Free);
            }
        }

        /// A BPF-side lookup: whether the key is present.
        pub fn lookup(&mut self, key: u32) -> bool {
            match self.table.get(&key) {
                Some(&n) => {
                    self.referenced[n] = true;
                    true
                }
                None => false,
            }
        }

        /// An update from `cpu`: 0 or the negative errno.
        pub fn update(&mut self, key: u32, flags: u64, cpu: usize) -> i64 {
            let Some(n) = self.pop(cpu) else {
                return -libc::ENOMEM as i64;
            };
            let old = self.table.get(&key).copied();
            let refused = match (old, flags) {
                (Some(_), 1) => Some(-libc::EEXIST as i64),
                (None, 2) => Some(-libc::ENOENT as i64),
                _ => None,
            };
            if let Some(e) = refused {
                self.push(n);
                return e;
            }
            self.key[n] = Some(key);
            self.table.insert(key, n);
            if let Some(o) = old {
                self.referenced[n] = true;
                self.push(o);
            }
            0
        }

        pub fn delete(&mut self, key: u32) -> i64 {
            match self.table.remove(&key) {
                Some(n) => {
                    self.push(n);
                    0
                }
                None => -libc::ENOENT as i64,
            }
        }
    }
}

/// Long random sequences on common-flavour LRU maps of several sizes, each operation run by one
/// of several threads in turn (each on its own CPU slot when there are enough), must leave the
/// same keys as the model after every step: batches, rotation limits, forced shrinks and
/// stealing from other CPUs' lists included.
#[test]
fn lru_matches_a_plain_model_of_the_kernel_lists() {
    let cpus = machine_cpus() as usize;
    // Workers that run operations on demand, on their own threads.
    type Job = Box<dyn FnOnce() -> i64 + Send>;
    /// A worker's job queue, and its results with the CPU slot it ran on.
    type Worker = (mpsc::Sender<Job>, mpsc::Receiver<(i64, u32)>);
    let workers: Vec<Worker> = (0..cpus.min(3))
        .map(|_| {
            let (jobs, jobs_rx) = mpsc::channel::<Job>();
            let (done_tx, done) = mpsc::channel();
            std::thread::spawn(move || {
                for job in jobs_rx {
                    let r = job();
                    done_tx.send((r, current_cpu())).unwrap();
                }
            });
            (jobs, done)
        })
        .collect();
    for (entries, keys, steps) in [
        (2u32, 5u32, 400),
        (7, 20, 2000),
        (64, 150, 4000),
        (300, 700, 6000),
    ] {
        let map = create(MapType::LruHash, 4, 4, entries);
        let mut model = model::Lru::new(entries as usize, cpus);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ entries as u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for step in 0..steps {
            let key = (next() % keys as u64) as u32;
            let op = next() % 100;
            let (jobs, done) = &workers[(next() % workers.len() as u64) as usize];
            let m = map.clone();
            let job: Job = match op {
                0..35 => Box::new(move || bpf_lookup(&m, &k32(key), 4).is_some() as i64),
                35..80 => Box::new(move || bpf_update(&m, &k32(key), &k32(key), BPF_ANY)),
                80..86 => Box::new(move || bpf_update(&m, &k32(key), &k32(key), BPF_NOEXIST)),
                86..92 => Box::new(move || bpf_update(&m, &k32(key), &k32(key), BPF_EXIST)),
                _ => Box::new(move || bpf_delete(&m, &k32(key))),
            };
            jobs.send(job).unwrap();
            let (got, cpu) = done.recv().unwrap();
            let want = match op {
                0..35 => model.lookup(key) as i64,
                35..80 => model.update(key, BPF_ANY, cpu as usize),
                80..86 => model.update(key, BPF_NOEXIST, cpu as usize),
                86..92 => model.update(key, BPF_EXIST, cpu as usize),
                _ => model.delete(key),
            };
            assert_eq!(
                got, want,
                "entries {entries}, step {step}, op {op}, key {key}"
            );
            let mut expected: Vec<u32> = model.table.keys().copied().collect();
            expected.sort();
            assert_eq!(present(&map), expected, "entries {entries}, step {step}");
        }
    }
}

// ------------------------------------------------------------------------------ per-CPU

#[test]
fn cpu_slots_are_stable_per_thread_and_in_range() {
    let n = possible_cpus();
    assert!(n >= 1);
    assert_eq!(
        n as usize,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let here = current_cpu();
    assert!(here < n);
    assert_eq!(current_cpu(), here);
    // Many more threads than slots, alive at once: each gets a slot in range, stable.
    let count = 4 * n as usize;
    let barrier = Arc::new(Barrier::new(count));
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let s = current_cpu();
                b.wait();
                assert_eq!(current_cpu(), s);
                s
            })
        })
        .collect();
    let slots: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(slots.iter().all(|&s| s < n));
}

#[test]
fn percpu_array_bpf_side_touches_the_callers_slot_only() {
    let n = possible_cpus() as usize;
    let map = create(MapType::PercpuArray, 4, 4, 2);
    assert_eq!(map.value_len(), 8 * n, "each value rounded up to 8 bytes");
    let m = map.clone();
    let slot = std::thread::spawn(move || {
        assert_eq!(bpf_update(&m, &k32(1), &k32(0xabcd), BPF_ANY), 0);
        assert_eq!(bpf_update(&m, &k32(1), &k32(0), BPF_NOEXIST), EEXIST as i64);
        assert_eq!(bpf_lookup(&m, &k32(1), 4), Some(k32(0xabcd).to_vec()));
        current_cpu() as usize
    })
    .join()
    .unwrap();
    let all = map.lookup(&k32(1)).unwrap().unwrap();
    for cpu in 0..n {
        let v = u32::from_ne_bytes(all[cpu * 8..cpu * 8 + 4].try_into().unwrap());
        assert_eq!(v, if cpu == slot { 0xabcd } else { 0 }, "slot {cpu}");
    }
    // The host writes every slot; a program sees its own; lookup_percpu_ptr sees any.
    let mut values = vec![0u8; 8 * n];
    for cpu in 0..n {
        values[cpu * 8..cpu * 8 + 4].copy_from_slice(&k32(100 + cpu as u32));
    }
    map.update(&k32(0), &values, BPF_ANY).unwrap();
    assert_eq!(
        bpf_lookup(&map, &k32(0), 4),
        Some(k32(100 + current_cpu()).to_vec())
    );
    let _run = ReadGuard::new();
    for cpu in 0..n as u32 {
        // SAFETY: 4-byte key; in a run.
        let p = unsafe { map.lookup_percpu_ptr(k32(0).as_ptr(), cpu) };
        // SAFETY: a 4-byte value.
        assert_eq!(unsafe { (p as *const u32).read() }, 100 + cpu);
    }
    // SAFETY: as above.
    assert!(unsafe { map.lookup_percpu_ptr(k32(0).as_ptr(), n as u32) }.is_null());
    assert_eq!(err(map.update(&k32(0), &values[..8], BPF_ANY)), EINVAL);
    assert_eq!(err(map.delete(&k32(0))), EINVAL);
}

#[test]
fn percpu_hash_inserts_zero_other_slots_and_updates_in_place() {
    let n = possible_cpus() as usize;
    let map = create(MapType::PercpuHash, 4, 8, 4);
    let m = map.clone();
    let slot = std::thread::spawn(move || {
        assert_eq!(bpf_update(&m, &k32(1), &7u64.to_ne_bytes(), BPF_ANY), 0);
        let run = ReadGuard::new();
        // SAFETY: 4-byte key; in a run.
        let p = unsafe { m.lookup_ptr(k32(1).as_ptr()) };
        assert_eq!(bpf_update(&m, &k32(1), &8u64.to_ne_bytes(), BPF_EXIST), 0);
        // SAFETY: as above.
        assert_eq!(
            unsafe { m.lookup_ptr(k32(1).as_ptr()) },
            p,
            "updated in place"
        );
        // SAFETY: an 8-byte value, alive in the run.
        assert_eq!(unsafe { (p as *const u64).read() }, 8);
        drop(run);
        current_cpu() as usize
    })
    .join()
    .unwrap();
    let all = map.lookup(&k32(1)).unwrap().unwrap();
    for cpu in 0..n {
        let v = u64::from_ne_bytes(all[cpu * 8..cpu * 8 + 8].try_into().unwrap());
        assert_eq!(v, if cpu == slot { 8 } else { 0 }, "slot {cpu}");
    }
    assert_eq!(map.retired_elements(), 0, "in-place updates retire nothing");
}

// ------------------------------------------------------------------------------ ring buffer

fn ringbuf(size: u32) -> Map {
    create(MapType::Ringbuf, 0, 0, size)
}

#[test]
fn ringbuf_output_query_and_consume() {
    let p = page();
    let rb = ringbuf(p);
    let mut c = RingBufConsumer::new(&rb).unwrap();
    assert_eq!(err(RingBufConsumer::new(&rb)), EBUSY);
    assert_eq!(rb.ringbuf_query(BPF_RB_RING_SIZE), p as u64);
    assert_eq!(rb.ringbuf_query(BPF_RB_AVAIL_DATA), 0);
    rb.ringbuf_write(b"0123456789", 0).unwrap();
    assert_eq!(
        rb.ringbuf_query(BPF_RB_AVAIL_DATA),
        24,
        "8-byte header, 8-byte rounding"
    );
    assert_eq!(rb.ringbuf_query(BPF_RB_PROD_POS), 24);
    assert_eq!(rb.ringbuf_query(BPF_RB_CONS_POS), 0);
    assert_eq!(rb.ringbuf_query(99), 0);
    assert_eq!(c.avail_data(), 24);
    assert_eq!(c.next(), Some(b"0123456789".to_vec()));
    assert_eq!(c.next(), None);
    assert_eq!(rb.ringbuf_query(BPF_RB_CONS_POS), 24);
    assert_eq!(rb.ringbuf_query(BPF_RB_AVAIL_DATA), 0);
    rb.ringbuf_write(b"a", BPF_RB_NO_WAKEUP).unwrap();
    rb.ringbuf_write(b"bc", BPF_RB_FORCE_WAKEUP).unwrap();
    assert_eq!(err(rb.ringbuf_write(b"x", 4)), EINVAL);
    let mut got = Vec::new();
    assert_eq!(c.consume(|d| got.push(d.to_vec())), 2);
    assert_eq!(got, vec![b"a".to_vec(), b"bc".to_vec()]);
    drop(c);
    RingBufConsumer::new(&rb).expect("the consumer side is free again");
    // Element operations are not supported.
    assert_eq!(err(rb.lookup(&[])), ENOTSUPP_);
    assert_eq!(err(rb.delete(&[])), ENOTSUPP_);
    assert_eq!(err(rb.get_next_key(None)), ENOTSUPP_);
    assert_eq!(
        err(RingBufConsumer::new(&create(MapType::Array, 4, 4, 1))),
        EINVAL
    );
}

#[test]
fn ringbuf_reserve_submit_discard_and_busy_records() {
    let rb = ringbuf(page());
    let mut c = RingBufConsumer::new(&rb).unwrap();
    let r1 = rb.ringbuf_reserve(5, 0);
    assert!(!r1.is_null());
    assert_eq!(r1 as usize % 8, 0, "records are 8-byte aligned");
    assert!(rb.ringbuf_reserve(5, 1).is_null(), "reserve takes no flags");
    rb.ringbuf_write(b"second", 0).unwrap();
    // The busy first record holds the consumer back.
    assert_eq!(c.next(), None);
    assert_eq!(rb.ringbuf_query(BPF_RB_AVAIL_DATA), 16 + 16);
    // SAFETY: r1 has room for 5 bytes and is reserved, not committed.
    unsafe {
        r1.copy_from(b"first".as_ptr(), 5);
        ringbuf_submit(r1, 0);
    }
    assert_eq!(c.next(), Some(b"first".to_vec()));
    assert_eq!(c.next(), Some(b"second".to_vec()));
    // A discarded record is skipped, but its space is consumed.
    let r2 = rb.ringbuf_reserve(100, 0);
    // SAFETY: reserved, not committed.
    unsafe { ringbuf_discard(r2, BPF_RB_NO_WAKEUP) };
    rb.ringbuf_write(b"third", 0).unwrap();
    let before = rb.ringbuf_query(BPF_RB_CONS_POS);
    assert_eq!(c.next(), Some(b"third".to_vec()));
    assert_eq!(rb.ringbuf_query(BPF_RB_CONS_POS), before + 112 + 16);
    assert_eq!(c.next(), None);
}

#[test]
fn ringbuf_full_and_oversized_records() {
    let p = page() as u64;
    let rb = ringbuf(p as u32);
    let mut c = RingBufConsumer::new(&rb).unwrap();
    // The producer may run at most size - 1 bytes ahead: the largest record is size - 16 bytes.
    assert!(rb.ringbuf_reserve(p - 15, 0).is_null());
    assert!(rb.ringbuf_reserve(p, 0).is_null());
    assert!(rb.ringbuf_reserve(u64::MAX, 0).is_null());
    let big = rb.ringbuf_reserve(p - 16, 0);
    assert!(!big.is_null());
    assert!(rb.ringbuf_reserve(1, 0).is_null(), "full");
    assert_eq!(err(rb.ringbuf_write(b"x", 0)), EAGAIN);
    // SAFETY: reserved, not committed.
    unsafe { ringbuf_submit(big, 0) };
    assert_eq!(c.next().map(|v| v.len()), Some(p as usize - 16));
    rb.ringbuf_write(b"x", 0).unwrap();
    assert_eq!(c.next(), Some(b"x".to_vec()));
}

#[test]
fn ringbuf_wraps_around_with_contiguous_records() {
    let p = page();
    let rb = ringbuf(p);
    let mut c = RingBufConsumer::new(&rb).unwrap();
    let mut wrapped = 0;
    let mut seq = 0usize;
    let mut expected = std::collections::VecDeque::new();
    for round in 0..40 {
        let n = 1 + round % 3;
        for _ in 0..n {
            let size = 1000 + seq % 7;
            let data: Vec<u8> = (0..size).map(|i| (seq + i) as u8).collect();
            let pos = rb.ringbuf_query(BPF_RB_PROD_POS);
            if pos % p as u64 + 8 + size as u64 > p as u64 {
                wrapped += 1;
            }
            rb.ringbuf_write(&data, 0).unwrap();
            expected.push_back(data);
            seq += 1;
        }
        for _ in 0..n {
            assert_eq!(c.next(), expected.pop_front());
        }
        assert_eq!(c.next(), None);
    }
    assert!(
        rb.ringbuf_query(BPF_RB_PROD_POS) > 8 * p as u64,
        "many laps"
    );
    assert!(wrapped > 3, "records straddled the end ({wrapped})");
    assert_eq!(
        rb.ringbuf_query(BPF_RB_PROD_POS),
        rb.ringbuf_query(BPF_RB_CONS_POS)
    );
}

#[test]
fn ringbuf_many_producers_one_waiting_consumer() {
    const PRODUCERS: u32 = 3;
    const EACH: u32 = 5000;
    let rb = ringbuf(4 * page());
    let mut c = RingBufConsumer::new(&rb).unwrap();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let rb = rb.clone();
            std::thread::spawn(move || {
                for seq in 0..EACH {
                    let mut rec = [0u8; 12];
                    rec[..4].copy_from_slice(&id.to_ne_bytes());
                    rec[4..8].copy_from_slice(&seq.to_ne_bytes());
                    rec[8..].copy_from_slice(&(id ^ seq).to_ne_bytes());
                    loop {
                        let flags = if seq % 2 == 0 { 0 } else { BPF_RB_FORCE_WAKEUP };
                        // Alternate output and reserve/submit.
                        let ok = if seq % 3 == 0 {
                            let r = rb.ringbuf_reserve(12, 0);
                            if !r.is_null() {
                                // SAFETY: 12 bytes reserved, not committed.
                                unsafe {
                                    r.copy_from(rec.as_ptr(), 12);
                                    ringbuf_submit(r, flags);
                                }
                            }
                            !r.is_null()
                        } else {
                            rb.ringbuf_write(&rec, flags).is_ok()
                        };
                        if ok {
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let mut next = [0u32; PRODUCERS as usize];
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while total < PRODUCERS * EACH {
        assert!(Instant::now() < deadline, "consumer starved at {total}");
        c.wait(Some(Duration::from_secs(1)));
        c.consume(|d| {
            let id = u32::from_ne_bytes(d[..4].try_into().unwrap());
            let seq = u32::from_ne_bytes(d[4..8].try_into().unwrap());
            let check = u32::from_ne_bytes(d[8..12].try_into().unwrap());
            assert_eq!(check, id ^ seq, "a whole record");
            assert_eq!(seq, next[id as usize], "in order per producer");
            next[id as usize] += 1;
            total += 1;
        });
    }
    for p in producers {
        p.join().unwrap();
    }
    assert_eq!(c.next(), None);
}

#[test]
fn ringbuf_wait_wakes_the_consumer_and_times_out() {
    let rb = ringbuf(page());
    let mut c = RingBufConsumer::new(&rb).unwrap();
    let t0 = Instant::now();
    assert!(!c.wait(Some(Duration::from_millis(30))));
    assert!(t0.elapsed() >= Duration::from_millis(30));
    let r = rb.clone();
    let producer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        r.ringbuf_write(b"wake", 0).unwrap();
    });
    let t0 = Instant::now();
    assert!(c.wait(Some(Duration::from_secs(20))));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(c.next(), Some(b"wake".to_vec()));
    producer.join().unwrap();
}

// ------------------------------------------------------------------------------ program array

#[test]
fn prog_array_stores_targets() {
    use livebpf::exec::{TailCaller, TailTarget};
    use livebpf::{Helpers, JitOptions, JitProgram, assemble_program};
    let map = create(MapType::ProgArray, 4, 4, 4);
    let program = |r0: u32| assemble_program(&format!("mov %r0, {r0}\nexit")).unwrap();
    let interpreted = TailTarget::interpreted(&program(1), &Helpers::new());
    let jit =
        Arc::new(JitProgram::compile(&program(2), &Helpers::new(), JitOptions::checked()).unwrap());
    let weak = Arc::downgrade(&jit);
    let jitted = TailTarget::from_jit(jit);
    assert!(map.prog_array_get(0).is_none());
    assert_eq!(err(map.prog_array_clear(0)), ENOENT);
    assert_eq!(
        err(map.prog_array_set(0, jitted.clone(), BPF_NOEXIST)),
        EINVAL
    );
    assert_eq!(err(map.prog_array_set(4, jitted.clone(), BPF_ANY)), E2BIG);
    map.prog_array_set(1, jitted, BPF_ANY).unwrap();
    let got = map.prog_array_get(1).unwrap();
    assert!(got.has_jit());
    assert_eq!(got.program(), &program(2));
    drop(got);
    assert!(map.prog_array_get(99).is_none());
    // Binding a checked JIT caller: the JIT target serves it, an interpreted one would not.
    let checked = TailCaller::jit(true, false);
    map.prog_array_bind(checked).unwrap();
    let e = map
        .prog_array_set(2, interpreted.clone(), BPF_ANY)
        .unwrap_err();
    assert!(matches!(e, MapError::IncompatibleProgram(_)), "{e}");
    assert_eq!(e.errno(), EINVAL);
    assert!(map.prog_array_get(2).is_none(), "nothing was stored");
    // A trusted caller too: no target can serve both, and the binding is refused unchanged.
    let e = map
        .prog_array_bind(TailCaller::jit(false, false))
        .unwrap_err();
    assert!(matches!(e, MapError::IncompatibleProgram(_)), "{e}");
    // A budgeted checked caller: the current target counts no budget.
    assert!(map.prog_array_bind(TailCaller::jit(true, true)).is_err());
    assert!(map.prog_array_bind(TailCaller::INTERPRETER).is_ok());
    // Replacing keeps the old target for a grace period, then drops it.
    let other =
        Arc::new(JitProgram::compile(&program(3), &Helpers::new(), JitOptions::checked()).unwrap());
    map.prog_array_set(1, TailTarget::from_jit(other), BPF_ANY)
        .unwrap();
    assert_eq!(map.prog_array_get(1).unwrap().program(), &program(3));
    reclaim::flush().unwrap();
    assert!(weak.upgrade().is_none(), "the replaced target was dropped");
    // An unbound array takes any target.
    let free = create(MapType::ProgArray, 4, 4, 1);
    free.prog_array_set(0, interpreted, BPF_ANY).unwrap();
    assert!(!free.prog_array_get(0).unwrap().has_jit());
    // The raw API: delete works on indices; updates need handles.
    map.delete(&k32(1)).unwrap();
    assert_eq!(err(map.delete(&k32(1))), ENOENT);
    assert_eq!(err(map.delete(&k32(7))), E2BIG);
    assert_eq!(err(map.update(&k32(1), &k32(3), BPF_ANY)), ENOTSUPP_);
    assert_eq!(err(map.lookup(&k32(1))), ENOTSUPP_);
    assert_eq!(map.keys().count(), 4);
    assert_eq!(bpf_update(&map, &k32(1), &k32(1), BPF_ANY), EINVAL as i64);
}

// ------------------------------------------------------------------------------ typed handles

#[test]
fn typed_handles() {
    let h: maps::HashMap<u32, [u64; 2]> =
        maps::HashMap::new(create(MapType::Hash, 4, 16, 8)).unwrap();
    h.insert(&1, &[10, 11], BPF_ANY).unwrap();
    h.insert(&2, &[20, 21], BPF_NOEXIST).unwrap();
    assert_eq!(err(h.insert(&2, &[0, 0], BPF_NOEXIST)), EEXIST);
    assert_eq!(h.get(&1).unwrap(), Some([10, 11]));
    assert_eq!(h.get(&3).unwrap(), None);
    let mut all: Vec<_> = h.iter().collect();
    all.sort();
    assert_eq!(all, vec![(1, [10, 11]), (2, [20, 21])]);
    h.remove(&1).unwrap();
    assert_eq!(err(h.remove(&1)), ENOENT);
    assert_eq!(h.keys().collect::<Vec<_>>(), vec![2]);
    // Wrong sizes or types are refused.
    assert_eq!(
        err(maps::HashMap::<u64, u64>::new(create(
            MapType::Hash,
            4,
            8,
            1
        ))),
        EINVAL
    );
    assert_eq!(
        err(maps::HashMap::<u32, u32>::new(create(
            MapType::Array,
            4,
            4,
            1
        ))),
        EINVAL
    );
    maps::HashMap::<u32, u32>::new(create(MapType::LruHash, 4, 4, 1)).unwrap();

    let a: Array<u16> = Array::new(create(MapType::Array, 4, 2, 3)).unwrap();
    assert_eq!(a.len(), 3);
    a.set(2, &0xbeef, BPF_ANY).unwrap();
    assert_eq!(a.get(2).unwrap(), 0xbeef);
    assert_eq!(err(a.get(3)), ENOENT);
    assert_eq!(err(a.set(3, &1, BPF_ANY)), E2BIG);
    assert_eq!(
        a.iter().collect::<Vec<_>>(),
        vec![(0, 0), (1, 0), (2, 0xbeef)]
    );

    let n = possible_cpus() as usize;
    let pa: PerCpuArray<u32> = PerCpuArray::new(create(MapType::PercpuArray, 4, 4, 2)).unwrap();
    let values: Vec<u32> = (0..n as u32).map(|i| i * 3).collect();
    pa.set(1, &values, BPF_ANY).unwrap();
    assert_eq!(pa.get(1).unwrap(), values);
    assert_eq!(pa.get(0).unwrap(), vec![0; n]);
    assert_eq!(err(pa.set(0, &values[..n - 1], BPF_ANY)), EINVAL);

    let ph: PerCpuHashMap<u64, u64> =
        PerCpuHashMap::new(create(MapType::PercpuHash, 8, 8, 2)).unwrap();
    let values: Vec<u64> = (0..n as u64).collect();
    ph.insert(&5, &values, BPF_ANY).unwrap();
    assert_eq!(ph.get(&5).unwrap(), Some(values));
    assert_eq!(ph.keys().collect::<Vec<_>>(), vec![5]);
    ph.remove(&5).unwrap();
    assert_eq!(ph.get(&5).unwrap(), None);
}

// ------------------------------------------------------------------------------ helpers

/// One engine's run of a program.
type Engine = Box<dyn Fn(&RunEnv) -> Result<u64, ExecError>>;

/// The engines a checked run of the map helpers is compared on: the interpreter, checked JIT
/// code and the same through `Prog::run_env`.
fn checked_engines(src: &str) -> Vec<(&'static str, Engine)> {
    let program = livebpf::assemble_program(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut helpers = livebpf::Helpers::new();
    maps::helpers::register(&mut helpers);
    let jit = livebpf::JitProgram::compile(&program, &helpers, livebpf::JitOptions::checked())
        .expect("compiles");
    let prog =
        livebpf::Prog::load(&program, &helpers, livebpf::JitOptions::checked()).expect("loads");
    vec![
        (
            "interpreter",
            Box::new(move |env: &RunEnv| {
                let interp = livebpf::Interpreter::new(&program).with_helpers(helpers.clone());
                // SAFETY: the tests' environments hold live maps and buffers only.
                unsafe { interp.run_env(env) }
            }),
        ),
        (
            "checked JIT",
            Box::new(move |env: &RunEnv| {
                let mut stack = livebpf::jit::JitStack::new();
                // SAFETY: as above.
                unsafe { jit.run_env(env, &mut stack) }
            }),
        ),
        (
            "Prog",
            // SAFETY: as above.
            Box::new(move |env: &RunEnv| unsafe { prog.run_env(env) }),
        ),
    ]
}

/// Runs `src` on every checked engine in turn with `maps` known and `args` in r1..r5.
fn run_each(src: &str, maps: &[&Map], args: [u64; 5]) -> Vec<Result<u64, ExecError>> {
    let known: Vec<*const RawMap> = maps.iter().map(|m| m.as_raw()).collect();
    let env = RunEnv {
        args,
        maps: &known,
        ..RunEnv::default()
    };
    checked_engines(src)
        .into_iter()
        .map(|(_, run)| run(&env))
        .collect()
}

/// [`run_each`] where every engine must return the same result.
fn run_checked(src: &str, maps: &[&Map], args: [u64; 5]) -> Result<u64, ExecError> {
    let results = run_each(src, maps, args);
    for got in &results[1..] {
        assert_eq!(
            got, &results[0],
            "an engine differs from the interpreter\n{src}"
        );
    }
    results[0].clone()
}

#[test]
fn helpers_by_kernel_id() {
    use livebpf::helpers::Helper;
    use livebpf::maps::helpers as h;
    let mut registry = livebpf::Helpers::new();
    h::register(&mut registry);
    for id in h::ids() {
        assert!(registry.contains(id as u64), "helper {id}");
    }
    assert!(matches!(registry.lookup(12), Some(Helper::TailCall)));
    assert!(matches!(registry.lookup(1), Some(Helper::Context(_))));
    assert!(matches!(registry.lookup(8), Some(Helper::Plain(_))));
    assert_eq!(h::get_smp_processor_id(0, 0, 0, 0, 0), current_cpu() as u64);
}

/// A lookup of key r1 in a hash map of u64 values (r6 = the value pointer), then `tail`.
fn lookup_then(map: &Map, tail: &str) -> String {
    format!(
        "stxw [%r10-4], %r1
         lddw %r1, {m:#x}
         mov %r2, %r10
         add %r2, -4
         call 1
         mov %r6, %r0
         {tail}",
        m = map.as_raw() as u64
    )
}

#[test]
fn checked_map_helpers_update_look_up_and_delete() {
    let map = create(MapType::Hash, 4, 8, 4);
    let m = map.as_raw() as u64;
    // update(key r1, value r2), returning the errno.
    let update = format!(
        "stxw [%r10-4], %r1
         stxdw [%r10-16], %r2
         lddw %r1, {m:#x}
         mov %r2, %r10
         add %r2, -4
         mov %r3, %r10
         add %r3, -16
         mov %r4, %r5
         call 2
         exit"
    );
    assert_eq!(run_checked(&update, &[&map], [3, 42, 0, 0, BPF_ANY]), Ok(0));
    assert_eq!(
        run_checked(&update, &[&map], [3, 43, 0, 0, BPF_NOEXIST]).map(|r| r as i64),
        Ok(EEXIST as i64)
    );
    // The value a lookup returns is granted: load it, add one in place, load it again.
    let bump = lookup_then(
        &map,
        "jeq %r6, 0, +4
         ldxdw %r0, [%r6]
         add %r0, 1
         stxdw [%r6], %r0
         ldxdw %r0, [%r6]
         exit",
    );
    // Three engines in turn: 42 + 1, + 1, + 1.
    assert_eq!(
        run_each(&bump, &[&map], [3, 0, 0, 0, 0]),
        [Ok(43), Ok(44), Ok(45)]
    );
    assert_eq!(
        map.lookup(&k32(3)).unwrap(),
        Some(45u64.to_ne_bytes().to_vec())
    );
    // Not found: null, nothing granted.
    assert_eq!(run_checked(&bump, &[&map], [9, 0, 0, 0, 0]), Ok(0));
    let delete = format!(
        "stxw [%r10-4], %r1
         lddw %r1, {m:#x}
         mov %r2, %r10
         add %r2, -4
         call 3
         exit"
    );
    let enoent = Ok(ENOENT as i64 as u64);
    assert_eq!(
        run_each(&delete, &[&map], [3, 0, 0, 0, 0]),
        [Ok(0), enoent.clone(), enoent]
    );
}

#[test]
fn checked_map_helpers_refuse_what_the_verifier_would() {
    let map = create(MapType::Array, 4, 8, 4);
    let other = create(MapType::Array, 4, 8, 4);
    let out = |pc, addr, size, access| {
        Err(ExecError::OutOfBounds {
            pc,
            addr,
            size,
            access,
        })
    };
    // A map the run does not know: the lookup (slot 4, after the 2-slot lddw) fails.
    let src = lookup_then(&map, "mov %r0, 1\nexit");
    match run_checked(&src, &[&other], [0; 5]) {
        Err(ExecError::HelperFault {
            pc: 5,
            helper: 1,
            reason,
        }) => {
            assert!(reason.contains("RunEnv::maps"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // No map list at all: the same.
    assert!(matches!(
        run_checked(&src, &[], [0; 5]),
        Err(ExecError::HelperFault {
            pc: 5,
            helper: 1,
            ..
        })
    ));
    assert_eq!(run_checked(&src, &[&other, &map], [0; 5]), Ok(1));
    // A key pointer the program may not read: the key is 4 bytes at 0x1000.
    let bad_key = format!(
        "lddw %r1, {m:#x}
         mov %r2, 4096
         call 1
         exit",
        m = map.as_raw() as u64
    );
    assert_eq!(
        run_checked(&bad_key, &[&map], [0; 5]),
        out(3, 4096, 4, Access::Load)
    );
    // One byte past the granted value (8 bytes): out of bounds at the load.
    let past = lookup_then(&map, "ldxb %r0, [%r6+8]\nexit");
    let value = run_checked(
        &lookup_then(&map, "mov %r0, %r6\nexit"),
        &[&map],
        [1, 0, 0, 0, 0],
    )
    .unwrap();
    assert_eq!(
        run_checked(&past, &[&map], [1, 0, 0, 0, 0]),
        out(7, value + 8, 1, Access::Load)
    );
    // Grants end with their run: the value's address, given as r1, is out of bounds in a run
    // that did not look it up.
    assert_eq!(
        run_checked("ldxdw %r0, [%r1]\nexit", &[&map], [value, 0, 0, 0, 0]),
        out(0, value, 8, Access::Load)
    );
    // A map read-only for programs: its values are granted read-only.
    let ro = Map::create(&spec(MapType::Array, 4, 8, 1).with_flags(BPF_F_RDONLY_PROG)).unwrap();
    let store = lookup_then(&ro, "ldxdw %r0, [%r6]\nstxdw [%r6], %r0\nexit");
    let value = run_checked(&lookup_then(&ro, "mov %r0, %r6\nexit"), &[&ro], [0; 5]).unwrap();
    assert_eq!(
        run_checked(&store, &[&ro], [0; 5]),
        out(8, value, 8, Access::Store)
    );
}

#[test]
fn grants_are_bounded_deduplicated_and_per_run() {
    use livebpf::exec::MAX_GRANTS;
    let n = MAX_GRANTS as u32 + 10;
    let map = create(MapType::Array, 4, 8, n);
    // Looks up keys 0, step, 2 step, ... below r1, loading each value; returns the count.
    let lookups = format!(
        "mov %r7, %r1
         mov %r8, %r2
         mov %r9, 0
         mov %r6, 0
         loop:
         stxw [%r10-4], %r6
         lddw %r1, {m:#x}
         mov %r2, %r10
         add %r2, -4
         call 1
         jeq %r0, 0, done
         ldxdw %r1, [%r0]
         add %r9, 1
         add %r6, %r8
         jlt %r6, %r7, loop
         done:
         mov %r0, %r9
         exit",
        m = map.as_raw() as u64
    );
    // Exactly MAX_GRANTS distinct values per run, twice (nothing is left from the first run).
    for _ in 0..2 {
        assert_eq!(
            run_checked(&lookups, &[&map], [MAX_GRANTS as u64, 1, 0, 0, 0]),
            Ok(MAX_GRANTS as u64)
        );
    }
    // One more fails the run at the lookup (slot 9, after the lddw).
    match run_checked(&lookups, &[&map], [MAX_GRANTS as u64 + 1, 1, 0, 0, 0]) {
        Err(ExecError::HelperFault {
            pc: 9,
            helper: 1,
            reason,
        }) => {
            assert!(reason.contains("distinct regions"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The same key over and over is one grant: r1 lookups of key 0.
    let same = format!(
        "mov %r7, %r1
         mov %r9, 0
         stw [%r10-4], 0
         loop:
         lddw %r1, {m:#x}
         mov %r2, %r10
         add %r2, -4
         call 1
         ldxdw %r1, [%r0]
         add %r9, 1
         jlt %r9, %r7, loop
         mov %r0, %r9
         exit",
        m = map.as_raw() as u64
    );
    let many = 5 * MAX_GRANTS as u64;
    assert_eq!(run_checked(&same, &[&map], [many, 0, 0, 0, 0]), Ok(many));
}

#[test]
fn checked_ring_buffer_records_are_granted_until_released() {
    let rb = ringbuf(page());
    let r = rb.as_raw() as u64;
    let mut c = RingBufConsumer::new(&rb).unwrap();
    // reserve 8 bytes, write r1 into them, submit (r2 = 1: submit twice).
    let src = format!(
        "mov %r6, %r1
         mov %r7, %r2
         lddw %r1, {r:#x}
         mov %r2, 8
         mov %r3, 0
         call 131
         jeq %r0, 0, none
         mov %r8, %r0
         stxdw [%r8], %r6
         mov %r1, %r8
         mov %r2, 0
         call 132
         jeq %r7, 0, ok
         mov %r1, %r8
         mov %r2, 0
         call 132
         ok:
         mov %r0, 1
         exit
         none:
         mov %r0, 0
         exit"
    );
    assert_eq!(run_checked(&src, &[&rb], [7, 0, 0, 0, 0]), Ok(1));
    for _ in 0..3 {
        assert_eq!(c.next(), Some(7u64.to_ne_bytes().to_vec()));
    }
    // A second submit of the same record: refused (slot 17), the first went through.
    match run_checked(&src, &[&rb], [8, 1, 0, 0, 0]) {
        Err(ExecError::HelperFault {
            pc: 16,
            helper: 132,
            reason,
        }) => {
            assert!(reason.contains("not a ring buffer record"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    for _ in 0..3 {
        assert_eq!(c.next(), Some(8u64.to_ne_bytes().to_vec()));
    }
    // Submitting a pointer that is no record (the stack).
    let bogus = "mov %r1, %r10\nadd %r1, -8\nmov %r2, 0\ncall 133\nmov %r0, 1\nexit";
    assert!(matches!(
        run_checked(bogus, &[&rb], [0; 5]),
        Err(ExecError::HelperFault {
            pc: 3,
            helper: 133,
            ..
        })
    ));
    // Writing past the record is out of bounds (each engine's record is another).
    let past = src.replace("stxdw [%r8], %r6", "stxdw [%r8+8], %r6");
    for r in run_each(&past, &[&rb], [9, 0, 0, 0, 0]) {
        assert!(
            matches!(
                r,
                Err(ExecError::OutOfBounds {
                    pc: 9,
                    size: 8,
                    access: Access::Store,
                    ..
                })
            ),
            "{r:?}"
        );
    }
}

#[test]
fn checked_per_cpu_lookups_grant_that_cpus_value() {
    let pa = create(MapType::PercpuArray, 4, 4, 1);
    // lookup_percpu(key 0, cpu r1) then load the u32.
    let src = format!(
        "mov %r3, %r1
         stw [%r10-4], 0
         lddw %r1, {m:#x}
         mov %r2, %r10
         add %r2, -4
         call 195
         jeq %r0, 0, +2
         ldxw %r0, [%r0]
         exit
         mov %r0, 99
         exit",
        m = pa.as_raw() as u64
    );
    let n = possible_cpus() as u64;
    let values: Vec<u32> = (0..n as u32).map(|i| 100 + i).collect();
    PerCpuArray::<u32>::new(pa.clone())
        .unwrap()
        .set(0, &values, BPF_ANY)
        .unwrap();
    assert_eq!(
        run_checked(&src, &[&pa], [n - 1, 0, 0, 0, 0]),
        Ok(100 + n - 1)
    );
    assert_eq!(run_checked(&src, &[&pa], [n, 0, 0, 0, 0]), Ok(99));
}

/// A JIT-compiled program calling the map helpers on a map whose address it loads with `lddw`,
/// as a loaded object will: `counter[key 7] += 1` by lookup, else create it with update.
#[test]
fn a_jit_program_counts_in_a_hash_map() {
    let map = create(MapType::Hash, 4, 8, 16);
    let src = format!(
        "lddw %r1, {addr:#x}
         mov %r2, %r10
         add %r2, -4
         stw [%r10-4], 7
         call 1
         jeq %r0, 0, create
         mov %r1, 1
         lock add [%r0], %r1
         ldxdw %r0, [%r0]
         exit
         create:
         lddw %r1, {addr:#x}
         mov %r2, %r10
         add %r2, -4
         stdw [%r10-16], 1
         mov %r3, %r10
         add %r3, -16
         mov %r4, 1
         call 2
         mov %r0, 1
         exit",
        addr = map.as_raw() as u64
    );
    let program = livebpf::assemble_program(&src).expect("assembles");
    let mut helpers = livebpf::Helpers::new();
    maps::helpers::register(&mut helpers);
    // SAFETY: the program only touches its stack and the map's value, through helpers.
    let opts = unsafe { livebpf::JitOptions::trusted() };
    let jit = livebpf::JitProgram::compile(&program, &helpers, opts).expect("compiles");
    for i in 1..=100u64 {
        assert_eq!(jit.call([0; 5]).unwrap(), i);
    }
    // Two threads at once: the atomic add in the value loses nothing.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..1000 {
                    jit.call([0; 5]).unwrap();
                }
            });
        }
    });
    assert_eq!(
        map.lookup(&k32(7)).unwrap(),
        Some(2100u64.to_ne_bytes().to_vec())
    );
}
