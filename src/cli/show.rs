//! `livebpf show`: what an ELF object compiled with `clang -O2 -g -target bpf` holds, as the
//! loader ([`crate::loader`]) describes it, without creating maps or running anything.
//!
//! The output is stable, one item per line, fields separated by single spaces, in the loader's
//! order (programs by section order and position, then maps: `.maps`, `maps`, global data):
//!
//! ```text
//! program NAME section=SECTION type=TYPE [target=FUNCTION] insns=SLOTS maps=MAP_REFS helpers=IDS
//! map NAME type=TYPE key_size=BYTES value_size=BYTES max_entries=N flags=0xFLAGS
//! note TEXT
//! ```
//!
//! `type` is `xdp`, `socket_filter`, `sched_cls`, `fentry`, `fexit`, `fmod_ret`, `freplace` or
//! `raw` for programs (the tracing types add `target=`), and `hash`, `array`, `prog_array`,
//! `percpu_hash`, `percpu_array`, `lru_hash` or `ringbuf` for maps. `insns` counts the linked
//! program's 8-byte slots, subprograms included; `maps` its map references; `helpers` the helper
//! ids it calls, comma-separated, or `-`. A `note` line is something accepted but not acted on.

use std::io::Write;
use std::path::Path;

use super::{CliError, read, stdout_err};
use crate::loader::{Object, ProgramSpec};

fn program_line(p: &ProgramSpec) -> String {
    let target = p
        .prog_type
        .target()
        .map(|t| format!(" target={t}"))
        .unwrap_or_default();
    let helpers = if p.helpers_used.is_empty() {
        "-".to_string()
    } else {
        let ids: Vec<String> = p.helpers_used.iter().map(u32::to_string).collect();
        ids.join(",")
    };
    format!(
        "program {} section={} type={}{target} insns={} maps={} helpers={helpers}",
        p.name,
        p.section,
        p.prog_type.name(),
        p.insns.len(),
        p.map_refs.len(),
    )
}

/// Prints the programs, maps and notes of the object at `path`.
pub fn show(path: &Path, out: &mut dyn Write) -> Result<(), CliError> {
    let obj = Object::parse(&read(path)?).map_err(|source| CliError::Load {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    for p in &obj.programs {
        writeln!(out, "{}", program_line(p)).map_err(stdout_err)?;
    }
    for m in &obj.maps {
        writeln!(
            out,
            "map {} type={} key_size={} value_size={} max_entries={} flags={:#x}",
            m.name, m.kind, m.key_size, m.value_size, m.max_entries, m.flags
        )
        .map_err(stdout_err)?;
    }
    for note in &obj.notes {
        writeln!(out, "note {note}").map_err(stdout_err)?;
    }
    Ok(())
}
