//! Map operations per op, BPF side (what helpers do for a JIT program): hash lookup and update
//! with 4-byte keys and 8-byte values over 1024 entries, array lookup and update, LRU and per-CPU
//! variants, and ring buffer output. The kernel's figures for comparison: ~10 ns a hash lookup,
//! ~50 ns an update.
//!
//! `cargo bench --bench maps`: criterion's wall-clock time per iteration (ns/op), then a table of
//! CPU time per op, which a busy machine distorts less.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use livebpf::maps::{self, BPF_ANY, BPF_EXIST, Map, MapSpec, MapType, RingBufConsumer};
use livebpf::reclaim::{self, ReadGuard};

const ENTRIES: u32 = 1024;

fn filled(t: MapType) -> Map {
    let map = Map::create(&MapSpec::new("bench", t, 4, 8, ENTRIES)).unwrap();
    let n = map.value_len();
    for k in 0..ENTRIES {
        map.update(&k.to_ne_bytes(), &vec![1; n], BPF_ANY).unwrap();
    }
    map
}

fn lookups(c: &mut Criterion, name: &str, map: &Map) {
    let keys: Vec<[u8; 4]> = (0..ENTRIES)
        .map(|k| (k * 7919 % ENTRIES).to_ne_bytes())
        .collect();
    // One run around the measurement, as a JIT run would hold one around its lookups.
    let _run = ReadGuard::new();
    let mut i = 0usize;
    c.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) & (ENTRIES as usize - 1);
            // SAFETY: a 4-byte key; in a run.
            black_box(unsafe { map.lookup_ptr(keys[i].as_ptr()) })
        })
    });
}

fn updates(c: &mut Criterion, name: &str, map: &Map, flags: u64) {
    let keys: Vec<[u8; 4]> = (0..ENTRIES)
        .map(|k| (k * 7919 % ENTRIES).to_ne_bytes())
        .collect();
    let value = 42u64.to_ne_bytes();
    let mut i = 0usize;
    c.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) & (ENTRIES as usize - 1);
            // SAFETY: 4-byte key, 8-byte value.
            let r = unsafe { map.update_elem(keys[i].as_ptr(), value.as_ptr(), flags) };
            debug_assert_eq!(r, 0);
            black_box(r)
        })
    });
    maps::flush_retired();
    reclaim::flush().unwrap();
}

fn bench(c: &mut Criterion) {
    let hash = filled(MapType::Hash);
    lookups(c, "hash_lookup", &hash);
    updates(c, "hash_update_existing", &hash, BPF_EXIST);
    for batch in [1, 256, 4096] {
        maps::set_retire_batch(batch);
        updates(
            c,
            &format!("hash_update_existing_retire_batch_{batch}"),
            &hash,
            BPF_EXIST,
        );
    }
    maps::set_retire_batch(64);
    let miss = filled(MapType::Hash);
    {
        let _run = ReadGuard::new();
        let key = 5000u32.to_ne_bytes();
        c.bench_function("hash_lookup_miss", |b| {
            // SAFETY: a 4-byte key; in a run.
            b.iter(|| black_box(unsafe { miss.lookup_ptr(black_box(key.as_ptr())) }))
        });
    }
    let lru = filled(MapType::LruHash);
    lookups(c, "lru_hash_lookup", &lru);
    updates(c, "lru_hash_update_existing", &lru, BPF_EXIST);
    let percpu = filled(MapType::PercpuHash);
    lookups(c, "percpu_hash_lookup", &percpu);
    updates(c, "percpu_hash_update_in_place", &percpu, BPF_EXIST);
    let array = filled(MapType::Array);
    lookups(c, "array_lookup", &array);
    updates(c, "array_update", &array, BPF_ANY);
    let percpu_array = filled(MapType::PercpuArray);
    lookups(c, "percpu_array_lookup", &percpu_array);

    let rb = Map::create(&MapSpec::new("rb", MapType::Ringbuf, 0, 0, 1 << 16)).unwrap();
    let mut consumer = RingBufConsumer::new(&rb).unwrap();
    let record = [7u8; 16];
    let mut n = 0u32;
    c.bench_function("ringbuf_output_16B_and_consume", |b| {
        b.iter(|| {
            rb.ringbuf_write(&record, maps::BPF_RB_NO_WAKEUP).unwrap();
            n += 1;
            if n.is_multiple_of(256) {
                consumer.consume(|d| {
                    black_box(d);
                });
            }
        })
    });
}

fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits for every retired element (not from inside a run: lookups hold one).
fn settle() {
    maps::flush_retired();
    if !reclaim::is_online() {
        reclaim::flush().unwrap();
    }
}

/// ns/op by CPU time rather than wall time (the machine may be shared): the calling thread's
/// CPU time, and the whole process's (which adds the reclaimer thread's work for updates).
fn per_op(name: &str, iters: u64, mut op: impl FnMut(u64)) {
    for i in 0..iters / 10 {
        op(i);
    }
    settle();
    let (t0, p0) = (
        cpu_time(libc::CLOCK_THREAD_CPUTIME_ID),
        cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID),
    );
    for i in 0..iters {
        op(i);
    }
    settle();
    let (t1, p1) = (
        cpu_time(libc::CLOCK_THREAD_CPUTIME_ID),
        cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID),
    );
    let ns = |d: Duration| d.as_nanos() as f64 / iters as f64;
    println!(
        "{name:<36} {:>7.1} ns/op thread CPU, {:>7.1} ns/op process CPU",
        ns(t1 - t0),
        ns(p1 - p0)
    );
}

/// The summary table, printed after criterion's runs.
fn summary(_: &mut Criterion) {
    const N: u64 = 4_000_000;
    let keys: Vec<[u8; 4]> = (0..ENTRIES)
        .map(|k| (k * 7919 % ENTRIES).to_ne_bytes())
        .collect();
    let key = |i: u64| keys[(i & (ENTRIES as u64 - 1)) as usize].as_ptr();
    let value = 42u64.to_ne_bytes();
    println!("\nmaps, CPU time per op (4-byte keys, 8-byte values, {ENTRIES} entries):");
    for (t, name) in [
        (MapType::Hash, "hash"),
        (MapType::LruHash, "lru_hash"),
        (MapType::PercpuHash, "percpu_hash"),
        (MapType::Array, "array"),
    ] {
        let map = filled(t);
        {
            let _run = ReadGuard::new();
            // SAFETY: 4-byte keys; in a run.
            per_op(&format!("{name}_lookup"), N, |i| {
                black_box(unsafe { map.lookup_ptr(key(i)) });
            });
        }
        // SAFETY: 4-byte keys, 8-byte values.
        per_op(&format!("{name}_update"), N, |i| {
            black_box(unsafe { map.update_elem(key(i), value.as_ptr(), BPF_ANY) });
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench, summary
}
criterion_main!(benches);
