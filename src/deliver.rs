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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, Format, Webhook};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::retry::{self, TokenBucket};
use crate::store::{AttemptRecord, DeliveryUpdate, OutboundDelivery, Store, StoreError, now_ms};

/// Longest wait between looks at the outbox, so deliveries requeued by the
/// CLI (`deliveries retry`) start within about a second.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long the deliverer trusts its copy of the paused webhooks.
const PAUSES_FRESH: Duration = Duration::from_millis(250);
/// Largest part of a receiver's answer kept with an attempt.
const EXCERPT_BYTES: usize = 4096;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// 2xx.
    Delivered { status: u16 },
    /// Non-2xx or transport failure; try again at this time (Unix ms).
    RetryAt { at_ms: i64, error: String },
    /// The schedule is exhausted; the delivery is now `failed`.
    GaveUp { error: String },
    /// 410 Gone: the webhook is paused and the delivery waits for it.
    Paused,
}

impl AttemptOutcome {
    /// The label under which the outcome is counted.
    pub fn label(&self) -> &'static str {
        match self {
            AttemptOutcome::Delivered { .. } => "delivered",
            AttemptOutcome::RetryAt { .. } => "retry",
            AttemptOutcome::GaveUp { .. } => "gave_up",
            AttemptOutcome::Paused => "gone",
        }
    }
}

/// The raw result of one HTTP POST to a receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// Its `Retry-After`, parsed.
    pub retry_after: Option<Duration>,
    /// The start of its body.
    pub excerpt: Option<String>,
    /// A transport error (timeout, refused, TLS), never containing the URL.
    pub error: Option<String>,
}

impl Response {
    /// Whether this counts as delivered.
    pub fn is_success(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The HTTP client for receivers: redirects are never followed (a 3xx is a
/// failed attempt), and the timeout is `[delivery] request_timeout`.
pub fn http_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(crate::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.delivery.request_timeout)
        .connect_timeout(config.delivery.request_timeout)
        .build()
}

/// Sends `body` (already rendered for the webhook's format or template) to
/// `webhook` with the Standard Webhooks headers, signing it for this
/// attempt's timestamp, and the webhook's own headers.
pub async fn send(http: &reqwest::Client, webhook: &Webhook, msg_id: &str, body: String) -> Response {
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let mut headers = HeaderMap::new();
    // Config loading refused the names the relay sets below, so these never
    // replace a Standard Webhooks header.
    for extra in &webhook.headers {
        headers.insert(extra.name.clone(), extra.value.clone());
    }
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(webhook.content_type()).expect("config loading checked the content type"),
    );
    let text_header = |s: &str| HeaderValue::from_str(s).expect("ids, digits and base64 are valid header values");
    headers.insert("webhook-id", text_header(msg_id));
    headers.insert("webhook-timestamp", text_header(&timestamp.to_string()));
    if let Some(key) = &webhook.secret {
        headers.insert("webhook-signature", text_header(&key.sign(msg_id, timestamp, body.as_bytes())));
    }
    let result = http.post(webhook.url.clone()).headers(headers).body(body).send().await;
    let mut response = match result {
        Ok(r) => r,
        // The URL may be a secret (Slack, Discord): never let it into the message.
        Err(e) => {
            return Response { status: None, retry_after: None, excerpt: None, error: Some(describe(e)) };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    let mut excerpt = Vec::new();
    let mut error = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                excerpt.extend_from_slice(&chunk[..chunk.len().min(EXCERPT_BYTES - excerpt.len())]);
                if excerpt.len() >= EXCERPT_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(describe(e));
                break;
            }
        }
    }
    let excerpt = (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned());
    // Discord's 429 says how long to wait in its JSON body as well.
    let retry_after = match (retry_after, &excerpt) {
        (None, Some(body)) if status == 429 && webhook.format == Format::Discord => retry::retry_after_in_body(body),
        (retry_after, _) => retry_after,
    };
    Response { status: Some(status), retry_after, excerpt, error }
}

fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        text = format!("{text}: {next}");
        cause = next;
    }
    if timeout { format!("timed out: {text}") } else { text }
}

/// Decides what an attempt's response means for its delivery, given how many
/// attempts were made before it. Pure, so the rule is tested on its own.
pub fn classify(
    response: &Response,
    attempts_before: u32,
    schedule: &[Duration],
    now_ms: i64,
    unit: f64,
) -> AttemptOutcome {
    // 410 Gone: the receiver is gone for good; pause the whole webhook
    // rather than spend this delivery's retries.
    if response.status == Some(410) {
        return AttemptOutcome::Paused;
    }
    if let Some(status) = response.status.filter(|_| response.is_success()) {
        return AttemptOutcome::Delivered { status };
    }
    let error = match (&response.error, response.status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "no answer".to_owned(),
    };
    let retry_number = attempts_before as usize + 1;
    match retry::delivery_retry_delay(schedule, retry_number, response.retry_after, unit) {
        Some(wait) => AttemptOutcome::RetryAt { at_ms: now_ms + wait.as_millis() as i64, error },
        None => AttemptOutcome::GaveUp { error },
    }
}

/// The delivery loop. Created by `app`, consumed by [`Deliverer::run`].
pub struct Deliverer {
    /// The live config; a SIGHUP reload replaces what it holds.
    config_rx: watch::Receiver<Arc<Config>>,
    config: Arc<Config>,
    store: Arc<Store>,
    http: reqwest::Client,
    /// Rung by the poller when it stored deliveries.
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Stamped every time round the loop, for `/readyz` and the watchdog.
    health: Arc<Health>,
    /// (job, webhook) chains with an attempt out; their heads are skipped.
    in_flight: HashSet<(String, String)>,
    /// Attempts out per webhook.
    per_webhook: HashMap<String, usize>,
    /// Per-webhook `max_per_second` buckets.
    rate_limits: HashMap<String, TokenBucket>,
    /// Origin of the clock the buckets use.
    epoch: Instant,
    /// Webhooks paused by a 410, as last read from the store, and when.
    paused: HashSet<String>,
    paused_read_at: Option<Instant>,
    tasks: JoinSet<AttemptDone>,
}

/// What an attempt task hands back to the loop.
struct AttemptDone {
    chain: (String, String),
    /// The receiver answered 410 Gone: pause the webhook.
    gone: bool,
}

impl Deliverer {
    /// A deliverer over `store`'s outbox, following the config in `config_rx`.
    pub fn new(
        config_rx: watch::Receiver<Arc<Config>>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        wake: Arc<Notify>,
    ) -> Result<Deliverer, reqwest::Error> {
        let config = Arc::clone(&config_rx.borrow());
        let mut deliverer = Deliverer {
            http: http_client(&config)?,
            config_rx,
            config: Arc::clone(&config),
            store,
            wake,
            metrics,
            health,
            in_flight: HashSet::new(),
            per_webhook: HashMap::new(),
            rate_limits: HashMap::new(),
            epoch: Instant::now(),
            paused: HashSet::new(),
            paused_read_at: None,
            tasks: JoinSet::new(),
        };
        deliverer.apply_config(config);
        Ok(deliverer)
    }

    fn apply_config(&mut self, config: Arc<Config>) {
        if config.delivery.request_timeout != self.config.delivery.request_timeout {
            match http_client(&config) {
                Ok(http) => self.http = http,
                Err(e) => error!(error = %e, "cannot rebuild the delivery client; keeping the old timeout"),
            }
        }
        let now = self.epoch.elapsed();
        self.rate_limits = config
            .webhooks
            .iter()
            .filter_map(|w| Some((w.name.clone(), TokenBucket::new(w.max_per_second?, now))))
            .collect();
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
                Ok(Some(next_ms)) => Duration::from_millis((next_ms - now_ms()).max(0) as u64).min(IDLE_CHECK),
                Ok(None) => IDLE_CHECK,
                Err(e) => {
                    error!(error = %e, "cannot read the outbox; will retry");
                    IDLE_CHECK
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                Some(done) = self.tasks.join_next() => {
                    self.finish(done).await;
                    // Take every attempt that ended meanwhile before looking
                    // at the outbox again: one query for many completions.
                    while let Some(done) = self.tasks.try_join_next() {
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
                while let Some(done) = self.tasks.join_next().await {
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
        Ok(())
    }

    async fn finish(&mut self, done: Result<AttemptDone, tokio::task::JoinError>) {
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // Only an abort at shutdown or a panic gets here; the
                // delivery is still pending in the store either way.
                error!(error = %e, "a delivery task ended abnormally");
                return;
            }
        };
        let webhook = done.chain.1.clone();
        if let Some(n) = self.per_webhook.get_mut(&webhook) {
            *n = n.saturating_sub(1);
        }
        self.in_flight.remove(&done.chain);
        if done.gone && self.paused.insert(webhook.clone()) {
            error!(webhook = %webhook, "the receiver answered 410 Gone: webhook paused, its deliveries wait; resume with `dari-relay webhooks resume {webhook}`");
            let name = webhook.clone();
            let reason = "receiver answered 410 Gone".to_owned();
            if let Err(e) = self.store.call(move |s| s.pause_webhook(&name, &reason)).await {
                error!(webhook = %webhook, error = %e, "cannot store the pause; it holds until restart");
            }
        }
    }

    /// Starts an attempt for every due chain head that is not in flight,
    /// webhook by webhook, within each webhook's limits. Returns when the
    /// earliest head not started is due (Unix ms), if any. The loop's one
    /// step; tests call it directly.
    pub async fn deliver_due_once(&mut self) -> Result<Option<i64>, StoreError> {
        // The pauses change only by a 410 (seen here first) or by
        // `webhooks resume` in another process, so they are read again at
        // most every PAUSES_FRESH, not on each of the many wake-ups a busy
        // poller sends.
        if self.paused_read_at.is_none_or(|at| at.elapsed() >= PAUSES_FRESH) {
            let paused = self.store.call(|s| s.paused_webhooks()).await?;
            for name in self.paused.iter().filter(|n| !paused.contains_key(*n)) {
                info!(webhook = %name, "webhook resumed");
            }
            self.paused = paused.into_keys().collect();
            self.paused_read_at = Some(Instant::now());
        }
        let mut next_due: Option<i64> = None;
        // The config as of this turn; iterating it through a cloned Arc costs
        // nothing, where cloning the webhooks (templates, headers) would cost
        // every wake-up.
        let config = Arc::clone(&self.config);
        for webhook in config.webhooks.iter().filter(|w| !self.paused.contains(&w.name)) {
            let busy = self.per_webhook.get(&webhook.name).copied().unwrap_or(0);
            if busy >= webhook.max_in_flight {
                continue;
            }
            // Heads of chains already in flight come back too; ask for enough.
            let limit = busy + webhook.max_in_flight + 16;
            let name = webhook.name.clone();
            let heads = self.store.call(move |s| s.pending_heads(&name, limit)).await?;
            let now = now_ms();
            let mut to_start = Vec::new();
            for head in heads {
                let chain = (head.job_id, head.webhook);
                if self.in_flight.contains(&chain) {
                    continue;
                }
                if head.next_attempt_at > now {
                    next_due = Some(next_due.map_or(head.next_attempt_at, |n| n.min(head.next_attempt_at)));
                    break; // heads come earliest first
                }
                if self.per_webhook.get(&webhook.name).copied().unwrap_or(0) >= webhook.max_in_flight {
                    break;
                }
                let elapsed = self.epoch.elapsed();
                if let Some(Err(wait)) = self.rate_limits.get_mut(&webhook.name).map(|b| b.take(elapsed)) {
                    let at = now + wait.as_millis() as i64;
                    next_due = Some(next_due.map_or(at, |n| n.min(at)));
                    break;
                }
                *self.per_webhook.entry(webhook.name.clone()).or_default() += 1;
                self.in_flight.insert(chain);
                to_start.push(head.id);
            }
            if to_start.is_empty() {
                continue;
            }
            // One query for the bodies of everything this webhook starts now.
            let ids = std::mem::take(&mut to_start);
            for delivery in self.store.call(move |s| s.outbound_many(&ids)).await? {
                let chain = (delivery.job_id.clone(), delivery.webhook.clone());
                let id = delivery.id;
                let attempt = Attempt {
                    http: self.http.clone(),
                    metrics: Arc::clone(&self.metrics),
                    store: Arc::clone(&self.store),
                    schedule: self.config.delivery.retry_schedule.clone(),
                    webhook: webhook.clone(),
                    delivery,
                };
                let span = info_span!("deliver", job_id = %chain.0, webhook = %chain.1, delivery_id = id, attempt = attempt.delivery.attempts + 1);
                self.tasks.spawn(
                    async move {
                        let gone = attempt.run().await;
                        AttemptDone { chain, gone }
                    }
                    .instrument(span),
                );
            }
        }
        Ok(next_due)
    }
}

/// One attempt of one delivery, run in its own task.
struct Attempt {
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    schedule: Vec<Duration>,
    webhook: Webhook,
    delivery: OutboundDelivery,
}

impl Attempt {
    /// Makes the attempt and records it. Returns `true` when the receiver
    /// answered 410 Gone, which pauses the webhook: the delivery then stays
    /// pending, due at once, for when the webhook is resumed.
    async fn run(self) -> bool {
        let started_ms = now_ms();
        let clock = Instant::now();
        let (response, outcome) = match crate::format::render(&self.webhook, &self.delivery.body) {
            Ok(body) => {
                let response = send(&self.http, &self.webhook, &self.delivery.msg_id, body).await;
                let outcome = classify(&response, self.delivery.attempts, &self.schedule, now_ms(), fastrand::f64());
                (response, outcome)
            }
            Err(e) => {
                // A body that cannot be rendered will not render next time
                // either (the stored body and the template are both fixed).
                let error = e.to_string();
                let response = Response { status: None, retry_after: None, excerpt: None, error: Some(error.clone()) };
                (response, AttemptOutcome::GaveUp { error })
            }
        };
        self.metrics.delivery(&self.webhook.name, outcome.label());
        let (update, error) = match &outcome {
            AttemptOutcome::Delivered { status } => {
                let latency_ms = now_ms() - self.delivery.detected_at;
                self.metrics.delivery_latency(&self.webhook.name, latency_ms.max(0) as f64 / 1000.0);
                info!(status, kind = %self.delivery.kind, latency_ms, "delivered");
                (DeliveryUpdate::Delivered, None)
            }
            AttemptOutcome::RetryAt { at_ms, error } => {
                warn!(%error, kind = %self.delivery.kind, retry_in_ms = at_ms - now_ms(), "delivery failed; will retry");
                (DeliveryUpdate::RetryAt(*at_ms), Some(error.clone()))
            }
            AttemptOutcome::GaveUp { error } => {
                error!(%error, kind = %self.delivery.kind, "delivery failed for the last time; kept as failed");
                (DeliveryUpdate::GaveUp, Some(error.clone()))
            }
            AttemptOutcome::Paused => (DeliveryUpdate::Paused, Some("HTTP 410 Gone: webhook paused".to_owned())),
        };
        let gone = matches!(outcome, AttemptOutcome::Paused);
        let record = AttemptRecord {
            attempted_at: started_ms,
            duration_ms: clock.elapsed().as_millis() as i64,
            http_status: response.status,
            response_excerpt: response.excerpt,
            error: error.or(response.error),
        };
        let id = self.delivery.id;
        let store = &self.store;
        let write = || async { store.write_attempt(id, record.clone(), update).await };
        if let Err(e) =
            write.retry(ExponentialBuilder::default().with_min_delay(Duration::from_millis(50)).with_max_times(5)).await
        {
            // The delivery stays as it was (pending) and is attempted again,
            // with the same webhook-id: a duplicate, never a loss.
            error!(error = %e, "cannot record the attempt; the delivery stays pending");
        } else {
            debug!("attempt recorded");
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: Option<u16>, retry_after: Option<u64>) -> Response {
        Response { status, retry_after: retry_after.map(Duration::from_secs), excerpt: None, error: None }
    }

    #[test]
    fn only_2xx_is_delivered_and_the_schedule_runs_out() {
        let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
        assert_eq!(
            classify(&response(Some(204), None), 0, &schedule, 0, 0.5),
            AttemptOutcome::Delivered { status: 204 }
        );
        assert_eq!(
            classify(&response(Some(500), None), 0, &schedule, 1_000, 0.5),
            AttemptOutcome::RetryAt { at_ms: 6_000, error: "HTTP 500".into() }
        );
        assert_eq!(
            classify(&response(Some(302), None), 1, &schedule, 0, 0.5),
            AttemptOutcome::RetryAt { at_ms: 300_000, error: "HTTP 302".into() }
        );
        assert_eq!(
            classify(&response(Some(503), Some(9)), 1, &schedule, 0, 0.5),
            AttemptOutcome::RetryAt { at_ms: 9_000, error: "HTTP 503".into() }
        );
        assert_eq!(
            classify(&response(None, None), 2, &schedule, 0, 0.5),
            AttemptOutcome::GaveUp { error: "no answer".into() }
        );
        // 410 pauses the webhook, whatever is left of the schedule.
        assert_eq!(classify(&response(Some(410), None), 0, &schedule, 0, 0.5), AttemptOutcome::Paused);
        assert_eq!(classify(&response(Some(410), None), 2, &schedule, 0, 0.5), AttemptOutcome::Paused);
    }
}
