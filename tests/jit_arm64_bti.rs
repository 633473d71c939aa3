//! BTI enforcement on JIT code: entering a program anywhere but its landing pad faults (SIGILL),
//! while its entry, the PLT's far targets with a landing pad and the dummy trampoline are valid.
//! Faults happen in a child process: this test binary re-executed with `--exact` on
//! [`bti_child`] and the scenario in [`CHILD_ENV`] (through `LIVEBPF_TEST_RUNNER`, or qemu-user
//! when the binary is foreign to this machine). Skipped when the CPU has no BTI.
#![cfg(target_arch = "aarch64")]

use std::ffi::c_void;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::arm64::{enc, host_features};
use livebpf::jit::{JitFn, JitOptions, JitProgram, JitStack, RunContext};
use livebpf::text::poke::{PokeInsn, text_poke};
use livebpf::text::{ArenaOptions, CodeArena, sync_icache};
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags, mmap_anonymous, mprotect};

/// Names the scenario a child process runs.
const CHILD_ENV: &str = "LIVEBPF_BTI_CHILD";
const PROT_BTI: u32 = 0x10;

/// Runs this binary's `bti_child` test alone with `scenario`.
fn run_child(scenario: &str) -> Output {
    let exe = std::env::current_exe().expect("own path");
    let args = ["bti_child", "--exact", "--nocapture", "--test-threads=1"];
    let runner = std::env::var("LIVEBPF_TEST_RUNNER").unwrap_or_default();
    let mut words: Vec<String> = runner.split_whitespace().map(String::from).collect();
    let spawn = |words: &[String]| {
        let mut cmd = match words.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args).env(CHILD_ENV, scenario).output()
    };
    let foreign = |r: &std::io::Result<Output>| match r {
        Err(e) => e.raw_os_error() == Some(libc::ENOEXEC),
        // glibc's posix_spawn under qemu-user reports a failed exec as exit status 127.
        Ok(out) => out.status.code() == Some(127) && out.stdout.is_empty(),
    };
    let first = spawn(&words);
    if words.is_empty() && foreign(&first) {
        // An arm64 binary cross-run under qemu-user cannot exec itself: go through qemu too.
        words = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
            .map(String::from)
            .to_vec();
        return spawn(&words).expect("qemu-aarch64 runs the test binary");
    }
    first.unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_sigill(scenario: &str) {
    let out = run_child(scenario);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGILL),
        "{scenario}: expected death by SIGILL\n{}",
        describe(&out)
    );
}

fn assert_runs(scenario: &str) {
    let out = run_child(scenario);
    assert!(
        out.status.success(),
        "{scenario}: expected success\n{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("scenario {scenario} ran")),
        "{scenario}: the child did not run the scenario\n{}",
        describe(&out)
    );
}

fn bti_available() -> bool {
    if !host_features().bti {
        println!("note: this CPU has no BTI (HWCAP2_BTI); skipping");
        return false;
    }
    true
}

#[test]
fn entering_a_program_past_its_landing_pad_faults() {
    if !bti_available() {
        return;
    }
    assert_runs("entry");
    assert_sigill("past-pad");
    // Control: the same entry without PROT_BTI runs, so the fault above is BTI's.
    assert_runs("past-pad-unguarded");
}

#[test]
fn plt_targets_and_the_dummy_trampoline_are_valid_landing_pads() {
    if !bti_available() {
        return;
    }
    assert_runs("far-with-pad");
    assert_runs("dummy-via-plt");
    assert_sigill("far-without-pad");
}

/// Calls `addr` as a program entry with a fresh context; returns r0.
fn call_at(addr: usize) -> u64 {
    let helpers = Helpers::new();
    let mut stack = JitStack::new();
    let mut ctx = RunContext::new(&mut [], &mut stack, &[], &helpers, None);
    // SAFETY: `addr` is inside the caller's live program image: its entry, or the instruction
    // after the landing pad, from which the code still runs to its end (or BTI stops it).
    unsafe {
        let f: JitFn = std::mem::transmute::<usize, JitFn>(addr);
        f(0, 0, 0, 0, 0, &mut ctx)
    }
}

/// Maps `words` RX with `PROT_BTI` on a page more than 128 MiB from the arena; never unmapped
/// (the child exits right after).
fn far_code(arena: &CodeArena, words: &[u32]) -> usize {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = 64 << 10;
    for hint in [
        arena.rx_range().end + (512 << 20),
        arena.rx_range().end + (3 << 30),
    ] {
        // SAFETY: a fresh private mapping where nothing is mapped (FIXED_NOREPLACE).
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
        // SAFETY: our own fresh mapping, large enough.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast(), bytes.len()) };
        let prot = ProtFlags::READ | ProtFlags::EXEC | ProtFlags::from_bits_retain(PROT_BTI);
        // SAFETY: our own mapping; nothing runs it yet.
        unsafe { mprotect(p, len, MprotectFlags::from_bits_retain(prot.bits())) }.unwrap();
        // SAFETY: mapped readable.
        unsafe { sync_icache(p as usize, bytes.len()) };
        return p as usize;
    }
    panic!("no free address space far from the arena");
}

/// The scenarios, run in a child process; a no-op in the parent.
#[test]
fn bti_child() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    // SAFETY: plain setrlimit call: no core file for the expected crashes.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
    let guarded = scenario != "past-pad-unguarded";
    let arena = CodeArena::init_global(ArenaOptions {
        bti: guarded,
        ..ArenaOptions::default()
    })
    .unwrap();
    let p = assemble_program("mov r0, 42\nexit").unwrap();
    let prog = JitProgram::compile(&p, &Helpers::new(), JitOptions::checked()).unwrap();
    let entry = prog.entry();
    let result = match scenario.as_str() {
        "entry" => call_at(entry),
        // Skip the `bti jc`: `mov x9, x30` is not a landing pad.
        "past-pad" | "past-pad-unguarded" => call_at(entry + 4),
        "far-with-pad" | "far-without-pad" => {
            // A trampoline-convention stub: return after the site with x30 = x9.
            let mut words = vec![
                enc::mov_reg(true, enc::X10, enc::LR),
                enc::mov_reg(true, enc::LR, enc::X9),
                enc::ret(enc::X10),
            ];
            if scenario == "far-with-pad" {
                words.insert(0, enc::BTI_JC);
            }
            let far = far_code(arena, &words);
            // SAFETY: `far` is complete code that returns into the body as the nop would, and
            // stays mapped for the rest of this child process.
            unsafe { text_poke(prog.patch_site().ip(), PokeInsn::Nop, PokeInsn::Call(far)) }
                .unwrap();
            prog.run(&mut []).unwrap()
        }
        "dummy-via-plt" => {
            // `bl plt` with the literal still at the dummy trampoline (`bti j`).
            let code = prog.code();
            let (site, plt) = (entry + prog.patch_site_offset(), entry + code.len() - 16);
            let rw = arena.rw_alias(site).unwrap();
            // SAFETY: a 4-aligned word of this process's only image, run by no other thread.
            unsafe {
                rw.cast::<u32>()
                    .write_volatile(enc::bl(plt as i64 - site as i64).unwrap())
            };
            arena.sync_text(site, 4).unwrap();
            prog.run(&mut []).unwrap()
        }
        other => panic!("unknown scenario {other}"),
    };
    assert_eq!(result, 42);
    println!("scenario {scenario} ran");
}
