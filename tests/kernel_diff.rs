//! The Linux kernel as an oracle: each C program in `tests/bpf/diff/` is compiled with clang, run
//! in the kernel with `BPF_PROG_TEST_RUN` (through real libbpf: `common/kernel.rs`) and through
//! `livebpf run OBJ.o --json` with the interpreter and the JIT, on the same packets in the same
//! order. Return values, output packets and map contents must be identical; per-CPU map values
//! are compared as the multiset of their non-zero per-CPU slots (the CPU counts and slot numbers
//! differ between the kernel and livebpf).
//!
//! Each program's kernel result is also checked against what its C source says it must be, so
//! the oracle itself is tested. Without clang the tests skip loudly (failing with
//! `LIVEBPF_REQUIRE_CLANG=1`); without a usable kernel `bpf()` (not root, EPERM, ENOSYS) the
//! kernel half skips loudly (failing with `LIVEBPF_REQUIRE_KERNEL=1`) and livebpf's engines are
//! still checked against those expectations and against each other.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::kernel::{self, KernelError, hex};
use livebpf::loader::Object;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Compiling, running, comparing

fn find_clang() -> Option<&'static str> {
    ["clang-19", "clang"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `tests/bpf/diff/NAME.c` compiled to an object; `None` (after a loud message) without clang.
fn compile(name: &str) -> Option<PathBuf> {
    let Some(clang) = find_clang() else {
        assert!(
            std::env::var("LIVEBPF_REQUIRE_CLANG").as_deref() != Ok("1"),
            "LIVEBPF_REQUIRE_CLANG=1 but neither clang-19 nor clang runs: apt-get install clang-19 libbpf-dev"
        );
        eprintln!(
            "!! SKIPPED: {name}: clang-19 / clang not found (apt-get install clang-19 libbpf-dev)"
        );
        return None;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("diff-objects");
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/bpf/diff/{name}.c"));
    let out = dir.join(format!("{name}.o"));
    let o = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf"])
        // asm/types.h for linux/bpf.h; a missing directory is ignored.
        .args([
            "-I/usr/include/x86_64-linux-gnu",
            "-I/usr/include/aarch64-linux-gnu",
        ])
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("{clang} does not start: {e}"));
    assert!(
        o.status.success(),
        "{clang} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(out)
}

/// `livebpf run OBJ --prog PROG --engine ENGINE --packet HEX... --json`, parsed.
fn livebpf_run(obj: &Path, prog: &str, engine: &str, packets: &[Vec<u8>]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_livebpf"));
    cmd.arg("run")
        .arg(obj)
        .args(["--prog", prog, "--engine", engine, "--json"]);
    for p in packets {
        cmd.args(["--packet", &hex(p)]);
    }
    let o = cmd.output().expect("livebpf starts");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "livebpf run --engine {engine} {} failed ({}):\n{}{stdout}",
        obj.display(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let mut lines = stdout.lines();
    let (Some(line), None) = (lines.next(), lines.next()) else {
        panic!("livebpf run --json must print exactly one line, printed:\n{stdout}");
    };
    serde_json::from_str(line).unwrap_or_else(|e| panic!("livebpf run --json: {e}: {line}"))
}

/// The object's per-CPU maps: name and each CPU's slot size (the value padded to 8 bytes).
fn per_cpu_maps(obj: &Path) -> BTreeMap<String, usize> {
    let o = Object::from_file(obj).unwrap_or_else(|e| panic!("{}: {e}", obj.display()));
    o.maps
        .iter()
        .filter(|m| m.kind.is_percpu())
        .map(|m| (m.name.clone(), (m.value_size as usize).div_ceil(8) * 8))
        .collect()
}

/// Replaces each per-CPU value by the sorted list of its non-zero slots, so that results from
/// machines with different CPU counts, or runs on different CPUs, compare equal.
fn normalise(json: &Value, per_cpu: &BTreeMap<String, usize>) -> Value {
    let mut json = json.clone();
    let Some(maps) = json.get_mut("maps").and_then(Value::as_object_mut) else {
        return json;
    };
    for (name, &slot) in per_cpu {
        let Some(entries) = maps.get_mut(name).and_then(Value::as_object_mut) else {
            continue;
        };
        for value in entries.values_mut() {
            let bytes = unhex(value.as_str().expect("map values are hex strings"));
            let mut slots: Vec<String> = bytes
                .chunks(slot)
                .filter(|c| c.iter().any(|&b| b != 0))
                .map(hex)
                .collect();
            slots.sort();
            *value = Value::from(slots);
        }
    }
    json
}

/// The first place where two JSON values differ, as a path and both sides.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => first_difference(&p, u, v),
                    (u, v) => Some(format!("{p}: {u:?} vs {v:?}")),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(&format!("{path}[{i}]"), u, v))
            .or_else(|| {
                (x.len() != y.len()).then(|| format!("{path}: {} elements vs {}", x.len(), y.len()))
            }),
        _ => (a != b).then(|| format!("{path}: {a} vs {b}")),
    }
}

/// One differential case: a program in `tests/bpf/diff/SRC.c`, its packets, and what its C
/// source says the result must be.
struct Case {
    src: &'static str,
    prog: &'static str,
    packets: Vec<Vec<u8>>,
    expect: fn(&Result_),
}

fn diff(case: Case) {
    let Some(obj) = compile(case.src) else {
        return;
    };
    let per_cpu = per_cpu_maps(&obj);
    let kernel = match kernel::run(&obj, case.prog, &case.packets) {
        Ok(json) => {
            eprintln!("kernel {}: {json}", case.src);
            (case.expect)(&Result_::new(&json, &per_cpu, "kernel"));
            Some(json)
        }
        Err(KernelError::Unavailable(reason)) => {
            kernel::skip(&format!("the kernel half of {}", case.src), &reason);
            None
        }
        Err(e) => panic!("{}: {e}", case.src),
    };
    let mut reference = kernel.map(|k| ("kernel", k));
    for engine in ["interp", "jit"] {
        let ours = livebpf_run(&obj, case.prog, engine, &case.packets);
        (case.expect)(&Result_::new(&ours, &per_cpu, engine));
        match &reference {
            None => reference = Some((engine, ours)),
            Some((who, theirs)) => {
                let (a, b) = (normalise(theirs, &per_cpu), normalise(&ours, &per_cpu));
                if let Some(d) = first_difference("", &a, &b) {
                    panic!(
                        "{}: livebpf --engine {engine} differs from {who}\n  first difference: {d}\n  {who}: {theirs}\n  {engine}: {ours}",
                        case.src
                    );
                }
            }
        }
    }
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| panic!("{s}: {e}")))
        .collect()
}

/// A run's JSON, decoded for the expectations.
struct Result_ {
    who: &'static str,
    retvals: Vec<u64>,
    packets: Vec<Vec<u8>>,
    maps: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    per_cpu: BTreeMap<String, usize>,
}

impl Result_ {
    fn new(json: &Value, per_cpu: &BTreeMap<String, usize>, who: &'static str) -> Result_ {
        let bad = &format!("{who}: not the `livebpf run --json` shape: {json}");
        let runs = json["runs"].as_array().expect(bad);
        let maps = json["maps"].as_object().expect(bad);
        Result_ {
            who,
            retvals: runs
                .iter()
                .map(|r| r["retval"].as_u64().expect(bad))
                .collect(),
            packets: runs
                .iter()
                .map(|r| unhex(r["packet"].as_str().expect(bad)))
                .collect(),
            maps: maps
                .iter()
                .map(|(name, entries)| {
                    let entries = entries.as_object().expect(bad);
                    let entries = entries
                        .iter()
                        .map(|(k, v)| (unhex(k), unhex(v.as_str().expect(bad))))
                        .collect();
                    (name.clone(), entries)
                })
                .collect(),
            per_cpu: per_cpu.clone(),
        }
    }

    fn map(&self, name: &str) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        self.maps
            .get(name)
            .unwrap_or_else(|| panic!("{}: no map {name} in {:?}", self.who, self.maps.keys()))
    }

    /// A map's value as u64 little-endian words.
    fn words(&self, map: &str, key: &[u8]) -> Vec<u64> {
        let v = self
            .map(map)
            .get(key)
            .unwrap_or_else(|| panic!("{}: map {map} has no key {}", self.who, hex(key)));
        v.chunks(8).map(|c| le(c)).collect()
    }

    /// A per-CPU value's slots summed as u64 words (slot `i` of every CPU added up).
    fn per_cpu_sum(&self, map: &str, key: &[u8]) -> Vec<u64> {
        let slot = self.per_cpu[map];
        let v = &self.map(map)[key];
        let mut sum = vec![0u64; slot / 8];
        for cpu in v.chunks(slot) {
            for (s, w) in sum.iter_mut().zip(cpu.chunks(8)) {
                *s += le(w);
            }
        }
        sum
    }

    /// How many CPUs' slots of a per-CPU value are non-zero (one: every run was on one CPU).
    fn cpus_used(&self, map: &str, key: &[u8]) -> usize {
        let slot = self.per_cpu[map];
        self.map(map)[key]
            .chunks(slot)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count()
    }
}

fn le(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(w)
}

// ---------------------------------------------------------------------------------------------
// Packets

const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0b];
const IP_A: [u8; 4] = [10, 0, 0, 1];
const IP_B: [u8; 4] = [10, 0, 0, 2];

const ETH_IP: u16 = 0x0800;
const ETH_VLAN: u16 = 0x8100;
const ETH_ARP: u16 = 0x0806;
const UDP: u8 = 17;
const TCP: u8 = 6;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The Internet checksum of `data` (ones' complement of the ones' complement sum).
fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header (with `options`, a multiple of 4 bytes) and its payload, checksummed.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let hlen = 20 + options.len();
    let mut h = vec![0x40 | (hlen / 4) as u8, 0];
    h.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let c = csum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// The pseudo-header sum for a UDP or TCP checksum.
fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = csum(&u, pseudo(src, dst, UDP, u.len()));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ether(ETH_IP, &ipv4(src, dst, UDP, &[], &u))
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    let c = csum(&t, pseudo(src, dst, TCP, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ether(ETH_IP, &ipv4(src, dst, TCP, &[], &t))
}

/// `frame` with one 802.1Q tag (VLAN `vid`) after the MAC addresses.
fn vlan(vid: u16, frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&ETH_VLAN.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// `frame` with byte `at` set to `v`.
fn with(frame: &[u8], at: usize, v: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[at] = v;
    f
}

/// Whether an Ethernet/IPv4 frame's IP header checksum, and its UDP or TCP checksum, verify.
fn checksums_ok(f: &[u8]) -> bool {
    let ip = &f[14..];
    let hlen = usize::from(ip[0] & 15) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if csum(&ip[..hlen], 0) != 0 {
        return false;
    }
    let l4 = &ip[hlen..tot];
    let (src, dst) = (
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
    );
    match ip[9] {
        UDP if l4[6..8] == [0, 0] => true,
        p @ (UDP | TCP) => csum(l4, pseudo(src, dst, p, l4.len())) == 0,
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------------
// The programs

#[test]
fn parse() {
    let udp = udp4(IP_A, IP_B, 1000, 2000, b"hello");
    let dns = udp4(IP_A, IP_B, 1000, 53, b"query");
    let syn22 = tcp4(IP_A, IP_B, 5000, 22, SYN, b"");
    let synack22 = tcp4(IP_A, IP_B, 5000, 22, SYN | ACK, b"");
    let http = tcp4(IP_A, IP_B, 5000, 80, ACK, b"GET /");
    let opts = ether(ETH_IP, &ipv4(IP_A, IP_B, UDP, &[1, 1, 1, 0], &udp[34..]));
    let packets = vec![
        udp.clone(),                                     // 2 pass
        dns.clone(),                                     // 1 drop
        syn22,                                           // 1 drop
        synack22,                                        // 2 pass
        http.clone(),                                    // 3 tx
        vlan(7, &http),                                  // 3 tx, through one tag
        vlan(7, &vlan(8, &http)),                        // 16 two tags
        ether(ETH_ARP, &[0; 28]),                        // 10 not IP
        ether(ETH_IP, &[0x45; 10]),                      // 0 truncated IP header
        vlan(7, &udp)[..16].to_vec(),                    // 0 truncated VLAN tag
        with(&udp, 14, 0x44),                            // 13 IHL 4
        with(&udp, 17, 200),                             // 14 tot_len past the packet
        with(&with(&udp, 16, 0), 17, 10),                // 14 tot_len below the header
        with(&udp, 21, 1),                               // 11 fragment offset 8
        with(&udp, 23, 47),                              // 12 GRE
        udp[..38].to_vec(),                              // 14 UDP header cut: tot_len too long
        with(&with(&udp, 17, 24), 16, 0)[..38].to_vec(), // 0 UDP header past the packet
        with(&http, 46, 0x40),                           // 15 TCP doff 4
        with(&http, 46, 0xf0),                           // 15 TCP doff 15 past the packet
        opts,                                            // 2 IP options skipped
        ether(ETH_IP, &[0; 14])[..14].to_vec(),          // 0 Ethernet header only
    ];
    diff(Case {
        src: "parse",
        prog: "parse",
        packets,
        expect: |r| {
            assert_eq!(
                r.retvals,
                [
                    2, 1, 1, 2, 3, 3, 16, 10, 0, 0, 13, 14, 14, 11, 12, 14, 0, 15, 15, 2, 0
                ],
                "{}",
                r.who
            );
            assert!(r.maps.is_empty(), "{}: {:?}", r.who, r.maps);
        },
    });
}
