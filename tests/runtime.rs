//! The runtime layer on clang-compiled objects: maps, global data, subprograms, `bpf_loop`,
//! the XDP context and its helpers, `bpf_printk`, and what is refused — on the interpreter and
//! the checked JIT, which must agree. (`tests/kernel_diff.rs` checks the same against Linux.)

#[path = "common/clang.rs"]
mod clang;

use std::sync::{Arc, Mutex};

use livebpf::runtime::{Engine, LoadOptions, Loaded, RuntimeError};

const ENGINES: [Engine; 2] = [Engine::Interpreter, Engine::Jit];

fn load(name: &str) -> Option<Loaded> {
    let path = clang::object(name)?;
    Some(Loaded::from_file(&path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// An Ethernet + IPv4 header (20 bytes, no options) with protocol `proto`, and `pad` zeros.
fn ipv4_packet(proto: u8, pad: usize) -> Vec<u8> {
    let mut p = vec![0xff; 12];
    p.extend([0x08, 0x00]);
    p.extend([0x45, 0, 0, 20, 0, 0, 0, 0, 64, proto, 0, 0]);
    p.extend([10, 0, 0, 1, 10, 0, 0, 2]);
    p.extend(std::iter::repeat_n(0, pad));
    p
}

fn u64_value(loaded: &Loaded, map: &str, key: u32) -> Option<u64> {
    loaded
        .map(map)
        .unwrap()
        .lookup(&key.to_le_bytes())
        .unwrap()
        .map(|v| u64::from_le_bytes(v[..8].try_into().unwrap()))
}

#[test]
fn a_hash_map_counts_packets_on_every_engine() {
    for engine in ENGINES {
        let Some(loaded) = load("xdp_counter") else {
            return;
        };
        let prog = loaded.program("xdp_count").unwrap();
        for proto in [6, 6, 17, 6] {
            let out = prog.run_xdp(engine, &ipv4_packet(proto, 10)).unwrap();
            assert_eq!(out.retval, 2, "{engine:?}: XDP_PASS");
        }
        // The second and later packets of a protocol add to the value a lookup returned: in
        // checked mode, the value must be accessible for the rest of the run.
        assert_eq!(u64_value(&loaded, "counts", 6), Some(3), "{engine:?}");
        assert_eq!(u64_value(&loaded, "counts", 17), Some(1), "{engine:?}");
        // Too short for an IPv4 header: dropped, nothing counted.
        let mut short = ipv4_packet(6, 0);
        short.truncate(20);
        assert_eq!(prog.run_xdp(engine, &short).unwrap().retval, 1);
        assert_eq!(u64_value(&loaded, "counts", 6), Some(3), "{engine:?}");
    }
}

#[test]
fn subprograms_and_bpf_loop_callbacks_run_on_every_engine() {
    for engine in ENGINES {
        let Some(loaded) = load("subprog_loop") else {
            return;
        };
        // sum = rx_queue_index (0) + 0 + 1 + … + 9 = 45; twice(45 * 45) + 1 = 4051; & 3 = 3.
        let out = loaded
            .program("xdp_loop")
            .unwrap()
            .run_xdp(engine, &[0; 14])
            .unwrap();
        assert_eq!(out.retval, 3, "{engine:?}");
    }
}

/// Serialises the tests that replace the process-wide printk sink.
static SINK_LOCK: Mutex<()> = Mutex::new(());

#[test]
fn global_data_and_bpf_printk() {
    let _sink = SINK_LOCK.lock().unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let m = messages.clone();
    livebpf::runtime::printk::set_printk_sink(Some(Arc::new(move |s: &str| {
        m.lock().unwrap().push(s.to_string())
    })));
    for engine in ENGINES {
        let Some(loaded) = load("globals") else {
            break;
        };
        let prog = loaded.program("xdp_globals").unwrap();
        // threshold (42) > banner[0] ('l' = 108) is false: XDP_DROP.
        assert_eq!(prog.run_xdp(engine, &[0; 14]).unwrap().retval, 1);
        assert_eq!(prog.run_xdp(engine, &[0; 14]).unwrap().retval, 1);
        // .data: packets started at 7; .bss: counters[ingress_ifindex = 1] counts runs.
        assert_eq!(u64_value(&loaded, ".data", 0), Some(9), "{engine:?}");
        let bss = loaded
            .map(".bss")
            .unwrap()
            .lookup(&[0; 4])
            .unwrap()
            .unwrap();
        assert_eq!(&bss[4..8], &2u32.to_le_bytes(), "{engine:?}");
    }
    livebpf::runtime::printk::set_printk_sink(None);
    let got = messages.lock().unwrap().clone();
    if got.is_empty() {
        return; // no clang
    }
    let expected: Vec<String> = [8, 9]
        .iter()
        .flat_map(|n| [format!("threshold 42 packets {n}"), "literal\n".to_string()])
        .collect();
    let both: Vec<String> = expected.iter().chain(&expected).cloned().collect();
    assert_eq!(got, both);
}

#[test]
fn xdp_helpers_move_the_packet_edges_as_the_kernel_does() {
    for engine in ENGINES {
        let Some(loaded) = load("run/xdp_edges") else {
            return;
        };
        let packet: Vec<u8> = (0..20).collect();
        let out = loaded
            .program("xdp_edges")
            .unwrap()
            .run_xdp(engine, &packet)
            .unwrap();
        assert_eq!(out.retval, 3, "{engine:?}: XDP_TX");
        let mut expected = vec![0xde, 0xad, 0xbe, 0xef];
        expected.extend(0..18);
        assert_eq!(out.packet, expected, "{engine:?}");
        let einval = -(libc::EINVAL as i64) as u64;
        for (key, value) in [(0, 0), (1, 0), (2, einval), (3, einval), (4, 22)] {
            assert_eq!(
                u64_value(&loaded, "results", key),
                Some(value),
                "{engine:?} key {key}"
            );
        }
    }
}

#[test]
fn what_livebpf_cannot_run_is_refused_by_name_and_the_rest_loads() {
    let Some(loaded) = load("run/refusals") else {
        return;
    };
    assert_eq!(
        loaded
            .program("fine")
            .unwrap()
            .run_xdp(Engine::Interpreter, &[0; 14])
            .unwrap()
            .retval,
        2
    );
    let refusal = |name: &str| match loaded.program(name) {
        Err(RuntimeError::Refused { reason, .. }) => reason,
        Ok(_) => panic!("{name} loaded"),
        Err(e) => panic!("{name}: {e}"),
    };
    let r = refusal("unknown_helper");
    assert!(
        r.contains("bpf_get_current_comm (16)") && r.contains("xdp"),
        "{r}"
    );
    let r = refusal("other_callback");
    assert!(
        r.contains("for_each_map_elem") && r.contains("bpf_loop only"),
        "{r}"
    );
    let r = refusal("skb_reader");
    assert!(r.contains("__sk_buff"), "{r}");
    assert!(matches!(
        loaded.program("nope"),
        Err(RuntimeError::NoSuchProgram { .. })
    ));
}

#[test]
fn packets_outside_the_kernels_limits_are_refused() {
    let Some(loaded) = load("run/refusals") else {
        return;
    };
    let prog = loaded.program("fine").unwrap();
    for len in [0, 13, 3521] {
        assert!(
            matches!(
                prog.run_xdp(Engine::Interpreter, &vec![0; len]),
                Err(RuntimeError::Packet(_))
            ),
            "{len}"
        );
    }
    assert!(prog.run_xdp(Engine::Interpreter, &vec![0; 3520]).is_ok());
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn a_tracer_sees_its_cookie_and_the_traced_programs_address() {
    let Some(loaded) = load("run/tracer_info") else {
        return;
    };
    let target = loaded.program("target").unwrap().jit().unwrap();
    let tracer = loaded.program("record").unwrap().jit().unwrap();
    let link = livebpf::attach(livebpf::AttachKind::Fentry, &target, &tracer, 0xc0ffee).unwrap();
    let prog = loaded.program("target").unwrap();
    for _ in 0..3 {
        assert_eq!(prog.run_xdp(Engine::Jit, &[0; 14]).unwrap().retval, 2);
    }
    link.detach().unwrap();
    assert_eq!(prog.run_xdp(Engine::Jit, &[0; 14]).unwrap().retval, 2);
    let bss = loaded
        .map(".bss")
        .unwrap()
        .lookup(&[0; 4])
        .unwrap()
        .unwrap();
    let word = |i: usize| u64::from_le_bytes(bss[8 * i..8 * i + 8].try_into().unwrap());
    assert_eq!(word(0), 0xc0ffee, "bpf_get_attach_cookie");
    assert_eq!(word(1), target.jit().entry() as u64, "bpf_get_func_ip");
    assert_eq!(word(2), 3, "the tracer ran while attached only");
}

#[test]
fn tail_calls_through_static_program_arrays_on_every_engine() {
    for engine in ENGINES {
        let Some(loaded) = load("run/tail_direct") else {
            return;
        };
        let run = |name: &str, first: u8| {
            let mut packet = [0u8; 14];
            packet[0] = first;
            loaded
                .program(name)
                .unwrap()
                .run_xdp(engine, &packet)
                .unwrap()
                .retval
        };
        assert_eq!(run("constant", 0), 3, "{engine:?}: slot 1 is to_tx");
        assert_eq!(run("computed", 1), 3, "{engine:?}");
        assert_eq!(run("computed", 2), 2, "{engine:?}: slot 2 is to_pass");
        assert_eq!(
            run("computed", 3),
            0,
            "{engine:?}: an empty slot falls through"
        );
        // Emptying the slot turns the direct jump back into a fall-through.
        loaded.map("slots").unwrap().prog_array_clear(1).unwrap();
        assert_eq!(run("constant", 0), 0, "{engine:?}");
    }
    // x86-64: the constant tail call is a direct jump site in the JIT code.
    if let Some(loaded) = load("run/tail_direct") {
        let sites = |name: &str| {
            let prog = loaded.program(name).unwrap().jit().unwrap();
            prog.jit().direct_tail_call_sites().len()
        };
        let direct = cfg!(target_arch = "x86_64") as usize;
        assert_eq!(sites("constant"), direct);
        assert_eq!(sites("computed"), 0);
    }
}
