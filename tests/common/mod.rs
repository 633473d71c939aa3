//! Code shared by test binaries (`mod common;` in each): the JIT tests' limits and program
//! generator, and the kernel oracle.
// Each test binary that declares this module uses only part of it.
#![allow(dead_code)]

pub mod context;
pub mod engines;
pub mod kernel;
pub mod limits;
pub mod progen;
pub mod tail;
