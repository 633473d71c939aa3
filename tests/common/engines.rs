//! The engines a test runs one program on: the interpreter and JIT code in each mode a test
//! binary passes in, all through `run_env`.

use std::sync::Arc;

use livebpf::exec::{ExecError, RunEnv, TailCaller, TailTarget};
use livebpf::helpers::Helpers;
use livebpf::interp::Interpreter;
use livebpf::isa::Program;
use livebpf::jit::{JitOptions, JitProgram, JitStack};

/// One engine: the interpreter, or the JIT with these options.
#[derive(Clone, Debug)]
pub enum Engine {
    /// [`Interpreter::run_env`].
    Interp,
    /// [`JitProgram::run_env`] of code compiled with these options.
    Jit(JitOptions),
}

/// The interpreter, then a JIT engine per mode.
pub fn engines(modes: &[(String, JitOptions)]) -> Vec<(String, Engine)> {
    let mut v = vec![("interpreter".to_string(), Engine::Interp)];
    v.extend(modes.iter().map(|(n, o)| (n.clone(), Engine::Jit(*o))));
    v
}

/// A program loaded for one engine.
pub enum Loaded {
    /// The program and its helpers, for the interpreter.
    Interp(Program, Helpers),
    /// Compiled code.
    Jit(Arc<JitProgram>),
}

impl Engine {
    /// Loads `program` with `helpers` for this engine.
    pub fn load(&self, program: &Program, helpers: &Helpers) -> Loaded {
        match self {
            Engine::Interp => Loaded::Interp(program.clone(), helpers.clone()),
            Engine::Jit(o) => Loaded::Jit(Arc::new(
                JitProgram::compile(program, helpers, *o).expect("compiles"),
            )),
        }
    }

    /// Whether the engine checks memory accesses.
    pub fn is_checked(&self) -> bool {
        match self {
            Engine::Interp => true,
            Engine::Jit(o) => o.is_checked(),
        }
    }

    /// What a caller on this engine needs from tail-call targets.
    pub fn tail_caller(&self) -> TailCaller {
        match self {
            Engine::Interp => TailCaller::INTERPRETER,
            Engine::Jit(o) => TailCaller::jit(o.is_checked(), o.budget().is_some()),
        }
    }
}

impl Loaded {
    /// Runs in `env`.
    ///
    /// # Safety
    /// As for `run_env`: `env`'s regions and maps are valid for the run.
    pub unsafe fn run(&self, env: &RunEnv) -> Result<u64, ExecError> {
        match self {
            Loaded::Interp(p, h) => {
                let i = Interpreter::new(p).with_helpers(h.clone());
                // SAFETY: forwarded.
                unsafe { i.run_env(env) }
            }
            Loaded::Jit(j) => {
                let mut stack = Box::new(JitStack::new());
                // SAFETY: forwarded.
                unsafe { j.run_env(env, &mut stack) }
            }
        }
    }

    /// A program array target for a caller on this engine: JIT code (and its program) for a JIT
    /// engine, only the program for the interpreter.
    pub fn tail_target(&self) -> TailTarget {
        match self {
            Loaded::Interp(p, h) => TailTarget::interpreted(p, h),
            Loaded::Jit(j) => TailTarget::from_jit(j.clone()),
        }
    }

    /// The compiled code, if any.
    pub fn jit(&self) -> Option<&Arc<JitProgram>> {
        match self {
            Loaded::Interp(..) => None,
            Loaded::Jit(j) => Some(j),
        }
    }
}
