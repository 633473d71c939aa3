//! Code shared by the JIT test binaries (`mod common;` in each).
// Each test binary that declares this module uses only part of it.
#![allow(dead_code)]

pub mod limits;
pub mod progen;
