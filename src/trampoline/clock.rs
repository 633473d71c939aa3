//! The clock of run statistics. A run with statistics on reads it twice, so it must cost a few
//! ns, not a `clock_gettime`: where the hardware has a constant-rate counter that user code may
//! read — the invariant TSC on x86-64, the generic timer's `cntvct_el0` on arm64 — runs add up
//! raw ticks and only [`ticks_to_ns`] (when statistics are read) converts them, at a rate
//! measured once ([`calibrate`]). Elsewhere ticks are nanoseconds from [`Instant`].

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the ticks are: a hardware counter with its rate, or nanoseconds.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// A constant-rate counter: this many nanoseconds per tick.
    Counter { ns_per_tick: f64 },
    /// Nanoseconds since [`epoch`].
    Instant,
}

static SOURCE: OnceLock<Source> = OnceLock::new();

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether this CPU's counter can be trusted to tick at one rate on every core.
#[cfg(target_arch = "x86_64")]
fn counter_usable() -> bool {
    use std::arch::x86_64::__cpuid;
    // CPUID leaf 0x8000_0007, EDX bit 8: invariant TSC (constant rate in every P-, C- and
    // T-state, synchronised across cores by the OS).
    let max = __cpuid(0x8000_0000).eax;
    max >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

/// The generic timer's virtual count is architecturally constant-rate and readable at EL0
/// under Linux.
#[cfg(target_arch = "aarch64")]
fn counter_usable() -> bool {
    true
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn counter_usable() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn counter() -> u64 {
    // SAFETY: RDTSC is unprivileged on Linux (CR4.TSD clear) and has no other effect.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn counter() -> u64 {
    let v: u64;
    // SAFETY: Linux lets EL0 read CNTVCT_EL0 (CNTKCTL_EL1.EL0VCTEN); the read has no effect.
    unsafe { std::arch::asm!("mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
    v
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn counter() -> u64 {
    0
}

/// Measures the counter's rate against [`Instant`] over a few milliseconds, the best of three
/// tries (a preemption between the two reads of one pair only makes that try worse).
fn measure() -> Source {
    if !counter_usable() {
        return Source::Instant;
    }
    #[cfg(target_arch = "aarch64")]
    {
        let freq: u64;
        // SAFETY: CNTFRQ_EL0 is readable at EL0; firmware sets it to the counter's rate.
        unsafe { std::arch::asm!("mrs {}, cntfrq_el0", out(reg) freq, options(nomem, nostack)) };
        if freq != 0 {
            return Source::Counter {
                ns_per_tick: 1e9 / freq as f64,
            };
        }
    }
    let mut best: Option<f64> = None;
    let mut shortest = f64::INFINITY;
    for _ in 0..3 {
        let (t0, c0) = (Instant::now(), counter());
        while t0.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let (c1, t1) = (counter(), Instant::now());
        let ticks = c1.wrapping_sub(c0);
        if ticks == 0 {
            return Source::Instant;
        }
        let ns = (t1 - t0).as_nanos() as f64;
        let rate = ns / ticks as f64;
        // A try preempted between its paired reads overshoots the 2 ms: keep the shortest.
        if ns < shortest {
            shortest = ns;
            best = Some(rate);
        }
    }
    best.map_or(Source::Instant, |ns_per_tick| Source::Counter {
        ns_per_tick,
    })
}

/// Measures the rate now, if not done yet: `set_stats_enabled(true)` calls it, so that the
/// first statistics read does not pay for it.
pub(crate) fn calibrate() {
    SOURCE.get_or_init(measure);
    epoch();
}

/// The current time in ticks (see the module docs).
#[inline]
pub(crate) fn ticks() -> u64 {
    match SOURCE.get() {
        Some(Source::Counter { .. }) => counter(),
        Some(Source::Instant) => epoch().elapsed().as_nanos() as u64,
        // Statistics were switched on by another thread an instant ago and this run saw the
        // flag before the calibration finished: count the run as taking no time, rather
        // than mixing units.
        None => 0,
    }
}

/// Ticks elapsed since `start` (a [`ticks`] value of 0 — see there — counts as none).
#[inline]
pub(crate) fn since(start: u64) -> u64 {
    if start == 0 {
        return 0;
    }
    ticks().saturating_sub(start)
}

/// Nanoseconds in `ticks` ticks.
pub(crate) fn ticks_to_ns(ticks: u64) -> u64 {
    match SOURCE.get() {
        Some(Source::Counter { ns_per_tick }) => (ticks as f64 * ns_per_tick) as u64,
        _ => ticks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_convert_to_wall_time() {
        calibrate();
        let (t0, c0) = (Instant::now(), ticks());
        std::thread::sleep(Duration::from_millis(30));
        let (c1, t1) = (ticks(), Instant::now());
        let wall = (t1 - t0).as_nanos() as f64;
        let measured = ticks_to_ns(c1 - c0) as f64;
        // Loose: the machine is shared and the sleep may be preempted either side.
        assert!(
            (measured / wall - 1.0).abs() < 0.2,
            "{measured} ns by ticks, {wall} ns by Instant ({:?})",
            SOURCE.get()
        );
    }
}
