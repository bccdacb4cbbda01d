//! Delivery: the only module that sends webhooks.
//!
//! The outbox is the `deliveries` table. [`Deliverer::deliver_due_once`] asks
//! the store for the head of each (job, webhook) chain, and starts an attempt
//! for every head that is due and not already in flight; a chain's next
//! delivery is not even looked at until its head is delivered or has given
//! up, which is the ordering guarantee. Each attempt signs the stored body
//! (Standard Webhooks), POSTs it without following redirects, counts only a
//! 2xx as delivered, and records the attempt and the delivery's next state in
//! one transaction. A crash between sending and recording means the attempt
//! is made again after the restart, with the same `webhook-id`: at least once.
//!
//! Faults never turn into re-sends or stuck chains. An outcome the store
//! refuses to record is kept in memory and its write retried with backoff;
//! its chain is not sent again meanwhile. A rate-limit answer (429, or 503
//! with `Retry-After`) delays the delivery and slows its webhook down
//! without spending one of the schedule's retries, for at most the
//! schedule's total time. An attempt whose task panics is recorded as a
//! failed attempt and retried per the schedule.

mod adaptive;
mod attempt;
mod live;
mod send;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, Webhook};
use crate::format::RenderError;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::retry::{self, TokenBucket};
use crate::store::{AttemptRecord, DelivererStore, DeliveryOutcome, StoreError};
use crate::vocab::{Clock, Mode, SystemClock};

pub use adaptive::{Controller, Signal};
use attempt::{Attempt, AttemptDone, Unrecorded, record, record_backoff};
pub use live::{
    Reply, SLACK_FATAL, Step, created_message, discord_reply, render as render_live, request_of, send_step,
    send_test_live, slack_reply,
};
use send::millis;
pub use send::{Quota, Response, classify, http_client, is_rate_limit, rate_limit_budget, send, webhook_client};

/// Longest wait between looks at the outbox, so deliveries requeued by the
/// CLI (`deliveries retry`) start within about a second.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long the deliverer trusts its copy of the paused webhooks.
pub(super) const PAUSES_FRESH: Duration = Duration::from_millis(250);
/// Largest part of a receiver's answer kept with an attempt.
pub(super) const EXCERPT_BYTES: usize = 4096;
/// First wait before writing again an outcome the store refused; it doubles
/// up to [`RECORD_RETRY_MAX`], so a full disk costs a failed write every few
/// seconds, not a re-sent notification.
pub(super) const RECORD_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two writes of an unrecorded outcome.
pub(super) const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the deliverer publishes its webhooks' concurrency to the store
/// for `webhooks list`; `webhooks list` shows nothing for a value older than
/// [`CONCURRENCY_STALE`].
pub const CONCURRENCY_PUBLISH: Duration = Duration::from_secs(5);
/// See [`CONCURRENCY_PUBLISH`].
pub const CONCURRENCY_STALE: Duration = Duration::from_secs(30);
/// Longest panic message kept with the attempt it ended.
pub(super) const PANIC_TEXT: usize = 200;

/// How a stored standard body becomes what a webhook gets: `format::render`,
/// replaced only by unit tests that need an attempt to panic.
pub(super) type Render = fn(&Webhook, &str) -> Result<String, RenderError>;

/// Moves `next_due` (Unix ms) earlier to `at` if that is sooner.
fn due_at(at: i64, next_due: &mut Option<i64>) {
    *next_due = Some(next_due.map_or(at, |n| n.min(at)));
}

/// The instant `d` after `from`, or the farthest one the platform can add
/// when that overflows: no `Instant` arithmetic here can panic.
fn instant_after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d).or_else(|| from.checked_add(retry::RETRY_AFTER_MAX)).unwrap_or(from)
}

/// The delivery loop. Created by `app`, consumed by [`Deliverer::run`].
pub struct Deliverer {
    /// The live config; a SIGHUP reload replaces what it holds.
    config_rx: watch::Receiver<Arc<Config>>,
    config: Arc<Config>,
    store: Arc<dyn DelivererStore>,
    http: reqwest::Client,
    /// The clients of webhooks with a `ca_file` (their own trust roots),
    /// by webhook name; every other webhook uses `http`. Rebuilt by
    /// `apply_config` on every reload, so a renewed CA file is read again.
    ca_clients: HashMap<String, reqwest::Client>,
    /// Rung by the poller when it stored deliveries.
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Stamped every time round the loop, for `/readyz` and the watchdog.
    health: Arc<Health>,
    /// (job, webhook) chains with an attempt out, or with an outcome not yet
    /// recorded; their heads are skipped.
    in_flight: HashSet<(String, String)>,
    /// Attempts out per webhook.
    per_webhook: HashMap<String, usize>,
    /// Per webhook, its adaptive concurrency: how many of its chains may
    /// have an attempt out at once, between 1 and `max_in_flight`. Kept
    /// across reloads for webhooks that stay (clamped to a new bound);
    /// only for webhooks in the config.
    concurrency: HashMap<String, Controller>,
    /// When the concurrency was last published to the store, and the
    /// publishing task: it runs beside the loop, which never waits for it
    /// (it is advisory), and a new one starts only once it has ended.
    published_at: Option<Instant>,
    publishing: Option<tokio::task::JoinHandle<()>>,
    /// Per-webhook `max_per_second` buckets.
    rate_limits: HashMap<String, TokenBucket>,
    /// Webhooks whose receiver answered with a rate limit, and until when
    /// none of their deliveries is started. Set by `finish`, read by
    /// `deliver_due_once`; kept only for webhooks in the config.
    slowed: HashMap<String, Instant>,
    /// Origin of the clock the buckets use.
    epoch: Instant,
    /// Webhooks paused by a 410, as last read from the store, and when.
    paused: HashSet<String>,
    paused_read_at: Option<Instant>,
    tasks: JoinSet<AttemptDone>,
    /// What each task in `tasks` is attempting, so that a task that panics
    /// (and hands nothing back) still releases and reschedules its chain.
    /// Inserted at spawn, removed by `finish`.
    spawned: HashMap<tokio::task::Id, Spawned>,
    /// Outcomes the store refused to record, per chain, with when to write
    /// them again. The chain stays in `in_flight` until its outcome is
    /// recorded: sending it again would re-send a notification the receiver
    /// may already have. Lost only by a crash, which re-sends at most once.
    unrecorded: HashMap<(String, String), Unrecorded>,
    /// How bodies are rendered: `format::render` except in unit tests.
    render: Render,
    /// Where the wall-clock times it stores and compares come from (attempt
    /// times, next-attempt times); the system's clock except in tests, which
    /// pause tokio's time and use a `TokioClock`. Its in-memory waits (429
    /// pauses, record retries, buckets) are on tokio's monotonic clock.
    clock: Arc<dyn Clock>,
}

/// One spawned attempt, as the loop knows it.
struct Spawned {
    chain: (String, String),
    delivery_id: i64,
    /// Attempts counted before this one.
    attempts: u32,
}

/// The text of a panic, bounded.
fn panic_text(payload: Box<dyn Any + Send>) -> String {
    let text = match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload.downcast_ref::<&str>().map_or("a panic without a message", |s| s).to_owned(),
    };
    text.chars().take(PANIC_TEXT).collect()
}

impl Deliverer {
    /// A deliverer over `store`'s outbox, following the config in `config_rx`.
    pub fn new(
        config_rx: watch::Receiver<Arc<Config>>,
        store: Arc<dyn DelivererStore>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        wake: Arc<Notify>,
    ) -> Result<Deliverer, reqwest::Error> {
        let config = Arc::clone(&config_rx.borrow());
        let mut deliverer = Deliverer {
            http: http_client(&config)?,
            ca_clients: HashMap::new(),
            config_rx,
            config: Arc::clone(&config),
            store,
            wake,
            metrics,
            health,
            in_flight: HashSet::new(),
            per_webhook: HashMap::new(),
            concurrency: HashMap::new(),
            published_at: None,
            publishing: None,
            rate_limits: HashMap::new(),
            slowed: HashMap::new(),
            epoch: Instant::now(),
            paused: HashSet::new(),
            paused_read_at: None,
            tasks: JoinSet::new(),
            spawned: HashMap::new(),
            unrecorded: HashMap::new(),
            render: Webhook::render,
            clock: Arc::new(SystemClock),
        };
        deliverer.apply_config(config);
        Ok(deliverer)
    }

    /// The same deliverer reading `clock` instead of the system's clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Deliverer {
        self.clock = clock;
        self
    }

    fn apply_config(&mut self, config: Arc<Config>) {
        if config.delivery.request_timeout != self.config.delivery.request_timeout {
            match http_client(&config) {
                Ok(http) => self.http = http,
                Err(e) => error!(error = %e, "cannot rebuild the delivery client; keeping the old timeout"),
            }
        }
        let mut ca_clients = HashMap::new();
        for w in config.webhooks.iter().filter(|w| w.ca_file.is_some()) {
            match webhook_client(&config, w) {
                Ok(http) => {
                    ca_clients.insert(w.name.clone(), http);
                }
                // Config loading checked the certificates, so this is not
                // expected; the webhook keeps the client it had, if any.
                Err(e) => match self.ca_clients.remove(&w.name) {
                    Some(old) => {
                        error!(webhook = %w.name, error = %e, "cannot build the client with its ca_file; keeping the old one");
                        ca_clients.insert(w.name.clone(), old);
                    }
                    None => {
                        error!(webhook = %w.name, error = %e, "cannot build the client with its ca_file; its receiver is trusted under the built-in roots only")
                    }
                },
            }
        }
        self.ca_clients = ca_clients;
        let now = self.epoch.elapsed();
        self.rate_limits = config
            .webhooks
            .iter()
            .filter_map(|w| {
                let (rate, burst) = w.rate_limit()?;
                Some((w.name.clone(), TokenBucket::with_burst(rate, burst, now)))
            })
            .collect();
        self.slowed.retain(|name, _| config.webhooks.iter().any(|w| &w.name == name));
        self.concurrency.retain(|name, _| config.webhooks.iter().any(|w| &w.name == name));
        for w in &config.webhooks {
            let controller =
                self.concurrency.entry(w.name.clone()).or_insert_with(|| Controller::new(w.max_in_flight, now));
            controller.set_max(w.max_in_flight);
            self.metrics.set_webhook_concurrency(&w.name, controller.limit());
        }
        self.metrics.retain_webhook_concurrency(|name| config.webhooks.iter().any(|w| w.name == name));
        self.config = config;
    }

    /// Delivers until `shutdown` is cancelled, then lets attempts in flight
    /// finish for up to `shutdown_timeout`. Whatever is left stays pending.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), StoreError> {
        // The heartbeat has its own tick, so a busy loop does not read the
        // clock every turn and an idle one still beats.
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.config_rx.has_changed().unwrap_or(false) {
                let config = Arc::clone(&self.config_rx.borrow_and_update());
                info!(webhooks = config.webhooks.len(), "deliverer uses the reloaded config");
                self.apply_config(config);
            }
            let wait = match self.deliver_due_once().await {
                Ok(Some(next_ms)) => {
                    Duration::from_millis(next_ms.saturating_sub(self.clock.now_ms()).max(0) as u64).min(IDLE_CHECK)
                }
                Ok(None) => IDLE_CHECK,
                Err(e) => {
                    error!(error = %e, "cannot read the outbox; will retry");
                    IDLE_CHECK
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                Some(done) = self.tasks.join_next_with_id() => {
                    self.finish(done).await;
                    // Take every attempt that ended meanwhile before looking
                    // at the outbox again: one query for many completions.
                    while let Some(done) = self.tasks.try_join_next_with_id() {
                        self.finish(done).await;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
                _ = beat.tick() => self.health.deliverer_beat(),
            }
        }
        let in_flight = self.tasks.len();
        if in_flight > 0 {
            info!(in_flight, "waiting for deliveries in flight");
            let limit = self.config.delivery.shutdown_timeout;
            let drain = async {
                while let Some(done) = self.tasks.join_next_with_id().await {
                    self.finish(done).await;
                }
            };
            if tokio::time::timeout(limit, drain).await.is_err() {
                warn!(
                    left = self.tasks.len(),
                    "shutdown timeout: unfinished deliveries stay pending for the next start"
                );
                self.tasks.abort_all();
            }
        }
        // A last try for the outcomes the store refused; what still fails is
        // pending in the store and is sent again after the restart, with the
        // same webhook-id (at least once).
        for (chain, u) in std::mem::take(&mut self.unrecorded) {
            if let Err(e) = record(&*self.store, u.delivery_id, u.record, &u.outcome).await {
                warn!(job_id = %chain.0, webhook = %chain.1, delivery_id = u.delivery_id, error = %e,
                    "shutdown: the attempt's outcome could not be recorded; the delivery is sent again after the restart");
            }
        }
        Ok(())
    }

    async fn finish(&mut self, done: Result<(tokio::task::Id, AttemptDone), tokio::task::JoinError>) {
        let task = match &done {
            Ok((task, _)) => *task,
            Err(e) => e.id(),
        };
        let Some(spawned) = self.spawned.remove(&task) else {
            error!("a delivery task the deliverer did not start ended");
            return;
        };
        let webhook = spawned.chain.1.clone();
        if let Some(n) = self.per_webhook.get_mut(&webhook) {
            *n = n.saturating_sub(1);
        }
        let unrecorded = match done {
            Ok((_, done)) => {
                let (rtt, signal) = done.signal;
                let now = self.epoch.elapsed();
                if let Some(c) = self.concurrency.get_mut(&webhook)
                    && c.answered(now, rtt, signal)
                {
                    debug!(webhook = %webhook, concurrency = c.limit(), rtt_ms = millis(rtt), ?signal, "webhook concurrency changed");
                    self.metrics.set_webhook_concurrency(&webhook, c.limit());
                }
                if let Some(wait) = done.slow_down {
                    let until = instant_after(Instant::now(), wait);
                    let slowed = self.slowed.entry(webhook.clone()).or_insert(until);
                    *slowed = (*slowed).max(until);
                }
                if done.gone {
                    self.pause(&webhook).await;
                }
                done.unrecorded
            }
            Err(e) if e.is_panic() => self.panicked(&spawned, panic_text(e.into_panic())).await,
            // Aborted at shutdown: the delivery is still pending in the store.
            Err(e) => {
                debug!(error = %e, delivery_id = spawned.delivery_id, "a delivery task was cancelled");
                None
            }
        };
        match unrecorded {
            Some(u) => {
                // The chain stays in `in_flight`: it is not sent again until
                // this outcome is in the store.
                self.metrics.delivery_fault(&webhook, "unrecorded");
                self.unrecorded.insert(spawned.chain, u);
            }
            None => {
                self.in_flight.remove(&spawned.chain);
            }
        }
    }

    /// Pauses `webhook` after a 410, unless it already is.
    async fn pause(&mut self, webhook: &str) {
        if !self.paused.insert(webhook.to_owned()) {
            return;
        }
        error!(webhook = %webhook, "the receiver answered 410 Gone: webhook paused, its deliveries wait; resume with `dari-relay webhooks resume {webhook}`");
        let name = webhook.to_owned();
        let reason = "receiver answered 410 Gone".to_owned();
        if let Err(e) = self.store.pause_webhook(name, reason).await {
            error!(webhook = %webhook, error = %e, "cannot store the pause; it holds until restart");
        }
    }

    /// An attempt's task panicked (a render, a format, a bug): log and count
    /// it, and record it as a failed attempt so the chain is retried per the
    /// schedule instead of waiting forever for a task that is gone. Returns
    /// the outcome when the store refuses it.
    async fn panicked(&mut self, spawned: &Spawned, text: String) -> Option<Unrecorded> {
        let (job_id, webhook) = &spawned.chain;
        self.metrics.delivery_fault(webhook, "panicked");
        let now = self.clock.now_ms();
        let retry = retry::delivery_retry_delay(
            &self.config.delivery.retry_schedule,
            spawned.attempts as usize + 1,
            None,
            fastrand::f64(),
        );
        let error = format!("the attempt panicked: {text}");
        let outcome = match retry {
            Some(wait) => DeliveryOutcome::RetryAt { at_ms: now.saturating_add(millis(wait)), error: error.clone() },
            None => DeliveryOutcome::GaveUp { error: error.clone() },
        };
        error!(%job_id, %webhook, delivery_id = spawned.delivery_id, panic = %text, outcome = outcome.label(),
            "a delivery attempt panicked; recorded as a failed attempt");
        let record_ = AttemptRecord {
            attempted_at: now,
            duration_ms: 0,
            http_status: None,
            response_excerpt: None,
            error: Some(error),
        };
        match record(&*self.store, spawned.delivery_id, record_.clone(), &outcome).await {
            Ok(()) => None,
            Err(e) => {
                error!(delivery_id = spawned.delivery_id, error = %e, "cannot record the panicked attempt; kept in memory, the write is retried");
                Some(Unrecorded {
                    delivery_id: spawned.delivery_id,
                    record: record_,
                    outcome,
                    tries: 1,
                    retry_at: instant_after(Instant::now(), record_backoff(1)),
                })
            }
        }
    }

    /// Writes again the outcomes the store refused whose time has come,
    /// releasing the chain of each one that is recorded at last. Stops at
    /// the first refusal (the store is still failing) and puts every write
    /// that was due off by the next backoff, so a full disk costs one failed
    /// write per backoff, not one per wake-up. Returns when the earliest
    /// outstanding write is due (Unix ms).
    async fn record_outstanding(&mut self) -> Option<i64> {
        let now = Instant::now();
        let due: Vec<(String, String)> =
            self.unrecorded.iter().filter(|(_, u)| u.retry_at <= now).map(|(chain, _)| chain.clone()).collect();
        for (i, chain) in due.iter().enumerate() {
            let Some(u) = self.unrecorded.get(chain) else { continue };
            match record(&*self.store, u.delivery_id, u.record.clone(), &u.outcome).await {
                Ok(()) => {
                    info!(job_id = %chain.0, webhook = %chain.1, delivery_id = u.delivery_id, tries = u.tries + 1,
                        "the attempt's outcome is recorded at last");
                    self.unrecorded.remove(chain);
                    self.in_flight.remove(chain);
                }
                Err(StoreError::Fenced) => {
                    warn!(job_id = %chain.0, webhook = %chain.1, delivery_id = u.delivery_id,
                        "another instance owns this job now; the attempt is not recorded here and the owner sends the delivery again");
                    self.unrecorded.remove(chain);
                    self.in_flight.remove(chain);
                }
                Err(e) => {
                    warn!(job_id = %chain.0, webhook = %chain.1, delivery_id = u.delivery_id, error = %e,
                        "still cannot record the attempt; the delivery is not sent again meanwhile");
                    for chain in &due[i..] {
                        if let Some(u) = self.unrecorded.get_mut(chain) {
                            u.tries = u.tries.saturating_add(1);
                            u.retry_at = instant_after(now, record_backoff(u.tries));
                        }
                    }
                    break;
                }
            }
        }
        let earliest = self.unrecorded.values().map(|u| u.retry_at).min()?;
        Some(self.clock.now_ms().saturating_add(millis(earliest.saturating_duration_since(Instant::now()))))
    }

    /// Starts an attempt for every due chain head that is not in flight,
    /// webhook by webhook, within each webhook's limits. Returns when the
    /// earliest head not started is due (Unix ms), if any. The loop's one
    /// step; tests call it directly.
    pub async fn deliver_due_once(&mut self) -> Result<Option<i64>, StoreError> {
        let mut next_due: Option<i64> = self.record_outstanding().await;
        if self.published_at.is_none_or(|at| at.elapsed() >= CONCURRENCY_PUBLISH)
            && self.publishing.as_ref().is_none_or(|task| task.is_finished())
        {
            self.published_at = Some(Instant::now());
            let limits = self.concurrency.iter().map(|(name, c)| (name.clone(), c.limit())).collect();
            let store = Arc::clone(&self.store);
            self.publishing = Some(tokio::spawn(async move {
                if let Err(e) = store.publish_concurrency(limits).await {
                    debug!(error = %e, "cannot publish the webhooks' concurrency; `webhooks list` shows none meanwhile");
                }
            }));
        }
        // The pauses change only by a 410 (seen here first) or by
        // `webhooks resume` in another process, so they are read again at
        // most every PAUSES_FRESH, not on each of the many wake-ups a busy
        // poller sends.
        if self.paused_read_at.is_none_or(|at| at.elapsed() >= PAUSES_FRESH) {
            let paused = self.store.paused_webhooks().await?;
            for name in self.paused.iter().filter(|n| !paused.contains_key(*n)) {
                info!(webhook = %name, "webhook resumed");
            }
            self.paused = paused.into_keys().collect();
            self.paused_read_at = Some(Instant::now());
        }
        // The config as of this turn; iterating it through a cloned Arc costs
        // nothing, where cloning the webhooks (templates, headers) would cost
        // every wake-up.
        let config = Arc::clone(&self.config);
        for webhook in config.webhooks.iter().filter(|w| !self.paused.contains(&w.name)) {
            let busy = self.per_webhook.get(&webhook.name).copied().unwrap_or(0);
            let allowed = self.concurrency.get(&webhook.name).map_or(webhook.max_in_flight, Controller::limit);
            if busy >= allowed {
                continue;
            }
            // The receiver asked to slow down: none of its deliveries starts
            // before the time it gave.
            if let Some(until) = self.slowed.get(&webhook.name) {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    due_at(self.clock.now_ms().saturating_add(millis(left)), &mut next_due);
                    continue;
                }
            }
            // Heads of chains in flight or waiting for a record come back
            // too; ask for enough.
            let held = self.unrecorded.keys().filter(|(_, w)| *w == webhook.name).count();
            let limit = busy + held + allowed + 16;
            let name = webhook.name.clone();
            let heads = self.store.pending_heads(name, limit).await?;
            let now = self.clock.now_ms();
            let mut to_start = Vec::new();
            for head in heads {
                let chain = (head.job_id, head.webhook);
                if self.in_flight.contains(&chain) {
                    continue;
                }
                if head.next_attempt_at > now {
                    due_at(head.next_attempt_at, &mut next_due);
                    break; // heads come earliest first
                }
                if self.per_webhook.get(&webhook.name).copied().unwrap_or(0) >= allowed {
                    break;
                }
                let elapsed = self.epoch.elapsed();
                if let Some(Err(wait)) = self.rate_limits.get_mut(&webhook.name).map(|b| b.take(elapsed)) {
                    due_at(now.saturating_add(millis(wait)), &mut next_due);
                    break;
                }
                let out = self.per_webhook.entry(webhook.name.clone()).or_default();
                *out += 1;
                if *out >= allowed
                    && let Some(c) = self.concurrency.get_mut(&webhook.name)
                {
                    c.reached_limit();
                }
                self.in_flight.insert(chain);
                to_start.push(head.id);
            }
            if to_start.is_empty() {
                continue;
            }
            // One query for the bodies of everything this webhook starts now.
            let ids = std::mem::take(&mut to_start);
            let outbound = self.store.outbound(ids).await?;
            if !self.store.still_owner() {
                // The leases may have lapsed while this turn waited on the
                // database (a freeze: several instances on PostgreSQL):
                // another instance may be sending these chains now, so none
                // is started; the store refuses this instance's writes too.
                warn!(webhook = %webhook.name, "this instance's leases may have lapsed; not sending");
                for delivery in outbound {
                    self.in_flight.remove(&(delivery.job_id, delivery.webhook));
                    if let Some(n) = self.per_webhook.get_mut(&webhook.name) {
                        *n = n.saturating_sub(1);
                    }
                }
                return Ok(None);
            }
            for delivery in outbound {
                let chain = (delivery.job_id.clone(), delivery.webhook.clone());
                let id = delivery.id;
                let attempts = delivery.attempts;
                let attempt = Attempt {
                    http: self.ca_clients.get(&webhook.name).unwrap_or(&self.http).clone(),
                    metrics: Arc::clone(&self.metrics),
                    store: Arc::clone(&self.store),
                    schedule: self.config.delivery.retry_schedule.clone(),
                    webhook: webhook.clone(),
                    render: self.render,
                    clock: Arc::clone(&self.clock),
                    delivery,
                };
                let span = info_span!("deliver", job_id = %chain.0, webhook = %chain.1, delivery_id = id, attempt = attempts + 1);
                let handle = match webhook.mode {
                    Mode::Live => self.tasks.spawn(attempt.run_live().instrument(span)),
                    Mode::Each => self.tasks.spawn(attempt.run().instrument(span)),
                };
                self.spawned.insert(handle.id(), Spawned { chain, delivery_id: id, attempts });
            }
        }
        Ok(next_due)
    }
}
