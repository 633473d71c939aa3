//! What the forward analyses over a program's registers share (`reach`, `bounds`): the join
//! step, and which instructions access memory.

use super::{Insn, Reg, Size};

/// A memory access's size, base register and displacement (`None` for other instructions).
pub(super) fn memory_access(insn: &Insn) -> Option<(Size, Reg, i64)> {
    Some(match *insn {
        Insn::Load {
            size, base, off, ..
        }
        | Insn::Store {
            size, base, off, ..
        }
        | Insn::Atomic {
            size, base, off, ..
        }
        | Insn::LoadAcquire {
            size, base, off, ..
        }
        | Insn::StoreRelease {
            size, base, off, ..
        } => (size, base, off as i64),
        _ => return None,
    })
}

/// Joins `incoming` into the state before an instruction (`None`: not reached yet) and returns
/// whether the state changed, so that the caller queues the instruction again. `changes` counts
/// the changes; once `widen` holds and there were more than `widen_after`, every register
/// whose value still changes is replaced by what `widened` makes of it (the analysis' "anything"),
/// which bounds how often a loop goes round.
pub(super) fn merge<V: Copy + PartialEq>(
    state: &mut Option<[V; 11]>,
    incoming: [V; 11],
    changes: &mut u32,
    widen: bool,
    widen_after: u32,
    join: impl Fn(V, V) -> V,
    mut widened: impl FnMut(V) -> V,
) -> bool {
    let Some(old) = state else {
        *state = Some(incoming);
        return true;
    };
    let mut merged = *old;
    for (slot, v) in merged.iter_mut().zip(incoming) {
        *slot = join(*slot, v);
    }
    if merged == *old {
        return false;
    }
    *changes += 1;
    if widen && *changes > widen_after {
        for (slot, o) in merged.iter_mut().zip(old.iter()) {
            if slot != o {
                *slot = widened(*slot);
            }
        }
    }
    *old = merged;
    true
}
