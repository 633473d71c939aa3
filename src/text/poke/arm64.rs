//! arm64 `text_poke`: one aligned 32-bit store of `nop` / `b` / `bl`, with the program's PLT for
//! targets out of branch range (the argument is in the parent module's docs).
//!
//! # Where the poker finds a program's PLT
//!
//! The arm64 JIT registers every program image twice: in the [`Registry`] as
//! [`ImageKind::Program`] (so any address can be recognised as BPF text), and here, in a side
//! table keyed by the image's start, with the byte offsets of its patch site, its PLT branch
//! target and its PLT literal ([`ProgramSite`], via [`register_program_site`]). The layout
//! depends on the JIT's options (the `bti jc` landing pad moves the site), so the poker never
//! guesses it from the code. A program image without an entry here cannot be poked at its
//! entry ([`PokeError::NotASite`]); other registered text (trampolines) is poked at `ip` itself.
//!
//! # Comparing with `old`
//!
//! The site's current instruction is what the site *does*: `b`/`bl` to the PLT counts as a branch
//! to the literal's target. So `old` must name the far target that the literal holds (the same
//! `bl plt` word with another literal is a [`PokeError::Mismatch`], and nothing is written),
//! and a site found doing `new` already is [`PokeOutcome::AlreadyApplied`].
//!
//! # The dummy trampoline
//!
//! Every PLT literal starts at, and is reset to, one shared image in the global arena created
//! on first use ([`dummy_trampoline`]): `bti j; mov x10, x30; mov x30, x9; ret x10`. Reached by
//! the site's `bl plt`, it returns to the instruction after the patch site with x30 restored
//! from x9 (which the prologue's `mov x9, x30` set to the caller's return address), so a thread
//! that sees the branch but a stale literal behaves as if the site were still a `nop`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};

use super::{PokeError, PokeInsn, PokeOutcome, TEXT_LOCK};
use crate::text::{CodeArena, ImageKind, Registry, TextError, sync_all_threads};

/// Offset of the patch site from a program's entry with the JIT's default options
/// (`bti jc; mov x9, x30; nop`). Without BTI it is 4; the exact offset of an image is in its
/// [`ProgramSite`] (and `JitProgram::patch_site_offset`).
pub const PATCH_SITE_OFFSET: usize = 8;
/// Length of the patch site: one instruction.
pub const PATCH_SITE_LEN: usize = 4;

/// `nop`.
pub const A64_NOP: u32 = 0xd503_201f;
const A64_B: u32 = 0x1400_0000;
const A64_BL: u32 = 0x9400_0000;
/// Reach of `b`/`bl`: ±128 MiB.
const BRANCH_RANGE: i64 = 128 << 20;

/// The dummy trampoline: `bti j; mov x10, x30; mov x30, x9; ret x10`.
pub const DUMMY_TRAMPOLINE: [u32; 4] = [0xd503_249f, 0xaa1e_03ea, 0xaa09_03fe, 0xd65f_0140];

/// The poker's view of a program image: byte offsets from the image's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProgramSite {
    /// The patch site (`nop` in the generated code).
    pub site: usize,
    /// The PLT's first instruction (`ldr x10, #8`): where a far `b`/`bl` at the site goes.
    pub plt: usize,
    /// The PLT's 8-byte literal (8-byte aligned in memory).
    pub literal: usize,
}

/// Image start → its layout.
static SITES: RwLock<BTreeMap<usize, ProgramSite>> = RwLock::new(BTreeMap::new());

/// Records the layout of the program image registered at `start`, so that [`text_poke`] on its
/// entry finds the patch site and PLT. Fails if the offsets do not fit inside the registered
/// image, the literal is not 8-byte aligned, or the site is not 4-byte aligned.
pub fn register_program_site(start: usize, site: ProgramSite) -> Result<(), PokeError> {
    let sym = Registry::global()
        .lookup(start)
        .filter(|s| s.offset == 0 && s.kind == ImageKind::Program)
        .ok_or(PokeError::NotText { ip: start })?;
    let aligned = (start + site.site).is_multiple_of(4)
        && (start + site.plt).is_multiple_of(4)
        && (start + site.literal).is_multiple_of(8);
    let inside = site.site + PATCH_SITE_LEN <= sym.len
        && site.plt + 8 <= sym.len
        && site.literal + 8 <= sym.len;
    if !aligned || !inside {
        return Err(PokeError::NotASite {
            ip: start + site.site,
            bytes: Vec::new(),
        });
    }
    SITES
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(start, site);
    Ok(())
}

/// Image start → whether its PLT literal last served a far call (`true`) or jump (`false`).
static LITERAL_KIND: Mutex<BTreeMap<usize, bool>> = Mutex::new(BTreeMap::new());

/// Declares that a grace period has passed since the program's site (at image `start`) last
/// branched to its PLT, so its literal may now serve a far target of the other kind.
///
/// # Safety
/// Every thread that could have executed the site's old branch to the PLT has since left the
/// code it was running (e.g. `reclaim::synchronize` returned after the site was poked away
/// from the PLT), so none can still load the literal.
pub unsafe fn plt_quiesced(start: usize) {
    let _guard = TEXT_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    LITERAL_KIND
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&start);
}

/// Forgets the layout of the image at `start` (before the image is unregistered and freed).
pub fn unregister_program_site(start: usize) -> Option<ProgramSite> {
    LITERAL_KIND
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&start);
    SITES
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&start)
}

fn program_site(start: usize) -> Option<ProgramSite> {
    SITES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&start)
        .copied()
}

/// The address of the shared dummy trampoline, created in the global arena on first use and
/// registered as a [`ImageKind::Trampoline`] image. It is never freed.
pub fn dummy_trampoline() -> Result<usize, TextError> {
    static DUMMY: OnceLock<Result<usize, TextError>> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(r) = DUMMY.get() {
        return r.clone();
    }
    // Serialise creation so that exactly one image is made.
    let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    DUMMY
        .get_or_init(|| {
            let arena = CodeArena::global()?;
            let bytes: Vec<u8> = DUMMY_TRAMPOLINE
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            let image = arena.alloc(bytes.len(), 16)?;
            let placed = arena.write(&image, 0, &bytes).and_then(|()| {
                // SAFETY: our own image in the global arena, never unregistered or freed.
                unsafe {
                    Registry::global().register(image.rx(), image.len(), ImageKind::Trampoline, 0)
                }
            });
            if let Err(e) = placed {
                // SAFETY: the image was never published.
                let _ = unsafe { arena.free(image) };
                return Err(e);
            }
            // Never freed: PLT literals may point at it at any time. (`Allocation` has no
            // destructor; dropping it just leaves the block allocated.)
            Ok(image.rx())
        })
        .clone()
}

/// Encodes `b`/`bl` at `ip` to `target`, if it is in range (`None` for far targets).
pub fn encode_branch(ip: usize, target: usize, link: bool) -> Option<u32> {
    let off = (target as i64).wrapping_sub(ip as i64);
    if off % 4 != 0 || !(-BRANCH_RANGE..BRANCH_RANGE).contains(&off) {
        return None;
    }
    let imm26 = ((off >> 2) as u32) & 0x03ff_ffff;
    Some(if link { A64_BL } else { A64_B } | imm26)
}

/// Encodes a site instruction at `ip` for a near target; [`PokeError::OutOfRange`] if the target
/// is beyond ±128 MiB (or not 4-byte aligned).
pub fn encode_a64(ip: usize, insn: PokeInsn) -> Result<u32, PokeError> {
    let (target, link) = match insn {
        PokeInsn::Nop => return Ok(A64_NOP),
        PokeInsn::Call(t) => (t, true),
        PokeInsn::Jump(t) => (t, false),
    };
    encode_branch(ip, target, link).ok_or(PokeError::OutOfRange { ip, target })
}

/// Decodes the site instruction `word` at `ip`, if it is `nop`, `b` or `bl`.
pub fn decode_a64(ip: usize, word: u32) -> Option<PokeInsn> {
    if word == A64_NOP {
        return Some(PokeInsn::Nop);
    }
    let link = match word & 0xfc00_0000 {
        A64_B => false,
        A64_BL => true,
        _ => return None,
    };
    let off = ((word << 6) as i32 >> 6) as i64 * 4;
    let target = (ip as i64).wrapping_add(off) as usize;
    Some(if link {
        PokeInsn::Call(target)
    } else {
        PokeInsn::Jump(target)
    })
}

/// A program's PLT, as absolute addresses.
#[derive(Clone, Copy, Debug)]
struct Plt {
    branch: usize,
    literal: usize,
}

/// The word to write for `insn` at `site`, and the far target that must be in the literal.
fn site_word(
    site: usize,
    insn: PokeInsn,
    plt: Option<Plt>,
) -> Result<(u32, Option<usize>), PokeError> {
    match encode_a64(site, insn) {
        Ok(word) => Ok((word, None)),
        Err(e @ PokeError::OutOfRange { target, .. }) => {
            let link = matches!(insn, PokeInsn::Call(_));
            match plt.and_then(|p| encode_branch(site, p.branch, link)) {
                Some(word) if target.is_multiple_of(4) => Ok((word, Some(target))),
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// What the site does now: a branch to the PLT means a branch to the literal's target.
fn effective(site: usize, word: u32, literal: Option<u64>, plt: Option<Plt>) -> Option<PokeInsn> {
    let insn = decode_a64(site, word)?;
    Some(match (insn, plt, literal) {
        (PokeInsn::Call(t), Some(p), Some(l)) if t == p.branch => PokeInsn::Call(l as usize),
        (PokeInsn::Jump(t), Some(p), Some(l)) if t == p.branch => PokeInsn::Jump(l as usize),
        _ => insn,
    })
}

/// An atomic view of the 4-byte word at the RW alias of `rx`.
fn word_at(arena: &CodeArena, rx: usize) -> Result<&'static AtomicU32, PokeError> {
    match (arena.rw_alias(rx), arena.rw_alias(rx + 3)) {
        // SAFETY: `rx` is 4-byte aligned (checked by the callers) inside mapped arena text, and
        // so is its alias (both views are MAX_PAGE_SIZE aligned); arena mappings are never
        // unmapped while the global arena lives, which is for the rest of the process.
        (Some(rw), Some(_)) => Ok(unsafe { AtomicU32::from_ptr(rw.cast()) }),
        _ => Err(PokeError::NotText { ip: rx }),
    }
}

/// An atomic view of the 8-byte PLT literal at the RW alias of `rx`.
fn literal_at(arena: &CodeArena, rx: usize) -> Result<&'static AtomicU64, PokeError> {
    match (arena.rw_alias(rx), arena.rw_alias(rx + 7)) {
        // SAFETY: as in `word_at`; `register_program_site` checked the 8-byte alignment.
        (Some(rw), Some(_)) => Ok(unsafe { AtomicU64::from_ptr(rw.cast()) }),
        _ => Err(PokeError::NotText { ip: rx }),
    }
}

/// Rewrites the patch site at `ip` from `old` to `new`. See the module docs for the contract.
///
/// A program's prologue site (`ip` = entry + the layout's site offset) sends far targets through the program's
/// PLT; any other `ip` inside registered text is poked as it is and needs near targets.
pub(super) fn text_poke(ip: usize, old: PokeInsn, new: PokeInsn) -> Result<PokeOutcome, PokeError> {
    let sym = Registry::global()
        .lookup(ip)
        .ok_or(PokeError::NotText { ip })?;
    let arena = CodeArena::global()?;
    // A program's prologue site has the program's PLT for far targets; other sites need
    // near ones.
    let layout = (sym.kind == ImageKind::Program)
        .then(|| program_site(sym.start))
        .flatten()
        .filter(|layout| layout.site == sym.offset);
    let site = ip;
    let plt = layout.map(|layout| Plt {
        branch: sym.start + layout.plt,
        literal: sym.start + layout.literal,
    });
    if !site.is_multiple_of(4) || site + PATCH_SITE_LEN > sym.start + sym.len {
        return Err(PokeError::NotText { ip });
    }
    // Encodable at all (range, alignment)? Checked before anything is read or written.
    site_word(site, old, plt)?;
    let (new_word, new_far) = site_word(site, new, plt)?;
    let word = word_at(arena, site)?;
    let literal = plt.map(|p| literal_at(arena, p.literal)).transpose()?;

    let _guard = TEXT_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // Relaxed loads: only pokers write these, and they are serialised by the lock.
    let current = word.load(Ordering::Relaxed);
    let current_literal = literal.map(|l| l.load(Ordering::Relaxed));
    // What the site does now: `bl plt` means a call to the literal's target.
    let found = effective(site, current, current_literal, plt);
    if found == Some(new) {
        return Ok(PokeOutcome::AlreadyApplied);
    }
    if found != Some(old) {
        return Err(match found {
            Some(found) => PokeError::Mismatch {
                ip: site,
                expected: old,
                found,
            },
            None => PokeError::NotASite {
                ip: site,
                bytes: current.to_le_bytes().to_vec(),
            },
        });
    }
    let old_word = current;
    // The literal is never reset when the site leaves a far target: a thread that executed the
    // old `b`/`bl plt` just before may load it at any time until a grace period passes, and
    // must then reach the old target (which the caller keeps alive for that long), not a
    // dummy that would skip a replacement. For the same reason a literal is only reused for a
    // target of the kind (call or jump) it last served: a stale `bl plt` entering a
    // replacement, or a stale `b plt` entering a trampoline, would return to the wrong place.
    // Changing the kind needs a grace period first, declared with `plt_quiesced`.
    let new_link = matches!(new, PokeInsn::Call(_));
    let image_start = sym.start;
    if new_far.is_some() {
        let mut kinds = LITERAL_KIND.lock().unwrap_or_else(PoisonError::into_inner);
        match kinds.get(&image_start) {
            Some(&link) if link != new_link => {
                return Err(PokeError::PltKindChange {
                    ip: site,
                    was_call: link,
                });
            }
            _ => {
                kinds.insert(image_start, new_link);
            }
        }
    }
    if let (Some(value), Some(lit)) = (new_far, literal) {
        lit.store(value as u64, Ordering::Release);
        // Every thread executes a full barrier before this returns, so any thread that later
        // fetches the new branch below also loads the new literal (stronger than Linux, which
        // relies on "a stale literal lands somewhere harmless").
        sync_all_threads()?;
    }
    if old_word == new_word {
        // Far → far: only the literal changed.
        return Ok(PokeOutcome::Applied);
    }
    // The new target may be code just written at a reused address that other cores fetched
    // before (a freed image's): `sync_text` of that code invalidated their I-caches, but only
    // a context synchronisation discards what their pipelines already hold. Make every thread
    // context-synchronise before any can branch there.
    if new != PokeInsn::Nop && new_far.is_none() {
        sync_all_threads()?;
    }
    // Arm ARM (DDI 0487, B2.2.5 "Concurrent modification and execution of instructions"): when
    // both the old and new instruction are B, BL, NOP (or BRK, ISB, SVC, HVC, SMC), another PE
    // executing the word concurrently executes either the old or the new one. One aligned
    // 32-bit store keeps the word single-copy atomic.
    word.store(new_word, Ordering::Release);
    // Clean to PoU and invalidate the I-cache line (broadcast), then make every thread
    // context-synchronise, so none keeps running the old word once this returns.
    arena.sync_text(site, PATCH_SITE_LEN)?;
    sync_all_threads()?;
    Ok(PokeOutcome::Applied)
}

/// Rewrites the native site word at `site` from `old` to `new` (each a `nop` or `b` word): one
/// aligned 32-bit store, which the Arm ARM allows under concurrently executing threads for
/// `NOP`↔`B`. Native text is a read-only file mapping, so the page is made writable (keeping it
/// executable: other threads go on running it) for the store and read-only again after; the
/// store lands in the process's private copy of the page. Then the line is cleaned and
/// invalidated and every thread context-synchronises.
///
/// # Safety
/// `site` is the 4-byte-aligned entry site of a native function whose object stays loaded, its
/// page mapped read + execute; every state written is valid code for threads executing it.
pub(crate) unsafe fn native_text_poke(
    site: usize,
    old: u32,
    new: u32,
) -> Result<PokeOutcome, PokeError> {
    let write_error = |reason: String| PokeError::NativeWrite { ip: site, reason };
    if !site.is_multiple_of(4) {
        return Err(PokeError::NotText { ip: site });
    }
    let _guard = TEXT_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let mut word = [0u8; 4];
    if !super::read_own_memory(site, &mut word) {
        return Err(PokeError::NotText { ip: site });
    }
    let current = u32::from_le_bytes(word);
    if current == new {
        return Ok(PokeOutcome::AlreadyApplied);
    }
    if current != old {
        return Err(PokeError::NotASite {
            ip: site,
            bytes: current.to_le_bytes().to_vec(),
        });
    }
    let page = crate::text::page_size();
    let start = site & !(page - 1);
    let protect = |prot: libc::c_int| {
        // SAFETY: `start` is the page of a mapped native function (the contract); only its
        // protection changes, never to one without PROT_EXEC.
        if unsafe { libc::mprotect(start as *mut libc::c_void, page, prot) } == 0 {
            Ok(())
        } else {
            Err(write_error(format!(
                "mprotect: {}",
                std::io::Error::last_os_error()
            )))
        }
    };
    protect(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC)?;
    // SAFETY: `site` is aligned and now writable; an aligned 32-bit store is single-copy atomic,
    // so a concurrent fetch sees the old or the new word (both valid, per the contract).
    unsafe { std::sync::atomic::AtomicU32::from_ptr(site as *mut u32) }
        .store(new, Ordering::Release);
    // SAFETY: the word is mapped readable.
    unsafe { crate::text::sync_icache(site, 4) };
    protect(libc::PROT_READ | libc::PROT_EXEC)?;
    crate::text::sync_all_threads()?;
    Ok(PokeOutcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_sites() {
        let ip = 0x1_0000_0000;
        assert_eq!(encode_a64(ip, PokeInsn::Nop).unwrap(), A64_NOP);
        // bl +0x1000: imm26 = 0x400.
        let bl = encode_a64(ip, PokeInsn::Call(ip + 0x1000)).unwrap();
        assert_eq!(bl, 0x9400_0400);
        assert_eq!(decode_a64(ip, bl), Some(PokeInsn::Call(ip + 0x1000)));
        // b -4: imm26 = all ones.
        let b = encode_a64(ip, PokeInsn::Jump(ip - 4)).unwrap();
        assert_eq!(b, 0x17ff_ffff);
        assert_eq!(decode_a64(ip, b), Some(PokeInsn::Jump(ip - 4)));
        // The last reachable addresses, and one beyond.
        let max = ip + (128 << 20) - 4;
        assert!(encode_a64(ip, PokeInsn::Call(max)).is_ok());
        assert!(encode_a64(ip, PokeInsn::Call(ip - (128 << 20))).is_ok());
        assert_eq!(
            encode_a64(ip, PokeInsn::Call(max + 4)),
            Err(PokeError::OutOfRange {
                ip,
                target: max + 4
            })
        );
        assert!(encode_a64(ip, PokeInsn::Jump(ip + 2)).is_err());
        assert_eq!(decode_a64(ip, 0xd65f_03c0), None);
    }
}
