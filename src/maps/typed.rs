//! Typed host-side handles over a [`Map`], in the style of aya.

use std::marker::PhantomData;

use super::mem::round8;
use super::{Map, MapError, MapType, possible_cpus};

/// Plain old data: any bit pattern is a valid value, there is no padding and no pointer, so a
/// value can be copied to and from map bytes.
///
/// # Safety
/// Implement it only for types with no padding bytes, no invalid bit patterns and no interior
/// references (integers, arrays of them, `#[repr(C)]` structs of them without padding).
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: integers have no padding and no invalid bit patterns.
        unsafe impl Pod for $t {}
    )* };
}
pod!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);
// SAFETY: an array of Pod has no padding between elements and no invalid patterns.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: Pod values have no padding: every byte is initialised.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn from_bytes<T: Pod>(b: &[u8]) -> T {
    assert!(b.len() >= std::mem::size_of::<T>());
    // SAFETY: enough bytes; any bit pattern is a valid Pod.
    unsafe { (b.as_ptr() as *const T).read_unaligned() }
}

fn check_types(
    map: &Map,
    types: &[MapType],
    key_size: usize,
    value_size: usize,
) -> Result<(), MapError> {
    if !types.contains(&map.map_type()) {
        return Err(MapError::Invalid(
            "the map's type does not match this handle: use the handle for its type",
        ));
    }
    if map.spec().key_size as usize != key_size {
        return Err(MapError::WrongSize {
            what: "key",
            expected: map.spec().key_size as usize,
            got: key_size,
        });
    }
    if map.spec().value_size as usize != value_size {
        return Err(MapError::WrongSize {
            what: "value",
            expected: map.spec().value_size as usize,
            got: value_size,
        });
    }
    Ok(())
}

/// Keys of a map, by `get_next_key` (see [`Map::get_next_key`]).
pub struct Keys<'a, K> {
    map: &'a Map,
    convert: fn(&[u8]) -> K,
    last: Option<Vec<u8>>,
    done: bool,
}

impl<'a, K> Keys<'a, K> {
    pub(crate) fn new(map: &'a Map, convert: fn(&[u8]) -> K) -> Keys<'a, K> {
        Keys {
            map,
            convert,
            last: None,
            done: false,
        }
    }
}

impl<K> Iterator for Keys<'_, K> {
    type Item = K;
    fn next(&mut self) -> Option<K> {
        if self.done {
            return None;
        }
        match self.map.get_next_key(self.last.as_deref()) {
            Ok(Some(k)) => {
                let item = (self.convert)(&k);
                self.last = Some(k);
                Some(item)
            }
            _ => {
                self.done = true;
                None
            }
        }
    }
}

/// A `Hash` or `LruHash` map with typed keys and values.
#[derive(Clone, Debug)]
pub struct HashMap<K, V> {
    map: Map,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: Pod, V: Pod> HashMap<K, V> {
    /// Wraps `map`: `EINVAL` for another type or sizes other than `K`'s and `V`'s.
    pub fn new(map: Map) -> Result<Self, MapError> {
        check_types(
            &map,
            &[MapType::Hash, MapType::LruHash],
            std::mem::size_of::<K>(),
            std::mem::size_of::<V>(),
        )?;
        Ok(HashMap {
            map,
            _types: PhantomData,
        })
    }

    /// The underlying map.
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// The value for `key`, if any.
    pub fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        Ok(self.map.lookup(bytes_of(key))?.map(|v| from_bytes(&v)))
    }

    /// Inserts or replaces, per `flags` (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`).
    pub fn insert(&self, key: &K, value: &V, flags: u64) -> Result<(), MapError> {
        self.map.update(bytes_of(key), bytes_of(value), flags)
    }

    /// Deletes `key` (`ENOENT` if absent).
    pub fn remove(&self, key: &K) -> Result<(), MapError> {
        self.map.delete(bytes_of(key))
    }

    /// Every key.
    pub fn keys(&self) -> Keys<'_, K> {
        Keys::new(&self.map, from_bytes::<K>)
    }

    /// Every (key, value) pair (keys deleted under the iteration are skipped).
    pub fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        self.keys()
            .filter_map(|k| Some((k, self.get(&k).ok().flatten()?)))
    }
}

/// A `PercpuHash` or `LruPercpuHash` map: each value is one `V` per slot ([`possible_cpus`]).
#[derive(Clone, Debug)]
pub struct PerCpuHashMap<K, V> {
    map: Map,
    _types: PhantomData<fn() -> (K, V)>,
}

fn split_percpu<V: Pod>(bytes: &[u8]) -> Vec<V> {
    let stride = round8(std::mem::size_of::<V>());
    (0..possible_cpus() as usize)
        .map(|cpu| from_bytes(&bytes[cpu * stride..]))
        .collect()
}

fn join_percpu<V: Pod>(values: &[V]) -> Result<Vec<u8>, MapError> {
    let n = possible_cpus() as usize;
    let size = std::mem::size_of::<V>();
    let stride = round8(size);
    if values.len() != n {
        return Err(MapError::WrongSize {
            what: "value",
            expected: n * stride,
            got: values.len() * stride,
        });
    }
    let mut out = vec![0u8; n * stride];
    for (cpu, v) in values.iter().enumerate() {
        out[cpu * stride..cpu * stride + size].copy_from_slice(bytes_of(v));
    }
    Ok(out)
}

impl<K: Pod, V: Pod> PerCpuHashMap<K, V> {
    /// Wraps `map`: `EINVAL` for another type or other sizes.
    pub fn new(map: Map) -> Result<Self, MapError> {
        check_types(
            &map,
            &[MapType::PercpuHash, MapType::LruPercpuHash],
            std::mem::size_of::<K>(),
            std::mem::size_of::<V>(),
        )?;
        Ok(PerCpuHashMap {
            map,
            _types: PhantomData,
        })
    }

    /// The underlying map.
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// Every slot's value for `key`, in slot order.
    pub fn get(&self, key: &K) -> Result<Option<Vec<V>>, MapError> {
        Ok(self.map.lookup(bytes_of(key))?.map(|v| split_percpu(&v)))
    }

    /// Sets every slot's value (`values.len()` must be [`possible_cpus`]).
    pub fn insert(&self, key: &K, values: &[V], flags: u64) -> Result<(), MapError> {
        self.map.update(bytes_of(key), &join_percpu(values)?, flags)
    }

    /// Deletes `key`.
    pub fn remove(&self, key: &K) -> Result<(), MapError> {
        self.map.delete(bytes_of(key))
    }

    /// Every key.
    pub fn keys(&self) -> Keys<'_, K> {
        Keys::new(&self.map, from_bytes::<K>)
    }
}

/// An `Array` map of `V`.
#[derive(Clone, Debug)]
pub struct Array<V> {
    map: Map,
    _types: PhantomData<fn() -> V>,
}

impl<V: Pod> Array<V> {
    /// Wraps `map`: `EINVAL` for another type or another value size.
    pub fn new(map: Map) -> Result<Self, MapError> {
        check_types(&map, &[MapType::Array], 4, std::mem::size_of::<V>())?;
        Ok(Array {
            map,
            _types: PhantomData,
        })
    }

    /// The underlying map.
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// `max_entries`.
    pub fn len(&self) -> u32 {
        self.map.spec().max_entries
    }

    /// Whether the array has no entries (never: arrays have at least one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value at `index`; `ENOENT` out of range (the syscall's answer).
    pub fn get(&self, index: u32) -> Result<V, MapError> {
        self.map
            .lookup(&index.to_ne_bytes())?
            .map(|v| from_bytes(&v))
            .ok_or(MapError::NotFound(
                "array index is not below max_entries: use a smaller index",
            ))
    }

    /// Sets the value at `index` (`E2BIG` out of range, `EEXIST` with `BPF_NOEXIST`).
    pub fn set(&self, index: u32, value: &V, flags: u64) -> Result<(), MapError> {
        self.map
            .update(&index.to_ne_bytes(), bytes_of(value), flags)
    }

    /// Every (index, value).
    pub fn iter(&self) -> impl Iterator<Item = (u32, V)> + '_ {
        (0..self.len()).filter_map(|i| Some((i, self.get(i).ok()?)))
    }
}

/// A `PercpuArray` map: each entry is one `V` per slot ([`possible_cpus`]).
#[derive(Clone, Debug)]
pub struct PerCpuArray<V> {
    map: Map,
    _types: PhantomData<fn() -> V>,
}

impl<V: Pod> PerCpuArray<V> {
    /// Wraps `map`: `EINVAL` for another type or another value size.
    pub fn new(map: Map) -> Result<Self, MapError> {
        check_types(&map, &[MapType::PercpuArray], 4, std::mem::size_of::<V>())?;
        Ok(PerCpuArray {
            map,
            _types: PhantomData,
        })
    }

    /// The underlying map.
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// `max_entries`.
    pub fn len(&self) -> u32 {
        self.map.spec().max_entries
    }

    /// Whether the array has no entries (never).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every slot's value at `index`, in slot order; `ENOENT` out of range.
    pub fn get(&self, index: u32) -> Result<Vec<V>, MapError> {
        self.map
            .lookup(&index.to_ne_bytes())?
            .map(|v| split_percpu(&v))
            .ok_or(MapError::NotFound(
                "array index is not below max_entries: use a smaller index",
            ))
    }

    /// Sets every slot's value at `index` (`values.len()` must be [`possible_cpus`]).
    pub fn set(&self, index: u32, values: &[V], flags: u64) -> Result<(), MapError> {
        self.map
            .update(&index.to_ne_bytes(), &join_percpu(values)?, flags)
    }
}
