//! Liveness of the relay's loops, for `/readyz` and the systemd watchdog.
//!
//! Each loop stamps its heartbeat every time round (the poller at least every
//! `SCAN_INTERVAL`, the deliverer at least every second), so a heartbeat
//! older than [`STALE_AFTER`] means the loop is stuck. Heartbeats are on the
//! monotonic clock: a wall-clock jump (NTP, a suspended VM) can neither make
//! a live loop look stuck nor a stuck one look alive. A loop that turns but
//! whose every store call fails, or a dead database writer thread, is no
//! better than a stuck loop: [`problems`] adds what the store knows of
//! itself. The watchdog pings systemd only while there is no problem: a
//! wedged relay is restarted instead of looking alive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::OperatorStore;

/// A loop that has not stamped its heartbeat for this long is stuck, and so
/// is one whose every store call has failed for this long.
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// The loops' heartbeats, as milliseconds on the monotonic clock since the
/// `Health` was created. Created by `app`, shared with the loops, the admin
/// API and the watchdog.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    poller: AtomicU64,
    deliverer: AtomicU64,
}

impl Default for Health {
    fn default() -> Health {
        Health::starting_at(Instant::now())
    }
}

impl Health {
    /// Heartbeats as if both loops beat at `origin` (a scripted clock's start).
    pub fn starting_at(origin: Instant) -> Health {
        Health { origin, poller: AtomicU64::new(0), deliverer: AtomicU64::new(0) }
    }

    /// The poller went round its loop.
    pub fn poller_beat(&self) {
        self.poller_beat_at(Instant::now());
    }

    /// The deliverer went round its loop.
    pub fn deliverer_beat(&self) {
        self.deliverer_beat_at(Instant::now());
    }

    /// The poller went round its loop at `at`.
    pub fn poller_beat_at(&self, at: Instant) {
        self.poller.store(self.since_origin(at), Ordering::Relaxed);
    }

    /// The deliverer went round its loop at `at`.
    pub fn deliverer_beat_at(&self, at: Instant) {
        self.deliverer.store(self.since_origin(at), Ordering::Relaxed);
    }

    /// The loops whose heartbeat is stale now, with their age.
    pub fn stale(&self) -> Vec<String> {
        self.stale_at(Instant::now())
    }

    /// The loops whose heartbeat is stale at `now`, with their age.
    pub fn stale_at(&self, now: Instant) -> Vec<String> {
        let beats =
            [("poller", self.poller.load(Ordering::Relaxed)), ("deliverer", self.deliverer.load(Ordering::Relaxed))];
        stale_loops(self.since_origin(now), &beats, STALE_AFTER)
    }

    fn since_origin(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }
}

/// Everything that makes the relay not live at `now`: stale loops, and
/// the store's own problems (a dead writer thread, every write or every
/// store call failing for longer than [`STALE_AFTER`]).
pub fn problems(health: &Health, store: &dyn OperatorStore, now: Instant) -> Vec<String> {
    let mut out = health.stale_at(now);
    out.extend(store.problems_at(now, STALE_AFTER));
    out
}

/// Pure: which of `beats` (name, last beat in monotonic ms) are older than
/// `max_age` at `now_ms` (on the same clock).
pub fn stale_loops(now_ms: u64, beats: &[(&str, u64)], max_age: Duration) -> Vec<String> {
    beats
        .iter()
        .filter(|(_, at)| now_ms.saturating_sub(*at) > max_age.as_millis() as u64)
        .map(|(name, at)| format!("the {name} loop made no progress for {}s", (now_ms - at) / 1000))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_only_past_the_limit() {
        let beats = [("poller", 10_000), ("deliverer", 29_000)];
        assert!(stale_loops(25_000, &beats, STALE_AFTER).is_empty());
        assert_eq!(stale_loops(26_000, &beats, STALE_AFTER), ["the poller loop made no progress for 16s"]);
        // A beat "from the future" (never on one monotonic clock, but cheap
        // to make harmless) is fresh, not an overflow.
        assert!(stale_loops(1_000, &[("poller", 5_000)], STALE_AFTER).is_empty());
    }

    /// Heartbeats follow a scripted monotonic clock, and nothing else: the
    /// wall clock is never read, so jumping it cannot change the answer.
    #[test]
    fn heartbeats_follow_the_monotonic_clock() {
        let t0 = Instant::now();
        let health = Health::starting_at(t0);
        assert!(health.stale_at(t0 + Duration::from_secs(15)).is_empty());
        health.deliverer_beat_at(t0 + Duration::from_secs(10));
        assert_eq!(health.stale_at(t0 + Duration::from_secs(16)), ["the poller loop made no progress for 16s"]);
        health.poller_beat_at(t0 + Duration::from_secs(16));
        assert!(health.stale_at(t0 + Duration::from_secs(25)).is_empty());
        assert_eq!(
            health.stale_at(t0 + Duration::from_secs(32)),
            ["the poller loop made no progress for 16s", "the deliverer loop made no progress for 22s"]
        );
    }
}
