//! Executable memory: code arena, program registry and text_poke.
