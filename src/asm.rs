//! Assembler and disassembler for the conformance suite's eBPF assembly dialect.
