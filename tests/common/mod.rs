//! Code shared by the JIT test binaries (`mod common;` in each).
// Each test binary that declares this module uses only part of it.
#![allow(dead_code)]

pub mod context;
pub mod engines;
pub mod limits;
pub mod progen;
pub mod tail;
