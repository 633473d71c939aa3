//! A JIT run allocates nothing once its thread is warm, also when helpers grant more regions than
//! the context holds inline (the spill vector comes from a per-thread pool).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use livebpf::exec::{INLINE_GRANTS, RunEnv};
use livebpf::jit::{JitOptions, JitProgram, JitStack};
use livebpf::maps::{self, Map, MapSpec, MapType, RawMap};
use livebpf::{Helpers, Prog, assemble_program};

/// Counts this thread's allocations.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const-initialised thread-local
// without destructor, so touching it never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn a_warm_run_with_spilled_grants_allocates_nothing() {
    let lookups = 4 * INLINE_GRANTS as u64;
    let map = Map::create(&MapSpec::new("a", MapType::Array, 4, 8, lookups as u32)).unwrap();
    // Looks up keys 0..r1 and loads each value.
    let src = format!(
        "mov r7, r1
         mov r6, 0
         loop:
         stxw [r10-4], r6
         lddw r1, {m:#x}
         mov r2, r10
         add r2, -4
         call 1
         ldxdw r1, [r0+0]
         add r6, 1
         jlt r6, r7, loop
         mov r0, r6
         exit",
        m = map.as_raw() as u64
    );
    let program = assemble_program(&src).unwrap();
    let mut helpers = Helpers::new();
    maps::helpers::register(&mut helpers);
    let jit = JitProgram::compile(&program, &helpers, JitOptions::checked()).unwrap();
    let prog = Prog::load(&program, &helpers, JitOptions::checked()).unwrap();
    let known: [*const RawMap; 1] = [map.as_raw()];
    let env = RunEnv {
        args: [lookups, 0, 0, 0, 0],
        maps: &known,
        ..RunEnv::default()
    };
    let mut stack = Box::new(JitStack::new());
    for round in 0..3 {
        let before = allocs();
        // SAFETY: the environment holds only the live map.
        let (a, b) = unsafe { (jit.run_env(&env, &mut stack), prog.run_env(&env)) };
        assert_eq!((a, b), (Ok(lookups), Ok(lookups)));
        if round > 0 {
            assert_eq!(allocs() - before, 0, "round {round} allocated");
        }
    }
}
