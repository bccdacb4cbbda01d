//! Metrics: every counter the relay keeps is defined here, in one place.
//!
//! Counters are plain maps behind std `Mutex`es: each update is a map lookup
//! and an add, far cheaper than the HTTP request it counts, and a lock held
//! for nanoseconds never contends meaningfully. [`Metrics::render`] writes
//! the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Upper bounds (seconds) of the poll duration histogram.
const POLL_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) of the detection-to-2xx latency histogram.
const LATENCY_BUCKETS: [f64; 14] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0, 1800.0, 3600.0, 36000.0];

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, observations at or below its bound (not cumulative yet).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Values read from the store at scrape time, for the gauges.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Watches per state.
    pub watches: BTreeMap<String, i64>,
    /// Per webhook: (pending, failed, age in seconds of the oldest pending).
    pub backlog: BTreeMap<String, (i64, i64, Option<f64>)>,
}

/// The relay's counters. One instance per running relay, shared by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    /// Polls by org, then outcome: nested so that counting a poll looks the
    /// org up by `&str` and allocates nothing once the org is known.
    polls: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    /// Notifications stored, by type.
    notifications: Mutex<BTreeMap<String, u64>>,
    /// Delivery attempts by (webhook, outcome).
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Watches given up, by reason.
    watches_failed: Mutex<BTreeMap<&'static str, u64>>,
    /// Duration of status requests, answer to outcome.
    poll_duration: Mutex<Histogram>,
    /// From detecting a transition to a receiver's 2xx, per webhook.
    delivery_latency: Mutex<BTreeMap<String, Histogram>>,
    /// Faults of the delivery path that lose nothing but need an operator's
    /// eye, by (webhook, fault): `panicked` (an attempt's task panicked),
    /// `unrecorded` (an outcome the store refused, kept in memory),
    /// `unknown_webhook` (a delivery stored for a webhook no longer in the
    /// config).
    delivery_faults: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Requests to the inbound listener (Dari's webhook), by outcome.
    inbound: Mutex<BTreeMap<&'static str, u64>>,
    /// Per webhook, its adaptive concurrency limit as the deliverer last
    /// set it (a gauge the deliverer keeps, not read from the store).
    webhook_concurrency: Mutex<BTreeMap<String, u64>>,
    /// Several instances on PostgreSQL: live instances and watches owned at
    /// the last renewal, and watches taken over from dead instances so far.
    /// `None` until this instance joins a cluster (SQLite: never).
    cluster: Mutex<Option<ClusterGauges>>,
}

/// What [`Metrics::set_cluster`] keeps.
#[derive(Debug, Clone, Copy, Default)]
struct ClusterGauges {
    instances: i64,
    owned: i64,
    takeovers: u64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            polls: Mutex::default(),
            notifications: Mutex::default(),
            deliveries: Mutex::default(),
            watches_failed: Mutex::default(),
            poll_duration: Mutex::new(Histogram::new(&POLL_BUCKETS)),
            delivery_latency: Mutex::default(),
            delivery_faults: Mutex::default(),
            inbound: Mutex::default(),
            webhook_concurrency: Mutex::default(),
            cluster: Mutex::default(),
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let by_outcome = match polls.get_mut(org) {
            Some(by_outcome) => by_outcome,
            None => polls.entry(org.to_owned()).or_default(),
        };
        *by_outcome.entry(outcome).or_default() += 1;
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

    /// Records how long one status request took.
    pub fn poll_duration(&self, seconds: f64) {
        self.poll_duration.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    /// Records the time from detection to a receiver's 2xx.
    pub fn delivery_latency(&self, webhook: &str, seconds: f64) {
        let mut map = self.delivery_latency.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(webhook.to_owned()).or_insert_with(|| Histogram::new(&LATENCY_BUCKETS)).observe(seconds);
    }

    /// Counts one request to the inbound listener with its outcome label.
    pub fn inbound(&self, outcome: &'static str) {
        bump(&self.inbound, outcome);
    }

    /// Inbound requests with `outcome` so far.
    pub fn inbound_count(&self, outcome: &'static str) -> u64 {
        get(&self.inbound, &outcome)
    }

    /// Notifications stored so far, all types.
    pub fn notifications(&self) -> u64 {
        self.notifications.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    }

    /// Polls of `org` with `outcome` so far.
    pub fn polls(&self, org: &str, outcome: &'static str) -> u64 {
        let polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        polls.get(org).and_then(|by_outcome| by_outcome.get(outcome)).copied().unwrap_or(0)
    }

    /// Every org's polls so far, by outcome (for the status page, which
    /// keeps its own per-minute samples of it).
    pub fn polls_by_org(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        self.polls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Delivery attempts to `webhook` with `outcome` so far.
    pub fn deliveries(&self, webhook: &str, outcome: &'static str) -> u64 {
        get(&self.deliveries, &(webhook.to_owned(), outcome))
    }

    /// Counts one fault of the delivery path (see `delivery_faults`) and
    /// returns how many there were before, so a caller can warn only the
    /// first time.
    pub fn delivery_fault(&self, webhook: &str, fault: &'static str) -> u64 {
        let mut map = self.delivery_faults.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry((webhook.to_owned(), fault)).or_default();
        *n += 1;
        *n - 1
    }

    /// Delivery faults of `webhook` of this kind so far.
    pub fn delivery_faults(&self, webhook: &str, fault: &'static str) -> u64 {
        get(&self.delivery_faults, &(webhook.to_owned(), fault))
    }

    /// Sets a webhook's concurrency gauge.
    pub fn set_webhook_concurrency(&self, webhook: &str, limit: usize) {
        let mut map = self.webhook_concurrency.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(webhook) {
            Some(n) => *n = limit as u64,
            None => {
                map.insert(webhook.to_owned(), limit as u64);
            }
        }
    }

    /// After a cluster round: `instances` live, `owned` watches held here,
    /// `took_over` more watches taken from dead instances.
    pub fn set_cluster(&self, instances: i64, owned: i64, took_over: usize) {
        let mut cluster = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        let c = cluster.get_or_insert_with(ClusterGauges::default);
        c.instances = instances;
        c.owned = owned;
        c.takeovers = c.takeovers.saturating_add(took_over as u64);
    }

    /// Drops the gauges of webhooks no longer configured.
    pub fn retain_webhook_concurrency(&self, keep: impl Fn(&str) -> bool) {
        self.webhook_concurrency.lock().unwrap_or_else(|e| e.into_inner()).retain(|name, _| keep(name));
    }

    /// A webhook's concurrency limit, if the deliverer set one.
    pub fn webhook_concurrency(&self, webhook: &str) -> Option<u64> {
        self.webhook_concurrency.lock().unwrap_or_else(|e| e.into_inner()).get(webhook).copied()
    }

    /// Everything, in the Prometheus text exposition format, with the
    /// gauges taken from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP dari_relay_build_info The running version.");
        let _ = writeln!(out, "# TYPE dari_relay_build_info gauge");
        let _ = writeln!(out, "dari_relay_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(out, "# HELP dari_relay_watches Watches by state.");
        let _ = writeln!(out, "# TYPE dari_relay_watches gauge");
        for (state, n) in &snapshot.watches {
            let _ = writeln!(out, "dari_relay_watches{{state=\"{}\"}} {n}", escape(state));
        }
        let _ = writeln!(out, "# HELP dari_relay_deliveries_pending Deliveries waiting, per webhook.");
        let _ = writeln!(out, "# TYPE dari_relay_deliveries_pending gauge");
        for (webhook, (pending, _, _)) in &snapshot.backlog {
            let _ = writeln!(out, "dari_relay_deliveries_pending{{webhook=\"{}\"}} {pending}", escape(webhook));
        }
        let _ = writeln!(out, "# HELP dari_relay_deliveries_failed Deliveries that gave up, per webhook.");
        let _ = writeln!(out, "# TYPE dari_relay_deliveries_failed gauge");
        for (webhook, (_, failed, _)) in &snapshot.backlog {
            let _ = writeln!(out, "dari_relay_deliveries_failed{{webhook=\"{}\"}} {failed}", escape(webhook));
        }
        let _ = writeln!(
            out,
            "# HELP dari_relay_oldest_pending_delivery_age_seconds Age of the oldest pending delivery, per webhook."
        );
        let _ = writeln!(out, "# TYPE dari_relay_oldest_pending_delivery_age_seconds gauge");
        for (webhook, (_, _, age)) in &snapshot.backlog {
            let _ = writeln!(
                out,
                "dari_relay_oldest_pending_delivery_age_seconds{{webhook=\"{}\"}} {}",
                escape(webhook),
                age.unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dari_relay_webhook_concurrency Attempts allowed in flight to a webhook at once (adaptive, 1 to max_in_flight)."
        );
        let _ = writeln!(out, "# TYPE dari_relay_webhook_concurrency gauge");
        for (webhook, n) in self.webhook_concurrency.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "dari_relay_webhook_concurrency{{webhook=\"{}\"}} {n}", escape(webhook));
        }
        let _ = writeln!(out, "# HELP dari_relay_poll_duration_seconds Duration of status requests.");
        let _ = writeln!(out, "# TYPE dari_relay_poll_duration_seconds histogram");
        self.poll_duration.lock().unwrap_or_else(|e| e.into_inner()).render(
            &mut out,
            "dari_relay_poll_duration_seconds",
            "",
        );
        let _ = writeln!(
            out,
            "# HELP dari_relay_delivery_latency_seconds From detecting a transition to the receiver's 2xx."
        );
        let _ = writeln!(out, "# TYPE dari_relay_delivery_latency_seconds histogram");
        for (webhook, h) in self.delivery_latency.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.render(&mut out, "dari_relay_delivery_latency_seconds", &format!("webhook=\"{}\"", escape(webhook)));
        }
        let _ = writeln!(out, "# HELP dari_relay_polls_total Status requests to Dari, by org and outcome.");
        let _ = writeln!(out, "# TYPE dari_relay_polls_total counter");
        for (org, by_outcome) in self.polls.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for (outcome, n) in by_outcome {
                let _ = writeln!(out, "dari_relay_polls_total{{org=\"{}\",outcome=\"{outcome}\"}} {n}", escape(org));
            }
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
        let _ = writeln!(
            out,
            "# HELP dari_relay_delivery_faults_total Delivery faults (panicked, unrecorded, unknown_webhook), by webhook."
        );
        let _ = writeln!(out, "# TYPE dari_relay_delivery_faults_total counter");
        for ((webhook, fault), n) in self.delivery_faults.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "dari_relay_delivery_faults_total{{webhook=\"{}\",fault=\"{fault}\"}} {n}",
                escape(webhook)
            );
        }
        let _ = writeln!(
            out,
            "# HELP dari_relay_inbound_total Requests to the inbound listener (Dari's webhook), by outcome."
        );
        let _ = writeln!(out, "# TYPE dari_relay_inbound_total counter");
        for (outcome, n) in self.inbound.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "dari_relay_inbound_total{{outcome=\"{outcome}\"}} {n}");
        }
        if let Some(c) = *self.cluster.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = writeln!(
                out,
                "# HELP dari_relay_cluster_instances Live instances on the PostgreSQL database, this one included."
            );
            let _ = writeln!(out, "# TYPE dari_relay_cluster_instances gauge");
            let _ = writeln!(out, "dari_relay_cluster_instances {}", c.instances);
            let _ =
                writeln!(out, "# HELP dari_relay_watches_owned Watches whose polls and deliveries this instance owns.");
            let _ = writeln!(out, "# TYPE dari_relay_watches_owned gauge");
            let _ = writeln!(out, "dari_relay_watches_owned {}", c.owned);
            let _ = writeln!(
                out,
                "# HELP dari_relay_lease_takeovers_total Watches this instance took over from an instance whose leases had expired."
            );
            let _ = writeln!(out, "# TYPE dari_relay_lease_takeovers_total counter");
            let _ = writeln!(out, "dari_relay_lease_takeovers_total {}", c.takeovers);
        }
        out
    }
}
