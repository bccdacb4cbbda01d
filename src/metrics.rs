//! Metrics: every counter the relay keeps is defined here, in one place.
//!
//! Counters are plain maps behind std `Mutex`es: each update is a map lookup
//! and an add, far cheaper than the HTTP request it counts, and a lock held
//! for nanoseconds never contends meaningfully. [`Metrics::render`] writes
//! the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// The relay's counters. One instance per running relay, shared by `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Polls by (org, outcome).
    polls: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Notifications stored, by type.
    notifications: Mutex<BTreeMap<String, u64>>,
    /// Delivery attempts by (webhook, outcome).
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Watches given up, by reason.
    watches_failed: Mutex<BTreeMap<&'static str, u64>>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
}

fn get<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: &K) -> u64 {
    map.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
}

impl Metrics {
    /// Counts one poll of an org's watch with its outcome label.
    pub fn poll(&self, org: &str, outcome: &'static str) {
        bump(&self.polls, (org.to_owned(), outcome));
    }

    /// Counts one stored notification.
    pub fn notification(&self, kind: &str) {
        bump(&self.notifications, kind.to_owned());
    }

    /// Counts one delivery attempt with its outcome label.
    pub fn delivery(&self, webhook: &str, outcome: &'static str) {
        bump(&self.deliveries, (webhook.to_owned(), outcome));
    }

    /// Counts one watch given up.
    pub fn watch_failed(&self, reason: &'static str) {
        bump(&self.watches_failed, reason);
    }

    /// Polls of `org` with `outcome` so far.
    pub fn polls(&self, org: &str, outcome: &'static str) -> u64 {
        get(&self.polls, &(org.to_owned(), outcome))
    }

    /// Delivery attempts to `webhook` with `outcome` so far.
    pub fn deliveries(&self, webhook: &str, outcome: &'static str) -> u64 {
        get(&self.deliveries, &(webhook.to_owned(), outcome))
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = writeln!(out, "# HELP dari_relay_polls_total Status requests to Dari, by org and outcome.");
        let _ = writeln!(out, "# TYPE dari_relay_polls_total counter");
        for ((org, outcome), n) in self.polls.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "dari_relay_polls_total{{org=\"{}\",outcome=\"{outcome}\"}} {n}", escape(org));
        }
        let _ = writeln!(out, "# HELP dari_relay_notifications_total Notifications stored, by type.");
        let _ = writeln!(out, "# TYPE dari_relay_notifications_total counter");
        for (kind, n) in self.notifications.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "dari_relay_notifications_total{{type=\"{}\"}} {n}", escape(kind));
        }
        let _ = writeln!(out, "# HELP dari_relay_delivery_attempts_total Delivery attempts, by webhook and outcome.");
        let _ = writeln!(out, "# TYPE dari_relay_delivery_attempts_total counter");
        for ((webhook, outcome), n) in self.deliveries.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "dari_relay_delivery_attempts_total{{webhook=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(webhook)
            );
        }
        let _ = writeln!(out, "# HELP dari_relay_watches_failed_total Watches given up, by reason.");
        let _ = writeln!(out, "# TYPE dari_relay_watches_failed_total counter");
        for (reason, n) in self.watches_failed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "dari_relay_watches_failed_total{{reason=\"{reason}\"}} {n}");
        }
        out
    }
}
