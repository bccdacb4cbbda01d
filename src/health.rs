//! Liveness of the relay's loops, for `/readyz` and the systemd watchdog.
//!
//! Each loop stamps its heartbeat every time round (the poller at least every
//! `SCAN_INTERVAL`, the deliverer at least every second), so a heartbeat
//! older than [`STALE_AFTER`] means the loop is stuck. The watchdog pings
//! systemd only while every heartbeat is fresh: a wedged relay is restarted
//! instead of looking alive.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::store::now_ms;

/// A loop that has not stamped its heartbeat for this long is stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// The loops' heartbeats (Unix ms of their last turn). Created by `app`,
/// shared with the loops, the admin API and the watchdog.
#[derive(Debug)]
pub struct Health {
    poller: AtomicI64,
    deliverer: AtomicI64,
}

impl Default for Health {
    fn default() -> Health {
        let now = now_ms();
        Health { poller: AtomicI64::new(now), deliverer: AtomicI64::new(now) }
    }
}

impl Health {
    /// The poller went round its loop.
    pub fn poller_beat(&self) {
        self.poller.store(now_ms(), Ordering::Relaxed);
    }

    /// The deliverer went round its loop.
    pub fn deliverer_beat(&self) {
        self.deliverer.store(now_ms(), Ordering::Relaxed);
    }

    /// The loops whose heartbeat is stale at `now_ms`, with their age.
    pub fn stale(&self, now_ms: i64) -> Vec<String> {
        stale_loops(
            now_ms,
            &[("poller", self.poller.load(Ordering::Relaxed)), ("deliverer", self.deliverer.load(Ordering::Relaxed))],
            STALE_AFTER,
        )
    }
}

/// Pure: which of `beats` (name, last beat in Unix ms) are older than `max_age`.
pub fn stale_loops(now_ms: i64, beats: &[(&str, i64)], max_age: Duration) -> Vec<String> {
    beats
        .iter()
        .filter(|(_, at)| now_ms - at > max_age.as_millis() as i64)
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
    }
}
