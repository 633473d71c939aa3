//! The order and data of tracer runs, for random link sets on both kinds of target: a native
//! function (`attach_native`, a C function compiled here) and a JIT-compiled program (`attach`).
//! Each call must run exactly the programs Linux would, in its order — every fentry, then
//! fmod_ret until one returns non-zero (the result; the target does not run), then every fexit
//! with the result — while links come and go.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

#[path = "common/native.rs"]
mod native_lib;

use native_lib::call2;

use std::sync::Mutex;

use livebpf::asm::assemble_program;
use livebpf::helpers::Helpers;
use livebpf::jit::JitOptions;
use livebpf::native::NativeSite;
use livebpf::trampoline::{AttachKind, Link, Prog, attach, attach_native};

/// The event log is global: one case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn load(src: &str, helpers: &Helpers) -> Prog {
    Prog::load(
        &assemble_program(src).unwrap(),
        helpers,
        JitOptions::checked(),
    )
    .unwrap()
}

fn native_target() -> Option<usize> {
    static LIB: std::sync::OnceLock<Option<native_lib::Lib>> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        native_lib::build(
            "trampoline_order",
            "long to_target(long a, long b) { return a * 3 + b; }\n",
            native_lib::CC,
        )
    })
    .as_ref()
    .map(|l| l.sym("to_target"))
}

/// What the tracers of the property test record, in order: fentry, fmod_ret and fexit runs by
/// link (the cookie's low half), fexit with the return value it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Entry(u32),
    ModRet(u32),
    Exit(u32, u64),
}

static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());

extern "C" fn on_entry_event(cookie: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    EVENTS.lock().unwrap().push(Event::Entry(cookie as u32));
    0
}

extern "C" fn on_modret_event(cookie: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    EVENTS.lock().unwrap().push(Event::ModRet(cookie as u32));
    0
}

extern "C" fn on_exit_event(cookie: u64, ret: u64, _: u64, _: u64, _: u64) -> u64 {
    EVENTS.lock().unwrap().push(Event::Exit(cookie as u32, ret));
    0
}

/// One link of a generated set: its kind and, for fmod_ret, the value it returns (0: let the
/// function run).
#[derive(Clone, Copy, Debug)]
struct Spec {
    kind: AttachKind,
    veto: u32,
}

fn spec() -> impl proptest::strategy::Strategy<Value = Spec> {
    use proptest::prelude::*;
    (0..3u8, prop_oneof![Just(0u32), 1..1000u32]).prop_map(|(k, veto)| Spec {
        kind: [AttachKind::Fentry, AttachKind::Fexit, AttachKind::FmodRet][k as usize],
        veto,
    })
}

/// What one call must record and return with `links` attached (in attach order; `None` for a
/// detached one), as Linux orders them: every fentry, then fmod_ret until one returns non-zero
/// (its value is the result, the function does not run), then every fexit with the result.
fn expected(links: &[(u32, Spec)], a: i64, b: i64) -> (i64, Vec<Event>) {
    let mut events: Vec<Event> = links
        .iter()
        .filter(|(_, s)| s.kind == AttachKind::Fentry)
        .map(|(id, _)| Event::Entry(*id))
        .collect();
    let mut result = a * 3 + b;
    for (id, s) in links.iter().filter(|(_, s)| s.kind == AttachKind::FmodRet) {
        events.push(Event::ModRet(*id));
        if s.veto != 0 {
            result = i64::from(s.veto);
            break;
        }
    }
    events.extend(
        links
            .iter()
            .filter(|(_, s)| s.kind == AttachKind::Fexit)
            .map(|(id, _)| Event::Exit(*id, result as u64)),
    );
    (result, events)
}

/// The two kinds of target, computing `a * 3 + b`.
enum Target {
    Native(usize, NativeSite),
    Program(Prog),
}

impl Target {
    fn call(&self, a: i64, b: i64) -> i64 {
        match self {
            Target::Native(f, _) => call2(*f, a, b),
            Target::Program(p) => p.call([a as u64, b as u64, 0, 0, 0]).unwrap() as i64,
        }
    }

    fn attach(&self, kind: AttachKind, prog: &Prog, cookie: u64) -> Link {
        match self {
            // SAFETY: an integer function; the library stays loaded.
            Target::Native(_, site) => unsafe { attach_native(kind, site, prog, cookie) }.unwrap(),
            Target::Program(p) => attach(kind, p, prog, cookie).unwrap(),
        }
    }
}

fn targets() -> Vec<Target> {
    let program = load(
        "mov %r0, %r1\nmul %r0, 3\nadd %r0, %r2\nexit",
        &Helpers::new(),
    );
    let mut out = vec![Target::Program(program)];
    if let Some(f) = native_target() {
        out.push(Target::Native(f, NativeSite::at(f).unwrap()));
    }
    out
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
        if cfg!(target_arch = "x86_64") { 64 } else { 24 }
    ))]
    /// Random sets of fentry / fexit / fmod_ret links, attached in a random order and then
    /// partly detached: each call runs exactly the programs Linux would, in its order, with the
    /// arguments and the result they should see.
    #[test]
    fn random_link_sets_run_in_linux_order(
        specs in proptest::collection::vec(spec(), 1..12),
        detach_mask in 0u32..4096,
        a in -1000i64..1000,
        b in -1000i64..1000,
    ) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for target in targets() {
            check(&target, &specs, detach_mask, a, b)?;
        }
    }
}

fn check(
    target: &Target,
    specs: &[Spec],
    detach_mask: u32,
    a: i64,
    b: i64,
) -> Result<(), proptest::test_runner::TestCaseError> {
    {
        let mut helpers = Helpers::new();
        helpers.register(2000, on_entry_event);
        helpers.register(2001, on_modret_event);
        helpers.register(2002, on_exit_event);
        // r2 = the cookie: the link's id, and for fmod_ret its veto in the high half.
        let entry = load("mov %r1, %r2\ncall 2000\nmov %r0, 0\nexit", &helpers);
        let modret = load(
            "mov %r6, %r2\nmov %r1, %r2\ncall 2001\nmov %r0, %r6\nrsh %r0, 32\nexit",
            &helpers,
        );
        let exit = load(
            "ldxdw %r3, [%r1+40]\nmov %r1, %r2\nmov %r2, %r3\ncall 2002\nmov %r0, 0\nexit",
            &helpers,
        );
        let mut links = Vec::new();
        let mut model = Vec::new();
        for (id, s) in specs.iter().enumerate() {
            let prog = match s.kind {
                AttachKind::Fentry => &entry,
                AttachKind::FmodRet => &modret,
                _ => &exit,
            };
            let cookie = (u64::from(s.veto) << 32) | id as u64;
            links.push(Some(target.attach(s.kind, prog, cookie)));
            model.push((id as u32, *s));
        }
        for round in 0..2 {
            EVENTS.lock().unwrap().clear();
            let got = target.call(a, b);
            let (result, events) = expected(&model, a, b);
            proptest::prop_assert_eq!(got, result, "round {}", round);
            proptest::prop_assert_eq!(&*EVENTS.lock().unwrap(), &events, "round {}", round);
            // Detach the links the mask names, keeping the others in order.
            for (i, link) in links.iter_mut().enumerate() {
                if detach_mask & (1 << i) != 0
                    && let Some(l) = link.take()
                {
                    l.detach().unwrap();
                }
            }
            let kept: Vec<u32> = links
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_some())
                .map(|(i, _)| i as u32)
                .collect();
            model.retain(|(id, _)| kept.contains(id));
        }
        drop(links);
        if let Target::Native(_, site) = target {
            // SAFETY: the site's bytes, in the loaded object's text.
            let now = unsafe {
                std::slice::from_raw_parts(site.site() as *const u8, site.original().len())
            };
            proptest::prop_assert_eq!(now, site.original());
        }
    }
    Ok(())
}
