//! What the deterministic retirement races share (`tests/trampoline_race.rs`,
//! `tests/native_race.rs`): a retirement observer recording each image's states, and a check that
//! an image stays waiting in retirement.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use livebpf::reclaim::{self, RetireState};
use livebpf::trampoline::live_images;

static TRANSITIONS: Mutex<Vec<(usize, RetireState)>> = Mutex::new(Vec::new());

/// The observer to install with `reclaim::set_observer`.
pub fn observe(image: usize, state: RetireState) {
    TRANSITIONS.lock().unwrap().push((image, state));
}

/// The states `image` went through so far.
pub fn states_of(image: usize) -> Vec<RetireState> {
    TRANSITIONS
        .lock()
        .unwrap()
        .iter()
        .filter(|(i, _)| *i == image)
        .map(|(_, s)| *s)
        .collect()
}

/// Forgets what was observed (an image's address may be reused by the next scenario).
pub fn clear() {
    TRANSITIONS.lock().unwrap().clear();
}

/// Waits until `image` has reached `state`, failing with `why` after 20 s.
pub fn wait_for_state(image: usize, state: RetireState, why: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while states_of(image).last() != Some(&state) {
        assert!(Instant::now() < until, "{why}: {:?}", states_of(image));
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks for a while that `image` is still waiting in retirement, never freed, in `state`. A
/// safety check over a window: it can only miss a bug, never report one that is not there.
pub fn assert_stays_retired(image: usize, live: usize, state: RetireState) {
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert_eq!(live_images(), live, "image {image:#x} was freed early");
        assert!(reclaim::pending() >= 1);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        states_of(image).last(),
        Some(&state),
        "{:?}",
        states_of(image)
    );
}
